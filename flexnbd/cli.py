"""The command line: parses arguments, builds config objects, starts a mode.

Every bad input ends in one clear line on stderr plus the mode's usage, and exit status 1;
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flexnbd import __version__, log, sockets
from flexnbd.config import ServeConfig, TransferConfig
from flexnbd.errors import FlexnbdError, RemoteError, UsageError

PROG = "flexnbd"
MAX_OFFSET = 1 << 62
MAX_SIZE = 1 << 30


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   default=0, help="log info messages too (debug with FLEXNBD_DEBUG=1)")
    p.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   help="log fatal errors only")


def _address(text: str) -> str:
    try:
        return sockets.parse_ip(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad IP address {text!r}") from None


def _port(text: str) -> int:
    try:
        return sockets.parse_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (1..65535)") from None


def _number(limit: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) > limit:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r} (0..{limit})")
        return int(text)
    return parse


def _serve_parser() -> _Parser:
    p = _Parser(prog=f"{PROG} serve", add_help=False,
                description="Serve FILE over NBD.",
                usage=f"{PROG} serve --addr ADDR --port PORT --file FILE [--unix PATH] "
                      "[--read-only] [--oldstyle] [-v|-q]")
    p.add_argument("-l", "--addr", type=_address, help="address to listen on (0 for any)")
    p.add_argument("-p", "--port", type=_port, help="TCP port to listen on")
    p.add_argument("-f", "--file", help="the file to serve (must exist)")
    p.add_argument("--unix", metavar="PATH", help="also serve NBD on this Unix socket")
    p.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    p.add_argument("-o", "--oldstyle", action="store_true",
                   help="offer the oldstyle handshake (flexnbd 0.5.0 peers)")
    _global_options(p)
    return p


def _transfer_parser(mode: str) -> _Parser:
    what = "print SIZE bytes from OFFSET to stdout" if mode == "read" else \
        "write SIZE bytes from stdin at OFFSET"
    p = _Parser(prog=f"{PROG} {mode}", add_help=False,
                description=f"Connect to an NBD server and {what}.",
                usage=f"{PROG} {mode} --addr ADDR --port PORT --from OFFSET --size SIZE "
                      "[--bind BIND_ADDR] [-v|-q]")
    p.add_argument("-l", "--addr", type=_address, help="the server's address")
    p.add_argument("-p", "--port", type=_port, help="the server's port")
    p.add_argument("-F", "--from", dest="offset", type=_number(MAX_OFFSET, "offset"),
                   help="byte offset")
    p.add_argument("-S", "--size", type=_number(MAX_SIZE, "size"), help="byte count")
    p.add_argument("-b", "--bind", type=_address, help="local address to connect from")
    _global_options(p)
    return p


PARSERS: dict[str, Callable[[], _Parser]] = {
    "serve": _serve_parser,
    "read": lambda: _transfer_parser("read"),
    "write": lambda: _transfer_parser("write"),
}

REQUIRED = {
    "serve": ("file",),
    "read": ("addr", "port", "offset", "size"),
    "write": ("addr", "port", "offset", "size"),
}

OPTION_NAMES = {"addr": "--addr", "port": "--port", "file": "--file", "offset": "--from",
                "size": "--size"}


def _main_usage() -> str:
    lines = [f"usage: {PROG} MODE [options]", "", "modes:"]
    for mode, make in PARSERS.items():
        lines.append(f"  {make().usage}")
    lines += ["  flexnbd help [MODE]", "", f"flexnbd {__version__}. "
              f"'{PROG} help MODE' describes a mode."]
    return "\n".join(lines)


def _run_serve(args: argparse.Namespace) -> int:
    if args.addr is None and args.unix is None:
        raise UsageError("give --addr and --port, or --unix PATH")
    if (args.addr is None) != (args.port is None):
        raise UsageError("--addr and --port go together")
    config = ServeConfig(file=args.file, addr=args.addr, port=args.port, unix=args.unix,
                         read_only=args.read_only, oldstyle=args.oldstyle)
    from flexnbd.lifecycle import StopSignals
    from flexnbd.server import Server

    signals = StopSignals()
    server = Server(config)
    server.start()
    signals.wait()
    log.get("cli").info("stopping on %s", signals.name())
    server.stop()
    return 0


def _run_transfer(args: argparse.Namespace, writing: bool) -> int:
    from flexnbd.client import transfer

    cfg = TransferConfig(addr=args.addr, port=args.port, offset=args.offset, size=args.size,
                         bind=args.bind)
    try:
        transfer(cfg, writing)
    except RemoteError as e:
        print(f"{PROG}: server error: {e.errno_name}", file=sys.stderr)
        return 1
    except OSError as e:
        import errno

        name = errno.errorcode.get(e.errno or 0, "error")
        print(f"{PROG}: {name}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_main_usage())
        return 0 if argv else 1
    mode, rest = argv[0], argv[1:]
    if mode == "help":
        if not rest:
            print(_main_usage())
            return 0
        if rest[0] not in PARSERS:
            print(f"{PROG}: unknown mode {rest[0]!r}\n{_main_usage()}", file=sys.stderr)
            return 1
        PARSERS[rest[0]]().print_help()
        return 0
    if mode not in PARSERS:
        print(f"{PROG}: unknown mode {mode!r}\n{_main_usage()}", file=sys.stderr)
        return 1
    parser = PARSERS[mode]()
    try:
        args = parser.parse_args(rest)
        if args.help:
            parser.print_help()
            return 0
        missing = [OPTION_NAMES[k] for k in REQUIRED[mode] if getattr(args, k) is None]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}")
        log.setup(args.verbosity)
        if mode == "serve":
            return _run_serve(args)
        return _run_transfer(args, writing=(mode == "write"))
    except UsageError as e:
        print(f"{PROG} {mode}: {e}\n{parser.format_usage().rstrip()}", file=sys.stderr)
        return 1
    except FlexnbdError as e:
        print(f"{PROG} {mode}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1

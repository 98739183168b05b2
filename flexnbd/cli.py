"""The command line: parses arguments, builds config objects, starts a mode.

Modes (SPEC §1): serve, listen (the servers), mirror, mirror-speed, acl, break, status, wait
(clients of a server's control socket), read, write (NBD clients), help; and ``--version``
(``-V``), alone or after a mode, as nbdkit and qemu-nbd have it. Every bad input ends in
one clear line on stderr plus the mode's usage, and exit status 1; never a traceback. The
control client modes print the reply's text (stdout for code 0, else stderr) and exit with its
code. Byte counts and rates take K/M/G/T suffixes (``flexnbd.units``).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from flexnbd import __version__, acl, activation, hosts, log, sockets, units, wire
from flexnbd.config import (
    CACHE_BYTES_DEFAULT,
    CONTROL_TIMEOUT_SECS,
    EXPORT_MAP_MAX,
    HANDSHAKE_SECS,
    IDLE_SPIN_SECS,
    KILLSWITCH_SECS,
    LISTEN_IDLE_SECS,
    MAX_CLIENTS_BOUND,
    MAX_CLIENTS_LISTEN,
    MAX_CLIENTS_SERVE,
    MAX_HANDSHAKES_LISTEN,
    SEND_TIMEOUT_SECS,
    UPSTREAM_TIMEOUT_SECS,
    ProxyConfig,
    ServeConfig,
    TlsSettings,
    TransferConfig,
)
from flexnbd.control import client
from flexnbd.errors import FlexnbdError, RemoteError, UsageError, errno_name
from flexnbd.migration.settings import PROGRESS_SECS, REQUEST_LIMIT_SECS

PROG = "flexnbd"
PROXY_PROG = "flexnbd-proxy"
MAX_OFFSET = 1 << 62
MAX_SIZE = 1 << 30
MAX_BPS = (1 << 64) - 1
NBD_PORT = 10809     # IANA's port for NBD: what serve, listen and the proxy listen on by default


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                   default=0, help="log info messages too (debug with FLEXNBD_DEBUG=1)")
    p.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                   help="log fatal errors only")
    p.add_argument("-V", "--version", action="store_true",
                   help="print the version and exit")


def _address(text: str) -> str:
    """An address literal or a host name, as typed (``flexnbd.hosts``: resolved when used)."""
    try:
        return hosts.parse_host(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad address {text!r} (an IPv4 or IPv6 address, or "
                                         "a host name)") from None


def _port(text: str) -> int:
    try:
        return sockets.parse_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port {text!r} (1..65535)") from None


def _bytes(limit: int, what: str) -> Callable[[str], int]:
    """A byte count or rate as ``flexnbd.units`` reads it (64K, 1.5G), at most ``limit``."""
    def parse(text: str) -> int:
        try:
            value = units.parse_bytes(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad {what}: {e}") from None
        if value > limit:
            raise argparse.ArgumentTypeError(f"bad {what} {text!r}: more than {limit}")
        return value
    return parse


def _count(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= limit:
            raise argparse.ArgumentTypeError(f"bad count {text!r} (1..{limit})")
        return int(text)
    return parse


def _file_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"bad file mode {text!r} (octal, 0000..0777)")
    return mode


def _parser(mode: str, description: str, usage: str) -> _Parser:
    return _Parser(prog=f"{PROG} {mode}", add_help=False, description=description,
                   usage=f"{PROG} {mode} {usage} [-v|-q]")


def _sock_option(p: argparse.ArgumentParser, what: str = "the server's control socket") -> None:
    p.add_argument("-s", "--sock", metavar="SOCK", help=what)


def _acl_entries(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("acl", nargs="*", metavar="ACL", help=what)


def _server_parser(mode: str) -> _Parser:
    listen = mode == "listen"
    if listen:
        description = ("Receive a migration: serve FILE to one client (the mirroring server) "
                       "and exit 0 once a migration into FILE has completed.")
        extra = ""
    else:
        description = "Serve FILE over NBD."
        extra = " [--killswitch] [--read-only] [--max-clients N]"
    p = _parser(mode, description,
                f"--addr ADDR [--port PORT] --file FILE [--sock SOCK] [--default-deny]{extra} "
                "[--unix PATH] [--oldstyle] [--max-clients-per-address N] [--sock-mode MODE] "
                "[--unix-mode MODE] [--tls on|require --tls-certificates DIR | --tls-psk FILE "
                "[--tls-verify-peer]] [ACL ...]")
    p.add_argument("-l", "--addr", type=_address,
                   help="address or host name to listen on (every address it has); 0 or :: "
                        "for every address, IPv6 and IPv4")
    p.add_argument("-p", "--port", type=_port,
                   help=f"TCP port to listen on (default {NBD_PORT}, the NBD port)")
    p.add_argument("-f", "--file", help="the file to serve (must exist)")
    _sock_option(p, "create the control socket here (status, acl, mirror, break)")
    p.add_argument("-d", "--default-deny", action="store_true",
                   help="an empty ACL refuses every client (kept when the ACL is replaced)")
    if not listen:
        p.add_argument("-k", "--killswitch", action="store_true",
                       help="disconnect a client whose request takes more than 120 s")
        p.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    p.add_argument("--unix", metavar="PATH",
                   help="also serve NBD on this Unix socket (the ACL does not apply to it: its "
                        "file mode says who may connect)")
    p.add_argument("-o", "--oldstyle", action="store_true",
                   help="offer the oldstyle handshake (flexnbd 0.5.0 peers)")
    _tls_options(p)
    if listen:  # of the connections still in their handshake, which hold no slot
        p.add_argument("--max-clients-per-address", metavar="N",
                       type=_count(MAX_HANDSHAKES_LISTEN), default=MAX_HANDSHAKES_LISTEN // 2,
                       help=f"connections one client address may hold at once (default "
                            f"{MAX_HANDSHAKES_LISTEN // 2} of {MAX_HANDSHAKES_LISTEN})")
    else:
        p.add_argument("--max-clients", metavar="N", type=_count(MAX_CLIENTS_BOUND),
                       default=MAX_CLIENTS_SERVE,
                       help=f"clients served at once, handshakes included (default "
                            f"{MAX_CLIENTS_SERVE}, at most {MAX_CLIENTS_BOUND}: a busy client "
                            "holds ~1.6 MiB of buffers and a 1 MiB pipe)")
        p.add_argument("--max-clients-per-address", metavar="N",
                       type=_count(MAX_CLIENTS_BOUND),
                       help="connections one client address may hold at once (default: half "
                            "of --max-clients; at most --max-clients)")
    p.add_argument("--sock-mode", metavar="MODE", type=_file_mode, default=0o600,
                   help="file mode of the control socket, octal (default 0600: owner only; "
                        "0660 lets the group command the server)")
    p.add_argument("--unix-mode", metavar="MODE", type=_file_mode, default=0o660,
                   help="file mode of the --unix socket, octal (default 0660)")
    _acl_entries(p, "allowed client addresses, IPv4 or IPv6 with an optional /prefix "
                    "(none: everyone, unless --default-deny)")
    p.epilog = activation.HELP.format(options="--addr, --port and --unix")
    _global_options(p)
    return p


def _transfer_parser(mode: str) -> _Parser:
    what = "print SIZE bytes from OFFSET to stdout" if mode == "read" else \
        "write SIZE bytes from stdin at OFFSET"
    p = _parser(mode, f"Connect to an NBD server and {what}.",
                "--addr ADDR --port PORT --from OFFSET --size SIZE [--bind BIND_ADDR] "
                "[--tls-certificates DIR | --tls-psk FILE]")
    p.add_argument("-l", "--addr", type=_address,
                   help="the server's address or host name (each address it has is tried in "
                        "turn)")
    p.add_argument("-p", "--port", type=_port, help="the server's port")
    p.add_argument("-F", "--from", dest="offset", type=_bytes(MAX_OFFSET, "offset"),
                   help=f"byte offset: {units.HELP}")
    p.add_argument("-S", "--size", type=_bytes(MAX_SIZE, "size"),
                   help="byte count, at most 1G (the same suffixes)")
    p.add_argument("-b", "--bind", type=_address,
                   help="local address (or host name) to connect from")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="use TLS: trust DIR/ca-cert.pem (and show DIR/client-cert.pem, "
                        "client-key.pem if there); the server's certificate must name ADDR")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="use TLS with the first 'identity:hexkey' of FILE")
    _global_options(p)
    return p


def _mirror_parser() -> _Parser:
    p = _parser("mirror", "Ask the server behind SOCK to migrate its file to a `flexnbd listen` "
                "server at ADDR PORT. With --wait, follow the migration until it ends (a "
                "progress bar on a terminal) and exit 0 only if it completed; if a mirror to the "
                "same ADDR PORT runs already, follow that one instead (one to elsewhere: exit "
                "1, saying where it goes).",
                "--addr ADDR --port PORT --sock SOCK [--unlink] [--bind BIND_ADDR] "
                "[--max-speed RATE] [--wait]")
    p.add_argument("-l", "--addr", type=_address,
                   help="the destination's address or host name (the server looks it up once "
                        "and tries each address in turn; with TLS its certificate must carry "
                        "that name)")
    p.add_argument("-p", "--port", type=_port, help="the destination's port")
    _sock_option(p)
    p.add_argument("-u", "--unlink", action="store_true",
                   help="unlink the source file once the migration completed")
    p.add_argument("-b", "--bind", type=_address,
                   help="local address (or host name) to connect from")
    _max_speed_option(p, "limit the migration's average sending rate from its first request "
                         "on, in bytes per second")
    p.add_argument("-w", "--wait", action="store_true",
                   help="wait until the migration ends; exit 0 only if it completed")
    _global_options(p)
    return p


def _max_speed_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-m", "--max-speed", type=_bytes(MAX_BPS, "speed"), metavar="RATE",
                   help=f"{what}: {units.HELP}; 0: no limit")


def _control_parser(mode: str, description: str, usage: str,
                    options: Callable[[_Parser], object] = lambda p: None) -> _Parser:
    """A command to the server behind --sock: --sock, the command's own ``options``, then the
    global ones."""
    p = _parser(mode, description, usage)
    _sock_option(p)
    options(p)
    _global_options(p)
    return p


def _mirror_speed_parser() -> _Parser:
    return _control_parser(
        "mirror-speed", "Limit the running migration's average sending rate.",
        "--sock SOCK --max-speed RATE",
        lambda p: _max_speed_option(p, "bytes per second"))


def _acl_parser() -> _Parser:
    return _control_parser(
        "acl", "Replace the server's ACL; connected clients it no longer allows are "
        "disconnected.", "--sock SOCK [ACL ...]",
        lambda p: _acl_entries(p, "allowed client addresses, IPv4 or IPv6 with an optional "
                                  "/prefix (none: an empty ACL)"))


def _break_parser() -> _Parser:
    return _control_parser("break", "Stop the server's running migration; it goes on serving. "
                           "Prints what it stopped: where it went, the attempt, the bytes "
                           "sent of how many.", "--sock SOCK")


def _wait_parser() -> _Parser:
    return _control_parser("wait", "Follow the server's running migration until it ends (a "
                           "progress bar on a terminal); print how it ended and exit 0 only "
                           "if it completed. No migration running: exit 1 at once.",
                           "--sock SOCK")


def _status_parser() -> _Parser:
    return _control_parser(
        "status", "Print the server's status line (key=value pairs).", "--sock SOCK [--json]",
        lambda p: p.add_argument("--json", action="store_true",
                                 help="print the status as one JSON object"))


@dataclass
class Mode:
    parser: Callable[[], _Parser]
    required: tuple[str, ...]
    run: Callable[[argparse.Namespace], int]


OPTION_NAMES = {"addr": "--addr", "port": "--port", "file": "--file", "offset": "--from",
                "size": "--size", "sock": "--sock", "max_speed": "--max-speed"}


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise UsageError(f"{name}={text!r} must be more than 0")
    return value


def _env_whole(name: str, unit: str, most: int) -> int | None:
    """A whole number from 0 to ``most`` in the variable ``name`` (None when unset or empty).
    Only ASCII digits: "²" passes str.isdigit() but not int()."""
    text = os.environ.get(name)
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) > most:
        raise UsageError(f"{name}={text!r} is not a number of {unit} from 0 to {most}")
    return int(text)


def _idle_spin() -> float:
    """FLEXNBD_IDLE_SPIN_US in seconds (microseconds in the variable; 0 turns spinning off)."""
    us = _env_whole("FLEXNBD_IDLE_SPIN_US", "microseconds", 1_000_000)
    return IDLE_SPIN_SECS if us is None else us / 1e6


def _export_map_max() -> int:
    """FLEXNBD_EXPORT_MAP_MIB in bytes (MiB in the variable; 0: never map the export whole)."""
    mib = _env_whole("FLEXNBD_EXPORT_MAP_MIB", "MiB", 1 << 20)
    return EXPORT_MAP_MAX if mib is None else mib << 20


def _request_limit() -> float:
    """FLEXNBD_MS_REQUEST_LIMIT_SECS. Unlike the knobs above, a bad value (not a number, not
    more than 0) has always meant the default, not an error."""
    text = os.environ.get("FLEXNBD_MS_REQUEST_LIMIT_SECS")
    try:
        value = float(text) if text else REQUEST_LIMIT_SECS
    except ValueError:
        return REQUEST_LIMIT_SECS
    return value if value > 0 else REQUEST_LIMIT_SECS


def _client_limits(args: argparse.Namespace, listen: bool) -> tuple[int, int]:
    """(max_clients, max_clients_per_address). Listen mode keeps its one slot. A per-address
    limit above the total is a usage error: it could never be reached, so it is a mistake."""
    if listen:
        return MAX_CLIENTS_LISTEN, args.max_clients_per_address
    per_address = args.max_clients_per_address
    if per_address is None:
        return args.max_clients, max(1, args.max_clients // 2)
    if per_address > args.max_clients:
        raise UsageError(f"--max-clients-per-address {per_address} is more than --max-clients "
                         f"{args.max_clients}")
    return args.max_clients, per_address


def _server_config(args: argparse.Namespace, mode: str) -> ServeConfig:
    # systemd socket activation: its listening sockets instead of --addr/--port/--unix
    inherited = activation.inherited_sockets(
        [o for o, v in (("--addr", args.addr), ("--port", args.port), ("--unix", args.unix))
         if v is not None])
    if args.addr is None and args.port is not None:
        raise UsageError("--port goes with --addr")
    if args.addr is None and args.unix is None and not inherited:
        raise UsageError("missing --addr and --port (or --unix PATH)")
    if not os.path.exists(args.file):
        raise UsageError(f"{args.file}: no such file")
    if args.sock is not None and args.unix is not None and \
            os.path.abspath(args.sock) == os.path.abspath(args.unix):
        raise UsageError("--sock and --unix must be different paths")
    try:
        entries = acl.parse_entries(args.acl)
    except acl.BadEntry as e:
        raise UsageError(f"bad ACL entry {e.entry!r} (an IPv4 or IPv6 address with an "
                         "optional /prefix)") from None
    if args.addr is None and not any(activation.is_tcp(s) for s in inherited) and \
            (args.default_deny or entries):
        raise UsageError("the ACL (and --default-deny) applies to TCP clients only, and there is "
                         "no --addr/--port: Unix-socket clients are governed by the socket's "
                         "file mode (--unix-mode)")
    listen = mode == "listen"
    max_clients, per_address = _client_limits(args, listen)
    killswitch = None
    if not listen and args.killswitch:
        killswitch = _env_seconds("FLEXNBD_KILLSWITCH_SECS", KILLSWITCH_SECS)
    port = args.port if args.port is not None or args.addr is None else NBD_PORT
    return ServeConfig(file=args.file, addr=args.addr, port=port, unix=args.unix,
                       read_only=False if listen else args.read_only, oldstyle=args.oldstyle,
                       tls=_tls_settings(args),
                       max_clients=max_clients, max_clients_per_address=per_address,
                       max_handshakes=MAX_HANDSHAKES_LISTEN if listen else None,
                       listen_idle=_env_seconds("FLEXNBD_LISTEN_IDLE", LISTEN_IDLE_SECS)
                       if listen else None,
                       mode=mode, sock=args.sock, acl=entries, default_deny=args.default_deny,
                       killswitch=killswitch,
                       handshake_timeout=_env_seconds("FLEXNBD_HANDSHAKE_TIMEOUT", HANDSHAKE_SECS),
                       send_timeout=_env_seconds("FLEXNBD_SEND_TIMEOUT", SEND_TIMEOUT_SECS),
                       idle_spin=_idle_spin(),
                       export_map_max=_export_map_max(),
                       control_timeout=_env_seconds("FLEXNBD_CONTROL_TIMEOUT_SECS",
                                                    CONTROL_TIMEOUT_SECS),
                       mirror_request_limit=_request_limit(),
                       mirror_progress_interval=_env_seconds("FLEXNBD_MIRROR_PROGRESS_SECS",
                                                             PROGRESS_SECS),
                       # (test knobs: a bad delay is a ValueError, as it always was)
                       allocmap_method=os.environ.get("FLEXNBD_ALLOCMAP_METHOD") or None,
                       allocmap_delay_ms=int(os.environ.get("FLEXNBD_ALLOCMAP_DELAY_MS") or 0),
                       sock_mode=args.sock_mode, unix_mode=args.unix_mode,
                       inherited=inherited)


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", choices=("off", "on", "require"), default="off",
                   help="NBD over TLS: off (default), on (offered), require (clients without "
                        "TLS are refused)")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="X.509 credentials: DIR/ca-cert.pem, server-cert.pem, server-key.pem")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="pre-shared keys, one 'identity:hexkey' per line (psktool's format)")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="with --tls-certificates: clients must show a certificate signed by "
                        "DIR/ca-cert.pem")


def _tls_settings(args: argparse.Namespace) -> TlsSettings | None:
    """The TLS options, checked together; None for --tls=off. The credentials themselves are
    loaded (and checked) when the server starts."""
    creds = args.tls_certificates is not None or args.tls_psk is not None
    if args.tls == "off":
        if creds or args.tls_verify_peer:
            raise UsageError("TLS credentials were given with --tls=off: add --tls=on or "
                             "--tls=require")
        return None
    if (args.tls_certificates is None) == (args.tls_psk is None):
        raise UsageError(f"--tls={args.tls} needs exactly one of --tls-certificates DIR and "
                         "--tls-psk FILE")
    if args.tls_verify_peer and args.tls_certificates is None:
        raise UsageError("--tls-verify-peer checks client certificates: it needs "
                         "--tls-certificates")
    if args.oldstyle:
        raise UsageError("the oldstyle handshake has no TLS: drop --oldstyle or --tls")
    return TlsSettings(mode=args.tls, certificates=args.tls_certificates, psk=args.tls_psk,
                       verify_peer=args.tls_verify_peer)


def _client_tls(certificates: str | None, psk: str | None, prefix: str) -> TlsSettings | None:
    """A client's TLS options (PREFIX-certificates, PREFIX-psk): at most one; either one
    makes TLS required."""
    if certificates is not None and psk is not None:
        raise UsageError(f"give {prefix}-certificates or {prefix}-psk, not both")
    if certificates is None and psk is None:
        return None
    return TlsSettings(mode="require", certificates=certificates, psk=psk)


def _run_server(args: argparse.Namespace, mode: str) -> int:
    config = _server_config(args, mode)
    from flexnbd import lifecycle
    from flexnbd.server import Server

    signals = lifecycle.StopSignals()
    return lifecycle.run(Server(config), signals, announce_stop=config.mode == "listen")


def _run_transfer(args: argparse.Namespace, writing: bool) -> int:
    from flexnbd.client import transfer

    tls = _client_tls(args.tls_certificates, args.tls_psk, "--tls")
    cfg = TransferConfig(addr=args.addr, port=args.port, offset=args.offset, size=args.size,
                         bind=args.bind, tls=tls)
    try:
        transfer(cfg, writing)
    except RemoteError as e:
        print(f"{PROG}: server error: {e.errno_name}", file=sys.stderr)
        return 1
    except OSError as e:
        name = errno_name(e.errno) if e.errno else "error"
        print(f"{PROG}: {name}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _run_control(lines: Callable[[argparse.Namespace], list[str]]) \
        -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        request = lines(args)
        for line in request:
            if not line or "\n" in line or "\r" in line or len(line.encode()) > 256:
                raise UsageError(f"cannot send {line!r} (empty, a line break or over "
                                 "256 bytes)")
        return client.run(args.sock, request)
    return run


def _run_status(args: argparse.Namespace) -> int:
    return client.run_status(args.sock, args.json)


def _run_mirror(args: argparse.Namespace) -> int:
    lines = client.mirror_lines(args.addr, args.port, args.unlink, args.bind, args.max_speed)
    if not args.wait:
        return _run_control(lambda _: lines)(args)
    return client.run_mirror_wait(args.sock, lines, client.destination(args.addr, args.port))


MODES: dict[str, Mode] = {
    "serve": Mode(lambda: _server_parser("serve"), ("file",),
                  lambda a: _run_server(a, "serve")),
    "listen": Mode(lambda: _server_parser("listen"), ("file",),
                   lambda a: _run_server(a, "listen")),
    "mirror": Mode(_mirror_parser, ("addr", "port", "sock"), _run_mirror),
    "mirror-speed": Mode(_mirror_speed_parser, ("sock", "max_speed"),
                         _run_control(lambda a: client.max_bps_lines(a.max_speed))),
    "acl": Mode(_acl_parser, ("sock",), _run_control(lambda a: client.acl_lines(a.acl))),
    "break": Mode(_break_parser, ("sock",), _run_control(lambda a: ["break"])),
    "wait": Mode(_wait_parser, ("sock",), lambda a: client.run_wait(a.sock)),
    "status": Mode(_status_parser, ("sock",), _run_status),
    "read": Mode(lambda: _transfer_parser("read"), ("addr", "port", "offset", "size"),
                 lambda a: _run_transfer(a, writing=False)),
    "write": Mode(lambda: _transfer_parser("write"), ("addr", "port", "offset", "size"),
                  lambda a: _run_transfer(a, writing=True)),
}


def help_parser() -> _Parser:
    """``help`` described as a mode is (``help help``, and its section of the man page)."""
    p = _Parser(prog=f"{PROG} help", add_help=False, usage=f"{PROG} help [MODE]",
                description="Describe MODE: its usage, what it does, and each option with its "
                            "default. Without MODE, list the modes. 'help proxy' points at "
                            f"{PROXY_PROG}, a program of its own.")
    p.add_argument("mode", nargs="?", metavar="MODE",
                   help=f"one of {', '.join([*MODES, 'help', 'proxy'])}")
    return p


PROXY_HELP = (f"{PROXY_PROG} is a separate program: it serves one NBD client, relaying its "
              "requests to an NBD server, and hides that server's restarts and migrations from "
              f"the client. See '{PROXY_PROG} --help' and 'man {PROXY_PROG}'.")


def _main_usage() -> str:
    lines = [f"usage: {PROG} MODE [options]", "", "modes:"]
    for mode in MODES.values():
        lines.append(f"  {mode.parser().usage}")
    lines += [f"  {help_parser().usage}", f"  {PROG} --version", "",
              "Global options: -h/--help, -v/--verbose, -q/--quiet (the last of -v/-q wins), "
              "-V/--version.",
              f"flexnbd {__version__}. '{PROG} help MODE' describes a mode; "
              f"'{PROXY_PROG} --help' the proxy; 'man {PROG}' all of it."]
    return "\n".join(lines)


def _version(prog: str) -> str:
    return f"{prog} {__version__}"


def _wants(argv: Sequence[str], short: str, long: str) -> bool:
    """Whether ``argv`` holds the option -SHORT or --LONG (before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in (f"-{short}", f"--{long}"):
            return True
        # short options bundled after a dash, e.g. -vh
        if len(arg) > 2 and arg[0] == "-" and arg[1] != "-" and short in arg[1:] and \
                arg[1:].isalpha():
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_main_usage())
        return 0 if argv else 1
    if argv[0] in ("-V", "--version"):
        print(_version(PROG))
        return 0
    name, rest = argv[0], argv[1:]
    if name == "help":
        if not rest:
            print(_main_usage())
            return 0
        if rest[0] == "help":
            help_parser().print_help()
            return 0
        if rest[0] == "proxy":
            print(textwrap.fill(PROXY_HELP, 79))
            return 0
        if rest[0] not in MODES:
            print(f"{PROG}: unknown mode {rest[0]!r}\n{_main_usage()}", file=sys.stderr)
            return 1
        MODES[rest[0]].parser().print_help()
        return 0
    if name not in MODES:
        print(f"{PROG}: unknown mode {name!r}\n{_main_usage()}", file=sys.stderr)
        return 1
    mode = MODES[name]
    parser = mode.parser()

    def run(args: argparse.Namespace) -> int:
        missing = [OPTION_NAMES[k] for k in mode.required if getattr(args, k) is None]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}")
        log.setup(args.verbosity)
        return mode.run(args)
    return _run_command(f"{PROG} {name}", parser, rest, parser.parse_intermixed_args, run)


def _run_command(label: str, parser: _Parser, argv: list[str],
                 parse: Callable[[list[str]], argparse.Namespace],
                 run: Callable[[argparse.Namespace], int]) -> int:
    """--help, --version, or ``run`` what ``parse`` made of ``argv``: a usage error prints the
    usage, any other error one line (never a traceback), ^C exits 1."""
    try:
        if _wants(argv, "h", "help"):
            parser.print_help()
            return 0
        if _wants(argv, "V", "version"):
            print(_version(parser.prog.split()[0]))
            return 0
        return run(parse(argv))
    except UsageError as e:
        print(f"{label}: {e}\n{parser.format_usage().rstrip()}", file=sys.stderr)
        return 1
    except FlexnbdError as e:
        print(f"{label}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


# --------------------------------------------------------------------------------------------
# flexnbd-proxy

def _listen_address(text: str) -> str:
    """An address literal or host name, or a Unix socket path (starting with /)."""
    return text if text.startswith("/") else _address(text)


def _cache_size(text: str) -> int:
    # `-c=65536` reaches us as "=65536"
    return _bytes(wire.MAX_PAYLOAD // 2, "cache size")(text.removeprefix("="))


def _proxy_parser() -> _Parser:
    p = _Parser(prog=PROXY_PROG, add_help=False,
                description="Serve one NBD client at a time, relaying its requests to the NBD "
                "server at CONN_ADDR CONN_PORT. When that server goes away (a restart, or a "
                "finished migration), reconnect and re-send what was not answered: the client "
                "sees a pause, not an error.",
                usage=f"{PROXY_PROG} --addr ADDR [--port PORT] --conn-addr ADDR --conn-port PORT "
                      "[--bind ADDR] [--cache[=BYTES]] [--oldstyle] [--tls on|require "
                      "--tls-certificates DIR | --tls-psk FILE [--tls-verify-peer]] "
                      "[--conn-tls-certificates DIR | --conn-tls-psk FILE] [-v|-q]")
    p.epilog = activation.HELP.format(options="--addr and --port")
    p.add_argument("-l", "--addr", type=_listen_address,
                   help="address or host name to listen on (0 or :: for every address, IPv6 "
                        "and IPv4), or a Unix socket path (/...)")
    p.add_argument("-p", "--port", type=_port,
                   help=f"TCP port to listen on (default {NBD_PORT}, the NBD port)")
    p.add_argument("-C", "--conn-addr", type=_address,
                   help="the upstream server's address or host name (looked up once; each "
                        "address is tried in turn; with TLS its certificate must carry that "
                        "name)")
    p.add_argument("-P", "--conn-port", type=_port, help="the upstream server's port")
    p.add_argument("-b", "--bind", type=_address,
                   help="local address (or host name) to connect upstream from")
    p.add_argument("-c", "--cache", type=_cache_size, nargs="?", const=CACHE_BYTES_DEFAULT,
                   default=0, metavar="BYTES",
                   help="read-ahead for sequential reads: a READ of at most BYTES (default "
                        f"{CACHE_BYTES_DEFAULT}; K and M suffixes as 64K) fetches twice as "
                        "much and keeps the rest; 0, or no --cache: off")
    p.add_argument("-o", "--oldstyle", action="store_true",
                   help="offer the client the oldstyle handshake (flexnbd 0.5.0 clients)")
    _tls_options(p)
    p.add_argument("--conn-tls-certificates", metavar="DIR",
                   help="TLS to upstream, X.509: DIR/ca-cert.pem checks the server (whose "
                        "certificate must name --conn-addr), and DIR/client-cert.pem and "
                        "client-key.pem, if there, are shown to it")
    p.add_argument("--conn-tls-psk", metavar="FILE",
                   help="TLS to upstream with the first key of a psktool file")
    _global_options(p)
    return p


def _proxy_config(args: argparse.Namespace) -> ProxyConfig:
    # systemd socket activation: its listening sockets instead of --addr/--port
    inherited = activation.inherited_sockets(
        [o for o, v in (("--addr", args.addr), ("--port", args.port)) if v is not None])
    missing = [name for name, value in (("--addr", args.addr), ("--conn-addr", args.conn_addr),
                                        ("--conn-port", args.conn_port))
               if value is None and not (inherited and name == "--addr")]
    if missing:
        raise UsageError(f"missing {', '.join(missing)}")
    unix = args.addr if args.addr is not None and args.addr.startswith("/") else None
    if unix is not None and args.port is not None:
        raise UsageError("--port goes with an IP address, not a Unix socket path")
    conn_tls = _client_tls(args.conn_tls_certificates, args.conn_tls_psk, "--conn-tls")
    return ProxyConfig(conn_addr=args.conn_addr, conn_port=args.conn_port,
                       tls=_tls_settings(args), conn_tls=conn_tls,
                       addr=None if unix else args.addr,
                       port=NBD_PORT if args.port is None and args.addr is not None and
                       unix is None else args.port, unix=unix,
                       inherited=inherited,
                       bind=args.bind, cache_bytes=args.cache, oldstyle=args.oldstyle,
                       upstream_timeout=_env_seconds("FLEXNBD_UPSTREAM_TIMEOUT",
                                                     UPSTREAM_TIMEOUT_SECS),
                       handshake_timeout=_env_seconds("FLEXNBD_HANDSHAKE_TIMEOUT",
                                                      HANDSHAKE_SECS),
                       send_timeout=_env_seconds("FLEXNBD_SEND_TIMEOUT", SEND_TIMEOUT_SECS))


def proxy_main(argv: Sequence[str] | None = None) -> int:
    """The flexnbd-proxy console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _proxy_parser()

    def run(args: argparse.Namespace) -> int:
        config = _proxy_config(args)
        log.setup(args.verbosity)
        from flexnbd import lifecycle
        from flexnbd.proxy import Proxy

        signals = lifecycle.StopSignals()
        return lifecycle.run(Proxy(config), signals)
    return _run_command(PROXY_PROG, parser, argv, parser.parse_args, run)


def proxy_parser() -> _Parser:
    """flexnbd-proxy's parser, for its man page (``flexnbd.manpage``)."""
    return _proxy_parser()

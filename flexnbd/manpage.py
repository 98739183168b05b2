"""The man pages flexnbd(1) and flexnbd-proxy(1), rendered from what ``--help`` prints.

    python -m flexnbd.manpage [DIR]            # write DIR/flexnbd.1, DIR/flexnbd-proxy.1
    python -m flexnbd.manpage --check [DIR]    # exit 1 if they differ from what it renders

DIR defaults to ``man``; ``make man`` rewrites the repository's pages. They are committed, so a
build (sdist, wheel) needs no generator step; tests/unit/test_manpages.py renders them again
and fails when the committed files differ.

One source. Each mode's usage, description, options (with their help text and default) and
epilog come from the argparse parsers in ``flexnbd.cli``, the ones ``--help`` prints; CONTROL
SOCKET is the docstring of ``flexnbd.control.protocol``, STATUS FIELDS that of
``flexnbd.status``, SOCKET ACTIVATION those of ``flexnbd.activation`` and ``flexnbd.notify``
(each rendered by the small reStructuredText subset they are written in: paragraphs, section
titles, definition lists, bullet lists, one simple table). The defaults in ENVIRONMENT are the
constants the program uses. What is written here is only what has no other home: NAME,
DESCRIPTION, what each variable means, EXIT STATUS, SEE ALSO.

Why this rather than a PyPI tool such as argparse-manpage: no extra dependency (one more
pinned build or development requirement, for a few hundred lines of string formatting); the
tool renders the parsers, but the control socket, the status fields and the socket activation
would be hand-kept include files beside it, copies of the docstrings that drift from them;
and its roff output changes with its releases (and argparse's own formatter with Python's:
3.13 lists ``-l, --addr ADDR`` where 3.12 listed ``-l ADDR, --addr ADDR``), so the committed
pages would depend on the tool's and the interpreter's versions. This renders the parsers' own
fields, the same on CPython 3.10-3.13, so ``--help`` and the man page cannot drift apart. It
ships in the package (it is small) so that the pages can be rendered from an installed
flexnbd: the wheel test checks the installed pages against it on the oldest and newest
Python.

Pure: text in, text out (``main`` writes the files).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flexnbd import __version__, activation, cli, notify, status
from flexnbd.config import (
    CONTROL_TIMEOUT_SECS,
    EXPORT_MAP_MAX,
    HANDSHAKE_SECS,
    IDLE_SPIN_SECS,
    KILLSWITCH_SECS,
    LISTEN_IDLE_SECS,
    SEND_TIMEOUT_SECS,
    UPSTREAM_TIMEOUT_SECS,
)
from flexnbd.control import protocol
from flexnbd.migration.settings import PROGRESS_SECS, REQUEST_LIMIT_SECS

PROG, PROXY_PROG = cli.PROG, cli.PROXY_PROG
DEFAULT_DIR = "man"
WIDTH = 90                     # roff source lines (the reader's width is man's business)

# ---------------------------------------------------------------------------------------------
# The hand-written parts

SUMMARY = "a fast NBD server with live migration"
PROXY_SUMMARY = "keep one NBD client connected while its server restarts or moves"

DESCRIPTION = [
    "flexnbd serves a file over NBD, the Network Block Device protocol, to any NBD client (the "
    "Linux kernel's nbd-client, qemu, libnbd's nbdinfo and nbdcopy), and migrates it live to "
    "another flexnbd while its clients go on using it. It is the successor of the C program "
    "flexnbd 0.5.0, with the same command line, control socket and status line, plus the "
    "fixed-newstyle handshake that today's clients need, NBD over TLS, and migrations that "
    "resume after a broken connection.",
    "The first argument names the mode. serve and listen are the servers (listen receives a "
    "migration); mirror, mirror-speed, acl, break, wait and status are clients of a running "
    "server's control socket (see CONTROL SOCKET); read and write are NBD clients; help "
    "describes a mode. `flexnbd-proxy`, a program of its own, sits between one NBD client and "
    "a server and hides the server's restarts and migrations from it.",
    "Byte counts and rates (--from, --size, --max-speed) take the suffixes K, M, G and T, "
    "powers of 1024. Logging goes to stderr: warnings and errors, or more with -v, or only "
    "fatal errors with -q.",
    "Wherever an address is taken, a host name will do: it is looked up once; a server "
    "listens on every address it has, a client tries them in turn until one answers, and with "
    "TLS the other side's certificate must carry the name as typed. --addr 0 (or ::) listens "
    "on every address, IPv6 and IPv4. The servers listen on port 10809, the NBD port, unless "
    "--port says otherwise.",
]

PROXY_DESCRIPTION = [
    "It listens at once and connects to the server; a server that cannot be reached yet is "
    "waited for (retried, said once in the log), with clients waiting un-accepted meanwhile; "
    "one that answers but fails its handshake (TLS, not NBD) stops the start with exit status "
    "1. Structured replies and the base:allocation meta context (BLOCK_STATUS) are offered "
    "to the client when the server has them, so holes stay holes through the proxy. "
    "One client is served at a time: further connections wait, not accepted, in the "
    "listen backlog until the current client leaves. The upstream connection is kept between "
    "clients, and the client is offered the server's export size. Error replies from the "
    "server (ENOSPC, EINVAL, ...) reach the client as they are and are not retried. A request "
    "unanswered for FLEXNBD_UPSTREAM_TIMEOUT seconds, or a failed connection, makes the proxy "
    "reconnect (every few seconds, for as long as it takes) and re-send what was not answered.",
    "NBD over TLS on either side, or both: --tls and its credentials for the client, "
    "--conn-tls-certificates or --conn-tls-psk for the server.",
]

EXIT_STATUS = [
    ("0", "Success. serve: stopped by SIGINT, SIGTERM or SIGQUIT with no migration running, or "
          "exited once a migration it sent had completed. listen: a migration into FILE "
          "completed. The control modes: the server's reply code was 0; mirror --wait and "
          "wait: the migration completed. read and write: every byte was transferred. help, "
          "--help and --version."),
    ("1", "Failure. A usage error (one line saying what, then the mode's usage, on stderr); an "
          "error at start-up (the file, the address, the credentials); serve stopped while a "
          "migration was running (its data did not move); listen stopped before a migration "
          "completed; the control socket could not be reached; the server answered code 1 (its "
          "text says why, on stderr); a migration followed by mirror --wait or wait did not "
          "complete; read or write failed (an error reply prints its errno name)."),
    ("9, 10", "The control socket's codes for a missing and an unknown command: the control "
              "modes exit with the reply's code, and these are the other codes a server "
              "answers (no mode of this version sends such a request)."),
]

PROXY_EXIT_STATUS = [
    ("0", "Stopped by SIGINT, SIGTERM or SIGQUIT; --help and --version."),
    ("1", "A usage error (one line saying what, then the usage, on stderr), or an error at "
          "start-up: the server could not be reached, the address could not be bound, bad "
          "credentials."),
]

SEE_ALSO = ["flexnbd-proxy(1)", "nbd-client(8)", "nbdinfo(1)", "nbdcopy(1)", "qemu-nbd(8)",
            "nbdkit(1)", "systemd.socket(5)", "sd_listen_fds(3)"]
PROXY_SEE_ALSO = ["flexnbd(1)", *SEE_ALSO[1:]]


@dataclass(frozen=True)
class Variable:
    """An environment variable the program reads: its default as text and what it means."""

    name: str
    default: str
    meaning: str
    proxy: bool = False        # flexnbd-proxy reads it too
    servers: bool = True       # flexnbd reads it


def _secs(value: float) -> str:
    return f"{value:g} s"


ENVIRONMENT = [
    Variable("FLEXNBD_DEBUG", "unset",
             "1: with -v, log debug messages too.", proxy=True),
    Variable("FLEXNBD_HANDSHAKE_TIMEOUT", _secs(HANDSHAKE_SECS),
             "seconds a client may take over its whole NBD handshake (TLS included) before it "
             "is dropped.", proxy=True),
    Variable("FLEXNBD_SEND_TIMEOUT", _secs(SEND_TIMEOUT_SECS),
             "seconds a reply to a client may make no progress (the client reads nothing) "
             "before the client is dropped.", proxy=True),
    Variable("FLEXNBD_UPSTREAM_TIMEOUT", _secs(UPSTREAM_TIMEOUT_SECS),
             "seconds a request may stay unanswered by the server before the proxy reconnects "
             "and sends it again.", proxy=True, servers=False),
    Variable("FLEXNBD_CONTROL_TIMEOUT_SECS", _secs(CONTROL_TIMEOUT_SECS),
             "serve and listen: seconds a control-socket client gets to send its whole "
             "request; one that takes longer is disconnected without a reply."),
    Variable("FLEXNBD_LISTEN_IDLE", _secs(LISTEN_IDLE_SECS),
             "listen: seconds a sender may stay silent after its handshake before it is cut, "
             "and after its last request before a new sender may take its place."),
    Variable("FLEXNBD_MS_REQUEST_LIMIT_SECS", _secs(REQUEST_LIMIT_SECS),
             "serve: seconds a mirror waits for a reply from the destination, and for the "
             "destination to close after DISC. A value that is not a number more than 0 means "
             "the default (as in flexnbd 0.5.0)."),
    Variable("FLEXNBD_IDLE_SPIN_US", f"{IDLE_SPIN_SECS * 1e6:g} µs",
             "serve and listen: microseconds (0 to 1000000) within which a client that sends "
             "one request at a time is expected to send its next one, waited for with a spin "
             "rather than a sleep; 0 turns the spin off."),
    Variable("FLEXNBD_EXPORT_MAP_MIB", f"{EXPORT_MAP_MAX >> 20} MiB",
             "serve and listen: the largest export (in MiB, 0 to 1048576) that is mapped whole "
             "for the long READs copied to clients on this host, so that a page read once "
             "stays mapped for every later READ of it; its page tables cost up to 2 MiB per "
             "GiB read that way. A larger export is mapped 8 MiB at a time per connection; "
             "0 turns the whole mapping off."),
    Variable("FLEXNBD_KILLSWITCH_SECS", _secs(KILLSWITCH_SECS),
             "serve --killswitch: seconds a request may take before its client is "
             "disconnected. A test knob."),
    Variable("FLEXNBD_MIRROR_PROGRESS_SECS", _secs(PROGRESS_SECS),
             "serve: at most one progress line of a running mirror (logged with -v) this "
             "often. A test knob."),
    Variable("FLEXNBD_ALLOCMAP_METHOD", "unset",
             "the way to build the allocation map, forced: fiemap, seek or none (by default "
             "the first that works, in that order). A test knob."),
    Variable("FLEXNBD_ALLOCMAP_DELAY_MS", "0",
             "milliseconds the allocation map's builder sleeps after each window of the file, "
             "to slow it down. A test knob (a value that is not a number is an error with a "
             "traceback)."),
    Variable("NOTIFY_SOCKET", "unset",
             "set by systemd: where to send readiness (see SOCKET ACTIVATION).", proxy=True),
    Variable("LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES", "unset",
             "set by systemd: the listening sockets passed to this process (see SOCKET "
             "ACTIVATION).", proxy=True),
]

ENVIRONMENT_INTRO = ("Seconds are a decimal number more than 0 (a fraction is allowed); a value "
                     "that is not one is a usage error, unless said otherwise.")
TEST_KNOBS = "The test knobs are for flexnbd's own tests, not for production."

# What the modules' documentation says for their readers that a man page's readers have no
# use for: paragraphs dropped (each must be found), and phrases replaced.
_STATUS_DROP = ("Pure:",)
_PROTOCOL_DROP = ("The mirror requests are answered with migration outcomes",)
_REPLACE = [
    (re.compile(r"\s*\(SPEC §[\d.]+\)|,\s*SPEC\s+§[\d.]+"), ""),
    (re.compile(r"\(see ``flexnbd\.status``\)"), "(see STATUS FIELDS)"),
]


# ---------------------------------------------------------------------------------------------
# roff

def _escape(text: str) -> str:
    """Plain text as roff text: backslashes, minus signs (options stay ASCII hyphen-minus
    and unbroken), non-ASCII characters as \\[uXXXX]."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)


def _inline(text: str) -> str:
    """Escaped text with ``literal`` and `literal` in bold."""
    text = _escape(text)
    text = re.sub(r"``(.+?)``", r"\\fB\1\\fR", text)
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)


def _fill(text: str) -> list[str]:
    """A paragraph of roff text as source lines: its words rewrapped (roff fills them again),
    no line starting with a control character."""
    lines = textwrap.wrap(" ".join(text.split()), WIDTH, break_long_words=False,
                          break_on_hyphens=False)
    return [f"\\&{line}" if line.startswith((".", "'")) else line for line in lines]


def _para(text: str, macro: str = ".PP") -> list[str]:
    return [macro, *_fill(_inline(text))]


def _tagged(tag: str, body: str) -> list[str]:
    """``.TP``: a roff tag line, then the indented body."""
    return [".TP", *_fill(tag), *_fill(_inline(body))]


def _usage(usage: str) -> str:
    """A usage line with options in bold and the words to replace in italics."""
    text = _escape(usage)
    text = re.sub(r"(?<![\w\\])((?:\\-){1,2}[A-Za-z](?:[\w]|\\-)*)", r"\\fB\1\\fR", text)
    return re.sub(r"\b([A-Z][A-Z_]*)\b", r"\\fI\1\\fR", text)


def _synopsis(parser: argparse.ArgumentParser) -> list[str]:
    """``.SY``: the program's name, then the parser's usage (its mode in bold)."""
    usage, prog = parser.usage or "", parser.prog
    assert usage.startswith(prog + " "), (usage, prog)
    program, _, mode = prog.partition(" ")
    words = f"\\fB{_escape(mode)}\\fR {_usage(usage[len(prog) + 1:])}" if mode else \
        _usage(usage[len(prog) + 1:])
    return [f".SY {_escape(program)}", *_fill(words), ".YS"]


# ---------------------------------------------------------------------------------------------
# argparse

def _meta(action: argparse.Action) -> str:
    if action.choices:
        return "|".join(str(c) for c in action.choices)
    if isinstance(action.metavar, str):
        return action.metavar
    return action.dest.upper()


def _invocation(action: argparse.Action) -> str:
    """How the option is written: -l, --addr ADDR (the same on every Python: argparse's own
    formatter lists it differently from 3.13 on)."""
    meta = _escape(_meta(action))
    if not action.option_strings:
        many = " ..." if action.nargs in ("*", "+") else ""
        return f"\\fI{meta}\\fR{many}"
    names = ", ".join(f"\\fB{_escape(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    if action.nargs == "?":
        return f"{names}[=\\fI{meta}\\fR]"
    return f"{names} \\fI{meta}\\fR"


def _help(action: argparse.Action, prog: str) -> str:
    """The option's help as --help prints it, and its default when the help does not say."""
    text = action.help or ""
    if "%" in text:
        text = text % dict(vars(action), prog=prog)
    shown = action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 \
        and action.option_strings and "default" not in text
    return f"{text} (default: {action.default})" if shown else text


def _options(parser: argparse.ArgumentParser, skip: frozenset[str] = frozenset(),
             only: frozenset[str] | None = None) -> list[str]:
    """The parser's options and arguments as tagged paragraphs, less those named in ``skip``;
    with ``only``, just the options named there."""
    out: list[str] = []
    for action in parser._actions:
        names = set(action.option_strings)
        if names & skip or (only is not None and not (names and names <= only)):
            continue
        out += [".TP", *_fill(_invocation(action)), *_fill(_inline(_help(action, parser.prog)))]
    return out


def global_options(parsers: Iterable[argparse.ArgumentParser]) -> frozenset[str]:
    """The option strings every one of ``parsers`` takes: -h, -v, -q, -V."""
    common: set[str] | None = None
    for p in parsers:
        names = {o for a in p._actions for o in a.option_strings}
        common = names if common is None else common & names
    return frozenset(common or ())


def mode_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every flexnbd mode's parser, ``help`` last, in the order of ``flexnbd help``."""
    return {**{name: mode.parser() for name, mode in cli.MODES.items()},
            "help": cli.help_parser()}


# ---------------------------------------------------------------------------------------------
# The modules' documentation (a subset of reStructuredText)

def _body(doc: str | None, drop: Sequence[str] = ()) -> str:
    """A module docstring without its summary line, less the paragraphs starting with one of
    ``drop`` (ValueError when one is not there: the docstring changed under this module)."""
    text = inspect.cleandoc(doc or "")
    paragraphs = text.split("\n\n")[1:]
    for prefix in drop:
        found = [p for p in paragraphs if p.startswith(prefix)]
        if len(found) != 1:
            raise ValueError(f"expected one paragraph starting {prefix!r}, found {len(found)}")
        paragraphs.remove(found[0])
    text = "\n\n".join(paragraphs)
    for pattern, replacement in _REPLACE:
        text = pattern.sub(replacement, text)
    return text


def _table(lines: list[str]) -> list[str]:
    """A simple table of two columns as tagged paragraphs, its header left out. A first cell
    starting with '[' continues the row above (the request's optional arguments: strictly,
    reStructuredText would start a row there, but they do not fit one line of the column)."""
    border = lines[0]
    second = border.index(" =") + 1
    rules = [i for i, line in enumerate(lines) if set(line) <= {"=", " "}]
    rows: list[tuple[list[str], list[str]]] = []
    for line in lines[rules[1] + 1:rules[-1]]:
        left, right = line[:second].strip(), line[second:].strip()
        if left and not left.startswith("["):
            rows.append(([left], []))
        elif left:
            rows[-1][0].append(left)
        if right:
            rows[-1][1].append(right)
    out: list[str] = []
    for left_lines, right_lines in rows:
        out += _tagged(_inline(" ".join(left_lines)), " ".join(right_lines))
    return out


def _rst(text: str) -> list[str]:
    out: list[str] = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if not lines:
            continue
        if re.fullmatch(r"=+( +=+)+", lines[0]):
            out += _table(lines)
            continue
        if len(lines) > 1 and re.fullmatch(r"-+", lines[1]) and len(lines[1]) == len(lines[0]):
            out.append(f".SS {_escape(lines[0])}")
            lines = lines[2:]
            block = "\n".join(lines)
            if not lines:
                continue
        if lines[0].startswith("- "):
            items: list[list[str]] = []
            for line in lines:
                if line.startswith("- "):
                    items.append([line[2:]])
                else:
                    items[-1].append(line)
            for item in items:
                out += _para(" ".join(item), ".IP \\(bu 2")
            continue
        if len(lines) > 1 and not lines[0][0].isspace() and lines[1].startswith("    "):
            entries: list[tuple[str, list[str]]] = []
            for line in lines:
                if line.startswith("    "):
                    entries[-1][1].append(line)
                else:
                    entries.append((line, []))
            for term, body in entries:
                out += _tagged(_inline(term), " ".join(body))
            continue
        out += _para(block)
    return out


# ---------------------------------------------------------------------------------------------
# The pages

def _header(name: str, summary: str) -> list[str]:
    return [f'.\\" {name}.1: generated by python -m flexnbd.manpage from flexnbd\'s parsers '
            "and documentation. Do not edit: run make man.",
            f'.TH {_escape(name.upper())} 1 "" "flexnbd {__version__}" "User Commands"',
            # no hyphenation (an option's words must stay whole; .YS restores register HY),
            # ragged right
            ".nr HY 0", ".nh", ".ad l",
            ".SH NAME", f"{_escape(name)} \\- {_escape(summary)}"]


def _environment(proxy: bool) -> list[str]:
    chosen = [v for v in ENVIRONMENT if (v.proxy if proxy else v.servers)]
    knobs = any("test knob" in v.meaning for v in chosen)
    out = [".SH ENVIRONMENT", *_para(f"{ENVIRONMENT_INTRO} {TEST_KNOBS}" if knobs
                                     else ENVIRONMENT_INTRO)]
    for v in chosen:
        body = v.meaning if v.default == "unset" else f"{v.meaning} Default: {v.default}."
        out += _tagged(f"\\fB{_escape(v.name)}\\fR", body)
    return out


def _exit_status(entries: list[tuple[str, str]]) -> list[str]:
    out = [".SH EXIT STATUS"]
    for code, text in entries:
        out += _tagged(_escape(code), text)
    return out


def _socket_activation() -> list[str]:
    return [".SH SOCKET ACTIVATION", *_rst(_body(activation.__doc__)),
            *_rst(_body(notify.__doc__))]


def _see_also(pages: list[str]) -> list[str]:
    refs = [re.fullmatch(r"(.+)\((\d)\)", page) for page in pages]
    lines = [f".BR {_escape(m.group(1))} ({m.group(2)}){',' if i < len(refs) - 1 else ''}"
             for i, m in enumerate(refs) if m]
    return [".SH SEE ALSO", *lines]


def flexnbd_page() -> str:
    parsers = mode_parsers()
    globals_ = global_options([*(parsers[name] for name in cli.MODES), cli.proxy_parser()])
    out = _header(PROG, SUMMARY)
    out.append(".SH SYNOPSIS")
    for p in parsers.values():
        out += _synopsis(p)
    out += [f".SY {PROG}", "\\fB\\-\\-version\\fR | \\fB\\-V\\fR", ".YS"]
    out.append(".SH DESCRIPTION")
    for text in DESCRIPTION:
        out += _para(text)
    out.append(".SH MODES")
    for name, p in parsers.items():
        out.append(f".SS {_escape(name)}")
        out += _para(p.description or "")
        out += _options(p, skip=globals_)
        if p.epilog:
            out += _para(p.epilog)
    out.append(".SH GLOBAL OPTIONS")
    out += _para("Every mode but help takes these, and so does flexnbd-proxy. The last of -v "
                 "and -q wins; -h and -V ignore the rest of the command line.")
    out += _options(parsers["serve"], only=globals_)
    out += _environment(proxy=False)
    out += _exit_status(EXIT_STATUS)
    out += [".SH CONTROL SOCKET", *_rst(_body(protocol.__doc__, _PROTOCOL_DROP))]
    out += [".SH STATUS FIELDS", *_rst(_body(status.__doc__, _STATUS_DROP))]
    out += _socket_activation()
    out += _see_also(SEE_ALSO)
    return "\n".join(out) + "\n"


def proxy_page() -> str:
    p = cli.proxy_parser()
    out = _header(PROXY_PROG, PROXY_SUMMARY)
    out += [".SH SYNOPSIS", *_synopsis(p),
            f".SY {_escape(PROXY_PROG)}", "\\fB\\-\\-version\\fR | \\fB\\-V\\fR", ".YS"]
    out += [".SH DESCRIPTION", *_para(p.description or "")]
    for text in PROXY_DESCRIPTION:
        out += _para(text)
    out += [".SH OPTIONS", *_options(p)]
    if p.epilog:
        out += _para(p.epilog)
    out += _environment(proxy=True)
    out += _exit_status(PROXY_EXIT_STATUS)
    out += _socket_activation()
    out += _see_also(PROXY_SEE_ALSO)
    return "\n".join(out) + "\n"


def pages() -> dict[str, str]:
    """File name -> roff text."""
    return {f"{PROG}.1": flexnbd_page(), f"{PROXY_PROG}.1": proxy_page()}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexnbd.manpage",
                                 description="Write (or --check) flexnbd's man pages.")
    ap.add_argument("dir", nargs="?", default=DEFAULT_DIR)
    ap.add_argument("--check", action="store_true",
                    help="exit 1 if the files in DIR differ from what would be written")
    args = ap.parse_args(argv)
    stale = []
    for name, text in pages().items():
        path = Path(args.dir) / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale man pages: {', '.join(stale)}; run make man", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The control-socket grammar and replies (SPEC §5), without I/O.

Request
-------
A client connects to the Unix stream socket given with ``--sock`` and sends lines, each ended by
LF (a CR before the LF is ignored) and at most 256 bytes long (the LF not counted). Line 1 is the
command, the following lines its arguments, one per line. An empty line or the end of the
stream (the client shuts down its sending side or closes) ends the request, if it comes right
after an LF. A stream that ends in the middle of a line did not finish its request: nothing of it
is executed and the server closes without a reply (so a client that dies half-way through an
``acl`` never leaves half an ACL behind).

A line longer than 256 bytes, or a request of more than 256 KiB in all, ends the request right
there: the overlong line is kept, cut short and marked so that it never validates (as a command
it is unknown; as an argument it is a bad one), and the request is answered at once without
reading the rest. A client that completes no request within the read timeout (10 s by default)
is disconnected without a reply and nothing is executed: a half-sent ``acl`` never replaces the
ACL. Requests are executed one at a time.

Reply
-----
One line, ``CODE: TEXT`` and LF, then the server closes the connection. Code 0 is success;
the client modes print TEXT to stdout when CODE is 0, else to stderr, and exit with CODE.

New in flexnbd 0.6, a DETAIL line may follow the reply line (before the close), only after
these replies: a ``mirror`` or ``mirror_wait`` that failed (why: the errno of a refused
connection, both sizes, no NBD greeting, a TLS failure with a hint), and ``break``'s
``0: mirror stopped`` (what it stopped: destination, attempt, bytes sent of how many). The
reply line is 0.5.0's byte for byte: a client that reads up to the first LF, as 0.5.0's did,
sees 0.5.0's reply. Every other reply is exactly one line. The client modes print the DETAIL
on the line after TEXT, to the same stream.

================================  ==============================================================
request lines                     replies
================================  ==============================================================
``status``                        ``0: `` + the status line (see ``flexnbd.status``)
``acl``, ENTRY...                 ``0: updated``; ``1: bad spec: ENTRY`` (ACL unchanged). No
                                  entries is an empty ACL (everyone allowed, or no one with
                                  ``--default-deny``). Connected clients that the new ACL
                                  refuses are disconnected after their current request.
``mirror``, IP, PORT              ``0: Mirror started``; ``1: Mirror failed to connect``;
[, ACTION [, BIND_IP              ``1: Mirror was rejected``; ``1: Remote server failed to
[, MAX_BPS]]]                     respond``; ``1: Remote size does not match local size``;
                                  ``1: Mirroring abandoned``; ``1: mirror already running``;
                                  ``1: shutting down``; and for malformed requests, checked in
                                  this order: ``1: mirror takes at least two parameters``;
                                  ``1: bad IP address``; ``1: bad IP port number``; ``1: action
                                  must be 'exit', 'unlink' or 'nothing'``; ``1: bad bind
                                  address``; ``1: max_bps out of range``; ``1: max_bps couldn't
                                  be parsed``; ``1: unrecognised parameters to mirror``. A
                                  failed first attempt's reply has a DETAIL line: the errno of
                                  the connection (``ECONNREFUSED: Connection refused``), both
                                  sizes, ``no NBD greeting ...``, a TLS failure and its likely
                                  cause.
``mirror_max_bps``, BPS           ``0: updated``; ``1: Not currently mirroring``; ``1: Bad
                                  format`` (not exactly one argument); ``1: max_bps out of
                                  range``; ``1: max_bps couldn't be parsed``. The argument is
                                  checked before the mirror is looked for.
``break``                         ``0: mirror stopped`` (and a DETAIL line: ``to ADDR port
                                  PORT, attempt N: SENT of TOTAL bytes sent``); ``1: mirror
                                  completed``; ``1: migration outcome unknown`` (DISC was sent
                                  and the destination did not confirm, SPEC §6.7); ``1: not
                                  mirroring``
``mirror_wait`` (flexnbd 0.6)     answered when the running mirror ends: ``0: migration
                                  completed``; ``1: migration outcome unknown``; ``1: mirror
                                  stopped`` (``break``); ``1: shutting down``; ``1: Mirroring
                                  abandoned``; ``1: Mirror was rejected`` (a later attempt met
                                  a peer that is not NBD); or the failure of its first
                                  attempt (with its DETAIL line, as for
                                  ``mirror``). At once: ``1: not mirroring``, or ``1: too many
                                  mirror_wait requests waiting`` (16 wait at most). The
                                  connection stays open meanwhile; other requests are served.
                                  ``flexnbd mirror --wait`` uses it.
(nothing)                         ``9: missing command``
anything else                     ``10: unknown command``
================================  ==============================================================

``mirror`` arguments: IP is an IPv4 or IPv6 literal or (flexnbd 0.6) a host name, resolved
once when the mirror starts (its TLS certificate must carry that name), PORT 1..65535, ACTION
``exit`` (the default), ``unlink`` or ``nothing``; BIND_IP a literal (or name) to connect
from; MAX_BPS a decimal number of bytes per second below 2^64 (0: no limit). The same number
rules hold for ``mirror_max_bps``. Extra lines after ``status`` and ``break`` are ignored.

A ``mirror`` sent to a listen server that has not received its own migration yet is answered
``1: Mirroring abandoned``: it has nothing to send.

The mirror requests are answered with migration outcomes (``flexnbd.migration.outcome``); the
tables at the end of this module word them, and are the only place that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from flexnbd import hosts
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import ACTIONS, MirrorSettings

MAX_LINE = 256                   # bytes per line, LF not counted
MAX_REQUEST = 256 * 1024         # bytes per request
MAX_BPS = (1 << 64) - 1
OVERLONG_MARK = "\ufffd..."      # appended to a cut line; no valid argument contains it


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


@dataclass(frozen=True)
class Reply:
    """``code`` and ``text`` are the reply line; ``detail`` (flexnbd 0.6) is the second line
    some replies carry: why a mirror failed, what ``break`` stopped."""

    code: int
    text: str
    detail: str | None = None

    def encode(self) -> bytes:
        """``CODE: TEXT`` and LF, then the detail and LF if there is one; each made one
        printable line."""
        out = f"{self.code}: {_printable(self.text)}\n"
        if self.detail is not None:
            out += f"{_printable(self.detail)}\n"
        return out.encode("utf-8", "replace")

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        """Parse a reply: the ``CODE: TEXT`` line and at most one detail line (the last LF
        optional). ValueError if it is not that."""
        text = data.decode("utf-8", "replace")
        if text.endswith("\n"):
            text = text[:-1]
        line, _, detail = text.partition("\n")
        if "\n" in detail:
            raise ValueError("more than a reply line and its detail")
        code_text, sep, rest = line.partition(": ")
        if not sep or not code_text.isascii() or not code_text.isdigit():
            raise ValueError(f"not a control reply: {line[:80]!r}")
        return cls(int(code_text), rest, detail if "\n" in text else None)


def _r(code: int, text: str) -> Reply:
    return Reply(code, text)


# Every reply of the table, byte for byte.
UPDATED = _r(0, "updated")
MIRROR_STARTED = _r(0, "Mirror started")
MIRROR_FAILED_TO_CONNECT = _r(1, "Mirror failed to connect")
MIRROR_REJECTED = _r(1, "Mirror was rejected")
REMOTE_NO_RESPONSE = _r(1, "Remote server failed to respond")
REMOTE_SIZE_MISMATCH = _r(1, "Remote size does not match local size")
MIRRORING_ABANDONED = _r(1, "Mirroring abandoned")
MIRROR_TOO_FEW = _r(1, "mirror takes at least two parameters")
BAD_IP = _r(1, "bad IP address")
BAD_PORT = _r(1, "bad IP port number")
BAD_ACTION = _r(1, "action must be 'exit', 'unlink' or 'nothing'")
BAD_BIND = _r(1, "bad bind address")
BPS_OUT_OF_RANGE = _r(1, "max_bps out of range")
BPS_UNPARSEABLE = _r(1, "max_bps couldn't be parsed")
MIRROR_EXTRA = _r(1, "unrecognised parameters to mirror")
MIRROR_RUNNING = _r(1, "mirror already running")
SHUTTING_DOWN = _r(1, "shutting down")
NOT_CURRENTLY_MIRRORING = _r(1, "Not currently mirroring")
BAD_FORMAT = _r(1, "Bad format")
MIRROR_STOPPED = _r(0, "mirror stopped")
MIRROR_COMPLETED = _r(1, "mirror completed")
NOT_MIRRORING = _r(1, "not mirroring")
MIGRATION_COMPLETED = _r(0, "migration completed")
MIGRATION_OUTCOME_UNKNOWN = _r(1, "migration outcome unknown")
TOO_MANY_WAITERS = _r(1, "too many mirror_wait requests waiting")
MISSING_COMMAND = _r(9, "missing command")
UNKNOWN_COMMAND = _r(10, "unknown command")


def status_reply(line: str) -> Reply:
    """``0: `` + the status line (given with or without its LF; the trailing space stays)."""
    return Reply(0, line[:-1] if line.endswith("\n") else line)


def bad_spec(entry: str) -> Reply:
    return Reply(1, f"bad spec: {entry}")


# -- reading a request ------------------------------------------------------------------------

class LineReader:
    """Collects one request from the bytes a client sends.

    ``feed(data)`` returns True once the request is complete (empty line, or an overlong
    line); ``eof()`` ends it at the end of the stream. ``lines`` holds the decoded lines;
    ``incomplete`` is set when the stream ended in the middle of a line (run nothing).
    """

    def __init__(self, max_line: int = MAX_LINE, max_request: int = MAX_REQUEST) -> None:
        self.max_line = max_line
        self.max_request = max_request
        self.lines: list[str] = []
        self.done = False
        self.overlong = False
        self.incomplete = False
        self._partial = bytearray()
        self._total = 0

    def feed(self, data: bytes) -> bool:
        if self.done:
            return True
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl
            chunk = data[pos:end]
            self._total += len(chunk) + (nl >= 0)
            self._partial += chunk
            limit = self.max_line + self._partial.endswith(b"\r")
            if len(self._partial) > limit or self._total > self.max_request:
                self._end_line(overlong=True)
                return True
            if nl < 0:
                break
            pos = nl + 1
            if self._end_line():
                return True
        return self.done

    def eof(self) -> list[str]:
        """The stream ended: the request is the lines so far, unless it ended in the middle
        of a line (then ``incomplete`` is set)."""
        if not self.done:
            self.incomplete = bool(self._partial)
            self._partial.clear()
            self.done = True
        return self.lines

    def _end_line(self, overlong: bool = False) -> bool:
        raw = bytes(self._partial)
        self._partial.clear()
        if overlong:
            self.overlong = True
            self.lines.append(raw[:self.max_line].decode("utf-8", "replace") + OVERLONG_MARK)
            self.done = True
            return True
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw:
            self.done = True
            return True
        self.lines.append(raw.decode("utf-8", "replace"))
        return False


def encode_request(lines: list[str]) -> bytes:
    """A request as a client sends it: each line with LF, then the empty line.
    ValueError for a line that is empty, holds a line break or is over 256 bytes."""
    out = bytearray()
    for line in lines:
        raw = line.encode("utf-8")
        if not raw or b"\n" in raw or b"\r" in raw or len(raw) > MAX_LINE:
            raise ValueError(f"cannot send {line!r} as a control line")
        out += raw + b"\n"
    return bytes(out + b"\n")


# -- parsing a request into a command ---------------------------------------------------------

@dataclass(frozen=True)
class StatusCommand:
    pass


@dataclass(frozen=True)
class AclCommand:
    entries: tuple[str, ...]


@dataclass(frozen=True)
class MaxBpsCommand:
    max_bps: int | None            # None: no limit


@dataclass(frozen=True)
class BreakCommand:
    pass


@dataclass(frozen=True)
class MirrorWaitCommand:
    pass


# (a `mirror` request parses into the settings of the mirror it asks for)
Command = Union[StatusCommand, AclCommand, MirrorSettings, MaxBpsCommand, BreakCommand,
                MirrorWaitCommand]


def _ip(text: str) -> str | None:
    """An address literal or a host name (``flexnbd.hosts``; resolved where it is used)."""
    try:
        return hosts.parse_host(text)
    except ValueError:
        return None


def _port(text: str) -> int | None:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def parse_bps(text: str) -> int | None | Reply:
    """A bytes-per-second limit: a number (None for 0, no limit) or the error reply."""
    if not (text.isascii() and text.isdigit()):
        return BPS_UNPARSEABLE
    if len(text) > 25 or int(text) > MAX_BPS:
        return BPS_OUT_OF_RANGE
    return int(text) or None


def parse_mirror(args: list[str]) -> MirrorSettings | Reply:
    if len(args) < 2:
        return MIRROR_TOO_FEW
    ip = _ip(args[0])
    if ip is None:
        return BAD_IP
    port = _port(args[1])
    if port is None:
        return BAD_PORT
    action = "exit"
    if len(args) > 2:
        if args[2] not in ACTIONS:
            return BAD_ACTION
        action = args[2]
    bind = None
    if len(args) > 3:
        bind = _ip(args[3])
        if bind is None:
            return BAD_BIND
    max_bps = None
    if len(args) > 4:
        bps = parse_bps(args[4])
        if isinstance(bps, Reply):
            return bps
        max_bps = bps
    if len(args) > 5:
        return MIRROR_EXTRA
    return MirrorSettings(ip, port, action, bind, max_bps)


def parse_max_bps(args: list[str]) -> MaxBpsCommand | Reply:
    if len(args) != 1:
        return BAD_FORMAT
    bps = parse_bps(args[0])
    if isinstance(bps, Reply):
        return bps
    return MaxBpsCommand(bps)


def parse_request(lines: list[str]) -> Command | Reply:
    """The lines of a request -> the command to run, or the reply for a bad request."""
    if not lines:
        return MISSING_COMMAND
    command, args = lines[0], lines[1:]
    if command == "status":
        return StatusCommand()
    if command == "acl":
        return AclCommand(tuple(args))
    if command == "mirror":
        return parse_mirror(args)
    if command == "mirror_max_bps":
        return parse_max_bps(args)
    if command == "break":
        return BreakCommand()
    if command == "mirror_wait":
        return MirrorWaitCommand()
    return UNKNOWN_COMMAND


# -- migration outcomes as replies ------------------------------------------------------------

# `mirror`: the first attempt's outcome, or why no mirror started.
_MIRROR_REPLIES = {
    Outcome.STARTED: MIRROR_STARTED,
    Outcome.FAILED_TO_CONNECT: MIRROR_FAILED_TO_CONNECT,
    Outcome.REJECTED: MIRROR_REJECTED,
    Outcome.NO_RESPONSE: REMOTE_NO_RESPONSE,
    Outcome.SIZE_MISMATCH: REMOTE_SIZE_MISMATCH,
    Outcome.ABANDONED: MIRRORING_ABANDONED,
    Outcome.BUSY: MIRROR_RUNNING,
    Outcome.SHUTTING_DOWN: SHUTTING_DOWN,
}
# `break`: stopped is its success.
_BREAK_REPLIES = {
    Outcome.STOPPED: MIRROR_STOPPED,
    Outcome.COMPLETED: MIRROR_COMPLETED,
    Outcome.UNKNOWN: MIGRATION_OUTCOME_UNKNOWN,
    Outcome.NOT_MIRRORING: NOT_MIRRORING,
}
# `mirror_wait`: how the mirror ended; only a completed migration is a success.
_WAIT_REPLIES = {
    Outcome.COMPLETED: MIGRATION_COMPLETED,
    Outcome.UNKNOWN: MIGRATION_OUTCOME_UNKNOWN,
    Outcome.STOPPED: _r(1, MIRROR_STOPPED.text),
    Outcome.SHUTTING_DOWN: SHUTTING_DOWN,
    Outcome.ABANDONED: MIRRORING_ABANDONED,
    Outcome.REJECTED: MIRROR_REJECTED,
    Outcome.FAILED_TO_CONNECT: MIRROR_FAILED_TO_CONNECT,
    Outcome.NO_RESPONSE: REMOTE_NO_RESPONSE,
    Outcome.SIZE_MISMATCH: REMOTE_SIZE_MISMATCH,
    Outcome.NOT_MIRRORING: NOT_MIRRORING,
}


def _worded(reply: Reply, detail: str | None) -> Reply:
    """The reply, and the outcome's detail on a line of its own (new in 0.6): the first line
    stays 0.5.0's, byte for byte, for the scripts that match on it."""
    return reply if not detail else Reply(reply.code, reply.text, detail)


def mirror_reply(result: Result) -> Reply:
    return _worded(_MIRROR_REPLIES[result.outcome], result.detail)


def break_reply(result: Result) -> Reply:
    return _worded(_BREAK_REPLIES[result.outcome], result.detail)


def wait_reply(result: Result) -> Reply:
    return _worded(_WAIT_REPLIES[result.outcome], result.detail)


def max_bps_reply(updated: bool) -> Reply:
    return UPDATED if updated else NOT_CURRENTLY_MIRRORING

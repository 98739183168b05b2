"""The client modes of the control socket: acl, break, status, mirror, mirror-speed, wait.

Each sends one request (see ``flexnbd.control.protocol``), reads the reply, prints its TEXT
(and the DETAIL line under it, when the server sent one) to stdout when CODE is 0 and to
stderr otherwise, and returns CODE as the exit status. ``mirror --wait`` and ``wait`` then
follow the running mirror to its outcome.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from flexnbd import sockets
from flexnbd import status as status_mod
from flexnbd.control import protocol
from flexnbd.control.protocol import Reply
from flexnbd.errors import FlexnbdError

CONNECT_TIMEOUT = 10.0
# A mirror reply waits for the first connection attempt (15 s) and its greeting (5 s), and
# requests are served one at a time.
REPLY_TIMEOUT = 120.0
MAX_REPLY = 64 * 1024


def request(path: str, lines: Sequence[str], timeout: float = REPLY_TIMEOUT) -> Reply:
    """Send one request to the control socket at ``path``; its reply. FlexnbdError when the
    socket cannot be reached or the answer is not a reply."""
    try:
        data = protocol.encode_request(list(lines))
    except ValueError as e:
        raise FlexnbdError(str(e)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as e:
            raise FlexnbdError(f"cannot connect to {path}: {e.strerror or e}") from None
        sock.settimeout(timeout)
        answer = bytearray()
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while len(answer) <= MAX_REPLY:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            raise FlexnbdError(f"no reply from {path} in {timeout:g} s") from None
        except OSError as e:
            if not answer:
                raise FlexnbdError(f"{path}: {e.strerror or e}") from None
    finally:
        sock.close()
    if not answer:
        raise FlexnbdError(f"{path} closed the connection without a reply")
    try:
        return Reply.decode(bytes(answer))
    except ValueError as e:
        raise FlexnbdError(f"{path}: {e}") from None


def show(reply: Reply, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Print the reply's text where it belongs; the exit status (its code)."""
    stream = (out or sys.stdout) if reply.code == 0 else (err or sys.stderr)
    print(reply.text, file=stream)
    if reply.detail is not None:
        print(reply.detail, file=stream)
    return reply.code


def run(path: str, lines: Sequence[str]) -> int:
    return show(request(path, lines))


def run_status(path: str, as_json: bool = False) -> int:
    reply = request(path, ["status"])
    if reply.code == 0 and as_json:
        try:
            print(status_mod.to_json(reply.text))
        except ValueError as e:
            raise FlexnbdError(f"{path}: bad status line: {e}") from None
        return 0
    return show(reply)


def acl_lines(entries: Sequence[str]) -> list[str]:
    return ["acl", *entries]


def mirror_lines(addr: str, port: int, unlink: bool = False, bind: str | None = None,
                 max_bps: int | None = None) -> list[str]:
    lines = ["mirror", addr, str(port), "unlink" if unlink else "exit"]
    if bind is not None or max_bps:
        # MAX_BPS comes after BIND_IP: without --bind, the wildcard address of the
        # destination's family, which binds to nothing in particular (0.5.0 servers too).
        lines.append(bind if bind is not None else ("::" if ":" in addr else "0.0.0.0"))
    if max_bps:
        lines.append(str(max_bps))
    return lines


def max_bps_lines(bps: int) -> list[str]:
    return ["mirror_max_bps", str(bps)]


# -- mirror --wait ------------------------------------------------------------------------------

PROGRESS_EVERY = 5.0      # seconds between plain progress lines (stdout not a terminal)
# Following a mirror may take hours; the source must keep answering `status` meanwhile. One
# that answers nothing for this long is given up on (its outcome is then not known here).
SILENCE_LIMIT = 60.0


def run_mirror_wait(path: str, lines: Sequence[str], destination: str,
                    out: TextIO | None = None) -> int:
    """Start the mirror to ``destination`` (ADDR:PORT as the status line writes it), then
    follow it until the source confirms how it ended: a progress bar on a terminal, plain
    lines otherwise. Exit status 0 only for a completed migration. When a mirror runs already,
    follow that one if it goes to ``destination``; else exit 1 saying where it goes."""
    out = out or sys.stdout
    reply = request(path, lines)
    if reply == protocol.MIRROR_RUNNING:
        show(reply)
        return _follow_running(path, destination, out)
    if reply.code != 0:
        return show(reply)
    print(reply.text, file=out, flush=True)
    return follow(path, out)


def run_wait(path: str, out: TextIO | None = None) -> int:
    """``flexnbd wait``: follow the running mirror to its outcome; exit 1 at once, saying so,
    when none runs (with how the last one ended, if one did)."""
    out = out or sys.stdout
    fields = _status(path)
    if fields.get("is_mirroring") != "true":
        print(protocol.NOT_MIRRORING.text, file=sys.stderr)
        last = fields.get("migration_outcome")
        if last is not None:
            print(f"the last mirror ended: {last}", file=sys.stderr)
        return 1
    destination = fields.get("migration_destination")
    if destination is not None:
        print(f"following the mirror to {destination}", file=out, flush=True)
    return follow(path, out)


def _follow_running(path: str, destination: str, out: TextIO) -> int:
    """``mirror --wait`` found a mirror running: follow it only if it goes where we asked
    (the status line says where it goes)."""
    fields = _status(path)
    going_to = fields.get("migration_destination")
    if fields.get("is_mirroring") != "true":
        last = fields.get("migration_outcome")
        print("no mirror runs now" + (f" (the last one ended: {last})" if last else "") +
              "; not following it", file=sys.stderr)
        return 1
    if going_to is None:
        print("the server does not say where its mirror goes (no migration_destination in its "
              "status); not following it", file=sys.stderr)
        return 1
    if going_to != destination:
        print(f"the running mirror goes to {going_to}, not {destination}; not following it",
              file=sys.stderr)
        return 1
    print(f"following the running mirror to {going_to}", file=out, flush=True)
    return follow(path, out)


def _status(path: str) -> dict[str, str]:
    reply = request(path, ["status"])
    if reply.code != 0:
        raise FlexnbdError(f"{path}: status answered {reply.code}: {reply.text}")
    try:
        return status_mod.parse_line(reply.text)
    except ValueError as e:
        raise FlexnbdError(f"{path}: bad status line: {e}") from None


def destination(addr: str, port: int) -> str:
    """Where a mirror goes, as the status line's migration_destination writes it."""
    return sockets.host_port(addr, port)


def follow(path: str, out: TextIO) -> int:
    """Send ``mirror_wait`` and show progress until its answer: how the mirror ended."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    progress = _Progress(out)
    answer = bytearray()
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
            sock.sendall(protocol.encode_request(["mirror_wait"]))
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise FlexnbdError(f"cannot follow the migration through {path}: "
                               f"{e.strerror or e}") from None
        sock.settimeout(1.0)
        answered = time.monotonic()
        while len(answer) <= MAX_REPLY:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                fields = _poll_status(path)
                now = time.monotonic()
                if fields is not None:
                    answered = now
                elif now - answered > SILENCE_LIMIT:
                    progress.close()
                    print(f"{path} has not answered for {SILENCE_LIMIT:g} s: the migration's "
                          "outcome is not known here (see the source's status and log)",
                          file=sys.stderr)
                    return 1
                progress.show(fields)
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    finally:
        sock.close()
        progress.close()
    if not answer:
        print("the source went away without confirming the migration", file=sys.stderr)
        return 1
    try:
        final = Reply.decode(bytes(answer))
    except ValueError as e:
        raise FlexnbdError(f"{path}: {e}") from None
    return show(final, out=out)


def _poll_status(path: str) -> dict[str, str] | None:
    try:
        reply = request(path, ["status"], timeout=5.0)
    except FlexnbdError:
        return None
    if reply.code != 0:
        return None
    try:
        return status_mod.parse_line(reply.text)
    except ValueError:
        return None


class _Progress:
    """A progress bar on a terminal (redrawn in place), else a plain line now and then."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last_line = 0.0
        self.drawn = False

    def show(self, fields: dict[str, str] | None) -> None:
        if not fields or fields.get("is_mirroring") != "true":
            return
        try:
            size = int(fields["size"])
            left = int(fields["migration_bytes_left"])
            speed = int(fields["migration_speed"])
            eta = int(fields["migration_seconds_left"])
        except (KeyError, ValueError):
            return
        done = 100.0 if size == 0 else max(0.0, 100.0 * (size - left) / size)
        figures = (f"{done:5.1f}%  {_bytes(left)} left  {_bytes(speed)}/s  "
                   f"ETA {eta // 60}:{eta % 60:02d}")
        if self.tty:
            width = 30
            filled = int(width * done / 100)
            self.out.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {figures} ")
            self.out.flush()
            self.drawn = True
            return
        now = time.monotonic()
        if now - self.last_line >= PROGRESS_EVERY:
            self.last_line = now
            print(f"migrating: {figures}", file=self.out, flush=True)

    def close(self) -> None:
        if self.drawn:
            self.drawn = False
            self.out.write("\n")
            self.out.flush()


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"

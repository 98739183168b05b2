"""The client modes of the control socket: acl, break, status, mirror, mirror-speed.

Each sends one request (see ``flexnbd.control.protocol``), reads the one-line reply, prints
its TEXT to stdout when CODE is 0 and to stderr otherwise, and returns CODE as the exit status.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from typing import TextIO

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


def mirror_lines(addr: str, port: int, unlink: bool = False, bind: str | None = None) -> list[str]:
    lines = ["mirror", addr, str(port), "unlink" if unlink else "exit"]
    if bind is not None:
        lines.append(bind)
    return lines


def max_bps_lines(bps: int) -> list[str]:
    return ["mirror_max_bps", str(bps)]

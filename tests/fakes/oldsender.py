"""A flexnbd-0.5.0-like migration sender, for interop tests with ``flexnbd listen --oldstyle``.

It does what 0.5.0's mirror put on the wire: connect, read the oldstyle greeting (152 bytes,
checked), then send the WHOLE disk as WRITE requests with the cookie ``.MIRROR.`` in chunks (zero
ranges too, as zero-filled WRITEs: 0.5.0 knew no WRITE_ZEROES), check every reply (magic, error
0, cookie), then send DISC and close.

``send_disk(host, port, path)`` returns ``SendStats``; it raises ``SenderError`` on anything
unexpected, ``ServerClosed`` (tests/support/rawclient.py) if the listener closes the connection
while a reply is due. Also runnable: ``python -m tests.fakes.oldsender HOST PORT FILE``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from dataclasses import dataclass

from flexnbd import wire
from tests.support.rawclient import recv_exact

COOKIE = wire.MIRROR_COOKIE
CHUNK = 1 << 20          # 0.5.0 sent the disk in pieces of about this size


class SenderError(Exception):
    pass


@dataclass
class SendStats:
    size: int = 0
    requests: int = 0
    bytes_sent: int = 0          # every byte written to the socket
    zero_requests: int = 0       # WRITEs whose payload was all zeroes


def read_oldstyle_greeting(sock: socket.socket) -> tuple[int, int]:
    """(size, flags) from a 152-byte oldstyle greeting."""
    greeting = recv_exact(sock, wire.OLDSTYLE_GREETING_SIZE)
    magic, old_magic, size, flags = struct.unpack(">QQQI", greeting[:28])
    if magic != wire.NBDMAGIC or old_magic != wire.OLDSTYLE_MAGIC:
        raise SenderError("not an oldstyle greeting")
    return size, flags


def _check_reply(sock: socket.socket) -> None:
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, wire.SIMPLE_REPLY_SIZE))
    if magic != wire.SIMPLE_REPLY_MAGIC:
        raise SenderError(f"bad reply magic {magic:#x}")
    if cookie != COOKIE:
        raise SenderError(f"bad reply cookie {cookie:#x}")
    if error:
        raise SenderError(f"error reply {error}")


def send_disk(host: str, port: int, path: str | os.PathLike, chunk: int = CHUNK,
              timeout: float = 30.0) -> SendStats:
    stats = SendStats()
    with socket.create_connection((host, port), timeout=timeout) as sock, \
            open(path, "rb") as f:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        size, _flags = read_oldstyle_greeting(sock)
        local = os.fstat(f.fileno()).st_size
        local -= local % 512
        if size != local:
            raise SenderError(f"remote size {size} differs from local {local}")
        stats.size = size
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            data = os.pread(f.fileno(), n, offset)
            if len(data) != n:
                raise SenderError("short read from the local file")
            sock.sendall(wire.pack_request(wire.CMD_WRITE, offset, n, COOKIE) + data)
            stats.bytes_sent += wire.REQUEST_SIZE + n
            stats.requests += 1
            if data.count(0) == n:
                stats.zero_requests += 1
            _check_reply(sock)
            offset += n
        sock.sendall(wire.pack_request(wire.CMD_DISC, cookie=COOKIE))
        stats.bytes_sent += wire.REQUEST_SIZE
    return stats


if __name__ == "__main__":
    print(send_disk(sys.argv[1], int(sys.argv[2]), sys.argv[3]))

"""Helpers for the hostile-peer tests and the soak: raw connections from chosen loopback
addresses, and what /proc says about a server process."""

from __future__ import annotations

import os
import socket
import time

from flexnbd import wire
from tests.support.rawclient import RawClient

MiB = 1 << 20
READ = wire.CMD_READ


def raw_connect(port: int, bind: str | None = None, timeout: float = 15.0,
                rcvbuf: int | None = None) -> RawClient:
    """A TCP connection to 127.0.0.1:port from ``bind`` (a loopback address), not yet greeted."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if bind is not None:
            s.bind((bind, 0))
        s.settimeout(timeout)
        s.connect(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        s.close()
        raise
    return RawClient(s, timeout)


def half_closed_reader(port: int, bind: str, reads: int = 4, length: int = 32 * MiB,
                       **handshake: object) -> RawClient:
    """A client that does the handshake, pipelines ``reads`` big READs, shuts down its sending
    side and never reads a byte of the replies (a tiny receive buffer, so the server's send
    blocks at once)."""
    c = raw_connect(port, bind, rcvbuf=4096)
    try:
        c.handshake(**handshake)  # type: ignore[arg-type]
        c.send(b"".join(c.pack(READ, (i * length) % (c.size - length + 1), length, cookie=i + 1)
                        for i in range(reads)))
        c.sock.shutdown(socket.SHUT_WR)
    except BaseException:
        c.close()
        raise
    return c


def task_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def settled_count(counter, pid: int, timeout: float = 10.0, quiet: float = 0.5) -> int:
    """The value of counter(pid) once it has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value, since = counter(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = counter(pid)
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value




def map_built(server) -> None:
    """Wait until the allocation map is built (its thread gone, holes known)."""
    server.wait_for_log("allocation map: built", timeout=30)

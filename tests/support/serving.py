"""Helpers for tests that drive a `flexnbd serve` with raw clients (tests/support/rawclient.py):
the command and error constants, files, a handshaken client, and checks on the server (and on
any flexnbd process: ``alive``)."""

from __future__ import annotations

import os
import re

import pytest

from flexnbd import wire
from tests.support.rawclient import RawClient, connect_and_handshake
from tests.support.waiting import wait_until

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    wire.CMD_READ, wire.CMD_WRITE, wire.CMD_DISC, wire.CMD_FLUSH, wire.CMD_TRIM, wire.CMD_CACHE,
    wire.CMD_WRITE_ZEROES, wire.CMD_BLOCK_STATUS)
EPERM, EINVAL, ENOSPC, EBADMSG = wire.NBD_EPERM, wire.NBD_EINVAL, wire.NBD_ENOSPC, wire.NBD_EBADMSG
MiB = 1 << 20
MAX = wire.MAX_PAYLOAD

STYLES = [pytest.param([], id="newstyle"), pytest.param(["--oldstyle"], id="oldstyle")]

LOG_LINE = re.compile(r"^\d+:[DIWEF]:\d+ \S+ \S+:\d+: .+$")


def big_file(make_file, size: int, head: int = MiB):
    """A sparse file of ``size`` bytes whose first ``head`` bytes are random."""
    path = make_file(data=os.urandom(head))
    os.truncate(path, size)
    return path


def content(path, offset: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(-1 if length is None else length)


def client(server, **kwargs) -> RawClient:
    return connect_and_handshake(server.port, **kwargs)


def alive(*procs) -> None:
    """Each process (a server, a proxy) still runs, and nothing crashed inside it (no
    traceback in its log)."""
    for p in procs:
        assert p.proc.poll() is None, f"exited with {p.proc.returncode}:\n{p.log()}"
        assert "Traceback" not in p.log(), p.log()


def assert_serves(server, path, offset: int = 0, length: int = 4096) -> None:
    """A new client connects and reads the file's content: the server is alive and well."""
    assert server.proc.poll() is None, f"the server died:\n{server.log()}"
    with client(server) as c:
        assert c.read(offset, length) == content(path, offset, length)
        c.disconnect()


def assert_closed_after(c: RawClient, expected: bytes = b"") -> None:
    """The server sends ``expected`` (nothing by default) and closes the connection."""
    assert c.read_until_closed() == expected


def log_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if line.strip()]


def problem_lines_about(server, name: str) -> list[str]:
    """Warning/error/fatal lines that mention ``name`` (a client's address:port)."""
    return [line for line in log_lines(server)
            if re.search(rf"(?<![\d.]){re.escape(name)}(?!\d)", line)
            and re.match(r"^\d+:[WEF]:", line)]


def wait_for_problem_line(server, name: str) -> list[str]:
    lines = wait_until(lambda: problem_lines_about(server, name))
    assert lines, f"no warning about {name} in the log:\n{server.log()}"
    return lines

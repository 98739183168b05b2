"""Helpers for the migration tests: processes, files, the mirror request, a source and
destination pair, and a raw sender that talks to a listener by hand."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexnbd import wire
from flexnbd.handshake import client_handshake
from tests.conftest import FLEXNBD
from tests.support import control as cu
from tests.support.rawclient import recv_exact

KiB = 1 << 10
MiB = 1 << 20
REPLY = wire.SIMPLE_REPLY_SIZE


def wait_exit(proc, timeout: float = 60.0) -> int:
    """The exit status of a flexnbd process; fails the test (with its log) on a timeout."""
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(proc.args[:1])} did not exit in {timeout} s:\n{proc.log()}")


def running(proc) -> bool:
    return proc.proc.poll() is None


def same_files(a: Path, b: Path, length: int | None = None) -> bool:
    """Byte for byte (the first ``length`` bytes when given)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        left = length
        while True:
            n = 4 * MiB if left is None else min(4 * MiB, left)
            if n == 0:
                return True
            x, y = fa.read(n), fb.read(n)
            if x != y:
                return False
            if not x:
                return True
            if left is not None:
                left -= len(x)


def first_difference(a: Path, b: Path) -> int | None:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                for i, (p, q) in enumerate(zip(x, y, strict=False)):
                    if p != q:
                        return pos + i
                return pos + min(len(x), len(y))
            if not x:
                return None
            pos += len(x)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def sparse_file(path: Path, size: int, pieces: int, piece: int, seed: int = 1) -> int:
    """A sparse file of ``size`` bytes with ``pieces`` random runs of ``piece`` bytes at
    random 4 KiB-aligned, non-overlapping places; the data size."""
    rng = random.Random(seed)
    slots = rng.sample(range(size // piece), pieces)
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in slots:
            f.seek(slot * piece)
            f.write(rng.randbytes(piece))
    return pieces * piece


def mirror_request(src, port: int, action: str | None = None, bind: str | None = None,
                   max_bps: int | None = None, host: str = "127.0.0.1",
                   timeout: float = 60.0) -> str:
    """The raw control request; the reply line."""
    lines = ["mirror", host, str(port)]
    if action is not None or bind is not None or max_bps is not None:
        lines.append(action or "exit")
    if bind is not None or max_bps is not None:
        lines.append(bind or "127.0.0.1")
    if max_bps is not None:
        lines.append(str(max_bps))
    return cu.control(src.sock, *lines, timeout=timeout)


def mirror_cli(src, port: int, *extra: str, host: str = "127.0.0.1", timeout: float = 60.0,
               env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(FLEXNBD + ["mirror", "--sock", str(src.sock), "--addr", host,
                                     "--port", str(port), *extra],
                          capture_output=True, timeout=timeout, env=full_env)


def out(res: subprocess.CompletedProcess) -> str:
    return (f"rc={res.returncode} stdout={res.stdout.decode(errors='replace')!r} "
            f"stderr={res.stderr.decode(errors='replace')!r}")


def status_or_none(proc) -> dict[str, str] | None:
    """The status, or None when the server is gone or going: a source that completed its
    migration closes its control socket, possibly on a request it had already accepted."""
    try:
        reply = cu.control(proc.sock, "status")
    except OSError:
        return None
    if not reply:
        return None
    assert reply.startswith("0: ") and reply.endswith(" \n"), repr(reply)
    return dict(pair.split("=", 1) for pair in reply[3:].split())


def logs(*procs) -> str:
    return "\n".join(f"--- {p.args[0]} (pid {p.pid}) ---\n{p.log()}" for p in procs)


@dataclass
class Pair:
    src: cu.Proc
    dst: cu.Proc
    src_file: Path
    dst_file: Path


@pytest.fixture
def pair(start_server, tmp_path):
    """pair(src_file, dst_file=None, src_args=(), dst_args=(), src_env=None) -> Pair: a serve
    source and a listen destination (a fresh sparse file of the same size unless given), both
    with control sockets; killed at the end of the test."""
    def make(src_file: Path, dst_file: Path | None = None, src_args=(), dst_args=(),
             src_env: dict | None = None, dst_env: dict | None = None) -> Pair:
        if dst_file is None:
            dst_file = tmp_path / (src_file.name + ".dst")
            with open(dst_file, "wb") as f:
                f.truncate(os.path.getsize(src_file))
        dst = start_server(dst_file, *dst_args, mode="listen", env=dst_env)
        src = start_server(src_file, *src_args, env=src_env)
        return Pair(src, dst, src_file, dst_file)
    return make


def assert_completed(p: Pair, timeout: float = 60.0, length: int | None = None) -> None:
    """Both ends exit 0 and the files are identical."""
    src_rc = wait_exit(p.src, timeout)
    dst_rc = wait_exit(p.dst, timeout)
    assert (src_rc, dst_rc) == (0, 0), logs(p.src, p.dst)
    if p.src_file.exists():
        assert same_files(p.src_file, p.dst_file, length), \
            f"first difference at {first_difference(p.src_file, p.dst_file)}"


COOKIE = wire.MIRROR_COOKIE


def _sender(port: int, timeout: float = 15.0):
    """A connected client in transmission (newstyle handshake by flexnbd's client side) and
    what the server offered."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        info = client_handshake(s)
    except BaseException:
        s.close()
        raise
    return s, info


def raw_client(port: int) -> socket.socket:
    """A connected client in transmission."""
    return _sender(port)[0]


def _request(s: socket.socket, cmd: int, offset: int = 0, length: int = 0, payload: bytes = b"",
             magic: int = wire.REQUEST_MAGIC) -> int:
    s.sendall(wire.pack_request(cmd, offset, length, COOKIE, magic=magic) + payload)
    reply = wire.unpack_simple_reply(recv_exact(s, REPLY))
    assert reply.magic == wire.SIMPLE_REPLY_MAGIC and reply.cookie == COOKIE
    return reply.error


def _write_all(s: socket.socket, data: bytes, upto: int | None = None, step: int = MiB) -> None:
    end = len(data) if upto is None else upto
    for off in range(0, end, step):
        n = min(step, end - off)
        assert _request(s, wire.CMD_WRITE, off, n, data[off:off + n]) == 0


def _disc(s: socket.socket) -> str:
    """Send DISC; how the listener then ended the connection: "closed" (an orderly close,
    which it may do only once it took control, SPEC §6.7) or "reset"."""
    s.sendall(wire.pack_request(wire.CMD_DISC, cookie=COOKIE))
    s.settimeout(15)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        return "reset"
    return "closed"

"""Helpers for the control-socket, ACL and lifecycle tests: raw control requests and
flexnbd processes with a control socket, on IPv4 or IPv6, that are always cleaned up."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import FlexnbdProcess, free_port, wait_for_port
from tests.support.rawclient import ServerClosed, recv_exact

STATUS_RE = (r"0: pid=(\d+) size=(\d+) is_mirroring=(true|false) clients_allowed=(true|false) "
             r"num_clients=(\d+) has_control=(true|false) allocation_map_method=([a-z]+) "
             r"handshake=(newstyle|oldstyle) \n")


def control_raw(path: str | Path, data: bytes, timeout: float = 15.0,
                shutdown: bool = True) -> bytes:
    """Connect, send ``data`` (then EOF when ``shutdown``), return all the server sends until
    it closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        if data:
            s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def control(path: str | Path, *lines: str, timeout: float = 15.0) -> str:
    """A well-formed request (lines, then the empty line); the reply as text."""
    data = b"".join(line.encode() + b"\n" for line in lines) + b"\n"
    return control_raw(path, data, timeout, shutdown=False).decode()


STOPPED_RE = (r"0: mirror stopped\nto (\S+) port (\d+), attempt (\d+): (\d+) of (\d+) bytes sent\n|"
              r"0: mirror stopped\nto (\S+) port (\d+): stopped before its first attempt sent "
              r"anything\n")


def stopped(reply: str, port: int | None = None) -> bool:
    """``break``'s ``0: mirror stopped`` with its detail line (to ``port``, when given), sent
    bytes at most the total."""
    m = re.fullmatch(STOPPED_RE, reply)
    if m is None:
        return False
    if m.group(1) is not None:
        if int(m.group(4)) > int(m.group(5)) or int(m.group(3)) < 1:
            return False
        return port is None or int(m.group(2)) == port
    return port is None or int(m.group(7)) == port


def status(path: str | Path) -> dict[str, str]:
    reply = control(path, "status")
    assert reply.startswith("0: ") and reply.endswith(" \n"), repr(reply)
    return dict(pair.split("=", 1) for pair in reply[3:].split())


def wait_map_built(proc: Proc, timeout: float = 30.0) -> None:
    """Until the server's allocation map is built (status no longer says ``pending``)."""
    deadline = time.monotonic() + timeout
    while status(proc.sock)["allocation_map_method"] == "pending":
        if time.monotonic() > deadline:
            pytest.fail(f"the allocation map was not built in {timeout} s:\n{proc.log()}")
        time.sleep(0.02)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        return True
    except OSError:
        return False


def wait_for_path(path: Path, proc: FlexnbdProcess, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.proc.poll() is not None:
            raise RuntimeError(f"flexnbd exited with {proc.proc.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.01)


def wait_for_control(path: Path, proc: FlexnbdProcess, timeout: float = 15.0) -> None:
    """Wait until the control socket answers: a stale file at ``path`` exists before the
    server replaces it, so the file's presence alone proves nothing."""
    deadline = time.monotonic() + timeout
    wait_for_path(path, proc, timeout)
    while True:
        try:
            status(path)
            return
        except (ConnectionRefusedError, FileNotFoundError):
            if proc.proc.poll() is not None:
                raise RuntimeError(
                    f"flexnbd exited with {proc.proc.returncode}:\n{proc.log()}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Proc(FlexnbdProcess):
    """A flexnbd server with a control socket; ``port``, ``sock``, ``host`` attributes."""

    port: int
    sock: Path
    host: str


@pytest.fixture
def start_server(tmp_path):
    """start_server(file, *extra, mode='serve', host='127.0.0.1', sock=True, env=None,
    wait=True) -> Proc; each is killed at the end of the test."""
    started: list[FlexnbdProcess] = []

    def start(file: Path, *extra: str, mode: str = "serve", host: str = "127.0.0.1",
              sock: bool | Path = True, env: dict | None = None, wait: bool = True,
              verbose: bool = True) -> Proc:
        n = len(started)
        port = free_port()
        path = Path(sock) if isinstance(sock, Path) else tmp_path / f"ctl{n}.sock"
        args = [mode, "--addr", host, "--port", str(port), "--file", str(file)]
        if sock:
            args += ["--sock", str(path)]
        if verbose:
            args.append("-v")
        proc = FlexnbdProcess(args + list(extra), tmp_path / f"flexnbd{n}.log", env)
        started.append(proc)
        proc.port = port  # type: ignore[attr-defined]
        proc.sock = path  # type: ignore[attr-defined]
        proc.host = host  # type: ignore[attr-defined]
        if wait:
            wait_for_port(port, proc.proc, host="::1" if host in ("::1", "::") else
                          "127.0.0.1" if host == "0.0.0.0" else host)
            if sock:
                wait_for_control(path, proc)
                # The readiness probe counts as a client until the server sees it closed.
                deadline = time.monotonic() + 15
                while status(path)["num_clients"] != "0" and time.monotonic() < deadline:
                    time.sleep(0.01)
        return proc  # type: ignore[return-value]
    yield start
    for proc in started:
        proc.kill()


def connect(host: str, port: int, bind: str | None = None, timeout: float = 15.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if bind:
            s.bind((bind, 0))
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def closed_without_a_byte(s: socket.socket, timeout: float = 15.0) -> bool:
    """The server closes the connection without sending anything."""
    s.settimeout(timeout)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def greets(s: socket.socket, timeout: float = 15.0) -> bool:
    """The server sends the NBD greeting (starts with NBDMAGIC)."""
    from flexnbd import wire

    s.settimeout(timeout)
    try:
        data = recv_exact(s, 8)
    except ServerClosed:
        return False
    return int.from_bytes(data, "big") == wire.NBDMAGIC


def env_without_notify() -> dict:
    return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

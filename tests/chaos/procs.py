"""The processes of a chaos scenario: flexnbd servers, the proxy, the workload; started,
signalled and watched the way systemd and an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FLEXNBD = [sys.executable, "-m", "flexnbd"]
FLEXNBD_PROXY = [str(Path(sys.executable).parent / "flexnbd-proxy")]
SYSTEM_PYTHON = "/usr/bin/python3"


class Proc:
    """One process: ``start()`` again after it ended is a restart (a new log section)."""

    def __init__(self, role: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 netns: str | None = None) -> None:
        self.role = role
        self.argv = (["ip", "netns", "exec", netns] if netns else []) + argv
        self.log = log
        self.env = env or {}
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.signalled: str | None = None     # the signal we sent to the current run
        self.ended_at: float | None = None

    def start(self) -> None:
        self.starts += 1
        self.signalled = None
        self.ended_at = None
        with open(self.log, "ab") as log:
            log.write(f"==== start {self.starts} at {time.monotonic():.3f}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=log, env={**os.environ, **self.env},
                                          start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        if self.popen is None or self.popen.poll() is not None:
            if self.popen is not None and self.ended_at is None:
                self.ended_at = time.monotonic()
            return False
        return True

    @property
    def rc(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            self.signalled = sig.name
            try:
                self.popen.send_signal(sig)          # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.alive()
        return self.popen.returncode

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace``; the whole process group."""
        if self.popen is None:
            return
        if self.alive():
            self.signal(signal.SIGTERM)
            if self.wait(grace) is None:
                self.kill_group()
        self.kill_group()

    def kill_group(self) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.wait(5)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def this_run_log(self) -> str:
        text = self.log_text()
        return text[text.rfind("==== start"):]


def control(sock: Path, *lines: str, timeout: float = 5.0) -> str:
    """A control-socket request; the reply, or "" when the server is not there."""
    data = b"".join(line.encode() + b"\n" for line in lines) + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock))
            s.sendall(data)
            out = bytearray()
            while chunk := s.recv(4096):
                out += chunk
            return out.decode(errors="replace")
    except OSError:
        return ""


def status(sock: Path) -> dict[str, str]:
    reply = control(sock, "status")
    if not reply.startswith("0: "):
        return {}
    return dict(p.split("=", 1) for p in reply[3:].split() if "=" in p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_figures(pid: int) -> tuple[int, int] | None:
    """(threads, open descriptors) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
        return threads, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration, ValueError):
        return None

"""Shared fixtures: real flexnbd processes on ephemeral ports, temporary files, real tools.

Every process started here is killed at the end of the test, pass or fail.

The fixtures of tests/support are registered here, once, for every test (``pytest_plugins``):
``start_server`` (support/control.py), ``pair`` (support/migration.py), ``psk``, ``x509``,
``kind``, ``creds`` and ``nbdkit_tls`` (support/tlscreds.py). A test asks for them by name;
no test module imports or re-exports a fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The helpers' asserts (tests/support) report their values as a test's own asserts do.
pytest.register_assert_rewrite("tests.support")
pytest_plugins = ["tests.support.control", "tests.support.migration", "tests.support.tlscreds"]

FLEXNBD = [sys.executable, "-m", "flexnbd"]
# The proxy's console script, installed beside the interpreter (pip install -e . puts it there).
FLEXNBD_PROXY = [str(Path(sys.executable).parent / "flexnbd-proxy")]
# In CI, a missing real client is a failure, not a skip.
REQUIRE_TOOLS = os.environ.get("FLEXNBD_REQUIRE_TOOLS") == "1"
SYSTEM_PYTHON = "/usr/bin/python3"


def require_tool(name: str) -> str:
    """The path of a real client program; skip (or fail in CI) when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if REQUIRE_TOOLS:
            pytest.fail(message + " (FLEXNBD_REQUIRE_TOOLS=1)")
        pytest.skip(message)
    return path


def require_python_nbd() -> str:
    """The system python that has the libnbd binding (python3-libnbd)."""
    ok = os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode == 0
    if not ok:
        message = "python3-libnbd (module nbd for /usr/bin/python3) is not installed"
        if REQUIRE_TOOLS:
            pytest.fail(message + " (FLEXNBD_REQUIRE_TOOLS=1)")
        pytest.skip(message)
    return SYSTEM_PYTHON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class FlexnbdProcess:
    """A running `flexnbd MODE ...` process; stderr goes to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None,
                 command: list[str] = FLEXNBD) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(command + args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._log, env=full_env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def freeze(self, timeout: float = 15.0) -> None:
        """SIGSTOP, and wait until every thread has stopped: kill() returns before the group
        stop is complete, and a thread still running could answer one more request."""
        from tests.support.procstat import thread_status

        self.signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while any(state != "T" for state in thread_status(self.pid, "State")):
            assert time.monotonic() < deadline, f"{self.pid} did not stop"
            time.sleep(0.005)

    def stop(self, sig: int | None = None, timeout: float = 20.0) -> int:
        """Signal the process (SIGTERM by default) and return its exit status."""
        # (In the class body `signal` is the method above, not the module.)
        self.signal(signal.SIGTERM if sig is None else sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode} before logging "
                                   f"{text!r}:\n{self.log()}")
            time.sleep(0.01)
        raise TimeoutError(f"{text!r} not logged in {timeout} s:\n{self.log()}")


class Server(FlexnbdProcess):
    """`flexnbd serve` on 127.0.0.1 and an ephemeral port, ready when constructed."""

    def __init__(self, file: Path, log_path: Path, extra: list[str] = (),
                 env: dict | None = None, mode: str = "serve", port: int | None = None) -> None:
        self.port = port or free_port()
        self.file = file
        super().__init__([mode, "--addr", "127.0.0.1", "--port", str(self.port),
                          "--file", str(file), "-v", *extra], log_path, env)
        try:
            if "-q" in extra or "--quiet" in extra:
                wait_for_port(self.port, self.proc)
            else:
                # The "serving" line is logged once the listener accepts. Waiting for it
                # instead of probing the port keeps a probe from taking a client slot.
                self.wait_for_log(" serving ")
        except BaseException:
            self.kill()
            raise

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"


@pytest.fixture
def make_file(tmp_path):
    """make_file(size, data=None, name=...) -> Path: a file of `size` bytes (random when
    data is None and random=True, else zeros / the given bytes)."""
    counter = [0]

    def make(size: int = 1 << 20, data: bytes | None = None, random: bool = True,
             name: str | None = None) -> Path:
        counter[0] += 1
        path = tmp_path / (name or f"disk{counter[0]}.img")
        with open(path, "wb") as f:
            if data is not None:
                f.write(data)
            elif random:
                f.write(os.urandom(size))
            else:
                f.truncate(size)
        return path
    return make


@pytest.fixture
def serve(tmp_path):
    """serve(file, *extra_args, env=None) -> Server; every server is killed afterwards."""
    started: list[FlexnbdProcess] = []

    def start(file: Path, *extra: str, env: dict | None = None, mode: str = "serve",
              port: int | None = None) -> Server:
        """``port`` restarts a server at a known port (a killed upstream coming back)."""
        server = Server(file, tmp_path / f"server{len(started)}.log", list(extra), env, mode,
                        port)
        started.append(server)
        return server
    yield start
    for server in started:
        server.kill()


class Proxy(FlexnbdProcess):
    """`flexnbd-proxy` on 127.0.0.1 and an ephemeral port in front of an upstream server,
    ready (its " serving " line logged) when constructed."""

    def __init__(self, upstream_port: int, log_path: Path, extra: list[str] = (),
                 env: dict | None = None, port: int | None = None,
                 upstream_addr: str = "127.0.0.1") -> None:
        self.port = port or free_port()
        self.upstream_port = upstream_port
        super().__init__(["--addr", "127.0.0.1", "--port", str(self.port),
                          "--conn-addr", upstream_addr, "--conn-port", str(upstream_port),
                          "-v", *extra], log_path, env, command=FLEXNBD_PROXY)
        try:
            self.wait_for_log(" serving ")
        except BaseException:
            self.kill()
            raise

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"


@pytest.fixture
def proxy(tmp_path):
    """proxy(upstream_port, *extra_args, env=None, port=None) -> Proxy; killed afterwards."""
    started: list[Proxy] = []

    def start(upstream_port: int, *extra: str, env: dict | None = None,
              port: int | None = None) -> Proxy:
        p = Proxy(upstream_port, tmp_path / f"proxy{len(started)}.log", list(extra), env, port)
        started.append(p)
        return p
    yield start
    for p in started:
        p.kill()


@pytest.fixture
def run_flexnbd():
    """run_flexnbd(*args, input=None, timeout=60) -> CompletedProcess (bytes)."""
    def run(*args: str, input: bytes | None = None, timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(FLEXNBD + list(args), input=input, capture_output=True,
                              timeout=timeout, env=full_env)
    return run

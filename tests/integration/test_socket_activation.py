"""Socket activation (issue 15; flexnbd.activation): started with listening sockets at
descriptors 3.. and LISTEN_PID/LISTEN_FDS for its own pid, as systemd starts a service behind a
.socket unit, `flexnbd serve`, `flexnbd listen` and `flexnbd-proxy` serve on those sockets
instead of binding their own, report READY=1 as usual, and refuse clearly what they cannot use.

The launcher below does what systemd does: it moves the sockets it is given to descriptors
3, 4, ..., sets LISTEN_FDS and LISTEN_PID (its own pid, which the exec keeps) and execs the
command. One test uses systemd's own `systemd-socket-activate` (package systemd).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FLEXNBD, FLEXNBD_PROXY, FlexnbdProcess, free_port, require_tool
from tests.support import control as cu
from tests.support.clients import check
from tests.support.waiting import wait_until

MiB = 1 << 20

# argv: FDS PID COUNT -- COMMAND...   FDS: comma-separated descriptors (may be empty) to pass
# as 3, 4, ...; PID: "self" or a pid for LISTEN_PID; COUNT: LISTEN_FDS ("" for len(FDS)).
LAUNCHER = r"""
import fcntl, os, sys
end = sys.argv.index("--")
fds_arg, pid, count = sys.argv[1:end]
fds = [int(fd) for fd in fds_arg.split(",") if fd]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)          # inheritable
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
os.environ["LISTEN_FDS"] = count or str(len(fds))
os.environ["LISTEN_FDNAMES"] = ":".join(["flexnbd.socket"] * len(fds))
command = sys.argv[end + 1:]
os.execvp(command[0], command)
"""


def launcher(fds: list[int], pid: str = "self", count: str = "") -> list[str]:
    return [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), pid, count, "--"]


def tcp_listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(16)
    return s


class Activated(FlexnbdProcess):
    """A flexnbd program started by the launcher with ``passed`` as its descriptors 3...;
    its stderr goes to a log file."""

    def __init__(self, passed: list, args: list[str], log_path: Path, env: dict | None = None,
                 command: list[str] = FLEXNBD, pid: str = "self") -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        fds = [s.fileno() for s in passed]
        self.proc = subprocess.Popen(launcher(fds, pid) + command + args,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log, env={**os.environ, **(env or {})},
                                     pass_fds=fds)


@pytest.fixture
def activated(tmp_path):
    """activated(passed, *args, env=None, command=FLEXNBD) -> Activated: started, and
    killed at the end of the test (the test's copies of ``passed`` are closed at once)."""
    started: list[Activated] = []

    def start(passed: list, *args: str, env: dict | None = None,
              command: list[str] = FLEXNBD) -> Activated:
        proc = Activated(passed, list(args), tmp_path / f"activated{len(started)}.log", env,
                         command)
        started.append(proc)
        for s in passed:
            s.close()
        return proc
    yield start
    for proc in started:
        proc.kill()


def run_activated(passed: list, *args: str, pid: str = "self", count: str = "",
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `flexnbd ARGS` under the launcher until it exits (for start-up errors)."""
    fds = [p if isinstance(p, int) else p.fileno() for p in passed]
    return subprocess.run(launcher(fds, pid, count) + FLEXNBD + list(args), capture_output=True,
                          text=True, timeout=60, pass_fds=fds, env={**os.environ, **(env or {})})


def assert_one_line_error(res: subprocess.CompletedProcess, *expected: str) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    first = res.stderr.splitlines()[0]
    for text in expected:
        assert text in first, res.stderr
    return first


def nbdinfo(uri: str) -> dict:
    return json.loads(check([require_tool("nbdinfo"), "--json", uri]))


def copied(uri: str, tmp_path: Path) -> bytes:
    out = tmp_path / "copy.img"
    out.unlink(missing_ok=True)
    check([require_tool("nbdcopy"), uri, str(out)])
    return out.read_bytes()


def unix_uri(path: Path) -> str:
    return f"nbd+unix:///?socket={path}"


# --------------------------------------------------------------------------------------------
# serving on what was passed

def test_serve_on_an_inherited_tcp_socket(activated, make_file, tmp_path):
    data = os.urandom(3 * MiB + 1000)        # exported: rounded down to 512
    path = make_file(data=data)
    listener = tcp_listener()
    port = listener.getsockname()[1]
    server = activated([listener], "serve", "--file", str(path), "-v")
    server.wait_for_log(" serving ")
    assert f"on inherited socket 127.0.0.1:{port} (systemd)" in server.log(), server.log()

    uri = f"nbd://127.0.0.1:{port}"
    assert nbdinfo(uri)["exports"][0]["export-size"] == 3 * MiB + 512
    assert copied(uri, tmp_path) == data[:3 * MiB + 512]
    # and writes land in the file (qemu-io through the same socket)
    check([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 4096 8192", uri])
    assert path.read_bytes()[4096:12288] == b"\x5a" * 8192
    assert server.stop() == 0


def test_serve_on_inherited_tcp_and_unix_sockets(activated, make_file, tmp_path):
    """Several sockets: all served. The inherited TCP one is governed by the ACL like
    --addr's, the Unix one by its file mode like --unix's, and it stays in place on stop
    (systemd owns it)."""
    data = os.urandom(2 * MiB)
    path = make_file(data=data)
    tcp = tcp_listener()
    port = tcp.getsockname()[1]
    unix_path = tmp_path / "nbd.sock"
    unix = unix_listener(unix_path)
    # the ACL lets no one in over TCP
    server = activated([tcp, unix], "serve", "--file", str(path), "-v", "--default-deny")
    server.wait_for_log(" serving ")
    assert (f"on inherited socket 127.0.0.1:{port} (systemd) and inherited socket "
            f"{unix_path} (systemd)") in server.log(), server.log()

    assert nbdinfo(unix_uri(unix_path))["exports"][0]["export-size"] == 2 * MiB
    assert copied(unix_uri(unix_path), tmp_path) == data
    with cu.connect("127.0.0.1", port) as c:
        assert cu.closed_without_a_byte(c)
    assert wait_until(lambda: "not allowed by the ACL" in server.log()), server.log()
    assert server.stop() == 0
    assert unix_path.exists(), "the inherited Unix socket's file was removed"


def test_ready_once_the_inherited_sockets_serve(activated, make_file, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(30)
    listener = tcp_listener()
    port = listener.getsockname()[1]
    ctl = tmp_path / "ctl.sock"
    try:
        server = activated([listener], "serve", "--file", str(make_file(MiB)), "--sock",
                           str(ctl), env={"NOTIFY_SOCKET": str(notify_path),
                                          "FLEXNBD_ALLOCMAP_DELAY_MS": "200"})
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        # at that moment: the inherited socket is served and the control socket answers
        with cu.connect("127.0.0.1", port) as c:
            assert cu.greets(c)
        assert cu.status(ctl)["pid"] == str(server.pid)
        server.signal(signal.SIGTERM)
        assert notify.recv(4096).decode() == "STOPPING=1"
        assert server.proc.wait(30) == 0
    finally:
        notify.close()


def test_listen_receives_a_migration_on_an_inherited_socket(activated, serve, make_file,
                                                            tmp_path, run_flexnbd):
    data = os.urandom(4 * MiB)
    src_ctl = tmp_path / "src.sock"
    source = serve(make_file(data=data), "--sock", str(src_ctl))
    dst_path = make_file(4 * MiB, random=False)
    listener = tcp_listener()
    port = listener.getsockname()[1]
    dest = activated([listener], "listen", "--file", str(dst_path), "-v")
    dest.wait_for_log(" serving ")
    assert f"inherited socket 127.0.0.1:{port} (systemd)" in dest.log()

    res = run_flexnbd("mirror", "--sock", str(src_ctl), "--addr", "127.0.0.1", "--port",
                      str(port), "--wait", timeout=120)
    assert res.returncode == 0, res.stderr
    assert dest.proc.wait(30) == 0, dest.log()
    assert source.proc.wait(30) == 0, source.log()
    assert dst_path.read_bytes() == data


def test_proxy_on_an_inherited_socket(activated, serve, make_file, tmp_path):
    data = os.urandom(2 * MiB)
    upstream = serve(make_file(data=data))
    listener = tcp_listener()
    port = listener.getsockname()[1]
    proxy = activated([listener], "--conn-addr", "127.0.0.1", "--conn-port",
                      str(upstream.port), "-v", command=FLEXNBD_PROXY)
    proxy.wait_for_log(" serving ")
    assert f"serving inherited socket 127.0.0.1:{port} (systemd)" in proxy.log(), proxy.log()
    uri = f"nbd://127.0.0.1:{port}"
    assert nbdinfo(uri)["exports"][0]["export-size"] == 2 * MiB
    assert copied(uri, tmp_path) == data
    assert proxy.stop() == 0


def test_systemd_socket_activate(make_file, tmp_path):
    """systemd's own launcher: it listens, and on the first connection execs flexnbd with the
    sockets and LISTEN_* (and only the environment it is told to pass)."""
    tool = require_tool("systemd-socket-activate")
    data = os.urandom(MiB)
    path = make_file(data=data)
    port = free_port()
    unix_path = tmp_path / "nbd.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(30)
    passed = [f"NOTIFY_SOCKET={notify_path}"] + [name for name in ("PYTHONPATH",)
                                                  if name in os.environ]
    args = ["-l", f"127.0.0.1:{port}", "-l", str(unix_path), "--fdname=nbd:nbd-unix"]
    for name in passed:
        args += ["-E", name]
    proc = FlexnbdProcess(args + ["--", *FLEXNBD, "serve", "--file", str(path), "-v"],
                          tmp_path / "activate.log", command=[tool])
    try:
        proc.wait_for_log(f"Listening on {unix_path} as 4.")
        uri = f"nbd://127.0.0.1:{port}"
        # the first connection starts flexnbd; it waits in the backlog meanwhile
        assert nbdinfo(uri)["exports"][0]["export-size"] == MiB
        message = notify.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        assert copied(unix_uri(unix_path), tmp_path) == data
        assert (f"on inherited socket 127.0.0.1:{port} (systemd) and inherited socket "
                f"{unix_path} (systemd)") in proc.log(), proc.log()
        assert proc.stop() == 0
    finally:
        proc.kill()
        notify.close()


# --------------------------------------------------------------------------------------------
# what is not for us, and what cannot be used

@pytest.mark.parametrize("pid,with_socket", [("1", True), ("self", False)],
                         ids=["LISTEN_PID-of-another-process", "LISTEN_FDS=0"])
def test_no_sockets_for_us_is_serving_as_usual(activated, make_file, tmp_path, pid,
                                               with_socket):
    """LISTEN_PID of another process (a parent's, passed down) or LISTEN_FDS=0: as if unset,
    so --addr/--port are needed, and used."""
    path = make_file(MiB)
    passed = [tcp_listener()] if with_socket else []
    try:
        res = run_activated(passed, "serve", "--file", str(path), pid=pid)
        assert_one_line_error(res, "missing --addr and --port")
    finally:
        for s in passed:
            s.close()
    port = free_port()
    passed = [tcp_listener()] if with_socket else []
    server = Activated(passed, ["serve", "--addr", "127.0.0.1", "--port", str(port), "--file",
                                str(path), "-v"], tmp_path / "own.log", pid=pid)
    for s in passed:
        s.close()
    try:
        server.wait_for_log(" serving ")
        assert f"on 127.0.0.1 port {port}" in server.log()
        assert "inherited" not in server.log()
        assert nbdinfo(f"nbd://127.0.0.1:{port}")["exports"][0]["export-size"] == MiB
        assert server.stop() == 0
    finally:
        server.kill()


@pytest.mark.parametrize("options,named", [
    (["--addr", "127.0.0.1", "--port", "10809"], "--addr/--port"),
    (["--unix", "nbd.sock"], "--unix"),
])
def test_where_to_listen_with_inherited_sockets_is_a_usage_error(make_file, options, named):
    listener = tcp_listener()
    try:
        res = run_activated([listener], "serve", "--file", str(make_file(MiB)), *options)
    finally:
        listener.close()
    assert_one_line_error(res, f"drop {named} to serve on the passed socket(s)",
                          "LISTEN_FDS=1")
    assert "usage: flexnbd serve" in res.stderr


def test_acl_with_only_an_inherited_unix_socket_is_a_usage_error(make_file, tmp_path):
    listener = unix_listener(tmp_path / "nbd.sock")
    try:
        res = run_activated([listener], "serve", "--file", str(make_file(MiB)), "127.0.0.1")
    finally:
        listener.close()
    assert_one_line_error(res, "the ACL (and --default-deny) applies to TCP clients only")


def test_proxy_with_addr_and_inherited_socket_is_a_usage_error():
    listener = tcp_listener()
    fd = listener.fileno()
    try:
        res = subprocess.run(launcher([fd]) + FLEXNBD_PROXY + [
            "--addr", "127.0.0.1", "--port", "10809", "--conn-addr", "127.0.0.1",
            "--conn-port", "10810"], capture_output=True, text=True, timeout=60, pass_fds=[fd])
    finally:
        listener.close()
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("flexnbd-proxy: --addr/--port and socket activation exclude "
                                 "each other"), res.stderr


def _regular_file(tmp_path: Path):
    return open(tmp_path / "not-a-socket", "wb")


def _udp(tmp_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _bound_not_listening(tmp_path: Path) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def _connected(tmp_path: Path) -> socket.socket:
    """What an Accept=yes unit passes: one connection."""
    a, b = socket.socketpair()
    b.close()
    return a


@pytest.mark.parametrize("make,expected", [
    (_regular_file, "descriptor 3 is not a socket"),
    (_udp, "descriptor 3 is a datagram socket, not a stream socket"),
    (_bound_not_listening, "descriptor 3 (127.0.0.1:"),
    (_connected, "is not listening: flexnbd needs Accept=no"),
], ids=["file", "udp", "tcp-not-listening", "connected"])
def test_an_unusable_descriptor_is_a_clear_error(make_file, tmp_path, make, expected):
    passed = make(tmp_path)
    try:
        res = run_activated([passed], "serve", "--file", str(make_file(MiB)))
    finally:
        passed.close()
    line = assert_one_line_error(res, "flexnbd serve: socket activation: ", expected)
    assert res.stderr.strip() == line


@pytest.mark.parametrize("pid,count,expected", [
    ("self", "2", "descriptor 4 is not open (LISTEN_FDS=2 passes 3..4)"),
    ("self", "two", "LISTEN_FDS='two' is not a number of descriptors"),
    ("the-parent", "", "LISTEN_PID='the-parent' is not a process id"),
])
def test_bad_activation_variables_are_a_clear_error(make_file, pid, count, expected):
    listener = tcp_listener()
    try:
        res = run_activated([listener], "serve", "--file", str(make_file(MiB)), pid=pid,
                            count=count)
    finally:
        listener.close()
    line = assert_one_line_error(res, "flexnbd serve: socket activation: ", expected)
    assert res.stderr.strip() == line

"""Process lifecycle (SPEC §2): stop signals and exit statuses, ordered shutdown, the
killswitch, and systemd readiness (sd_notify)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import FlexnbdProcess, free_port, wait_for_port
from tests.support import control as cu
from tests.support.rawclient import RawClient, ServerClosed
from tests.support.waiting import wait_until

MiB = 1 << 20


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signal_exits_0_and_removes_the_socket(start_server, make_file, sig):
    srv = start_server(make_file(MiB))
    with RawClient.connect(srv.port) as c:  # a connected idle client does not delay the stop
        c.handshake()
        assert srv.stop(sig, timeout=30) == 0
        assert c.is_closed_by_server()
    assert not srv.sock.exists()
    assert port_is_closed(srv.port)
    assert "Traceback" not in srv.log()
    assert f"stopping on {signal.Signals(sig).name}" in srv.log()


def test_stop_without_a_control_socket(start_server, make_file):
    srv = start_server(make_file(MiB), sock=False)
    assert srv.stop(signal.SIGTERM, timeout=30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_listen_mode_exits_1_when_no_migration_completed(start_server, make_file, sig):
    srv = start_server(make_file(MiB), mode="listen")
    assert cu.status(srv.sock)["has_control"] == "false"
    assert srv.stop(sig, timeout=30) == 1
    assert not srv.sock.exists()


def test_listen_mode_serves_one_sender_at_a_time(start_server, make_file):
    srv = start_server(make_file(MiB), mode="listen")
    # (the readiness probe held the one place until the server saw it close)
    assert wait_until(lambda: cu.status(srv.sock)["num_clients"] == "0")
    with RawClient.connect(srv.port) as first:
        first.handshake()
        assert first.write(0, b"z" * 512) == 0
        # A second connection may shake hands (that takes no slot), but the slot is the
        # first sender's, which is busy: the second is disconnected once it is done.
        with RawClient.connect(srv.port) as second:
            second.handshake()
            with pytest.raises((ServerClosed, ConnectionError, OSError)):
                second.write(0, b"y" * 512)
        assert first.write(512, b"z" * 512) == 0
    srv.wait_for_log("a sender already holds the migration's slot")


def test_listen_mode_slot_of_a_sender_that_hung_up_goes_to_the_next(start_server, make_file):
    # A sender that finished its handshake and hung up (a readiness probe, a crashed source)
    # holds the slot only until its thread notices; the next sender, arriving at once, must
    # not be refused for it. (Repeated: the window is the old thread's reaction time.)
    # (Under load the probe's own thread may attach after the sender's: then the probe is the
    # one refused, which is harmless. Only a refused sender counts.)
    srv = start_server(make_file(MiB), mode="listen")
    senders = []
    for i in range(20):
        with RawClient.connect(srv.port) as gone:
            gone.handshake()
        with RawClient.connect(srv.port) as sender:
            senders.append(sender.sock.getsockname()[1])
            sender.handshake()
            assert sender.write(i * 512, b"s" * 512) == 0, f"attempt {i}"
            sender.disconnect()
    refused = [port for port in senders
               if f"127.0.0.1:{port}: a sender already holds the migration's slot" in srv.log()]
    assert refused == [], srv.log()


def test_sigpipe_does_not_kill(start_server, make_file):
    srv = start_server(make_file(4 * MiB))
    c = RawClient.connect(srv.port)
    c.handshake()
    c.send_request(wire.CMD_READ, 0, 4 * MiB)
    c.reset()
    os.kill(srv.pid, signal.SIGPIPE)
    time.sleep(0.3)
    assert srv.proc.poll() is None
    assert cu.status(srv.sock)["pid"] == str(srv.pid)


def test_ordered_shutdown_finishes_the_current_request(start_server, make_file):
    path = make_file(MiB)
    srv = start_server(path)
    busy = RawClient.connect(srv.port)
    idle = RawClient.connect(srv.port)
    try:
        busy.handshake()
        idle.handshake()
        cookie = busy.send_request(wire.CMD_WRITE, 4096, 8192, payload=b"\x33" * 1000)
        time.sleep(0.5)  # the server has begun the request (read its header)
        srv.signal(signal.SIGTERM)
        # The idle client is let go at once; the listener closes; the process waits.
        assert idle.is_closed_by_server()
        assert wait_until(lambda: port_is_closed(srv.port))
        assert srv.proc.poll() is None and srv.sock.exists()
        busy.send(b"\x33" * (8192 - 1000))
        reply = busy.recv_reply()
        assert (reply.error, reply.cookie) == (0, cookie)
        assert busy.is_closed_by_server()
        assert srv.proc.wait(30) == 0
        assert not srv.sock.exists()
        assert path.read_bytes()[4096:4096 + 8192] == b"\x33" * 8192
    finally:
        busy.close()
        idle.close()


def test_signal_during_startup(make_file, tmp_path):
    """A SIGTERM right after start still ends in a clean exit 0 with nothing left behind."""
    sock = tmp_path / "ctl.sock"
    port = free_port()
    proc = FlexnbdProcess(["serve", "--addr", "127.0.0.1", "--port", str(port), "--file",
                           str(make_file(MiB)), "--sock", str(sock)], tmp_path / "log")
    try:
        cu.wait_for_path(sock, proc)
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        assert not sock.exists()
    finally:
        proc.kill()


# --------------------------------------------------------------------------------------------
# killswitch

def _stall_mid_write(port: int) -> RawClient:
    c = RawClient.connect(port)
    c.handshake()
    c.send_request(wire.CMD_WRITE, 0, 65536, payload=b"\x01" * 1000)  # and no more
    return c


def test_killswitch_cuts_the_stalled_client_only(start_server, make_file):
    path = make_file(MiB)
    srv = start_server(path, "--killswitch", env={"FLEXNBD_KILLSWITCH_SECS": "1"})
    healthy = RawClient.connect(srv.port)
    try:
        healthy.handshake()
        stalled = _stall_mid_write(srv.port)
        try:
            assert stalled.is_closed_by_server(timeout=30)
        finally:
            stalled.close()
        # The other client was idle all along (longer than the limit: idle is no request)
        # and still works.
        assert healthy.read(0, 4096) == path.read_bytes()[:4096]
        assert healthy.write(8192, b"\x05" * 4096) == 0
        # (the watchdog logs the cut after making it)
        assert wait_until(lambda: "ran over" in srv.log()), srv.log()
        assert srv.proc.poll() is None
        assert wait_until(lambda: cu.status(srv.sock)["num_clients"] == "1")
    finally:
        healthy.close()


def test_killswitch_short_option_and_busy_clients_unaffected(start_server, make_file):
    srv = start_server(make_file(4 * MiB), "-k", env={"FLEXNBD_KILLSWITCH_SECS": "1"})
    with RawClient.connect(srv.port) as c:
        c.handshake()
        deadline = time.monotonic() + 3  # steady requests, each quick, for longer than 1 s
        while time.monotonic() < deadline:
            assert c.write(0, b"\x09" * 65536) == 0
            c.read(0, 65536)
    assert "ran over" not in srv.log()


def test_without_killswitch_a_stalled_client_stays(start_server, make_file):
    srv = start_server(make_file(MiB), env={"FLEXNBD_KILLSWITCH_SECS": "0.5"})
    stalled = _stall_mid_write(srv.port)
    try:
        assert not stalled.is_closed_by_server(timeout=2.5)
    finally:
        stalled.close()


def test_killswitch_bad_environment_value(run_flexnbd, make_file):
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(make_file(MiB)), "--killswitch",
                      env={"FLEXNBD_KILLSWITCH_SECS": "soon"}, timeout=30)
    assert res.returncode == 1
    assert b"FLEXNBD_KILLSWITCH_SECS" in res.stderr and b"Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# sd_notify

def _notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"flexnbd-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_only_when_serving(make_file, tmp_path, abstract):
    listener, name = _notify_socket(tmp_path, abstract)
    sock = tmp_path / "ctl.sock"
    port = free_port()
    proc = FlexnbdProcess(["serve", "--addr", "127.0.0.1", "--port", str(port), "--file",
                           str(make_file(MiB)), "--sock", str(sock), "-v"], tmp_path / "log",
                          env={"NOTIFY_SOCKET": name,
                               # slow the allocation map down: readiness must not wait for it
                               "FLEXNBD_ALLOCMAP_DELAY_MS": "200"})
    try:
        listener.settimeout(30)
        message = listener.recv(4096).decode()
        assert "READY=1" in message.split("\n"), message
        # At that moment, with no retry: the NBD port accepts and the control socket answers.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert cu.greets(c)
        assert cu.status(sock)["pid"] == str(proc.pid)
        # Exactly one READY; STOPPING=1 on shutdown.
        proc.signal(signal.SIGTERM)
        message = listener.recv(4096).decode()
        assert message == "STOPPING=1", message
        assert proc.proc.wait(30) == 0
    finally:
        proc.kill()
        listener.close()


def test_sd_notify_unreachable_socket_is_not_fatal(make_file, tmp_path):
    port = free_port()
    proc = FlexnbdProcess(["serve", "--addr", "127.0.0.1", "--port", str(port), "--file",
                           str(make_file(MiB))], tmp_path / "log",
                          env={"NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    try:
        wait_for_port(port, proc.proc)
        assert proc.stop(signal.SIGTERM, timeout=30) == 0
        assert "notify" in proc.log()
    finally:
        proc.kill()

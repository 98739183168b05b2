"""Migration faults (SPEC §6.1, §6.2): destinations that refuse, reject, lie about the size, never
greet, or fail after the first attempt connected (error replies, bad cookies, bad magics, hangs,
dropped connections) through a fault-injecting relay in front of a real `flexnbd listen` or a
scripted fake destination; and senders that misbehave at a real listener (none of them may
complete the migration).

After a fault in the first connection attempt the control reply says what went wrong and the
source goes on serving; after a fault in a later stage the source retries from the start and
completes once the fault is gone, with identical files.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import time

import pytest

from flexnbd import wire
from flexnbd.handshake import client_handshake
from tests.conftest import require_tool
from tests.fakes.fakedest import FakeDest, Script
from tests.fakes.relay import Fault, Relay
from tests.support import control as cu
from tests.support.hostile import map_built
from tests.support.migration import (
    COOKIE,
    KiB,
    MiB,
    _disc,
    _request,
    _sender,
    _write_all,
    assert_completed,
    logs,
    mirror_cli,
    mirror_request,
    out,
    running,
    same_files,
    sparse_file,
    wait_exit,
)
from tests.support.rawclient import RawClient, ServerClosed, recv_exact
from tests.support.waiting import wait_until

SHORT_LIMIT = {"FLEXNBD_MS_REQUEST_LIMIT_SECS": "2"}
OLD_GREETING = wire.OLDSTYLE_GREETING_SIZE          # 152 bytes down before the first reply
REPLY = wire.SIMPLE_REPLY_SIZE


def still_serving(src) -> None:
    st = cu.status(src.sock)
    assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    with cu.connect("127.0.0.1", src.port) as s:
        assert cu.greets(s)


def then_a_real_mirror_completes(p) -> None:
    res = mirror_cli(p.src, p.dst.port)
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert_completed(p)


# --------------------------------------------------------------------------------------------
# the first attempt fails: the control reply says why, nothing is left running

def test_destination_refuses(pair, make_file):
    p = pair(make_file(MiB))
    with socket.socket() as s:            # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        res = mirror_cli(p.src, port)
    assert (res.returncode, res.stdout, res.stderr) == \
        (1, b"", b"Mirror failed to connect\nECONNREFUSED: Connection refused\n"), out(res)
    still_serving(p.src)
    then_a_real_mirror_completes(p)


CLOSED = "the peer closed the connection during the handshake"


@pytest.mark.parametrize("script,reply,why", [
    (Script(greeting="close"), "Mirror was rejected", CLOSED),
    (Script(greeting="badmagic"), "Mirror was rejected",
     "no NBD greeting: its first bytes are not NBD's magic (is it an NBD server?)"),
    (Script(greeting="newstyle", close_after_greeting=True), "Mirror was rejected", CLOSED),
    (Script(greeting="oldstyle", size=MiB + 512), "Remote size does not match local size",
     f"the destination exports {MiB + 512} bytes, this server {MiB}"),
    (Script(greeting="newstyle", size=MiB - 512), "Remote size does not match local size",
     f"the destination exports {MiB - 512} bytes, this server {MiB}"),
], ids=["close-at-once", "wrong-magic", "newstyle-close-after-greeting", "oldstyle-size",
        "newstyle-size"])
def test_first_attempt_fails(pair, make_file, script, reply, why):
    """The 0.5.0 reply text, byte for byte, then why on the next line."""
    p = pair(make_file(MiB))
    with FakeDest(MiB, default=script) as dest:
        res = mirror_cli(p.src, dest.port)
        assert (res.returncode, res.stdout, res.stderr.decode()) == \
            (1, b"", f"{reply}\n{why}\n"), out(res)
        assert len(dest.conns) == 1          # no retry after a failed first attempt
    still_serving(p.src)
    then_a_real_mirror_completes(p)


def test_relay_resets_at_once(pair, make_file):
    p = pair(make_file(MiB))
    with Relay(p.dst.port, default=Fault(refuse=True)) as relay:
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stderr.split(b"\n")[0]) == (1, b"Mirror was rejected"), \
            out(res)
        assert res.stderr.split(b"\n")[1] in (b"ECONNRESET: Connection reset by peer",
                                              CLOSED.encode()), out(res)
    still_serving(p.src)


def test_bind_to_a_foreign_address(pair, make_file):
    p = pair(make_file(MiB))
    res = mirror_cli(p.src, p.dst.port, "--bind", "192.0.2.1")    # TEST-NET-1, not ours
    assert (res.returncode, res.stderr) == \
        (1, b"Mirror failed to connect\nEADDRNOTAVAIL: Cannot assign requested address\n"), \
        out(res)
    still_serving(p.src)
    assert running(p.dst) and cu.status(p.dst.sock)["has_control"] == "false"


def test_wrong_size_real_listener(start_server, make_file):
    src = start_server(make_file(MiB))
    dst = start_server(make_file(2 * MiB, random=False), mode="listen")
    res = mirror_cli(src, dst.port)
    assert (res.returncode, res.stderr.decode()) == \
        (1, f"Remote size does not match local size\n"
            f"the destination exports {2 * MiB} bytes, this server {MiB}\n"), out(res)
    still_serving(src)
    assert running(dst) and cu.status(dst.sock)["has_control"] == "false"


def test_destination_never_greets(pair, make_file):
    p = pair(make_file(MiB))
    with FakeDest(MiB, default=Script(greeting="none")) as dest:
        started = time.monotonic()
        res = mirror_cli(p.src, dest.port)
        took = time.monotonic() - started
    assert (res.returncode, res.stderr) == \
        (1, b"Remote server failed to respond\nno NBD greeting within 5 s\n"), out(res)
    assert 4.0 <= took < 15.0, took
    still_serving(p.src)


def test_relay_hangs_without_greeting(pair, make_file):
    p = pair(make_file(MiB))
    with Relay(p.dst.port, default=Fault(hang=True)) as relay:
        started = time.monotonic()
        res = mirror_cli(p.src, relay.port)
        took = time.monotonic() - started
    assert (res.returncode, res.stderr) == \
        (1, b"Remote server failed to respond\nno NBD greeting within 5 s\n"), out(res)
    assert 4.0 <= took < 15.0, took
    then_a_real_mirror_completes(p)


def test_failed_mirror_then_stop_exits_0(start_server, make_file):
    """A mirror that never started leaves nothing running: a stop signal then exits 0."""
    src = start_server(make_file(MiB))
    with FakeDest(MiB, default=Script(greeting="close")) as dest:
        assert mirror_request(src, dest.port) == f"1: Mirror was rejected\n{CLOSED}\n"
    assert cu.control(src.sock, "break") == "1: not mirroring\n"
    assert src.stop() == 0, src.log()


# --------------------------------------------------------------------------------------------
# the first attempt connected ("0: Mirror started"): a later fault fails the attempt, the
# source retries from offset 0 and completes once the fault is gone

def _retried(src, n: int = 1) -> bool:
    return src.log().count("retrying") >= n


@pytest.mark.parametrize("style", ["oldstyle", "newstyle"])
@pytest.mark.parametrize("fault", ["error", "badcookie", "badmagic", "hang", "close"])
def test_fake_destination_fault_then_retry(start_server, make_file, tmp_path, style, fault):
    size = 24 * MiB
    src_file = make_file(size)
    src = start_server(src_file, env=SHORT_LIMIT)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    bad = Script(greeting=style, fail_at=1, fault=fault)
    with FakeDest(size, dst_file, scripts=[bad], default=Script(greeting=style)) as dest:
        started = time.monotonic()
        res = mirror_cli(src, dest.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert wait_exit(src, 60) == 0, src.log()
        took = time.monotonic() - started
        assert dest.wait(lambda: dest.completed, 10), dest.conns
        assert dest.conns[0].fault_fired and not dest.conns[0].disc
        assert len(dest.conns) == 2, dest.conns
        assert dest.conns[1].requests[0].offset == 0     # the retry starts over
    assert _retried(src), src.log()
    assert same_files(src_file, dst_file)
    assert took < 30, took


def test_oldstyle_destination_closes_after_the_greeting(pair, make_file):
    """An oldstyle greeting is complete at 152 bytes: the attempt started, then failed."""
    p = pair(make_file(4 * MiB), dst_args=("--oldstyle",))
    with Relay(p.dst.port, faults=[Fault(close_after_down=OLD_GREETING)]) as relay:
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert_completed(p)
        assert len(relay.connections) >= 2
    assert _retried(p.src), p.src.log()


# Faults at exact places of the reply stream of an oldstyle listener: the greeting is 152
# bytes, then 16-byte simple replies (magic 4, error 4, cookie 8).
OLD_FAULTS = {
    "reply-bad-magic": Fault(corrupt_down_at=OLD_GREETING),
    "reply-error": Fault(corrupt_down_at=OLD_GREETING + 7),
    "reply-bad-cookie": Fault(corrupt_down_at=OLD_GREETING + 8),
    "second-reply-bad-cookie": Fault(corrupt_down_at=OLD_GREETING + REPLY + 15),
    "hang-before-the-reply": Fault(stall_after_down=OLD_GREETING),
    "drop-before-the-reply": Fault(close_after_down=OLD_GREETING),
    "drop-after-one-reply": Fault(close_after_down=OLD_GREETING + REPLY),
    "drop-mid-payload": Fault(close_after_up=3 * MiB + 100),
    "reset-mid-payload": Fault(reset_after_up=5 * MiB),
    "reset-after-the-reply": Fault(reset_after_down=OLD_GREETING + REPLY),
    "stall-sending": Fault(stall_after_up=9 * MiB),
}


@pytest.mark.parametrize("name", list(OLD_FAULTS))
def test_relay_fault_then_retry_into_real_listener(pair, make_file, name):
    fault = OLD_FAULTS[name]
    p = pair(make_file(24 * MiB), dst_args=("--oldstyle",), src_env=SHORT_LIMIT)
    with Relay(p.dst.port, faults=[fault]) as relay:
        started = time.monotonic()
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert_completed(p)
        conns = "\n".join(map(str, relay.connections))
        assert relay.connections[0].triggered, conns
        # (>= 2: a retry can come before the listener has noticed the broken session end,
        # and is then refused: listen mode takes one client at a time)
        assert len(relay.connections) >= 2, f"{conns}\n{logs(p.src, p.dst)}"
    assert time.monotonic() - started < 30
    assert _retried(p.src), p.src.log()
    # The broken session did not complete anything at the listener.
    assert "no migration completed" in p.dst.log()


@pytest.mark.parametrize("fault", [
    pytest.param(Fault(close_after_up=2 * MiB), id="drop-mid-payload"),
    pytest.param(Fault(stall_after_up=MiB), id="stall-sending"),
    pytest.param(None, id="hang-after-the-handshake"),
])
def test_relay_fault_newstyle(pair, tmp_path, fault):
    src_file = tmp_path / "src.img"
    sparse_file(src_file, 64 * MiB, pieces=64, piece=128 * KiB)
    p = pair(src_file, src_env=SHORT_LIMIT)
    if fault is None:
        # Measure the handshake of a clean connection, then stall replies right after it.
        with Relay(p.dst.port) as probe:
            with socket.create_connection(("127.0.0.1", probe.port)) as s:
                # (as the mirror does: it names its migration, a 32-character id, and so
                # negotiates the coverage context)
                client_handshake(s, migration_id="0" * 32)
                time.sleep(0.3)
                hs = probe.connections[0].down
                s.sendall(wire.pack_request(wire.CMD_DISC))
        assert hs > 0
        fault = Fault(stall_after_down=hs)
    with Relay(p.dst.port, faults=[fault]) as relay:
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert_completed(p)
        assert relay.connections[0].triggered
    assert _retried(p.src), p.src.log()


def test_destination_dies_then_break(pair, make_file):
    """The listener is killed during a slow migration: the source retries (connections are
    refused now) until `break`, then serves on, and a stop exits 0 (nothing is running)."""
    p = pair(make_file(16 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=2 * MiB) == "0: Mirror started\n"
    time.sleep(0.5)
    assert p.dst.stop() == 1, p.dst.log()         # listen mode, not completed: exit 1
    assert wait_until(lambda: _retried(p.src, 2), 30), p.src.log()
    assert cu.status(p.src.sock)["is_mirroring"] == "true"
    assert cu.stopped(cu.control(p.src.sock, "break"))
    still_serving(p.src)
    assert p.src.stop() == 0, p.src.log()


def test_sigterm_while_retrying_exits_1(pair, make_file):
    p = pair(make_file(8 * MiB), src_env=SHORT_LIMIT)
    with Relay(p.dst.port, default=Fault(reset_after_up=MiB)) as relay:
        assert mirror_request(p.src, relay.port) == "0: Mirror started\n"
        assert wait_until(lambda: _retried(p.src, 2), 30), p.src.log()
        assert p.src.stop() == 1, p.src.log()
    assert running(p.dst)
    assert cu.status(p.dst.sock)["has_control"] == "false"
    assert p.dst.stop() == 1


# --------------------------------------------------------------------------------------------
# senders that misbehave at a real listener: nothing completes, the listener waits on

SIZE = 2 * MiB


def fault_close_after_greeting(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        recv_exact(s, 18)


def fault_close_in_options(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))


def fault_mid_payload(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data, upto=SIZE // 2)
        s.sendall(wire.pack_request(wire.CMD_WRITE, SIZE // 2, SIZE // 2, COOKIE)
                  + data[SIZE // 2:SIZE // 2 + 100_000])


def fault_partial_write(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data, upto=SIZE // 2)


def fault_everything_but_disc(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data)


def fault_disc_without_coverage(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data, upto=SIZE - 512)
        assert _disc(s) == "reset"


def fault_disc_missing_a_middle_block(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data, upto=MiB)
        assert _request(s, wire.CMD_WRITE, MiB + 512, SIZE - MiB - 512, data[MiB + 512:]) == 0
        assert _disc(s) == "reset"


def fault_unaligned_pieces(port, data):
    """Unaligned pieces that leave one byte (offset 1000) unwritten."""
    s, _ = _sender(port)
    with s:
        assert _request(s, wire.CMD_WRITE, 0, 1000, data[:1000]) == 0
        assert _request(s, wire.CMD_WRITE, 1001, SIZE - 1001, data[1001:]) == 0
        assert _disc(s) == "reset"


def fault_bad_request_then_disc(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data)
        assert _request(s, 99) == wire.NBD_EINVAL
        assert _disc(s) == "reset"


def fault_write_beyond_the_end_then_disc(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data)
        assert _request(s, wire.CMD_WRITE, SIZE, 512, bytes(512)) == wire.NBD_ENOSPC
        assert _disc(s) == "reset"


def fault_bad_magic(port, data):
    s, _ = _sender(port)
    with s:
        _write_all(s, data)
        s.sendall(wire.pack_request(wire.CMD_DISC, cookie=COOKIE, magic=0x12345678))
        s.settimeout(15)
        try:
            while s.recv(4096):
                pass
        except ConnectionResetError:
            pass


def fault_nbdinfo(port, data):
    res = subprocess.run([require_tool("nbdinfo"), f"nbd://127.0.0.1:{port}"],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res


def fault_nbdinfo_map(port, data):
    res = subprocess.run([require_tool("nbdinfo"), "--map", f"nbd://127.0.0.1:{port}"],
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res


def fault_reads_only(port, data):
    s, _ = _sender(port)
    with s:
        s.sendall(wire.pack_request(wire.CMD_READ, 0, SIZE, COOKIE))
        recv_exact(s, REPLY + SIZE)
        assert _disc(s) == "reset"


SENDER_FAULTS = [fault_close_after_greeting, fault_close_in_options, fault_mid_payload,
                 fault_partial_write, fault_everything_but_disc, fault_disc_without_coverage,
                 fault_disc_missing_a_middle_block, fault_unaligned_pieces,
                 fault_bad_request_then_disc, fault_write_beyond_the_end_then_disc,
                 fault_bad_magic, fault_nbdinfo, fault_nbdinfo_map, fault_reads_only]


@pytest.mark.parametrize("fault", SENDER_FAULTS, ids=[f.__name__[6:] for f in SENDER_FAULTS])
def test_sender_fault_completes_nothing(pair, make_file, fault):
    p = pair(make_file(SIZE))
    data = p.src_file.read_bytes()
    before = len(p.dst.log())

    def logged() -> bool:
        new = p.dst.log()[before:]
        return "no migration completed" in new or "during the handshake" in new

    fault(p.dst.port, data)
    assert wait_until(lambda: logged() or not running(p.dst), 15), p.dst.log()
    assert running(p.dst), p.dst.log()
    assert wait_until(lambda: cu.status(p.dst.sock)["num_clients"] == "0", 15)
    assert cu.status(p.dst.sock)["has_control"] == "false"
    then_a_real_mirror_completes(p)


def test_sender_fault_then_sigterm_exits_1(start_server, make_file):
    dst = start_server(make_file(SIZE, random=False), mode="listen")
    data = os.urandom(SIZE)
    fault_disc_without_coverage(dst.port, data)
    assert wait_until(lambda: "no migration completed" in dst.log(), 15)
    assert dst.stop() == 1, dst.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_listener_stopped_mid_session_exits_1(start_server, make_file, sig):
    dst = start_server(make_file(SIZE, random=False), mode="listen")
    data = os.urandom(SIZE)
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, data, upto=SIZE // 2)
        assert dst.stop(sig) == 1, dst.log()


def test_sender_writes_and_zeroes_complete(start_server, make_file):
    """The good case of the same raw sender: WRITE for half, WRITE_ZEROES for the rest, then
    DISC: completed (exit 0)."""
    dst_file = make_file(SIZE)
    dst = start_server(dst_file, mode="listen")
    data = os.urandom(SIZE // 2) + bytes(SIZE // 2)
    s, info = _sender(dst.port)
    with s:
        assert info.has(wire.FLAG_SEND_WRITE_ZEROES)
        _write_all(s, data, upto=SIZE // 2, step=256 * KiB)
        assert _request(s, wire.CMD_WRITE_ZEROES, SIZE // 2, SIZE // 2) == 0
        assert _disc(s) == "closed"
    assert wait_exit(dst) == 0, dst.log()
    assert dst_file.read_bytes() == data


def test_sender_unaligned_pieces_that_cover_everything_complete(start_server, make_file):
    """SPEC 6.1: complete once the sender "has written every byte of the export at least
    once". Pieces of 300000 bytes (not multiples of 512) write every byte exactly once."""
    dst_file = make_file(SIZE)
    dst = start_server(dst_file, mode="listen")
    data = os.urandom(SIZE)
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, data, step=300_000)
        assert _disc(s) == "closed"
    assert wait_exit(dst, 15) == 0, dst.log()
    assert dst_file.read_bytes() == data


def test_second_sender_during_a_migration_is_refused(pair, make_file):
    """A second sender may shake hands (that holds no slot) but is refused once it is done,
    while the running migration's sender holds the slot; the migration completes."""
    p = pair(make_file(16 * MiB))
    # A mirror that finds the map unbuilt lets its first connection go and connects again
    # (SPEC §6.2): a second sender in between would rightly get the free slot.
    map_built(p.src)
    assert mirror_request(p.src, p.dst.port, max_bps=8 * MiB) == "0: Mirror started\n"
    assert wait_until(lambda: cu.status(p.dst.sock)["num_clients"] == "1", 10)
    for _ in range(3):
        with RawClient.connect(p.dst.port) as c:
            c.handshake()
            with pytest.raises((ServerClosed, ConnectionError)):
                c.write(0, b"x" * 4096)
    assert wait_until(lambda: cu.status(p.dst.sock)["num_clients"] == "1", 10)
    assert_completed(p)
    assert p.dst.log().count("a sender already holds the migration's slot") == 3


def test_listener_idle_sigterm_exits_1(start_server, make_file):
    dst = start_server(make_file(SIZE, random=False), mode="listen")
    assert dst.stop() == 1, dst.log()


def test_logs_of_a_retry(pair, make_file):
    """The retry is visible in the logs (warning level, not only with -v)."""
    p = pair(make_file(8 * MiB), src_env=SHORT_LIMIT)
    with Relay(p.dst.port, faults=[Fault(close_after_up=MiB)]) as relay:
        res = mirror_cli(p.src, relay.port)
        assert res.returncode == 0, out(res)
        assert_completed(p)
        assert len(relay.connections) >= 2
    text = p.src.log()
    assert ":W:" in text and "retrying" in text, text

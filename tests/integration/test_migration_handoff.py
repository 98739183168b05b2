"""The handoff at the end of a migration (SPEC §6.2, §6.7): completed means durable, confirmed
and fenced.

The source, after the last dirty range is answered, sends FLUSH and waits for its reply (error
0), checks that the connection is still open, sends DISC and waits for the destination's
orderly close (EOF), all within the request limit (FLEXNBD_MS_REQUEST_LIMIT_SECS, 2 s here).
Only that EOF is COMPLETED: then FILE is unlinked (`--unlink`) and the source exits 0.

- A failure before DISC (FLUSH answered with an error, never answered, or the connection
  closed or reset before DISC) is an ordinary failed attempt: the source retries from offset 0
  and completes against the next connection; FILE exists until then.
- After DISC (a reset, bytes instead of EOF, no close within the limit) the outcome is UNKNOWN:
  no retry, FILE kept, clients kept out, one critical log line, `mirror --wait` says so and
  exits 1, status says `migration_outcome=unknown`, and the source exits 1 by itself (action
  exit/unlink); with action `nothing` it reports the same and serves on.
- A real `flexnbd listen`: on DISC after full coverage it syncs, takes control, refuses new
  clients and only then closes the sender's socket normally; when the sync fails it resets the
  sender's socket and exits 1 (an LD_PRELOAD shim, tests/fakes/failsync.py, fails fdatasync);
  a DISC without full coverage is answered with a reset.

The scripted destinations are tests/fakes/fakedest.py (``on_flush``, ``after_last_reply``,
``on_disc``); its ``on_request`` hook takes a snapshot of the source (does FILE exist, its
status) at the moment a FLUSH or a DISC arrives, while the source waits for the answer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import FLEXNBD
from tests.fakes import failsync
from tests.fakes.fakedest import ConnRecord, FakeDest, Req, Script
from tests.fakes.relay import Fault, Relay
from tests.support import control as cu
from tests.support.migration import (
    MiB,
    _request,
    _sender,
    _write_all,
    logs,
    mirror_cli,
    mirror_request,
    out,
    running,
    same_files,
    wait_exit,
)
from tests.support.waiting import wait_until

LIMIT = 2.0
SHORT = {"FLEXNBD_MS_REQUEST_LIMIT_SECS": str(LIMIT)}
SIZE = 2 * MiB
COOKIE = wire.MIRROR_COOKIE
UNKNOWN = "migration outcome unknown"
ATTEMPT_FAILED = "mirror attempt failed"
DATA_CMDS = (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES)
OLD_GREETING = wire.OLDSTYLE_GREETING_SIZE
REPLY = wire.SIMPLE_REPLY_SIZE
_CMD_NAMES = {wire.CMD_READ: "READ", wire.CMD_WRITE: "WRITE", wire.CMD_DISC: "DISC",
              wire.CMD_FLUSH: "FLUSH", wire.CMD_TRIM: "TRIM",
              wire.CMD_WRITE_ZEROES: "WRITE_ZEROES"}
# Slack for comparing the times of two processes on one machine (both CLOCK_MONOTONIC).
SLACK = 0.25


# --------------------------------------------------------------------------------------------
# helpers

@dataclass
class Snapshot:
    """The source as it was when a FLUSH or a DISC reached the fake destination."""

    conn: int
    cmd: int
    file_exists: bool
    status: dict[str, str] | None


class Watcher:
    """FakeDest's ``on_request`` hook: a Snapshot of the source at every FLUSH and DISC."""

    def __init__(self, src: cu.Proc, src_file: Path) -> None:
        self.src = src
        self.src_file = src_file
        self.snaps: list[Snapshot] = []

    def __call__(self, rec: ConnRecord, req: Req) -> None:
        if req.type not in (wire.CMD_FLUSH, wire.CMD_DISC):
            return
        try:
            # Short: the source is waiting for this reply, under a 2 s limit.
            reply = cu.control(self.src.sock, "status", timeout=1.0)
            st = dict(p.split("=", 1) for p in reply[3:].split()) \
                if reply.startswith("0: ") else None
        except OSError:
            st = None
        self.snaps.append(Snapshot(rec.index, req.type, self.src_file.exists(), st))

    def at(self, cmd: int, conn: int | None = None) -> list[Snapshot]:
        return [s for s in self.snaps if s.cmd == cmd and (conn is None or s.conn == conn)]


def source(start_server, make_file, tmp_path, size: int = SIZE, env: dict | None = SHORT):
    """A serve source with a random file, a copy of that file (to compare with once FILE is
    unlinked) and an empty destination file of the same size."""
    src_file = make_file(size)
    copy = tmp_path / "copy.img"
    shutil.copyfile(src_file, copy)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    src = start_server(src_file, env=env)
    # A mirror started while the map is built connects once, lets go, and connects again when
    # it is ready: the tests here count the destination's connections.
    cu.wait_map_built(src)
    return src, src_file, copy, dst_file


def assert_handoff_order(rec: ConnRecord, disc: bool) -> None:
    """On this connection: FLUSH (cookie .MIRROR.) after the last WRITE/WRITE_ZEROES; then, if
    ``disc``, DISC as the very last request, else no DISC at all."""
    types = rec.types
    names = [_CMD_NAMES.get(t, str(t)) for t in types]
    assert wire.CMD_FLUSH in types, f"no FLUSH on connection {rec.index}: {names}"
    last_flush = len(types) - 1 - types[::-1].index(wire.CMD_FLUSH)
    data = [i for i, t in enumerate(types) if t in DATA_CMDS]
    assert data and max(data) < last_flush, f"a write after the FLUSH: {names}"
    assert rec.requests[last_flush].cookie == COOKIE
    if disc:
        assert rec.disc and types[-1] == wire.CMD_DISC, names
        assert types.count(wire.CMD_DISC) == 1, names
        assert last_flush < len(types) - 1, names
        assert rec.requests[-1].cookie == COOKIE
    else:
        assert not rec.disc and wire.CMD_DISC not in types, \
            f"DISC was sent on connection {rec.index}: {names}"


def exit_with_time(proc, timeout: float = 60.0) -> tuple[int, float]:
    """The exit status and (about) when it exited, by time.monotonic()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = proc.proc.poll()
        if rc is not None:
            return rc, time.monotonic()
        time.sleep(0.01)
    pytest.fail(f"did not exit in {timeout} s:\n{proc.log()}")


def critical_unknown_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ":F:" in line and UNKNOWN in line]


def fenced(port: int) -> bool:
    """A new NBD connection to the source is refused, or accepted and closed without a byte."""
    try:
        s = cu.connect("127.0.0.1", port, timeout=5)
    except (ConnectionRefusedError, ConnectionResetError):
        # (a reset: the connection reached the backlog as the listening socket was closed)
        return True
    with s:
        return cu.closed_without_a_byte(s, 5)


def mirror_wait_bg(src, port: int, *extra: str) -> subprocess.Popen:
    """`flexnbd mirror --wait` in the background (stdout, stderr piped)."""
    return subprocess.Popen(FLEXNBD + ["mirror", "--sock", str(src.sock), "--addr", "127.0.0.1",
                                       "--port", str(port), "--wait", *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"mirror --wait did not end: {stdout!r} {stderr!r}")
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def assert_unknown_at_source(src, src_file: Path, copy: Path) -> None:
    """What an UNKNOWN outcome leaves behind at a source that has exited."""
    text = src.log()
    assert src_file.exists(), f"FILE was unlinked although nobody confirmed:\n{text}"
    assert same_files(src_file, copy), "FILE changed"
    assert len(critical_unknown_lines(text)) == 1, text
    assert "migration completed" not in text.replace("no migration completed", ""), text


# --------------------------------------------------------------------------------------------
# the happy path: FLUSH, DISC, the destination's close; only then unlink

@pytest.mark.parametrize("style", ["oldstyle", "newstyle"])
def test_flush_disc_close_then_unlink(start_server, make_file, tmp_path, style):
    """FLUSH after the last write, DISC after its reply; when DISC arrives, FILE still exists
    and clients are kept out; after the destination's close the source unlinks and exits 0,
    and `mirror --wait` reports the completion."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    watch = Watcher(src, src_file)
    with FakeDest(SIZE, dst_file, default=Script(greeting=style), on_request=watch) as dest:
        rc, stdout, stderr = finish(mirror_wait_bg(src, dest.port, "--unlink"))
        assert (rc, "Mirror started" in stdout, "migration completed" in stdout) == \
            (0, True, True), (rc, stdout, stderr, src.log())
        assert wait_exit(src) == 0, src.log()
        assert len(dest.conns) == 1, dest.conns
        conn = dest.conns[0]
        assert_handoff_order(conn, disc=True)
        assert conn.covered
    for snap in watch.snaps:
        assert snap.file_exists, watch.snaps
        assert snap.status is not None and snap.status["clients_allowed"] == "false", snap
    assert len(watch.at(wire.CMD_DISC)) == 1, watch.snaps
    assert not src_file.exists()
    assert same_files(copy, dst_file)


def test_mirror_into_a_050_listener_sends_flush(start_server, make_file, tmp_path):
    """0.5.0's listener answers FLUSH: the handoff works with it, files identical."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    with FakeDest.old050(SIZE, dst_file) as dest:
        res = mirror_cli(src, dest.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert wait_exit(src) == 0, src.log()
        assert dest.wait(lambda: dest.completed, 10), dest.conns
        conn = dest.conns[-1]
        assert conn.unexpected == []
        assert conn.count(wire.CMD_WRITE_ZEROES) == 0
        assert_handoff_order(conn, disc=True)
    assert same_files(src_file, dst_file)


def _listener_failing_syncs(pair, make_file, tmp_path, skip: int, size: int = SIZE,
                            dst_args: tuple[str, ...] = ()):
    """A source of ``size`` bytes and a real listener (``dst_args``) whose syncs of its file
    fail with EIO after the first ``skip`` (tests/fakes/failsync.py; a huge ``skip``: none
    fails); (pair, source file, a copy of it, the sync log)."""
    lib = failsync.build(tmp_path)
    src_file = make_file(size)
    copy = tmp_path / "copy.img"
    shutil.copyfile(src_file, copy)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    synclog = tmp_path / "sync.log"
    p = pair(src_file, dst_file, dst_args=dst_args, src_env=SHORT,
             dst_env=failsync.environment(lib, dst_file, skip=skip, log=synclog))
    return p, src_file, copy, synclog


def test_real_listener_unlink_and_wait(pair, make_file, tmp_path):
    """Against a real listener: `mirror --wait --unlink` exits 0 with "migration completed",
    both ends exit 0, FILE is gone and the copy is whole. The listener (under the sync shim,
    failing nothing) synced its file at least twice: for the FLUSH and when it took control."""
    p, src_file, copy, synclog = _listener_failing_syncs(pair, make_file, tmp_path, skip=10**9)
    dst_file = p.dst_file
    rc, stdout, stderr = finish(mirror_wait_bg(p.src, p.dst.port, "--unlink"))
    assert rc == 0 and "migration completed" in stdout, (rc, stdout, stderr)
    assert (wait_exit(p.src), wait_exit(p.dst)) == (0, 0), logs(p.src, p.dst)
    assert not src_file.exists()
    assert same_files(copy, dst_file)
    calls = failsync.calls(synclog)
    assert len(calls) >= 2 and all(r == "ok" for _, _, r in calls), calls


# --------------------------------------------------------------------------------------------
# failures before DISC: an ordinary failed attempt, then a retry that completes

@pytest.mark.parametrize("style", ["oldstyle", "newstyle"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_closed_after_the_last_reply_then_retry(start_server, make_file, tmp_path, style, how):
    """The first destination connection ends right after the reply that completed the
    coverage (FIN in the same segment, or a reset): no DISC on it, no exit 0, FILE kept; the
    source retries from offset 0 and completes on the second connection."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    watch = Watcher(src, src_file)
    bad = Script(greeting=style, after_last_reply=how)
    with FakeDest(SIZE, dst_file, scripts=[bad], default=Script(greeting=style),
                  on_request=watch) as dest:
        res = mirror_cli(src, dest.port, "--unlink")
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert wait_exit(src) == 0, src.log()
        assert len(dest.conns) == 2, dest.conns
        first, second = dest.conns
        assert first.handoff_fired == f"after_last_reply={how}", first
        assert not first.disc, first
        assert second.requests[0].offset == 0
        assert_handoff_order(second, disc=True)
        assert second.covered
    assert ATTEMPT_FAILED in src.log(), src.log()
    assert all(s.file_exists for s in watch.snaps), watch.snaps
    assert not src_file.exists()
    assert same_files(copy, dst_file)


@pytest.mark.parametrize("on_flush", ["error", "hang", "close", "ok_close"])
def test_flush_fault_then_retry(start_server, make_file, tmp_path, on_flush):
    """FLUSH answered with EIO, never answered (the request limit), the connection closed
    instead of an answer, or answered and closed at once (the source must find it closed
    before DISC): a failed attempt, no DISC on it, FILE kept; the retry completes."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    watch = Watcher(src, src_file)
    with FakeDest(SIZE, dst_file, scripts=[Script(on_flush=on_flush)], default=Script(),
                  on_request=watch) as dest:
        res = mirror_cli(src, dest.port, "--unlink")
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert wait_exit(src) == 0, logs(src)
        assert len(dest.conns) == 2, dest.conns
        first, second = dest.conns
        assert first.handoff_fired == f"on_flush={on_flush}", first
        assert_handoff_order(first, disc=False)
        assert_handoff_order(second, disc=True)
        assert second.requests[0].offset == 0
        if on_flush == "hang":
            # The attempt failed only once the limit had passed, and the retry came after.
            assert first.flush_time is not None
            assert second.start_time >= first.flush_time + LIMIT - SLACK, \
                (second.start_time - first.flush_time)
    assert ATTEMPT_FAILED in src.log(), src.log()
    assert UNKNOWN not in src.log()
    # FILE was there at the FLUSH of both connections and at the final DISC.
    assert [s.file_exists for s in watch.snaps] == [True] * 3, watch.snaps
    assert not src_file.exists()
    assert same_files(copy, dst_file)


@pytest.mark.parametrize("fault", ["close", "reset", "stall"])
def test_relay_cut_after_the_last_reply_into_a_real_listener(pair, make_file, tmp_path, fault):
    """A relay in front of a real oldstyle listener forwards the greeting and the reply to the
    (only) WRITE of a 4 MiB file, then closes, resets, or swallows the FLUSH reply. The
    listener saw every byte but no DISC: nothing completed there; the source retries and
    completes through the relay's next connection. The listener runs under the sync shim
    (failing nothing) to show that the completing session sent FLUSH: it synced for it, and
    again when it took control."""
    size = 4 * MiB                     # one 4 MiB WRITE: one reply before the FLUSH
    p, src_file, copy, synclog = _listener_failing_syncs(pair, make_file, tmp_path, skip=10**9,
                                                         size=size, dst_args=("--oldstyle",))
    at = OLD_GREETING + REPLY
    cut = {"close": Fault(close_after_down=at), "reset": Fault(reset_after_down=at),
           "stall": Fault(stall_after_down=at)}[fault]
    with Relay(p.dst.port, faults=[cut]) as relay:
        res = mirror_cli(p.src, relay.port, "--unlink")
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert (wait_exit(p.src), wait_exit(p.dst)) == (0, 0), logs(p.src, p.dst)
        assert relay.connections[0].triggered, relay.connections
        assert len(relay.connections) >= 2, relay.connections
    text = p.dst.log()
    assert "no migration completed" in text and f"{size} of {size} bytes" in text, text
    assert ATTEMPT_FAILED in p.src.log()
    calls = failsync.calls(synclog)
    assert len(calls) >= 2 and all(r == "ok" for _, _, r in calls), calls
    assert not src_file.exists()
    assert same_files(copy, p.dst_file)


# --------------------------------------------------------------------------------------------
# failures after DISC: the outcome is unknown

@pytest.mark.parametrize("unlink", [False, True], ids=["exit", "unlink"])
@pytest.mark.parametrize("on_disc", ["reset", "junk"])
def test_reset_or_bytes_after_disc_is_unknown(start_server, make_file, tmp_path, on_disc,
                                              unlink):
    """The destination resets the connection after DISC, or sends bytes instead of closing:
    the source never retries, keeps FILE, logs one critical line, `mirror --wait` says
    "migration outcome unknown" and exits 1, and the source exits 1 by itself."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    watch = Watcher(src, src_file)
    with FakeDest(SIZE, dst_file, default=Script(on_disc=on_disc), on_request=watch) as dest:
        waiter = mirror_wait_bg(src, dest.port, *(["--unlink"] if unlink else []))
        rc, stdout, stderr = finish(waiter)
        assert "Mirror started" in stdout, (rc, stdout, stderr)
        assert (rc, UNKNOWN in stderr) == (1, True), (rc, stdout, stderr, src.log())
        assert wait_exit(src, 30) == 1, src.log()
        assert len(dest.conns) == 1, dest.conns        # never retried after DISC
        assert_handoff_order(dest.conns[0], disc=True)
        assert dest.conns[0].covered
    assert_unknown_at_source(src, src_file, copy)
    disc = watch.at(wire.CMD_DISC)
    assert len(disc) == 1 and disc[0].file_exists, watch.snaps
    assert disc[0].status is not None and disc[0].status["clients_allowed"] == "false", disc


def test_no_close_after_disc_is_unknown_after_the_limit(start_server, make_file, tmp_path):
    """The destination holds the connection open after DISC: while it does, FILE exists, new
    clients are kept out and the source has not exited; once the limit has passed the
    outcome is unknown: the source exits 1 and keeps FILE, `mirror --wait` says so."""
    limit = 3.0
    src, src_file, copy, dst_file = source(
        start_server, make_file, tmp_path, env={"FLEXNBD_MS_REQUEST_LIMIT_SECS": str(limit)})
    with FakeDest(SIZE, dst_file, default=Script(on_disc="hold")) as dest:
        waiter = mirror_wait_bg(src, dest.port, "--unlink")
        try:
            assert dest.wait(lambda: dest.conns and dest.conns[0].disc, 30), \
                (dest.conns, src.log())
            disc_time = dest.conns[0].disc_time
            assert disc_time is not None
            # Within the limit: nothing decided yet, nothing given away.
            assert running(src), src.log()
            assert src_file.exists()
            st = cu.status(src.sock)
            assert st["clients_allowed"] == "false", st
            assert "migration_outcome" not in st, st
            assert fenced(src.port)
            assert time.monotonic() < disc_time + limit - SLACK, "the checks took too long"
            assert running(src), src.log()
            rc, when = exit_with_time(src, 30)
        finally:
            wait_rc, stdout, stderr = finish(waiter)
        assert rc == 1, src.log()
        assert when >= disc_time + limit - SLACK, (when - disc_time, src.log())
        assert len(dest.conns) == 1, dest.conns
        assert_handoff_order(dest.conns[0], disc=True)
    assert (wait_rc, UNKNOWN in stderr) == (1, True), (wait_rc, stdout, stderr)
    assert_unknown_at_source(src, src_file, copy)


def test_unknown_with_action_nothing_keeps_serving(start_server, make_file, tmp_path):
    """Action `nothing` asked for two copies: a reset after DISC is reported as unknown
    (status, `break`, the critical line) but the source allows clients again and serves on,
    and does not retry."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    with FakeDest(SIZE, dst_file, default=Script(on_disc="reset")) as dest:
        assert mirror_request(src, dest.port, "nothing") == "0: Mirror started\n"
        assert wait_until(lambda: "migration_outcome" in cu.status(src.sock), 30), src.log()
        st = cu.status(src.sock)
        assert st["migration_outcome"] == "unknown", st
        assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
        time.sleep(1.5)                               # longer than the retry delay
        assert len(dest.conns) == 1, dest.conns
        assert_handoff_order(dest.conns[0], disc=True)
    assert running(src), src.log()
    with cu.connect("127.0.0.1", src.port) as s:
        assert cu.greets(s)
    assert cu.control(src.sock, "break") == f"1: {UNKNOWN}\n"
    assert cu.status(src.sock)["migration_outcome"] == "unknown"
    assert len(critical_unknown_lines(src.log())) == 1, src.log()
    assert same_files(src_file, copy)


def test_action_nothing_completed_status(start_server, make_file, tmp_path):
    """The status key of a mirror that completed with action `nothing`."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    assert "migration_outcome" not in cu.status(src.sock)
    with FakeDest(SIZE, dst_file) as dest:
        assert mirror_request(src, dest.port, "nothing") == "0: Mirror started\n"
        assert wait_until(lambda: "migration_outcome" in cu.status(src.sock), 30), src.log()
        assert_handoff_order(dest.conns[0], disc=True)
    st = cu.status(src.sock)
    assert (st["migration_outcome"], st["clients_allowed"]) == ("completed", "true"), st
    assert same_files(src_file, dst_file)


# --------------------------------------------------------------------------------------------
# a real listener whose sync fails (LD_PRELOAD shim)

def test_real_listener_sync_fails_after_disc(pair, make_file, tmp_path):
    """The listener's syncs of its file: the 1st is the FLUSH (it passes), the 2nd is its own
    sync at DISC, when it takes control (it fails, EIO). The listener must then reset the
    sender's socket and exit 1, and the source, which had sent DISC, must treat the reset as
    an unknown outcome: exit 1 by itself, FILE kept. (This covers the path after DISC; the
    next test covers a FLUSH that fails.)"""
    p, src_file, copy, synclog = _listener_failing_syncs(pair, make_file, tmp_path, skip=1)
    rc, stdout, stderr = finish(mirror_wait_bg(p.src, p.dst.port, "--unlink"))
    assert (rc, UNKNOWN in stderr) == (1, True), (rc, stdout, stderr, logs(p.src, p.dst))
    assert wait_exit(p.dst) == 1, p.dst.log()
    assert wait_exit(p.src) == 1, p.src.log()
    calls = failsync.calls(synclog)
    assert [r for _, _, r in calls][:2] == ["ok", "EIO"], calls
    assert_unknown_at_source(p.src, src_file, copy)
    assert "migration completed:" not in p.dst.log(), p.dst.log()


def test_real_listener_flush_fails(pair, make_file, tmp_path):
    """Every sync of the listener's file fails, so the source's FLUSH is answered with an
    error: the attempt fails before DISC and is retried. The listener, whose I/O error is
    sticky (no FLUSH of it can succeed again), ends after that session with exit status 1
    instead of refusing every later sender's FLUSH for ever; the source's next attempts find
    no one and are retried; nothing completes anywhere, FILE stays, `break` stops the mirror
    and the source serves on."""
    p, src_file, copy, synclog = _listener_failing_syncs(pair, make_file, tmp_path, skip=0)
    res = mirror_cli(p.src, p.dst.port, "--unlink")
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert wait_exit(p.dst, 30) == 1, logs(p.src, p.dst)
    assert "cannot vouch for the file" in p.dst.log()
    assert wait_until(lambda: p.src.log().count(ATTEMPT_FAILED) >= 2, 30), logs(p.src, p.dst)
    assert running(p.src), logs(p.src, p.dst)
    assert src_file.exists()
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true" and "migration_outcome" not in st, st
    assert cu.stopped(cu.control(p.src.sock, "break"))
    st = cu.status(p.src.sock)
    assert (st["clients_allowed"], st.get("migration_outcome")) == ("true", "stopped"), st
    calls = failsync.calls(synclog)
    # (>= 1: once a sync failed the listener fails every later FLUSH without syncing, §11)
    assert calls and all(r == "EIO" for _, _, r in calls), calls
    text = p.src.log()
    assert UNKNOWN not in text, text
    assert same_files(src_file, copy)
    assert p.dst.stop() == 1, p.dst.log()
    assert p.src.stop() == 0, p.src.log()


# --------------------------------------------------------------------------------------------
# the listener's side, with a raw sender

def _disc_and_read(s: socket.socket) -> str:
    """Send DISC, then read: "eof" (an orderly close), "reset", or "bytes"."""
    s.sendall(wire.pack_request(wire.CMD_DISC, cookie=COOKIE))
    s.settimeout(15)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return "reset"
    return "bytes" if data else "eof"


def test_listener_resets_a_disc_without_coverage_and_closes_after_taking_control(
        start_server, make_file):
    """A DISC without full coverage is answered with a reset (never a normal close before the
    listener took control), and the listener waits for the next sender. A sender that then
    covers everything gets, after its DISC, an orderly close; by then the listener refuses new
    clients; it exits 0 with the data."""
    dst_file = make_file(SIZE, random=False)
    dst = start_server(dst_file, mode="listen")
    data = os.urandom(SIZE)
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, data, upto=SIZE // 2)
        assert _disc_and_read(s) == "reset"
    assert wait_until(lambda: "no migration completed" in dst.log(), 15), dst.log()
    assert running(dst) and cu.status(dst.sock)["has_control"] == "false"
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, data)
        assert _request(s, wire.CMD_FLUSH) == 0
        assert _disc_and_read(s) == "eof"
        assert fenced(dst.port)
    assert wait_exit(dst) == 0, dst.log()
    assert dst_file.read_bytes() == data


def test_listener_sync_failure_resets_the_sender(start_server, make_file, tmp_path):
    """A raw sender covers everything and sends DISC (no FLUSH, so the listener's first sync
    of its file is the one at DISC, and it fails): the sender's socket is reset, the listener
    exits 1."""
    lib = failsync.build(tmp_path)
    dst_file = make_file(SIZE, random=False)
    synclog = tmp_path / "sync.log"
    dst = start_server(dst_file, mode="listen",
                       env=failsync.environment(lib, dst_file, skip=0, log=synclog))
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, os.urandom(SIZE))
        assert _disc_and_read(s) == "reset"
    assert wait_exit(dst) == 1, dst.log()
    calls = failsync.calls(synclog)
    assert calls and all(r == "EIO" for _, _, r in calls), calls


# --------------------------------------------------------------------------------------------
# the greeting

def test_bad_magic_is_rejected_once(start_server, make_file):
    """A destination whose greeting has an unknown magic: "Mirror was rejected", one
    connection only, and the source read the greeting before closing (no reset)."""
    src = start_server(make_file(SIZE), env=SHORT)
    with FakeDest(SIZE, default=Script(greeting="badmagic")) as dest:
        res = mirror_cli(src, dest.port)
        assert (res.returncode, res.stdout, res.stderr) == \
            (1, b"", b"Mirror was rejected\nno NBD greeting: its first bytes are not NBD's "
                     b"magic (is it an NBD server?)\n"), out(res)
        time.sleep(1.5)                                  # longer than the retry delay
        assert len(dest.conns) == 1, dest.conns
        assert dest.wait(lambda: dest.conns[0].ended, 5)
        assert not dest.conns[0].peer_reset, dest.conns[0]
    st = cu.status(src.sock)
    assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    assert st.get("migration_outcome") == "failed", st


def test_a_later_attempt_meets_a_bad_magic(start_server, make_file, tmp_path):
    """The first attempt fails before DISC; the retry meets a peer that is not NBD: the mirror
    ends there ("Mirror was rejected" to `mirror --wait`), without more retries; the source
    serves on with FILE."""
    src, src_file, copy, dst_file = source(start_server, make_file, tmp_path)
    scripts = [Script(after_last_reply="close")]
    with FakeDest(SIZE, dst_file, scripts=scripts, default=Script(greeting="badmagic")) as dest:
        rc, stdout, stderr = finish(mirror_wait_bg(src, dest.port, "--unlink"))
        assert (rc, stderr.splitlines()[-2:]) == \
            (1, ["Mirror was rejected",
                 "no NBD greeting: its first bytes are not NBD's magic (is it an NBD server?)"]), \
            (rc, stdout, stderr)
        time.sleep(1.5)
        assert len(dest.conns) == 2, dest.conns
        assert not dest.conns[0].disc
    assert running(src), src.log()
    st = cu.status(src.sock)
    assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    assert st.get("migration_outcome") == "failed", st
    assert src_file.exists() and same_files(src_file, copy)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_listener_that_dies_before_taking_control_never_closes_normally(start_server, make_file,
                                                                        sig):
    """SPEC §6.7: the listener never closes a sender's socket normally before it has taken
    control. A sender has covered everything and its FLUSH was answered; before its DISC the
    listener is stopped (SIGTERM) or dies (SIGKILL: the kernel closes its sockets). The sender
    must see a reset, never an orderly close: a source that sent DISC in that window takes an
    orderly close for the destination's confirmation (and unlinks)."""
    dst = start_server(make_file(SIZE, random=False), mode="listen")
    s, _ = _sender(dst.port)
    with s:
        _write_all(s, os.urandom(SIZE))
        assert _request(s, wire.CMD_FLUSH) == 0
        dst.signal(sig)
        s.settimeout(15)
        try:
            got = "bytes" if s.recv(4096) else "eof"
        except ConnectionResetError:
            got = "reset"
    assert wait_exit(dst) != 0, dst.log()
    assert got == "reset", dst.log()

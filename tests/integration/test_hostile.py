"""Hostile and faulty peers (issue 11, SPEC §11 "Trust boundaries"): no peer exhausts, fools or
commands the server, and no acknowledged write is lost. One regression test (or a few) per item
of the issue, numbered as there:

 1. half-closed clients count until their thread ends; send timeout; per-address limit
 2. the killswitch covers a request's reply
 3. one deadline for the whole handshake (slowloris), in the server and the proxy
 4. accept under EMFILE: no busy loop, no log flood (the server and the proxy)
 5. listen mode: bounded partial-coverage memory (EINVAL beyond it)
 6. at most 16 mirror_wait requests wait at once
 7. listen mode admits no one once the migration completed
 8. an ACL with --unix and no TCP is a start-up error
 9. BLOCK_STATUS never sends a chunk without extents
10. control socket 0600 / --sock-mode, SO_PEERCRED, --unix mode 0660, start-up race
11. a sticky I/O error: every later FLUSH and FUA write fails, status shows io_error=true
12. a FUA zero-write into a hole is durable before its reply
13. a failed eventfd in Connection() never closes descriptor 0
14. flexnbd-proxy: the next client waits in the backlog instead of being refused

All traffic stays on 127.0.0.0/8: the misbehaving peers connect from 127.0.0.2 (and .3),
honest clients from 127.0.0.1. Every wait is bounded; every process and socket is cleaned up.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import FLEXNBD, FlexnbdProcess, free_port
from tests.fakes import slowprobe, syncspy
from tests.support import control as cu
from tests.support.hostile import (
    fd_count,
    half_closed_reader,
    map_built,
    raw_connect,
    rss_kib,
    settled_count,
    task_count,
)
from tests.support.migration import mirror_request, wait_exit
from tests.support.rawclient import RawClient, ServerClosed
from tests.support.waiting import wait_until as wait_for

KiB = 1 << 10
MiB = 1 << 20
READ, WRITE, DISC, FLUSH, TRIM, BLOCK_STATUS = (
    wire.CMD_READ, wire.CMD_WRITE, wire.CMD_DISC, wire.CMD_FLUSH, wire.CMD_TRIM,
    wire.CMD_BLOCK_STATUS)
EIO, EINVAL = wire.NBD_EIO, wire.NBD_EINVAL
FUA, DF = wire.CMD_FLAG_FUA, wire.CMD_FLAG_DF

HONEST = "127.0.0.1"
HOSTILE = "127.0.0.2"
HOSTILE2 = "127.0.0.3"


# --------------------------------------------------------------------------------------------
# helpers

def content(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def admitted(port: int, bind: str | None = None, timeout: float = 15.0, rcvbuf: int | None = None,
             **handshake: object) -> RawClient:
    """A client that is let in and has done the handshake. A connection closed at once without
    a byte is retried: a connection that just ended counts until its server thread has ended
    (the fixture's readiness probe, the previous sender...)."""
    deadline = time.monotonic() + timeout
    while True:
        c = raw_connect(port, bind, rcvbuf=rcvbuf)
        try:
            c.handshake(**handshake)  # type: ignore[arg-type]
            return c
        except ServerClosed as e:
            c.close()
            assert e.got == b"", f"closed part-way through the greeting ({e.got!r})"
            if time.monotonic() > deadline:
                raise AssertionError(f"not let in from {bind or HONEST} in {timeout} s") from None
            time.sleep(0.05)
        except BaseException:
            c.close()
            raise


def refused(port: int, bind: str | None = None, timeout: float = 10.0) -> bool:
    """A new connection is accepted and closed at once with nothing written. (False if the
    server greets it; a socket timeout if it keeps it open silently.)"""
    c = raw_connect(port, bind, timeout=timeout)
    with c:
        return cu.closed_without_a_byte(c.sock, timeout)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LOG_LINE = re.compile(r"^\d+:[DIWEF]:\d+ \S+ \S+:\d+: (.*)$")


def log_lines(server, text: str) -> list[str]:
    """The log lines whose message says ``text``: not in the line's prefix (a thread may be
    called "accept"), nor in a file path (a test's tmp path holds its name, which may contain
    the very word)."""
    out = []
    for line in server.log().splitlines():
        m = LOG_LINE.match(line)
        message = m.group(1) if m else line
        if text in re.sub(r"/\S+", "", message):
            out.append(line)
    return out


def log_count(server, text: str) -> int:
    return len(log_lines(server, text))


def close_all(clients) -> None:
    for c in clients:
        c.close()


# --------------------------------------------------------------------------------------------
# 1. half-closed clients, the send timeout, the per-address limit

def client_threads(server, base: int) -> int:
    """Threads of the server beyond the ``base`` it had with no client."""
    return task_count(server.pid) - base


def client_threads_settle_at_most(server, base: int, most: int) -> int:
    """The server's client threads, once at most ``most`` (or after 3 s): a thread that has
    left its client's slot may still be a moment away from its end."""
    wait_for(lambda: client_threads(server, base) <= most, 3)
    return client_threads(server, base)


def test_half_closed_clients_from_one_address_hold_at_most_half(serve, make_file):
    """Clients that pipeline big READs, shut down their sending side and never read: their
    threads are stuck sending, and they keep counting. One address gets at most 8 of the 16
    slots: of 20 such connections from 127.0.0.2, the 9th and later are refused ("from that
    address"), or else the server has ended the stuck ones first; either way no more than 8
    client threads exist at once, and an honest client from 127.0.0.1 connects and reads
    correctly meanwhile."""
    path = make_file(64 * MiB)
    server = serve(path)
    map_built(server)
    base = settled_count(task_count, server.pid)
    stuck, outcomes = [], []
    try:
        for i in range(20):
            try:
                stuck.append(half_closed_reader(server.port, HOSTILE))
                outcomes.append("in")
            except ServerClosed as e:
                assert e.got == b"", f"closed part-way through the greeting ({e.got!r})"
                outcomes.append("refused")
            most = client_threads_settle_at_most(server, base, 8)
            assert most <= 8, f"{most} client threads after {i + 1} half-closed clients " \
                f"from {HOSTILE} ({outcomes}):\n{server.log()}"
        assert outcomes[:8] == ["in"] * 8, outcomes
        if "refused" in outcomes:
            assert log_count(server, "from that address") >= 1, server.log()
        # Another address is not locked out.
        with admitted(server.port, HONEST) as honest:
            assert honest.read(5 * MiB + 123, 300 * KiB) == content(path, 5 * MiB + 123,
                                                                     300 * KiB)
            assert client_threads_settle_at_most(server, base, 9) <= 9
            honest.disconnect()
    finally:
        close_all(stuck)
    assert server.proc.poll() is None, server.log()


def test_ninth_connection_from_one_address_is_refused(serve, make_file):
    """Eight idle clients (handshake done, nothing hung up) from 127.0.0.2: a 9th from there is
    accepted and closed at once with nothing written, logged "from that address"; the eight
    go on working, and another address is let in."""
    path = make_file(4 * MiB)
    server = serve(path)
    idle = []
    try:
        for _ in range(8):
            idle.append(admitted(server.port, HOSTILE))
        for _ in range(3):
            assert refused(server.port, HOSTILE), \
                f"a 9th connection from {HOSTILE} was let in:\n{server.log()}"
        assert wait_for(lambda: log_count(server, "from that address") >= 3, 5), server.log()
        for i, c in enumerate(idle):
            assert c.read(i * 4096, 4096) == content(path, i * 4096, 4096)
        with admitted(server.port, HOSTILE2) as other:
            assert other.read(0, 4096) == content(path, 0, 4096)
            other.disconnect()
        idle.pop().disconnect()           # one leaves: room for one more from 127.0.0.2
        idle.append(admitted(server.port, HOSTILE, timeout=10))
    finally:
        close_all(idle)


def test_descriptors_and_threads_return_after_clients_leave(serve, make_file):
    """A client that stayed a few seconds (long enough for the server's watchdog to see it) and
    left: the server's threads and descriptors return to their starting values (nothing keeps
    its connection, with its eventfd, pipe and buffers, alive)."""
    path = make_file(4 * MiB)
    server = serve(path, env={"FLEXNBD_HANDSHAKE_TIMEOUT": "2"})
    map_built(server)
    threads, fds = settled_count(task_count, server.pid), settled_count(fd_count, server.pid)
    for i in range(2):
        with admitted(server.port, HONEST) as c:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                assert c.read(i * 4096, 4096) == content(path, i * 4096, 4096)
                time.sleep(0.1)
            c.disconnect()
    back = wait_for(lambda: (task_count(server.pid), fd_count(server.pid)) == (threads, fds), 10)
    listing = sorted(os.readlink(f"/proc/{server.pid}/fd/{fd}")
                     for fd in os.listdir(f"/proc/{server.pid}/fd"))
    assert back, f"threads {threads} -> {task_count(server.pid)}, descriptors {fds} -> " \
        f"{fd_count(server.pid)}: {listing}"


def test_max_clients_admits_n_refuses_the_next_and_frees_all(serve, make_file):
    """--max-clients 24 (all from one address, so the per-address limit is lifted too): 24
    clients are served, the 25th is refused ("already 24 clients"), and once they have left the
    server's threads and descriptors return to their idle counts."""
    path = make_file(4 * MiB)
    server = serve(path, "--max-clients", "24", "--max-clients-per-address", "24")
    map_built(server)
    threads, fds = settled_count(task_count, server.pid), settled_count(fd_count, server.pid)
    clients = []
    try:
        for _ in range(24):
            clients.append(admitted(server.port, HONEST))
        assert refused(server.port, HONEST), f"a 25th client was let in:\n{server.log()}"
        assert wait_for(lambda: log_count(server, "already 24 clients") >= 1, 5), server.log()
        for i, c in enumerate(clients):
            assert c.read(i * 4096, 4096) == content(path, i * 4096, 4096)
        assert client_threads(server, threads) >= 24
        for c in clients:
            c.disconnect()
    finally:
        close_all(clients)
    back = wait_for(lambda: (task_count(server.pid), fd_count(server.pid)) == (threads, fds), 10)
    assert back, f"threads {threads} -> {task_count(server.pid)}, descriptors {fds} -> " \
        f"{fd_count(server.pid)}"


def test_half_closed_clients_count_against_the_sixteen(serve, make_file):
    """Sixteen stuck half-closed clients (eight from each of two addresses) fill the server:
    a 17th, from a third address, is refused until one of their threads has ended (or is let
    in only once the server has ended stuck ones): never more than 16 client threads."""
    path = make_file(64 * MiB)
    server = serve(path)
    map_built(server)
    base = settled_count(task_count, server.pid)
    first, second = [], []
    honest = None
    try:
        for _ in range(8):
            first.append(half_closed_reader(server.port, HOSTILE))
        for _ in range(8):
            second.append(half_closed_reader(server.port, HOSTILE2))
        assert wait_for(lambda: client_threads(server, base) == 16, 3), \
            client_threads(server, base)
        c = raw_connect(server.port, HONEST)
        try:
            c.handshake()
            honest = c
        except ServerClosed as e:
            assert e.got == b""
            c.close()
        most = client_threads_settle_at_most(server, base, 16)
        assert most <= 16, f"{most} client threads: the 17th client was let in while 16 " \
            f"threads were busy:\n{server.log()}"
        if honest is None:                 # refused: room once some threads have ended
            close_all(first)
            honest = admitted(server.port, HONEST, timeout=20)
        assert honest.read(0, 64 * KiB) == content(path, 0, 64 * KiB)
        honest.disconnect()
    finally:
        close_all(first + second + ([honest] if honest else []))


def test_stuck_senders_are_dropped_after_the_send_timeout(serve, make_file):
    """FLEXNBD_SEND_TIMEOUT=2: a reply that makes no progress for 2 s drops its client with
    one "no progress sending" line each, and the server's threads go back to where they
    were."""
    path = make_file(64 * MiB)
    server = serve(path, env={"FLEXNBD_SEND_TIMEOUT": "2"})
    map_built(server)
    start = settled_count(task_count, server.pid)
    stuck = []
    try:
        for _ in range(6):
            stuck.append(half_closed_reader(server.port, HOSTILE))
        peak = task_count(server.pid)
        dropped = wait_for(lambda: log_count(server, "no progress sending") >= 6, 20)
        assert dropped, f"stuck clients not dropped within 20 s (threads {start} -> " \
            f"{task_count(server.pid)}):\n{server.log()}"
        assert wait_for(lambda: task_count(server.pid) == start, 10), \
            f"threads: {start} at the start, {peak} with 6 stuck, " \
            f"{task_count(server.pid)} after they were dropped"
        assert log_count(server, "no progress sending") == 6, server.log()
        with admitted(server.port, HONEST) as honest:
            assert honest.read(MiB, MiB) == content(path, MiB, MiB)
            honest.disconnect()
    finally:
        close_all(stuck)


def test_listen_mode_half_closed_sender_holds_the_one_slot(start_server, tmp_path):
    """Listen mode: a half-closed sender that reads nothing holds the one slot until its
    thread ends: a second sender from elsewhere may shake hands (that takes no slot) but is
    refused meanwhile (or let in only once the first one's thread has ended: never two sender
    threads); once the send timeout drops the stuck one ("no progress sending"), the next
    sender is let in."""
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(64 * MiB)
    server = start_server(dst, mode="listen", env={"FLEXNBD_SEND_TIMEOUT": "3"})
    map_built(server)
    # The readiness probe of the fixture counts until its thread ends: retry the first one.
    holder = admitted(server.port, HOSTILE)
    holder.close()
    assert wait_for(lambda: cu.status(server.sock)["num_clients"] == "0", 10)
    base = settled_count(task_count, server.pid)
    holder = half_closed_reader(server.port, HOSTILE, reads=3)
    second = None
    try:
        time.sleep(0.3)
        assert wait_for(lambda: client_threads(server, base) == 1, 3), \
            client_threads(server, base)
        c = raw_connect(server.port, HOSTILE2)
        try:
            c.handshake()
            assert c.read(0, 4096) == bytes(4096)   # (only once the holder's thread ended)
            second = c
        except (ServerClosed, ConnectionError):
            c.close()
            assert "a sender already holds the migration's slot" in server.log() or \
                log_count(server, "no progress sending") >= 1, server.log()
        most = client_threads_settle_at_most(server, base, 1)
        assert most <= 1, f"{most} sender threads in listen mode: a second sender was let " \
            f"in while the first one's thread runs:\n{server.log()}"
        if second is None:
            assert wait_for(lambda: log_count(server, "no progress sending") >= 1, 20), \
                server.log()
            second = admitted(server.port, HOSTILE2, timeout=10)
        assert second.read(0, 4096) == bytes(4096)
    finally:
        holder.close()
        if second is not None:
            second.close()
    assert server.proc.poll() is None, server.log()


# --------------------------------------------------------------------------------------------
# 2. the killswitch covers the reply

def test_killswitch_covers_replies_that_cannot_be_sent(serve, make_file):
    """-k with FLEXNBD_KILLSWITCH_SECS=2 (and a 60 s send timeout, so that one cannot be what
    acts): a client that pipelines READs and never reads its replies is cut by the killswitch.

    The READs are small (copied into the reply batch) and come in rounds that each fit one
    batch, so the send that blocks is the batch's final flush, after the last request of the
    round was handled: the request's clock must still run then. Other clients carry on."""
    path = make_file(16 * MiB)
    server = serve(path, "-k", env={"FLEXNBD_KILLSWITCH_SECS": "2",
                                    "FLEXNBD_SEND_TIMEOUT": "60"})
    victim = admitted(server.port, HOSTILE, rcvbuf=65536)
    try:
        victim.sock.settimeout(1.0)
        cookie = 0
        for _round in range(100):
            batch = []
            for _ in range(15):              # 15 * (16 + 16 KiB) < the 256 KiB batch
                cookie += 1
                batch.append(victim.pack(READ, (cookie * 16 * KiB) % (16 * MiB), 16 * KiB,
                                         cookie=cookie))
            try:
                victim.send(b"".join(batch))
            except (TimeoutError, OSError):
                break                        # the server stopped reading: it is stuck
            if log_count(server, "killswitch") >= 1:
                break
            time.sleep(0.02)
        # Meanwhile, an honest client is served.
        with admitted(server.port, HONEST) as honest:
            assert honest.read(MiB, 64 * KiB) == content(path, MiB, 64 * KiB)
            assert wait_for(lambda: log_count(server, "killswitch") >= 1, 20), \
                f"the killswitch did not cut a client whose replies cannot be sent:\n" \
                f"{server.log()}"
            assert honest.read(2 * MiB, 64 * KiB) == content(path, 2 * MiB, 64 * KiB)
            honest.disconnect()
    finally:
        victim.close()
    assert server.proc.poll() is None, server.log()


# --------------------------------------------------------------------------------------------
# 3. handshake slowloris

LATE = {"serve": "handshake not done in 2 s; disconnected it",
        "proxy": "handshake not finished in 2 s: disconnected"}


@pytest.mark.parametrize("kind", ["serve", "proxy"])
def test_handshake_has_one_deadline_for_the_whole_handshake(serve, proxy, make_file, kind):
    """FLEXNBD_HANDSHAKE_TIMEOUT=2: a client that sends one byte of its option every 1.2 s
    (each recv would be well within a per-recv timeout) is dropped at about 2 s, by the
    server and by the proxy alike (one listener, one deadline), which say so once."""
    env = {"FLEXNBD_HANDSHAKE_TIMEOUT": "2"}
    server = serve(make_file(MiB), env=env)
    if kind == "proxy":
        server = proxy(server.port, env=env)
    c = raw_connect(server.port, HOSTILE)
    started = time.monotonic()
    closed_at = None
    option = struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, 200)
    try:
        assert c.read_greeting().style == "newstyle"
        c.send(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
        for i in range(8):                     # bounded: about 10 s on a server that never cuts
            try:
                c.send(option[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            if c.is_closed_by_server(1.2):
                closed_at = time.monotonic()
                break
    finally:
        c.close()
    assert closed_at is not None, \
        f"a slowloris handshake was still open after {time.monotonic() - started:.1f} s"
    took = closed_at - started
    assert 1.5 < took < 4.0, f"dropped after {took:.2f} s (deadline 2 s)"
    # The server itself is fine.
    with admitted(server.port, HONEST) as honest:
        honest.disconnect()
    assert log_count(server, LATE[kind]) == 1, server.log()


# --------------------------------------------------------------------------------------------
# 4. accept under EMFILE

def assert_no_busy_loop(proc) -> None:
    """Out of descriptors with connections waiting: over 3 s (after 0.5 s to settle) the
    process lives and uses far less CPU than a loop retrying accept() would."""
    time.sleep(0.5)
    cpu_before = cpu_seconds(proc.pid)
    time.sleep(3.0)
    cpu = cpu_seconds(proc.pid) - cpu_before
    assert proc.proc.poll() is None, proc.log()
    assert cpu < 0.5, f"{cpu:.2f} s of CPU in 3 s while out of descriptors"


def test_accept_out_of_descriptors_does_not_spin(serve, make_file):
    """With its descriptors exhausted (a low RLIMIT_NOFILE, connections held open) and more
    connections waiting in the backlog, the server neither spins (CPU time over 3 s stays well
    under a busy loop) nor floods the log; once the holders leave, a new client is served."""
    path = make_file(MiB)
    server = serve(path)
    map_built(server)
    pid = server.pid
    in_use = settled_count(fd_count, pid)
    limit = in_use + 6
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))
    holders, extras = [], []
    try:
        for _ in range(6):                     # each takes one descriptor (in the handshake)
            holders.append(raw_connect(server.port, HOSTILE))
        assert wait_for(lambda: fd_count(pid) >= limit, 10), \
            f"the holders did not use up the descriptors ({fd_count(pid)} of {limit})"
        for _ in range(8):                     # these wait in the backlog: accept() fails
            extras.append(raw_connect(server.port, HOSTILE2))
        assert_no_busy_loop(server)
    finally:
        close_all(holders + extras)
    with admitted(server.port, HONEST, timeout=20) as honest:
        assert honest.read(4096, 8192) == content(path, 4096, 8192)
        honest.disconnect()
    accept_lines = log_lines(server, "accept") + log_lines(server, "Accept")
    assert 1 <= len(accept_lines) <= 5, f"{len(accept_lines)} accept lines (logged once per " \
        "burst of failures):\n" + "\n".join(accept_lines[:20])
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_proxy_accept_out_of_descriptors_does_not_spin(serve, proxy, make_file):
    """The proxy accepts with the server's loop: out of descriptors (a RLIMIT_NOFILE at what it
    has open), a waiting client costs no busy loop and one log line, and is served once
    descriptors are free again."""
    path = make_file(MiB)
    p = proxy(serve(path).port)
    with admitted(p.port, HONEST) as first:      # (the proxy's descriptors, all in use)
        first.disconnect()
    pid = p.pid
    in_use = settled_count(fd_count, pid)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use, hard))
    waiting = raw_connect(p.port, HONEST)
    try:
        assert_no_busy_loop(p)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        waiting.handshake()
        assert waiting.read(4096, 4096) == content(path, 4096, 4096)
        waiting.disconnect()
    finally:
        waiting.close()
    assert len(log_lines(p, "pausing new connections")) == 1, p.log()
    assert len(log_lines(p, "accepting again after")) == 1, p.log()


# --------------------------------------------------------------------------------------------
# 5. listen mode: bounded partial coverage

MAX_PIECES = 256 * 1024      # 4 MiB of (start, end) pieces, 16 bytes each


def test_listen_mode_partial_coverage_is_bounded(start_server, tmp_path):
    """A sender writing one-byte (unaligned) WRITEs: past 262,144 pieces they are answered
    EINVAL (an aligned WRITE still works), the server's RSS stays small, the session cannot
    complete (a DISC after covering everything leaves the listener waiting), and a proper
    sender then completes the migration."""
    size = MiB
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    server = start_server(dst, mode="listen")
    extra = 4096
    count = MAX_PIECES + extra
    sender = admitted(server.port, HONEST)
    peak_rss = [rss_kib(server.pid)]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.1):
            try:
                peak_rss[0] = max(peak_rss[0], rss_kib(server.pid))
            except (OSError, AssertionError):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # Non-adjacent one-byte pieces (nothing could merge them), pipelined from a thread.
        requests = b"".join(sender.pack(WRITE, 2 * i + 1, 1, cookie=i) + b"\xa5"
                            for i in range(count))
        send_error: list[BaseException] = []

        def send() -> None:
            try:
                sender.send(requests)
            except BaseException as e:  # noqa: BLE001 - reported below
                send_error.append(e)

        sender.sock.settimeout(120)
        writer = threading.Thread(target=send, daemon=True)
        writer.start()
        replies = sender.recv_exact(16 * count)
        writer.join(60)
        assert not send_error, send_error
        errors = []
        for i, (magic, error, cookie) in enumerate(struct.iter_unpack(">IIQ", replies)):
            assert magic == wire.SIMPLE_REPLY_MAGIC and cookie == i, (i, magic, cookie)
            errors.append(error)
        first_bad = next((i for i, e in enumerate(errors) if e), None)
        assert first_bad is not None, \
            f"all {count} one-byte writes were accepted: the pieces are not bounded"
        assert first_bad <= MAX_PIECES, first_bad
        assert first_bad >= 1000, f"refused from the {first_bad}th piece on"
        assert set(errors[first_bad:]) == {EINVAL}, sorted(set(errors[first_bad:]))
        # An aligned write needs no piece: still fine. Then cover everything and DISC.
        assert sender.write(0, b"\x11" * 4096) == 0
        assert sender.write(0, os.urandom(size)) == 0
        sender.disconnect()
        try:
            sender.read_until_closed()
        except TimeoutError:
            pass
    finally:
        sender.close()
        stop_sampling.set()
        sampler.join(5)
    assert peak_rss[0] < 200 * 1024, f"listener RSS reached {peak_rss[0] // 1024} MiB"
    time.sleep(1.0)
    assert server.proc.poll() is None, \
        f"the session with refused writes completed the migration:\n{server.log()}"
    assert cu.status(server.sock)["has_control"] == "false"
    # A proper sender, from scratch.
    data = os.urandom(size)
    with admitted(server.port, HONEST, timeout=20) as proper:
        assert proper.write(0, data) == 0
        assert proper.request(FLUSH).error == 0
        proper.disconnect()
        try:
            proper.read_until_closed()
        except TimeoutError:
            pass
    assert wait_exit(server, 30) == 0, server.log()
    assert dst.read_bytes() == data


# --------------------------------------------------------------------------------------------
# 6. mirror_wait is bounded

def test_at_most_16_mirror_wait_requests_wait(pair, make_file):
    """A slow mirror is running; 16 `mirror_wait` requests wait for it; the 17th is answered
    at once with `1: too many mirror_wait requests waiting`. The 16 get their answer when the
    mirror is stopped."""
    p = pair(make_file(64 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=1_000_000) == "0: Mirror started\n"
    waiters: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiters.append(s)
            s.settimeout(15)
            s.connect(str(p.src.sock))
            s.sendall(b"mirror_wait\n\n")
        assert wait_for(lambda: log_count(p.src, "control: mirror_wait") >= 16, 15), \
            p.src.log()
        for s in waiters:               # all still waiting
            s.settimeout(0.05)
            with pytest.raises(TimeoutError):
                s.recv(1)
        t0 = time.monotonic()
        try:
            reply = cu.control(p.src.sock, "mirror_wait", timeout=5)
        except TimeoutError:
            pytest.fail("the 17th mirror_wait was not answered at once (it waits too)")
        assert reply == "1: too many mirror_wait requests waiting\n", reply
        assert time.monotonic() - t0 < 5
        assert cu.stopped(cu.control(p.src.sock, "break"))
        for s in waiters:
            s.settimeout(15)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"1: "), data
    finally:
        for s in waiters:
            s.close()


# --------------------------------------------------------------------------------------------
# 7. listen mode after completion

def test_listen_mode_admits_no_one_once_the_migration_completed(start_server, tmp_path):
    """The sender covered everything and sent DISC; the listener's final fdatasync is slow
    (it sleeps 2.5 s, an LD_PRELOAD shim): a connection arriving meanwhile is accepted and
    closed with nothing written. Then the sender sees the orderly close and the listener
    exits 0."""
    lib = syncspy.build(tmp_path)
    size = 4 * MiB
    dst = tmp_path / "dst.img"
    with open(dst, "wb") as f:
        f.truncate(size)
    flag = tmp_path / "slow.flag"
    log = tmp_path / "sync.log"
    server = start_server(dst, mode="listen",
                          env=syncspy.environment(lib, dst, log=log, sleep_flag=flag,
                                                  sleep_ms=2500))
    data = os.urandom(size)
    sender = admitted(server.port, HONEST)
    try:
        assert sender.write(0, data) == 0
        assert sender.request(FLUSH).error == 0
        syncs_before = len([c for c in syncspy.calls(log) if c.function == "fdatasync"])
        flag.touch()
        sender.disconnect()
        # Inside the slow final sync (its sleep has begun):
        assert wait_for(lambda: any(c.function == "sleep" for c in syncspy.calls(log)), 15), \
            f"the listener did not sync after DISC:\n{server.log()}"
        late = raw_connect(server.port, HOSTILE2)
        with late:
            got_nothing = cu.closed_without_a_byte(late.sock, 10)
        syncs_now = len([c for c in syncspy.calls(log) if c.function == "fdatasync"])
        assert syncs_now == syncs_before, "the final sync was over before the late client came"
        assert got_nothing, f"a client was greeted after the migration completed:\n{server.log()}"
        sender.sock.settimeout(15)
        assert sender.read_until_closed() == b""
    finally:
        sender.close()
    assert wait_exit(server, 30) == 0, server.log()
    assert dst.read_bytes() == data


# --------------------------------------------------------------------------------------------
# 8. an ACL with --unix and no TCP

@pytest.mark.parametrize("acl", [["--default-deny"], ["127.0.0.1"], ["--default-deny", "::1"]],
                         ids=["default-deny", "entry", "both"])
def test_acl_with_only_a_unix_socket_is_a_startup_error(make_file, tmp_path, acl):
    path = make_file(MiB)
    unix = tmp_path / "nbd.sock"
    proc = subprocess.Popen(FLEXNBD + ["serve", "--unix", str(unix), "--file", str(path), *acl],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"it started and served the Unix socket, ACL ignored:\n{err.decode()}")
    text = err.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, text)
    assert "Traceback" not in text, text
    about = [line for line in text.splitlines()
             if "unix" in line.lower() and ("permission" in line.lower()
                                            or "file mode" in line.lower())]
    assert len(about) == 1, text
    assert not unix.exists()


def test_acl_with_a_unix_socket_and_tcp_is_fine(start_server, make_file, tmp_path):
    unix = tmp_path / "nbd.sock"
    server = start_server(make_file(MiB), "--unix", str(unix), "--default-deny", "127.0.0.1")
    cu.wait_for_path(unix, server)
    assert cu.status(server.sock)["pid"] == str(server.pid)


# --------------------------------------------------------------------------------------------
# 9. BLOCK_STATUS never sends a chunk with zero extents

def _structured_with_meta_context(port: int) -> RawClient:
    c = raw_connect(port)
    try:
        assert c.read_greeting().style == "newstyle"
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
        c.structured = True
        query = (struct.pack(">I", 0) + struct.pack(">I", 1)
                 + struct.pack(">I", len(wire.BASE_ALLOCATION)) + wire.BASE_ALLOCATION)
        replies = c.option(wire.OPT_SET_META_CONTEXT, query)
        assert [r.type for r in replies] == [wire.REP_META_CONTEXT, wire.REP_ACK], replies
        c.go()
    except BaseException:
        c.close()
        raise
    return c


OUTBUF = 256 * KiB
READ_REPLY_OVERHEAD = wire.CHUNK_HEADER_SIZE + 8     # an OFFSET_DATA chunk's header + offset
BLOCK_STATUS_HEADER = wire.CHUNK_HEADER_SIZE + 4     # the chunk header + the context id


@pytest.mark.parametrize("room", [0, 1, 4, 7])
def test_block_status_never_sends_a_chunk_without_extents(serve, make_file, room):
    """Small READs fill the reply batch (each copied in: 28 + length bytes) until it has room
    for BLOCK_STATUS's 24-byte chunk header plus only ``room`` (< 8) more bytes; the
    BLOCK_STATUS that follows in the same send must still carry at least one extent."""
    path = make_file(8 * MiB)                  # random: every block is data
    server = serve(path)
    map_built(server)
    full = 15 * (READ_REPLY_OVERHEAD + 16 * KiB)
    last = OUTBUF - BLOCK_STATUS_HEADER - room - full - READ_REPLY_OVERHEAD
    assert 0 < last <= 16 * KiB
    reads = [(i * 64 * KiB, 16 * KiB) for i in range(15)] + [(3 * MiB + 1, last)]
    assert sum(READ_REPLY_OVERHEAD + n for _, n in reads) + BLOCK_STATUS_HEADER + room == OUTBUF
    c = _structured_with_meta_context(server.port)
    with c:
        bs_offset, bs_length = 2 * MiB, 4 * MiB
        pipeline = b"".join(c.pack(READ, off, n, cookie=i + 1, flags=DF)
                            for i, (off, n) in enumerate(reads))
        bs_cookie = len(reads) + 1
        pipeline += c.pack(BLOCK_STATUS, bs_offset, bs_length, cookie=bs_cookie)
        c.send(pipeline)                       # one send: all in the server's input at once
        for i, (off, n) in enumerate(reads):
            reply = c.recv_reply(n, off)
            assert (reply.error, reply.cookie) == (0, i + 1)
            assert reply.data == content(path, off, n)
        chunks = c.recv_chunks(bs_cookie)
        covered = 0
        for _flags, ctype, payload in chunks:
            assert ctype == wire.REPLY_TYPE_BLOCK_STATUS, (ctype, payload)
            assert len(payload) >= 12, \
                f"a BLOCK_STATUS chunk of {len(payload)} bytes: no extent (room {room})"
            assert (len(payload) - 4) % 8 == 0
            (context,) = struct.unpack_from(">I", payload)
            assert context == wire.BASE_ALLOCATION_ID
            for length, _state in struct.iter_unpack(">II", payload[4:]):
                assert length > 0
                covered += length
        assert 0 < covered <= bs_length
        # The stream is still in sync.
        assert c.read(0, 4096) == content(path, 0, 4096)
        c.disconnect()


# --------------------------------------------------------------------------------------------
# 10. the control socket and the --unix socket

def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_control_socket_is_created_0600(start_server, make_file):
    old = os.umask(0)                          # the mode must not come from the umask
    try:
        server = start_server(make_file(MiB))
    finally:
        os.umask(old)
    assert _mode(server.sock) == 0o600, oct(_mode(server.sock))


def test_sock_mode_widens_the_control_socket(start_server, make_file):
    server = start_server(make_file(MiB), "--sock-mode", "0660")
    assert _mode(server.sock) == 0o660, oct(_mode(server.sock))
    assert cu.status(server.sock)["pid"] == str(server.pid)


@pytest.mark.parametrize("extra,expected", [((), 0o660), (("--unix-mode", "0600"), 0o600),
                                            (("--unix-mode", "0666"), 0o666)],
                         ids=["default", "0600", "0666"])
def test_nbd_unix_socket_mode(start_server, make_file, tmp_path, extra, expected):
    unix = tmp_path / "nbd.sock"
    old = os.umask(0o077 if expected == 0o666 else 0)
    try:
        server = start_server(make_file(MiB), "--unix", str(unix), *extra)
    finally:
        os.umask(old)
    cu.wait_for_path(unix, server)
    assert _mode(unix) == expected, oct(_mode(unix))


# Run a command as another user: AS_USER UID PROGRAM ARGS... (started as root).
AS_USER = ("import os, sys\n"
           "uid = int(sys.argv[1])\n"
           "os.setgroups([])\n"
           "os.setgid(uid)\n"
           "os.setuid(uid)\n"
           "os.execv(sys.argv[2], sys.argv[2:])\n")

CONTROL_CLIENT = ("import socket, sys\n"
                  "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                  "s.settimeout(10)\n"
                  "s.connect(sys.argv[1])\n"
                  "try:\n"
                  "    s.sendall(b'status\\n\\n')\n"
                  "except (BrokenPipeError, ConnectionResetError):\n"
                  "    pass\n"
                  "data = b''\n"
                  "while True:\n"
                  "    try:\n"
                  "        chunk = s.recv(4096)\n"
                  "    except ConnectionResetError:\n"
                  "        break\n"
                  "    if not chunk:\n"
                  "        break\n"
                  "    data += chunk\n"
                  "sys.stdout.write(repr(data))\n")


def _readable_copy(parent: Path) -> str:
    """A copy of the built flexnbd package in a directory every user may read, for
    PYTHONPATH: the clone itself may live where other users cannot enter (under /root)."""
    import flexnbd
    root = parent / "pythonpath"
    shutil.copytree(Path(flexnbd.__file__).resolve().parent, root / "flexnbd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.html"))
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return str(root)


def _python_usable_by(uid: int, pythonpath: str) -> str | None:
    """An interpreter that ``uid`` may run and that imports this flexnbd (the test's own may
    live under a home directory other users cannot enter)."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        res = subprocess.run([sys.executable, "-c", AS_USER, str(uid), candidate, "-c",
                              "import sys, flexnbd._core; print(sys.version_info[:2])"],
                             env=env, capture_output=True, text=True, timeout=30)
        if res.returncode == 0 and res.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    return None


def _control_as(python: str, uid: int, sock: Path) -> bytes:
    res = subprocess.run([sys.executable, "-c", AS_USER, str(uid), python, "-c", CONTROL_CLIENT,
                          str(sock)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"control client as uid {uid}: {res.stderr}"
    return eval(res.stdout)  # noqa: S307 - our own repr() of bytes


def test_control_socket_refuses_other_uids(tmp_path, make_file):
    """A server running as nobody (65534), its control socket opened wide (--sock-mode 0666):
    a peer with uid 65533 is closed without a reply (a log line about its uid); root and
    nobody itself are answered."""
    if os.getuid() != 0:
        pytest.skip("needs root to run the server and a client under other uids")
    nobody = 65534
    home = Path(tempfile.mkdtemp(prefix="flexnbd-owner-"))
    os.chmod(home, 0o755)
    pythonpath = _readable_copy(home)
    python = _python_usable_by(nobody, pythonpath)
    if python is None:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip("no Python interpreter of this version that uid 65534 may run")
    server = None
    try:
        os.chown(home, nobody, nobody)
        disk = home / "disk.img"
        disk.write_bytes(os.urandom(MiB))
        os.chown(disk, nobody, nobody)
        sock = home / "ctl.sock"
        port = free_port()
        server = FlexnbdProcess([str(nobody), python, "-m", "flexnbd", "serve", "--addr",
                                 "127.0.0.1", "--port", str(port), "--file", str(disk),
                                 "--sock", str(sock), "--sock-mode", "0666", "-v"],
                                tmp_path / "nobody.log", env={"PYTHONPATH": pythonpath},
                                command=[sys.executable, "-c", AS_USER])
        cu.wait_for_path(sock, server)
        assert cu.status(sock)["pid"] == str(server.pid)       # root is answered
        assert _control_as(python, nobody, sock).startswith(b"0: pid=")   # so is its own uid
        stranger = _control_as(python, nobody - 1, sock)
        assert stranger == b"", f"uid {nobody - 1} got {stranger!r}"
        assert wait_for(lambda: any(str(nobody - 1) in line
                                    for line in log_lines(server, "uid")), 5), server.log()
        assert cu.status(sock)["pid"] == str(server.pid)       # and the socket goes on
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("slow_probe", [False, True], ids=["plain", "slow-probe"])
def test_two_servers_starting_at_once_on_one_control_socket(make_file, tmp_path, slow_probe):
    """Ten rounds: a stale socket file is left at SOCK (a crashed server), then two servers
    start at the same moment with that --sock. Exactly one keeps running and answers on SOCK;
    the other exits 1 with "already in use". Never both gone, never the winner's socket
    deleted. With ``slow-probe`` every Unix connect() of the servers returns 300 ms late (an
    LD_PRELOAD shim), so both servers' "is the old socket live?" probes overlap: only a lock
    around probe, unlink and bind keeps the second from deleting the first one's socket."""
    env = slowprobe.environment(slowprobe.build(tmp_path), 300) if slow_probe else None
    files = [make_file(MiB), make_file(MiB)]
    sock = tmp_path / "ctl.sock"
    for rnd in range(10):
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock))                   # a socket file nobody listens on
        stale.close()
        procs = [FlexnbdProcess(["serve", "--addr", "127.0.0.1", "--port", str(free_port()),
                                 "--file", str(f), "--sock", str(sock), "-v"],
                                tmp_path / f"race{rnd}-{i}.log", env)
                 for i, f in enumerate(files)]
        try:
            assert wait_for(lambda ps=procs: any(p.proc.poll() is not None for p in ps), 20), \
                f"round {rnd}: both servers kept running:\n" + \
                "\n".join(p.log() for p in procs)
            time.sleep(0.3)
            gone = [p for p in procs if p.proc.poll() is not None]
            alive = [p for p in procs if p.proc.poll() is None]
            logs = "\n".join(f"--- {p.pid} ---\n{p.log()}" for p in procs)
            assert len(gone) == 1 and len(alive) == 1, f"round {rnd}:\n{logs}"
            assert gone[0].proc.returncode == 1, f"round {rnd}:\n{logs}"
            assert "already in use" in gone[0].log(), f"round {rnd}:\n{logs}"
            assert wait_for(sock.exists, 5), f"round {rnd}: the winner's socket is gone:\n{logs}"
            assert cu.status(sock)["pid"] == str(alive[0].pid), f"round {rnd}:\n{logs}"
            assert alive[0].stop() == 0
            assert not sock.exists(), f"round {rnd}: the socket outlived its server"
        finally:
            for p in procs:
                p.kill()
        if sock.exists():
            sock.unlink()


# --------------------------------------------------------------------------------------------
# 11. a sticky I/O error

def test_an_io_error_is_never_forgotten(start_server, make_file, tmp_path):
    """Exactly one fdatasync fails with EIO (an LD_PRELOAD shim): client A's FLUSH gets EIO;
    then client B's FLUSH and a FUA WRITE get EIO too, although nothing fails any more; the
    status line shows io_error=true (absent before)."""
    lib = syncspy.build(tmp_path)
    path = make_file(4 * MiB)
    flag = tmp_path / "fail.flag"
    log = tmp_path / "sync.log"
    server = start_server(path, env=syncspy.environment(lib, path, log=log,
                                                        fail_once_flag=flag))
    st = cu.status(server.sock)
    assert "io_error" not in st, st
    with admitted(server.port, HONEST) as a:
        assert a.request(FLUSH).error == 0     # the shim lets syncs through until the flag
        assert a.write(0, b"\x42" * 4096) == 0
        flag.touch()
        assert a.request(FLUSH).error == EIO
        assert [c.rc for c in syncspy.calls(log) if c.rc < 0] == [-errno.EIO]
        a.disconnect()
    with admitted(server.port, HONEST) as b:
        assert b.request(FLUSH).error == EIO, "a FLUSH after a lost write succeeded"
        assert b.write(8192, b"\x43" * 4096, flags=FUA) == EIO, "a FUA write succeeded"
        assert b.request(FLUSH).error == EIO
        assert b.write(16384, b"\x44" * 4096) == 0      # plain writes still go to the cache
        assert b.read(16384, 4096) == b"\x44" * 4096
        b.disconnect()
    assert len([c for c in syncspy.calls(log) if c.rc < 0]) == 1, syncspy.calls(log)
    st = cu.status(server.sock)
    assert st.get("io_error") == "true", st


# --------------------------------------------------------------------------------------------
# 12. a FUA zero-write into a hole is durable

def test_fua_zero_write_into_a_hole_is_durable(serve, make_file, tmp_path):
    """A TRIM makes a hole (not synced); a FUA WRITE of zero blocks onto it writes nothing
    (the file stays sparse) but must still make the range durable before its reply: between
    sending it and reading the reply, a durable call (fdatasync/fsync, or pwritev2 with
    RWF_DSYNC) happened on the file."""
    lib = syncspy.build(tmp_path)
    path = make_file(4 * MiB)
    log = tmp_path / "sync.log"
    server = serve(path, env=syncspy.environment(lib, path, log=log))
    map_built(server)
    with admitted(server.port, HONEST) as c:
        assert c.write(MiB, os.urandom(64 * KiB)) == 0
        assert c.request(FLUSH).error == 0
        assert c.request(TRIM, MiB, 64 * KiB).error == 0
        before = len(syncspy.calls(log))
        assert c.write(MiB, bytes(16 * KiB), flags=FUA) == 0
        during = syncspy.calls(log)[before:]
        assert any(syncspy.durable(call) for call in during), \
            f"no durable call for the FUA write: {during}"
        assert c.read(MiB, 64 * KiB) == bytes(64 * KiB)
        c.disconnect()


# --------------------------------------------------------------------------------------------
# 13. a failed eventfd never closes descriptor 0

EVENTFD_SCRIPT = textwrap.dedent("""
    import errno, gc, json, os, resource, socket, sys
    from flexnbd import _core

    path = sys.argv[1]
    before = os.fstat(0)
    fd = os.open(path, os.O_RDWR)
    export = _core.Export(fd, os.fstat(fd).st_size, False, path)
    a, b = socket.socketpair()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            break
    error = None
    conn = None
    try:
        conn = _core.Connection(a.fileno(), export)
    except OSError as e:
        error = e.errno
    del conn
    gc.collect()
    try:
        after = os.fstat(0)
        same = (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        stdin = "same" if same else "other"
    except OSError as e:
        stdin = "closed: " + os.strerror(e.errno)
    for h in held:
        os.close(h)
    print(json.dumps({"error": error, "stdin": stdin}))
""")


def test_failed_eventfd_does_not_close_stdin(make_file):
    path = make_file(MiB)
    # (input= makes the child's stdin a pipe: descriptor 0 is that pipe.)
    proc = subprocess.run([sys.executable, "-c", EVENTFD_SCRIPT, str(path)], input=b"",
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["error"] == errno.EMFILE, result
    assert result["stdin"] == "same", result


# --------------------------------------------------------------------------------------------
# 14. flexnbd-proxy: one client at a time, the next waits in the backlog

def test_proxy_next_client_waits_until_the_current_one_leaves(serve, proxy, make_file):
    path = make_file(2 * MiB)
    server = serve(path)
    p = proxy(server.port)
    a = RawClient.connect(p.port)
    b = None
    try:
        a.handshake()
        assert a.read(0, 4096) == content(path, 0, 4096)
        b = RawClient.connect(p.port, timeout=15)      # the TCP connect succeeds: the backlog
        b.sock.settimeout(1.0)
        try:
            got = b.sock.recv(1)
        except TimeoutError:
            got = None
        assert got is None, \
            f"the waiting client got {got!r} while another was attached (refused, not queued)"
        assert a.read(4096, 4096) == content(path, 4096, 4096)
        a.disconnect()
        a.close()
        b.sock.settimeout(15)
        b.handshake()
        assert b.read(MiB, 64 * KiB) == content(path, MiB, 64 * KiB)
        # Killed without DISC (a reset) and back at once: served.
        b.reset()
        b = None
        with RawClient.connect(p.port, timeout=15) as again:
            again.handshake()
            assert again.write(8192, b"\x77" * 4096) == 0
            assert again.read(8192, 4096) == b"\x77" * 4096
            again.disconnect()
    finally:
        a.close()
        if b is not None:
            b.close()
    assert p.proc.poll() is None, p.log()
    assert server.proc.poll() is None, server.log()


def test_proxy_client_reset_then_reconnect_at_once(serve, proxy, make_file):
    """qemu's reconnect: the client's new connection arrives before (or just as) its old one
    dies with a reset, a request still in flight. The new connection waits, and is served once
    the proxy sees the old one gone. Five times in a row."""
    path = make_file(2 * MiB)
    server = serve(path)
    p = proxy(server.port)
    current = RawClient.connect(p.port, timeout=15)
    try:
        current.handshake()
        for i in range(5):
            assert current.read(i * 4096, 4096) == content(path, i * 4096, 4096)
            current.send_request(READ, 0, MiB)            # in flight when it dies
            nxt = RawClient.connect(p.port, timeout=15)  # the reconnect comes first
            current.reset()
            current = nxt
            current.handshake()
        assert current.read(0, 4096) == content(path, 0, 4096)
        current.disconnect()
    finally:
        current.close()
    assert p.proc.poll() is None, p.log()
    assert server.proc.poll() is None, server.log()

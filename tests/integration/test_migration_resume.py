"""Resumed migrations (issue 25 part 1, SPEC §6.2): an attempt cut before DISC is followed by
one that sends only what the destination lacks.

A fault-injecting relay between the source and a real `flexnbd listen` cuts (or stalls) a
connection after a share of the data went up; the relay counts every byte that went up over
all connections. The bytes of all attempts together must stay within the disk's data plus what
clients rewrote plus one in-flight window (32 MiB), and the files must end identical: dense,
sparse, over TLS, with a client writing to the source all along, and with nothing left to send.
Everything goes again to a listener restarted between attempts (it knows nothing of the
migration), to one written to between attempts by a sender of no migration (WRITE,
WRITE_ZEROES, TRIM, a torn WRITE) or of another migration, to an oldstyle listener (it offers
no coverage), and after `break` and a new `mirror` (a new migration id); a probe or a reader
that writes nothing does not cost the resume.

The logs are checked too: the source's "attempt N resumes" / "starts over" lines and its
completion line, the listener's "sender ... connected (..., migration <id>)", "migration <id>
resumes" and "coverage ... dropped" lines, which must agree; and the listener's status
(migration_id, covered_bytes) while a resumed attempt is held.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from flexnbd import wire
from flexnbd.handshake import client_handshake
from tests.fakes.relay import Fault, Relay
from tests.support import control as cu
from tests.support.migration import (
    KiB,
    MiB,
    Pair,
    _disc,
    _request,
    _sender,
    assert_completed,
    logs,
    mirror_cli,
    out,
    sparse_file,
)
from tests.support.rawclient import RawClient, ServerClosed, recv_exact
from tests.support.tlscreds import tls_args
from tests.support.waiting import wait_until

SHORT_LIMIT = {"FLEXNBD_MS_REQUEST_LIMIT_SECS": "2"}
IN_FLIGHT = 32 * MiB          # the mirror's window of unanswered bytes
SLACK = 2 * MiB               # requests, replies, handshakes and the coverage query
BS = 4 * KiB

# The source's milestones.
RESUMED_RE = re.compile(r"migration to \S+ port (\d+): attempt (\d+) resumes: the destination "
                        r"holds (\d+) of (\d+) bytes, skipped; (\d+) bytes of data to send "
                        r"and (\d+) dirty")
STARTS_OVER_RE = re.compile(r"migration to \S+ port \d+: attempt (\d+) starts over from offset "
                            r"0 \((.*?)\): (\d+) bytes of data to send")
COMPLETED_RE = re.compile(r"migration completed: (\d+) bytes of data sent, (\d+) bytes on the "
                          r"wire, in [\d.]+ s \([^;]*, (\d+) attempts?;")
RESTARTED = "the destination holds none of this migration: restarted?"
NO_COVERAGE = "the destination keeps no coverage to resume from"
# The listener's.
CONNECTED_RE = re.compile(r"sender \S+ connected \((\w+), ([^,()]+)(?:, migration (\S+))?\)")
LISTENER_RESUMES_RE = re.compile(r"migration (\S+) resumes: (\d+) of (\d+) bytes received before")
SESSION_RE = re.compile(r"sender \S+: received (\d+) bytes of data and (\d+) bytes of zeroes in "
                        r"(\d+) requests, covering (\d+) of (\d+) bytes \((then DISC|no DISC)\)")
DROPPED_RE = re.compile(r"coverage of migration (\S+) dropped \((.*?)\): its sender will resend "
                        r"everything")
NOT_COMPLETED = "no migration completed"


def up_bytes(relay: Relay, first: int = 0) -> int:
    """What went up over the relay's connections from ``first`` on."""
    return sum(c.up for c in relay.connections[first:])


def map_built(p) -> None:
    """(A mirror started before the map is built connects once, lets go, and connects again:
    the relay's first connection must be the one that sends.)"""
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")


def resumed_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "resumes: the destination holds" in line]


@dataclass
class Resume:
    attempt: int
    holds: int
    size: int
    to_send: int
    dirty: int


def resumes(log: str) -> list[Resume]:
    return [Resume(int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]))
            for m in RESUMED_RE.finditer(log)]


def starts_over(log: str) -> list[tuple[int, str]]:
    """[(attempt, why)] of the attempts after the first that started from offset 0."""
    return [(int(m[1]), m[2]) for m in STARTS_OVER_RE.finditer(log)]


def completion(p) -> tuple[int, int, int]:
    """The source's completion line: (bytes of data sent, bytes on the wire, attempts)."""
    found = COMPLETED_RE.findall(p.src.log())
    assert len(found) == 1, logs(p.src, p.dst)
    data, on_wire, attempts = map(int, found[0])
    return data, on_wire, attempts


def listener_ids(text: str) -> list[str | None]:
    """The migration id each sender session named at the listener (None: none)."""
    return [m[3] for m in CONNECTED_RE.finditer(text)]


def listener_resumes(text: str) -> list[tuple[str, int]]:
    return [(m[1], int(m[2])) for m in LISTENER_RESUMES_RE.finditer(text)]


def check_ids_agree(p, size: int) -> str:
    """The listener's sessions that named a migration named one id (32 hex digits); the
    listener's "resumes" lines name it and report what the source's "resumes" lines say it
    holds. The id."""
    src_log, dst_log = p.src.log(), p.dst.log()
    ids = [i for i in listener_ids(dst_log) if i is not None]
    assert ids and len(set(ids)) == 1, logs(p.src, p.dst)
    mid = ids[0]
    assert mid is not None and re.fullmatch(r"[0-9a-f]{32}", mid), mid
    theirs = listener_resumes(dst_log)
    ours = resumes(src_log)
    assert [m for m, _ in theirs] == [mid] * len(theirs), theirs
    assert [held for _, held in theirs] == [r.holds for r in ours], logs(p.src, p.dst)
    for r in ours:
        assert r.size == size and 0 < r.holds <= size, r
    return mid


def check_bytes(p, relay: Relay, data: int, extra: int = 0, first: int = 0) -> int:
    """The bytes of all attempts (on the relay, and the source's own count of data) are at
    most the data plus ``extra`` (rewritten by clients) plus one in-flight window; at least
    two attempts. What went up over the relay."""
    sent = up_bytes(relay, first)
    bound = data + extra + IN_FLIGHT + SLACK
    logged_data, _, attempts = completion(p)
    assert attempts >= 2, logs(p.src, p.dst)
    assert sent <= bound, f"{sent} bytes went up for {data} of data (+{extra} rewritten)"
    assert logged_data <= bound, f"the source sent {logged_data} bytes of data for {data}"
    return sent


def empty(path, size: int):
    """A sparse file of ``size`` bytes (a destination's)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def start_mirror(p, port: int) -> None:
    res = mirror_cli(p.src, port)
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)


# --------------------------------------------------------------------------------------------
# cut once, resumed: dense and sparse, plain and TLS

@pytest.mark.parametrize("share", [0.1, 0.5, 0.95])
def test_a_cut_dense_migration_resumes(pair, make_file, share):
    size = 512 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=int(size * share))]) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=120)
        assert relay.connections[0].triggered, relay.connections
        check_bytes(p, relay, size)
    assert resumed_lines(p.src.log()), logs(p.src, p.dst)
    assert not starts_over(p.src.log()), logs(p.src, p.dst)
    check_ids_agree(p, size)


@pytest.mark.parametrize("share", [0.1, 0.5, 0.95])
def test_a_cut_sparse_migration_resumes(pair, tmp_path, share):
    size = 4096 * MiB
    src_file = tmp_path / "src.img"
    data = sparse_file(src_file, size, pieces=256, piece=512 * KiB)
    p = pair(src_file, src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=int(data * share))]) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=120)
        assert relay.connections[0].triggered, relay.connections
        check_bytes(p, relay, data)
    found = resumes(p.src.log())
    assert found, logs(p.src, p.dst)
    # What the resumed attempt still had to send is what the cut one left, not everything.
    assert found[0].to_send < data, found
    assert not starts_over(p.src.log()), logs(p.src, p.dst)
    check_ids_agree(p, size)


def test_a_cut_tls_migration_resumes(pair, make_file, psk):
    size = 256 * MiB
    args = tls_args("psk", psk)
    p = pair(make_file(size), src_args=args, dst_args=args, src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=size // 2)]) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=120)
        assert relay.connections[0].triggered, relay.connections
        # TLS's own bytes: a handshake per attempt, about 22 bytes per record of 16 KiB
        check_bytes(p, relay, size, extra=size // 500 + 64 * KiB)
    assert resumed_lines(p.src.log()), logs(p.src, p.dst)
    assert not starts_over(p.src.log()), logs(p.src, p.dst)
    text = p.dst.log()
    assert [m[2] for m in CONNECTED_RE.finditer(text)][0].startswith("TLS"), text
    check_ids_agree(p, size)


def test_a_cut_costs_at_most_a_tenth_more_than_an_uncut_migration(pair, make_file, tmp_path):
    size = 512 * MiB
    src_file = make_file(size)
    p = pair(src_file, empty(tmp_path / "uncut.dst", size))
    map_built(p)
    with Relay(p.dst.port) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=120)
        uncut = up_bytes(relay)
        assert len(relay.connections) == 1, relay.connections
    assert size <= uncut <= size + SLACK, uncut

    q = pair(src_file, empty(tmp_path / "cut.dst", size), src_env=SHORT_LIMIT)
    map_built(q)
    with Relay(q.dst.port, faults=[Fault(close_after_up=size // 2)]) as relay:
        start_mirror(q, relay.port)
        assert_completed(q, timeout=120)
        cut = up_bytes(relay)
        assert relay.connections[0].triggered and len(relay.connections) >= 2, \
            relay.connections
    assert resumed_lines(q.src.log()), logs(q.src, q.dst)
    assert cut <= 1.1 * uncut, f"cut at 50%: {cut} bytes; uncut: {uncut} ({cut / uncut:.3f}x)"


# --------------------------------------------------------------------------------------------
# a client writes to the source all along

@dataclass
class Writer:
    """A client of the source writing random 4 KiB blocks (about half of them into the first
    quarter, which the first pass sends early: rewrites of what the destination holds) until
    the source cuts it (the endgame), ``stop`` is set, or ``limit`` writes or ``seconds``."""

    port: int
    size: int
    relay: Relay
    limit: int = 4000
    seconds: float = 60.0
    pause: float = 0.002
    stop: threading.Event = field(default_factory=threading.Event)
    sent: int = 0                       # write requests sent (acknowledged or not)
    acked: dict[int, bytes] = field(default_factory=dict)     # offset: last acknowledged data
    last: dict[int, bytes] = field(default_factory=dict)      # offset: last data sent
    after_cut: int = 0                  # acknowledged after the first connection was cut
    ended: str = ""

    def run(self) -> None:
        rng = random.Random(25)
        blocks = self.size // BS
        deadline = time.monotonic() + self.seconds
        try:
            with RawClient.connect(self.port) as c:
                c.handshake()
                while not self.stop.is_set() and self.sent < self.limit and \
                        time.monotonic() < deadline:
                    block = rng.randrange(blocks // 4 if rng.random() < 0.5 else blocks)
                    data = rng.randbytes(BS)
                    self.last[block * BS] = data
                    self.sent += 1
                    error = c.write(block * BS, data)
                    if error:
                        self.ended = f"error {error}"
                        return
                    self.acked[block * BS] = data
                    conns = self.relay.connections
                    if conns and conns[0].triggered:
                        self.after_cut += 1
                    time.sleep(self.pause)
                self.ended = "done"
        except (ServerClosed, OSError) as e:
            self.ended = f"cut: {e!r}"

    @property
    def written(self) -> int:
        return self.sent * BS


def test_a_cut_migration_with_a_writer_resumes(pair, make_file):
    size = 256 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=size // 2)]) as relay:
        writer = Writer(p.src.port, size, relay)
        thread = threading.Thread(target=writer.run, name="writer", daemon=True)
        thread.start()
        try:
            assert wait_until(lambda: writer.sent >= 20, 15), writer
            start_mirror(p, relay.port)
            assert_completed(p, timeout=120)
        finally:
            writer.stop.set()
            thread.join(30)
        assert not thread.is_alive()
        assert relay.connections[0].triggered, relay.connections
        # The writer raced both attempts (and the second saw what it wrote meanwhile).
        assert writer.after_cut >= 20, (writer.after_cut, writer.sent, writer.ended)
        check_bytes(p, relay, size, extra=writer.written)
    found = resumes(p.src.log())
    assert found and found[0].dirty > 0, logs(p.src, p.dst)
    assert not starts_over(p.src.log()), logs(p.src, p.dst)
    check_ids_agree(p, size)
    # Every acknowledged write is at the destination (unless a later one, unacknowledged,
    # replaced it: the files' identity covers those).
    with open(p.dst_file, "rb") as f:
        for offset, data in writer.acked.items():
            if writer.last[offset] is data:
                assert os.pread(f.fileno(), BS, offset) == data, offset


# --------------------------------------------------------------------------------------------
# between two attempts: a listener restarted, visitors that write (or not), a new `mirror`

def hold_then_let_through(p, size: int) -> Relay:
    """A relay that stalls the first connection after half the data went up and refuses the
    later ones (the source fails its attempts and retries every second) until ``clear()``."""
    map_built(p)
    relay = Relay(p.dst.port, faults=[Fault(stall_after_up=size // 2)],
                  default=Fault(refuse=True))
    try:
        start_mirror(p, relay.port)
        assert wait_until(lambda: relay.connections and relay.connections[0].triggered, 60), \
            (relay.connections, logs(p.src, p.dst))
    except BaseException:
        relay.close()
        raise
    return relay


def test_a_restarted_listener_gets_everything_again(pair, make_file, start_server):
    size = 128 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    with hold_then_let_through(p, size) as relay:
        before = listener_ids(p.dst.log())
        assert len(before) == 1 and before[0] is not None, p.dst.log()
        # (the listener wrote what the relay let through before it dies)
        assert wait_until(lambda: int(cu.status(p.dst.sock)["covered_bytes"]) >= size // 4, 15)
        p.dst.signal(signal.SIGKILL)
        p.dst.proc.wait(15)
        new = start_server(p.dst_file, mode="listen")
        relay.upstream = ("127.0.0.1", new.port)
        first = len(relay.connections)
        relay.clear()
        q = Pair(p.src, new, p.src_file, p.dst_file)
        assert_completed(q, timeout=120)
        again = up_bytes(relay, first)
    src_log = p.src.log()
    over = starts_over(src_log)
    assert over and over[0][1] == RESTARTED, logs(p.src, new)
    assert not resumed_lines(src_log), src_log
    assert size <= again <= size + IN_FLIGHT + SLACK, (again, relay.connections)
    # The same migration named itself to the new listener, which knew nothing of it.
    assert listener_ids(new.log()) == before, new.log()
    assert not listener_resumes(new.log()), new.log()


# Visitors of the listener between two attempts: each returns the migration it named (None:
# none); ``drops`` says whether it must cost the migration its kept coverage.
COVERED_BLOCKS = (0, MiB, 2 * MiB + 512, 16 * MiB)     # all written by the first attempt


def foreign_writer(port: int) -> str | None:
    """A sender of no migration (a raw client, no meta context) that writes garbage over
    blocks the migration's sender wrote, then DISC."""
    s, _ = _sender(port)
    with s:
        for offset in COVERED_BLOCKS:
            assert _request(s, wire.CMD_WRITE, offset, BS, b"\xee" * BS) == 0
        assert _disc(s) == "reset"
    return None


def foreign_zeroer(port: int) -> str | None:
    """The same with WRITE_ZEROES."""
    s, _ = _sender(port)
    with s:
        for offset in COVERED_BLOCKS:
            assert _request(s, wire.CMD_WRITE_ZEROES, offset, 64 * KiB) == 0
        assert _disc(s) == "reset"
    return None


def foreign_trimmer(port: int) -> str | None:
    """The same with TRIM (the listener punches holes: zeroes where data was)."""
    s, _ = _sender(port)
    with s:
        for offset in COVERED_BLOCKS:
            assert _request(s, wire.CMD_TRIM, offset, 64 * KiB) == 0
        assert _disc(s) == "reset"
    return None


def torn_writer(port: int) -> str | None:
    """A WRITE whose payload stops half-way: the client goes away without DISC."""
    s, _ = _sender(port)
    with s:
        s.sendall(wire.pack_request(wire.CMD_WRITE, 0, 64 * KiB, 7) + b"\xee" * (32 * KiB))
        time.sleep(0.2)
    return None


def other_migration(port: int) -> str | None:
    """The sender of another migration (another id) that writes over the blocks."""
    other = "0" * 31 + "1"
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    info = client_handshake(sock, migration_id=other)
    assert info.coverage_context is not None
    c = RawClient(sock)
    c.structured = True
    with c:
        for offset in COVERED_BLOCKS:
            assert c.write(offset, b"\xee" * BS) == 0
        assert _disc(c.sock) == "reset"
    return other


def probe(port: int) -> str | None:
    """A handshake, then DISC: writes nothing."""
    s, _ = _sender(port)
    with s:
        assert _disc(s) == "reset"
    return None


def reader(port: int) -> str | None:
    """Reads what the sender wrote, then DISC: writes nothing."""
    s, _ = _sender(port)
    with s:
        s.sendall(wire.pack_request(wire.CMD_READ, 0, MiB, 7))
        reply = wire.unpack_simple_reply(recv_exact(s, wire.SIMPLE_REPLY_SIZE))
        assert reply.error == 0, reply
        recv_exact(s, MiB)
        assert _disc(s) == "reset"
    return None


VISITORS = [(foreign_writer, True), (foreign_zeroer, True), (foreign_trimmer, True),
            (torn_writer, True), (other_migration, True), (probe, False), (reader, False)]


@pytest.mark.parametrize("visitor,drops", VISITORS, ids=[v.__name__ for v, _ in VISITORS])
def test_a_visitor_between_attempts(pair, make_file, visitor, drops):
    size = 128 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    with hold_then_let_through(p, size) as relay:
        # The stalled attempt fails (no reply within 2 s) and its session ends.
        assert wait_until(lambda: p.dst.log().count(NOT_COMPLETED) >= 1, 30), \
            logs(p.src, p.dst)
        covered = int(cu.status(p.dst.sock)["covered_bytes"])
        assert covered > COVERED_BLOCKS[-1] + 64 * KiB, covered
        named = visitor(p.dst.port)
        assert wait_until(lambda: p.dst.log().count(NOT_COMPLETED) >= 2, 30), \
            logs(p.src, p.dst)
        first = len(relay.connections)
        relay.clear()
        assert_completed(p, timeout=120)
        after = up_bytes(relay, first)
        total = up_bytes(relay)
    src_log, dst_log = p.src.log(), p.dst.log()
    mid = listener_ids(dst_log)[0]
    assert mid is not None and listener_ids(dst_log) == [mid, named, mid], dst_log
    dropped = [m[1] for m in DROPPED_RE.finditer(dst_log)]
    if drops:
        # (another migration's sender drops ours as it begins, and its own is dropped when
        # ours comes back)
        assert dropped == ([mid] if named is None else [mid, named]), dst_log
        over = starts_over(src_log)
        assert over and over[0][1] == RESTARTED, logs(p.src, p.dst)
        assert not resumed_lines(src_log), src_log
        assert not listener_resumes(dst_log), dst_log
        assert size <= after <= size + IN_FLIGHT + SLACK, (after, relay.connections)
    else:
        assert not dropped, dst_log
        assert resumed_lines(src_log) and not starts_over(src_log), logs(p.src, p.dst)
        check_ids_agree(p, size)
        assert after < size, (after, relay.connections)
        assert total <= size + IN_FLIGHT + SLACK, (total, relay.connections)


def test_a_resumed_attempt_with_nothing_left_to_send(pair, make_file, tmp_path):
    """Every write went up and was answered, then the FLUSH is swallowed: the next attempt
    finds everything covered and nothing dirty, sends no data, and completes (its session
    wrote nothing: the listener counts the kept coverage)."""
    size = 64 * MiB
    src_file = make_file(size)
    p = pair(src_file, empty(tmp_path / "uncut.dst", size))
    map_built(p)
    with Relay(p.dst.port) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=60)
        uncut = up_bytes(relay)
    # The same migration's bytes up to its last write: all but FLUSH and DISC.
    writes_end = uncut - 2 * wire.REQUEST_SIZE
    q = pair(src_file, empty(tmp_path / "cut.dst", size), src_env=SHORT_LIMIT)
    map_built(q)
    with Relay(q.dst.port, faults=[Fault(stall_after_up=writes_end)]) as relay:
        start_mirror(q, relay.port)
        assert_completed(q, timeout=60)
        assert relay.connections[0].triggered, relay.connections
        assert relay.connections[0].swallowed_up == wire.REQUEST_SIZE, relay.connections
        again = up_bytes(relay, 1)
    found = resumes(q.src.log())
    assert [(r.holds, r.to_send, r.dirty) for r in found] == [(size, 0, 0)], \
        logs(q.src, q.dst)
    data, _, attempts = completion(q)
    assert (data, attempts) == (size, 2), logs(q.src, q.dst)
    assert again <= 64 * KiB, (again, relay.connections)
    # (the listener's figures are the migration's, over its sessions: the last one added no
    # data, in three requests: BLOCK_STATUS, FLUSH, DISC)
    sessions = [(int(m[1]), int(m[3]), int(m[4]), m[6])
                for m in SESSION_RE.finditer(q.dst.log())]
    assert sessions[-1] == (size, 3, size, "then DISC"), sessions
    check_ids_agree(q, size)


def test_a_new_mirror_after_break_starts_over(pair, make_file):
    """`break`, a client rewrites blocks the destination holds (no dirty tracking runs then),
    `mirror` again: a new migration (a new id), so the listener drops the old one's coverage
    and everything goes again; the rewritten blocks arrive."""
    size = 64 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(stall_after_up=size // 2)]) as relay:
        start_mirror(p, relay.port)
        assert wait_until(lambda: relay.connections and relay.connections[0].triggered, 60)
        assert wait_until(lambda: int(cu.status(p.dst.sock)["covered_bytes"]) >= size // 4, 15)
        assert cu.stopped(cu.control(p.src.sock, "break")), p.src.log()
        assert wait_until(lambda: NOT_COMPLETED in p.dst.log(), 30), logs(p.src, p.dst)
        with RawClient.connect(p.src.port) as c:
            c.handshake()
            for offset in COVERED_BLOCKS:
                assert c.write(offset, b"\x5a" * BS) == 0
            c.disconnect()
        first = len(relay.connections)
        start_mirror(p, relay.port)
        assert_completed(p, timeout=60)
        again = up_bytes(relay, first)
    src_log, dst_log = p.src.log(), p.dst.log()
    ids = listener_ids(dst_log)
    assert len(ids) == 2 and None not in ids and ids[0] != ids[1], dst_log
    assert [(m[1], m[2]) for m in DROPPED_RE.finditer(dst_log)] == \
        [(ids[0], f"migration {ids[1]} began")], dst_log
    assert src_log.count(" started: ") == 2, src_log
    assert not resumed_lines(src_log) and not starts_over(src_log), src_log
    assert not listener_resumes(dst_log), dst_log
    assert size <= again <= size + SLACK, (again, relay.connections)
    with open(p.dst_file, "rb") as f:
        assert all(os.pread(f.fileno(), BS, offset) == b"\x5a" * BS for offset in COVERED_BLOCKS)


# --------------------------------------------------------------------------------------------
# an oldstyle listener keeps no coverage

def test_an_oldstyle_listener_gets_everything_again(pair, make_file):
    size = 256 * MiB
    p = pair(make_file(size), dst_args=("--oldstyle",), src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=size // 2)]) as relay:
        start_mirror(p, relay.port)
        assert_completed(p, timeout=120)
        assert relay.connections[0].triggered, relay.connections
        again = up_bytes(relay, 1)
    src_log = p.src.log()
    over = starts_over(src_log)
    assert over and {why for _, why in over} == {NO_COVERAGE}, logs(p.src, p.dst)
    assert not resumed_lines(src_log), src_log
    assert again >= size, (again, relay.connections)
    assert completion(p)[2] >= 2
    assert listener_ids(p.dst.log()) and set(listener_ids(p.dst.log())) == {None}, p.dst.log()


# --------------------------------------------------------------------------------------------
# the listener's status names the migration and counts its coverage across attempts

def test_listener_status_across_attempts(pair, make_file):
    size = 256 * MiB
    p = pair(make_file(size), src_env={"FLEXNBD_MS_REQUEST_LIMIT_SECS": "4"})
    map_built(p)
    # The first connection is cut after a quarter; the next ones stall after another quarter
    # (the first of them that resumes holds the stall) until the relay is cleared.
    with Relay(p.dst.port, faults=[Fault(close_after_up=size // 4)],
               default=Fault(stall_after_up=size // 4)) as relay:
        start_mirror(p, relay.port)
        assert wait_until(lambda: any(c.triggered for c in relay.connections[1:]), 60), \
            (relay.connections, logs(p.src, p.dst))
        relay.clear()

        # While the stall holds the resumed attempt: the status names the migration and
        # counts what both sessions wrote.
        def settled() -> dict[str, str] | None:
            a = cu.status(p.dst.sock)
            time.sleep(0.2)
            b = cu.status(p.dst.sock)
            return b if a == b else None
        st = wait_until(settled, 3, interval=0)
        assert st, cu.status(p.dst.sock)
        dst_log = p.dst.log()
        mid = listener_ids(dst_log)[-1]
        assert st.get("migration_id") == mid and mid is not None, (st, dst_log)
        assert st["num_clients"] == "1", st
        before = listener_resumes(dst_log)
        assert before and before[-1][0] == mid, dst_log
        first_session = [int(m[4]) for m in SESSION_RE.finditer(dst_log)]
        assert first_session and before[-1][1] == first_session[-1], dst_log
        covered = int(st["covered_bytes"])
        assert before[-1][1] < covered < size, (before, st)
        assert int(st["received_bytes"]) >= covered and st["zeroed_bytes"] == "0", st

        assert_completed(p, timeout=120)
    check_ids_agree(p, size)
    src_log, dst_log = p.src.log(), p.dst.log()
    held = [r.holds for r in resumes(src_log)]
    assert len(held) >= 2 and held == sorted(held) and covered <= held[-1], held
    sessions = [(int(m[4]), m[6]) for m in SESSION_RE.finditer(dst_log)]
    assert sessions[-1] == (size, "then DISC"), sessions
    assert all(why == "no DISC" for _, why in sessions[:-1]), sessions

"""Resume (issue 25 part 1) against destinations that lie: a scripted fake listener
(tests/fakes/fakedest.py, ``coverage=True``) offers flexnbd:coverage:<id>, fails the first
attempt after some data, and answers the resumed attempt's BLOCK_STATUS with a lie.

Each lie fails the attempt, with its reason in the log, before any data goes to that
destination; the source does not crash, keeps mirroring (it retries every second) and
serving its clients, ``break`` stops it, and a real `flexnbd listen` migration from the same
source then completes with identical files.

A destination that claims everything is covered when it is not only hurts itself (see
``test_a_destination_claiming_everything_only_hurts_itself``).

Also: `flexnbd serve` never offers the coverage context (a listener does), and the real
listener's BLOCK_STATUS answers what was written, in its own chunk, after base:allocation's.
"""

from __future__ import annotations

import os
import re
import struct
import threading

import pytest

from flexnbd import wire
from tests.fakes.fakedest import FakeDest, Script
from tests.support import control as cu
from tests.support.migration import (
    MiB,
    assert_completed,
    mirror_cli,
    out,
    wait_exit,
)
from tests.support.rawclient import RawClient, connect_to_options
from tests.support.waiting import wait_until

SHORT_LIMIT = {"FLEXNBD_MS_REQUEST_LIMIT_SECS": "2"}
SIZE = 24 * MiB
FAILED_RE = re.compile(r"mirror attempt failed: (.*?); retrying in")
MID_RE = re.compile(r"[0-9a-f]{32}")


def cut_after_one(fault: str = "close") -> Script:
    """A fake listener with coverage that takes the first WRITE and closes at the second
    (``hang``: never answers it, so the source surely read the first reply: no doubt about
    it is left to resend)."""
    return Script(greeting="newstyle", coverage=True, fail_at=1, fault=fault)


def lying(how: str) -> Script:
    return Script(greeting="newstyle", coverage=True, block_status=how)


def empty(path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def map_built(src) -> None:
    """(A mirror started before the map is built connects once without sending anything: the
    fake's first script would go to that connection.)"""
    assert wait_until(lambda: cu.status(src.sock)["allocation_map_method"] != "pending", 30)


def failures(src) -> list[str]:
    """The reasons of the source's failed attempts, in order."""
    return FAILED_RE.findall(src.log())


def start_mirror(src, port: int) -> None:
    res = mirror_cli(src, port)
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)


def source_reads(src, path, offset: int = 5 * MiB, length: int = 64 * 1024) -> None:
    """An NBD client of the source reads what the file holds."""
    with RawClient.connect(src.port) as c:
        c.handshake()
        assert c.read(offset, length) == open(path, "rb").read()[offset:offset + length]


def no_crash(src) -> None:
    text = src.log()
    assert "Traceback" not in text and "mirror failed" not in text, text


def writes(conn) -> list[tuple[int, int]]:
    """[(start, end)] of the WRITE and WRITE_ZEROES requests of a connection."""
    return [(r.offset, r.offset + r.length) for r in conn.requests
            if r.type in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES)]


def covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    at = start
    for s, e in sorted(ranges):
        if s > at:
            break
        at = max(at, e)
    return at >= end


def touches(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and e > start for s, e in ranges)


# --------------------------------------------------------------------------------------------
# the fake, honest: the baseline (its coverage context works, so the lies below are heard)

def test_an_honest_fake_listener_gets_a_resumed_attempt(start_server, make_file, tmp_path):
    src_file = make_file(SIZE)
    src = start_server(src_file, env=SHORT_LIMIT)
    map_built(src)
    dst_file = empty(tmp_path / "fake.img", SIZE)
    with FakeDest(SIZE, dst_file, scripts=[cut_after_one("hang")],
                  default=lying("honest")) as dest:
        start_mirror(src, dest.port)
        assert wait_exit(src, 60) == 0, src.log()
        # (not ``dest.completed``: that needs one connection covering the export)
        assert dest.wait(lambda: len(dest.conns) >= 2 and dest.conns[1].disc, 15), dest.conns
        first, second = dest.conns[0], dest.conns[1]
        assert first.fault_fired and first.requests[0].type == wire.CMD_WRITE
        # the sender named its migration, the same one on both connections
        assert first.options[:3] == [wire.OPT_LIST_META_CONTEXT, wire.OPT_STRUCTURED_REPLY,
                                     wire.OPT_SET_META_CONTEXT], first.options
        assert first.migration_id is not None and MID_RE.fullmatch(first.migration_id)
        assert second.migration_id == first.migration_id
        assert first.count(wire.CMD_BLOCK_STATUS) == 0     # nothing to resume yet
        query = second.requests[0]
        assert (query.type, query.cookie, query.offset, query.length) == \
            (wire.CMD_BLOCK_STATUS, wire.MIRROR_COOKIE, 0, SIZE)
        assert second.count(wire.CMD_BLOCK_STATUS) == 1
        # what the first connection acknowledged is not sent again
        acked = first.requests[0]
        assert not touches(writes(second), acked.offset, acked.offset + acked.length), \
            (acked, writes(second))
        assert covers(writes(first)[:1] + writes(second), 0, SIZE)
    assert open(src_file, "rb").read() == open(dst_file, "rb").read()
    assert f"attempt 2 resumes: the destination holds {8 * MiB} of {SIZE} bytes" in src.log(), \
        src.log()
    no_crash(src)


# --------------------------------------------------------------------------------------------
# lies: each fails the attempt; the source lives on; break; a real migration completes

LIES = {
    "bad-cookie": ("badcookie", "the destination answered BLOCK_STATUS with a bad cookie"),
    "zero-length-extent": ("zero_extent",
                           "the destination's BLOCK_STATUS extents do not fit the request"),
    "extents-beyond-the-request": ("beyond",
                                   "the destination's BLOCK_STATUS extents do not fit the "
                                   "request"),
    "another-context": ("other_context",
                        "the destination's BLOCK_STATUS reply names another context"),
    "oversized-chunk": ("oversized", "the destination's BLOCK_STATUS reply has 65540 bytes"),
    "never-answers": ("hang", None),      # (the reason is checked below)
    "no-done-flag": ("no_done", "the destination answered BLOCK_STATUS with an unexpected chunk"),
    "simple-reply": ("simple_ok", "the destination answered BLOCK_STATUS without extents"),
    "simple-error": ("simple_error", "the destination answered BLOCK_STATUS with EIO"),
    "bad-magic": ("badmagic", "the destination answered BLOCK_STATUS with a bad magic"),
    "error-chunk": ("error_chunk", "the destination answered BLOCK_STATUS with EPERM"),
    "close": ("close", "the destination closed the connection"),
}
TIMED_OUT = ("timed out", "did not answer BLOCK_STATUS in time")


@pytest.mark.parametrize("name", [pytest.param(n) if n == "error-chunk"
                                  else n for n in LIES])
def test_a_lying_destination_fails_the_attempt(pair, make_file, tmp_path, name):
    how, reason = LIES[name]
    p = pair(make_file(SIZE), src_env=SHORT_LIMIT)
    map_built(p.src)
    fake_file = empty(tmp_path / "fake.img", SIZE)
    with FakeDest(SIZE, fake_file, scripts=[cut_after_one()], default=lying(how)) as dest:
        start_mirror(p.src, dest.port)

        def lied_twice() -> bool:
            told = [c for c in dest.conns[1:] if c.block_status]
            return len(told) >= 2 and len(failures(p.src)) >= 3
        assert wait_until(lied_twice, 60), (dest.conns, p.src.log())

        # the first attempt failed by the fake's cut, every later one by the lie, before any
        # data went to that destination
        assert dest.conns[0].fault_fired, dest.conns[0]
        why = failures(p.src)[1:]
        if reason is None:
            assert all(any(t in w for t in TIMED_OUT) for w in why), why
        else:
            assert all(w == reason for w in why), why
        mid = dest.conns[0].migration_id
        assert mid is not None
        for conn in dest.conns[1:]:
            assert set(conn.types) <= {wire.CMD_BLOCK_STATUS}, conn
            assert conn.count(wire.CMD_BLOCK_STATUS) <= 1, conn
            if conn.block_status:
                assert conn.migration_id == mid
                q = conn.requests[0]
                assert (q.cookie, q.offset, q.length) == (wire.MIRROR_COOKIE, 0, SIZE), q

        # the source mirrors on and serves its clients
        st = cu.status(p.src.sock)
        assert st["is_mirroring"] == "true" and st["clients_allowed"] == "true", st
        source_reads(p.src, p.src_file)
        reply = cu.control(p.src.sock, "break", timeout=30)
        assert cu.stopped(reply, dest.port), reply
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    source_reads(p.src, p.src_file)
    no_crash(p.src)

    # a real listener then gets the whole migration (a new one: from offset 0)
    start_mirror(p.src, p.dst.port)
    assert_completed(p)
    no_crash(p.src)


# --------------------------------------------------------------------------------------------
# a destination that claims everything is covered

def test_a_destination_claiming_everything_only_hurts_itself(start_server, make_file, tmp_path):
    """A destination that claims to hold everything it was never sent damages only its own
    copy: the coverage context is the destination's word about the destination's file, the
    source's data and clients are not touched. The source still sends what it must send
    whatever the destination says: its dirty map (what clients wrote since it was sent, and
    what the cut attempt left unanswered, which the destination may hold torn), then the
    handoff (FLUSH, DISC). What the cut attempt never sent is missing there: the destination
    completes with a broken copy, by its own lie (a flexnbd listener never lies so)."""
    size = 64 * MiB
    src_file = make_file(size)
    src = start_server(src_file, env=SHORT_LIMIT)
    map_built(src)
    fake_file = empty(tmp_path / "fake.img", size)
    client_data = os.urandom(4096)
    wrote = threading.Event()

    def on_request(rec, req) -> None:
        # While the fake holds the first attempt's second WRITE: a client of the source
        # rewrites a block the first WRITE (acknowledged) carried: dirty from then on.
        if rec.index == 0 and len(rec.requests) == 2:
            with RawClient.connect(src.port) as c:
                c.handshake()
                assert c.write(4096, client_data) == 0
            wrote.set()

    with FakeDest(size, fake_file, scripts=[cut_after_one("hang")], default=lying("all"),
                  on_request=on_request) as dest:
        start_mirror(src, dest.port)
        assert wait_exit(src, 60) == 0, src.log()      # it believes the destination
        assert wrote.is_set()
        assert dest.wait(lambda: len(dest.conns) >= 2 and dest.conns[1].ended, 15)
        first, second = dest.conns[0], dest.conns[1]
        assert first.fault_fired
        types = second.types
        assert types[0] == wire.CMD_BLOCK_STATUS and second.block_status == 1, types
        assert types[-2:] == [wire.CMD_FLUSH, wire.CMD_DISC], types
        assert set(types[1:-2]) <= {wire.CMD_WRITE, wire.CMD_WRITE_ZEROES}, types
        sent = writes(second)
        # of what the first attempt had acknowledged, only the client's block went again
        first_write = first.requests[0]
        assert (first_write.offset, first_write.length, first_write.error) == (0, 8 * MiB, 0)
        assert [(max(s, 0), min(e, 8 * MiB)) for s, e in sent if s < 8 * MiB] == \
            [(4096, 8192)], sent
        # what the fake had read and never answered went again
        unanswered = first.requests[1]
        assert covers(sent, unanswered.offset, unanswered.offset + unanswered.length), sent
        # what the cut attempt never sent (its window is 32 MiB) did not go
        assert not touches(sent, size - 16 * MiB, size), sent
    with open(fake_file, "rb") as f:
        assert os.pread(f.fileno(), 4096, 4096) == client_data
        tail = os.pread(f.fileno(), 16 * MiB, size - 16 * MiB)
    assert tail != open(src_file, "rb").read()[size - 16 * MiB:]    # its own broken copy
    assert "attempt 2 resumes: the destination holds 67108864 of 67108864 bytes" in src.log()
    no_crash(src)


# --------------------------------------------------------------------------------------------
# a destination whose coverage query never ends: break must still stop the mirror

class BreakHung(AssertionError):
    pass


def test_break_during_an_endless_coverage_query(pair, make_file, tmp_path):
    """A destination that answers each BLOCK_STATUS at once, with a single covered byte: each
    reply is within the request limit, and the query would take a round trip per byte of the
    export. `break` must stop the mirror all the same (and the clients are served meanwhile)."""
    p = pair(make_file(SIZE), src_env=SHORT_LIMIT)
    map_built(p.src)
    fake_file = empty(tmp_path / "fake.img", SIZE)
    with FakeDest(SIZE, fake_file, scripts=[cut_after_one()], default=lying("tiny")) as dest:
        start_mirror(p.src, dest.port)
        assert wait_until(lambda: len(dest.conns) >= 2 and dest.conns[1].block_status >= 200,
                          60), (dest.conns[:1], p.src.log())
        st = cu.status(p.src.sock)
        assert st["is_mirroring"] == "true", st
        source_reads(p.src, p.src_file)
        try:
            reply = cu.control(p.src.sock, "break", timeout=20)
        except TimeoutError:
            reply = "(no reply to break within 20 s)"
        answered = dest.conns[1].block_status
        if not cu.stopped(reply, dest.port):
            raise BreakHung(f"{reply!r}; {answered} BLOCK_STATUS answered")
    no_crash(p.src)
    start_mirror(p.src, p.dst.port)
    assert_completed(p)


# --------------------------------------------------------------------------------------------
# serve mode never offers the coverage context; a listener does

NAME = wire.COVERAGE_PREFIX + b"0123456789abcdef0123456789abcdef"


def meta_request(*queries: bytes) -> bytes:
    return (struct.pack(">II", 0, len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def meta_contexts(c: RawClient, option: int, *queries: bytes) -> list[tuple[int, bytes]]:
    replies = c.option(option, meta_request(*queries))
    assert replies[-1].type == wire.REP_ACK, replies
    assert all(r.type == wire.REP_META_CONTEXT for r in replies[:-1]), replies
    return [(struct.unpack_from(">I", r.data)[0], r.data[4:]) for r in replies[:-1]]


@pytest.mark.parametrize("mode", ["serve", "listen"])
def test_only_a_listener_offers_the_coverage_context(start_server, make_file, mode):
    proc = start_server(make_file(MiB), mode=mode)
    listening = mode == "listen"
    with connect_to_options(proc.port) as c:
        assert meta_contexts(c, wire.OPT_LIST_META_CONTEXT, NAME) == \
            ([(0, NAME)] if listening else [])
        assert meta_contexts(c, wire.OPT_LIST_META_CONTEXT, wire.BASE_ALLOCATION, NAME) == \
            [(0, wire.BASE_ALLOCATION)] + ([(0, NAME)] if listening else [])
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
        assert meta_contexts(c, wire.OPT_SET_META_CONTEXT, NAME) == \
            ([(wire.COVERAGE_ID, NAME)] if listening else [])
        assert c.option(wire.OPT_ABORT)[-1].type == wire.REP_ACK
    assert cu.status(proc.sock)["pid"] == str(proc.pid)      # alive and well


# --------------------------------------------------------------------------------------------
# the real listener's BLOCK_STATUS: what was written, in its own chunk, the last one

def block_status(c: RawClient, offset: int, length: int,
                 flags: int = 0) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """[(chunk flags, context id, [(length, flags)])] of one BLOCK_STATUS reply."""
    c.send_request(wire.CMD_BLOCK_STATUS, offset, length, cookie=77, flags=flags)
    out = []
    while True:
        chunk = wire.unpack_chunk_header(c.recv_exact(wire.CHUNK_HEADER_SIZE))
        assert chunk.magic == wire.STRUCTURED_REPLY_MAGIC and chunk.cookie == 77, chunk
        assert chunk.type == wire.REPLY_TYPE_BLOCK_STATUS, chunk
        payload = c.recv_exact(chunk.length)
        (context,) = struct.unpack_from(">I", payload)
        out.append((chunk.flags, context, list(struct.iter_unpack(">II", payload[4:]))))
        if chunk.flags & wire.REPLY_FLAG_DONE:
            return out


def test_the_listener_reports_what_was_written(start_server, make_file):
    size = 4 * MiB
    dst = start_server(make_file(size, random=False), mode="listen")
    with connect_to_options(dst.port) as c:
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
        assert sorted(meta_contexts(c, wire.OPT_SET_META_CONTEXT, wire.BASE_ALLOCATION, NAME)) \
            == [(wire.BASE_ALLOCATION_ID, wire.BASE_ALLOCATION), (wire.COVERAGE_ID, NAME)]
        c.go()
        c.structured = True
        chunks = block_status(c, 0, size)
        assert [(f, ctx) for f, ctx, _ in chunks] == \
            [(0, wire.BASE_ALLOCATION_ID), (wire.REPLY_FLAG_DONE, wire.COVERAGE_ID)]
        assert chunks[1][2] == [(size, 0)]
        data = os.urandom(8192)
        assert c.write(4096, data) == 0
        assert c.write(MiB + 1, data[:100]) == 0               # unaligned
        assert c.request(wire.CMD_WRITE_ZEROES, 2 * MiB, MiB).error == 0
        chunks = block_status(c, 0, size)
        assert [(f, ctx) for f, ctx, _ in chunks] == \
            [(0, wire.BASE_ALLOCATION_ID), (wire.REPLY_FLAG_DONE, wire.COVERAGE_ID)]
        C = wire.STATE_COVERED
        assert chunks[1][2] == [(4096, 0), (8192, C), (MiB - 12288 + 1, 0), (100, C),
                                (MiB - 101, 0), (MiB, C), (MiB, 0)]
        # from inside a covered run, with a length that stops inside the next
        assert block_status(c, 8192, MiB - 8192)[1][2] == [(4096, C), (MiB - 12288, 0)]
        assert block_status(c, 8192, MiB)[1][2] == [(4096, C), (MiB - 12287, 0), (100, C),
                                                    (8091, 0)]
        # REQ_ONE: one extent per chunk
        one = block_status(c, 0, size, flags=wire.CMD_FLAG_REQ_ONE)
        assert [len(e) for _, _, e in one] == [1, 1] and one[1][2] == [(4096, 0)]
        c.send_request(wire.CMD_DISC)
    no_crash(dst)

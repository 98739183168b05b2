"""Resuming a migration (issue 25 part 1), the parts that need no process.

- ``flexnbd.migration.resume.missing`` against a destination played by a thread on the other
  end of a socketpair: the gaps it finds for coverage layouts (also over several requests, for
  exports beyond one request's 0xFFFFF000 bytes: nothing is read from a disk), the bytes it
  counts on the wire, and every lie or broken rule of a destination refused with the right
  error (ProtocolError, RemoteError, TimeoutError, PeerClosed), never a skipped block;
- ``wire.migration_id_of``: what a coverage context name is;
- ``CoverageMap.runs`` (what the listener's BLOCK_STATUS reports) after ``cover`` calls;
- the handshake, both sides: the listener offers flexnbd:coverage:<id> (LIST and SET) only
  in listen mode and for a valid id, SET only after STRUCTURED_REPLY; the sender's
  ``client_handshake(migration_id=...)`` selects it, and negotiates structured replies only
  with a server that lists it.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from flexnbd import wire
from flexnbd._allocmap import CoverageMap
from flexnbd.errors import HandshakeError, PeerClosed, ProtocolError, RemoteError
from flexnbd.handshake import Agreed, ExportInfo, client_handshake
from flexnbd.migration import resume
from tests.support.rawclient import RawClient, ServerClosed, recv_exact
from tests.support.serverside import ServerSide

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TIMEOUT = 10.0
CTX = wire.COVERAGE_ID
COVERED = wire.STATE_COVERED
PER_QUERY = wire.REQUEST_SIZE + wire.CHUNK_HEADER_SIZE + 4     # + 8 per extent

# ---------------------------------------------------------------------------------------------
# a destination played by a thread

CLOSE = object()      # an answer: close the connection instead of replying
SILENT = object()     # an answer: say nothing (keep the connection open)


def chunk(extents: list[tuple[int, int]], cookie: int = wire.MIRROR_COOKIE,
          context: int = CTX, flags: int = wire.REPLY_FLAG_DONE,
          type: int = wire.REPLY_TYPE_BLOCK_STATUS, length: int | None = None) -> bytes:
    """A BLOCK_STATUS reply chunk (its fields overridable to make it lie)."""
    payload = struct.pack(">I", context) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return wire.pack_chunk_header(flags, type, cookie,
                                  len(payload) if length is None else length) + payload


@dataclass
class Dest:
    """The destination's end of a socketpair, in a thread: for every request it reads it calls
    ``answer(request)`` and sends what it returns (bytes), or closes (CLOSE), or stays silent
    (SILENT: it keeps reading). Records the requests and counts the bytes both ways."""

    answer: Callable[[wire.Request], object]
    requests: list[wire.Request] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.sock, self.channel = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.thread = threading.Thread(target=self._run, name="dest", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    head = recv_exact(self.sock, wire.REQUEST_SIZE)
                except (ServerClosed, OSError):
                    return
                self.bytes_in += len(head)
                req = wire.unpack_request(head)
                self.requests.append(req)
                out = self.answer(req)
                if out is CLOSE:
                    self.sock.shutdown(socket.SHUT_RDWR)
                    return
                if out is SILENT:
                    continue
                assert isinstance(out, bytes)
                # (counted first: the sender may return before this thread runs again)
                self.bytes_out += len(out)
                try:
                    self.sock.sendall(out)
                except OSError:
                    self.bytes_out -= len(out)
                    return      # the sender gave up reading (a reply it refused)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def close(self) -> None:
        self.channel.close()
        self.thread.join(TIMEOUT)
        self.sock.close()
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def dest():
    made: list[Dest] = []

    def make(answer: Callable[[wire.Request], object]) -> Dest:
        d = Dest(answer)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def honest(covered: list[tuple[int, int]], max_extents: int = 1024,
           flags_on: int = COVERED, flags_off: int = 0,
           short: int | None = None) -> Callable[[wire.Request], bytes]:
    """Answers from ``covered`` ([(start, end)], sorted, disjoint): the runs of a request's
    range, covered or not, at most ``max_extents`` of them; ``short``: the reply stops that
    many bytes into the request (a reply that covers less than asked)."""
    def answer(req: wire.Request) -> bytes:
        assert req.magic == wire.REQUEST_MAGIC
        assert req.type == wire.CMD_BLOCK_STATUS and req.cookie == wire.MIRROR_COOKIE
        assert req.flags == 0
        end = req.offset + (req.length if short is None else min(req.length, short))
        at = req.offset
        extents = []
        while at < end and len(extents) < max_extents:
            state, until = False, end
            for s, e in covered:
                if s <= at < e:
                    state, until = True, min(e, end)
                    break
                if s > at:
                    until = min(s, end)
                    break
            extents.append((until - at, flags_on if state else flags_off))
            at = until
        return chunk(extents)
    return answer


def complement(covered: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """[(offset, length)] not covered, merged."""
    gaps, at = [], 0
    for s, e in covered:
        if s > at:
            gaps.append((at, s - at))
        at = max(at, e)
    if at < size:
        gaps.append((at, size - at))
    return gaps


def check_requests(d: Dest, size: int) -> None:
    """Every request asks from where the previous reply ended, at most 0xFFFFF000 bytes, never
    beyond the export, with the mirror's cookie."""
    for req in d.requests:
        assert req.type == wire.CMD_BLOCK_STATUS and req.cookie == wire.MIRROR_COOKIE, req
        assert 0 < req.length <= resume.MAX_REQUEST, req
        assert req.offset + req.length <= size, req
    assert d.requests[0].offset == 0


# ---------------------------------------------------------------------------------------------
# resume.missing: the gaps

LAYOUTS = {
    "nothing-covered": [],
    "all-covered": [(0, 64 * MiB)],
    "covered-start": [(0, 5 * MiB)],
    "covered-end": [(60 * MiB, 64 * MiB)],
    "covered-middle": [(MiB, 2 * MiB)],
    "holes-everywhere": [(4 * KiB, 8 * KiB), (MiB, MiB + 1), (MiB + 3, 2 * MiB),
                         (10 * MiB, 63 * MiB)],
    "unaligned": [(1, 2), (4095, 4097), (64 * MiB - 1, 64 * MiB)],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gaps_of_a_layout(dest, name):
    size = 64 * MiB
    covered = LAYOUTS[name]
    d = dest(honest(covered))
    gaps, wire_bytes = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == complement(covered, size)
    assert len(d.requests) == 1 and (d.requests[0].offset, d.requests[0].length) == (0, size)
    check_requests(d, size)
    # what the thread read and sent, exactly
    assert wire_bytes == d.bytes_in + d.bytes_out


def test_gaps_are_merged_across_extents(dest):
    """Uncovered extents that follow each other (also over a flag the query ignores, and
    across replies) make one gap."""
    def answer(req: wire.Request) -> bytes:
        if req.offset == 0:
            return chunk([(100, 0), (200, 0x2), (50, COVERED | 0x2), (10, 0), (20, 0)])
        return chunk([(30, 0), (req.length - 30, COVERED)])
    d = dest(answer)
    gaps, wire_bytes = resume.missing(d.channel, 1000, CTX, TIMEOUT)
    assert gaps == [(0, 300), (350, 60)]
    assert [(r.offset, r.length) for r in d.requests] == [(0, 1000), (380, 620)]
    assert wire_bytes == 2 * PER_QUERY + 8 * 7 == d.bytes_in + d.bytes_out


def test_several_requests_beyond_one_request_length(dest):
    """An export of more than 0xFFFFF000 bytes takes several requests, each from where the last
    reply ended; the gaps merge across them."""
    size = 3 * resume.MAX_REQUEST + 12345
    m = resume.MAX_REQUEST
    covered = [(m - 4096, m + 4096), (2 * m + 1, 3 * m + 5)]
    d = dest(honest(covered))
    gaps, wire_bytes = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == complement(covered, size)
    assert [(r.offset, r.length) for r in d.requests] == \
        [(0, m), (m, m), (2 * m, m), (3 * m, 12345)]
    check_requests(d, size)
    assert wire_bytes == d.bytes_in + d.bytes_out


def test_a_huge_export_nothing_covered(dest):
    size = 1 << 44          # 16 TiB: nothing is read from a disk
    d = dest(honest([]))
    gaps, _ = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == [(0, size)]
    assert len(d.requests) == -(-size // resume.MAX_REQUEST)
    check_requests(d, size)


def test_a_reply_that_covers_less_than_asked(dest):
    """The next request starts where the reply ended (at most 1024 extents per reply at a real
    listener; here 3), and nothing is assumed about the rest."""
    covered = [(i * 8 * KiB, i * 8 * KiB + 4 * KiB) for i in range(20)]
    size = 160 * KiB + 100
    d = dest(honest(covered, max_extents=3))
    gaps, wire_bytes = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == complement(covered, size)
    offsets = [r.offset for r in d.requests]
    assert offsets == sorted(offsets) and len(offsets) > 10
    for prev, nxt in zip(d.requests, d.requests[1:], strict=False):
        assert nxt.offset + nxt.length == size and nxt.offset > prev.offset
    check_requests(d, size)
    assert wire_bytes == d.bytes_in + d.bytes_out


def test_a_short_reply_over_a_huge_export(dest):
    """A reply of 1 MiB to each request of 0xFFFFF000 bytes: each next request starts 1 MiB
    further."""
    size = resume.MAX_REQUEST + 3 * MiB
    short = honest([(0, MiB // 2)], short=MiB)
    rest = honest([])

    def answer(req: wire.Request) -> bytes:
        # (short replies for the first three requests, then the rest whole)
        return short(req) if req.offset < 3 * MiB else rest(req)
    d = dest(answer)
    gaps, _ = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == [(MiB // 2, size - MiB // 2)]
    assert [r.offset for r in d.requests][:4] == [0, MiB, 2 * MiB, 3 * MiB]
    assert d.requests[1].length == min(size - MiB, resume.MAX_REQUEST)


def test_one_byte_extents(dest):
    """Alternating 1-byte extents: one gap for each uncovered byte, none lost."""
    size = 64
    covered = [(i, i + 1) for i in range(0, size, 2)]
    d = dest(honest(covered))
    gaps, _ = resume.missing(d.channel, size, CTX, TIMEOUT)
    assert gaps == [(i, 1) for i in range(1, size, 2)]


def test_an_empty_export_asks_nothing(dest):
    d = dest(honest([]))
    assert resume.missing(d.channel, 0, CTX, TIMEOUT) == ([], 0)
    assert d.requests == []


def test_the_context_id_is_the_one_given(dest):
    """The destination's context id (what SET gave) is what the reply must name."""
    d = dest(lambda req: chunk([(req.length, COVERED)], context=7))
    assert resume.missing(d.channel, MiB, 7, TIMEOUT)[0] == []


def test_too_many_gaps_count_the_rest_as_missing(dest, monkeypatch):
    """Past MAX_GAPS gaps the rest of the export is one gap: a full resend of it, never a
    skipped block; no more requests are sent."""
    monkeypatch.setattr(resume, "MAX_GAPS", 5)
    size = 10_000

    def answer(req: wire.Request) -> bytes:
        # 3 covered/uncovered pairs of 10 bytes each reply
        return chunk([(10, COVERED), (10, 0)] * 3)
    d = dest(answer)
    gaps, _ = resume.missing(d.channel, size, CTX, TIMEOUT)
    # two replies (6 gaps, past 5), then the rest from byte 120
    assert len(d.requests) == 2
    assert gaps == [(o + 10, 10) for o in range(0, 120, 20)][:-1] + [(110, size - 110)]
    assert gaps[-1][0] + gaps[-1][1] == size
    # every uncovered byte is in a gap
    in_gaps = set()
    for o, n in gaps:
        in_gaps.update(range(o, o + n))
    assert set(range(size)) - in_gaps == {b for o in range(0, 120, 20) for b in range(o, o + 10)}


# ---------------------------------------------------------------------------------------------
# resume.missing: lies and broken rules

def simple(error: int = 0, cookie: int = wire.MIRROR_COOKIE,
           magic: int = wire.SIMPLE_REPLY_MAGIC) -> bytes:
    return wire.pack_simple_reply(error, cookie, magic)


def whole(req: wire.Request) -> list[tuple[int, int]]:
    return [(req.length, COVERED)]


LIES = {
    "simple-error": (lambda r: simple(wire.NBD_EIO), RemoteError, "EIO"),
    "simple-without-error": (lambda r: simple(0), ProtocolError, "without extents"),
    "simple-bad-cookie": (lambda r: simple(0, cookie=r.cookie ^ 1), ProtocolError, "cookie"),
    "simple-error-bad-cookie": (lambda r: simple(wire.NBD_EIO, cookie=1), ProtocolError,
                                "cookie"),
    "bad-magic": (lambda r: simple(0, magic=0x12345678) + chunk(whole(r)), ProtocolError,
                  "magic"),
    "chunk-bad-cookie": (lambda r: chunk(whole(r), cookie=r.cookie + 1), ProtocolError,
                         "cookie"),
    # (announced, never sent: refused on the header alone, not waited for)
    "chunk-too-long": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_BLOCK_STATUS, r.cookie, resume.MAX_REPLY + 1),
        ProtocolError, str(resume.MAX_REPLY + 1)),
    "chunk-4GiB": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_BLOCK_STATUS, r.cookie, 0xFFFFFFFF),
        ProtocolError, "bytes"),
    "chunk-too-long-sent": (lambda r: chunk([(1, COVERED)] * 8192), ProtocolError, "bytes"),
    "error-chunk": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_ERROR, r.cookie, 6)
        + struct.pack(">IH", wire.NBD_EPERM, 0), RemoteError, "EPERM"),
    "error-offset-chunk": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_ERROR_OFFSET, r.cookie, 14)
        + struct.pack(">IHQ", wire.NBD_ENOSPC, 0, 0), RemoteError, "ENOSPC"),
    "none-chunk": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_NONE, r.cookie, 0), ProtocolError,
        "unexpected chunk"),
    "offset-hole-chunk": (lambda r: wire.pack_chunk_header(
        wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_OFFSET_HOLE, r.cookie, 12)
        + struct.pack(">QI", 0, r.length), ProtocolError, "unexpected chunk"),
    "offset-data-chunk": (lambda r: chunk(whole(r), type=wire.REPLY_TYPE_OFFSET_DATA),
                          ProtocolError, "unexpected chunk"),
    "no-done-flag": (lambda r: chunk(whole(r), flags=0) + chunk(whole(r)), ProtocolError,
                     "unexpected chunk"),
    "no-extent": (lambda r: chunk([]), ProtocolError, "malformed"),
    "length-not-a-whole-extent": (lambda r: chunk(whole(r), length=13) + b"\0", ProtocolError,
                                  "malformed"),
    "length-short-of-an-extent": (lambda r: chunk(whole(r), length=8)[:-4], ProtocolError,
                                  "malformed"),
    "other-context": (lambda r: chunk(whole(r), context=CTX + 1), ProtocolError,
                      "another context"),
    "base-allocation-context": (lambda r: chunk(whole(r), context=wire.BASE_ALLOCATION_ID),
                                ProtocolError, "another context"),
    "zero-length-extent": (lambda r: chunk([(0, COVERED)]), ProtocolError, "do not fit"),
    "zero-length-extent-later": (lambda r: chunk([(4096, COVERED), (0, 0)]), ProtocolError,
                                 "do not fit"),
    "one-extent-beyond": (lambda r: chunk([(r.length + 1, COVERED)]), ProtocolError,
                          "do not fit"),
    "extents-add-up-beyond": (lambda r: chunk([(r.length, 0), (4096, COVERED)]), ProtocolError,
                              "do not fit"),
    "extents-wrap-32-bits": (lambda r: chunk([(0xFFFFFFFF, COVERED), (2, COVERED)]),
                             ProtocolError, "do not fit"),
}




def once(answer: Callable[[wire.Request], object]) -> Callable[[wire.Request], object]:
    """``answer`` for the first request, silence after it: a sender that took a lie and asked
    again times out instead of looping."""
    calls: list[wire.Request] = []

    def first(req: wire.Request) -> object:
        calls.append(req)
        return answer(req) if len(calls) == 1 else SILENT
    return first


@pytest.mark.parametrize("name", [
    pytest.param(n) if n in ("error-chunk", "error-offset-chunk")
    else n for n in LIES])
def test_a_lying_destination_is_refused(dest, name):
    answer, error, words = LIES[name]
    d = dest(once(answer))
    with pytest.raises(error) as info:
        resume.missing(d.channel, 16 * MiB, CTX, 2.0)
    assert words in str(info.value)
    assert len(d.requests) == 1
    if error is RemoteError:
        assert info.value.errno_name == words


def test_a_lie_in_a_later_reply_is_refused(dest):
    """The first reply is honest and short; the second lies (beyond its request)."""
    def answer(req: wire.Request) -> bytes:
        if req.offset == 0:
            return chunk([(MiB, COVERED)])
        return chunk([(req.length + 4096, 0)])
    d = dest(answer)
    with pytest.raises(ProtocolError):
        resume.missing(d.channel, 16 * MiB, CTX, TIMEOUT)
    assert [r.offset for r in d.requests] == [0, MiB]


def test_extents_beyond_the_export_in_a_last_short_request(dest):
    """The last request asks for what is left of the export: an extent reaching past the
    export's end is beyond that request."""
    size = resume.MAX_REQUEST + 8192

    def answer(req: wire.Request) -> bytes:
        if req.offset == 0:
            return chunk([(req.length, COVERED)])
        return chunk([(req.length + 4096, COVERED)])
    d = dest(answer)
    with pytest.raises(ProtocolError):
        resume.missing(d.channel, size, CTX, TIMEOUT)
    assert [(r.offset, r.length) for r in d.requests] == \
        [(0, resume.MAX_REQUEST), (resume.MAX_REQUEST, 8192)]


def test_no_answer_times_out(dest):
    d = dest(lambda r: SILENT)
    with pytest.raises(TimeoutError):
        resume.missing(d.channel, 16 * MiB, CTX, 0.3)


@pytest.mark.parametrize("cut", [0, 3, 4, 10, wire.CHUNK_HEADER_SIZE, wire.CHUNK_HEADER_SIZE + 6])
def test_half_an_answer_then_silence_times_out(dest, cut):
    d = dest(lambda r: chunk(whole(r))[:cut] if cut else SILENT)
    with pytest.raises(TimeoutError):
        resume.missing(d.channel, 16 * MiB, CTX, 0.3)


def test_a_trickling_answer_has_one_deadline(dest):
    """A reply that trickles in, a byte at a time, each well within the limit, still has to
    be complete within it (one deadline per request, not one per receive)."""
    gate = threading.Event()

    def answer(req: wire.Request) -> object:
        data = chunk(whole(req))

        def trickle() -> None:
            for i in range(len(data)):
                if gate.wait(0.1):
                    return
                try:
                    d.sock.sendall(data[i:i + 1])
                except OSError:
                    return
        threading.Thread(target=trickle, daemon=True).start()
        return SILENT
    d = dest(answer)
    try:
        with pytest.raises(TimeoutError):
            # 32 bytes at 0.1 s each: 3.2 s of reply against a limit of 1 s
            resume.missing(d.channel, 16 * MiB, CTX, 1.0)
    finally:
        gate.set()


@pytest.mark.parametrize("cut", [0, 2, wire.CHUNK_HEADER_SIZE - 1, wire.CHUNK_HEADER_SIZE + 5])
def test_a_close_is_peer_closed(dest, cut):
    def answer(req: wire.Request) -> object:
        if cut:
            d.sock.sendall(chunk(whole(req))[:cut])
        return CLOSE
    d = dest(answer)
    with pytest.raises(PeerClosed):
        resume.missing(d.channel, 16 * MiB, CTX, TIMEOUT)


def test_a_close_of_a_simple_reply_is_peer_closed(dest):
    def answer(req: wire.Request) -> object:
        d.sock.sendall(simple(wire.NBD_EIO)[:10])
        return CLOSE
    d = dest(answer)
    with pytest.raises(PeerClosed):
        resume.missing(d.channel, 16 * MiB, CTX, TIMEOUT)


# ---------------------------------------------------------------------------------------------
# wire.migration_id_of

P = wire.COVERAGE_PREFIX


@pytest.mark.parametrize("name,expected", [
    (P + b"a", "a"),
    (P + b"0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
    (P + b"A-Z_a-z-0-9", "A-Z_a-z-0-9"),
    (P + b"x" * 64, "x" * 64),
    (P + b"-", "-"),
])
def test_migration_id_of_valid(name, expected):
    assert wire.migration_id_of(name) == expected


@pytest.mark.parametrize("name", [
    P,                                   # empty id
    P + b"x" * 65,                       # too long
    P + b"a b",
    P + b"a.b",
    P + b"a:b",
    P + b"a/b",
    P + b"abc\0",
    P + b"abc\n",
    P + "é".encode(),
    P + b"\xff",
    b"flexnbd:coverage" + b"abc",        # no colon
    b"flexnbd:Coverage:abc",
    b"FLEXNBD:coverage:abc",
    b"base:allocation",
    b"",
    b"xflexnbd:coverage:abc",
    b"flexnbd:coverage;abc",
])
def test_migration_id_of_invalid(name):
    assert wire.migration_id_of(name) is None


# ---------------------------------------------------------------------------------------------
# CoverageMap.runs (the listener's BLOCK_STATUS)

def model_runs(covered: bytearray, offset: int, length: int) -> list[tuple[int, bool]]:
    runs: list[tuple[int, bool]] = []
    for i in range(offset, offset + length):
        state = bool(covered[i])
        if runs and runs[-1][1] == state:
            runs[-1] = (runs[-1][0] + 1, state)
        else:
            runs.append((1, state))
    return runs


def test_runs_of_an_empty_map():
    cov = CoverageMap(MiB)
    assert cov.runs(0, MiB) == [(MiB, False)]
    assert cov.runs(4096, 1) == [(1, False)]
    assert cov.runs(0, 0) == []


def test_runs_after_covers():
    cov = CoverageMap(100)
    cov.cover(10, 10)        # [10, 20)
    cov.cover(30, 5)         # [30, 35)
    cov.cover(20, 5)         # touches [10, 20): [10, 25)
    cov.cover(33, 10)        # overlaps [30, 35): [30, 43)
    assert cov.ranges() == [(10, 25), (30, 43)]
    assert cov.runs(0, 100) == [(10, False), (15, True), (5, False), (13, True), (57, False)]
    # partial overlaps at both ends of the asked range
    assert cov.runs(12, 20) == [(13, True), (5, False), (2, True)]
    assert cov.runs(15, 5) == [(5, True)]
    assert cov.runs(25, 5) == [(5, False)]
    # a range starting or ending exactly at a boundary
    assert cov.runs(10, 15) == [(15, True)]
    assert cov.runs(25, 6) == [(5, False), (1, True)]
    assert cov.runs(42, 2) == [(1, True), (1, False)]
    assert cov.runs(43, 57) == [(57, False)]
    assert cov.runs(0, 10) == [(10, False)]
    assert cov.runs(9, 2) == [(1, False), (1, True)]


def test_runs_merge_touching_covers_in_any_order():
    cov = CoverageMap(64)
    for start in (40, 0, 20, 10, 30, 50):
        cov.cover(start, 10)
    assert cov.ranges() == [(0, 60)]
    assert cov.runs(0, 64) == [(60, True), (4, False)]


def test_runs_against_a_model():
    """Many covers, unaligned and overlapping; runs of every sub-range equal the byte model."""
    import random
    rng = random.Random(25)
    size = 512
    cov = CoverageMap(size)
    model = bytearray(size)
    for _ in range(40):
        off = rng.randrange(size)
        n = rng.randrange(1, 40)
        cov.cover(off, n)
        for i in range(off, min(size, off + n)):
            model[i] = 1
        for _ in range(20):
            a = rng.randrange(size)
            b = rng.randrange(a, size) + 1
            assert cov.runs(a, b - a) == model_runs(model, a, b - a), (a, b, cov.ranges())
    assert cov.covered_bytes() == sum(model)


def test_covers_beyond_the_end_are_clipped():
    cov = CoverageMap(100)
    cov.cover(90, 50)
    cov.cover(200, 10)
    assert cov.ranges() == [(90, 100)]
    assert cov.runs(80, 20) == [(10, False), (10, True)]


def test_runs_of_a_huge_map():
    size = 1 << 50
    cov = CoverageMap(size)
    cov.cover(1 << 40, 1 << 30)
    assert cov.runs(0, size) == [(1 << 40, False), (1 << 30, True),
                                 (size - (1 << 40) - (1 << 30), False)]
    # what a BLOCK_STATUS of 0xFFFFF000 bytes sees from inside the range
    assert cov.runs((1 << 40) + 5, resume.MAX_REQUEST) == \
        [((1 << 30) - 5, True), (resume.MAX_REQUEST - (1 << 30) + 5, False)]


# ---------------------------------------------------------------------------------------------
# the handshake: the listener's side

SIZE = MiB
MID = "0123456789abcdef0123456789abcdef"


def meta_request(*queries: bytes, name: bytes = b"") -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


class Server(ServerSide):
    """The shared server side, plus a raw client past the greeting."""

    @property
    def client_sock(self) -> socket.socket:
        return self.client.sock

    def options(self) -> RawClient:
        assert self.client.read_greeting().style == "newstyle"
        self.client.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        return self.client


@pytest.fixture
def server():
    made: list[Server] = []

    def make(coverage: bool = True, **kwargs: object) -> Server:
        s = Server(ExportInfo(SIZE, coverage=coverage, **kwargs))  # type: ignore[arg-type]
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def contexts(replies) -> list[tuple[int, bytes]]:
    """(id, name) of the REP_META_CONTEXT replies; the last reply must be the ACK."""
    assert replies[-1].type == wire.REP_ACK, replies
    out = []
    for r in replies[:-1]:
        assert r.type == wire.REP_META_CONTEXT, r
        out.append((struct.unpack_from(">I", r.data)[0], r.data[4:]))
    return out


def go(s: Server) -> Agreed:
    assert s.client.go()[-1].type == wire.REP_ACK
    agreed = s.finish()
    assert agreed is not None
    return agreed


NAME = P + MID.encode()


@pytest.mark.parametrize("coverage", [True, False])
def test_list_offers_coverage_only_in_listen_mode(server, coverage):
    s = server(coverage)
    c = s.options()
    got = contexts(c.option(wire.OPT_LIST_META_CONTEXT, meta_request(NAME)))
    assert got == ([(0, NAME)] if coverage else [])
    # (LIST selects nothing, and needs no structured replies)
    agreed = go(s)
    assert agreed.migration_id is None and agreed.structured is False


@pytest.mark.parametrize("coverage", [True, False])
def test_set_selects_coverage_only_in_listen_mode(server, coverage):
    s = server(coverage)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    got = contexts(c.option(wire.OPT_SET_META_CONTEXT, meta_request(NAME)))
    assert got == ([(wire.COVERAGE_ID, NAME)] if coverage else [])
    agreed = go(s)
    assert agreed.structured is True and agreed.meta_context is False
    assert agreed.migration_id == (MID if coverage else None)


@pytest.mark.parametrize("query", [
    P, P + b"x" * 65, P + b"a.b", P + b"abc\0", b"flexnbd:coverage", b"flexnbd:coverage:*",
])
@pytest.mark.parametrize("option", [wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT])
def test_an_invalid_id_is_not_offered(server, query, option):
    s = server(True)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    assert contexts(c.option(option, meta_request(query))) == []
    assert go(s).migration_id is None


def test_set_without_structured_replies_is_refused(server):
    s = server(True)
    c = s.options()
    replies = c.option(wire.OPT_SET_META_CONTEXT, meta_request(NAME))
    assert [r.type for r in replies] == [wire.REP_ERR_INVALID]
    agreed = go(s)
    assert agreed.migration_id is None and agreed.structured is False


def test_set_both_contexts(server):
    s = server(True)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    got = contexts(c.option(wire.OPT_SET_META_CONTEXT,
                            meta_request(wire.BASE_ALLOCATION, NAME)))
    assert sorted(got) == [(wire.BASE_ALLOCATION_ID, wire.BASE_ALLOCATION),
                           (wire.COVERAGE_ID, NAME)]
    assert wire.BASE_ALLOCATION_ID != wire.COVERAGE_ID
    agreed = go(s)
    assert agreed.meta_context is True and agreed.migration_id == MID


def test_the_first_valid_id_is_the_one(server):
    s = server(True)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    other = P + b"second"
    got = contexts(c.option(wire.OPT_SET_META_CONTEXT,
                            meta_request(P + b"bad id", NAME, other)))
    assert got == [(wire.COVERAGE_ID, NAME)]
    assert go(s).migration_id == MID


def test_a_later_set_replaces_the_selection(server):
    s = server(True)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    assert contexts(c.option(wire.OPT_SET_META_CONTEXT, meta_request(NAME))) == \
        [(wire.COVERAGE_ID, NAME)]
    assert contexts(c.option(wire.OPT_SET_META_CONTEXT,
                             meta_request(wire.BASE_ALLOCATION))) == \
        [(wire.BASE_ALLOCATION_ID, wire.BASE_ALLOCATION)]
    agreed = go(s)
    assert agreed.migration_id is None and agreed.meta_context is True


def test_a_malformed_meta_request_is_invalid(server):
    s = server(True)
    c = s.options()
    assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
    bad = meta_request(NAME)[:-1]
    assert [r.type for r in c.option(wire.OPT_LIST_META_CONTEXT, bad)] == [wire.REP_ERR_INVALID]
    assert [r.type for r in c.option(wire.OPT_SET_META_CONTEXT, bad)] == [wire.REP_ERR_INVALID]
    assert go(s).migration_id is None


# ---------------------------------------------------------------------------------------------
# the handshake: the sender's side

def test_client_selects_coverage_from_a_listener(server):
    s = server(True)
    info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
    agreed = s.finish()
    assert info.coverage_context == wire.COVERAGE_ID
    assert agreed is not None and agreed.structured is True
    assert agreed.migration_id == MID and agreed.meta_context is False
    assert info.size == SIZE


def test_client_without_a_listener_keeps_simple_replies(server):
    """A server that does not list the context (serve mode): no structured replies."""
    s = server(False)
    info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
    agreed = s.finish()
    assert info.coverage_context is None
    assert agreed is not None and agreed.structured is False and agreed.migration_id is None
    assert info.size == SIZE


def test_client_without_a_migration_id_asks_nothing(server):
    s = server(True)
    info = client_handshake(s.client_sock, timeout=TIMEOUT)
    agreed = s.finish()
    assert info.coverage_context is None
    assert agreed is not None and agreed.structured is False and agreed.migration_id is None


def test_client_without_structured_replies_offered(server):
    """A server that lists the context but refuses STRUCTURED_REPLY: no SET, no coverage."""
    s = server(True, structured_replies=False)
    info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
    agreed = s.finish()
    assert info.coverage_context is None
    assert agreed is not None and agreed.structured is False and agreed.migration_id is None


class Scripted:
    """A scripted server on one end of a socketpair: ``script(sock)`` in a thread."""

    def __init__(self, script: Callable[[Scripted, RawClient], None]) -> None:
        self.sock, self.client_sock = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.client_sock.settimeout(TIMEOUT)
        self.options: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        raw = RawClient(self.sock, timeout=TIMEOUT)

        def run() -> None:
            try:
                script(self, raw)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def recv_option(self, raw: RawClient) -> tuple[int, bytes]:
        magic, option, length = wire.unpack_option_header(raw.recv_exact(16))
        assert magic == wire.IHAVEOPT
        data = raw.recv_exact(length)
        self.options.append((option, data))
        return option, data

    def close(self) -> None:
        self.client_sock.close()
        self.thread.join(TIMEOUT)
        self.sock.close()
        if self.error is not None:
            raise self.error


def scripted_listener(lists: Callable[[bytes], list[bytes]], sets: Callable[[bytes], list],
                      extra_list_replies: int = 0):
    """A server that answers LIST with META_CONTEXT replies for the names ``lists(query)``,
    STRUCTURED_REPLY with ACK, SET with (id, name) replies ``sets(query)``, GO as usual."""
    def script(srv: Scripted, raw: RawClient) -> None:
        raw.send(wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES))
        raw.recv_exact(4)
        while True:
            option, data = srv.recv_option(raw)
            if option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
                (n,) = struct.unpack_from(">I", data, 8)
                query = data[12:12 + n]
                if option == wire.OPT_LIST_META_CONTEXT:
                    names = [(0, name) for name in lists(query)]
                    names += [(0, b"base:allocation")] * extra_list_replies
                else:
                    names = sets(query)
                for ident, name in names:
                    raw.send(wire.pack_option_reply(option, wire.REP_META_CONTEXT,
                                                    struct.pack(">I", ident) + name))
                raw.send(wire.pack_option_reply(option, wire.REP_ACK))
            elif option == wire.OPT_STRUCTURED_REPLY:
                raw.send(wire.pack_option_reply(option, wire.REP_ACK))
            elif option == wire.OPT_GO:
                raw.send(wire.pack_option_reply(option, wire.REP_INFO,
                                                struct.pack(">HQH", wire.INFO_EXPORT, SIZE, 1))
                         + wire.pack_option_reply(option, wire.REP_ACK))
                return
            else:
                raw.send(wire.pack_option_reply(option, wire.REP_ERR_UNSUP))

    return Scripted(script)


def option_numbers(s: Scripted) -> list[int]:
    return [o for o, _ in s.options]


def test_client_takes_the_id_the_server_gives():
    s = scripted_listener(lambda q: [q], lambda q: [(42, q)])
    try:
        info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
        assert info.coverage_context == 42
        assert option_numbers(s) == [wire.OPT_LIST_META_CONTEXT, wire.OPT_STRUCTURED_REPLY,
                                     wire.OPT_SET_META_CONTEXT, wire.OPT_GO]
        # the query names exactly this migration, and no export
        assert s.options[0][1] == meta_request(NAME) == s.options[2][1]
    finally:
        s.close()


@pytest.mark.parametrize("listed", [
    [],
    [P + b"someone-else"],
    [NAME + b"x"],
    [NAME[:-1]],
    [b"base:allocation"],
], ids=["nothing", "another-id", "longer", "shorter", "base-allocation"])
def test_client_does_not_negotiate_structured_replies_for_another_name(listed):
    s = scripted_listener(lambda q: listed, lambda q: [(2, q)])
    try:
        info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
        assert info.coverage_context is None
        assert option_numbers(s) == [wire.OPT_LIST_META_CONTEXT, wire.OPT_GO]
    finally:
        s.close()


def test_client_without_a_set_reply_has_no_coverage():
    """Listed, but SET selects nothing (or another name): no coverage context."""
    for sets in (lambda q: [], lambda q: [(2, P + b"other")]):
        s = scripted_listener(lambda q: [q], sets)
        try:
            info = client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
            assert info.coverage_context is None
            assert option_numbers(s)[-1] == wire.OPT_GO
        finally:
            s.close()


def test_client_refuses_endless_meta_context_replies():
    s = scripted_listener(lambda q: [q], lambda q: [(2, q)], extra_list_replies=40)
    try:
        with pytest.raises(HandshakeError):
            client_handshake(s.client_sock, migration_id=MID, timeout=TIMEOUT)
    finally:
        s.client_sock.close()
        s.thread.join(TIMEOUT)
        s.sock.close()

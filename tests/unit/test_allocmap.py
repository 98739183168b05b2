"""The allocation map (flexnbd/_allocmap.pyx) against the file itself.

The reference is an independent SEEK_DATA/SEEK_HOLE scan written here, at the map's block
granularity: a 4096-byte block is allocated when any byte of it lies in a data extent.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import struct
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexnbd._allocmap import METHODS, AllocationMap, BlockBitmap, CoverageMap, DirtyMap
from tests.support.layout import block_runs, punch_fd, seek_scan

BS = 4096
MiB = 1 << 20
TiB = 1 << 40

FS_IOC_FIEMAP = 0xC020660B          # _IOWR('f', 11, struct fiemap)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


# -- the reference ------------------------------------------------------------------------------

def fiemap_supported(fd: int) -> bool:
    """Whether the file system answers FS_IOC_FIEMAP (asked for the extent count only)."""
    buf = bytearray(struct.pack("=QQIIII", 0, 0xFFFFFFFFFFFFFFFF, 0, 0, 0, 0))
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
    except OSError:
        return False
    return True


punch = punch_fd


def pattern(seed: int, n: int) -> bytes:
    """Non-zero bytes (so a block holding them is data to every client)."""
    unit = bytes((seed * 7 + i) % 255 + 1 for i in range(251))
    return (unit * (n // len(unit) + 1))[:n]


def check_runs(runs: list[tuple[int, int, bool]], offset: int, length: int) -> None:
    """Runs are contiguous, cover exactly [offset, offset+length) and are merged."""
    pos = offset
    for i, (o, n, state) in enumerate(runs):
        assert o == pos, runs
        assert n > 0, runs
        if i:
            assert state != runs[i - 1][2], f"unmerged runs {runs}"
        pos += n
    assert pos == offset + length, runs


def expected_method(forced: str | None, fiemap_ok: bool) -> str:
    if forced == "none":
        return "none"
    if forced == "seek" or not fiemap_ok:
        return "seek"
    return "fiemap"


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="allocmap-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- random sparse files ----------------------------------------------------------------------

@st.composite
def sparse_files(draw):
    """(file size, map size, operations): writes at aligned and unaligned places, some of zero
    bytes, and some punched holes."""
    size = draw(st.one_of(
        st.integers(0, 64 * MiB),
        st.integers(0, 64) .map(lambda k: k * BS),
        st.integers(1, 16 * BS),
        st.sampled_from([64 * MiB, 64 * MiB - 1, 64 * MiB - 512, BS - 1, BS + 1, 1])))
    # The server maps the size rounded down to 512; sometimes do the same.
    map_size = draw(st.sampled_from([size, size - size % 512]))
    ops = []
    if size:
        for _ in range(draw(st.integers(0, 24))):
            kind = draw(st.sampled_from(["aligned", "unaligned", "zeros", "punch"]))
            if kind == "aligned":
                off = draw(st.integers(0, (size - 1) // BS)) * BS
                n = draw(st.integers(1, 64)) * BS
            else:
                off = draw(st.integers(0, size - 1))
                n = draw(st.integers(1, 300_000))
            ops.append((kind, off, min(n, size - off)))
    return size, map_size, ops


def make_sparse(dirpath: str, size: int, ops) -> str:
    fd, path = tempfile.mkstemp(dir=dirpath)
    try:
        os.ftruncate(fd, size)
        for i, (kind, off, n) in enumerate(ops):
            if kind == "punch":
                punch(fd, off, n)
            elif kind == "zeros":
                os.pwrite(fd, bytes(n), off)
            else:
                os.pwrite(fd, pattern(i, n), off)
        assert os.fstat(fd).st_size == size
    finally:
        os.close(fd)
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_files())
def test_random_sparse_file_every_method(workdir, case):
    size, map_size, ops = case
    path = make_sparse(workdir, size, ops)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            fiemap_ok = fiemap_supported(fd)
            data = seek_scan(fd, map_size)
            expected = block_runs(data, map_size)
            for forced in (None, "fiemap", "seek", "none"):
                m = AllocationMap(map_size)
                got_method = m.build(fd, forced)
                assert got_method == expected_method(forced, fiemap_ok)
                assert m.method == got_method
                assert m.complete
                want = expected if forced != "none" else block_runs([(0, map_size)], map_size)
                assert m.extents() == want, (forced, ops)
                assert m.allocated_bytes() == sum(n for _, n, a in want if a)
                if got_method == "seek" and map_size == size:
                    assert m.extents_found == len(data)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_files(), st.data())
def test_random_sparse_file_subranges(workdir, case, draw):
    """extents(offset, length) of a built map: the reference runs of exactly that range;
    is_allocated agrees."""
    size, map_size, ops = case
    path = make_sparse(workdir, size, ops)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            m = AllocationMap(map_size)
            m.build(fd)
            data = seek_scan(fd, map_size)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
    for _ in range(10):
        if map_size == 0:
            break
        off = draw.draw(st.integers(0, map_size - 1))
        n = draw.draw(st.integers(0, map_size - off))
        want = block_runs(data, map_size, off, off + n)
        got = m.extents(off, n)
        assert got == want, (off, n)
        check_runs(got, off, n)
        if n:
            assert m.is_allocated(off, n) == any(a for _, _, a in want)


def test_automatic_fallback_levels(workdir):
    """Without forcing: FIEMAP where the file system has it, else SEEK (tmpfs refuses FIEMAP
    but knows SEEK_DATA), else "none" (a pipe knows neither)."""
    path = os.path.join(workdir, "fallback.img")
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB + 100)
        f.write(pattern(1, 10_000))
    fd = os.open(path, os.O_RDONLY)
    try:
        m = AllocationMap(8 * MiB)
        assert m.build(fd) == expected_method(None, fiemap_supported(fd))
        assert m.extents() == block_runs([(3 * MiB + 100, 3 * MiB + 10_100)], 8 * MiB)
    finally:
        os.close(fd)
        os.unlink(path)
    if os.path.isdir("/dev/shm"):
        fd, shm = tempfile.mkstemp(dir="/dev/shm")
        try:
            os.ftruncate(fd, 8 * MiB)
            os.pwrite(fd, pattern(2, 5000), 5 * MiB)
            m = AllocationMap(8 * MiB)
            method = m.build(fd)
            assert method == expected_method(None, fiemap_supported(fd))
            assert m.extents() == block_runs(seek_scan(fd, 8 * MiB), 8 * MiB)
            assert m.is_allocated(5 * MiB, 1)
            assert not m.is_allocated(0, 5 * MiB)
        finally:
            os.close(fd)
            os.unlink(shm)
    r, w = os.pipe()
    try:
        m = AllocationMap(1 * MiB)
        assert m.build(r) == "none"
        assert m.method == "none"
        assert m.complete
        assert m.extents() == [(0, MiB, True)]
    finally:
        os.close(r)
        os.close(w)


def test_unknown_method_refused(workdir):
    m = AllocationMap(BS)
    with pytest.raises(ValueError):
        m.build(0, "magic")
    assert not m.complete


def test_preallocated_extents_are_never_reported_as_holes(workdir):
    """fallocate()d (unwritten) extents read as zeroes; the map may call them allocated (FIEMAP
    does) or holes (SEEK_DATA does), but data must never be reported as a hole."""
    path = os.path.join(workdir, "prealloc.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 4 * MiB)
        os.posix_fallocate(fd, 1 * MiB, 1 * MiB)
        os.pwrite(fd, pattern(3, 3 * BS), 1 * MiB + 5 * BS)
        os.pwrite(fd, pattern(4, 100), 3 * MiB)
        data = seek_scan(fd, 4 * MiB)
        for forced in (None, "seek"):
            m = AllocationMap(4 * MiB)
            m.build(fd, forced)
            for s, e in data:
                assert m.is_allocated(s, e - s)
                for o, n, a in m.extents(s, e - s):
                    assert a, (forced, o, n)
            assert not m.is_allocated(0, 1 * MiB)
            assert not m.is_allocated(2 * MiB, 1 * MiB)
    finally:
        os.close(fd)
        os.unlink(path)


# -- before the build ---------------------------------------------------------------------------

def test_incomplete_map_answers_allocated(workdir):
    m = AllocationMap(10 * BS + 5)
    assert not m.complete
    assert m.method == "pending"
    assert m.extents() == [(0, 10 * BS + 5, True)]
    assert m.is_allocated(0)
    assert m.is_allocated(3 * BS, 2 * BS)
    m.clear(0, 10 * BS + 5)
    assert m.extents() == [(0, 10 * BS + 5, True)]
    assert m.extents(BS + 1, 7) == [(BS + 1, 7, True)]
    assert m.is_allocated(9 * BS, BS + 5)


def test_marks_before_build_survive_it(workdir):
    """A write that lands while the map is being built marks its blocks; the builder only adds
    to them, so the write is still marked when the build is complete."""
    path = os.path.join(workdir, "during.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 * MiB)
        os.pwrite(fd, pattern(5, BS), 100 * BS)
        for forced in (None, "seek", "none"):
            m = AllocationMap(1 * MiB)
            m.mark(10 * BS + 7, 2)          # a write into a hole, "during" the build
            assert m.build(fd, forced) == expected_method(forced, fiemap_supported(fd))
            want = [(0, MiB, True)] if forced == "none" else block_runs(
                [(10 * BS, 11 * BS), (100 * BS, 101 * BS)], MiB)
            assert m.extents() == want
    finally:
        os.close(fd)
        os.unlink(path)


def test_slowed_build_is_correct(workdir):
    path = os.path.join(workdir, "slow.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 16 * MiB)
        for i in range(20):
            os.pwrite(fd, pattern(i, 100), i * 200 * BS + 17)
        want = block_runs(seek_scan(fd, 16 * MiB), 16 * MiB)
        for forced in ("fiemap", "seek"):
            m = AllocationMap(16 * MiB)
            start = time.monotonic()
            m.build(fd, forced, 2)
            elapsed = time.monotonic() - start
            assert m.extents() == want
            if m.method == "seek":
                assert elapsed >= 20 * 0.002     # one sleep per data extent
    finally:
        os.close(fd)
        os.unlink(path)


# -- mark / clear / extents against a model --------------------------------------------------

class Model:
    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks = bytearray(-(-size // BS))

    def mark(self, off: int, n: int) -> None:
        if n == 0 or off >= self.size:
            return
        end = min(off + n, self.size)
        for b in range(off // BS, -(-end // BS)):
            self.blocks[b] = 1

    def clear(self, off: int, n: int) -> None:
        if n == 0 or off >= self.size:
            return
        end = min(off + n, self.size)
        first = -(-off // BS)
        last = -(-end // BS) if end == self.size else end // BS
        for b in range(first, last):
            self.blocks[b] = 0

    def runs(self, off: int, n: int) -> list[tuple[int, int, bool]]:
        data = [(b * BS, (b + 1) * BS) for b, v in enumerate(self.blocks) if v]
        return block_runs(data, self.size, off, off + n)


@st.composite
def map_ops(draw):
    size = draw(st.one_of(st.integers(1, 200 * BS), st.integers(1, 200).map(lambda k: k * BS)))
    ops = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["mark", "clear"]))
        off = draw(st.one_of(st.integers(0, size + BS),
                             st.integers(0, size // BS).map(lambda k: k * BS)))
        n = draw(st.one_of(st.integers(0, 3 * BS), st.integers(0, size + 2 * BS),
                           st.integers(0, 8).map(lambda k: k * BS)))
        ops.append((kind, off, n))
    return size, ops


@settings(max_examples=150, deadline=None)
@given(map_ops(), st.data())
def test_mark_clear_extents_model(case, draw):
    size, ops = case
    m = BlockBitmap(size)
    model = Model(size)
    for kind, off, n in ops:
        getattr(m, kind)(off, n)
        getattr(model, kind)(off, n)
    got = m.extents()
    assert got == model.runs(0, size), ops
    check_runs(got, 0, size)
    for _ in range(8):
        off = draw.draw(st.integers(0, size - 1))
        n = draw.draw(st.integers(0, size - off))
        got = m.extents(off, n)
        assert got == model.runs(off, n), (ops, off, n)
        check_runs(got, off, n)
        if n:
            assert m.is_allocated(off, n) == any(model.blocks[off // BS:-(-(off + n) // BS)])


# -- the sparse leaves: 4096 blocks each, allocated on first mark -------------------------------

LEAF = 512           # blocks per leaf (64 bytes)
DIR = 64 * LEAF      # blocks per directory (64 leaf pointers: 512 bytes)


class ByteModel:
    """One flag per block of a map with 1-byte blocks (shift 0: a leaf is 4096 bytes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks = bytearray(size)

    def mark(self, off: int, n: int) -> None:
        end = min(off + n, self.size)
        self.blocks[off:max(off, end)] = b"\1" * max(0, end - off)

    def clear(self, off: int, n: int) -> None:
        end = min(off + n, self.size)
        self.blocks[off:max(off, end)] = bytes(max(0, end - off))

    def runs(self) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        for i, v in enumerate(self.blocks):
            if out and out[-1][2] == bool(v):
                out[-1] = (out[-1][0], out[-1][1] + 1, out[-1][2])
            else:
                out.append((i, 1, bool(v)))
        return out


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5 * LEAF + 100), st.lists(
    st.tuples(st.sampled_from(["mark", "clear", "take"]), st.integers(0, 6 * LEAF),
              st.one_of(st.integers(0, 70), st.integers(0, 3 * LEAF),
                        st.integers(0, 3).map(lambda k: k * LEAF))), max_size=30))
def test_leaves_against_a_model(size, ops):
    """Marks, clears and take_run across leaf boundaries, on leaves that exist or not."""
    check_against_model(size, ops)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3 * DIR + 100), st.lists(
    st.tuples(st.sampled_from(["mark", "clear", "take"]), st.integers(0, 3 * DIR + 200),
              st.one_of(st.integers(0, 70), st.integers(0, 2 * DIR),
                        st.integers(0, 3).map(lambda k: k * DIR),
                        st.integers(0, 3).map(lambda k: k * LEAF))), max_size=20))
def test_directories_against_a_model(size, ops):
    """The same across directory boundaries, on directories that exist or not."""
    check_against_model(size, ops)


def check_against_model(size: int, ops: list[tuple[str, int, int]]) -> None:
    m = BlockBitmap(size, 0)
    model = ByteModel(size)
    for kind, off, n in ops:
        if kind == "take":
            run = m.take_run(off, n)
            first = next((i for i in range(off, size) if model.blocks[i]), None)
            if first is None:
                assert run is None
                continue
            length = 1
            while first + length < size and length < max(n, 1) and model.blocks[first + length]:
                length += 1
            assert run == (first, length), (kind, off, n)
            model.clear(first, length)
        else:
            getattr(m, kind)(off, n)
            getattr(model, kind)(off, n)
    assert m.extents() == model.runs()
    assert m.count_bytes() == sum(model.blocks)
    m.reset()
    assert m.count_bytes() == 0 and m.extents() == ([(0, size, False)] if size else [])


def test_a_sparse_15_tib_map_costs_its_extents_not_its_size():
    """64 KiB of directory pointers per TiB (8 bytes per 128 MiB), plus 512 bytes per 128 MiB
    region and 64 bytes per 2 MiB region that hold a mark; scans skip empty regions whole."""
    size = 15 * TiB
    m = DirtyMap(size)
    pointers = size // (DIR * BS) * 8
    assert m.memory_bytes == pointers == 15 * 64 * 1024
    offsets = sorted({(i * 7919 * 104729 * BS) % size // BS * BS for i in range(20000)})
    start = time.monotonic()
    for off in offsets:
        m.mark(off, BS)
    assert m.count_bytes() == len(offsets) * BS
    assert m.memory_bytes <= pointers + len(offsets) * (512 + 64)
    runs = [run for run in m.extents() if run[2]]
    assert [off for off, _, _ in runs][:100] == offsets[:100] and len(runs) <= len(offsets)
    taken = []
    at = 0
    while (run := m.take_run(at, 8 * MiB)) is not None:
        taken.append(run)
        at = run[0] + run[1]
    assert sum(n for _, n in taken) == len(offsets) * BS and m.count_bytes() == 0
    m.reset()
    assert time.monotonic() - start < 10
    assert not m.is_allocated(0, size)


def test_clearing_never_allocates():
    m = BlockBitmap(TiB)
    m.clear(0, TiB)
    m.reset()
    assert m.memory_bytes == TiB // (DIR * BS) * 8


# -- the coverage map: byte ranges ---------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3000), st.lists(st.tuples(st.integers(0, 3100), st.integers(0, 800)),
                                      max_size=40))
def test_coverage_against_a_model(size, writes):
    cov = CoverageMap(size)
    model = bytearray(size)
    for off, n in writes:
        cov.cover(off, n)
        # (the total is kept as ranges merge, for the status line: never recounted)
        assert cov.covered_bytes() == sum(e - s for s, e in cov.ranges())
        end = min(off + n, size)
        if off < end:
            model[off:end] = b"\1" * (end - off)
    want = [(s, s + n) for s, n, v in ByteModel.runs(_as_model(model)) if v]
    assert cov.ranges() == want
    assert cov.covered_bytes() == sum(model)


def _as_model(blocks: bytearray) -> ByteModel:
    m = ByteModel(len(blocks))
    m.blocks = blocks
    return m


def test_coverage_of_a_mirror_is_one_range():
    """In order, 4 GiB WRITE_ZEROES and 4 KiB WRITEs: one range, 16 bytes of it however big."""
    size = 15 * TiB
    cov = CoverageMap(size)
    at = 0
    while at < size:
        n = min(size - at, (4 << 30) - BS if (at // BS) % 3 else BS)
        cov.cover(at, n)
        at += n
        assert cov.ranges() == [(0, at)]
    assert cov.covered_bytes() == size and cov.memory_bytes <= 64 * 16


def test_coverage_refuses_a_new_range_when_full_but_merges_still():
    cov = CoverageMap(1 << 40)
    limit = 256 * 1024
    for i in range(limit):
        cov.cover(i * 4 * BS, BS)
    with pytest.raises(MemoryError):
        cov.cover(limit * 4 * BS, BS)          # a new disjoint range: no room
    cov.cover(BS, 3 * BS)                      # fills the gap: ranges 0 and 1 merge
    cov.cover(limit * 4 * BS, BS)              # now there is room again
    assert len(cov.ranges()) == limit


def test_mark_touches_partial_blocks():
    m = BlockBitmap(10 * BS)
    m.mark(BS - 1, 2)                   # the last byte of block 0, the first of block 1
    assert m.extents() == [(0, 2 * BS, True), (2 * BS, 8 * BS, False)]
    m.mark(5 * BS + 100, 1)
    assert m.extents(4 * BS, 3 * BS) == [(4 * BS, BS, False), (5 * BS, BS, True),
                                         (6 * BS, BS, False)]
    m.mark(9 * BS, 100 * BS)            # past the end: clipped
    assert m.extents(8 * BS, 2 * BS) == [(8 * BS, BS, False), (9 * BS, BS, True)]
    m.mark(20 * BS, BS)                 # wholly past the end: nothing
    m.mark(3 * BS, 0)                   # empty: nothing
    assert not m.is_allocated(3 * BS, BS)


def test_clear_only_whole_blocks():
    m = BlockBitmap(10 * BS)
    m.mark(0, 10 * BS)
    m.clear(BS + 1, 2 * BS)             # touches blocks 1..3, contains only block 2
    assert m.extents() == [(0, 2 * BS, True), (2 * BS, BS, False), (3 * BS, 7 * BS, True)]
    m.clear(5 * BS, BS - 1)             # not one whole block
    assert m.is_allocated(5 * BS, BS)
    m.clear(5 * BS, BS)
    assert not m.is_allocated(5 * BS, BS)


def test_clear_reaching_the_end_clears_the_partial_last_block():
    size = 3 * BS + 1000
    m = BlockBitmap(size)
    m.mark(0, size)
    m.clear(3 * BS, 999)                # stops short of the end: the partial block stays
    assert m.extents() == [(0, size, True)]
    m.clear(3 * BS, 1000)               # reaches the end: it counts as whole
    assert m.extents() == [(0, 3 * BS, True), (3 * BS, 1000, False)]
    m.mark(size - 1, 1)
    m.clear(2 * BS + 5, 10 * BS)        # beyond the end: clipped, still reaches it
    assert m.extents() == [(0, 3 * BS, True), (3 * BS, 1000, False)]
    m.clear(BS, 0)
    assert m.extents(0, 3 * BS) == [(0, 3 * BS, True)]


def test_extents_merge_and_cover_exactly():
    m = BlockBitmap(64 * BS)
    for b in range(10, 20):
        m.mark(b * BS, BS)               # ten adjacent marks: one run
    m.mark(40 * BS, 30 * BS)             # clipped at the end of the map
    assert m.extents() == [(0, 10 * BS, False), (10 * BS, 10 * BS, True),
                           (20 * BS, 20 * BS, False), (40 * BS, 24 * BS, True)]
    assert m.extents(15 * BS + 3, 30 * BS) == [(15 * BS + 3, 5 * BS - 3, True),
                                              (20 * BS, 20 * BS, False),
                                              (40 * BS, 5 * BS + 3, True)]
    assert m.extents(11 * BS, 1) == [(11 * BS, 1, True)]
    assert m.extents(11 * BS, 0) == []
    assert m.extents(63 * BS + 7) == [(63 * BS + 7, BS - 7, True)]


def test_runs_across_many_words():
    """Runs longer than one 64-block word, starting and ending mid-word."""
    size = 1000 * BS
    m = BlockBitmap(size)
    m.mark(37 * BS, 500 * BS)
    m.mark(700 * BS, 300 * BS)
    assert m.extents() == [(0, 37 * BS, False), (37 * BS, 500 * BS, True),
                           (537 * BS, 163 * BS, False), (700 * BS, 300 * BS, True)]
    m.clear(64 * BS, 128 * BS)
    assert m.extents(0, 300 * BS) == [(0, 37 * BS, False), (37 * BS, 27 * BS, True),
                                      (64 * BS, 128 * BS, False), (192 * BS, 108 * BS, True)]


# -- sizes at the extremes ----------------------------------------------------------------------

def test_one_tib_sparse_file(workdir):
    path = os.path.join(workdir, "huge.img")
    places = [(0, 1), (1 << 30, BS), ((1 << 30) + 12345, 10_000), (777 * MiB * 1024 + 5, 3),
              (TiB - 2 * BS, 100), (TiB - 1, 1)]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            os.ftruncate(fd, TiB)
        except OSError as e:
            pytest.skip(f"the file system here cannot hold a 1 TiB sparse file: {e}")
        for i, (off, n) in enumerate(places):
            os.pwrite(fd, pattern(i, n), off)
        want = block_runs(seek_scan(fd, TiB), TiB)
        assert want == block_runs([(o, o + n) for o, n in places], TiB)
        for forced in (None, "seek"):
            m = AllocationMap(TiB)
            start = time.monotonic()
            method = m.build(fd, forced)
            elapsed = time.monotonic() - start
            assert method == expected_method(forced, fiemap_supported(fd))
            assert elapsed < 5, f"{method} took {elapsed:.1f} s for a few extents"
            assert m.extents() == want
            assert m.allocated_bytes() == sum(n for _, n, a in want if a)
            assert not m.is_allocated(BS, (1 << 30) - BS)
            assert m.is_allocated(TiB - 1)
    finally:
        os.close(fd)
        os.unlink(path)


def test_zero_size_file(workdir):
    path = os.path.join(workdir, "empty.img")
    open(path, "wb").close()
    fd = os.open(path, os.O_RDONLY)
    try:
        for forced in (None, "fiemap", "seek", "none"):
            m = AllocationMap(0)
            assert m.size == 0
            assert m.build(fd, forced) in METHODS
            assert m.complete
            assert m.extents() == []
            assert m.allocated_bytes() == 0
            m.mark(0, BS)
            m.clear(0, BS)
            assert m.extents() == []
    finally:
        os.close(fd)
        os.unlink(path)


def test_file_smaller_than_a_block(workdir):
    path = os.path.join(workdir, "tiny.img")
    with open(path, "wb") as f:
        f.write(pattern(9, 1000))
    fd = os.open(path, os.O_RDONLY)
    try:
        for forced in (None, "seek", "none"):
            m = AllocationMap(1000)
            m.build(fd, forced)
            assert m.extents() == [(0, 1000, True)]
            m.clear(0, 999)
            assert m.extents() == [(0, 1000, True)]
            m.clear(0, 1000)
            assert m.extents() == [(0, 1000, False)]
    finally:
        os.close(fd)
        os.unlink(path)


def test_each_bitmap_is_built_in_a_state_that_cannot_lie():
    """Only the allocation map starts incomplete (answering "allocated" everywhere until it is
    built); the plain and dirty bitmaps know all they will ever know from the start, and start
    empty (4 KiB blocks); so does the coverage map (byte ranges)."""
    amap = AllocationMap(MiB)
    assert not amap.complete and amap.is_allocated(0, MiB) and amap.method == "pending"
    for kind in (BlockBitmap, DirtyMap):
        m = kind(MiB)
        assert m.complete and not m.is_allocated(0, MiB) and m.count_bytes() == 0, kind
        m.mark(0, 1)
        assert m.count_bytes() == BS, kind
    cov = CoverageMap(MiB)
    assert cov.covered_bytes() == 0 and cov.ranges() == []
    cov.cover(0, 1)
    assert cov.covered_bytes() == 1

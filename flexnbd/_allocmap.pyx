# cython: language_level=3
"""The allocation map: which 4096-byte blocks of the export may hold data.

Built from FS_IOC_FIEMAP (in windows, with FIEMAP_FLAG_SYNC so delayed allocations show);
where the file system refuses FIEMAP, from lseek SEEK_DATA/SEEK_HOLE (ENXIO: the rest is a
hole); where both fail, everything counts as allocated. The method is probed once and kept.

The builder only ever sets bits, and every write marks its blocks itself, so writes that land
while the map is being built end up marked whatever the interleaving. Until the build is
complete, questions about the map answer "allocated" (see amap_run in the .pxd).
"""

from libc.stdint cimport uint64_t

from flexnbd._sys cimport *


cdef enum:
    FIEMAP_WINDOW = 512          # extents asked for per ioctl

METHODS = ("fiemap", "seek", "none")


cdef int build_fiemap(amap_t *m, int fd, int delay_ms, uint64_t *count) noexcept nogil:
    """0 when built, else the errno that made FIEMAP unusable (before anything was marked)."""
    cdef size_t bufsize = sizeof(fiemap) + FIEMAP_WINDOW * sizeof(fiemap_extent)
    cdef fiemap *fm = <fiemap *>calloc(1, bufsize)
    cdef uint64_t start = 0
    cdef uint32_t i
    cdef fiemap_extent *e
    cdef int first = 1
    cdef int done = 0
    cdef int err
    if fm == NULL:
        return ENOMEM
    while not done and start < m.size:
        memset(fm, 0, bufsize)
        fm.fm_start = start
        fm.fm_length = FIEMAP_MAX_OFFSET - start
        fm.fm_flags = FIEMAP_FLAG_SYNC
        fm.fm_extent_count = FIEMAP_WINDOW
        if ioctl(fd, FS_IOC_FIEMAP, fm) < 0:
            err = errno
            free(fm)
            if first:
                return err if err else EIO
            # Failing half-way: what is not known yet must count as allocated.
            amap_mark(m, start, m.size - start)
            return 0
        first = 0
        if fm.fm_mapped_extents == 0:
            break
        for i in range(fm.fm_mapped_extents):
            e = &fm.fm_extents[i]
            # Unwritten (preallocated) extents read as zeroes: holes, as SEEK_DATA sees them.
            if not (e.fe_flags & FIEMAP_EXTENT_UNWRITTEN):
                amap_mark(m, e.fe_logical, e.fe_length)
                count[0] += 1
            if e.fe_flags & FIEMAP_EXTENT_LAST:
                done = 1
        e = &fm.fm_extents[fm.fm_mapped_extents - 1]
        if e.fe_logical + e.fe_length <= start:
            break
        start = e.fe_logical + e.fe_length
        if delay_ms:
            usleep(delay_ms * 1000)
    free(fm)
    return 0


cdef int build_seek(amap_t *m, int fd, int delay_ms, uint64_t *count) noexcept nogil:
    """0 when built, else the errno that made SEEK_DATA unusable (before anything was marked)."""
    cdef off_t pos = 0
    cdef off_t data, hole
    cdef int first = 1
    while <uint64_t>pos < m.size:
        data = lseek(fd, pos, SEEK_DATA)
        if data < 0:
            if errno == ENXIO:
                return 0            # the rest is a hole
            if first:
                return errno
            amap_mark(m, pos, m.size - pos)
            return 0
        first = 0
        hole = lseek(fd, data, SEEK_HOLE)
        if hole <= data:                # an error, or no progress: assume data from here
            amap_mark(m, data, m.size - data)
            return 0
        amap_mark(m, data, hole - data)
        count[0] += 1
        pos = hole
        if delay_ms:
            usleep(delay_ms * 1000)
    return 0


cdef class BlockBitmap:
    """One bit per block (``1 << shift`` bytes) for ``size`` bytes; starts empty. Complete
    from the start: a plain bitmap knows all it will ever know (only the AllocationMap has to
    be built first)."""

    default_shift = BLOCK_SHIFT

    def __cinit__(self, uint64_t size, int shift=-1, *args, **kwargs):
        cdef pthread_rwlockattr_t attr
        if shift < 0:
            shift = type(self).default_shift
        self.m.size = size
        self.m.shift = shift
        self.m.nblocks = (size + (<uint64_t>1 << shift) - 1) >> shift
        self.m.nleaves = (self.m.nblocks + LEAF_BLOCKS - 1) >> LEAF_SHIFT
        self.m.ndirs = (self.m.nleaves + DIR_LEAVES - 1) >> DIR_SHIFT
        self.m.dirs = <unsigned long long ***>calloc(self.m.ndirs + 1, sizeof(void *))
        if self.m.dirs == NULL:
            raise MemoryError()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.m.lock, &attr)
        self.m.complete = 1

    def __dealloc__(self):
        cdef uint64_t d
        cdef int j
        pthread_rwlock_destroy(&self.m.lock)
        if self.m.dirs != NULL:
            for d in range(self.m.ndirs):
                if self.m.dirs[d] != NULL:
                    for j in range(DIR_LEAVES):
                        free(self.m.dirs[d][j])
                    free(self.m.dirs[d])
        free(self.m.dirs)

    @property
    def complete(self):
        return bool(load_acquire(&self.m.complete))

    @property
    def size(self):
        return self.m.size

    def mark(self, uint64_t offset, uint64_t length):
        amap_mark(&self.m, offset, length)

    def clear(self, uint64_t offset, uint64_t length):
        amap_clear(&self.m, offset, length)

    def is_allocated(self, uint64_t offset, uint64_t length=1):
        """Whether any block touching the range is set (True until complete)."""
        cdef int allocated
        cdef uint64_t n
        while length:
            n = amap_run(&self.m, offset, length, &allocated)
            if allocated or n == 0:
                return True
            offset += n
            length -= n
        return False

    def extents(self, uint64_t offset=0, length=None):
        """[(offset, length, set)] runs covering the range, for tests and tools."""
        cdef int allocated
        cdef uint64_t n
        cdef uint64_t left = self.m.size - offset if length is None else length
        out = []
        while left:
            n = amap_run(&self.m, offset, left, &allocated)
            if n == 0:
                break
            # (no negative indexing: the extensions are built with wraparound off)
            if out and out[len(out) - 1][2] == bool(allocated):
                start, length_so_far, state = out.pop()
                out.append((start, length_so_far + n, state))
            else:
                out.append((offset, n, bool(allocated)))
            offset += n
            left -= n
        return out

    def take_run(self, uint64_t from_offset, uint64_t max_length):
        """Clear and return the next run of set blocks as (offset, length), or None."""
        cdef uint64_t start = 0
        cdef uint64_t n
        with nogil:
            n = amap_take_run(&self.m, from_offset, max_length, &start)
        return (start, n) if n else None

    def count_bytes(self):
        """Bytes in set blocks (the last block may count in full)."""
        cdef uint64_t n
        with nogil:
            n = amap_count(&self.m)
        return min(n << self.m.shift, self.m.size)

    def reset(self):
        with nogil:
            amap_reset(&self.m)

    @property
    def memory_bytes(self):
        """What the map holds in memory: its directory pointers, and the directories and
        leaves allocated so far."""
        return amap_memory(&self.m)

    def set_all(self):
        amap_mark(&self.m, 0, self.m.size)


cdef class AllocationMap(BlockBitmap):
    """Which 4 KiB blocks of the export may hold data. Incomplete (answering "allocated"
    everywhere) until ``build()`` has read the file's layout."""

    def __cinit__(self, uint64_t size, *args, **kwargs):
        self.m.complete = 0
        self.method = "pending"
        self.extents_found = 0

    def build(self, int fd, str method=None, int delay_ms=0):
        """Build the map from the file (blocking, without the GIL). ``method`` forces a
        method (a test knob: "seek" or "none" pretend the better ones are refused);
        ``delay_ms`` sleeps after every window (a test knob to slow the builder down)."""
        cdef uint64_t count = 0
        cdef int err = ENOTSUP
        if method not in (None,) + METHODS:
            raise ValueError(f"unknown allocation map method {method!r}")
        chosen = "none"
        if method in (None, "fiemap"):
            with nogil:
                err = build_fiemap(&self.m, fd, delay_ms, &count)
            if err == 0:
                chosen = "fiemap"
        if err and method in (None, "fiemap", "seek"):
            with nogil:
                err = build_seek(&self.m, fd, delay_ms, &count)
            if err == 0:
                chosen = "seek"
        if err:
            amap_mark(&self.m, 0, self.m.size)
        self.method = chosen
        self.extents_found = count
        store_release(&self.m.complete, 1)
        return chosen

    def allocated_bytes(self):
        """Bytes of the export in allocated blocks, exactly (a partial last block counts what
        it holds); the whole size until the map is complete. A popcount: no list of extents
        (a million extents as Python tuples cost ~265 MiB at the peak)."""
        cdef uint64_t n, tail
        cdef int allocated
        if not load_acquire(&self.m.complete):
            return self.m.size
        with nogil:
            n = amap_count(&self.m) << self.m.shift
        tail = self.m.size & ((<uint64_t>1 << self.m.shift) - 1)
        if tail and n:
            amap_run(&self.m, self.m.size - tail, tail, &allocated)
            if allocated:
                n -= (<uint64_t>1 << self.m.shift) - tail
        return n

    def span(self, uint64_t offset, uint64_t max_payload, bint holes_are_payload=False,
             end=None):
        """(length, payload): the range from ``offset`` that holds ``max_payload`` bytes of
        data (and of holes too, when ``holes_are_payload``), or up to ``end`` (the export's
        end by default): the mirror's next batch of requests. Holes in between cost nothing,
        however long."""
        cdef uint64_t length = 0, payload = 0, n, at
        cdef uint64_t stop = self.m.size if end is None or end > self.m.size else end
        cdef int allocated
        with nogil:
            while offset + length < stop and payload < max_payload:
                at = offset + length
                n = amap_run(&self.m, at, stop - at, &allocated)
                if n == 0:
                    break
                if allocated or holes_are_payload:
                    if n > max_payload - payload:
                        n = max_payload - payload
                    payload += n
                length += n
        return length, payload


cdef class DirtyMap(BlockBitmap):
    """The mirror's dirty blocks (4 KiB): every write, trim and zero marks its blocks while
    tracking is on; the mirror takes runs out of it."""


# --------------------------------------------------------------------------------------------
# Listen mode's coverage: the byte ranges one sender's session wrote.

cdef class CoverageMap:
    """Listen mode: the byte ranges one sender's session wrote (its serve loop records them:
    ``cover``), merged as they come. Complete when one range spans the export. Memory: 16
    bytes per disjoint range, whatever the export's size."""

    def __cinit__(self, uint64_t size):
        self.c.size = size

    def __dealloc__(self):
        free(self.c.at)

    @property
    def size(self):
        return self.c.size

    def cover(self, uint64_t offset, uint64_t length):
        """Record a write (for tests; the serve loop calls ``cover`` itself)."""
        if no_room_to_cover(&self.c, offset, length):
            raise MemoryError("too many disjoint ranges")
        cover(&self.c, offset, length)

    def covered_bytes(self):
        """Bytes written at least once (kept as the ranges change: safe from any thread)."""
        return atomic_load64(&self.c.covered)

    @property
    def received_bytes(self):
        """WRITE payload bytes the session wrote (any thread may read it)."""
        return atomic_load64(&self.c.received)

    @property
    def zeroed_bytes(self):
        """WRITE_ZEROES bytes the session zeroed (any thread may read it)."""
        return atomic_load64(&self.c.zeroed)

    def runs(self, uint64_t offset, uint64_t length):
        """[(length, covered)] from ``offset``: what BLOCK_STATUS reports (for tests)."""
        cdef int covered
        cdef uint64_t n
        out = []
        while length:
            n = coverage_run(&self.c, offset, length, &covered)
            out.append((n, bool(covered)))
            offset += n
            length -= n
        return out

    def ranges(self):
        """[(start, end)] written, sorted and disjoint."""
        return [(self.c.at[2 * i], self.c.at[2 * i + 1]) for i in range(self.c.n)]

    @property
    def memory_bytes(self):
        return self.c.cap * 2 * sizeof(uint64_t)


cdef size_t first_reaching(const coverage_t *c, uint64_t start) noexcept nogil:
    """The index of the first range that ends at or after ``start`` (touches or follows it)."""
    cdef size_t lo = 0, hi = c.n, mid
    while lo < hi:
        mid = (lo + hi) // 2
        if c.at[2 * mid + 1] < start:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef uint64_t coverage_run(const coverage_t *c, uint64_t offset, uint64_t length,
                           int *covered) noexcept nogil:
    """The run from ``offset`` (at most ``length`` bytes) that is all covered or all not
    (``covered[0]`` says which): for the flexnbd:coverage meta context."""
    cdef size_t i = first_reaching(c, offset + 1)     # the first range ending past offset
    cdef uint64_t n
    if i < c.n and c.at[2 * i] <= offset:
        covered[0] = 1
        n = c.at[2 * i + 1] - offset
    else:
        covered[0] = 0
        n = c.at[2 * i] - offset if i < c.n else length
    return n if n < length else length


cdef int clip(const coverage_t *c, uint64_t offset, uint64_t *length) noexcept nogil:
    """Clip [offset, offset+length) to the export; 0 when nothing is left."""
    if length[0] == 0 or offset >= c.size:
        return 0
    if length[0] > c.size - offset:
        length[0] = c.size - offset
    return 1


cdef int no_room_to_cover(const coverage_t *c, uint64_t offset, uint64_t length) noexcept nogil:
    """This write would start a new disjoint range and the list is full."""
    cdef size_t i
    if not clip(c, offset, &length) or c.n < MAX_RANGES:
        return 0
    i = first_reaching(c, offset)
    return i == c.n or c.at[2 * i] > offset + length


cdef void cover(coverage_t *c, uint64_t offset, uint64_t length) noexcept nogil:
    """Record that [offset, offset+length) was written: merged with every range it overlaps
    or touches, else inserted in order (dropped only when no_room_to_cover said so first)."""
    cdef uint64_t start, end
    cdef uint64_t merged = 0     # bytes of the ranges it merges with (counted already)
    cdef size_t i, j
    if not clip(c, offset, &length):
        return
    start = offset
    end = offset + length
    i = first_reaching(c, start)
    j = i
    while j < c.n and c.at[2 * j] <= end:        # ranges i..j-1 overlap or touch it
        merged += c.at[2 * j + 1] - c.at[2 * j]
        j += 1
    if j > i:
        if c.at[2 * i] < start:
            start = c.at[2 * i]
        if c.at[2 * j - 1] > end:
            end = c.at[2 * j - 1]
        c.at[2 * i] = start
        c.at[2 * i + 1] = end
        memmove(&c.at[2 * i + 2], &c.at[2 * j], (c.n - j) * 2 * sizeof(uint64_t))
        c.n -= j - i - 1
        atomic_store64(&c.covered, c.covered + (end - start) - merged)
        return
    if c.n == c.cap and not grow(c):
        return
    memmove(&c.at[2 * i + 2], &c.at[2 * i], (c.n - i) * 2 * sizeof(uint64_t))
    c.at[2 * i] = start
    c.at[2 * i + 1] = end
    c.n += 1
    atomic_store64(&c.covered, c.covered + (end - start))


cdef int grow(coverage_t *c) noexcept nogil:
    cdef size_t cap = 64 if c.cap == 0 else c.cap * 2
    cdef uint64_t *grown
    if c.cap >= MAX_RANGES:
        return 0
    if cap > MAX_RANGES:
        cap = MAX_RANGES
    grown = <uint64_t *>realloc(c.at, cap * 2 * sizeof(uint64_t))
    if grown == NULL:
        return 0
    c.at = grown
    c.cap = cap
    return 1

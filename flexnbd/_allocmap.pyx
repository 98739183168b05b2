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
        self.m.words = <unsigned long long *>calloc((self.m.nblocks + 63) // 64 + 1, 8)
        if self.m.words == NULL:
            raise MemoryError()
        pthread_rwlockattr_init(&attr)
        pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP)
        pthread_rwlock_init(&self.m.lock, &attr)
        self.m.complete = 1

    def __dealloc__(self):
        pthread_rwlock_destroy(&self.m.lock)
        free(self.m.words)

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
        amap_reset(&self.m)

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
        return sum(n for _, n, a in self.extents() if a)


cdef class DirtyMap(BlockBitmap):
    """The mirror's dirty blocks (4 KiB): every write, trim and zero marks its blocks while
    tracking is on; the mirror takes runs out of it."""


# --------------------------------------------------------------------------------------------
# Listen mode's coverage: the blocks one sender's session wrote, whole or in pieces.

cdef class CoverageMap(BlockBitmap):
    """Listen mode: the 512-byte blocks one sender's session wrote entirely (export sizes are
    multiples of 512), and the pieces of blocks that unaligned writes covered only in part
    (a session's serve loop records both: ``cover``)."""

    default_shift = 9

    def __dealloc__(self):
        free(self.pieces.at)

    def covered_bytes(self):
        """Bytes of the blocks written entirely, by one write or by several pieces together.
        (Once the session has ended: the pieces are sorted in place.)"""
        cdef uint64_t n
        with nogil:
            n = pieces_cover(&self.m, &self.pieces)
        return self.count_bytes() + n

    @property
    def partial_pieces(self):
        """How many unaligned pieces the session holds (at most MAX_PIECES)."""
        return self.pieces.n


cdef void cover(amap_t *m, pieces_t *p, uint64_t offset, uint64_t length) noexcept nogil:
    """Record that [offset, offset+length) was written: whole blocks in the coverage map, the
    pieces of blocks at either end in the piece list (checked when the session ends)."""
    cdef uint64_t bs = <uint64_t>1 << m.shift
    cdef uint64_t end, head_end, tail_start
    if length == 0 or offset >= m.size:
        return
    if length > m.size - offset:
        length = m.size - offset
    end = offset + length
    amap_set_inside(m, offset, length, 1)
    head_end = (offset + bs - 1) & ~(bs - 1)
    tail_start = end & ~(bs - 1)
    if head_end > end or head_end > tail_start:      # within one block
        if offset & (bs - 1) or (end & (bs - 1) and end != m.size):
            add_piece(p, offset, end)
        return
    if offset & (bs - 1):
        add_piece(p, offset, head_end)
    if end & (bs - 1) and end != m.size:
        add_piece(p, tail_start, end)


cdef int no_room_for_pieces(const amap_t *m, const pieces_t *p, uint64_t offset,
                            uint64_t length) noexcept nogil:
    """This write would need pieces (0 to 2) and the list has no room left for them."""
    cdef uint64_t bs = <uint64_t>1 << m.shift
    cdef uint64_t end = offset + length
    cdef size_t n = 0
    if length == 0:
        return 0
    if offset & (bs - 1):
        n += 1
    if end & (bs - 1) and end != m.size:
        n += 1
    return p.n + n > MAX_PIECES


cdef void add_piece(pieces_t *p, uint64_t start, uint64_t end) noexcept nogil:
    cdef uint64_t *grown
    cdef size_t cap
    if p.n == p.cap:
        if p.cap >= MAX_PIECES:
            return                       # (no_room_for_pieces refused such writes first)
        cap = 1024 if p.cap == 0 else p.cap * 2
        if cap > MAX_PIECES:
            cap = MAX_PIECES
        grown = <uint64_t *>realloc(p.at, cap * 2 * sizeof(uint64_t))
        if grown == NULL:
            return
        p.at = grown
        p.cap = cap
    p.at[2 * p.n] = start
    p.at[2 * p.n + 1] = end
    p.n += 1


cdef int cmp_pieces(const void *a, const void *b) noexcept nogil:
    cdef const uint64_t *x = <const uint64_t *>a
    cdef const uint64_t *y = <const uint64_t *>b
    return (x[0] > y[0]) - (x[0] < y[0])


cdef uint64_t pieces_cover(amap_t *m, pieces_t *p) noexcept nogil:
    """Bytes of the blocks the map does not have whose pieces reach from their first byte to
    their last. Sorts the pieces in place; no allocation."""
    cdef uint64_t bs = <uint64_t>1 << m.shift
    cdef uint64_t total = 0, block, first, last, reached
    cdef size_t i = 0, n = p.n
    qsort(p.at, n, 2 * sizeof(uint64_t), cmp_pieces)
    while i < n:
        block = p.at[2 * i] >> m.shift
        first = block << m.shift
        last = first + bs if first + bs < m.size else m.size
        reached = first
        while i < n and (p.at[2 * i] >> m.shift) == block:
            if p.at[2 * i] <= reached and p.at[2 * i + 1] > reached:
                reached = p.at[2 * i + 1]
            i += 1
        if reached >= last and not amap_block(m, block):
            total += last - first
    return total

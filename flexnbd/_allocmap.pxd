# Block bitmaps for the compiled code, inline C on atomic 64-bit words, callable from any number
# of nogil threads at once. The allocation map is one: one bit per 4096-byte block, 1 = allocated
# (may hold data), 0 = a hole (reads as zeroes). The mirror's dirty map is another (its block
# size may differ: ``shift``).
#
# Sparse, in two levels: the bits live in leaves of LEAF_WORDS words (512 blocks, 2 MiB of
# 4 KiB blocks), found through directories of DIR_LEAVES leaf pointers (128 MiB); both are
# allocated the first time one of their bits is set, and a missing one reads as all clear. So
# a map costs 8 bytes per directory of the export (64 KiB per TiB), plus 512 bytes per 128 MiB
# region and 64 bytes per 2 MiB region that ever held a set bit; scans skip an empty region
# with one load. A sparse 15 TiB disk costs what its extents need, not 480 MiB: 20k scattered
# 4 KiB extents about 12 MiB, a million about 145 MiB (each alone in its 2 MiB: the worst
# case), a dense disk 32 MiB per TiB as a flat bitmap would. Leaves and directories are never
# freed or replaced while the map lives (a writer may hold one), only zeroed.

from libc.stdint cimport uint64_t

from flexnbd._sys cimport abort, atomic_and64, atomic_load64, atomic_or64, atomic_store64, \
    atomic_xchg64, calloc, cas_ptr, free, \
    load_acquire, load_ptr, popcount64, pthread_rwlock_rdlock, pthread_rwlock_t, \
    pthread_rwlock_unlock, pthread_rwlock_wrlock, store_release

cdef enum:
    BLOCK_SHIFT = 12
    BLOCK_SIZE = 4096
    LEAF_WORDS = 8                 # words per leaf (64 bytes)
    LEAF_SHIFT = 9                 # log2 of the blocks per leaf (8 words of 64 bits)
    LEAF_BLOCKS = 512
    DIR_LEAVES = 64                # leaf pointers per directory (512 bytes)
    DIR_SHIFT = 6                  # log2 of DIR_LEAVES
    DIR_BLOCKS = 32768             # blocks per directory (LEAF_BLOCKS * DIR_LEAVES)

cdef struct amap_t:
    uint64_t size             # bytes covered
    int shift                 # log2 of the block size
    uint64_t nblocks
    uint64_t nleaves
    uint64_t ndirs
    unsigned long long ***dirs    # ndirs pointers to DIR_LEAVES leaf pointers; NULL: all clear
    int complete              # set (release) once the builder has finished
    # Writes hold it shared around mark + write; punching holds it exclusive around
    # punch + clear, so a racing write can never end up marked as a hole.
    pthread_rwlock_t lock


cdef inline unsigned long long **amap_dir(amap_t *m, uint64_t d) noexcept nogil:
    """Directory d (leaves d*DIR_LEAVES ...), or NULL while none of its bits was ever set."""
    return <unsigned long long **>load_ptr(<void **>&m.dirs[d])


cdef inline unsigned long long *amap_leaf(amap_t *m, uint64_t leaf) noexcept nogil:
    """The leaf, or NULL while none of its bits was ever set."""
    cdef unsigned long long **d = amap_dir(m, leaf >> DIR_SHIFT)
    if d == NULL:
        return NULL
    return <unsigned long long *>load_ptr(<void **>&d[leaf & (DIR_LEAVES - 1)])


cdef inline void *installed(void **slot, size_t n, size_t size) noexcept nogil:
    """What the slot points to, after installing a fresh zeroed block of n*size bytes there
    (for every thread) if it was empty. Out of memory aborts: a mark that cannot be recorded
    would let a mirror skip data, silently."""
    cdef void *p = load_ptr(slot)
    cdef void *fresh
    if p != NULL:
        return p
    fresh = calloc(n, size)
    if fresh == NULL:
        abort()
    if cas_ptr(slot, NULL, fresh):
        return fresh
    free(fresh)                   # another thread installed one first
    return load_ptr(slot)


cdef inline unsigned long long *amap_leaf_for_setting(amap_t *m, uint64_t leaf) noexcept nogil:
    """The leaf, allocated (with its directory) if it was missing."""
    cdef unsigned long long **d = <unsigned long long **>installed(
        <void **>&m.dirs[leaf >> DIR_SHIFT], DIR_LEAVES, sizeof(void *))
    return <unsigned long long *>installed(<void **>&d[leaf & (DIR_LEAVES - 1)], LEAF_WORDS, 8)


cdef inline int amap_empty_at(amap_t *m, uint64_t b, uint64_t *skip) noexcept nogil:
    """Whether block b starts a region with no leaf (a missing directory or leaf: all clear);
    its length in blocks goes to skip[0]."""
    if (b & (DIR_BLOCKS - 1)) == 0 and amap_dir(m, b >> (LEAF_SHIFT + DIR_SHIFT)) == NULL:
        skip[0] = DIR_BLOCKS
        return 1
    if (b & (LEAF_BLOCKS - 1)) == 0 and amap_leaf(m, b >> LEAF_SHIFT) == NULL:
        skip[0] = LEAF_BLOCKS
        return 1
    return 0


cdef inline unsigned long long amap_word(amap_t *m, uint64_t w) noexcept nogil:
    """Word w of the map (blocks 64*w ... 64*w+63)."""
    cdef unsigned long long *p = amap_leaf(m, w >> (LEAF_SHIFT - 6))
    return atomic_load64(&p[w & (LEAF_WORDS - 1)]) if p != NULL else 0


cdef inline void amap_set_bits(amap_t *m, uint64_t first, uint64_t last, int value) noexcept nogil:
    """Set (value=1) or clear blocks first..last-1. Clearing never allocates a leaf."""
    cdef uint64_t lo, hi, skip
    cdef unsigned long long mask
    cdef unsigned long long *p
    while first < last:
        if not value and amap_empty_at(m, first, &skip):
            first += skip                 # a missing leaf is clear already
            continue
        p = amap_leaf_for_setting(m, first >> LEAF_SHIFT) if value else \
            amap_leaf(m, first >> LEAF_SHIFT)
        lo = first & 63
        hi = 64 if (last - (first - lo)) >= 64 else last - (first - lo)
        if p != NULL:
            if lo == 0 and hi == 64:
                mask = ~<unsigned long long>0
            else:
                mask = ((~<unsigned long long>0) >> (64 - (hi - lo))) << lo
            if value:
                atomic_or64(&p[(first >> 6) & (LEAF_WORDS - 1)], mask)
            else:
                atomic_and64(&p[(first >> 6) & (LEAF_WORDS - 1)], ~mask)
        first = (first - lo) + hi


cdef inline void amap_mark(amap_t *m, uint64_t offset, uint64_t length) noexcept nogil:
    """Every block touching [offset, offset+length) is allocated."""
    if length == 0 or offset >= m.size:
        return
    if length > m.size - offset:
        length = m.size - offset
    amap_set_bits(m, offset >> m.shift, (offset + length + (1 << m.shift) - 1) >> m.shift, 1)


cdef inline void amap_set_inside(amap_t *m, uint64_t offset, uint64_t length,
                                 int value) noexcept nogil:
    """Set or clear the whole blocks inside [offset, offset+length) (a partial last block of
    the map counts as whole when the range reaches the end)."""
    cdef uint64_t first, last, end
    cdef uint64_t bs = <uint64_t>1 << m.shift
    if length == 0 or offset >= m.size:
        return
    if length > m.size - offset:
        length = m.size - offset
    end = offset + length
    first = (offset + bs - 1) >> m.shift
    last = (end + bs - 1) >> m.shift if end == m.size else end >> m.shift
    if first < last:
        amap_set_bits(m, first, last, value)


cdef inline void amap_clear(amap_t *m, uint64_t offset, uint64_t length) noexcept nogil:
    """Whole blocks inside [offset, offset+length) are holes."""
    amap_set_inside(m, offset, length, 0)


cdef inline int amap_block(amap_t *m, uint64_t block) noexcept nogil:
    return (amap_word(m, block >> 6) >> (block & 63)) & 1


cdef inline uint64_t amap_run(amap_t *m, uint64_t offset, uint64_t length,
                              int *allocated) noexcept nogil:
    """How many bytes from offset (at most length) share the state of offset's block; the state
    goes to allocated[0]. Until the map is complete everything counts as allocated."""
    cdef uint64_t block, end_block, b, end, skip
    cdef unsigned long long want
    cdef int state
    if length == 0:
        allocated[0] = 1
        return 0
    if not load_acquire(&m.complete) or offset >= m.size:
        allocated[0] = 1
        return length
    end = offset + length if length <= m.size - offset else m.size
    block = offset >> m.shift
    end_block = (end + (<uint64_t>1 << m.shift) - 1) >> m.shift
    state = amap_block(m, block)
    want = ~<unsigned long long>0 if state else 0
    b = block + 1
    while b < end_block:
        if amap_empty_at(m, b, &skip):
            if state:
                break
            b += skip                     # a whole empty region: still a hole
            continue
        if (b & 63) == 0 and amap_word(m, b >> 6) == want:
            b += 64
            continue
        if amap_block(m, b) != state:
            break
        b += 1
    allocated[0] = state
    if b >= end_block or (b << m.shift) >= end:
        return end - offset if end - offset <= length else length
    return (b << m.shift) - offset


cdef inline int amap_all_allocated(amap_t *m, uint64_t offset, uint64_t length) noexcept nogil:
    cdef int allocated
    return amap_run(m, offset, length, &allocated) >= length and allocated


cdef inline uint64_t amap_take_run(amap_t *m, uint64_t from_offset, uint64_t max_length,
                                   uint64_t *start) noexcept nogil:
    """Find the first set block at or after from_offset, clear the run of set blocks that
    starts there (at most max_length bytes, at least one block) and return its length in bytes,
    its offset in start[0]; 0 when no block is set. Used to drain the dirty map: a writer marks
    after its write lands, so a block cleared here is read afterwards or marked again."""
    cdef uint64_t b = from_offset >> m.shift
    cdef uint64_t e, limit, end, skip
    while b < m.nblocks:
        if amap_empty_at(m, b, &skip):
            b += skip
            continue
        if (b & 63) == 0 and amap_word(m, b >> 6) == 0:
            b += 64
            continue
        if amap_block(m, b):
            break
        b += 1
    if b >= m.nblocks:
        return 0
    limit = b + (max_length >> m.shift)
    if limit <= b:
        limit = b + 1
    e = b + 1
    while e < m.nblocks and e < limit and amap_block(m, e):
        e += 1
    amap_set_bits(m, b, e, 0)
    start[0] = b << m.shift
    end = e << m.shift
    if end > m.size:
        end = m.size
    return end - start[0]


cdef inline uint64_t amap_sweep(amap_t *m, bint clear) noexcept nogil:
    """How many blocks are set (only the leaves that exist are read); with ``clear``, each word
    is cleared as it is read (the leaves stay: a writer may still hold one)."""
    cdef uint64_t d, n = 0
    cdef unsigned long long **leaves
    cdef unsigned long long *p
    cdef int i, j
    for d in range(m.ndirs):
        leaves = amap_dir(m, d)
        if leaves == NULL:
            continue
        for j in range(DIR_LEAVES):
            p = <unsigned long long *>load_ptr(<void **>&leaves[j])
            if p != NULL:
                for i in range(LEAF_WORDS):
                    n += popcount64(atomic_xchg64(&p[i], 0) if clear else
                                    atomic_load64(&p[i]))
    return n


cdef inline uint64_t amap_count(amap_t *m) noexcept nogil:
    return amap_sweep(m, 0)


cdef inline uint64_t amap_memory(amap_t *m) noexcept nogil:
    """Bytes the map holds: its directory pointers, the directories and the leaves."""
    cdef uint64_t d, n = m.ndirs * sizeof(void *)
    cdef unsigned long long **leaves
    cdef int j
    for d in range(m.ndirs):
        leaves = amap_dir(m, d)
        if leaves != NULL:
            n += DIR_LEAVES * sizeof(void *)
            for j in range(DIR_LEAVES):
                if load_ptr(<void **>&leaves[j]) != NULL:
                    n += LEAF_WORDS * 8
    return n


cdef inline void amap_reset(amap_t *m) noexcept nogil:
    amap_sweep(m, 1)


cdef inline void amap_write_lock(amap_t *m) noexcept nogil:
    pthread_rwlock_wrlock(&m.lock)


cdef inline void amap_read_lock(amap_t *m) noexcept nogil:
    pthread_rwlock_rdlock(&m.lock)


cdef inline void amap_unlock(amap_t *m) noexcept nogil:
    pthread_rwlock_unlock(&m.lock)


cdef class BlockBitmap:
    cdef amap_t m


cdef class AllocationMap(BlockBitmap):
    cdef readonly str method
    cdef readonly object extents_found


cdef class DirtyMap(BlockBitmap):
    pass


# Listen mode's coverage: the byte ranges one sender's session wrote, as a sorted list of
# disjoint [start, end) pairs (touching ones merge). A mirror writes in order, so its session
# holds one range however big the export; at most MAX_RANGES (4 MiB) a session.
# The counters are written by the session's thread only and read by any (the status line):
# relaxed atomic stores and loads, no lock, no GIL.
cdef struct coverage_t:
    uint64_t size            # the export's
    uint64_t *at             # start, end, start, end, ...
    size_t n
    size_t cap
    unsigned long long covered     # bytes in the ranges
    unsigned long long received    # WRITE payload bytes written (answered without error)
    unsigned long long zeroed      # WRITE_ZEROES bytes (answered without error)

cdef enum:
    MAX_RANGES = 256 * 1024

cdef void cover(coverage_t *c, uint64_t offset, uint64_t length) noexcept nogil


cdef inline void count_received(coverage_t *c, uint64_t data, uint64_t zeroes) noexcept nogil:
    """A WRITE (``data`` bytes) or WRITE_ZEROES (``zeroes``) of the session succeeded."""
    if data:
        atomic_store64(&c.received, c.received + data)
    if zeroes:
        atomic_store64(&c.zeroed, c.zeroed + zeroes)


cdef int no_room_to_cover(const coverage_t *c, uint64_t offset, uint64_t length) noexcept nogil

cdef uint64_t coverage_run(const coverage_t *c, uint64_t offset, uint64_t length,
                           int *covered) noexcept nogil


cdef class CoverageMap:
    cdef coverage_t c

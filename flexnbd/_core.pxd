# The export, shared by the serve loop (_core) and the mirror sender (_mirror).

from libc.stdint cimport uint64_t

from flexnbd._allocmap cimport AllocationMap, DirtyMap, amap_run, amap_t


cdef struct export_t:
    int fd
    uint64_t size
    int read_only
    int can_punch            # fallocate PUNCH_HOLE works (learned; 0 once it failed)
    int can_zero_range       # fallocate ZERO_RANGE works (learned; 0 once it failed)
    amap_t *amap             # the allocation map, or NULL
    void *dirty              # amap_t* of the mirror's dirty map while mirroring, else NULL
    int io_error             # sticky: a write or sync failed with EIO (data may be lost)
    char *map                # the whole file mapped read-only (Export's map_max), or NULL


cdef inline uint64_t export_run(const export_t *ex, uint64_t offset, uint64_t length,
                                int *allocated) noexcept nogil:
    """The length (1 to ``length``) of the run at ``offset`` that is all data or all hole, and
    which (``allocated``); without a map, everything is data."""
    cdef uint64_t n
    if ex.amap == NULL:
        allocated[0] = 1
        return length
    n = amap_run(ex.amap, offset, length, allocated)
    return length if n == 0 or n > length else n


cdef class Export:
    cdef export_t ex
    cdef readonly object path
    cdef readonly AllocationMap allocmap
    cdef DirtyMap dirty_map         # kept for the Export's lifetime: writers may still hold it

# cython: language_level=3
"""The hot path: request decoding, the export, and the per-connection serve loop. (The client
side of `read`/`write` is _client.pyx; the mirror sender, _mirror.pyx.)

Everything a request touches runs in C with the GIL released: one thread per client calls
``Connection.serve()``, which releases the GIL for the whole transmission phase and comes back
with a ``ServeResult``. The GIL is taken again only on rare paths (an I/O error to log).

READ replies go out as the reply header (sent with MSG_MORE so it leaves with the data) followed
by sendfile(2) from the file. WRITE payloads are received into one per-connection buffer and
written with pwrite (pwritev2 with RWF_DSYNC for FUA, so only that range is synced). Reply
headers of requests that arrived together are batched into one send.
"""

import logging
import os
from collections import namedtuple

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

from flexnbd._allocmap cimport *
from flexnbd._nbdio cimport *
from flexnbd._sys cimport *
from flexnbd._tls cimport TlsSession
from flexnbd._wire cimport *

from flexnbd import errors, wire

_log = logging.getLogger("flexnbd.core")

cdef enum:
    BUF_SIZE = 1024 * 1024       # large payload chunks, zero-fill
    # Batched replies: headers, and the data of small (or copied) reads with their header.
    OUTBUF_SIZE = 256 * 1024 + 4096
    # READs up to this size are copied into the reply batch (pread) instead of sent with sendfile:
    # a batch of small replies then leaves in one send instead of two syscalls per request.
    SMALL_READ = 16 * 1024
    # With copy_reads, READs up to this size are copied so too (see Connection.copy_reads).
    COPY_READ_MAX = 256 * 1024
    # send_copied_range maps the file this much at a time (aligned): per connection, at most
    # this much of the file mapped (page-cache pages, counted in the server's RSS) and 16 KiB
    # of page tables. A 1 MiB READ at a time remaps every 8 READs: a cost too small to see.
    FILE_WINDOW = 8 * 1024 * 1024
    # A new window is made only once the last one has served this much: a client that reads
    # far apart each time (random long READs, or a hostile one alternating two places) gets
    # at most one mmap and munmap per 4 MiB it reads, and pread for the rest, instead of one
    # per READ (each takes the process's mapping lock for writing and, unmapping, flushes
    # the TLB of every CPU where another connection's thread runs).
    WINDOW_COST = FILE_WINDOW // 2
    # A WRITE longer than MAX_PAYLOAD is drained (and answered EINVAL) up to this length;
    # beyond it the client is disconnected rather than have us read gigabytes of garbage.
    DRAIN_LIMIT = 128 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# Request decoding and validation: pure, no I/O.

def decode_request(bytes data, uint64_t size, bint read_only=False, bint structured=False,
                   bint meta_context=False, bint fast_zero=False):
    """Decode a 28-byte request and validate it against an export of ``size`` bytes.

    Returns ``(error, request)``: ``error`` is the NBD error the server answers with (0 if the
    request is good, ``NBD_EBADMSG`` for a bad magic). For tests and tools; the serve loop uses
    the same C functions.
    """
    cdef request_t r
    cdef limits_t lim
    cdef frame_t frame
    if len(data) != REQUEST_SIZE:
        raise ValueError(f"a request is {REQUEST_SIZE} bytes, not {len(data)}")
    frame = frame_request(data, &r)
    lim.size = size
    lim.read_only = read_only
    lim.structured = structured
    lim.meta_context = meta_context
    lim.fast_zero = fast_zero
    req = wire.Request(r.magic, r.flags, r.type, int.from_bytes(r.cookie[:8], "big"), r.offset,
                       r.length)
    if frame == FRAME_BAD_MAGIC:
        return NBD_EBADMSG, req
    return validate(&r, &lim), req


# --------------------------------------------------------------------------------------------
# The export: the file and what its file system can do. Shared by every connection.

cdef class Export:
    """The served file. ``fd`` stays owned by the caller and must outlive every connection."""

    # (its attributes are declared in _core.pxd, for _mirror to reach the file)

    def __cinit__(self, int fd, uint64_t size, bint read_only, path,
                  AllocationMap allocmap=None, *, uint64_t map_max=0):
        cdef void *m
        self.ex.fd = fd
        self.ex.size = size
        self.ex.read_only = read_only
        self.path = path
        self.ex.can_punch = probe_punch(fd)
        self.ex.can_zero_range = 1
        self.allocmap = allocmap
        self.ex.amap = &allocmap.m if allocmap is not None else NULL
        # The long READs copied to clients on this host are sent from this one mapping, which
        # every connection shares: a page read once stays mapped for the next READs of it, by
        # any client. Mapping a window per READ instead cost a page fault per 16-28 pages
        # and, on unmapping, the page-table teardown: measured, 22 % of the serving thread's
        # CPU on 1 MiB READs at depth 16 over a 2 GiB file. Bounded by map_max, for the page
        # tables' sake (8 bytes per 4 KiB page read through it); a larger export, or one
        # that cannot be mapped, gets a window per connection (file_window).
        if 0 < size <= map_max:
            m = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0)
            if m != MAP_FAILED:
                self.ex.map = <char *>m

    def __dealloc__(self):
        # (every Connection holds its Export: none is serving from the mapping now)
        if self.ex.map != NULL:
            munmap(self.ex.map, self.ex.size)

    @property
    def mapped(self):
        """The whole file is mapped for copied READs (see __cinit__)."""
        return self.ex.map != NULL

    @property
    def size(self):
        return self.ex.size

    @property
    def read_only(self):
        return bool(self.ex.read_only)

    def track_dirty(self, bint on):
        """Start (on) or stop recording every completed write, trim and zero in the dirty map,
        which is returned (the same map every time; emptied when tracking starts)."""
        if self.dirty_map is None:
            self.dirty_map = DirtyMap(self.ex.size)
        if on:
            self.dirty_map.reset()
            store_ptr(&self.ex.dirty, &self.dirty_map.m)
        else:
            store_ptr(&self.ex.dirty, NULL)
        return self.dirty_map

    @property
    def can_punch(self):
        """The file system can zero a range without writing it (advertised as FAST_ZERO)."""
        return bool(self.ex.can_punch)

    @property
    def io_error(self):
        """A write or sync of the file failed with EIO since the start: acknowledged data may
        be lost, so every later FLUSH and FUA request fails (SPEC §11)."""
        return bool(load_acquire(&self.ex.io_error))

    def sync(self):
        """fdatasync the file, honouring and recording the sticky I/O error. OSError."""
        cdef int rc
        with nogil:
            rc = sync_file(&self.ex)
        if rc:
            raise OSError(rc, os.strerror(rc))


cdef void note_error(export_t *ex, int e) noexcept nogil:
    """Remember an EIO for good: the kernel reports a lost writeback once, to whichever
    descriptor asks first, and every connection shares this file description."""
    if e == EIO:
        store_release(&ex.io_error, 1)


cdef int sync_file(export_t *ex) noexcept nogil:
    """fdatasync; 0 or an errno. Fails with EIO for good once any I/O error was seen."""
    if load_acquire(&ex.io_error):
        return EIO
    if fdatasync(ex.fd) < 0:
        # Whatever the errno, written data did not reach the disk: make it sticky as EIO.
        store_release(&ex.io_error, 1)
        return errno
    return 0


cdef int probe_punch(int fd) noexcept nogil:
    """Does fallocate(PUNCH_HOLE) work here? Probed past the end of the file, where it changes
    nothing (KEEP_SIZE)."""
    cdef off_t end = lseek(fd, 0, 2)  # SEEK_END
    if end < 0:
        return 0
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, end, 4096) == 0:
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Per-connection state and socket helpers.

# Why a connection ended.
cpdef enum Reason:
    REASON_DISC = 0          # the client sent NBD_CMD_DISC
    REASON_CLOSED = 1        # the client closed between requests
    REASON_VANISHED = 2      # the client went away in the middle of a request
    REASON_BAD_MAGIC = 3     # a request with a bad magic (answered EBADMSG)
    REASON_IO_FATAL = 4      # an I/O error after a READ's success header had been sent
    REASON_TOO_BIG = 5       # a WRITE too long to drain
    REASON_STOPPED = 6       # the server is stopping, or the connection was kicked
    REASON_SOCKET_ERROR = 7  # the socket failed (errno tells)

# Connection(meta_context=...): the contexts the handshake selected, OR-ed.
CONTEXT_ALLOCATION = META_ALLOCATION
CONTEXT_COVERAGE = META_COVERAGE

ServeResult = namedtuple("ServeResult", "reason errno command offset length requests")


cdef struct conn_t:
    transport_t tp
    int stop_fd              # server-wide: readable once the server stops
    int kick_fd              # this connection only: readable once it must go
    export_t *ex
    limits_t lim
    inbuf_t inb              # request headers and small payloads
    char *buf
    char *outbuf
    size_t out_len
    int pipe_r               # a pipe for splicing WRITE payloads socket -> file (-1: none)
    int pipe_w
    coverage_t *coverage     # listen mode: the ranges written in this session, or NULL
    uint64_t errors          # requests answered with an error
    uint64_t writes          # WRITE, WRITE_ZEROES and TRIM requests, answered or not
    int kicked               # set by kick(): end at the next request boundary
    int splice_all           # splice every large WRITE, even onto holes (see Connection)
    int copy_reads           # READs up to COPY_READ_MAX: pread + send, not sendfile (atomic)
    int local                # the client is on this host (set before serve())
    # send_copied_range's window on the file: FILE_WINDOW bytes from win_start (NULL: none)
    char *win
    uint64_t win_start
    size_t win_len
    int win_refused          # mmap failed once: pread from then on
    uint64_t win_owed        # bytes to serve before the next new window (WINDOW_COST)
    # how a local client's long READs go (see big_read_copies)
    int read_phase           # PHASE_*
    int phase_reads          # long READs so far in this phase
    int64_t phase_start_ns
    uint64_t phase_bytes
    double sendfile_rate     # bytes per ns measured in the last PHASE_TRY_SENDFILE
    int copies               # the choice while PHASE_USE
    int use_reads            # how long it holds: USE_READS, doubled while the tries agree
    # how it ended
    int reason
    int err
    int cmd
    uint64_t offset
    uint32_t length
    uint64_t requests
    # killswitch: when the current request started (monotonic ns), 0 between requests
    int64_t request_started_ns
    # idle spin (see wait_readable)
    int64_t spin_ns          # the longest spin; 0: never spin
    int64_t last_gap_ns      # how long the client took to send again, the last time
    uint64_t requests_at_idle
    int streak               # idle times in a row after one request, answered soon after
    uint64_t last_sync       # c.requests when the last FLUSH (or FUA request) came
    # following the client (see follow_client)
    int follow_cpu           # the one CPU this thread is held on (-1: its own CPUs)
    cpu_set_t home           # the thread's own CPUs, saved when it starts following


cdef int flush_out(conn_t *c, int more) noexcept nogil:
    """Send the reply batch (held back with MSG_MORE if ``more``). 0, or -1 with errno set."""
    cdef int rc = 0
    if c.out_len:
        rc = tp_send_all(&c.tp, c.outbuf, c.out_len, MSG_MORE if more else 0)
        c.out_len = 0
    elif not more and c.tp.ssl != NULL:
        rc = tls_flush(&c.tp)        # (TLS: records held back by an earlier MSG_MORE)
    return -1 if rc else 0


cdef int queue_out(conn_t *c, const void *p, size_t n) noexcept nogil:
    """Append to the reply batch, sending it first if it is full."""
    if c.out_len + n > OUTBUF_SIZE:
        if flush_out(c, 0) < 0:
            return -1
    memcpy(c.outbuf + c.out_len, p, n)
    c.out_len += n
    return 0


# Threads spinning in wait_readable at once, and the most allowed: half the CPUs (at least
# one), so spinning never takes the CPUs the clients and the other connections need.
cdef int spinners = 0
cdef enum:
    # Spin only once the client has worked one request at a time this many times in a row,
    # each time sending the next within SPIN_MARGIN spins.
    SPIN_AFTER = 4
    SPIN_MARGIN = 4
    # Nor for this many requests after a FLUSH or FUA: the disk's writeback work then needs the
    # CPU (measured: qd1 4K writes with a FLUSH each lost 10-15 % with a spin).
    NO_SPIN_AFTER_SYNC = 64

cdef int max_spinners = max(1, <int>sysconf(_SC_NPROCESSORS_ONLN) // 2)


cdef int spin_poll(conn_t *c, pollfd *fds, int nfds) noexcept nogil:
    """Poll without sleeping for up to c.spin_ns: 1 when something is readable, 0 when the
    spin ended first (or another thread holds the spinning slot), -1 on an error."""
    cdef int rc = 0
    cdef int64_t until
    if atomic_add(&spinners, 1) > max_spinners:
        atomic_add(&spinners, -1)
        return 0
    until = now_ns() + c.spin_ns
    while rc == 0 and now_ns() < until:
        rc = poll(fds, nfds, 0)
        if rc < 0 and errno == EINTR:
            rc = 0
    atomic_add(&spinners, -1)
    return rc


cdef void follow_client(conn_t *c, int on) noexcept nogil:
    """Hold this thread on the CPU that takes the client's packets (SO_INCOMING_CPU: on
    loopback, the client's own CPU) while ``on``; back to its own CPUs when not.

    For a client that sends one request at a time and syncs (a FLUSH or FUA request lately:
    the one-at-a-time clients that get no spin), each request otherwise wakes this thread on
    the other CPU, where the disk's completion left it (measured, 4K write + FLUSH at depth
    1 on 2 CPUs: 4,300 -> 4,900 IOPS, the write's p50 95 -> 56 us). Never a CPU outside the
    thread's own set (taskset, cpusets); a failure just leaves the thread where it is."""
    cdef int cpu = -1
    cdef unsigned int n = sizeof(int)
    cdef cpu_set_t one
    if on and getsockopt(c.tp.fd, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &n) == 0 and \
            0 <= cpu < CPU_SETSIZE:
        if cpu == c.follow_cpu:
            return
        if c.follow_cpu < 0 and sched_getaffinity(0, sizeof(cpu_set_t), &c.home) < 0:
            return
        if CPU_ISSET(cpu, &c.home):
            CPU_ZERO(&one)
            CPU_SET(cpu, &one)
            if sched_setaffinity(0, sizeof(cpu_set_t), &one) == 0:
                c.follow_cpu = cpu
            return
    if c.follow_cpu >= 0:
        sched_setaffinity(0, sizeof(cpu_set_t), &c.home)
        c.follow_cpu = -1


cdef int wait_readable(conn_t *c, int idle) noexcept nogil:
    """Block until the client sent something. 0 when readable, 1 when the server stops or the
    connection is kicked (heeded only when ``idle``, between requests: a request that has
    begun is finished), -1 on a poll error. Replies still batched are sent first.

    A client that sends one request at a time and answers each reply within c.spin_ns gets
    a spin instead of a sleep: waking a sleeping thread on another CPU costs more than the
    request (on the test machine qd1 4K IOPS went from 17k to 42k at the same CPU per GiB).
    Clients with more in flight, or slower ones, never see a spin."""
    cdef pollfd fds[3]
    cdef int nfds = 1
    cdef int rc = 0
    cdef int64_t idle_since = 0
    if tp_pending(&c.tp):
        # TLS: more requests were received already (or one is on its way, its record begun):
        # read them before sending the replies batched so far, which then leave together
        return 0
    if flush_out(c, 0) < 0:
        return -1
    if idle:
        c.request_started_ns = 0         # every reply is out: the killswitch has no request
    fds[0].fd = c.tp.fd
    fds[0].events = POLLIN
    if idle and c.stop_fd >= 0:
        fds[nfds].fd = c.stop_fd
        fds[nfds].events = POLLIN
        nfds += 1
    if idle and c.kick_fd >= 0:
        fds[nfds].fd = c.kick_fd
        fds[nfds].events = POLLIN
        nfds += 1
    if idle:
        idle_since = now_ns()
        # (a gap measured across a sleep includes our wake-up: hence the margin)
        if c.requests - c.requests_at_idle == 1 and c.last_gap_ns < SPIN_MARGIN * c.spin_ns:
            c.streak += 1
        else:
            c.streak = 0
        # A one-request-at-a-time client gets a spin, or, if it syncs, this thread on its CPU.
        if c.streak >= SPIN_AFTER and c.requests - c.last_sync > NO_SPIN_AFTER_SYNC:
            rc = spin_poll(c, fds, nfds)
        follow_client(c, c.streak >= SPIN_AFTER and c.requests - c.last_sync <= NO_SPIN_AFTER_SYNC)
        c.requests_at_idle = c.requests
    while rc == 0:
        rc = poll(fds, nfds, -1)
        if rc < 0 and errno == EINTR:
            rc = 0
    if idle:
        c.last_gap_ns = now_ns() - idle_since
    if rc < 0:
        return -1
    if nfds > 1 and (fds[1].revents or (nfds > 2 and fds[2].revents)):
        return 1
    return 0


cdef int fill_inbuf(conn_t *c, size_t need, int idle) noexcept nogil:
    """Read until at least ``need`` unconsumed bytes are in inbuf (need <= INBUF_SIZE).
    ``idle``: waiting for a new request (a stop or kick is heeded), not inside one.

    Returns 0, or a Reason: REASON_CLOSED if the client closed with nothing pending,
    REASON_VANISHED if it closed with part of a request pending, REASON_STOPPED.
    """
    cdef ssize_t k
    cdef int w
    while ib_unread(&c.inb) < need:
        w = wait_readable(c, idle)
        if w == 1:
            return REASON_STOPPED
        if w < 0:
            c.err = errno
            return REASON_SOCKET_ERROR
        k = ib_recv(&c.tp, &c.inb, INBUF_SIZE, 0)
        if k < 0 and (errno == EINTR or errno == EAGAIN):
            continue
        if k <= 0:
            if k < 0:
                c.err = errno
            # A close (or a reset) between requests is a client that left, not a lost request.
            return REASON_CLOSED if (idle and ib_unread(&c.inb) == 0) else REASON_VANISHED
    return 0


cdef int recv_exact(conn_t *c, char *dst, size_t n) noexcept nogil:
    """Receive exactly n bytes straight into dst (after what inbuf holds). 0 or a Reason."""
    cdef size_t have = ib_take(&c.inb, dst, n)
    cdef int rc
    if have == n:
        return 0
    if flush_out(c, 0) < 0:
        c.err = errno
        return REASON_VANISHED
    rc = tp_recv_all(&c.tp, dst + have, n - have)
    if rc < 0:
        c.err = -rc
    return REASON_VANISHED if rc else 0


# --------------------------------------------------------------------------------------------
# Replies.

cdef int reply_simple(conn_t *c, const request_t *r, uint32_t error) noexcept nogil:
    cdef char h[SIMPLE_REPLY_SIZE]
    if error:
        c.errors += 1
    make_simple_reply(h, error, r.cookie)
    return queue_out(c, h, SIMPLE_REPLY_SIZE)


cdef int reply_error(conn_t *c, const request_t *r, uint32_t error) noexcept nogil:
    """An error reply: a structured ERROR chunk for a READ when structured replies are on."""
    cdef char h[CHUNK_HEADER_SIZE + 6]
    cdef uint32_t u32
    if not (c.lim.structured and r.type == CMD_READ):
        return reply_simple(c, r, error)
    c.errors += 1
    make_chunk_header(h, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)
    u32 = htobe32(error)
    memcpy(h + CHUNK_HEADER_SIZE, &u32, 4)
    memset(h + CHUNK_HEADER_SIZE + 4, 0, 2)   # no message
    return queue_out(c, h, CHUNK_HEADER_SIZE + 6)


# --------------------------------------------------------------------------------------------
# Commands.

cdef int read_small(conn_t *c, const request_t *r) noexcept nogil:
    """pread a small READ's data into the reply batch, right after its queued header.
    On a read error the header is still unsent, so it is replaced by an error reply."""
    cdef size_t header_len = CHUNK_HEADER_SIZE + 8 if c.lim.structured else SIMPLE_REPLY_SIZE
    cdef size_t got = 0
    cdef ssize_t k
    if c.out_len + r.length > OUTBUF_SIZE:
        # Make room: send everything queued but this header, then move the header down.
        if tp_send_all(&c.tp, c.outbuf, c.out_len - header_len, MSG_MORE) < 0:
            c.err = errno
            return REASON_VANISHED
        memmove(c.outbuf, c.outbuf + c.out_len - header_len, header_len)
        c.out_len = header_len
    while got < r.length:
        k = pread(c.ex.fd, c.outbuf + c.out_len + got, r.length - got, <off_t>(r.offset + got))
        if k < 0 and errno == EINTR:
            continue
        if k <= 0:
            c.out_len -= header_len
            k = errno if k < 0 else EIO
            log_io_error(c, r, k)
            return 0 if reply_error(c, r, nbd_error(k)) == 0 else REASON_VANISHED
        got += k
    c.out_len += got
    return 0


cdef int send_file_range(conn_t *c, uint64_t offset, size_t left) noexcept nogil:
    """Send what is queued (held back with MSG_MORE), then the file range with sendfile.
    0, or a Reason ending the connection."""
    cdef int rc
    if flush_out(c, 1) < 0:
        c.err = errno
        return REASON_VANISHED
    rc = tp_sendfile_all(&c.tp, c.ex.fd, offset, left)
    if rc == 0:
        return 0
    c.err = -rc       # (EIO also when the file shrank under us: the bytes promised are gone)
    if c.err == EPIPE or c.err == ECONNRESET or c.err == ETIMEDOUT or c.err == EAGAIN:
        return REASON_VANISHED     # (EAGAIN: no progress within the send timeout)
    return REASON_IO_FATAL


cdef int has_hole(conn_t *c, const request_t *r) noexcept nogil:
    return c.ex.amap != NULL and not amap_all_allocated(c.ex.amap, r.offset, r.length)


cdef int do_read(conn_t *c, const request_t *r) noexcept nogil:
    """Header, then sendfile (or pread for small reads). 0, or a Reason ending the
    connection. With structured replies, holes go as OFFSET_HOLE chunks."""
    cdef char h[CHUNK_HEADER_SIZE + 8]
    cdef uint64_t u64
    if c.lim.structured:
        if r.length == 0:
            make_chunk_header(h, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
            return 0 if queue_out(c, h, CHUNK_HEADER_SIZE) == 0 else REASON_VANISHED
        if not (r.flags & CMD_FLAG_DF) and has_hole(c, r):
            return read_chunked(c, r)
        make_chunk_header(h, r.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.length + 8)
        u64 = htobe64(r.offset)
        memcpy(h + CHUNK_HEADER_SIZE, &u64, 8)
        if queue_out(c, h, CHUNK_HEADER_SIZE + 8) < 0:
            c.err = errno
            return REASON_VANISHED
    elif reply_simple(c, r, 0) < 0:
        c.err = errno
        return REASON_VANISHED
    if r.length == 0:
        return 0
    if r.length <= SMALL_READ or (r.length <= COPY_READ_MAX and load_acquire(&c.copy_reads)):
        return read_small(c, r)
    if big_read_copies(c, r.length):
        return send_copied_range(c, r.offset, r.length)
    return send_file_range(c, r.offset, r.length)


cdef enum:
    PHASE_TRY_SENDFILE = 0   # measuring the rate with sendfile
    PHASE_TRY_COPY = 1       # then with copies
    PHASE_USE = 2            # then the faster, for USE_READS, and measure again
    # Each try: TRY_SKIP READs first, which drain what the other way left queued in the
    # socket buffers (a client at depth 16 holds 16 replies at most), then TRY_READS timed.
    TRY_SKIP = 32
    TRY_READS = 64
    USE_READS = 4096
    # A choice that the next tries confirm holds twice as long, up to this: the tries serve
    # their READs the slower way (with sendfile, fio's CPU per GiB was 2-3x), ~2 % of the
    # READs at 4096, ~0.15 % here.
    USE_READS_MAX = 65536


cdef int big_read_copies(conn_t *c, uint32_t length) noexcept nogil:
    """Whether this long READ (over COPY_READ_MAX) is copied (send_copied_range) or sent with
    sendfile. Only a client on this host is ever given copies (qemu or the kernel's nbd client
    with a local disk, nbdcopy or a backup tool reading one), and only if they serve it faster:
    which is faster depends on the machine (how dear a cold page-cache read is to the client
    next to our copy; measured on the same machine on two days: sendfile 7.1 GiB/s one day,
    1.2 the next, where copies reached 2.6-3), so it is measured: TRY_READS READs each way,
    then the faster for USE_READS, and again; a choice the tries confirm holds twice as long
    each time, up to USE_READS_MAX. A remote client always gets sendfile (its data leaves
    through a NIC, where zero copy is all gain)."""
    cdef int64_t now
    cdef double rate
    if not c.local:
        return 0
    now = now_ns()
    if c.phase_reads == 0 or (c.read_phase != PHASE_USE and c.phase_reads == TRY_SKIP):
        c.phase_start_ns = now
        c.phase_bytes = 0
    elif c.read_phase != PHASE_USE and c.phase_reads == TRY_SKIP + TRY_READS:
        # (the rate of the phase's READs: from its first to the start of this one)
        rate = <double>c.phase_bytes / <double>(now - c.phase_start_ns + 1)
        if c.read_phase == PHASE_TRY_SENDFILE:
            c.sendfile_rate = rate
            c.read_phase = PHASE_TRY_COPY
        else:
            if c.use_reads and c.copies == (rate > c.sendfile_rate):
                c.use_reads = min(2 * c.use_reads, <int>USE_READS_MAX)
            else:
                c.use_reads = USE_READS
            c.copies = rate > c.sendfile_rate
            c.read_phase = PHASE_USE
        c.phase_reads = 0
        c.phase_start_ns = now
        c.phase_bytes = 0
    elif c.read_phase == PHASE_USE and c.phase_reads == c.use_reads:
        c.read_phase = PHASE_TRY_SENDFILE
        c.phase_reads = 0
        c.phase_start_ns = now
        c.phase_bytes = 0
    c.phase_reads += 1
    c.phase_bytes += length
    if c.read_phase == PHASE_USE:
        return c.copies
    return c.read_phase == PHASE_TRY_COPY


cdef int pread_exact(int fd, char *dst, size_t n, uint64_t offset) noexcept nogil:
    """pread n bytes at offset: 0, or an errno (EIO when the file ended first)."""
    cdef size_t got = 0
    cdef ssize_t k
    while got < n:
        k = pread(fd, dst + got, n - got, <off_t>(offset + got))
        if k < 0 and errno == EINTR:
            continue
        if k <= 0:
            return errno if k < 0 else EIO
        got += k
    return 0


cdef void unmap_window(conn_t *c) noexcept nogil:
    if c.win != NULL:
        munmap(c.win, c.win_len)
        c.win = NULL


cdef char *file_window(conn_t *c, uint64_t offset) noexcept nogil:
    """The file's bytes from offset on, mapped (c.win moves to the FILE_WINDOW that holds
    offset), or NULL: the last window has not yet served WINDOW_COST (pread this time), or
    the file cannot be mapped (then never again on this connection)."""
    cdef void *m
    if c.win == NULL or offset < c.win_start or offset >= c.win_start + c.win_len:
        if c.win_owed or c.win_refused:
            return NULL
        unmap_window(c)
        c.win_start = offset - offset % FILE_WINDOW
        c.win_len = FILE_WINDOW
        if c.win_start + c.win_len > c.ex.size:
            c.win_len = c.ex.size - c.win_start
        m = mmap(NULL, c.win_len, PROT_READ, MAP_SHARED, c.ex.fd, <off_t>c.win_start)
        if m == MAP_FAILED:
            c.win_refused = 1
            return NULL
        c.win = <char *>m
        c.win_owed = WINDOW_COST
    return c.win + (offset - c.win_start)


cdef int send_copied_range(conn_t *c, uint64_t offset, size_t left) noexcept nogil:
    """Like send_file_range, but the data is copied here into the socket buffers, for a
    client on this host when that is the faster way (big_read_copies).

    With sendfile the socket buffers point at the page-cache pages, and the client's own
    thread pays for reading them cold: measured, fio 1 MiB reads at depth 16 spent 0.8 s of
    its CPU per GiB against 0.3 with a copy here, and moved 1.2 GiB/s against 2.6-3. Our
    thread's copy runs in parallel on another CPU.

    The copy is send() straight from a mapping of the file (the export's own, Export.mapped,
    else a window of this connection's): one copy, where pread into a buffer and send costs
    two (measured: 13 % less CPU here per GiB, 13-16 % more GiB/s at depth 16). Only the
    kernel reads the mapping (inside send), so a page that cannot be read (an I/O error, or
    a file shrunk under us) fails that send with EFAULT, reported as EIO, instead of a
    SIGBUS. TLS must read the data here, so it, and a file that cannot be
    mapped, go through pread and c.buf. 0, or a Reason ending the connection."""
    cdef size_t n
    cdef char *p
    if flush_out(c, 1) < 0:
        c.err = errno
        return REASON_VANISHED
    while left > 0:
        p = NULL
        if c.tp.ssl == NULL and c.ex.map != NULL:
            p = c.ex.map + offset
            n = left
        elif c.tp.ssl == NULL:
            p = file_window(c, offset)
            if p != NULL:
                n = c.win_start + c.win_len - offset
                n = left if n > left else n
        if p == NULL:
            n = BUF_SIZE if left > BUF_SIZE else left
            c.err = pread_exact(c.ex.fd, c.buf, n, offset)
            if c.err:
                return REASON_IO_FATAL
            p = c.buf
        if tp_send_all(&c.tp, p, n, MSG_MORE if left > n else 0) < 0:
            c.err = errno
            if c.err == EFAULT:
                c.err = EIO
                return REASON_IO_FATAL
            return REASON_VANISHED
        c.win_owed = c.win_owed - n if c.win_owed > n else 0
        offset += n
        left -= n
    return 0


cdef int read_chunked(conn_t *c, const request_t *r) noexcept nogil:
    """A structured READ as OFFSET_DATA chunks for data and OFFSET_HOLE chunks for holes.
    An I/O error once chunks are out cannot be reported cleanly: it ends the connection."""
    cdef char h[CHUNK_HEADER_SIZE + 12]
    cdef uint64_t offset = r.offset
    cdef uint64_t left = r.length
    cdef uint64_t n, u64
    cdef uint32_t u32
    cdef int allocated, rc
    while left > 0:
        n = export_run(c.ex, offset, left, &allocated)
        u64 = htobe64(offset)
        if not allocated:
            make_chunk_header(h, r.cookie, REPLY_FLAG_DONE if n == left else 0,
                              REPLY_TYPE_OFFSET_HOLE, 12)
            memcpy(h + CHUNK_HEADER_SIZE, &u64, 8)
            u32 = htobe32(<uint32_t>n)
            memcpy(h + CHUNK_HEADER_SIZE + 8, &u32, 4)
            if queue_out(c, h, CHUNK_HEADER_SIZE + 12) < 0:
                c.err = errno
                return REASON_VANISHED
        else:
            make_chunk_header(h, r.cookie, REPLY_FLAG_DONE if n == left else 0,
                              REPLY_TYPE_OFFSET_DATA, <uint32_t>(n + 8))
            memcpy(h + CHUNK_HEADER_SIZE, &u64, 8)
            if queue_out(c, h, CHUNK_HEADER_SIZE + 8) < 0:
                c.err = errno
                return REASON_VANISHED
            if c.out_len + n <= OUTBUF_SIZE and \
                    (n <= SMALL_READ or (n <= COPY_READ_MAX and load_acquire(&c.copy_reads))):
                c.err = pread_exact(c.ex.fd, c.outbuf + c.out_len, n, offset)
                if c.err:
                    return REASON_IO_FATAL
                c.out_len += n
            else:
                rc = send_file_range(c, offset, n)
                if rc:
                    return rc
        offset += n
        left -= n
    return 0


cdef enum:
    # At most this many extents in one BLOCK_STATUS reply (the client asks again for the rest).
    MAX_EXTENTS = 1024


cdef int do_block_status(conn_t *c, const request_t *r) noexcept nogil:
    """One chunk per selected context: base:allocation extents from the map (0 for data,
    HOLE|ZERO for holes), flexnbd:coverage extents from the coverage (COVERED or 0)."""
    cdef int both = c.lim.meta_context == META_ALLOCATION | META_COVERAGE
    if c.lim.meta_context & META_ALLOCATION and \
            status_chunk(c, r, BASE_ALLOCATION_ID, not both) < 0:
        return -1
    if c.lim.meta_context & META_COVERAGE:
        return status_chunk(c, r, COVERAGE_ID, 1)
    return 0


cdef int status_chunk(conn_t *c, const request_t *r, uint32_t context, int done) noexcept nogil:
    cdef char h[CHUNK_HEADER_SIZE + 4]
    cdef uint32_t ext[2]
    cdef uint64_t offset = r.offset
    cdef uint64_t left = r.length
    cdef uint64_t n
    cdef int allocated
    cdef uint32_t count = 0
    cdef size_t start
    # Room for the header and at least one extent: a chunk without extents is invalid.
    if c.out_len + CHUNK_HEADER_SIZE + 4 + 8 > OUTBUF_SIZE and flush_out(c, 0) < 0:
        return -1
    if queue_out(c, h, CHUNK_HEADER_SIZE + 4) < 0:     # room for the header, filled below
        return -1
    start = c.out_len - (CHUNK_HEADER_SIZE + 4)
    while left > 0 and count < MAX_EXTENTS:
        if context == COVERAGE_ID:
            n = coverage_run(c.coverage, offset, left, &allocated)
            ext[1] = htobe32(STATE_COVERED if allocated else 0)
        else:
            n = export_run(c.ex, offset, left, &allocated)
            ext[1] = htobe32(0 if allocated else (STATE_HOLE | STATE_ZERO))
        ext[0] = htobe32(<uint32_t>n)      # (n <= the request's length: 32 bits)
        if c.out_len + 8 > OUTBUF_SIZE:
            break
        memcpy(c.outbuf + c.out_len, ext, 8)
        c.out_len += 8
        count += 1
        offset += n
        left -= n
        if r.flags & CMD_FLAG_REQ_ONE:
            break
    make_chunk_header(c.outbuf + start, r.cookie, REPLY_FLAG_DONE if done else 0,
                      REPLY_TYPE_BLOCK_STATUS, 4 + 8 * count)
    ext[0] = htobe32(context)
    memcpy(c.outbuf + start + CHUNK_HEADER_SIZE, ext, 4)
    return 0


cdef inline int is_zero(const char *p, size_t n) noexcept nogil:
    cdef size_t i = 0
    cdef uint64_t w
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        if w:
            return 0
        i += 8
    while i < n:
        if p[i]:
            return 0
        i += 1
    return 1


cdef int write_data(conn_t *c, const char *p, size_t n, uint64_t offset, int fua) noexcept nogil:
    """Write client data: a piece that is all zero and lands in a hole (an unallocated block,
    which reads as zeroes and stays so) is skipped, so the file stays sparse; the blocks
    written are marked allocated. 0 or an errno."""
    cdef amap_t *m = c.ex.amap
    cdef size_t pos = 0, run = 0, step
    cdef uint64_t at
    cdef int rc = 0
    cdef int skipped = 0
    if m == NULL:
        return write_range(c, p, n, offset, fua)
    amap_read_lock(m)
    if amap_all_allocated(m, offset, n):
        amap_mark(m, offset, n)
        rc = write_range(c, p, n, offset, fua)
    else:
        while pos < n and rc == 0:
            at = offset + pos
            step = BLOCK_SIZE - (at & (BLOCK_SIZE - 1))     # to the end of this block
            if step > n - pos:
                step = n - pos
            if not amap_block(m, at >> BLOCK_SHIFT) and is_zero(p + pos, step):
                if pos > run:
                    amap_mark(m, offset + run, pos - run)
                    rc = write_range(c, p + run, pos - run, offset + run, fua)
                run = pos + step
                skipped = 1
            pos += step
        if rc == 0 and pos > run:
            amap_mark(m, offset + run, pos - run)
            rc = write_range(c, p + run, pos - run, offset + run, fua)
    amap_unlock(m)
    if rc == 0 and fua and skipped:
        # The skipped blocks read as zeroes thanks to a hole, and the hole may come from a
        # TRIM nobody synced yet: FUA promises the range is durable, so sync the file.
        rc = sync_file(c.ex)
    return rc


cdef int write_range(conn_t *c, const char *p, size_t n, uint64_t offset, int fua) noexcept nogil:
    """pwrite n bytes (with RWF_DSYNC for FUA). 0 or an errno."""
    cdef ssize_t k
    cdef iovec iov
    cdef int rc
    while n > 0:
        if fua:
            iov.iov_base = <void *>p
            iov.iov_len = n
            k = pwritev2(c.ex.fd, &iov, 1, <off_t>offset, RWF_DSYNC)
            if k < 0 and (errno == EOPNOTSUPP or errno == ENOSYS or errno == EINVAL):
                k = pwrite(c.ex.fd, p, n, <off_t>offset)
                if k >= 0:
                    rc = sync_file(c.ex)
                    if rc:
                        return rc
        else:
            k = pwrite(c.ex.fd, p, n, <off_t>offset)
        if k < 0:
            if errno == EINTR:
                continue
            note_error(c.ex, errno)
            return errno
        if k == 0:
            return ENOSPC
        p += k
        n -= k
        offset += k
    return 0


cdef int splice_to_file(conn_t *c, size_t n, uint64_t offset, int *io_err) noexcept nogil:
    """Move n payload bytes from the socket into the file at offset through the pipe.
    A file error is stored in io_err and the rest is drained. 0 or a Reason."""
    cdef ssize_t k, w
    cdef off_t off = <off_t>offset
    if flush_out(c, 0) < 0:
        c.err = errno
        return REASON_VANISHED
    while n > 0:
        k = tp_splice_in(&c.tp, c.pipe_w, n)
        if k < 0:
            if errno == EINTR or errno == EAGAIN:
                continue
            c.err = errno
            return REASON_VANISHED
        if k == 0:
            return REASON_VANISHED
        n -= k
        if c.ex.amap != NULL:
            amap_read_lock(c.ex.amap)
            amap_mark(c.ex.amap, <uint64_t>off, <uint64_t>k)
        while k > 0:
            if io_err[0]:
                w = read(c.pipe_r, c.buf, <size_t>k)       # drain what the file refused
            else:
                w = splice(c.pipe_r, NULL, c.ex.fd, &off, <size_t>k, SPLICE_F_MOVE)
            if w < 0:
                if errno == EINTR:
                    continue
                if io_err[0]:
                    c.err = errno
                    if c.ex.amap != NULL:
                        amap_unlock(c.ex.amap)
                    return REASON_SOCKET_ERROR
                io_err[0] = errno
                note_error(c.ex, errno)
                continue
            if w == 0:
                io_err[0] = ENOSPC
                continue
            k -= w
        if c.ex.amap != NULL:
            amap_unlock(c.ex.amap)
    return 0


cdef inline void written(conn_t *c, uint64_t offset, uint64_t length, int covers) noexcept nogil:
    """A write-type request completed: tell the mirror (after the data landed, so that a
    concurrent dirty-map drain either reads the new data or sees the block marked again) and,
    in listen mode, record the coverage."""
    cdef amap_t *dirty = <amap_t *>load_ptr(&c.ex.dirty)
    if dirty != NULL:
        amap_mark(dirty, offset, length)
    if covers and c.coverage != NULL:
        cover(c.coverage, offset, length)


cdef inline int no_room(conn_t *c, uint64_t offset, uint64_t length) noexcept nogil:
    """Listen mode: this write starts a new range and the session has no room left."""
    return c.coverage != NULL and no_room_to_cover(c.coverage, offset, length)


cdef int write_cut_short(conn_t *c, const request_t *r, uint64_t offset, uint64_t partial,
                         int error, int reason) noexcept nogil:
    """The client went away in the middle of a WRITE's payload: what reached the file so far
    (up to offset, plus up to ``partial`` bytes of a chunk being spliced) is still news for a
    running mirror. Returns ``reason``."""
    if not error and offset + partial > r.offset:
        written(c, r.offset, offset + partial - r.offset, 0)
    return reason


cdef int do_write(conn_t *c, const request_t *r, int error) noexcept nogil:
    """Receive the payload into the file (or drain it when ``error`` is set), then reply.

    0, or a Reason ending the connection.
    """
    cdef uint64_t left = r.length
    cdef uint64_t offset = r.offset
    cdef size_t n
    cdef int rc
    cdef int fua = r.flags & CMD_FLAG_FUA
    cdef int io_err = 0
    if fua and not error and load_acquire(&c.ex.io_error):
        error = NBD_EIO      # data may have been lost: never claim anything durable again
    if not error and no_room(c, r.offset, r.length):
        error = NBD_EINVAL
    if left > DRAIN_LIMIT:
        reply_simple(c, r, NBD_EINVAL)
        flush_out(c, 0)
        return REASON_TOO_BIG
    while left > 0:
        if left <= INBUF_SIZE // 2:
            # Small: read it (and whatever follows) into inbuf, write from there.
            rc = fill_inbuf(c, <size_t>left, 0)
            if rc:
                return write_cut_short(c, r, offset, 0, error,
                                       REASON_VANISHED if rc == REASON_CLOSED else rc)
            n = <size_t>left
            if not error and not io_err:
                io_err = write_data(c, c.inb.data + c.inb.pos, n, offset, fua)
            c.inb.pos += n
        elif ib_unread(&c.inb):
            # Large, and its first bytes came in with the header: write those from inbuf.
            n = ib_unread(&c.inb)
            if n > left:
                n = <size_t>left
            if not error and not io_err:
                io_err = write_data(c, c.inb.data + c.inb.pos, n, offset, fua)
            c.inb.pos += n
        else:
            # Large: in chunks that end on block boundaries, so zero blocks can be seen whole.
            n = BUF_SIZE - (offset & (BLOCK_SIZE - 1))
            if n > left:
                n = <size_t>left
            if c.pipe_r >= 0 and not fua and not error and not io_err and \
                    (c.splice_all or c.ex.amap == NULL or
                     amap_all_allocated(c.ex.amap, offset, n)):
                # Onto allocated space: splice socket -> pipe -> file, one copy fewer.
                rc = splice_to_file(c, n, offset, &io_err)
                if rc:
                    return write_cut_short(c, r, offset, n, error, rc)
            else:
                rc = recv_exact(c, c.buf, n)
                if rc:
                    return write_cut_short(c, r, offset, 0, error, rc)
                if not error and not io_err:
                    io_err = write_data(c, c.buf, n, offset, fua)
        left -= n
        offset += n
    if io_err:
        log_io_error(c, r, io_err)
        error = nbd_error(io_err)
    if not error or io_err:
        # A failed write may still have changed part of the range: the mirror must resend it.
        written(c, r.offset, r.length, not error)
    if c.coverage != NULL and not error:
        count_received(c.coverage, r.length, 0)
    if c.coverage != NULL and not error and not fua:
        # Listen mode: start writing the migration's data back now, so the FLUSH that ends
        # it (SPEC §6.7) finds little left to do. Asynchronous; only a congested device
        # queue makes it wait, which paces the sender to the disk.
        sync_file_range(c.ex.fd, <off_t>r.offset, <off_t>r.length, SYNC_FILE_RANGE_WRITE)
    return 0 if reply_simple(c, r, error) == 0 else REASON_VANISHED


cdef int zero_range(conn_t *c, uint64_t offset, uint64_t length, uint16_t flags) noexcept nogil:
    """WRITE_ZEROES: punch unless NO_HOLE; else ZERO_RANGE; else write zeroes. 0 or errno
    (ENOTSUP for FAST_ZERO when only writing zeroes would do)."""
    cdef int rc
    if not (flags & CMD_FLAG_NO_HOLE) and c.ex.can_punch:
        rc = punch_hole(c, offset, length)
        if rc != EOPNOTSUPP:
            return rc
    if c.ex.amap != NULL:
        amap_read_lock(c.ex.amap)
        amap_mark(c.ex.amap, offset, length)
    rc = zero_allocated(c, offset, length, flags)
    if c.ex.amap != NULL:
        amap_unlock(c.ex.amap)
    return rc


cdef int punch_hole(conn_t *c, uint64_t offset, uint64_t length) noexcept nogil:
    """fallocate(PUNCH_HOLE) and clear the whole blocks inside from the map, atomically with
    respect to writes. 0 or errno (EOPNOTSUPP: the file system cannot punch)."""
    cdef int rc = 0
    if c.ex.amap != NULL:
        amap_write_lock(c.ex.amap)
    if fallocate(c.ex.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 <off_t>offset, <off_t>length) == 0:
        if c.ex.amap != NULL:
            amap_clear(c.ex.amap, offset, length)
    else:
        rc = errno
        note_error(c.ex, rc)
        if rc == EOPNOTSUPP:
            c.ex.can_punch = 0
    if c.ex.amap != NULL:
        amap_unlock(c.ex.amap)
    return rc


cdef int zero_allocated(conn_t *c, uint64_t offset, uint64_t length,
                        uint16_t flags) noexcept nogil:
    """Zero a range without punching: ZERO_RANGE, else write zeroes (not for FAST_ZERO)."""
    cdef size_t n
    cdef int rc
    if c.ex.can_zero_range:
        if fallocate(c.ex.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                     <off_t>offset, <off_t>length) == 0:
            return 0
        if errno != EOPNOTSUPP:
            note_error(c.ex, errno)
            return errno
        c.ex.can_zero_range = 0
    if flags & CMD_FLAG_FAST_ZERO:
        return ENOTSUP
    memset(c.buf, 0, BUF_SIZE)
    while length > 0:
        n = BUF_SIZE if length > BUF_SIZE else <size_t>length
        rc = write_range(c, c.buf, n, offset, 0)
        if rc:
            return rc
        length -= n
        offset += n
    return 0


cdef int do_command(conn_t *c, const request_t *r) noexcept nogil:
    """FLUSH, TRIM, WRITE_ZEROES, CACHE (validated). Returns the NBD error to reply with."""
    cdef int e = 0
    cdef uint16_t cmd = r.type
    if load_acquire(&c.ex.io_error) and (cmd == CMD_FLUSH or (r.flags & CMD_FLAG_FUA)):
        return NBD_EIO       # data may have been lost: never claim anything durable again
    if cmd == CMD_FLUSH:
        e = sync_file(c.ex)
    elif cmd == CMD_TRIM:
        if r.length and c.ex.can_punch:
            e = punch_hole(c, r.offset, r.length)
            if e == EOPNOTSUPP:
                e = 0                    # TRIM is advisory: nothing to do then
    elif cmd == CMD_WRITE_ZEROES:
        if no_room(c, r.offset, r.length):
            return NBD_EINVAL
        if r.length:
            e = zero_range(c, r.offset, r.length, r.flags)
    elif cmd == CMD_CACHE:
        posix_fadvise(c.ex.fd, <off_t>r.offset, <off_t>r.length, POSIX_FADV_WILLNEED)
    if e == 0 and (r.flags & CMD_FLAG_FUA) and (cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES):
        e = sync_file(c.ex)
    if cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES:
        # (even when it failed: part of the range may have changed)
        written(c, r.offset, r.length, e == 0 and cmd == CMD_WRITE_ZEROES)
        if c.coverage != NULL and e == 0 and cmd == CMD_WRITE_ZEROES:
            count_received(c.coverage, 0, r.length)
    if e:
        if e == ENOTSUP and cmd == CMD_WRITE_ZEROES and (r.flags & CMD_FLAG_FAST_ZERO):
            return NBD_ENOTSUP
        log_io_error(c, r, e)
        return nbd_error(e)
    return 0


cdef void log_io_error(conn_t *c, const request_t *r, int e) noexcept nogil:
    # Rare: take the GIL to log.
    with gil:
        _log.error("I/O error on %s at offset %d length %d: %s",
                   _COMMAND_NAMES.get(r.type, r.type), r.offset, r.length,
                   errors.errno_text(e))


_COMMAND_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}


cdef int serve_loop(conn_t *c) noexcept nogil:
    """The transmission phase. Returns a Reason; details in c.err/cmd/offset/length."""
    cdef request_t r
    cdef frame_t frame
    cdef int rc
    cdef int error
    while True:
        if c.out_len == 0:
            c.request_started_ns = 0     # (replies still batched keep their request's clock)
        if load_acquire(&c.kicked):
            # Checked here as well as in the poll: a client that keeps its pipeline full
            # might never leave us waiting.
            flush_out(c, 0)
            return REASON_STOPPED
        rc = fill_inbuf(c, REQUEST_SIZE, 1)
        if rc:
            return rc
        c.request_started_ns = now_ns()
        frame = frame_request(c.inb.data + c.inb.pos, &r)
        c.inb.pos += REQUEST_SIZE
        c.requests += 1
        if r.type == CMD_FLUSH or (r.flags & CMD_FLAG_FUA):
            c.last_sync = c.requests
        c.cmd = r.type
        c.offset = r.offset
        c.length = r.length
        if frame == FRAME_BAD_MAGIC:
            reply_simple(c, &r, NBD_EBADMSG)
            flush_out(c, 0)
            return REASON_BAD_MAGIC
        error = validate(&r, &c.lim)
        if r.type == CMD_WRITE or r.type == CMD_WRITE_ZEROES or r.type == CMD_TRIM:
            c.writes += 1
        if r.type == CMD_WRITE:
            rc = do_write(c, &r, error)
            if rc:
                return rc
            continue
        if r.type == CMD_DISC and not error:
            flush_out(c, 0)
            return REASON_DISC
        if error:
            rc = reply_error(c, &r, error)
        elif r.type == CMD_READ:
            rc = do_read(c, &r)
            if rc:
                return rc
        elif r.type == CMD_BLOCK_STATUS:
            rc = do_block_status(c, &r)
        else:
            rc = reply_simple(c, &r, do_command(c, &r))
        if rc < 0:
            c.err = errno
            return REASON_VANISHED


cdef class Connection:
    """One client in the transmission phase. Owns its buffers; not the socket."""

    cdef conn_t c
    cdef Export export
    cdef CoverageMap coverage
    cdef TlsSession tls

    def __cinit__(self, int sock, Export export, *, int stop_fd=-1, bint structured=False,
                  int meta_context=0, bint fast_zero=False, CoverageMap coverage=None,
                  bint splice_all=False, double idle_spin=0, TlsSession tls=None):
        cdef int fds[2]
        # Every descriptor field is -1 before anything can fail, so __dealloc__ closes only
        # what was opened (the struct starts zeroed, and 0 is stdin).
        self.c.kick_fd = self.c.pipe_r = self.c.pipe_w = self.c.follow_cpu = -1
        self.export = export
        self.coverage = coverage
        self.c.coverage = &coverage.c if coverage is not None else NULL
        self.c.tp.fd = sock
        self.c.stop_fd = stop_fd
        # A migration sender that can send WRITE_ZEROES sends holes that way, so its WRITEs
        # are data: splice them straight into the file (one copy fewer, no zero scan) instead
        # of receiving them to look for zero blocks to skip.
        self.c.splice_all = splice_all
        # A client that answers within this many seconds is waited for with a spin.
        self.c.spin_ns = <int64_t>(idle_spin * 1e9)
        self.c.kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.c.kick_fd < 0:
            raise OSError(errno, os.strerror(errno))
        # (TLS: WRITE payloads must be decrypted, so they are never spliced.)
        if tls is None and pipe2(fds, O_CLOEXEC) == 0:
            self.c.pipe_r, self.c.pipe_w = fds[0], fds[1]
            fcntl(self.c.pipe_w, F_SETPIPE_SZ, <int>BUF_SIZE)
        self.c.ex = &export.ex
        self.c.lim.size = export.ex.size
        self.c.lim.read_only = export.ex.read_only
        self.c.lim.structured = structured
        if meta_context & META_COVERAGE and coverage is None:
            raise ValueError("the coverage context needs a coverage map")
        self.c.lim.meta_context = meta_context
        self.c.lim.fast_zero = fast_zero and export.ex.can_punch
        self.c.inb.data = <char *>malloc(INBUF_SIZE)
        self.c.inb.cap = INBUF_SIZE
        self.c.buf = <char *>malloc(BUF_SIZE)
        self.c.outbuf = <char *>malloc(OUTBUF_SIZE)
        if not self.c.inb.data or not self.c.buf or not self.c.outbuf:
            raise MemoryError()
        if tls is not None:
            # READ data is pread into buf (free while a READ is answered) and encrypted.
            self.tls = tls
            tls.batch_writes()
            self.c.tp.ssl = tls.ssl
            self.c.tp.bounce = self.c.buf
            self.c.tp.bounce_size = BUF_SIZE

    def __dealloc__(self):
        unmap_window(&self.c)
        free(self.c.inb.data)
        free(self.c.buf)
        free(self.c.outbuf)
        if self.c.kick_fd >= 0:
            close(self.c.kick_fd)
        if self.c.pipe_r >= 0:
            close(self.c.pipe_r)
            close(self.c.pipe_w)

    def serve(self):
        """Run the transmission phase until the client leaves; returns a ServeResult."""
        cdef int reason
        with nogil:
            reason = serve_loop(&self.c)
            follow_client(&self.c, 0)
            unmap_window(&self.c)
        self.c.request_started_ns = 0
        return ServeResult(Reason(reason), self.c.err,
                           _COMMAND_NAMES.get(self.c.cmd, self.c.cmd),
                           self.c.offset, self.c.length, self.c.requests)

    def kick(self):
        """Make the connection end after its current request (from any thread)."""
        cdef uint64_t one = 1
        store_release(&self.c.kicked, 1)
        write(self.c.kick_fd, &one, 8)

    @property
    def copy_reads(self):
        """Whether READs up to 256 KiB are copied out of the page cache here (pread into the
        reply batch, then one send) instead of sent with sendfile.

        sendfile costs this thread the least, but a client on this host then copies the data
        out of cold page-cache pages itself; a copy here leaves it hot socket buffers. Worth
        it where the client is the bottleneck (several connections from one local client:
        their threads share our CPUs with it), not where this thread is. Settable from any
        thread; heeded from the next READ."""
        return bool(load_acquire(&self.c.copy_reads))

    @copy_reads.setter
    def copy_reads(self, bint on):
        store_release(&self.c.copy_reads, on)

    @property
    def local(self):
        """Whether the client is on this host: then READs longer than 256 KiB are copied out
        of the page cache here too, when that serves it faster (see big_read_copies). Set
        before serve()."""
        return bool(self.c.local)

    @local.setter
    def local(self, bint on):
        self.c.local = on

    @property
    def request_age_ns(self):
        """How long the current request has been running (0 between requests)."""
        cdef int64_t started = self.c.request_started_ns
        return now_ns() - started if started else 0

    @property
    def requests(self):
        return self.c.requests

    @property
    def errors(self):
        """Requests answered with an error so far."""
        return self.c.errors

    @property
    def writes(self):
        """WRITE, WRITE_ZEROES and TRIM requests received so far, answered or not (whether
        the session may have changed the file)."""
        return self.c.writes

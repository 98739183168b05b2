# cython: language_level=3
"""The mirror sender: push ranges of the export to a destination server (simple replies),
pipelined, data by sendfile (or through TLS), holes as WRITE_ZEROES, without the GIL.

A hole costs one WRITE_ZEROES per 4 GiB (the length field has 32 bits), not one per 8 MiB:
a sparse 15 TiB export is a few thousand requests, not two million."""

from libc.stdint cimport uint32_t, uint64_t

from flexnbd._client cimport outcome_error, read_reply
from flexnbd._core cimport Export, export_run, export_t
from flexnbd._nbdio cimport *
from flexnbd._sys cimport *
from flexnbd._tls cimport TlsSession
from flexnbd._wire cimport *

import os

cdef enum:
    MIRROR_MAX_REQUEST = 8 * 1024 * 1024     # the largest WRITE the mirror sends
    ZERO_BUF_SIZE = 256 * 1024
    BOUNCE_SIZE = 1024 * 1024                # TLS: file data is read here, then encrypted

# The largest WRITE_ZEROES: 4 GiB - 4 KiB, block-aligned, within the 32-bit length field. (Not
# in the enum: an enum is a C int, and this does not fit one.)
cdef uint64_t MIRROR_MAX_ZEROES = 0xFFFFF000


cdef int send_zero_payload(transport_t *tp, const char *zeroes, uint64_t n) noexcept nogil:
    cdef size_t k
    cdef int rc
    while n > 0:
        k = ZERO_BUF_SIZE if n > ZERO_BUF_SIZE else <size_t>n
        rc = tp_send_all(tp, zeroes, k, MSG_MORE if n > k else 0)
        if rc:
            return rc
        n -= k
    return 0


# Unacknowledged mirror requests allowed at once: the destination always has the next request
# waiting while it writes the current one.
cdef enum:
    MAX_IN_FLIGHT = 64
    MAX_IN_FLIGHT_BYTES = 32 * 1024 * 1024


cdef struct mstream_t:
    transport_t tp
    export_t *ex
    int zeroes               # the destination takes WRITE_ZEROES
    uint64_t cookie
    uint64_t sizes[MAX_IN_FLIGHT]    # payload bytes of the requests in flight (a ring)
    uint64_t offs[MAX_IN_FLIGHT]     # ... and their ranges, for unanswered()
    uint64_t lens[MAX_IN_FLIGHT]
    uint64_t sending_off             # the request being sent (sending_len 0: none)
    uint64_t sending_len
    uint32_t head
    uint32_t count
    uint64_t bytes_in_flight
    uint64_t wire_bytes
    uint32_t remote          # the error of an error reply


cdef int ms_collect(mstream_t *s) noexcept nogil:
    """Read and check the reply to the oldest request in flight. 0 or a client outcome."""
    cdef int rc = read_reply(&s.tp, s.cookie, &s.remote)
    s.wire_bytes += SIMPLE_REPLY_SIZE
    if rc:
        return rc
    s.bytes_in_flight -= s.sizes[s.head]
    s.head = (s.head + 1) % MAX_IN_FLIGHT
    s.count -= 1
    return C_OK


cdef int ms_send(mstream_t *s, uint64_t offset, uint64_t length, const char *zbuf,
                 uint64_t *sent) noexcept nogil:
    """Send [offset, offset+length) as WRITE (data, from the file with sendfile) and, for holes
    of the allocation map, WRITE_ZEROES (or WRITE of zeroes to a destination without it),
    collecting replies as the window requires; the payload bytes sent are added to sent[0].
    0 or a client outcome (C_*, or -errno)."""
    cdef char h[REQUEST_SIZE]
    cdef uint64_t n, payload, limit
    cdef int allocated, rc, with_payload
    while length > 0:
        n = export_run(s.ex, offset, length, &allocated)
        with_payload = allocated or not s.zeroes
        limit = MIRROR_MAX_REQUEST if with_payload else MIRROR_MAX_ZEROES
        if n > limit:
            n = limit
        payload = n if with_payload else 0
        while s.count == MAX_IN_FLIGHT or \
                (s.count and s.bytes_in_flight + payload > MAX_IN_FLIGHT_BYTES):
            rc = ms_collect(s)
            if rc:
                return rc
        s.sending_off = offset
        s.sending_len = n
        if payload:
            make_request(h, CMD_WRITE, 0, s.cookie, offset, <uint32_t>n)
            rc = tp_send_all(&s.tp, h, REQUEST_SIZE, MSG_MORE)
            if rc == 0:
                if allocated:
                    rc = tp_sendfile_all(&s.tp, s.ex.fd, offset, n)
                else:
                    rc = send_zero_payload(&s.tp, zbuf, n)
        else:
            make_request(h, CMD_WRITE_ZEROES, 0, s.cookie, offset, <uint32_t>n)
            rc = tp_send_all(&s.tp, h, REQUEST_SIZE, 0)
        s.wire_bytes += REQUEST_SIZE + payload
        if rc:
            return rc
        s.sizes[(s.head + s.count) % MAX_IN_FLIGHT] = payload
        s.offs[(s.head + s.count) % MAX_IN_FLIGHT] = offset
        s.lens[(s.head + s.count) % MAX_IN_FLIGHT] = n
        s.sending_len = 0
        s.count += 1
        s.bytes_in_flight += payload
        sent[0] += payload
        offset += n
        length -= n
    return C_OK


cdef char *_zero_buffer = <char *>calloc(ZERO_BUF_SIZE, 1)


cdef class MirrorStream:
    """Mirror requests to a destination (transmission phase, simple replies), pipelined: up to
    MAX_IN_FLIGHT requests / MAX_IN_FLIGHT_BYTES unanswered. Every reply must carry the cookie
    .MIRROR. and error 0. ``flush()`` waits for them all. ``timeout``: each reply within this
    many seconds, each request sent within it (or moving 1 MiB within it): _nbdio's deadline
    mode, the socket becomes non-blocking; 0: the socket's own timeouts.

    Raises ProtocolError (bad reply), RemoteError (error reply), PeerClosed, TimeoutError,
    OSError."""

    cdef mstream_t s
    cdef Export export
    cdef TlsSession tls

    def __cinit__(self, int sock, Export export, bint zeroes, TlsSession tls=None,
                  double timeout=0):
        self.export = export
        self.s.tp.fd = sock
        if timeout > 0 and tp_set_deadlines(&self.s.tp, timeout) < 0:
            raise OSError(errno, os.strerror(errno))
        self.s.ex = &export.ex
        self.s.zeroes = zeroes
        self.s.cookie = htobe64(MIRROR_COOKIE)    # (sent as its bytes are in memory)
        if tls is not None:
            # The data is pread into this buffer and encrypted (no sendfile under TLS).
            self.tls = tls
            tls.batch_writes()
            self.s.tp.ssl = tls.ssl
            self.s.tp.bounce = <char *>malloc(BOUNCE_SIZE)
            self.s.tp.bounce_size = BOUNCE_SIZE
            if not self.s.tp.bounce:
                raise MemoryError()

    def __dealloc__(self):
        free(self.s.tp.bounce)

    def send(self, uint64_t offset, uint64_t length):
        """Send the range; returns the payload bytes that went (holes sent as WRITE_ZEROES
        have none)."""
        cdef int rc
        cdef uint64_t sent = 0
        if not in_range(offset, length, self.s.ex.size):
            raise ValueError("range beyond the export")
        with nogil:
            rc = ms_send(&self.s, offset, length, _zero_buffer, &sent)
        self._check(rc)
        return sent

    def flush(self):
        cdef int rc = C_OK
        with nogil:
            while self.s.count and rc == C_OK:
                rc = ms_collect(&self.s)
        self._check(rc)

    def unanswered(self):
        """[(offset, length)] of the requests sent (or being sent) and not answered with
        success: after a failure, what the destination may hold torn, or not at all."""
        cdef uint32_t i
        out = [(self.s.offs[(self.s.head + i) % MAX_IN_FLIGHT],
                self.s.lens[(self.s.head + i) % MAX_IN_FLIGHT]) for i in range(self.s.count)]
        if self.s.sending_len:
            out.append((self.s.sending_off, self.s.sending_len))
        return out

    @property
    def wire_bytes(self):
        """Bytes that crossed the wire: requests, payloads and replies."""
        return self.s.wire_bytes

    cdef _check(self, int rc):
        if rc != C_OK:
            raise outcome_error(rc, self.s.remote, "the destination",
                                "the destination did not answer in time")

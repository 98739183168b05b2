# cython: language_level=3
"""The `read` and `write` modes' copy: simple-reply READ or WRITE requests between a connected
NBD server and a local descriptor, without the GIL (after the handshake)."""

import os

from libc.stdint cimport uint16_t, uint32_t, uint64_t

from flexnbd._nbdio cimport *
from flexnbd._sys cimport *
from flexnbd._tls cimport TlsSession
from flexnbd._wire cimport *

from flexnbd import errors, wire


cdef int fd_write_all(int fd, const char *p, size_t n) noexcept nogil:
    cdef ssize_t k
    while n > 0:
        k = write(fd, p, n)
        if k < 0:
            if errno == EINTR:
                continue
            return -errno
        p += k
        n -= k
    return 0


cdef int exchange(transport_t *tp, uint16_t cmd, uint64_t cookie, uint64_t offset, uint32_t n,
                  const char *payload, uint32_t *remote) noexcept nogil:
    """Send one request (a WRITE with its ``payload``) and receive its simple reply."""
    cdef char h[REQUEST_SIZE]
    cdef int rc
    make_request(h, cmd, 0, cookie, offset, n)
    rc = tp_send_all(tp, h, REQUEST_SIZE, MSG_MORE if payload != NULL else 0)
    if rc == 0 and payload != NULL:
        rc = tp_send_all(tp, payload, n, 0)
    if rc:
        return rc
    return read_reply(tp, cookie, remote)


cdef int client_transfer(transport_t *tp, int fd, uint64_t offset, uint64_t size, int writing,
                         char *buf, uint32_t *remote) noexcept nogil:
    """READ [offset, offset+size) to fd, or WRITE it from fd, in requests of <= MAX_PAYLOAD."""
    cdef uint64_t cookie = 0
    cdef uint32_t n
    cdef ssize_t k
    cdef size_t got
    cdef int rc
    while size > 0:
        n = MAX_PAYLOAD if size > MAX_PAYLOAD else <uint32_t>size
        cookie += 1
        if writing:
            got = 0
            while got < n:
                k = read(fd, buf + got, n - got)
                if k < 0:
                    if errno == EINTR:
                        continue
                    return -errno
                if k == 0:
                    return C_SHORT_INPUT
                got += k
            rc = exchange(tp, CMD_WRITE, cookie, offset, n, buf, remote)
            if rc:
                return rc
        else:
            rc = exchange(tp, CMD_READ, cookie, offset, n, NULL, remote)
            if rc:
                return rc
            rc = tp_recv_all(tp, buf, n)
            if rc:
                return C_CLOSED if rc == 1 else rc
            rc = fd_write_all(fd, buf, n)
            if rc:
                return rc
        offset += n
        size -= n
    return C_OK


def client_copy(int sock, int fd, uint64_t offset, uint64_t size, bint writing,
                TlsSession tls=None, double timeout=0):
    """Copy between an NBD server (simple replies) and a local fd without the GIL.

    ``writing``: WRITE size bytes read from fd at ``offset``; else READ them into fd.
    ``tls``: the session the handshake started on ``sock`` (everything goes through it).
    ``timeout``: each request, reply and payload within this many seconds (_nbdio's deadline
    mode; the socket becomes non-blocking); 0: none.
    Raises the errors of ``flexnbd.errors``; TimeoutError, or OSError for a local or socket
    failure.
    """
    cdef uint32_t remote = 0
    cdef int rc
    cdef transport_t tp
    cdef char *buf = <char *>malloc(MAX_PAYLOAD)
    if not buf:
        raise MemoryError()
    memset(&tp, 0, sizeof(tp))
    tp.fd = sock
    if timeout > 0 and tp_set_deadlines(&tp, timeout) < 0:
        free(buf)
        raise OSError(errno, os.strerror(errno))
    if tls is not None:
        tls.batch_writes()
        tp.ssl = tls.ssl             # (no sendfile here: no bounce buffer needed)
    try:
        with nogil:
            rc = client_transfer(&tp, fd, offset, size, writing, buf, &remote)
    finally:
        free(buf)
    if rc != C_OK:
        raise outcome_error(rc, remote, "the server",
                            f"the server did not answer within {timeout:g} s")


cdef object outcome_error(int rc, uint32_t remote, str peer, str late):
    if rc == -EAGAIN:
        return TimeoutError(late)
    if rc < 0:
        return OSError(-rc, os.strerror(-rc))
    if rc == C_CLOSED:
        return errors.PeerClosed(f"{peer} closed the connection")
    if rc == C_BAD_MAGIC:
        return errors.ProtocolError(f"{peer} sent a reply with a bad magic")
    if rc == C_BAD_COOKIE:
        return errors.ProtocolError(f"{peer} answered a request that was not sent")
    if rc == C_SHORT_INPUT:
        return errors.FlexnbdError("the input ended before SIZE bytes were read")
    name = wire.ERROR_NAMES.get(remote, f"error {remote}")
    return errors.RemoteError(remote, name, f"{peer} answered {name}")

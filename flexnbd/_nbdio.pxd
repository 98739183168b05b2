# NBD I/O shared by the server (_core.pyx) and the proxy (_proxy.pyx): the transport, the
# receive buffer, and the checks both make on a request. One home each; inline, no GIL.
#
# The transport is the one seam between NBD code and a peer's bytes: every send and receive on
# a peer's socket goes through a tp_* call. It is a plain socket, or a TLS session on it
# (tp.ssl): tp_send_all/tp_recv then encrypt and decrypt, tp_sendfile_all becomes a pread into the
# transport's bounce buffer and an encrypted write (file bytes must be encrypted on the way),
# and tp_splice_in is not available (callers use a receive instead). The proxy's non-blocking
# calls (tp_sendmsg, MSG_DONTWAIT receives) work on a non-blocking socket: under TLS a send
# copies what it accepts into the transport's stage and encrypts it from there, and what the
# socket could not take yet waits in the stage (tp_unsent) until tp_send_unsent finishes it.
#
# Deadlines. A blocking transport (the server's clients) waits as its socket's timeouts say.
# A transport in deadline mode (tp_set_deadlines: the mirror, read and write) runs on a
# non-blocking socket and gives each send or receive of a whole buffer (a reply, a request, a
# payload) one deadline: it must be done within the timeout, or move DEADLINE_PROGRESS bytes,
# which starts a new one. A peer trickling a byte at a time, in plaintext or inside a TLS
# record, cannot extend it (a blocking socket's timeouts restart with every byte).

from libc.stdint cimport int64_t, uint16_t, uint64_t

from flexnbd._openssl cimport (
    BIO, SSL, SSL_ERROR_SYSCALL, SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE,
    SSL_ERROR_ZERO_RETURN, BIO_flush, BIO_should_retry, ERR_clear_error, SSL_get_error,
    BIO_wpending, SSL_get_wbio, SSL_has_pending, SSL_pending, SSL_read_ex, SSL_write_ex,
)
from flexnbd._sys cimport EAGAIN, EDQUOT, EFBIG, EINTR, EINVAL, EIO, ENOSPC, EOPNOTSUPP, EPERM, \
    EPIPE, EPROTO, EROFS, F_GETFL, F_SETFL, MSG_DONTWAIT, MSG_MORE, MSG_NOSIGNAL, MSG_WAITALL, \
    O_NONBLOCK, POLLIN, POLLOUT, \
    SPLICE_F_MORE, SPLICE_F_MOVE, errno, fcntl, memcpy, memmove, msghdr, now_ns, off_t, poll, \
    pollfd, pread, recv, send, sendfile, sendmsg, set_errno, splice, ssize_t
from flexnbd._wire cimport *

cdef enum:
    # Request headers and small payloads (or, upstream of the proxy, replies and small READ
    # data) are received in bulk into a buffer of this size.
    INBUF_SIZE = 256 * 1024
    # Deadline mode: a send or receive that moves this many bytes gets a new deadline.
    DEADLINE_PROGRESS = 1024 * 1024
    # The success value of the I/O helpers (their failures: a reason, an end or -errno).
    C_OK = 0


# --------------------------------------------------------------------------------------------
# Checks on a request

cdef inline bint in_range(uint64_t offset, uint64_t length, uint64_t size) noexcept nogil:
    """offset+length <= size, computed so that it cannot overflow."""
    return offset <= size and length <= size - offset


cdef inline bint payload_too_big(const request_t *r) noexcept nogil:
    """A READ or WRITE longer than the largest payload we take (and advertise)."""
    return (r.type == CMD_READ or r.type == CMD_WRITE) and r.length > MAX_PAYLOAD


cdef enum frame_t:
    FRAME_OK = 0
    FRAME_BAD_MAGIC       # not a request: the stream is lost, the connection ends
    FRAME_DISC            # the client says goodbye
    FRAME_TOO_BIG         # a payload longer than MAX_PAYLOAD


cdef inline frame_t frame_request(const char *p, request_t *r) noexcept nogil:
    """Decode the request header at ``p`` into ``r`` and say how it is framed: the one
    decoder the server and the proxy share (each then answers a bad frame its own way)."""
    decode_header(p, r)
    if r.magic != REQUEST_MAGIC:
        return FRAME_BAD_MAGIC
    if r.type == CMD_DISC:
        return FRAME_DISC
    if payload_too_big(r):
        return FRAME_TOO_BIG
    return FRAME_OK


cdef enum:
    META_ALLOCATION = 1      # base:allocation
    META_COVERAGE = 2        # flexnbd:coverage:<migration id> (listen mode)


cdef struct limits_t:
    uint64_t size            # export size
    int read_only
    int structured           # structured replies negotiated (DF is valid)
    int meta_context         # contexts selected (BLOCK_STATUS is valid): META_* bits
    int fast_zero            # SEND_FAST_ZERO advertised


# Which command flags each command accepts (FUA is valid on every command, as the NBD spec says).
cdef inline uint16_t allowed_flags(uint16_t cmd, const limits_t *lim) noexcept nogil:
    cdef uint16_t f = CMD_FLAG_FUA
    if cmd == CMD_READ and lim.structured:
        f |= CMD_FLAG_DF
    elif cmd == CMD_WRITE_ZEROES:
        f |= CMD_FLAG_NO_HOLE
        if lim.fast_zero:
            f |= CMD_FLAG_FAST_ZERO
    elif cmd == CMD_BLOCK_STATUS:
        f |= CMD_FLAG_REQ_ONE
    return f


cdef inline int validate(const request_t *r, const limits_t *lim) noexcept nogil:
    """The NBD error (0 for none) a well-framed request must be answered with.

    The magic is checked by the caller (a bad magic ends the connection).
    """
    cdef uint16_t cmd = r.type
    if cmd > CMD_BLOCK_STATUS:
        return NBD_EINVAL
    if r.flags & ~allowed_flags(cmd, lim):
        return NBD_EINVAL
    if cmd == CMD_DISC or cmd == CMD_FLUSH:
        return 0
    if lim.read_only and (cmd == CMD_WRITE or cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES):
        return NBD_EPERM
    if payload_too_big(r):
        return NBD_EINVAL
    if cmd == CMD_BLOCK_STATUS and (not lim.meta_context or r.length == 0):
        return NBD_EINVAL
    if not in_range(r.offset, r.length, lim.size):
        if cmd == CMD_WRITE or cmd == CMD_WRITE_ZEROES:
            return NBD_ENOSPC
        return NBD_EINVAL
    return 0


cdef inline int nbd_error(int e) noexcept nogil:
    """Map a system errno onto the NBD error sent to the client."""
    if e == EPERM or e == EROFS:
        return NBD_EPERM
    if e == ENOSPC or e == EDQUOT or e == EFBIG:
        return NBD_ENOSPC
    if e == EINVAL:
        return NBD_EINVAL
    if e == EOPNOTSUPP:   # == ENOTSUP on Linux
        return NBD_ENOTSUP
    return NBD_EIO


# --------------------------------------------------------------------------------------------
# The transport

cdef struct transport_t:
    int fd                    # the connected socket (poll it for readiness); not owned
    SSL *ssl                  # NULL: plaintext; else the TLS session on fd (not owned)
    char *bounce              # TLS: file data on its way to be encrypted (not owned)
    size_t bounce_size
    # Non-blocking TLS (the proxy). OpenSSL wants a write that could not finish retried with
    # the same bytes, so a send copies what it accepts here first (not owned).
    char *stage
    size_t stage_cap
    size_t stage_len          # bytes accepted and not yet all encrypted and sent
    bint read_blocked         # the last TLS read wanted more bytes from the socket
    bint read_wants_write     # the last TLS read waits for the socket to be writable
    bint write_wants_read     # the last TLS write waits for it to be readable
    # Deadline mode (tp_set_deadlines); 0: blocking, the socket's own timeouts
    int64_t timeout_ns
    int64_t deadline_ns       # the current operation's
    uint64_t progress         # bytes it moved since its deadline was set


cdef inline int tls_error(SSL *ssl, int ok) noexcept nogil:
    """The SSL error of an SSL_read_ex/SSL_write_ex that returned ``ok`` (0: none)."""
    return 0 if ok == 1 else SSL_get_error(ssl, ok)


cdef inline ssize_t tls_outcome(int e, size_t n, int reading) noexcept nogil:
    """An SSL_read_ex/SSL_write_ex outcome (its tls_error ``e``) as recv/send would give it:
    n; 0 when the peer closed (reading); -1 with errno: EAGAIN (not ready: a timeout on a
    blocking socket, or a non-blocking one), EPIPE (the peer went away mid-session), EPROTO
    (a TLS error: bad record, failed MAC), or the socket's own errno."""
    if e == 0:
        return <ssize_t>n
    if e == SSL_ERROR_ZERO_RETURN:
        if reading:
            return 0
        set_errno(EPIPE)
    elif e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
        set_errno(EAGAIN)
    elif e == SSL_ERROR_SYSCALL:
        if errno == 0:             # the socket ended without a TLS close_notify
            if reading:
                return 0
            set_errno(EPIPE)
    else:
        set_errno(EPROTO)
    return -1


cdef inline int tls_flush(transport_t *t) noexcept nogil:
    """Send the records gathered in the session's write buffer (TlsSession.batch_writes).
    0, or -1 with errno (EAGAIN: no progress within the send timeout)."""
    cdef BIO *w = SSL_get_wbio(t.ssl)
    set_errno(0)
    if BIO_flush(w) == 1:
        return 0
    if BIO_should_retry(w):
        set_errno(EAGAIN)
    elif errno == 0:
        set_errno(EPIPE)
    return -1


cdef inline ssize_t tls_recv(transport_t *t, void *p, size_t n) noexcept nogil:
    """One decrypted read (callers loop for MSG_WAITALL, as they do for recv). On a
    non-blocking socket: EAGAIN, and read_wants_write says whether the read waits for the
    socket to take a write (a TLS 1.3 KeyUpdate answer) rather than for bytes."""
    cdef size_t got = 0
    cdef int e
    ERR_clear_error()
    set_errno(0)
    e = tls_error(t.ssl, SSL_read_ex(t.ssl, p, n, &got))
    t.read_blocked = e == SSL_ERROR_WANT_READ
    t.read_wants_write = e == SSL_ERROR_WANT_WRITE
    return tls_outcome(e, got, 1)


cdef inline int tp_send_unsent(transport_t *t) noexcept nogil:
    """Finish sending the stage (non-blocking TLS): encrypt it, then send the records
    gathered in the session's write buffer (TlsSession.batch_writes). 0 when nothing is left,
    or -1 with errno (EAGAIN: the socket is full; write_wants_read says whether it waits for
    a read)."""
    cdef size_t done = 0
    cdef int e
    if t.stage_len:
        ERR_clear_error()
        set_errno(0)
        e = tls_error(t.ssl, SSL_write_ex(t.ssl, t.stage, t.stage_len, &done))
        if e:
            t.write_wants_read = e == SSL_ERROR_WANT_READ
            tls_outcome(e, done, 0)
            return -1
        t.stage_len = 0
        t.write_wants_read = 0
    if t.ssl != NULL and BIO_wpending(SSL_get_wbio(t.ssl)):
        return tls_flush(t)
    return 0


cdef inline bint tp_unsent(const transport_t *t) noexcept nogil:
    """Bytes a non-blocking send accepted that have not all left yet."""
    return t.stage_len > 0 or (t.ssl != NULL and BIO_wpending(SSL_get_wbio(t.ssl)) > 0)


cdef inline ssize_t tls_sendmsg(transport_t *t, const msghdr *msg) noexcept nogil:
    """A gathered, non-blocking send under TLS: finish the stage, then copy as much of msg
    as fits into it and encrypt that. Returns the bytes accepted (they count as sent; those the
    socket could not take yet wait in the stage), or -1 with errno (EAGAIN: the stage is still
    being sent)."""
    cdef size_t n = 0, c
    cdef size_t i
    if tp_send_unsent(t) < 0:
        return -1
    for i in range(<size_t>msg.msg_iovlen):
        c = msg.msg_iov[i].iov_len
        if c > t.stage_cap - n:
            c = t.stage_cap - n
        memcpy(t.stage + n, msg.msg_iov[i].iov_base, c)
        n += c
        if n == t.stage_cap:
            break
    t.stage_len = n
    if tp_send_unsent(t) < 0 and errno != EAGAIN:
        return -1
    return <ssize_t>n


cdef inline bint tp_pending(const transport_t *t) noexcept nogil:
    """TLS: bytes wait in the session, where poll cannot see them: decrypted ones, or records
    read ahead (or begun) that the last read did not find wanting more bytes (only a
    non-blocking read finds that)."""
    return t.ssl != NULL and (SSL_pending(t.ssl) > 0
                              or (SSL_has_pending(t.ssl) and not t.read_blocked))


cdef inline ssize_t tp_sendmsg(transport_t *t, const msghdr *msg, int flags) noexcept nogil:
    """The proxy's gathered sends (MSG_DONTWAIT; under TLS the socket must be non-blocking
    and t.stage set)."""
    if t.ssl != NULL:
        return tls_sendmsg(t, msg)
    return sendmsg(t.fd, msg, flags | MSG_NOSIGNAL)


cdef inline ssize_t tp_recv(transport_t *t, void *p, size_t n, int flags) noexcept nogil:
    if t.ssl != NULL:
        return tls_recv(t, p, n)        # (MSG_DONTWAIT: the proxy's sockets are non-blocking)
    return recv(t.fd, p, n, flags)


cdef inline ssize_t tp_splice_in(transport_t *t, int pipe_w, size_t n) noexcept nogil:
    """Up to n bytes from the peer into a pipe (on their way to the file). Plaintext only."""
    if t.ssl != NULL:
        set_errno(EOPNOTSUPP)
        return -1
    return splice(t.fd, NULL, pipe_w, NULL, n, SPLICE_F_MOVE | SPLICE_F_MORE)


cdef inline int tp_set_deadlines(transport_t *t, double timeout) noexcept nogil:
    """Deadline mode with ``timeout`` seconds (see the top): the socket becomes non-blocking.
    0, or -1 with errno."""
    cdef int flags = fcntl(t.fd, F_GETFL)
    if flags < 0 or fcntl(t.fd, F_SETFL, flags | O_NONBLOCK) < 0:
        return -1
    t.timeout_ns = <int64_t>(timeout * 1e9)
    if t.timeout_ns <= 0:
        t.timeout_ns = 1
    return 0


cdef inline void tp_begin(transport_t *t) noexcept nogil:
    """An operation begins (deadline mode: its deadline is set)."""
    if t.timeout_ns:
        t.deadline_ns = now_ns() + t.timeout_ns
        t.progress = 0


cdef inline void tp_moved(transport_t *t, size_t n) noexcept nogil:
    """The operation moved n bytes (deadline mode: enough of them start a new deadline)."""
    if t.timeout_ns:
        t.progress += n
        if t.progress >= DEADLINE_PROGRESS:
            tp_begin(t)


cdef inline int tp_wait(transport_t *t, bint want_write) noexcept nogil:
    """After EAGAIN: wait until the socket is ready (``want_write``: writable) or the
    operation's deadline passes. 0 (try again), or -1 with errno: EAGAIN when the deadline
    passed, and always outside deadline mode (there EAGAIN was the socket's own timeout)."""
    cdef pollfd p
    cdef int64_t left
    cdef int rc
    if not t.timeout_ns:
        set_errno(EAGAIN)
        return -1
    p.fd = t.fd
    p.events = POLLOUT if want_write else POLLIN
    while True:
        left = t.deadline_ns - now_ns()
        if left <= 0:
            set_errno(EAGAIN)
            return -1
        rc = poll(&p, 1, <int>((left + 999999) // 1000000))
        if rc > 0:
            return 0          # (an error or hang-up too: the next call reports it)
        if rc < 0 and errno != EINTR:
            return -1


cdef inline int tls_flush_all(transport_t *t) noexcept nogil:
    """tls_flush until the gathered records have all left. 0, or -errno."""
    while tls_flush(t) < 0:
        if errno == EINTR or (errno == EAGAIN and tp_wait(t, 1) == 0):
            continue
        return -errno
    return 0


cdef inline int tls_send_all(transport_t *t, const char *p, size_t n, int flags) noexcept nogil:
    """Encrypt and send n bytes; they leave at once unless MSG_MORE says more follows (then
    with it). A write that could not finish is retried with the same bytes, as OpenSSL wants.
    0, or -errno."""
    cdef size_t done
    cdef int e
    while n > 0:
        ERR_clear_error()
        set_errno(0)
        done = 0
        e = tls_error(t.ssl, SSL_write_ex(t.ssl, p, n, &done))
        if e == 0:
            tp_moved(t, done)
            p += done
            n -= done
            continue
        if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
            if tp_wait(t, e == SSL_ERROR_WANT_WRITE) == 0:
                continue
            return -errno
        tls_outcome(e, done, 0)
        if errno == EINTR:
            continue
        return -errno
    if flags & MSG_MORE:
        return 0
    return tls_flush_all(t)


cdef inline int tp_send_all(transport_t *t, const char *p, size_t n, int flags) noexcept nogil:
    """Send n bytes (flags: MSG_MORE, ...). 0, or -errno (errno still set)."""
    cdef ssize_t k
    tp_begin(t)
    if t.ssl != NULL:
        return tls_send_all(t, p, n, flags)
    while n > 0:
        k = send(t.fd, p, n, flags | MSG_NOSIGNAL)
        if k < 0:
            if errno == EINTR or (errno == EAGAIN and tp_wait(t, 1) == 0):
                continue
            return -errno
        tp_moved(t, <size_t>k)
        p += k
        n -= k
    return 0


cdef inline int tp_recv_all(transport_t *t, char *p, size_t n) noexcept nogil:
    """Receive exactly n bytes. 0, -errno, or 1 when the peer closed first."""
    cdef ssize_t k
    tp_begin(t)
    while n > 0:
        k = tp_recv(t, p, n, MSG_WAITALL)
        if k < 0:
            if errno == EINTR or \
                    (errno == EAGAIN and tp_wait(t, t.ssl != NULL and t.read_wants_write) == 0):
                continue
            return -errno
        if k == 0:
            return 1
        tp_moved(t, <size_t>k)
        p += k
        n -= k
    return 0


cdef inline int tp_sendfile_all(transport_t *t, int fd, uint64_t offset,
                                uint64_t n) noexcept nogil:
    """Send n bytes of file fd from offset: sendfile, or under TLS a pread into the bounce
    buffer and an encrypted send. 0, or -errno (-EIO: the file ended first)."""
    cdef off_t off = <off_t>offset
    cdef ssize_t k
    cdef size_t chunk
    cdef int rc
    tp_begin(t)
    while n > 0:
        if t.ssl != NULL:
            chunk = t.bounce_size if n > t.bounce_size else <size_t>n
            k = pread(fd, t.bounce, chunk, off)
            if k > 0:
                rc = tls_send_all(t, t.bounce, <size_t>k, 0)
                if rc:
                    return rc
        else:
            k = sendfile(t.fd, fd, &off, <size_t>n)
        if k < 0:
            if errno == EINTR or (t.ssl == NULL and errno == EAGAIN and tp_wait(t, 1) == 0):
                continue
            return -errno
        if k == 0:
            return -EIO
        if t.ssl != NULL:
            off += k
        else:
            tp_moved(t, <size_t>k)
        n -= k
    return 0


# --------------------------------------------------------------------------------------------
# The receive buffer: bytes received in bulk, consumed from the front.

cdef struct inbuf_t:
    char *data
    size_t cap
    size_t pos                # the first byte not yet consumed
    size_t len                # the end of what was received


cdef inline size_t ib_unread(const inbuf_t *b) noexcept nogil:
    return b.len - b.pos


cdef inline void ib_compact(inbuf_t *b) noexcept nogil:
    """Move what is not consumed yet to the front, so that the room left is at the end."""
    if b.pos == 0:
        return
    if b.len > b.pos:
        memmove(b.data, b.data + b.pos, b.len - b.pos)
    b.len -= b.pos
    b.pos = 0


cdef inline size_t ib_take(inbuf_t *b, char *dst, size_t n) noexcept nogil:
    """Consume up to n bytes into dst; how many there were."""
    if n > b.len - b.pos:
        n = b.len - b.pos
    memcpy(dst, b.data + b.pos, n)
    b.pos += n
    return n


cdef inline ssize_t ib_recv(transport_t *t, inbuf_t *b, size_t most, int flags) noexcept nogil:
    """Compact, then receive once, at most ``most`` bytes (and the room left), appended.
    Bytes received; 0 when the peer closed; -1 with errno set."""
    cdef ssize_t k
    ib_compact(b)
    if most > b.cap - b.len:
        most = b.cap - b.len
    k = tp_recv(t, b.data + b.len, most, flags)
    if k > 0:
        b.len += <size_t>k
    return k

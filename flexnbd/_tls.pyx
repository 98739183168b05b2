# cython: language_level=3
"""TLS for NBD (STARTTLS), with OpenSSL.

``TlsContext`` holds the credentials as nbdkit, qemu and libnbd take them: an X.509 directory
(``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``)
or a PSK file of ``identity:hexkey`` lines (psktool's format). ``TlsSession`` runs on one
connected socket: the TLS handshake, under the socket's timeout, and ``sendall``/``recv`` for
the rest of the NBD handshake, which stays in Python. The transmission phase then encrypts and
decrypts in C, without the GIL, through the session's SSL (``_nbdio.pxd``'s transport).

TLS 1.3 only: no renegotiation (it does not exist in 1.3), no compression, no session tickets.
"""

import os

from libc.stdint cimport int64_t

from flexnbd._openssl cimport *
from flexnbd._sys cimport EAGAIN, EINTR, POLLIN, POLLOUT, calloc, errno, free, memcpy, now_ns, \
    poll, pollfd, set_errno, strcmp, strlen

from flexnbd.errors import TlsError

# The Unix-domain and TCP sockets we run on are the caller's; a session never closes them.

cdef int ex_index = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, NULL)

MAX_PSK_ENTRIES = 1024
cdef enum:
    # What batch_writes gathers before sending: 16 records of 16 KiB.
    WRITE_BATCH = 256 * 1024
    # What a session that reads ahead reads at most at once.
    READ_AHEAD = 256 * 1024

# The bounds of a PSK file's entries, in bytes (psk_t holds them): an identity of 1 to 128
# bytes, a key of 16 to 64 bytes (32 to 128 hex digits; psktool makes 32-byte keys). Fewer than
# 16 bytes would be a key an eavesdropper can guess offline from one recorded handshake.
PSK_IDENTITY_MAX = 128
PSK_KEY_MIN = 16
PSK_KEY_MAX = 64
# A line longer than this cannot be an entry (the identity, ':', 128 hex digits): it is
# refused without being looked at further.
_PSK_LINE_MAX = PSK_IDENTITY_MAX + 1 + 2 * PSK_KEY_MAX
# A PSK file bigger than this is not a PSK file (1024 entries of the longest line).
_PSK_FILE_MAX = MAX_PSK_ENTRIES * (_PSK_LINE_MAX + 2)
_HEX = frozenset(b"0123456789abcdefABCDEF")


def read_psk_file(path):
    """[(identity bytes, key bytes)] from a psktool file, parsed as bytes with the bounds
    above; TlsError naming the file and the line for anything else. An identity is printable
    bytes other than ':' and space (UTF-8 allowed; its length counts bytes)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_PSK_FILE_MAX + 1)
    except OSError as e:
        raise TlsError(f"cannot read the PSK file {path}: {e.strerror or e}")
    if len(data) > _PSK_FILE_MAX:
        raise TlsError(f"the PSK file {path} is too big for a PSK file (over "
                       f"{_PSK_FILE_MAX} bytes)")
    entries = []
    for number, line in enumerate(data.split(b"\n"), 1):
        line = line.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        entries.append(_psk_entry(path, number, line))
        if len(entries) > MAX_PSK_ENTRIES:
            raise TlsError(f"the PSK file {path} has more than {MAX_PSK_ENTRIES} entries")
    if not entries:
        raise TlsError(f"the PSK file {path} has no 'identity:hexkey' line")
    return entries


def _psk_entry(path, number, bytes line):
    """One ``identity:hexkey`` line as (identity, key); TlsError saying what is wrong."""
    where = f"{path}, line {number}"
    if len(line) > _PSK_LINE_MAX:
        raise TlsError(f"{where}: too long for 'identity:hexkey' (an identity of at most "
                       f"{PSK_IDENTITY_MAX} bytes and a key of at most {PSK_KEY_MAX})")
    identity, colon, hexkey = line.partition(b":")
    if not colon:
        raise TlsError(f"{where}: not 'identity:hexkey'")
    if not 1 <= len(identity) <= PSK_IDENTITY_MAX:
        raise TlsError(f"{where}: the identity must be 1 to {PSK_IDENTITY_MAX} bytes, not "
                       f"{len(identity)}")
    if any(c < 0x21 or c == 0x7F for c in identity):
        raise TlsError(f"{where}: the identity has a space or a control character")
    if not hexkey or len(hexkey) % 2 or not _HEX.issuperset(hexkey):
        raise TlsError(f"{where}: the key is not an even number of hex digits")
    key = bytes.fromhex(hexkey.decode("ascii"))
    if not PSK_KEY_MIN <= len(key) <= PSK_KEY_MAX:
        raise TlsError(f"{where}: the key must be {PSK_KEY_MIN} to {PSK_KEY_MAX} bytes, "
                       f"not {len(key)}")
    return identity, key


cdef str openssl_error(str default):
    """The last OpenSSL error as text (the queue is emptied), or ``default``."""
    cdef char buf[256]
    cdef unsigned long e = ERR_peek_last_error()
    ERR_clear_error()
    if e == 0:
        return default
    ERR_error_string_n(e, buf, sizeof(buf))
    text = buf.decode("utf-8", "replace")
    # "error:0A000086:SSL routines::certificate verify failed" -> the reason alone
    return text.rpartition(":")[2] or text


cdef unsigned int psk_server(SSL *ssl, const char *identity, unsigned char *psk,
                             unsigned int max_len) noexcept nogil:
    """The key of ``identity`` from the PSK file; 0 (refused) for an unknown identity."""
    cdef creds_t *c = <creds_t *>SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_index)
    cdef size_t i
    if c == NULL or identity == NULL:
        return 0
    for i in range(c.npsk):
        if strcmp(c.psk[i].identity, identity) == 0 and c.psk[i].key_len <= max_len:
            memcpy(psk, c.psk[i].key, c.psk[i].key_len)
            return c.psk[i].key_len
    return 0


cdef unsigned int psk_client(SSL *ssl, const char *hint, char *identity,
                             unsigned int max_identity_len, unsigned char *psk,
                             unsigned int max_len) noexcept nogil:
    """Our identity and key: the PSK file's first entry."""
    cdef creds_t *c = <creds_t *>SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_index)
    cdef size_t n
    if c == NULL or c.npsk == 0:
        return 0
    n = strlen(c.psk[0].identity)
    if n + 1 > max_identity_len or c.psk[0].key_len > max_len:
        return 0
    memcpy(identity, c.psk[0].identity, n + 1)
    memcpy(psk, c.psk[0].key, c.psk[0].key_len)
    return c.psk[0].key_len


cdef int refuse_certificate(int preverify_ok, X509_STORE_CTX *store) noexcept nogil:
    """A client that holds a PSK and no CA: a server that shows a certificate has turned the
    key down (TLS 1.3 allows that) and asks to be trusted some other way; it is not."""
    X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION)
    return 0


NOT_PSK = "the server did not use the pre-shared key"


cdef class TlsContext:
    """Credentials for one side (server or client). Exactly one of ``certificates`` (an X.509
    directory) and ``psk_file``. ``verify_peer``: a server asks for, and checks, a client
    certificate (X.509 only). ``read_ahead`` (default: servers): sessions read many records
    at once. TlsError for missing or bad credentials."""

    def __cinit__(self, *, bint server, certificates=None, psk_file=None,
                  bint verify_peer=False, read_ahead=None):
        self.server = server
        self.certificates = certificates
        self.psk_file = psk_file
        if (certificates is None) == (psk_file is None):
            raise TlsError("give TLS credentials as either a certificates directory or a "
                           "PSK file")
        self.ctx = SSL_CTX_new(TLS_server_method() if server else TLS_client_method())
        if self.ctx == NULL:
            raise TlsError("cannot create a TLS context: " + openssl_error("out of memory"))
        SSL_CTX_set_min_proto_version(self.ctx, TLS1_3_VERSION)
        SSL_CTX_set_options(self.ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION
                            | SSL_OP_NO_TICKET)
        SSL_CTX_set_mode(self.ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        SSL_CTX_set_num_tickets(self.ctx, 0)      # no resumption: nothing unasked on the wire
        # AES-128-GCM first, and the server's order wins: measured (fio seq read 1M qd16 over
        # TLS), it cut the server's CPU from 0.71 to 0.45 s/GiB against AES-256-GCM, which
        # OpenSSL and GnuTLS otherwise agree on (10 AES rounds instead of 14); both are TLS
        # 1.3's own suites. ChaCha20 last: on CPUs without AES instructions clients ask for
        # it first, and OpenSSL then honours that.
        SSL_CTX_set_ciphersuites(self.ctx, b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                           b"TLS_CHACHA20_POLY1305_SHA256")
        SSL_CTX_set_options(self.ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_PRIORITIZE_CHACHA)
        if server:
            # A client that just closes (no close_notify) has closed, as in plaintext: NBD's
            # framing shows a cut request. A client side keeps OpenSSL's strict default, so
            # that a mirror reads only a close_notify as the destination's "taken".
            SSL_CTX_set_options(self.ctx, SSL_OP_IGNORE_UNEXPECTED_EOF)
        if server if read_ahead is None else read_ahead:
            # Read what the socket has, many records at once, not each record's header and
            # body in two reads: a client's pipelined requests (one record each) are then
            # decrypted from memory, and the serve loop sends their replies together
            # (wait_readable); big payloads take a read per 256 KiB, not two per 16 KiB. The
            # transport's tp_pending sees such buffered records. (Servers, and the proxy's
            # upstream side; a mirror reads replies one at a time.)
            SSL_CTX_set_read_ahead(self.ctx, 1)
            SSL_CTX_set_default_read_buffer_len(self.ctx, READ_AHEAD)
        SSL_CTX_set_ex_data(self.ctx, ex_index, &self.creds)
        if psk_file is not None:
            self.kind = "psk"
            self._load_psk(os.fsdecode(psk_file))
        else:
            self.kind = "x509"
            self._load_x509(os.fsdecode(certificates), verify_peer)

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)
        free(self.creds.psk)

    def _load_psk(self, str path):
        entries = read_psk_file(path)
        self.creds.psk = <psk_t *>calloc(len(entries), sizeof(psk_t))
        if self.creds.psk == NULL:
            raise MemoryError()
        for i, (identity, key) in enumerate(entries):
            # (read_psk_file bounds both: identity <= 128 bytes into 129, key <= 64 into 64;
            # calloc left the identity's terminator)
            assert len(identity) < sizeof(self.creds.psk[i].identity)
            assert len(key) <= sizeof(self.creds.psk[i].key)
            memcpy(self.creds.psk[i].identity, <const char *>identity, len(identity))
            memcpy(self.creds.psk[i].key, <const unsigned char *>key, len(key))
            self.creds.psk[i].key_len = len(key)
        self.creds.npsk = len(entries)
        if self.server:
            SSL_CTX_set_psk_server_callback(self.ctx, psk_server)
        else:
            SSL_CTX_set_psk_client_callback(self.ctx, psk_client)
            # Insist on the key: any certificate is refused (and TlsSession.handshake checks
            # that the key was used), so a server without the key cannot fall back to a
            # certificate handshake and be taken for the destination.
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER, refuse_certificate)

    def _load_x509(self, str directory, bint verify_peer):
        if not os.path.isdir(directory):
            raise TlsError(f"the TLS certificates directory {directory} does not exist")
        ca = os.path.join(directory, "ca-cert.pem")
        me = "server" if self.server else "client"
        cert = os.path.join(directory, f"{me}-cert.pem")
        key = os.path.join(directory, f"{me}-key.pem")
        if self.server or os.path.exists(cert):
            for needed in (cert, key):
                if not os.path.exists(needed):
                    raise TlsError(f"{needed} is missing")
            if SSL_CTX_use_certificate_chain_file(self.ctx, os.fsencode(cert)) != 1:
                raise TlsError(f"{cert}: " + openssl_error("not a certificate"))
            if SSL_CTX_use_PrivateKey_file(self.ctx, os.fsencode(key), SSL_FILETYPE_PEM) != 1:
                raise TlsError(f"{key}: " + openssl_error("not a private key"))
            if SSL_CTX_check_private_key(self.ctx) != 1:
                raise TlsError(f"{key} does not match {cert}")
        if not self.server or verify_peer:
            if not os.path.exists(ca):
                raise TlsError(f"{ca} is missing (it is needed to check the peer)")
            if SSL_CTX_load_verify_locations(self.ctx, os.fsencode(ca), NULL) != 1:
                raise TlsError(f"{ca}: " + openssl_error("not a certificate"))
            SSL_CTX_set_verify(self.ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                               NULL)

    def session(self, sock, server_hostname=None):
        """A TlsSession on the connected ``sock`` (not yet shaken hands)."""
        return TlsSession(self, sock, server_hostname)


cdef int wait_ready(int fd, int want_write, int64_t deadline_ns) noexcept nogil:
    """Wait until fd is ready (deadline_ns < 0: no deadline). 0, or -1 with errno (EAGAIN:
    the deadline passed)."""
    cdef pollfd p
    cdef int64_t left
    cdef int rc
    p.fd = fd
    p.events = POLLOUT if want_write else POLLIN
    while True:
        if deadline_ns < 0:
            rc = poll(&p, 1, -1)
        else:
            left = deadline_ns - now_ns()
            if left <= 0:
                set_errno(EAGAIN)
                return -1
            rc = poll(&p, 1, <int>((left + 999999) // 1000000))
        if rc > 0:
            return 0
        if rc < 0 and errno != EINTR:
            return -1


# tls_io's deadline for "do not wait": return the SSL error that asks for readiness.
cdef int64_t NO_WAIT = -2


cdef int tls_io(SSL *ssl, int fd, int writing, void *p, size_t n, size_t *done,
                int64_t deadline, int *err) noexcept nogil:
    """One SSL_write_ex/SSL_read_ex: SSL_ERROR_NONE (``done`` bytes), or its SSL error after
    waiting (until ``deadline``; -1: none) for what it wants; -1 if that wait failed. The
    errno that goes with it in ``err``."""
    cdef int ok, e
    ERR_clear_error()
    set_errno(0)
    done[0] = 0
    ok = SSL_write_ex(ssl, p, n, done) if writing else SSL_read_ex(ssl, p, n, done)
    e = SSL_ERROR_NONE if ok == 1 else SSL_get_error(ssl, ok)
    err[0] = errno
    if (e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE) and deadline != NO_WAIT:
        if wait_ready(fd, e == SSL_ERROR_WANT_WRITE, deadline) < 0:
            err[0] = errno
            return -1
    return e


cdef class TlsSession:
    """TLS on one connected socket. The socket's timeout (settimeout) is the deadline of each
    call, the handshake included; TimeoutError when it passes, TlsError when TLS fails,
    ConnectionResetError/PeerClosed-style OSErrors when the peer goes."""

    def __cinit__(self, TlsContext context, sock, server_hostname=None):
        self.context = context
        self.sock = sock
        self.ssl = SSL_new(context.ctx)
        if self.ssl == NULL or SSL_set_fd(self.ssl, sock.fileno()) != 1:
            raise TlsError("cannot create a TLS session: " + openssl_error("out of memory"))
        if context.server:
            SSL_set_accept_state(self.ssl)
        else:
            SSL_set_connect_state(self.ssl)
            if server_hostname and context.kind == "x509":
                # The server's certificate must name the host (or IP address) we dialled.
                SSL_set1_host(self.ssl, server_hostname.encode())

    def __dealloc__(self):
        if self.ssl != NULL:
            SSL_free(self.ssl)

    cdef int batch_writes(self) except -1:
        """From now on gather the records written in a buffer of WRITE_BATCH bytes, sent when
        it fills or is flushed (the transport flushes each reply's end), instead of one
        send() per record of at most 16 KiB: measured, that was most of a TLS READ's cost."""
        cdef BIO *sock
        cdef BIO *buf
        if self.batched:
            return 0
        sock = SSL_get_wbio(self.ssl)
        buf = BIO_new(BIO_f_buffer())
        if buf == NULL:
            raise MemoryError()
        BIO_set_write_buffer_size(buf, WRITE_BATCH)
        BIO_up_ref(sock)                # (the buffer holds it; the session lets go of it)
        BIO_push(buf, sock)
        SSL_set0_wbio(self.ssl, buf)
        self.batched = True
        return 0

    def _flush(self, int64_t deadline):
        """Send what batch_writes gathered (nothing to do without it)."""
        cdef BIO *w = SSL_get_wbio(self.ssl)
        cdef int rc, retry, err = 0
        cdef int fd = self.sock.fileno()
        while True:
            with nogil:
                set_errno(0)
                rc = BIO_flush(w)
                retry = rc != 1 and BIO_should_retry(w)
                err = errno
                if retry and wait_ready(fd, 1, deadline) < 0:
                    err = errno
                    retry = -1
            if rc == 1:
                return
            if retry == 1:
                continue
            if retry == -1 and err == EAGAIN:
                raise TimeoutError("TLS send timed out")
            if not err:
                raise BrokenPipeError("the peer closed the connection")
            raise OSError(err, os.strerror(err))

    def _deadline(self):
        timeout = self.sock.gettimeout()
        return -1 if timeout is None else now_ns() + <int64_t>(timeout * 1e9)

    def handshake(self):
        """Run the TLS handshake. TlsError (final: wrong key, untrusted certificate, not TLS),
        TimeoutError, or the socket's OSError."""
        cdef int rc, e, err
        cdef int64_t deadline = self._deadline()
        cdef int fd = self.sock.fileno()
        while True:
            with nogil:
                ERR_clear_error()
                set_errno(0)
                rc = SSL_do_handshake(self.ssl)
                e = SSL_get_error(self.ssl, rc) if rc != 1 else SSL_ERROR_NONE
                err = errno
                if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
                    if wait_ready(fd, e == SSL_ERROR_WANT_WRITE, deadline) < 0:
                        err = errno
                        e = -1
            if e == SSL_ERROR_NONE:
                self._check_authenticated()
                return
            if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
                continue
            if e == -1:
                if err == EAGAIN:
                    raise TimeoutError("the TLS handshake timed out")
                raise OSError(err, os.strerror(err))
            if e == SSL_ERROR_SYSCALL and err:
                raise OSError(err, "TLS handshake: " + os.strerror(err))
            if e == SSL_ERROR_SYSCALL or e == SSL_ERROR_ZERO_RETURN:
                raise TlsError("TLS handshake failed: the peer closed the connection "
                               "(wrong key or certificate?)")
            verify = SSL_get_verify_result(self.ssl)
            reason = openssl_error("protocol error")
            if verify != X509_V_OK:
                reason = X509_verify_cert_error_string(verify).decode("utf-8", "replace")
            if self._psk_client() and (verify != X509_V_OK
                                       or SSL_get0_peer_certificate(self.ssl) != NULL):
                reason = NOT_PSK
            raise TlsError(f"TLS handshake failed: {reason}")

    def _psk_client(self):
        return not self.context.server and self.context.kind == "psk"

    def _check_authenticated(self):
        """After a handshake that succeeded: a PSK client accepts only one that used the key
        (no certificate, the key resumed as TLS 1.3 resumes a PSK); fail closed otherwise."""
        if self._psk_client() and (not SSL_session_reused(self.ssl)
                                   or SSL_get0_peer_certificate(self.ssl) != NULL):
            raise TlsError(f"TLS handshake failed: {NOT_PSK}")

    def sendall(self, data):
        """Encrypt and send all of ``data``."""
        cdef const unsigned char[:] view = memoryview(data).cast("B")
        cdef size_t pos = 0, n = len(view), done
        cdef int e, err
        cdef int64_t deadline = self._deadline()
        cdef int fd = self.sock.fileno()
        while pos < n:
            with nogil:
                e = tls_io(self.ssl, fd, 1, <void *>&view[pos], n - pos, &done, deadline, &err)
            if e == SSL_ERROR_NONE:
                pos += done
            elif e != SSL_ERROR_WANT_READ and e != SSL_ERROR_WANT_WRITE:
                self._fail(e, err, "send")
        self._flush(deadline)

    def send(self, data):
        """Encrypt and send all of ``data`` (a TLS record is all or nothing); its length."""
        self.sendall(data)
        return len(data)

    def recv(self, size_t n):
        """Up to n decrypted bytes; b"" when the peer closed. The socket's timeout is one
        deadline for the whole call: a record trickled in a byte at a time does not extend
        it."""
        cdef int64_t deadline = self._deadline()
        while True:
            data = self._recv_once(n, deadline)
            if data is not None:
                return data

    def recv_nowait(self, size_t n):
        """Up to n decrypted bytes if some are ready now; None if none are (a TLS record that
        carries no data, such as a session ticket, is consumed); b"" when the peer closed."""
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            return self._recv_once(n, NO_WAIT)
        finally:
            self.sock.settimeout(timeout)

    def _recv_once(self, size_t n, int64_t deadline):
        """One read: bytes, b"" (closed), or None (nothing yet: a record without data, or,
        with NO_WAIT, nothing ready)."""
        cdef bytearray buf = bytearray(max(n, 1))
        cdef unsigned char[:] view = buf
        cdef size_t got = 0
        cdef int e, err
        cdef int fd = self.sock.fileno()
        if n == 0:
            return b""
        with nogil:
            e = tls_io(self.ssl, fd, 0, &view[0], n, &got, deadline, &err)
        if e == SSL_ERROR_NONE:
            return bytes(buf[:got])
        if e == SSL_ERROR_ZERO_RETURN or (e == SSL_ERROR_SYSCALL and err == 0):
            return b""
        if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
            return None
        self._fail(e, err, "receive")

    def _fail(self, int e, int err, str what):
        if e == -1 and err == EAGAIN:
            raise TimeoutError(f"TLS {what} timed out")
        if e == SSL_ERROR_ZERO_RETURN:
            raise BrokenPipeError("the peer ended the TLS session")
        if e == -1 or (e == SSL_ERROR_SYSCALL and err):
            raise OSError(err, os.strerror(err))
        if e == SSL_ERROR_SYSCALL:
            raise BrokenPipeError("the peer closed the connection")
        raise TlsError(f"TLS {what} failed: " + openssl_error("protocol error"))

    def close_notify(self):
        """Tell the peer the session ends (best effort, once; the socket stays open)."""
        if not self.shut:
            self.shut = True
            with nogil:
                ERR_clear_error()
                SSL_shutdown(self.ssl)
                BIO_flush(SSL_get_wbio(self.ssl))
            ERR_clear_error()

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def gettimeout(self):
        return self.sock.gettimeout()

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def fileno(self):
        return self.sock.fileno()

    @property
    def family(self):
        return self.sock.family

    @property
    def version(self):
        """"TLSv1.3 TLS_AES_256_GCM_SHA384", for the logs."""
        return (SSL_get_version(self.ssl).decode() + " "
                + (SSL_get_cipher_name(self.ssl) or b"").decode())

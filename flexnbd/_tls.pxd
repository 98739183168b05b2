from flexnbd._openssl cimport SSL, SSL_CTX


cdef struct psk_t:
    char identity[129]        # NUL-terminated, at most 128 bytes
    unsigned char key[64]
    unsigned int key_len


cdef struct creds_t:
    psk_t *psk                # the PSK file's entries (a client uses the first)
    size_t npsk


cdef class TlsContext:
    cdef SSL_CTX *ctx
    cdef creds_t creds
    cdef readonly bint server
    cdef readonly str kind          # "x509" or "psk"
    cdef readonly object certificates
    cdef readonly object psk_file


cdef class TlsSession:
    cdef SSL *ssl
    cdef readonly TlsContext context
    cdef object sock                # the socket the session runs on (keeps its fd open)
    cdef bint shut
    cdef bint batched
    cdef int batch_writes(self) except -1

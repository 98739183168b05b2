# The part of OpenSSL (libssl, libcrypto 3.x) that flexnbd uses, declared once. The system
# OpenSSL: the same library CPython links, present wherever flexnbd builds, with TLS 1.3,
# PSK and X.509 in one place; the wheels bundle it (auditwheel).

cdef extern from "<openssl/bio.h>" nogil:
    ctypedef struct BIO:
        pass
    ctypedef struct BIO_METHOD:
        pass
    const BIO_METHOD *BIO_f_buffer()
    BIO *BIO_new(const BIO_METHOD *method)
    int BIO_up_ref(BIO *b)
    void BIO_free_all(BIO *b)
    BIO *BIO_push(BIO *b, BIO *append)
    long BIO_set_write_buffer_size(BIO *b, long size)
    int BIO_flush(BIO *b)
    int BIO_should_retry(BIO *b)
    size_t BIO_wpending(BIO *b)

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_METHOD:
        pass
    ctypedef struct X509_STORE_CTX:
        pass

    const SSL_METHOD *TLS_server_method()
    const SSL_METHOD *TLS_client_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version)
    unsigned long SSL_CTX_set_options(SSL_CTX *ctx, unsigned long options)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    void SSL_CTX_set_read_ahead(SSL_CTX *ctx, int yes)
    void SSL_CTX_set_default_read_buffer_len(SSL_CTX *ctx, size_t len)
    void SSL_set_read_ahead(SSL *s, int yes)
    void SSL_set_default_read_buffer_len(SSL *s, size_t len)
    int SSL_CTX_set_ciphersuites(SSL_CTX *ctx, const char *suites)
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *ciphers)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *path)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *path, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *cafile, const char *capath)
    ctypedef int (*verify_cb)(int preverify_ok, X509_STORE_CTX *store) noexcept nogil
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, verify_cb callback)
    int SSL_CTX_set_num_tickets(SSL_CTX *ctx, size_t num_tickets)
    int SSL_CTX_set_ex_data(SSL_CTX *ctx, int idx, void *data)
    void *SSL_CTX_get_ex_data(const SSL_CTX *ctx, int idx)
    int SSL_CTX_get_ex_new_index(long argl, void *argp, void *new_func, void *dup_func,
                                 void *free_func)
    ctypedef unsigned int (*psk_server_cb)(SSL *ssl, const char *identity,
                                           unsigned char *psk, unsigned int max_psk_len)
    ctypedef unsigned int (*psk_client_cb)(SSL *ssl, const char *hint, char *identity,
                                           unsigned int max_identity_len, unsigned char *psk,
                                           unsigned int max_psk_len)
    void SSL_CTX_set_psk_server_callback(SSL_CTX *ctx, psk_server_cb cb)
    void SSL_CTX_set_psk_client_callback(SSL_CTX *ctx, psk_client_cb cb)

    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    unsigned long SSL_set_options(SSL *ssl, unsigned long options)
    int SSL_set1_host(SSL *ssl, const char *hostname)
    long SSL_set_tlsext_host_name(SSL *ssl, const char *name)
    void SSL_set_accept_state(SSL *ssl)
    void SSL_set_connect_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
    int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)
    int SSL_pending(const SSL *ssl)
    int SSL_has_pending(const SSL *ssl)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_error(const SSL *ssl, int ret)
    long SSL_get_verify_result(const SSL *ssl)
    int SSL_session_reused(const SSL *ssl)
    void *SSL_get0_peer_certificate(const SSL *ssl)
    const char *SSL_get_version(const SSL *ssl)
    const char *SSL_get_cipher_name(const SSL *ssl)
    BIO *SSL_get_wbio(const SSL *ssl)
    void SSL_set0_wbio(SSL *ssl, BIO *wbio)
    enum:
        TLS1_2_VERSION
        TLS1_3_VERSION
        SSL_OP_NO_COMPRESSION
        SSL_OP_NO_RENEGOTIATION
        SSL_OP_NO_TICKET
        SSL_OP_IGNORE_UNEXPECTED_EOF
        SSL_OP_CIPHER_SERVER_PREFERENCE
        SSL_OP_PRIORITIZE_CHACHA
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        SSL_FILETYPE_PEM
        SSL_VERIFY_NONE
        SSL_VERIFY_PEER
        SSL_VERIFY_FAIL_IF_NO_PEER_CERT
        SSL_ERROR_NONE
        SSL_ERROR_SSL
        SSL_ERROR_WANT_READ
        SSL_ERROR_WANT_WRITE
        SSL_ERROR_SYSCALL
        SSL_ERROR_ZERO_RETURN

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    unsigned long ERR_peek_last_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)

cdef extern from "<openssl/x509.h>" nogil:
    const char *X509_verify_cert_error_string(long n)
    void X509_STORE_CTX_set_error(X509_STORE_CTX *store, int error)
    enum:
        X509_V_OK
        X509_V_ERR_APPLICATION_VERIFICATION

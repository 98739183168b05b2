# The NBD wire format: every magic, command, flag, error and size, the one home of each value.
# The compiled code cimports them; Python reads them from the _wire module (_wire.pyx exports
# them, flexnbd/wire.py re-exports them with the struct helpers). No other file spells a magic
# number.

from libc.stdint cimport uint16_t, uint32_t, uint64_t

from flexnbd._sys cimport be16toh, be32toh, be64toh, htobe16, htobe32, htobe64, memcpy

cdef extern from *:
    """
    #define FLEXNBD_NBDMAGIC            0x4e42444d41474943ULL
    #define FLEXNBD_OLDSTYLE_MAGIC      0x0000420281861253ULL
    #define FLEXNBD_IHAVEOPT            0x49484156454F5054ULL
    #define FLEXNBD_OPTION_REPLY_MAGIC  0x0003e889045565a9ULL
    #define FLEXNBD_MIRROR_COOKIE       0x2e4d4952524f522eULL
    #define FLEXNBD_REP_ERR_UNSUP       0x80000001U
    #define FLEXNBD_REP_ERR_POLICY      0x80000002U
    #define FLEXNBD_REP_ERR_INVALID     0x80000003U
    #define FLEXNBD_REP_ERR_PLATFORM    0x80000004U
    #define FLEXNBD_REP_ERR_TLS_REQD    0x80000005U
    #define FLEXNBD_REP_ERR_UNKNOWN     0x80000006U
    #define FLEXNBD_REP_ERR_SHUTDOWN    0x80000007U
    #define FLEXNBD_REP_ERR_BLOCK_SIZE_REQD 0x80000008U
    #define FLEXNBD_REP_ERR_TOO_BIG     0x80000009U
    """
    const uint64_t NBDMAGIC "FLEXNBD_NBDMAGIC"
    const uint64_t OLDSTYLE_MAGIC "FLEXNBD_OLDSTYLE_MAGIC"
    const uint64_t IHAVEOPT "FLEXNBD_IHAVEOPT"
    const uint64_t OPTION_REPLY_MAGIC "FLEXNBD_OPTION_REPLY_MAGIC"
    # The cookie of every migration request, ".MIRROR." (as 0.5.0 sends it), big-endian.
    const uint64_t MIRROR_COOKIE "FLEXNBD_MIRROR_COOKIE"
    # Option reply errors (the high bit set: more than a C enum's int holds).
    const uint32_t REP_ERR_UNSUP "FLEXNBD_REP_ERR_UNSUP"
    const uint32_t REP_ERR_POLICY "FLEXNBD_REP_ERR_POLICY"
    const uint32_t REP_ERR_INVALID "FLEXNBD_REP_ERR_INVALID"
    const uint32_t REP_ERR_PLATFORM "FLEXNBD_REP_ERR_PLATFORM"
    const uint32_t REP_ERR_TLS_REQD "FLEXNBD_REP_ERR_TLS_REQD"
    const uint32_t REP_ERR_UNKNOWN "FLEXNBD_REP_ERR_UNKNOWN"
    const uint32_t REP_ERR_SHUTDOWN "FLEXNBD_REP_ERR_SHUTDOWN"
    const uint32_t REP_ERR_BLOCK_SIZE_REQD "FLEXNBD_REP_ERR_BLOCK_SIZE_REQD"
    const uint32_t REP_ERR_TOO_BIG "FLEXNBD_REP_ERR_TOO_BIG"

# The values that fit a C int: compile-time constants for the compiled code, and (cpdef) module
# attributes of flexnbd._wire for Python.

cpdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668e33ef

    REQUEST_SIZE = 28
    SIMPLE_REPLY_SIZE = 16
    CHUNK_HEADER_SIZE = 20
    OLDSTYLE_GREETING_SIZE = 152

    # Largest READ/WRITE payload we accept (and advertise as the maximum block size).
    MAX_PAYLOAD = 32 * 1024 * 1024

    # Handshake flags (server) and client flags.
    FLAG_FIXED_NEWSTYLE = 1 << 0
    FLAG_NO_ZEROES = 1 << 1
    FLAG_C_FIXED_NEWSTYLE = 1 << 0
    FLAG_C_NO_ZEROES = 1 << 1

    # Transmission flags.
    FLAG_HAS_FLAGS = 1 << 0
    FLAG_READ_ONLY = 1 << 1
    FLAG_SEND_FLUSH = 1 << 2
    FLAG_SEND_FUA = 1 << 3
    FLAG_ROTATIONAL = 1 << 4
    FLAG_SEND_TRIM = 1 << 5
    FLAG_SEND_WRITE_ZEROES = 1 << 6
    FLAG_SEND_DF = 1 << 7
    FLAG_CAN_MULTI_CONN = 1 << 8
    FLAG_SEND_CACHE = 1 << 10
    FLAG_SEND_FAST_ZERO = 1 << 11

    # Commands.
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_FLUSH = 3
    CMD_TRIM = 4
    CMD_CACHE = 5
    CMD_WRITE_ZEROES = 6
    CMD_BLOCK_STATUS = 7

    # Command flags.
    CMD_FLAG_FUA = 1 << 0
    CMD_FLAG_NO_HOLE = 1 << 1
    CMD_FLAG_DF = 1 << 2
    CMD_FLAG_REQ_ONE = 1 << 3
    CMD_FLAG_FAST_ZERO = 1 << 4

    # Structured reply chunks.
    REPLY_FLAG_DONE = 1 << 0
    REPLY_TYPE_NONE = 0
    REPLY_TYPE_OFFSET_DATA = 1
    REPLY_TYPE_OFFSET_HOLE = 2
    REPLY_TYPE_BLOCK_STATUS = 5
    REPLY_TYPE_ERROR = 32769
    REPLY_TYPE_ERROR_OFFSET = 32770

    # Options.
    OPT_EXPORT_NAME = 1
    OPT_ABORT = 2
    OPT_LIST = 3
    OPT_STARTTLS = 5
    OPT_INFO = 6
    OPT_GO = 7
    OPT_STRUCTURED_REPLY = 8
    OPT_LIST_META_CONTEXT = 9
    OPT_SET_META_CONTEXT = 10

    # Option reply types.
    REP_ACK = 1
    REP_SERVER = 2
    REP_INFO = 3
    REP_META_CONTEXT = 4

    # Info types.
    INFO_EXPORT = 0
    INFO_NAME = 1
    INFO_DESCRIPTION = 2
    INFO_BLOCK_SIZE = 3

    # The id flexnbd gives the base:allocation meta context.
    BASE_ALLOCATION_ID = 1
    # ... and a listener the flexnbd:coverage:<migration id> one (what a migration's sender
    # wrote, across its reconnects: a resumed migration reads it with BLOCK_STATUS).
    COVERAGE_ID = 2

    # flexnbd:coverage extent flags: written by the migration (else not yet).
    STATE_COVERED = 1 << 0

    # base:allocation extent flags.
    STATE_HOLE = 1 << 0
    STATE_ZERO = 1 << 1

    # Errors on the wire.
    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EBADMSG = 74
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108


# --------------------------------------------------------------------------------------------
# Struct layouts: a request header decoded, and the headers the compiled code writes.

cdef struct request_t:
    uint32_t magic
    uint16_t flags
    uint16_t type
    char cookie[8]           # opaque, echoed back byte for byte
    uint64_t offset
    uint32_t length


cdef inline void decode_header(const char *p, request_t *r) noexcept nogil:
    cdef uint32_t u32
    cdef uint16_t u16
    cdef uint64_t u64
    memcpy(&u32, p, 4)
    r.magic = be32toh(u32)
    memcpy(&u16, p + 4, 2)
    r.flags = be16toh(u16)
    memcpy(&u16, p + 6, 2)
    r.type = be16toh(u16)
    memcpy(r.cookie, p + 8, 8)
    memcpy(&u64, p + 16, 8)
    r.offset = be64toh(u64)
    memcpy(&u32, p + 24, 4)
    r.length = be32toh(u32)


cdef inline void make_request(char *h, uint16_t type, uint16_t flags, uint64_t cookie,
                              uint64_t offset, uint32_t length) noexcept nogil:
    cdef uint32_t u32
    cdef uint16_t u16
    cdef uint64_t u64
    u32 = htobe32(REQUEST_MAGIC)
    memcpy(h, &u32, 4)
    u16 = htobe16(flags)
    memcpy(h + 4, &u16, 2)
    u16 = htobe16(type)
    memcpy(h + 6, &u16, 2)
    memcpy(h + 8, &cookie, 8)
    u64 = htobe64(offset)
    memcpy(h + 16, &u64, 8)
    u32 = htobe32(length)
    memcpy(h + 24, &u32, 4)


cdef inline void make_simple_reply(char *h, uint32_t error, const char *cookie) noexcept nogil:
    cdef uint32_t u32 = htobe32(SIMPLE_REPLY_MAGIC)
    memcpy(h, &u32, 4)
    u32 = htobe32(error)
    memcpy(h + 4, &u32, 4)
    memcpy(h + 8, cookie, 8)


cdef inline uint32_t decode_simple_reply(const char *p, uint32_t *error,
                                         uint64_t *cookie) noexcept nogil:
    """A simple reply's error and cookie (its bytes as they came); returns its magic."""
    cdef uint32_t u32
    memcpy(&u32, p + 4, 4)
    error[0] = be32toh(u32)
    memcpy(cookie, p + 8, 8)
    memcpy(&u32, p, 4)
    return be32toh(u32)


cdef inline void make_chunk_header(char *h, const char *cookie, uint16_t flags, uint16_t type,
                                   uint32_t length) noexcept nogil:
    """A structured reply chunk's header; ``length`` bytes of payload follow it."""
    cdef uint32_t u32
    cdef uint16_t u16
    u32 = htobe32(STRUCTURED_REPLY_MAGIC)
    memcpy(h, &u32, 4)
    u16 = htobe16(flags)
    memcpy(h + 4, &u16, 2)
    u16 = htobe16(type)
    memcpy(h + 6, &u16, 2)
    memcpy(h + 8, cookie, 8)
    u32 = htobe32(length)
    memcpy(h + 16, &u32, 4)


cdef inline void decode_chunk_header(const char *p, uint16_t *flags, uint16_t *type,
                                     uint64_t *cookie, uint32_t *length) noexcept nogil:
    """A structured reply chunk's flags, type, cookie (its bytes as they came) and payload
    length; the caller has checked the magic."""
    cdef uint32_t u32
    cdef uint16_t u16
    memcpy(&u16, p + 4, 2)
    flags[0] = be16toh(u16)
    memcpy(&u16, p + 6, 2)
    type[0] = be16toh(u16)
    memcpy(cookie, p + 8, 8)
    memcpy(&u32, p + 16, 4)
    length[0] = be32toh(u32)


cdef inline uint32_t get_be32(const char *p) noexcept nogil:
    cdef uint32_t u32
    memcpy(&u32, p, 4)
    return be32toh(u32)


cdef inline uint16_t get_be16(const char *p) noexcept nogil:
    cdef uint16_t u16
    memcpy(&u16, p, 2)
    return be16toh(u16)


cdef inline uint64_t get_be64(const char *p) noexcept nogil:
    cdef uint64_t u64
    memcpy(&u64, p, 8)
    return be64toh(u64)


cdef inline void put_be32(char *p, uint32_t v) noexcept nogil:
    cdef uint32_t u32 = htobe32(v)
    memcpy(p, &u32, 4)


cdef inline void put_be64(char *p, uint64_t v) noexcept nogil:
    cdef uint64_t u64 = htobe64(v)
    memcpy(p, &u64, 8)

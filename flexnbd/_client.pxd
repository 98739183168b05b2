# The client side of NBD's transmission phase (simple replies), shared by the `read`/`write`
# copy (_client.pyx) and the mirror sender (_mirror.pyx): reading a reply, and what an outcome
# means (outcome_error, the one errno-and-outcome-to-exception mapping).

from libc.stdint cimport uint32_t, uint64_t

from flexnbd._nbdio cimport C_OK, tp_recv_all, transport_t
from flexnbd._wire cimport SIMPLE_REPLY_MAGIC, SIMPLE_REPLY_SIZE, decode_simple_reply


# Client outcomes: C_OK, these, or -errno of a socket or file error.
cdef enum:
    C_CLOSED = 1            # the server closed the connection
    C_BAD_MAGIC = 2         # a reply with a bad magic
    C_BAD_COOKIE = 3        # a reply for a request we did not send
    C_REMOTE_ERROR = 4      # the server answered with an NBD error (in *remote)
    C_SHORT_INPUT = 5       # the input ended before SIZE bytes


cdef inline int read_reply(transport_t *tp, uint64_t cookie, uint32_t *remote) noexcept nogil:
    """Receive the simple reply to the request sent with ``cookie``; its error in *remote."""
    cdef char h[SIMPLE_REPLY_SIZE]
    cdef uint64_t got
    cdef int rc = tp_recv_all(tp, h, SIMPLE_REPLY_SIZE)
    if rc:
        return C_CLOSED if rc == 1 else rc
    if decode_simple_reply(h, remote, &got) != SIMPLE_REPLY_MAGIC:
        return C_BAD_MAGIC
    if got != cookie:
        return C_BAD_COOKIE
    return C_REMOTE_ERROR if remote[0] else C_OK


cdef object outcome_error(int rc, uint32_t remote, str peer, str late)

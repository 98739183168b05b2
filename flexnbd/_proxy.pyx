# cython: language_level=3
"""The proxy's relay: one client (downstream) and one NBD server (upstream), in C, no GIL.

``Relay.run()`` passes the client's requests upstream and the replies back until something ends
the turn: the client leaves (DISC, close, a bad request), the upstream connection fails or
stalls, or the proxy stops. Requests are pipelined: up to NSLOTS are in flight, each held in a
slot with its payload until its reply has gone to the client. After a reconnect,
``set_upstream()`` queues every unanswered request again, and they are re-sent in the order
they came. The client never learns that upstream changed.

Upstream requests carry the request's sequence number as their cookie; a reply is matched by
it and goes to the client with the client's own cookie.

Structured replies. Upstream may have agreed structured replies and base:allocation (the id it
gave that context is ``up_meta_id``), and the client may have agreed them in turn (its id is
always BASE_ALLOCATION_ID). Every chunk from upstream is checked before a byte of it is used:
its cookie names a request waiting for a reply, its type suits that request (data and holes
answer a READ, extents a BLOCK_STATUS, errors anything, NONE only with DONE), its length
suits its type and request (data at most the READ's length; a hole 12 bytes; an error and its
message at most SMALL_CHUNK; extents at most MAX_EXTENTS, none empty, none starting past the
request, the context upstream's), data and holes lie inside the request, each after the one
before (so no byte is answered twice, and "all of it" is a count checked at DONE), and all the
chunk bytes but READ data stay within a budget per request (CHUNK_BUDGET plus a quarter of a
READ's length). An upstream that breaks any of these is dropped like one that sends a bad
magic (a Problem says which rule), and the request is re-sent to the next connection. (The
ascending order is stricter than the protocol, which allows any order of non-overlapping
chunks: it makes the overlap check one comparison. flexnbd, qemu-nbd and nbdkit send a READ's
chunks in order; a server that did not would be refused, and say so in the log.)

A reply is held until its DONE chunk, and only then goes to the client, whole. That is the
rule that makes a reconnect safe: nothing of a reply cut by a reconnect has reached the client,
so re-sending the request cannot show it a byte twice (the protocol forbids chunks that
overlap, and a client could not tell old chunks from new). How a reply is held:
- for a structured client's READ and BLOCK_STATUS, the chunks as they came (R_STREAM), in the
  slot's buffer, with the client's cookie and, for BLOCK_STATUS, the client's context id;
  READ data is received straight into its place among them. They go out in one piece.
- otherwise assembled (R_ASSEMBLED): READ data into its place in the slot's buffer, holes as
  zeroes, the first error kept; then answered as from a simple reply.
A simple reply (from an upstream without structured replies, or for a command without data)
becomes a simple reply to the client, except a structured client's READ, which gets one chunk
(OFFSET_DATA, NONE for no data, or ERROR). BLOCK_STATUS from a client that selected
base:allocation, behind an upstream that does not offer it (any more, after a reconnect), is
answered here: one extent of data, no holes, which is always true.

Both sockets are non-blocking and one poll(2) loop serves them: bytes read from a socket are
parsed at once, and whatever became ready to send is sent at once (one sendmsg for a batch of
requests, or of replies, and their data).

Either side may be TLS (a TlsSession that has shaken hands): the same loop then encrypts and
decrypts through the transport (``_nbdio.pxd``), reads each side until OpenSSL says it wants
more bytes, reads decrypted bytes poll cannot see without waiting, and keeps a send that the
socket could not take in the transport's stage until it has left.

Read-ahead (``cache_bytes`` > 0): a READ of at most cache_bytes goes upstream as a READ of twice
its length (clamped to the export's end); the second half is kept, and a later READ inside it is
answered from memory. Any WRITE, TRIM, WRITE_ZEROES or FLUSH, and any reconnect, empties it; a
read-ahead that a write could have overtaken is not kept. The doubled READs are always
assembled (their chunks cover more than the client asked for), so a structured client gets a
read-ahead's answer, or one from memory, as one OFFSET_DATA chunk: holes there are sent as
zeroes (the map, BLOCK_STATUS, still shows them).
"""

from collections import namedtuple

from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t

from flexnbd._nbdio cimport *
from flexnbd._openssl cimport SSL_OP_IGNORE_UNEXPECTED_EOF, SSL_set_options
from flexnbd._sys cimport *
from flexnbd._tls cimport TlsSession
from flexnbd._wire cimport *

cdef enum:
    NSLOTS = 256                          # requests in flight (a power of two)
    DIRECT_MIN = 64 * 1024                # at least this much payload left: recv into the slot
    # Slots keep their buffers for the next request while they hold this much in all (allocating a
    # big buffer per request costs page faults and zeroing on every request).
    KEEP_TOTAL = 64 * 1024 * 1024
    # Data held for requests in flight before we stop reading the client (one request always fits).
    MAX_RETAINED = 256 * 1024 * 1024
    MAX_IOV = 64
    # Structured replies. Chunk payloads other than READ data and BLOCK_STATUS extents are
    # small (a hole, an error and its message of at most 4096 bytes): whole in the buffer.
    SMALL_CHUNK = 8 + 4 + 2 + 4096
    # A BLOCK_STATUS chunk's payload: the context id and at most this many extents (as many as
    # qemu-nbd sends at most, 1 MiB of them).
    MAX_EXTENTS = 128 * 1024
    # What a reply may spend on chunk headers and payloads other than READ data: this, plus
    # a quarter of a READ's length (a chunk per 112 bytes) or one BLOCK_STATUS chunk.
    CHUNK_BUDGET = 64 * 1024
    # Room kept for chunk headers in front of a READ's data for a structured client.
    CHUNK_SLACK = 64
    BURST = 16                            # reads per socket per turn, so neither side starves
    # TLS: what one gathered send takes in (copied, then encrypted in records of 16 KiB).
    STAGE_SIZE = 256 * 1024


cpdef enum End:
    END_DISC = 0              # the client sent DISC; its earlier requests were answered first
    END_CLIENT_GONE = 1       # the client closed its connection or its socket failed
    END_BAD_MAGIC = 2         # a request with a bad magic (bad_value has it)
    END_TOO_BIG = 3           # a READ or WRITE longer than 32 MiB (bad_value: the length)
    END_NO_MEMORY = 4         # no memory for a request's data
    END_UPSTREAM_LOST = 5     # upstream closed, failed, or broke the protocol (problem says)
    END_UPSTREAM_TIMEOUT = 6  # a request went unanswered (or unsent) for too long
    END_STOPPED = 7           # the stop descriptor became readable


cpdef enum Problem:
    UP_OK = 0
    UP_EOF = 1                # upstream closed the connection
    UP_ERRNO = 2              # a socket error (err has the errno)
    UP_BAD_MAGIC = 3          # a reply with a bad magic (bad_value has it)
    UP_BAD_COOKIE = 4         # a reply to a request that is not waiting for one
    # Structured replies (bad_value says more):
    UP_UNEXPECTED_CHUNK = 5   # a chunk type the request cannot have (bad_value: the type)
    UP_BAD_CHUNK_LENGTH = 6   # a chunk longer (or shorter) than its type and request allow
    UP_CHUNK_OUTSIDE = 7      # READ data or hole outside the request, or over an earlier one
    UP_BAD_CONTEXT = 8        # BLOCK_STATUS for another context id (bad_value: that id)
    UP_BAD_EXTENTS = 9        # BLOCK_STATUS extents that are empty or pass the request
    UP_INCOMPLETE = 10        # DONE before all of the request was answered
    UP_TOO_MANY_CHUNKS = 11   # more chunk bytes than the request's bound (bad_value: bytes)
    UP_BAD_SIMPLE = 12        # a simple reply where chunks were due (bad_value: the command)


RelayState = namedtuple("RelayState", "in_flight requests problem err bad_value client_err")


cdef enum:
    MORE = -1                 # (parsing) more bytes are needed first

cdef enum:
    # How upstream answers a request (slot_t.mode), known from its first reply bytes.
    R_NONE = 0                # nothing yet
    R_SIMPLE = 1              # a simple reply
    R_ASSEMBLED = 2           # chunks, assembled: READ data (holes as zeroes) and an error
    R_STREAM = 3              # chunks kept as they came, to go to the client (its cookie)

cdef enum:
    # What the payload being received (relay_t.data_slot) is.
    P_SIMPLE_READ = 0         # a simple reply's READ data
    P_DATA = 1                # an OFFSET_DATA chunk's data
    P_STATUS = 2              # a BLOCK_STATUS chunk's payload (kept in the stream)

cdef enum:
    FREE = 0
    RECEIVING = 1             # the client is still sending the WRITE payload
    QUEUED = 2                # waiting to go upstream
    SENT = 3                  # upstream has it; waiting for the reply
    DONE = 4                  # answered; the reply waits to go to the client


cdef struct slot_t:
    int state
    uint64_t seq
    char cookie[8]            # the client's cookie
    uint16_t type
    uint16_t flags
    uint64_t offset
    uint32_t length           # what the client asked for
    uint32_t up_length        # what upstream is asked for (twice as much for a read-ahead)
    uint32_t error
    char *data                # WRITE payload or READ data
    size_t cap
    size_t held               # bytes counted in relay_t.retained
    int64_t sent_ns
    int readahead
    uint64_t cache_gen
    int writes                # counted in relay_t.writes_in_flight
    char head[REQUEST_SIZE]   # the upstream request
    # upstream's reply so far
    int mode                  # R_*
    uint64_t content_end      # READ: where the last data or hole chunk ended (ascending)
    uint64_t content          # READ: bytes the data and hole chunks covered
    uint32_t statuses         # BLOCK_STATUS: chunks received
    size_t overhead           # chunk bytes other than READ data (bounded by budget())
    size_t stream_len         # R_STREAM: bytes of chunks kept in data
    # the reply to the client: head_len bytes of reply[], then body_len bytes of data
    uint32_t head_len
    size_t body_len
    char reply[CHUNK_HEADER_SIZE + 12]


cdef struct relay_t:
    transport_t down          # the client
    transport_t up            # the server
    int stop_fd
    uint64_t size
    uint16_t up_flags
    # structured replies and base:allocation (its id upstream), upstream and with the client
    int up_structured
    int up_meta
    uint32_t up_meta_id
    int down_structured
    int down_meta
    slot_t *slots
    uint64_t next_seq         # the next request from the client gets this number
    uint64_t oldest           # every request before this one is finished
    size_t busy               # slots not FREE
    # sending upstream: requests go in sequence order from the cursor
    uint64_t cursor
    size_t cursor_sent        # bytes of the cursor's request already sent
    int rescan                # a request was queued again behind the cursor
    int up_blocked            # the last send would have blocked
    int64_t up_progress_ns
    # receiving from the client
    inbuf_t down_in
    int payload_slot          # the slot receiving a WRITE payload, or -1
    int big_writes            # the last request was a big WRITE
    size_t payload_got
    # receiving from upstream
    inbuf_t up_in
    int data_slot             # the slot receiving a payload (READ data, extents), or -1
    int data_kind             # P_*
    uint16_t chunk_flags      # (P_DATA, P_STATUS: the chunk's flags)
    size_t data_at            # where in the slot's data it goes
    size_t data_want          # its length
    int big_reads             # the last reply brought big READ data
    size_t data_got
    # replies for the client, in the order they were answered
    int *done_q
    size_t done_head
    size_t done_count
    size_t done_sent          # bytes of the first one already sent
    int down_blocked
    # how the session ends
    int closing
    int end
    int client_dead
    int client_err            # why the client's connection failed (errno; 0: it closed)
    uint64_t bad_value
    int problem
    int err
    uint64_t retained
    size_t buffers            # bytes of all slot buffers
    int64_t timeout_ns
    # A client that reads no reply for send_timeout_ns is dropped (as the server drops one).
    int64_t send_timeout_ns
    int64_t down_progress_ns  # the last send to the client, or when its replies began to wait
    # read-ahead
    char *cache
    uint32_t cache_cap
    uint64_t cache_off
    uint32_t cache_len
    uint64_t cache_gen
    int writes_in_flight
    # figures
    uint64_t requests
    uint64_t replayed
    uint64_t cache_hits


cdef inline slot_t *slot_of(relay_t *r, uint64_t seq) noexcept nogil:
    return &r.slots[seq & (NSLOTS - 1)]


cdef inline int state_of(relay_t *r, uint64_t seq) noexcept nogil:
    """The state of request seq; FREE once it is finished (its slot may hold a newer one)."""
    cdef slot_t *s = slot_of(r, seq)
    return s.state if s.seq == seq else FREE


cdef inline size_t upstream_bytes(slot_t *s) noexcept nogil:
    return REQUEST_SIZE + (s.length if s.type == CMD_WRITE else 0)


cdef inline size_t reply_bytes(slot_t *s) noexcept nogil:
    return s.head_len + s.body_len


# --------------------------------------------------------------------------------------------
# Slots

cdef int ensure_buffer(relay_t *r, slot_t *s, size_t n) noexcept nogil:
    if n <= s.cap:
        return 0
    free(s.data)
    r.buffers -= s.cap
    s.data = <char *>malloc(n)
    s.cap = n if s.data != NULL else 0
    r.buffers += s.cap
    return 0 if s.data != NULL else -1


cdef int grow_buffer(relay_t *r, slot_t *s, size_t n) noexcept nogil:
    """Room for n bytes in the slot's data, keeping what it holds (chunks kept for the client;
    on failure too, so the request can be re-sent); counted as held. 0, or -1 without memory."""
    cdef char *p
    cdef size_t cap
    if n <= s.cap:
        return 0
    cap = n if n > 2 * s.cap else 2 * s.cap
    p = <char *>realloc(s.data, cap)
    if p == NULL:
        return -1
    s.data = p
    r.buffers += cap - s.cap
    r.retained += cap - s.cap
    s.held += cap - s.cap
    s.cap = cap
    return 0


cdef void release(relay_t *r, slot_t *s) noexcept nogil:
    """The request is over: free its slot (and a big buffer)."""
    if s.writes:
        s.writes = 0
        r.writes_in_flight -= 1
    r.retained -= s.held
    s.held = 0
    if r.buffers > KEEP_TOTAL:
        free(s.data)
        r.buffers -= s.cap
        s.data = NULL
        s.cap = 0
    s.state = FREE
    r.busy -= 1
    while r.oldest < r.next_seq and state_of(r, r.oldest) == FREE:
        r.oldest += 1


cdef void make_head(relay_t *r, slot_t *s) noexcept nogil:
    """The reply to the client, from s.error and (READ) the data assembled in s.data: chunks
    kept as upstream sent them; else for a structured client's READ one chunk (ERROR, NONE
    for no data, or OFFSET_DATA with all of it); else a simple reply."""
    if s.mode == R_STREAM:
        s.head_len = 0
        s.body_len = s.stream_len
    elif r.down_structured and s.type == CMD_READ and s.error:
        make_chunk_header(s.reply, s.cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)
        put_be32(s.reply + CHUNK_HEADER_SIZE, s.error)
        memset(s.reply + CHUNK_HEADER_SIZE + 4, 0, 2)       # (no message)
        s.head_len = CHUNK_HEADER_SIZE + 6
        s.body_len = 0
    elif r.down_structured and s.type == CMD_READ and s.length == 0:
        make_chunk_header(s.reply, s.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)
        s.head_len = CHUNK_HEADER_SIZE
        s.body_len = 0
    elif r.down_structured and s.type == CMD_READ:
        make_chunk_header(s.reply, s.cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                          s.length + 8)
        put_be64(s.reply + CHUNK_HEADER_SIZE, s.offset)
        s.head_len = CHUNK_HEADER_SIZE + 8
        s.body_len = s.length
    else:
        make_simple_reply(s.reply, s.error, s.cookie)
        s.head_len = SIMPLE_REPLY_SIZE
        s.body_len = s.length if s.type == CMD_READ and s.error == 0 else 0


cdef void all_data(relay_t *r, slot_t *s) noexcept nogil:
    """Answer a BLOCK_STATUS here, for an upstream that does not offer base:allocation (any
    more): one extent, all of it data. It is always true (a hole reads as zeroes too, so
    calling it data only costs the client a copy of zeroes); an error as upstream would."""
    s.mode = R_NONE           # (a reply begun by the upstream before is forgotten)
    s.stream_len = 0
    if s.length == 0 or not in_range(s.offset, s.length, r.size):
        answer(r, s, NBD_EINVAL)
        return
    make_chunk_header(s.reply, s.cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12)
    put_be32(s.reply + CHUNK_HEADER_SIZE, BASE_ALLOCATION_ID)
    put_be32(s.reply + CHUNK_HEADER_SIZE + 4, s.length)
    put_be32(s.reply + CHUNK_HEADER_SIZE + 8, 0)
    s.head_len = CHUNK_HEADER_SIZE + 12
    s.body_len = 0
    s.error = 0
    queue_reply(r, s)


cdef void answer(relay_t *r, slot_t *s, uint32_t error) noexcept nogil:
    """Queue the reply to the client."""
    s.error = error
    make_head(r, s)
    queue_reply(r, s)


cdef void queue_reply(relay_t *r, slot_t *s) noexcept nogil:
    """Queue the reply made in s (head and body) to go to the client."""
    if r.client_dead:
        release(r, s)
        return
    s.state = DONE
    if r.done_count == 0 and not tp_unsent(&r.down):
        r.down_progress_ns = now_ns()   # nothing was waiting to go: the clock starts now
    r.done_q[(r.done_head + r.done_count) & (NSLOTS - 1)] = <int>(s - r.slots)
    r.done_count += 1


cdef void queue_upstream(relay_t *r, slot_t *s) noexcept nogil:
    """Queue the request to be sent upstream (again: upstream's reply so far is forgotten)."""
    cdef uint16_t flags = s.flags
    if s.type == CMD_READ and not r.up_structured:
        flags &= ~CMD_FLAG_DF     # (one piece is what a simple reply is)
    make_request(s.head, s.type, flags, s.seq, s.offset, s.up_length)
    s.mode = R_NONE
    s.content = 0
    s.content_end = s.offset
    s.statuses = 0
    s.overhead = 0
    s.stream_len = 0
    s.error = 0
    s.state = QUEUED
    if s.seq < r.cursor:
        r.rescan = 1


cdef inline void invalidate_cache(relay_t *r) noexcept nogil:
    r.cache_len = 0
    r.cache_gen += 1


cdef void start_closing(relay_t *r, int end, uint64_t value) noexcept nogil:
    if not r.closing:
        r.closing = 1
        r.end = end
        r.bad_value = value


cdef void client_gone(relay_t *r) noexcept nogil:
    """The client cannot be answered any more: drop what only it was waiting for. Requests
    upstream already has (or is being sent) are still seen through, so the upstream stream
    stays in step; their replies are dropped."""
    cdef uint64_t seq
    cdef slot_t *s
    cdef int state
    if r.client_dead:
        return
    start_closing(r, END_CLIENT_GONE, 0)
    r.client_dead = 1
    while r.done_count:
        s = &r.slots[r.done_q[r.done_head]]
        r.done_head = (r.done_head + 1) & (NSLOTS - 1)
        r.done_count -= 1
        release(r, s)
    r.done_sent = 0
    r.payload_slot = -1
    seq = r.oldest
    while seq < r.next_seq:
        state = state_of(r, seq)
        s = slot_of(r, seq)
        if state == RECEIVING or (state == QUEUED and not (seq == r.cursor and r.cursor_sent)):
            release(r, s)
        seq += 1


# --------------------------------------------------------------------------------------------
# From the client

cdef inline int can_admit(relay_t *r) noexcept nogil:
    return (not r.closing and r.payload_slot < 0 and slot_of(r, r.next_seq).state == FREE
            and r.retained < MAX_RETAINED)


cdef inline int forwarded(relay_t *r, uint16_t cmd) noexcept nogil:
    """Whether upstream takes this command (it advertised it); the others are answered EINVAL
    here, so that a request upstream cannot handle is never sent (and never replayed)."""
    cdef uint16_t f = r.up_flags
    if cmd == CMD_READ or cmd == CMD_WRITE:
        return 1
    if not f & FLAG_HAS_FLAGS:
        return 0
    if cmd == CMD_FLUSH:
        return f & FLAG_SEND_FLUSH
    if cmd == CMD_TRIM:
        return f & FLAG_SEND_TRIM
    if cmd == CMD_WRITE_ZEROES:
        return f & FLAG_SEND_WRITE_ZEROES
    if cmd == CMD_CACHE:
        return f & FLAG_SEND_CACHE
    if cmd == CMD_BLOCK_STATUS:
        return r.down_meta and r.up_meta
    return 0


cdef int cache_hit(relay_t *r, const request_t *q) noexcept nogil:
    return (r.cache_len > 0 and q.offset >= r.cache_off
            and q.length <= r.cache_len and q.offset - r.cache_off <= r.cache_len - q.length)


cdef void admit(relay_t *r, const char *p) noexcept nogil:
    """Take one request header from the client."""
    cdef request_t q
    cdef slot_t *s
    cdef uint32_t want
    cdef frame_t frame = frame_request(p, &q)
    if frame == FRAME_BAD_MAGIC:
        start_closing(r, END_BAD_MAGIC, q.magic)
        return
    if frame == FRAME_DISC:
        start_closing(r, END_DISC, 0)
        return
    if frame == FRAME_TOO_BIG:
        start_closing(r, END_TOO_BIG, q.length)
        return
    r.big_writes = q.type == CMD_WRITE and q.length >= DIRECT_MIN
    s = slot_of(r, r.next_seq)
    want = 0
    s.readahead = 0
    if forwarded(r, q.type):
        if q.type == CMD_WRITE:
            want = q.length
        elif q.type == CMD_READ:
            want = q.length
            if q.length and q.length <= r.cache_cap and not cache_hit(r, &q) \
                    and r.writes_in_flight == 0 and in_range(q.offset, q.length, r.size):
                want = <uint32_t>min(<uint64_t>q.length * 2, r.size - q.offset)
                s.readahead = want > q.length
        # (a structured client's READ data may come with chunk headers in front)
        if ensure_buffer(r, s, want + (CHUNK_SLACK if q.type == CMD_READ and
                                       r.down_structured else 0)) < 0:
            start_closing(r, END_NO_MEMORY, want)
            return
    s.seq = r.next_seq
    r.next_seq += 1
    r.busy += 1
    r.requests += 1
    memcpy(s.cookie, q.cookie, 8)
    s.type = q.type
    s.flags = q.flags
    s.offset = q.offset
    s.length = q.length
    s.up_length = want if q.type == CMD_READ else q.length
    s.error = 0
    s.mode = R_NONE
    s.stream_len = 0
    s.writes = 0
    s.held = want
    r.retained += want
    if q.type == CMD_BLOCK_STATUS and r.down_meta and not r.up_meta:
        all_data(r, s)
        return
    if not forwarded(r, q.type):
        answer(r, s, NBD_EINVAL)
        return
    if q.type == CMD_READ:
        if q.length and q.length <= r.cache_cap and cache_hit(r, &q):
            memcpy(s.data, r.cache + (q.offset - r.cache_off), q.length)
            r.cache_hits += 1
            answer(r, s, 0)
            return
        s.cache_gen = r.cache_gen
    elif q.type != CMD_CACHE:
        invalidate_cache(r)   # WRITE, TRIM, WRITE_ZEROES, FLUSH
        if q.type != CMD_FLUSH:
            s.writes = 1
            r.writes_in_flight += 1
    if q.type == CMD_WRITE and q.length:
        s.state = RECEIVING
        r.payload_slot = <int>(s - r.slots)
        r.payload_got = 0
        return
    queue_upstream(r, s)


cdef void parse_requests(relay_t *r) noexcept nogil:
    """Take whole requests, and the WRITE payload bytes already read, from the input buffer."""
    cdef slot_t *s
    while True:
        if r.payload_slot >= 0:
            s = &r.slots[r.payload_slot]
            r.payload_got += ib_take(&r.down_in, s.data + r.payload_got,
                                     s.length - r.payload_got)
            if r.payload_got < s.length:
                return
            r.payload_slot = -1
            queue_upstream(r, s)
            continue
        if not can_admit(r) or ib_unread(&r.down_in) < REQUEST_SIZE:
            return
        admit(r, r.down_in.data + r.down_in.pos)
        r.down_in.pos += REQUEST_SIZE


cdef inline int wants_client_input(relay_t *r) noexcept nogil:
    if r.closing or r.client_dead:
        return 0
    if r.payload_slot >= 0:
        return 1
    return can_admit(r) and ib_unread(&r.down_in) < REQUEST_SIZE


cdef ssize_t recv_some(transport_t *t, inbuf_t *b, char *direct, size_t direct_want,
                       size_t *direct_got, size_t header, size_t *asked) noexcept nogil:
    """One non-blocking receive: straight to ``direct`` (NULL: nothing is being received
    there; else the rest of a payload or READ data, ``direct_want`` bytes, counted in
    *direct_got) when the buffer holds nothing and at least DIRECT_MIN bytes are wanted there,
    else into the buffer: as much as fits, or, when ``header`` is given because big data is
    likely to follow, just the rest of one header (the data then goes straight to its slot
    instead of through the buffer). *asked says how much was asked for."""
    cdef ssize_t k
    if direct != NULL and ib_unread(b) == 0 and direct_want >= DIRECT_MIN:
        asked[0] = direct_want
        k = tp_recv(t, direct, direct_want, MSG_DONTWAIT)
        if k > 0:
            direct_got[0] += k
        return k
    ib_compact(b)
    asked[0] = b.cap - b.len
    if direct == NULL and header > b.len:
        asked[0] = header - b.len
    return ib_recv(t, b, asked[0], MSG_DONTWAIT)


cdef void read_client(relay_t *r) noexcept nogil:
    cdef ssize_t k
    cdef slot_t *s
    cdef size_t asked
    cdef int _
    for _ in range(BURST):
        parse_requests(r)
        if not wants_client_input(r):
            return
        s = &r.slots[r.payload_slot] if r.payload_slot >= 0 else NULL
        k = recv_some(&r.down, &r.down_in, s.data + r.payload_got if s != NULL else NULL,
                      s.length - r.payload_got if s != NULL else 0, &r.payload_got,
                      REQUEST_SIZE if r.big_writes else 0, &asked)
        if k > 0:
            if <size_t>k < asked and r.down.ssl == NULL:
                break           # the socket is drained: no need for a recv that says so
            continue            # (TLS reads end at each record: read on until EAGAIN)
        if k < 0 and errno == EINTR:
            continue
        if k < 0 and errno == EAGAIN:
            return
        r.client_err = errno if k < 0 else 0
        client_gone(r)        # end of file, or a socket error (EPROTO: a bad TLS record)
        return
    parse_requests(r)


# --------------------------------------------------------------------------------------------
# To upstream

cdef int upstream_send_failed(relay_t *r) noexcept nogil:
    """A send upstream failed (errno): C_OK if it would only have blocked."""
    if errno == EAGAIN:
        r.up_blocked = 1
        return C_OK
    r.err = errno
    r.problem = UP_ERRNO
    return END_UPSTREAM_LOST


cdef inline ssize_t send_iov(transport_t *t, iovec *iov, int n) noexcept nogil:
    """One non-blocking gathered send (again after EINTR): bytes sent, or -1 with errno."""
    cdef msghdr msg
    cdef ssize_t k
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = n
    while True:
        k = tp_sendmsg(t, &msg, MSG_DONTWAIT)
        if k >= 0 or errno != EINTR:
            return k


cdef inline int gather(iovec *iov, char *head, size_t head_len, char *data, size_t data_len,
                       size_t skip) noexcept nogil:
    """Point ``iov`` at what is left of a header and its data once ``skip`` bytes of them are
    out; returns how many entries it took (1 or 2)."""
    if skip >= head_len:
        iov[0].iov_base = data + (skip - head_len)
        iov[0].iov_len = data_len - (skip - head_len)
        return 1
    iov[0].iov_base = head + skip
    iov[0].iov_len = head_len - skip
    if data_len == 0:
        return 1
    iov[1].iov_base = data
    iov[1].iov_len = data_len
    return 2


cdef int send_upstream(relay_t *r) noexcept nogil:
    """Send queued requests in sequence order, many per sendmsg.

    (Sending big payloads without a copy, vmsplice into a pipe and splice into the socket, was
    measured: it cost more CPU, in the proxy and in a flexnbd upstream, than the copy saves.)"""
    cdef iovec iov[MAX_IOV]
    cdef uint64_t seqs[MAX_IOV]
    cdef slot_t *s
    cdef uint64_t seq
    cdef size_t skip, left, need
    cdef ssize_t k
    cdef int n, m, i, state
    cdef int64_t t
    if tp_unsent(&r.up):
        if tp_send_unsent(&r.up) < 0:
            return upstream_send_failed(r)
        r.up_progress_ns = now_ns()
    while True:
        if r.rescan and r.cursor_sent == 0:
            r.cursor = r.oldest
            r.rescan = 0
        n = m = 0
        skip = r.cursor_sent
        seq = r.cursor
        while seq < r.next_seq and n + 2 <= MAX_IOV:
            state = state_of(r, seq)
            if state == RECEIVING:
                break
            if state == QUEUED:
                s = slot_of(r, seq)
                n += gather(&iov[n], s.head, REQUEST_SIZE, s.data,
                            s.length if s.type == CMD_WRITE else 0, skip)
                skip = 0
                seqs[m] = seq
                m += 1
            elif m == 0:
                r.cursor = seq + 1      # already sent or answered: move on
            seq += 1
        if m == 0:
            r.up_blocked = tp_unsent(&r.up)     # (TLS: the stage still has some to send)
            return C_OK
        k = send_iov(&r.up, iov, n)
        if k < 0:
            return upstream_send_failed(r)
        t = now_ns()
        r.up_progress_ns = t
        left = <size_t>k
        for i in range(m):
            s = slot_of(r, seqs[i])
            need = upstream_bytes(s) - r.cursor_sent
            r.cursor = seqs[i]
            if left < need:
                r.cursor_sent += left
                break
            left -= need
            r.cursor_sent = 0
            r.cursor = seqs[i] + 1
            s.state = SENT
            s.sent_ns = t


# --------------------------------------------------------------------------------------------
# From upstream

cdef void replied(relay_t *r, slot_t *s, uint32_t error) noexcept nogil:
    """Upstream answered request s (and sent its READ data)."""
    if r.client_dead:
        release(r, s)
        return
    if s.writes:
        s.writes = 0
        r.writes_in_flight -= 1
    if s.readahead:
        s.readahead = 0
        if error:
            # The doubled read failed: ask again for just what the client asked for, so that
            # the client gets the answer it would have had without read-ahead.
            s.up_length = s.length
            queue_upstream(r, s)
            r.rescan = 1
            return
        if s.cache_gen == r.cache_gen and r.writes_in_flight == 0:
            r.cache_len = s.up_length - s.length
            r.cache_off = s.offset + s.length
            memcpy(r.cache, s.data + s.length, r.cache_len)
    answer(r, s, error)


cdef inline int lied(relay_t *r, int problem, uint64_t value) noexcept nogil:
    """Upstream broke the protocol: the connection is dropped (and the request re-sent)."""
    r.problem = problem
    r.bad_value = value
    return END_UPSTREAM_LOST


cdef inline size_t budget(slot_t *s) noexcept nogil:
    """The chunk bytes other than READ data that a reply may take (see CHUNK_BUDGET)."""
    if s.type == CMD_READ:
        return CHUNK_BUDGET + s.up_length // 4
    if s.type == CMD_BLOCK_STATUS:
        return CHUNK_BUDGET + CHUNK_HEADER_SIZE + 4 + 8 * MAX_EXTENTS
    return CHUNK_BUDGET


cdef int take_simple(relay_t *r) noexcept nogil:
    """A simple reply at the front of the upstream buffer."""
    cdef uint32_t error
    cdef uint64_t cookie
    cdef slot_t *s
    if ib_unread(&r.up_in) < SIMPLE_REPLY_SIZE:
        return MORE
    decode_simple_reply(r.up_in.data + r.up_in.pos, &error, &cookie)
    if state_of(r, cookie) != SENT:
        return lied(r, UP_BAD_COOKIE, cookie)
    s = slot_of(r, cookie)
    # (chunks began this reply; or a BLOCK_STATUS without its chunk: only errors are simple)
    if s.mode != R_NONE or (s.type == CMD_BLOCK_STATUS and error == 0):
        return lied(r, UP_BAD_SIMPLE, s.type)
    r.up_in.pos += SIMPLE_REPLY_SIZE
    s.mode = R_SIMPLE
    r.big_reads = s.type == CMD_READ and error == 0 and s.up_length >= DIRECT_MIN
    if s.type == CMD_READ and error == 0 and s.up_length:
        receive_payload(r, s, P_SIMPLE_READ, 0, 0, s.up_length)
        return C_OK
    replied(r, s, error)
    return C_OK


cdef inline void receive_payload(relay_t *r, slot_t *s, int kind, uint16_t flags, size_t at,
                                 size_t length) noexcept nogil:
    """The next ``length`` bytes from upstream go to s.data + at."""
    r.data_slot = <int>(s - r.slots)
    r.data_kind = kind
    r.chunk_flags = flags
    r.data_at = at
    r.data_want = length
    r.data_got = 0


cdef int check_chunk(relay_t *r, slot_t *s, uint16_t flags, uint16_t type,
                     uint32_t length) noexcept nogil:
    """Whether a chunk of this type and payload length can answer request s (before a byte of
    its payload is used); C_OK, or the lie."""
    if type == REPLY_TYPE_OFFSET_DATA or type == REPLY_TYPE_OFFSET_HOLE:
        if s.type != CMD_READ:
            return lied(r, UP_UNEXPECTED_CHUNK, type)
        if (type == REPLY_TYPE_OFFSET_HOLE and length != 12) or \
                (type == REPLY_TYPE_OFFSET_DATA and (length <= 8 or length - 8 > s.up_length)):
            return lied(r, UP_BAD_CHUNK_LENGTH, length)
    elif type == REPLY_TYPE_BLOCK_STATUS:
        if s.type != CMD_BLOCK_STATUS:
            return lied(r, UP_UNEXPECTED_CHUNK, type)
        if length < 12 or (length - 4) % 8 or (length - 4) // 8 > MAX_EXTENTS:
            return lied(r, UP_BAD_CHUNK_LENGTH, length)
    elif type == REPLY_TYPE_ERROR or type == REPLY_TYPE_ERROR_OFFSET:
        if length < (6 if type == REPLY_TYPE_ERROR else 14) or length > SMALL_CHUNK:
            return lied(r, UP_BAD_CHUNK_LENGTH, length)
    elif type == REPLY_TYPE_NONE:
        if length != 0 or not flags & REPLY_FLAG_DONE:
            return lied(r, UP_BAD_CHUNK_LENGTH, length)
    else:
        return lied(r, UP_UNEXPECTED_CHUNK, type)
    s.overhead += CHUNK_HEADER_SIZE + (8 if type == REPLY_TYPE_OFFSET_DATA else length)
    if s.overhead > budget(s):
        return lied(r, UP_TOO_MANY_CHUNKS, s.overhead)
    return C_OK


cdef int take_content(relay_t *r, slot_t *s, uint64_t offset, uint64_t length) noexcept nogil:
    """READ data or a hole for [offset, offset+length): inside the request, after the chunks
    before it (so no byte is answered twice, and covering all of it is a count)."""
    if length == 0 or offset < s.content_end or \
            not in_range(offset - s.offset, length, s.up_length):
        return lied(r, UP_CHUNK_OUTSIDE, offset)
    s.content_end = offset + length
    s.content += length
    return C_OK


cdef int keep_chunk(relay_t *r, slot_t *s, const char *p, size_t head,
                    size_t n) noexcept nogil:
    """R_STREAM: make room for a chunk of n bytes after those kept for the client, and copy
    its first ``head`` bytes (at p) there, with the client's cookie; its payload is copied or
    received there by the caller. C_OK, or ENOMEM."""
    if grow_buffer(r, s, s.stream_len + n) < 0:
        r.err = ENOMEM
        r.problem = UP_ERRNO
        return END_UPSTREAM_LOST
    memcpy(s.data + s.stream_len, p, head)
    memcpy(s.data + s.stream_len + 8, s.cookie, 8)
    return C_OK


cdef int small_chunk(relay_t *r, slot_t *s, const char *p, uint16_t type,
                     uint32_t length) noexcept nogil:
    """A hole, an error or NONE whose payload (at p) is all in the buffer."""
    cdef uint64_t offset
    cdef uint32_t error
    cdef uint16_t message
    cdef int rc
    if type == REPLY_TYPE_OFFSET_HOLE:
        offset = get_be64(p)
        rc = take_content(r, s, offset, get_be32(p + 8))
        if rc != C_OK:
            return rc
        if s.mode == R_ASSEMBLED:
            memset(s.data + (offset - s.offset), 0, get_be32(p + 8))
    elif type == REPLY_TYPE_ERROR or type == REPLY_TYPE_ERROR_OFFSET:
        error = get_be32(p)
        message = get_be16(p + 4)
        if error == 0 or 6 + <uint32_t>message + (8 if type == REPLY_TYPE_ERROR_OFFSET
                                                  else 0) != length:
            return lied(r, UP_BAD_CHUNK_LENGTH, length)
        if type == REPLY_TYPE_ERROR_OFFSET and s.type == CMD_READ:
            offset = get_be64(p + 6 + message)
            if offset < s.offset or offset - s.offset >= s.up_length:
                return lied(r, UP_CHUNK_OUTSIDE, offset)
        if s.error == 0:
            s.error = error
    return C_OK


cdef int take_statuses(relay_t *r, slot_t *s, char *p, uint32_t length) noexcept nogil:
    """A BLOCK_STATUS chunk's payload (kept in the stream): for base:allocation, as upstream
    named it, then renamed for the client; at least one extent, none empty, none starting
    past the request (the last may end past it), exactly one with REQ_ONE."""
    cdef uint32_t n = (length - 4) // 8
    cdef uint32_t i
    cdef uint64_t at = 0
    cdef uint32_t extent
    if get_be32(p) != r.up_meta_id:
        return lied(r, UP_BAD_CONTEXT, get_be32(p))
    s.statuses += 1
    if s.statuses > 1:
        return lied(r, UP_UNEXPECTED_CHUNK, REPLY_TYPE_BLOCK_STATUS)
    if s.flags & CMD_FLAG_REQ_ONE and n != 1:
        return lied(r, UP_BAD_EXTENTS, n)
    for i in range(n):
        extent = get_be32(p + 4 + 8 * i)
        if extent == 0 or at >= s.length:
            return lied(r, UP_BAD_EXTENTS, i)
        at += extent
    put_be32(p, BASE_ALLOCATION_ID)
    return C_OK


cdef int take_chunk(relay_t *r) noexcept nogil:
    """A structured reply chunk at the front of the upstream buffer: checked, then assembled
    into its slot's data, or kept there as it is for the client (R_STREAM)."""
    cdef const char *p = r.up_in.data + r.up_in.pos
    cdef uint16_t flags, type
    cdef uint64_t cookie, offset
    cdef uint32_t length
    cdef slot_t *s
    cdef int rc
    if ib_unread(&r.up_in) < CHUNK_HEADER_SIZE:
        return MORE
    decode_chunk_header(p, &flags, &type, &cookie, &length)
    if state_of(r, cookie) != SENT:
        return lied(r, UP_BAD_COOKIE, cookie)
    s = slot_of(r, cookie)
    if not r.up_structured:
        return lied(r, UP_UNEXPECTED_CHUNK, type)
    if s.mode == R_NONE:
        # (only a structured client's READ or BLOCK_STATUS can take chunks as they are; the
        # read-ahead's doubled READs are always assembled)
        s.mode = R_STREAM if r.down_structured and not s.readahead and \
            (s.type == CMD_READ or s.type == CMD_BLOCK_STATUS) else R_ASSEMBLED
    if s.mode == R_SIMPLE:
        return lied(r, UP_UNEXPECTED_CHUNK, type)
    # (once per chunk: its bytes are counted against the budget here)
    if ib_unread(&r.up_in) < CHUNK_HEADER_SIZE + (8 if type == REPLY_TYPE_OFFSET_DATA else 0):
        return MORE
    if type != REPLY_TYPE_OFFSET_DATA and type != REPLY_TYPE_BLOCK_STATUS and \
            length <= SMALL_CHUNK and ib_unread(&r.up_in) < CHUNK_HEADER_SIZE + length:
        return MORE
    rc = check_chunk(r, s, flags, type, length)
    if rc != C_OK:
        return rc
    if type == REPLY_TYPE_OFFSET_DATA:
        offset = get_be64(p + CHUNK_HEADER_SIZE)
        rc = take_content(r, s, offset, length - 8)
        if rc == C_OK and s.mode == R_STREAM:
            rc = keep_chunk(r, s, p, CHUNK_HEADER_SIZE + 8, CHUNK_HEADER_SIZE + length)
        if rc != C_OK:
            return rc
        r.up_in.pos += CHUNK_HEADER_SIZE + 8
        r.big_reads = length - 8 >= DIRECT_MIN
        receive_payload(r, s, P_DATA, flags,
                        s.stream_len + CHUNK_HEADER_SIZE + 8 if s.mode == R_STREAM
                        else offset - s.offset, length - 8)
        return C_OK
    if type == REPLY_TYPE_BLOCK_STATUS:
        # (always R_STREAM: only a client that selected base:allocation sends it)
        rc = keep_chunk(r, s, p, CHUNK_HEADER_SIZE, CHUNK_HEADER_SIZE + length)
        if rc != C_OK:
            return rc
        r.up_in.pos += CHUNK_HEADER_SIZE
        receive_payload(r, s, P_STATUS, flags, s.stream_len + CHUNK_HEADER_SIZE, length)
        return C_OK
    rc = small_chunk(r, s, p + CHUNK_HEADER_SIZE, type, length)
    if rc == C_OK and s.mode == R_STREAM:
        rc = keep_chunk(r, s, p, CHUNK_HEADER_SIZE, CHUNK_HEADER_SIZE + length)
        if rc == C_OK:
            memcpy(s.data + s.stream_len + CHUNK_HEADER_SIZE, p + CHUNK_HEADER_SIZE, length)
            s.stream_len += CHUNK_HEADER_SIZE + length
    if rc != C_OK:
        return rc
    r.up_in.pos += CHUNK_HEADER_SIZE + length
    return chunk_done(r, s, flags)


cdef int chunk_done(relay_t *r, slot_t *s, uint16_t flags) noexcept nogil:
    """A chunk is in: with DONE, the reply is whole (and must answer all that was asked)."""
    if not flags & REPLY_FLAG_DONE:
        return C_OK
    if s.error == 0 and ((s.type == CMD_READ and s.content != s.up_length)
                         or (s.type == CMD_BLOCK_STATUS and s.statuses != 1)):
        return lied(r, UP_INCOMPLETE, s.content)
    replied(r, s, s.error)
    return C_OK


cdef int payload_done(relay_t *r, slot_t *s) noexcept nogil:
    """The payload being received is in."""
    cdef int rc
    if r.data_kind == P_SIMPLE_READ:
        replied(r, s, 0)
        return C_OK
    if s.mode == R_STREAM:
        if r.data_kind == P_STATUS:
            rc = take_statuses(r, s, s.data + r.data_at, <uint32_t>r.data_want)
            if rc != C_OK:
                return rc
        s.stream_len = r.data_at + r.data_want
    return chunk_done(r, s, r.chunk_flags)


cdef int parse_replies(relay_t *r) noexcept nogil:
    """Take whole replies and chunks, and the payload bytes already read, from the upstream
    buffer."""
    cdef slot_t *s
    cdef uint32_t magic
    cdef int rc
    while True:
        if r.data_slot >= 0:
            s = &r.slots[r.data_slot]
            r.data_got += ib_take(&r.up_in, s.data + r.data_at + r.data_got,
                                  r.data_want - r.data_got)
            if r.data_got < r.data_want:
                return C_OK
            r.data_slot = -1
            rc = payload_done(r, s)
            if rc != C_OK:
                return rc
            continue
        if ib_unread(&r.up_in) < 4:
            return C_OK
        magic = get_be32(r.up_in.data + r.up_in.pos)
        if magic == SIMPLE_REPLY_MAGIC:
            rc = take_simple(r)
        elif magic == STRUCTURED_REPLY_MAGIC:
            rc = take_chunk(r)
        else:
            return lied(r, UP_BAD_MAGIC, magic)
        if rc == MORE:
            return C_OK
        if rc != C_OK:
            return rc


cdef int read_upstream(relay_t *r) noexcept nogil:
    cdef ssize_t k
    cdef slot_t *s
    cdef size_t asked
    cdef int _, rc
    for _ in range(BURST):
        rc = parse_replies(r)
        if rc != C_OK:
            return rc
        s = &r.slots[r.data_slot] if r.data_slot >= 0 else NULL
        k = recv_some(&r.up, &r.up_in, s.data + r.data_at + r.data_got if s != NULL else NULL,
                      r.data_want - r.data_got if s != NULL else 0, &r.data_got,
                      (CHUNK_HEADER_SIZE + 8 if r.up_structured else SIMPLE_REPLY_SIZE)
                      if r.big_reads else 0, &asked)
        if k > 0:
            r.up_progress_ns = now_ns()
            if <size_t>k < asked and r.up.ssl == NULL:
                break           # drained (TLS reads end at each record: read on)
            continue
        if k == 0:
            r.problem = UP_EOF
            return END_UPSTREAM_LOST
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return C_OK
        r.err = errno
        r.problem = UP_ERRNO
        return END_UPSTREAM_LOST
    return parse_replies(r)


# --------------------------------------------------------------------------------------------
# To the client

cdef void client_send_failed(relay_t *r) noexcept nogil:
    """A send to the client failed (errno): wait if it would only have blocked."""
    if errno == EAGAIN:
        r.down_blocked = 1
    else:
        r.client_err = errno
        client_gone(r)


cdef void send_client(relay_t *r) noexcept nogil:
    """Send the queued replies (with their READ data), many per sendmsg."""
    cdef iovec iov[MAX_IOV]
    cdef slot_t *s
    cdef size_t i, skip, left, need
    cdef ssize_t k
    cdef int n
    if r.client_dead:
        return
    if tp_unsent(&r.down) and tp_send_unsent(&r.down) < 0:
        client_send_failed(r)
        return
    while r.done_count and not r.client_dead:
        n = 0
        skip = r.done_sent
        i = 0
        while i < r.done_count and n + 2 <= MAX_IOV:
            s = &r.slots[r.done_q[(r.done_head + i) & (NSLOTS - 1)]]
            n += gather(&iov[n], s.reply, s.head_len, s.data, s.body_len, skip)
            skip = 0
            i += 1
        k = send_iov(&r.down, iov, n)
        if k < 0:
            client_send_failed(r)
            return
        left = <size_t>k
        if k > 0:
            r.down_progress_ns = now_ns()
        while r.done_count:
            s = &r.slots[r.done_q[r.done_head]]
            need = reply_bytes(s) - r.done_sent
            if left < need:
                r.done_sent += left
                break
            left -= need
            r.done_sent = 0
            r.done_head = (r.done_head + 1) & (NSLOTS - 1)
            r.done_count -= 1
            release(r, s)
    r.down_blocked = tp_unsent(&r.down)     # (TLS: the stage still has some to send)


# --------------------------------------------------------------------------------------------
# The loop

cdef int64_t upstream_deadline(relay_t *r) noexcept nogil:
    """When upstream will have taken too long: the oldest unanswered request's send time (or
    the last progress of a blocked send) plus the timeout; -1 if nothing is waiting."""
    cdef int64_t first = -1
    cdef uint64_t seq = r.oldest
    cdef slot_t *s
    while seq < r.next_seq:
        if state_of(r, seq) == SENT:
            s = slot_of(r, seq)
            if first < 0 or s.sent_ns < first:
                first = s.sent_ns
        seq += 1
    if r.up_blocked and (first < 0 or r.up_progress_ns < first):
        first = r.up_progress_ns
    return first + r.timeout_ns if first >= 0 else -1


cdef int64_t client_deadline(relay_t *r) noexcept nogil:
    """When the client will have read nothing for too long; -1 if no reply waits for it."""
    if r.client_dead or not r.down_blocked or not (r.done_count or tp_unsent(&r.down)):
        return -1
    return r.down_progress_ns + r.send_timeout_ns


cdef int relay_loop(relay_t *r) noexcept nogil:
    cdef pollfd fds[3]
    cdef int rc, timeout_ms
    cdef bint reading_client, up_ready, down_ready
    cdef int64_t now, deadline, stuck
    while True:
        if not r.client_dead:
            parse_requests(r)           # slots may have come free
        if not r.up_blocked:
            rc = send_upstream(r)
            if rc != C_OK:
                return rc
        if not r.down_blocked:
            send_client(r)
        if r.closing and r.busy == 0 and (r.client_dead or not tp_unsent(&r.down)):
            return r.end
        now = now_ns()
        deadline = upstream_deadline(r)
        if deadline >= 0 and now >= deadline:
            return END_UPSTREAM_TIMEOUT
        stuck = client_deadline(r)
        if stuck >= 0 and now >= stuck:
            r.client_err = ETIMEDOUT        # the requests upstream has are still seen through
            client_gone(r)
            continue
        if stuck >= 0 and (deadline < 0 or stuck < deadline):
            deadline = stuck
        timeout_ms = -1 if deadline < 0 else <int>((deadline - now) // 1000000 + 1)
        reading_client = wants_client_input(r)
        # TLS: decrypted bytes already in a session are read without waiting for poll
        up_ready = tp_pending(&r.up)
        down_ready = reading_client and tp_pending(&r.down)
        if up_ready or down_ready:
            timeout_ms = 0
        fds[0].fd = r.stop_fd
        fds[0].events = POLLIN
        fds[1].fd = r.up.fd
        fds[1].events = POLLIN | (POLLOUT if r.up_blocked or r.up.read_wants_write else 0)
        fds[2].fd = -1 if r.client_dead else r.down.fd
        fds[2].events = (
            (POLLIN if reading_client or (r.down_blocked and r.down.write_wants_read) else 0)
            | (POLLOUT if (r.down_blocked and (r.done_count or tp_unsent(&r.down)))
               or (reading_client and r.down.read_wants_write) else 0))
        fds[0].revents = fds[1].revents = fds[2].revents = 0
        rc = poll(fds, 3, timeout_ms)
        if rc < 0:
            if errno == EINTR:
                continue
            r.err = errno
            return END_STOPPED
        if fds[0].revents:
            return END_STOPPED
        if up_ready:
            fds[1].revents |= POLLIN
        if down_ready:
            fds[2].revents |= POLLIN
        # (TLS: a read that waits for writability, or a write for readability, is retried
        # when the socket becomes so)
        if fds[1].revents & POLLOUT and r.up.read_wants_write:
            fds[1].revents |= POLLIN
        if fds[2].revents & POLLOUT and r.down.read_wants_write:
            fds[2].revents |= POLLIN
        if fds[1].revents & POLLOUT or (fds[1].revents & POLLIN and r.up.write_wants_read):
            r.up_blocked = 0
        if fds[2].revents & POLLIN and r.down.write_wants_read:
            r.down_blocked = 0
        if fds[1].revents & (POLLIN | POLLERR | POLLHUP):
            rc = read_upstream(r)
            if rc != C_OK:
                return rc
        if fds[2].revents & (POLLERR | POLLHUP | POLLNVAL):
            client_gone(r)
        else:
            if fds[2].revents & POLLOUT:
                r.down_blocked = 0
            if fds[2].revents & POLLIN:
                read_client(r)


# --------------------------------------------------------------------------------------------
# Python interface

cdef class Relay:
    """The proxy's in-flight requests and both connections' state. Owns its buffers; the
    sockets belong to the caller (pass non-blocking descriptors)."""

    cdef relay_t r
    cdef TlsSession up_tls
    cdef TlsSession down_tls

    def __cinit__(self, int upstream, uint64_t size, uint16_t upstream_flags, int stop_fd,
                  uint32_t cache_bytes, double timeout, TlsSession upstream_tls=None,
                  double send_timeout=30.0, bint structured=False, meta_id=None):
        cdef int i
        self.r.up.fd = upstream
        self.r.up.stage = <char *>malloc(STAGE_SIZE)
        self.r.up.stage_cap = STAGE_SIZE
        self.r.down.stage = <char *>malloc(STAGE_SIZE)
        self.r.down.stage_cap = STAGE_SIZE
        self._use_upstream_tls(upstream_tls)
        self.r.down.fd = -1
        self.r.stop_fd = stop_fd
        self.r.size = size
        self._use_upstream(upstream_flags, structured, meta_id)
        self.r.timeout_ns = <int64_t>(timeout * 1e9)
        self.r.send_timeout_ns = <int64_t>(send_timeout * 1e9)
        # (twice the largest cached read must still be a valid request upstream)
        self.r.cache_cap = min(cache_bytes, <uint32_t>(MAX_PAYLOAD // 2))
        self.r.payload_slot = -1
        self.r.data_slot = -1
        self.r.client_dead = 1      # until a client is attached
        self.r.slots = <slot_t *>calloc(NSLOTS, sizeof(slot_t))
        self.r.done_q = <int *>calloc(NSLOTS, sizeof(int))
        self.r.down_in.data = <char *>malloc(INBUF_SIZE)
        self.r.down_in.cap = INBUF_SIZE
        self.r.up_in.data = <char *>malloc(INBUF_SIZE)
        self.r.up_in.cap = INBUF_SIZE
        self.r.cache = <char *>malloc(self.r.cache_cap + 1)
        if not (self.r.slots and self.r.done_q and self.r.down_in.data and self.r.up_in.data
                and self.r.cache and self.r.up.stage and self.r.down.stage):
            raise MemoryError()
        for i in range(NSLOTS):
            self.r.slots[i].seq = <uint64_t>-1

    def __dealloc__(self):
        cdef int i
        if self.r.slots:
            for i in range(NSLOTS):
                free(self.r.slots[i].data)
        free(self.r.slots)
        free(self.r.done_q)
        free(self.r.down_in.data)
        free(self.r.up_in.data)
        free(self.r.cache)
        free(self.r.up.stage)
        free(self.r.down.stage)

    cdef _use_upstream(self, uint16_t flags, bint structured, meta_id):
        self.r.up_flags = flags
        self.r.up_structured = structured
        self.r.up_meta = structured and meta_id is not None
        self.r.up_meta_id = meta_id if self.r.up_meta else 0

    cdef _use_upstream_tls(self, TlsSession tls):
        self.up_tls = tls           # (keeps the session alive while the relay uses it)
        self.r.up.ssl = NULL if tls is None else tls.ssl
        self.r.up.stage_len = 0
        self.r.up.read_wants_write = self.r.up.write_wants_read = 0
        self.r.up.read_blocked = 0
        if tls is not None:
            # A bare close is a close, as in plaintext: the NBD framing shows a cut reply, and
            # the proxy reconnects either way.
            SSL_set_options(tls.ssl, SSL_OP_IGNORE_UNEXPECTED_EOF)
            tls.batch_writes()      # (the records of a send leave together)

    def attach(self, int client, TlsSession tls=None, bint structured=False,
               bint meta=False):
        """Start a client's session (``tls``: the session it shook hands on; ``structured``,
        ``meta``: it agreed structured replies, and selected base:allocation with the id
        BASE_ALLOCATION_ID). The previous one must have ended (nothing in flight)."""
        if self.r.busy:
            raise RuntimeError("requests of the previous client are still in flight")
        self.r.down_structured = structured
        self.r.down_meta = structured and meta
        self.r.down.fd = client
        self.down_tls = tls
        self.r.down.ssl = NULL if tls is None else tls.ssl
        if tls is not None:
            tls.batch_writes()
        self.r.down.stage_len = 0
        self.r.down.read_wants_write = self.r.down.write_wants_read = 0
        self.r.down.read_blocked = 0
        self.r.down_in.pos = self.r.down_in.len = 0
        self.r.payload_slot = -1
        self.r.done_head = self.r.done_count = self.r.done_sent = 0
        self.r.down_blocked = 0
        self.r.closing = 0
        self.r.end = 0
        self.r.client_dead = 0
        self.r.client_err = 0
        self.r.bad_value = 0
        self.r.problem = UP_OK
        self.r.err = 0
        invalidate_cache(&self.r)

    def set_upstream(self, int upstream, uint16_t upstream_flags, TlsSession tls=None,
                     bint structured=False, meta_id=None):
        """A new upstream connection (``tls``: its session; ``structured``: it agreed structured
        replies; ``meta_id``: the id it gave base:allocation, None if not selected): every
        request not yet answered is queued again, to be re-sent in the order it came (what its
        reply had brought so far is forgotten: nothing of it went to the client). Returns how
        many. A BLOCK_STATUS that this upstream cannot answer is answered here (all_data)."""
        cdef uint64_t seq
        cdef int state
        cdef uint64_t count = 0
        cdef slot_t *s
        self.r.up.fd = upstream
        self._use_upstream_tls(tls)
        self._use_upstream(upstream_flags, structured, meta_id)
        self.r.up_in.pos = self.r.up_in.len = 0
        self.r.data_slot = -1
        self.r.data_got = 0
        self.r.up_blocked = 0
        self.r.up_progress_ns = now_ns()
        self.r.problem = UP_OK
        self.r.err = 0
        invalidate_cache(&self.r)
        seq = self.r.oldest
        while seq < self.r.next_seq:
            state = state_of(&self.r, seq)
            s = slot_of(&self.r, seq)
            if state == SENT or state == QUEUED:
                if self.r.client_dead:
                    release(&self.r, s)
                elif s.type == CMD_BLOCK_STATUS and not self.r.up_meta:
                    all_data(&self.r, s)
                else:
                    queue_upstream(&self.r, s)  # (the cache generation moved on: a
                    count += 1                  # read-ahead re-sent now will not be kept)
            seq += 1
        self.r.cursor = self.r.oldest
        self.r.cursor_sent = 0
        self.r.rescan = 0
        self.r.replayed += count
        return count

    def run(self):
        """Relay until the session ends or upstream fails; returns an End."""
        cdef int end
        with nogil:
            self.r.up_progress_ns = now_ns()
            end = relay_loop(&self.r)
        return End(end)

    def state(self):
        """What the relay knows now: requests in flight (taken from the client, not yet fully
        answered), requests so far, and why it ended (its Problem with upstream, the errno, a
        bad magic, cookie or length, the client's errno: 0 if it just closed)."""
        return RelayState(self.r.busy, self.r.requests, Problem(self.r.problem), self.r.err,
                          self.r.bad_value, self.r.client_err)

"""The NBD handshake, both sides, in Python (it happens once per connection, off the hot path).

Server side: ``serve_handshake`` speaks oldstyle (the 152-byte greeting 0.5.0 sent) or fixed
newstyle (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY, the meta contexts, and
STARTTLS when the server has TLS credentials; anything else ERR_UNSUP) and returns what was
agreed, or None if the client left without entering transmission.

Client side: ``client_handshake`` detects the server's style from its greeting and enters
transmission (GO, falling back to EXPORT_NAME), returning the export size and flags.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from flexnbd import wire
from flexnbd._tls import TlsContext, TlsSession
from flexnbd.errors import HandshakeError, NoGreeting, NotNbd, PeerClosed, TlsError

# Option data longer than this is not read: the client is disconnected instead.
MAX_OPTION_LENGTH = 64 * 1024
# More options than this in one handshake is a client stuck in a loop.
MAX_OPTIONS = 1024


def recv_exact(sock: socket.socket | TlsSession, n: int,
               closed: str = "the peer closed the connection during the handshake",
               deadline: float | None = None) -> bytes:
    """Exactly n bytes; PeerClosed(closed) if the peer closes first. ``deadline`` (a
    time.monotonic() value): one deadline for all of them (TimeoutError); without it the
    socket's timeout applies to each recv."""
    data = bytearray()
    while len(data) < n:
        until(sock, deadline)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise PeerClosed(closed)
        data += chunk
    return bytes(data)


def until(sock: socket.socket | TlsSession, deadline: float | None) -> None:
    """Make the socket's timeout what is left until ``deadline`` (None: leave it);
    TimeoutError if nothing is left."""
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the server did not finish the handshake in time")
    sock.settimeout(left)


@dataclass
class ExportInfo:
    """What the server side needs to answer the handshake."""

    size: int
    read_only: bool = False
    can_fast_zero: bool = False
    block_status: bool = True     # offer the base:allocation meta context
    structured_replies: bool = True
    coverage: bool = False        # listen mode: offer flexnbd:coverage:<migration id>
    # Transmission flags to offer as they are (the proxy offers its upstream's); None: the
    # flags of a flexnbd export, from the fields above.
    flags: int | None = None

    def transmission_flags(self, structured: bool) -> int:
        if self.flags is not None:
            # (DF means nothing without structured replies)
            return self.flags if structured else self.flags & ~wire.FLAG_SEND_DF
        flags = (wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
                 | wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES | wire.FLAG_SEND_CACHE
                 | wire.FLAG_CAN_MULTI_CONN)
        if structured:
            flags |= wire.FLAG_SEND_DF
        if self.can_fast_zero:
            flags |= wire.FLAG_SEND_FAST_ZERO
        if self.read_only:
            flags |= wire.FLAG_READ_ONLY
        return flags

    def oldstyle_flags(self) -> int:
        if self.flags is not None:
            return self.flags & ~wire.FLAG_SEND_DF       # (no structured replies there)
        flags = wire.OLDSTYLE_FLAGS
        if self.read_only:
            flags |= wire.FLAG_READ_ONLY
        return flags


@dataclass
class Agreed:
    """The outcome of a server-side handshake that entered transmission."""

    structured: bool = False
    meta_context: bool = False         # base:allocation selected
    migration_id: str | None = None    # flexnbd:coverage:<migration id> selected
    export_name: bytes = b""
    style: str = "newstyle"
    tls: TlsSession | None = None     # the session everything after STARTTLS went through


@dataclass
class TlsPolicy:
    """A server's TLS: its credentials, and whether a client must use them (``require``:
    every option but STARTTLS and ABORT is refused with ERR_TLS_REQD before TLS)."""

    context: TlsContext
    require: bool = False


def serve_handshake(sock: socket.socket, export: ExportInfo, oldstyle: bool,
                    tls: TlsPolicy | None = None) -> Agreed | None:
    """Run the server side of the handshake. None if the client aborted or left cleanly.

    Raises HandshakeError for a client that broke the protocol (TlsError for a failed TLS
    handshake), PeerClosed if it vanished.
    """
    if oldstyle:
        sock.sendall(wire.pack_oldstyle_greeting(export.size, export.oldstyle_flags()))
        return Agreed(style="oldstyle")
    sock.sendall(wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES))
    try:
        (client_flags,) = struct.unpack(">I", recv_exact(sock, 4))
    except PeerClosed:
        return None  # a port probe: connected, read the greeting, left
    known = wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES
    if client_flags & ~known:
        raise HandshakeError(f"client sent unknown handshake flags {client_flags:#x}")
    no_zeroes = bool(client_flags & wire.FLAG_C_NO_ZEROES)
    return _Options(sock, export, no_zeroes, tls).run()


class _Options:
    """The option haggling phase of fixed newstyle."""

    def __init__(self, sock: socket.socket, export: ExportInfo, no_zeroes: bool,
                 tls: TlsPolicy | None = None) -> None:
        self.sock: socket.socket | TlsSession = sock
        self.export = export
        self.no_zeroes = no_zeroes
        self.tls = tls
        self.agreed = Agreed()

    def reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self.sock.sendall(wire.pack_option_reply(option, reply_type, data))

    def error(self, option: int, reply_type: int, message: str) -> None:
        self.reply(option, reply_type, message.encode())

    def run(self) -> Agreed | None:
        for _ in range(MAX_OPTIONS):
            header = recv_exact(self.sock, wire.OPTION_HEADER_SIZE)
            magic, option, length = wire.unpack_option_header(header)
            if magic != wire.IHAVEOPT:
                raise HandshakeError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise HandshakeError(f"option {option} with {length} bytes of data is too long")
            data = recv_exact(self.sock, length)
            if option == wire.OPT_STARTTLS:
                self.starttls(data)
                continue
            if self.tls_required() and option != wire.OPT_ABORT:
                if option == wire.OPT_EXPORT_NAME:   # it has no error reply: hang up
                    raise HandshakeError("EXPORT_NAME before TLS, which this server requires")
                self.error(option, wire.REP_ERR_TLS_REQD, "this server requires TLS")
                continue
            if option == wire.OPT_EXPORT_NAME:
                self.agreed.export_name = data
                flags = self.export.transmission_flags(self.agreed.structured)
                tail = b"" if self.no_zeroes else b"\0" * 124
                self.sock.sendall(struct.pack(">QH", self.export.size, flags) + tail)
                return self.agreed
            if option == wire.OPT_ABORT:
                try:
                    self.reply(option, wire.REP_ACK)
                except OSError:
                    pass  # the client may close first
                return None
            if option in (wire.OPT_GO, wire.OPT_INFO):
                if self.info(option, data):
                    return self.agreed
            elif option == wire.OPT_LIST:
                if data:
                    self.error(option, wire.REP_ERR_INVALID, "LIST takes no data")
                else:
                    self.reply(option, wire.REP_SERVER, struct.pack(">I", 0))
                    self.reply(option, wire.REP_ACK)
            elif option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
                self.meta_context(option, data)
            elif option == wire.OPT_STRUCTURED_REPLY and not self.export.structured_replies:
                self.error(option, wire.REP_ERR_UNSUP, "structured replies are not offered")
            elif option == wire.OPT_STRUCTURED_REPLY:
                if data:
                    self.error(option, wire.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                else:
                    self.agreed.structured = True
                    self.reply(option, wire.REP_ACK)
            else:
                self.error(option, wire.REP_ERR_UNSUP, f"option {option} is not supported")
        raise HandshakeError(f"more than {MAX_OPTIONS} options")

    def tls_required(self) -> bool:
        return self.tls is not None and self.tls.require and self.agreed.tls is None

    def starttls(self, data: bytes) -> None:
        """STARTTLS: ACK, the TLS handshake, then the options start again inside TLS, from a
        clean state. TlsError when the handshake fails (the connection then ends)."""
        if self.tls is None:
            self.error(wire.OPT_STARTTLS, wire.REP_ERR_UNSUP, "TLS is not offered")
        elif self.agreed.tls is not None:
            self.error(wire.OPT_STARTTLS, wire.REP_ERR_INVALID, "TLS is already on")
        elif data:
            self.error(wire.OPT_STARTTLS, wire.REP_ERR_INVALID, "STARTTLS takes no data")
        else:
            self.reply(wire.OPT_STARTTLS, wire.REP_ACK)
            assert isinstance(self.sock, socket.socket)     # (TLS is not on yet)
            session = self.tls.context.session(self.sock)
            session.handshake()
            self.sock = session
            self.agreed = Agreed(tls=session)

    def meta_context(self, option: int, data: bytes) -> None:
        """LIST_META_CONTEXT / SET_META_CONTEXT: base:allocation and, in listen mode,
        flexnbd:coverage:<migration id> (the first well-formed one asked for)."""
        queries = _parse_meta_request(data)
        if queries is None:
            self.error(option, wire.REP_ERR_INVALID, "malformed meta context request")
            return
        setting = option == wire.OPT_SET_META_CONTEXT
        if setting and not self.agreed.structured:
            self.error(option, wire.REP_ERR_INVALID, "negotiate structured replies first")
            return
        wanted = [wire.BASE_ALLOCATION] if setting else [wire.BASE_ALLOCATION, b"base:"]
        match = self.export.block_status and (
            any(q in wanted for q in queries) or (not setting and not queries))
        if match:
            context_id = wire.BASE_ALLOCATION_ID if setting else 0
            self.reply(option, wire.REP_META_CONTEXT,
                       struct.pack(">I", context_id) + wire.BASE_ALLOCATION)
        migration = None
        if self.export.coverage:
            migration = next((m for m in map(wire.migration_id_of, queries) if m), None)
        if migration is not None:
            self.reply(option, wire.REP_META_CONTEXT,
                       struct.pack(">I", wire.COVERAGE_ID if setting else 0)
                       + wire.COVERAGE_PREFIX + migration.encode())
        if setting:
            self.agreed.meta_context = bool(match)
            self.agreed.migration_id = migration
        self.reply(option, wire.REP_ACK)

    def info(self, option: int, data: bytes) -> bool:
        """INFO or GO. True when GO succeeded (transmission starts)."""
        parsed = _parse_info_request(data)
        if parsed is None:
            self.error(option, wire.REP_ERR_INVALID, "malformed INFO/GO request")
            return False
        name, requests = parsed
        flags = self.export.transmission_flags(self.agreed.structured)
        self.reply(option, wire.REP_INFO,
                   struct.pack(">HQH", wire.INFO_EXPORT, self.export.size, flags))
        if wire.INFO_BLOCK_SIZE in requests:
            self.reply(option, wire.REP_INFO,
                       struct.pack(">HIII", wire.INFO_BLOCK_SIZE, wire.BLOCK_SIZE_MIN,
                                   wire.BLOCK_SIZE_PREFERRED, wire.BLOCK_SIZE_MAX))
        if wire.INFO_NAME in requests:
            self.reply(option, wire.REP_INFO, struct.pack(">H", wire.INFO_NAME) + name)
        self.reply(option, wire.REP_ACK)
        if option == wire.OPT_GO:
            self.agreed.export_name = name
            return True
        return False


def _parse_meta_request(data: bytes) -> list[bytes] | None:
    """name-length u32 · name · count u32 · count × (length u32 · query); None if malformed."""
    if len(data) < 8:
        return None
    (name_len,) = struct.unpack_from(">I", data, 0)
    pos = 4 + name_len
    if pos + 4 > len(data):
        return None
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + length > len(data):
            return None
        queries.append(data[pos:pos + length])
        pos += length
    return queries if pos == len(data) else None


def _parse_info_request(data: bytes) -> tuple[bytes, list[int]] | None:
    """name-length u32 · name · count u16 · count × u16; None if malformed."""
    if len(data) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", data, 0)
    if name_len > len(data) - 6:
        return None
    name = data[4:4 + name_len]
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        return None
    requests = list(struct.unpack_from(f">{count}H", data, 6 + name_len))
    return name, requests


# --------------------------------------------------------------------------------------------
# Client side.

@dataclass
class ServerInfo:
    style: str     # "oldstyle" or "newstyle"
    size: int
    flags: int
    tls: TlsSession | None = None    # the session the transmission phase must go through
    # The id the server gave flexnbd:coverage:<migration id> (structured replies are on
    # then, for its BLOCK_STATUS); None when not asked for or not offered.
    coverage_context: int | None = None
    structured: bool = False         # structured replies agreed
    # The meta contexts asked for that the server selected: name -> the id it gave it.
    contexts: dict[bytes, int] = field(default_factory=dict)

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def client_handshake(sock: socket.socket, export_name: bytes = b"",
                     tls: TlsContext | None = None,
                     server_hostname: str | None = None, timeout: float | None = None,
                     greeting_timeout: float | None = None,
                     migration_id: str | None = None, meta_contexts: Sequence[bytes] = (),
                     structured: bool = False) -> ServerInfo:
    """Detect the server's handshake style and enter transmission (simple replies only,
    unless ``structured`` asks for them or a meta context was agreed).
    With ``tls``: STARTTLS first (the server's X.509 certificate must name
    ``server_hostname``; a PSK must be used); TlsError, which is final, when the server has no
    TLS or the TLS handshake fails, and also without ``tls`` when the server requires TLS.
    ``timeout``: one deadline for the whole handshake, ``greeting_timeout`` for its first
    bytes (TimeoutError); without them the socket's timeout applies to each receive.
    ``migration_id``: ask a listener for flexnbd:coverage:<migration_id> (a migration's
    sender, to resume); only a server that lists it gets structured replies negotiated.
    ``meta_contexts``: more meta contexts to select (the proxy: base:allocation), and
    ``structured``: negotiate structured replies even when none of them is listed (the proxy
    passes structured READs through). The outcome is in ServerInfo.structured and .contexts
    (and .coverage_context)."""
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    greeting = deadline if greeting_timeout is None else now + greeting_timeout
    if deadline is not None and greeting is not None:
        greeting = min(greeting, deadline)
    try:
        head = recv_exact(sock, 16, deadline=greeting)
    except TimeoutError:
        raise NoGreeting("no greeting from the server") from None
    magic, second = struct.unpack(">QQ", head)
    if magic != wire.NBDMAGIC or second not in (wire.OLDSTYLE_MAGIC, wire.IHAVEOPT):
        _read_rest_of_greeting(sock, len(head))
        raise NotNbd("the server's greeting has a bad magic")
    if second == wire.OLDSTYLE_MAGIC:
        if tls is not None:
            raise TlsError("the server speaks the oldstyle handshake, which has no TLS")
        size, flags = struct.unpack(">QI", recv_exact(sock, 12, deadline=deadline))
        recv_exact(sock, 124, deadline=deadline)
        return ServerInfo("oldstyle", size, flags & 0xFFFF)
    (hflags,) = struct.unpack(">H", recv_exact(sock, 2, deadline=deadline))
    if not hflags & wire.FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("the server does not speak fixed newstyle")
    cflags = wire.FLAG_C_FIXED_NEWSTYLE
    no_zeroes = bool(hflags & wire.FLAG_NO_ZEROES)
    if no_zeroes:
        cflags |= wire.FLAG_C_NO_ZEROES
    until(sock, deadline)
    sock.sendall(struct.pack(">I", cflags))
    channel: socket.socket | TlsSession = sock
    session = None
    if tls is not None:
        session = _client_starttls(sock, tls, server_hostname, deadline)
        channel = session
    names = list(meta_contexts)
    coverage_name = None
    if migration_id is not None:
        coverage_name = wire.COVERAGE_PREFIX + migration_id.encode()
        names.append(coverage_name)
    agreed_structured, contexts = False, dict[bytes, int]()
    if names or structured:
        agreed_structured, contexts = _client_meta(channel, names, structured, deadline)
    info = _client_go(channel, export_name, deadline)
    if info is None:
        # The server does not know GO: fall back to EXPORT_NAME.
        until(channel, deadline)
        channel.sendall(wire.pack_option(wire.OPT_EXPORT_NAME, export_name))
        size, flags = struct.unpack(">QH", recv_exact(channel, 10, deadline=deadline))
        if not no_zeroes:
            recv_exact(channel, 124, deadline=deadline)
        info = ServerInfo("newstyle", size, flags)
    info.tls = session
    info.structured = agreed_structured
    info.contexts = contexts
    info.coverage_context = contexts.get(coverage_name) if coverage_name is not None else None
    return info


# A server that answers one option with more replies than this is not a flexnbd listener.
MAX_OPTION_REPLIES = 16


def _client_meta(sock: socket.socket | TlsSession, names: list[bytes], structured: bool,
                 deadline: float | None) -> tuple[bool, dict[bytes, int]]:
    """Select the meta contexts ``names`` that the server lists: LIST first (it needs no
    structured replies, so a server that knows none of them keeps simple replies unless
    ``structured`` wants them anyway), then STRUCTURED_REPLY and SET. Returns whether
    structured replies were agreed and {name: id} of the contexts selected (anything
    unexpected but well formed: fewer of them, the caller goes on without)."""
    listed: list[bytes] = []
    if names:
        ids = _meta_contexts(sock, wire.OPT_LIST_META_CONTEXT, _meta_request(names), names,
                             deadline)
        listed = [name for name in names if name in ids]
    if not listed and not structured:
        return False, {}
    until(sock, deadline)
    sock.sendall(wire.pack_option(wire.OPT_STRUCTURED_REPLY))
    reply_type, _ = _recv_option_reply(sock, wire.OPT_STRUCTURED_REPLY, deadline)
    if reply_type != wire.REP_ACK:
        return False, {}
    if not listed:
        return True, {}
    return True, _meta_contexts(sock, wire.OPT_SET_META_CONTEXT, _meta_request(listed), listed,
                                deadline)


def _meta_request(names: list[bytes]) -> bytes:
    """A meta context option's data for the default export: name-length 0 · count · queries."""
    return (struct.pack(">I", 0) + struct.pack(">I", len(names))
            + b"".join(struct.pack(">I", len(name)) + name for name in names))


def _meta_contexts(sock: socket.socket | TlsSession, option: int, request: bytes,
                   names: list[bytes], deadline: float | None) -> dict[bytes, int]:
    """Send a meta context option; {name: id} of the replies that name one of ``names``
    (the first reply for each)."""
    until(sock, deadline)
    sock.sendall(wire.pack_option(option, request))
    ids: dict[bytes, int] = {}
    for _ in range(MAX_OPTION_REPLIES):
        reply_type, data = _recv_option_reply(sock, option, deadline)
        if reply_type == wire.REP_META_CONTEXT and len(data) >= 4 and data[4:] in names:
            ids.setdefault(data[4:], struct.unpack_from(">I", data)[0])
        elif reply_type == wire.REP_ACK or wire.is_error_reply(reply_type):
            return ids if reply_type == wire.REP_ACK else {}
    raise HandshakeError(f"the server sent more than {MAX_OPTION_REPLIES} replies to one option")


def _recv_option_reply(sock: socket.socket | TlsSession, option: int,
                       deadline: float | None) -> tuple[int, bytes]:
    """One option reply to ``option``: (reply type, data)."""
    magic, replied, reply_type, length = wire.unpack_option_reply_header(
        recv_exact(sock, wire.OPTION_REPLY_HEADER_SIZE, deadline=deadline))
    if magic != wire.OPTION_REPLY_MAGIC or replied != option:
        raise HandshakeError("the server sent a malformed option reply")
    if length > MAX_OPTION_LENGTH:
        raise HandshakeError("the server sent an oversized option reply")
    return reply_type, recv_exact(sock, length, deadline=deadline)


def _client_starttls(sock: socket.socket, tls: TlsContext, server_hostname: str | None,
                     deadline: float | None) -> TlsSession:
    until(sock, deadline)
    sock.sendall(wire.pack_option(wire.OPT_STARTTLS))
    reply_type, _ = _recv_option_reply(sock, wire.OPT_STARTTLS, deadline)
    if reply_type != wire.REP_ACK:
        raise TlsError(f"the server does not offer TLS ({wire.option_reply_name(reply_type)})")
    session = tls.session(sock, server_hostname)
    until(sock, deadline)
    session.handshake()
    return session


# How long a peer with an unknown greeting gets to finish writing it before we close.
REST_OF_GREETING_TIMEOUT = 0.5


def _read_rest_of_greeting(sock: socket.socket, have: int) -> None:
    """Judge a greeting whole: read (and drop) what is left of a 152-byte oldstyle greeting,
    briefly, so that a peer still writing it is not cut off mid-write by our close."""
    left = wire.OLDSTYLE_GREETING_SIZE - have
    timeout = sock.gettimeout()
    deadline = time.monotonic() + REST_OF_GREETING_TIMEOUT    # one deadline for all of it
    try:
        while left > 0:
            wait = deadline - time.monotonic()
            if wait <= 0:
                break
            sock.settimeout(wait)
            chunk = sock.recv(left)
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass
    finally:
        sock.settimeout(timeout)


def _client_go(sock: socket.socket | TlsSession, export_name: bytes,
               deadline: float | None) -> ServerInfo | None:
    request = struct.pack(">I", len(export_name)) + export_name + struct.pack(">H", 0)
    until(sock, deadline)
    sock.sendall(wire.pack_option(wire.OPT_GO, request))
    size = flags = None
    while True:
        reply_type, data = _recv_option_reply(sock, wire.OPT_GO, deadline)
        if reply_type == wire.REP_ERR_UNSUP:
            return None
        if reply_type == wire.REP_ERR_TLS_REQD:
            raise TlsError("the server requires TLS (give this side TLS credentials)")
        if wire.is_error_reply(reply_type):
            text = data.decode("utf-8", "replace")
            raise HandshakeError(f"the server refused the export ({reply_type:#x}) {text}".strip())
        if reply_type == wire.REP_INFO and len(data) >= 12:
            (info_type,) = struct.unpack_from(">H", data)
            if info_type == wire.INFO_EXPORT:
                size, flags = struct.unpack_from(">QH", data, 2)
        elif reply_type == wire.REP_ACK:
            if size is None or flags is None:
                raise HandshakeError("the server did not describe the export")
            return ServerInfo("newstyle", size, flags)

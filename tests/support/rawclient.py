"""A raw-socket NBD client for tests: it does the handshake by hand with ``flexnbd.wire`` and
sends arbitrary (also malformed) requests, so tests can misbehave on purpose.

Nothing here trusts the server: every read has a timeout and a short read is an error.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from flexnbd import wire

DEFAULT_TIMEOUT = 15.0


class ServerClosed(Exception):
    """The peer (the server, for a client) closed the connection (EOF or reset) while more
    bytes were expected; ``got``: the bytes that did come, ``reset``: it was a reset."""

    def __init__(self, message: str, got: bytes = b"", reset: bool = False) -> None:
        super().__init__(message)
        self.got = got
        self.reset = reset


def recv_exact(sock, n: int, count: Callable[[int], object] | None = None) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (a socket, or anything with its ``recv``: an ssl
    socket, a TLS session); ServerClosed if the peer closes or resets first. ``count`` is
    called with the size of each piece as it arrives (a fake peer's byte counter). Other
    errors (a timeout) are raised as they are.

    The tests' one receive loop (the fakes, the raw clients and the senders use it):
    flexnbd.handshake.recv_exact does not keep the bytes that came before a close, which
    tests check (a server must not close part-way through its greeting), and lets a reset
    through as ConnectionResetError."""
    data = bytearray()
    while len(data) < n:
        reset = False
        try:
            chunk = sock.recv(min(n - len(data), 1 << 20))
        except ConnectionResetError:
            chunk, reset = b"", True
        if not chunk:
            raise ServerClosed(f"closed after {len(data)} of {n} bytes", bytes(data), reset)
        if count is not None:
            count(len(chunk))
        data += chunk
    return bytes(data)


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return wire.is_error_reply(self.type)


@dataclass
class Reply:
    """A transmission reply: simple, or the chunks of a structured reply put together."""

    error: int
    cookie: int
    data: bytes = b""
    structured: bool = False
    chunks: list[wire.ChunkHeader] = field(default_factory=list)


@dataclass
class Greeting:
    style: str                 # "oldstyle" or "newstyle"
    raw: bytes
    size: int | None = None    # oldstyle only
    flags: int | None = None   # oldstyle: transmission flags (low 16 bits); newstyle: hs flags


class RawClient:
    """One connection to an NBD server."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.structured = False
        self.size: int | None = None
        self.flags: int | None = None
        self._next_cookie = 1

    # -- connection --------------------------------------------------------------------------

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT,
                rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def reset(self) -> None:
        """Close with SO_LINGER 0: the peer gets a RST instead of a FIN."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    @property
    def local_name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    # -- raw bytes ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def read_until_closed(self, limit: int = 1 << 20) -> bytes:
        """Everything the server still sends until it closes (a reset counts as closing).

        Raises TimeoutError (socket.timeout) if the server keeps the connection open.
        """
        data = bytearray()
        while len(data) <= limit:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def is_closed_by_server(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True if the server closes the connection (without sending anything more) within
        ``timeout``; False if it sends something or keeps the connection open."""
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(old)

    # -- handshake ---------------------------------------------------------------------------

    def read_greeting(self) -> Greeting:
        head = self.recv_exact(16)
        magic, second = struct.unpack(">QQ", head)
        if magic != wire.NBDMAGIC:
            raise AssertionError(f"bad greeting magic {magic:#x}")
        if second == wire.OLDSTYLE_MAGIC:
            rest = self.recv_exact(wire.OLDSTYLE_GREETING_SIZE - 16)
            size, flags = struct.unpack_from(">QI", rest)
            self.size, self.flags = size, flags & 0xFFFF
            return Greeting("oldstyle", head + rest, size, flags)
        if second != wire.IHAVEOPT:
            raise AssertionError(f"bad greeting second magic {second:#x}")
        hs = self.recv_exact(2)
        return Greeting("newstyle", head + hs, flags=struct.unpack(">H", hs)[0])

    def send_client_flags(self, flags: int) -> None:
        self.send(struct.pack(">I", flags))

    def send_option(self, option: int, data: bytes = b"", magic: int = wire.IHAVEOPT,
                    length: int | None = None) -> None:
        n = len(data) if length is None else length
        self.send(struct.pack(">QII", magic, option, n) + data)

    def recv_option_reply(self) -> OptionReply:
        magic, option, reply_type, length = wire.unpack_option_reply_header(
            self.recv_exact(wire.OPTION_REPLY_HEADER_SIZE))
        if magic != wire.OPTION_REPLY_MAGIC:
            raise AssertionError(f"bad option reply magic {magic:#x}")
        if length > 1 << 20:
            raise AssertionError(f"option reply of {length} bytes")
        return OptionReply(option, reply_type, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; the replies up to and including the final one (ACK or an error)."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.recv_option_reply()
            if reply.option != option:
                raise AssertionError(f"reply for option {reply.option}, sent {option}")
            replies.append(reply)
            if reply.type == wire.REP_ACK or reply.is_error:
                return replies

    @staticmethod
    def info_request(name: bytes = b"", requests: tuple[int, ...] = ()) -> bytes:
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
                + b"".join(struct.pack(">H", r) for r in requests))

    def go(self, name: bytes = b"", requests: tuple[int, ...] = ()) -> list[OptionReply]:
        """GO; on success the size and flags are taken from its INFO_EXPORT reply."""
        replies = self.option(wire.OPT_GO, self.info_request(name, requests))
        if replies[-1].type != wire.REP_ACK:
            raise AssertionError(f"GO refused: {replies[-1]}")
        for reply in replies:
            if reply.type == wire.REP_INFO and reply.data[:2] == b"\0\0":
                self.size, self.flags = struct.unpack_from(">QH", reply.data, 2)
        return replies

    def export_name(self, name: bytes = b"", no_zeroes: bool = True) -> bytes:
        """EXPORT_NAME; returns the raw reply (size, flags and the zeroes if any)."""
        self.send_option(wire.OPT_EXPORT_NAME, name)
        raw = self.recv_exact(10 if no_zeroes else 134)
        self.size, self.flags = struct.unpack_from(">QH", raw)
        return raw

    def handshake(self, structured: bool = False, no_zeroes: bool = True,
                  use_go: bool = True) -> tuple[int, int]:
        """Whatever style the server speaks: enter transmission; (export size, flags)."""
        greeting = self.read_greeting()
        if greeting.style == "oldstyle":
            assert not structured, "structured replies need newstyle"
            assert self.size is not None and self.flags is not None
            return self.size, self.flags
        assert greeting.flags is not None
        cflags = wire.FLAG_C_FIXED_NEWSTYLE
        if no_zeroes and greeting.flags & wire.FLAG_NO_ZEROES:
            cflags |= wire.FLAG_C_NO_ZEROES
        self.send_client_flags(cflags)
        if structured:
            replies = self.option(wire.OPT_STRUCTURED_REPLY)
            if replies[-1].type != wire.REP_ACK:
                raise AssertionError(f"STRUCTURED_REPLY refused: {replies[-1]}")
            self.structured = True
        if use_go:
            self.go()
        else:
            self.export_name(no_zeroes=bool(cflags & wire.FLAG_C_NO_ZEROES))
        assert self.size is not None and self.flags is not None
        return self.size, self.flags

    # -- transmission ------------------------------------------------------------------------

    def new_cookie(self) -> int:
        cookie = self._next_cookie
        self._next_cookie += 1
        return cookie

    @staticmethod
    def pack(type: int, offset: int = 0, length: int = 0, cookie: int = 0, flags: int = 0,
             magic: int = wire.REQUEST_MAGIC) -> bytes:
        return wire.pack_request(type, offset, length, cookie, flags, magic)

    def send_request(self, type: int, offset: int = 0, length: int = 0,
                     cookie: int | None = None, flags: int = 0, magic: int = wire.REQUEST_MAGIC,
                     payload: bytes = b"") -> int:
        """Send one request (and payload, sent as given: it need not match ``length``)."""
        if cookie is None:
            cookie = self.new_cookie()
        self.send(self.pack(type, offset, length, cookie, flags, magic) + payload)
        return cookie

    def recv_reply(self, read_length: int | None = None, read_offset: int = 0) -> Reply:
        """Receive one reply. ``read_length``: the length of the READ it answers (None when it
        does not answer a READ): a successful simple reply is followed by that much data.
        ``read_offset``: that READ's offset (structured chunks carry absolute offsets)."""
        head = self.recv_exact(4)
        (magic,) = struct.unpack(">I", head)
        if magic == wire.SIMPLE_REPLY_MAGIC:
            reply = wire.unpack_simple_reply(head + self.recv_exact(12))
            data = b""
            if reply.error == 0 and read_length:
                data = self.recv_exact(read_length)
            return Reply(reply.error, reply.cookie, data)
        if magic == wire.STRUCTURED_REPLY_MAGIC:
            return self._recv_structured(head, read_length, read_offset)
        raise AssertionError(f"bad reply magic {magic:#x}")

    def _recv_structured(self, head: bytes, read_length: int | None,
                         read_offset: int) -> Reply:
        buf = bytearray(read_length or 0)
        error = 0
        cookie = None
        chunks = []
        while True:
            if not head:
                head = self.recv_exact(4)
            chunk = wire.unpack_chunk_header(head + self.recv_exact(wire.CHUNK_HEADER_SIZE - 4))
            head = b""
            if chunk.magic != wire.STRUCTURED_REPLY_MAGIC:
                raise AssertionError(f"bad chunk magic {chunk.magic:#x}")
            if cookie is not None and chunk.cookie != cookie:
                raise AssertionError("chunks of one reply with different cookies")
            cookie = chunk.cookie
            chunks.append(chunk)
            payload = self.recv_exact(chunk.length)
            if chunk.type == wire.REPLY_TYPE_OFFSET_DATA:
                (offset,) = struct.unpack_from(">Q", payload)
                start = offset - read_offset
                data = payload[8:]
                if start < 0 or start + len(data) > len(buf):
                    raise AssertionError(f"OFFSET_DATA chunk {offset}+{len(data)} outside the READ")
                buf[start:start + len(data)] = data
            elif chunk.type == wire.REPLY_TYPE_OFFSET_HOLE:
                offset, hole = struct.unpack_from(">QI", payload)
                start = offset - read_offset
                if start < 0 or start + hole > len(buf):
                    raise AssertionError(f"OFFSET_HOLE chunk {offset}+{hole} outside the READ")
                buf[start:start + hole] = bytes(hole)
            elif chunk.type in (wire.REPLY_TYPE_ERROR, wire.REPLY_TYPE_ERROR_OFFSET):
                (error,) = struct.unpack_from(">I", payload)
            elif chunk.type != wire.REPLY_TYPE_NONE:
                raise AssertionError(f"unexpected chunk type {chunk.type}")
            if chunk.flags & wire.REPLY_FLAG_DONE:
                break
        assert cookie is not None
        return Reply(error, cookie, bytes(buf) if not error else b"", True, chunks)

    def request(self, type: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", magic: int = wire.REQUEST_MAGIC) -> Reply:
        """Send one request and receive its reply; checks the cookie."""
        cookie = self.send_request(type, offset, length, flags=flags, magic=magic,
                                   payload=payload)
        reply = self.recv_reply(length if type == wire.CMD_READ else None, offset)
        if reply.cookie != cookie:
            raise AssertionError(f"reply cookie {reply.cookie:#x}, sent {cookie:#x}")
        return reply

    def recv_chunks(self, cookie: int, most: int = 100_000) -> list[tuple[int, int, bytes]]:
        """The chunks of one structured reply to ``cookie``, as they came: (flags, type,
        payload), the last one DONE. At most ``most`` chunks, each at most 33 MiB."""
        chunks = []
        while len(chunks) < most:
            magic, flags, ctype, got, length = struct.unpack(">IHHQI", self.recv_exact(20))
            assert magic == wire.STRUCTURED_REPLY_MAGIC, hex(magic)
            assert got == cookie, (got, cookie)
            assert length <= 33 * 1024 * 1024, length
            chunks.append((flags, ctype, self.recv_exact(length)))
            if flags & wire.REPLY_FLAG_DONE:
                return chunks
        raise AssertionError(f"no DONE chunk in {most}")

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        reply = self.request(wire.CMD_READ, offset, length, flags)
        if reply.error:
            raise AssertionError(f"READ {offset}+{length} failed with {reply.error}")
        return reply.data

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        """WRITE; the NBD error of the reply (0 for success)."""
        return self.request(wire.CMD_WRITE, offset, len(data), flags, payload=data).error

    def disconnect(self) -> None:
        self.send_request(wire.CMD_DISC)


def connect_and_handshake(port: int, **kwargs: object) -> RawClient:
    client = RawClient.connect(port)
    try:
        client.handshake(**kwargs)  # type: ignore[arg-type]
    except BaseException:
        client.close()
        raise
    return client


def connect_to_options(port: int, timeout: float = DEFAULT_TIMEOUT) -> RawClient:
    """A client past a fixed-newstyle greeting (its flags sent: FIXED_NEWSTYLE, NO_ZEROES), in
    the option haggling."""
    client = RawClient.connect(port, timeout=timeout)
    try:
        assert client.read_greeting().style == "newstyle"
        client.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
    except BaseException:
        client.close()
        raise
    return client

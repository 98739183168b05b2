"""The NBD wire format for Python: the constants (their values live in ``_wire.pxd``, read
here through the compiled ``_wire`` module) and struct helpers.

All integers on the wire are big-endian.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# Every wire constant, re-exported: NBDMAGIC, CMD_READ, REP_ERR_UNSUP, NBD_EIO, ...
from flexnbd._wire import *  # noqa: F403

# The name of the base:allocation meta context (its id is BASE_ALLOCATION_ID).
BASE_ALLOCATION = b"base:allocation"

# A listener's meta context "flexnbd:coverage:<migration id>" (its id is COVERAGE_ID): which
# bytes the sender of that migration wrote, across its reconnects (STATE_COVERED). The id is
# 1 to 64 characters of [0-9a-zA-Z_-], chosen by the source, one per `mirror`.
COVERAGE_PREFIX = b"flexnbd:coverage:"
MAX_MIGRATION_ID = 64


def migration_id_of(name: bytes) -> str | None:
    """The migration id in a coverage context name, or None if it is not one."""
    if not name.startswith(COVERAGE_PREFIX):
        return None
    ident = name[len(COVERAGE_PREFIX):]
    if not 0 < len(ident) <= MAX_MIGRATION_ID or \
            not all(c in _ID_CHARS for c in ident):
        return None
    return ident.decode("ascii")


_ID_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-")

# Names of the wire errors, for messages ("ENOSPC" rather than 28).
ERROR_NAMES = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EBADMSG: "EBADMSG",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# The transmission flags 0.5.0 sent in its oldstyle greeting: HAS_FLAGS|SEND_FLUSH|SEND_FUA.
OLDSTYLE_FLAGS = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA

# Block sizes advertised with NBD_INFO_BLOCK_SIZE.
BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = MAX_PAYLOAD

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OPTION = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_OLDSTYLE_HEAD = struct.Struct(">QQQI")
_NEWSTYLE_GREETING = struct.Struct(">QQH")


class Request(NamedTuple):
    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


class SimpleReply(NamedTuple):
    magic: int
    error: int
    cookie: int


class ChunkHeader(NamedTuple):
    magic: int
    flags: int
    type: int
    cookie: int
    length: int


def pack_request(
    type: int, offset: int = 0, length: int = 0, cookie: int = 0, flags: int = 0,
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return _REQUEST.pack(magic, flags, type, cookie, offset, length)


def unpack_request(data: bytes) -> Request:
    return Request(*_REQUEST.unpack(data))


def pack_simple_reply(error: int, cookie: int, magic: int = SIMPLE_REPLY_MAGIC) -> bytes:
    return _SIMPLE_REPLY.pack(magic, error, cookie)


def unpack_simple_reply(data: bytes) -> SimpleReply:
    return SimpleReply(*_SIMPLE_REPLY.unpack(data))


def unpack_chunk_header(data: bytes) -> ChunkHeader:
    return ChunkHeader(*_CHUNK_HEADER.unpack(data))


def pack_chunk_header(flags: int, type: int, cookie: int, length: int) -> bytes:
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type, cookie, length)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def unpack_option_header(data: bytes) -> tuple[int, int, int]:
    """(magic, option, length) of a client's option header."""
    return _OPTION.unpack(data)


def pack_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def unpack_option_reply_header(data: bytes) -> tuple[int, int, int, int]:
    """(magic, option, reply type, length) of a server's option reply header."""
    return _OPTION_REPLY.unpack(data)


OPTION_HEADER_SIZE = _OPTION.size
OPTION_REPLY_HEADER_SIZE = _OPTION_REPLY.size
NEWSTYLE_GREETING_SIZE = _NEWSTYLE_GREETING.size


def pack_oldstyle_greeting(size: int, flags: int) -> bytes:
    return _OLDSTYLE_HEAD.pack(NBDMAGIC, OLDSTYLE_MAGIC, size, flags) + b"\0" * 124


def pack_newstyle_greeting(handshake_flags: int) -> bytes:
    return _NEWSTYLE_GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def is_error_reply(reply_type: int) -> bool:
    return bool(reply_type & 0x80000000)


_REPLY_NAMES = {REP_ACK: "ACK", REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY",
                REP_ERR_INVALID: "ERR_INVALID", REP_ERR_PLATFORM: "ERR_PLATFORM",
                REP_ERR_TLS_REQD: "ERR_TLS_REQD", REP_ERR_UNKNOWN: "ERR_UNKNOWN",
                REP_ERR_SHUTDOWN: "ERR_SHUTDOWN"}


def option_reply_name(reply_type: int) -> str:
    """ERR_UNSUP for 0x80000001 (the number in hex when it has no name)."""
    return _REPLY_NAMES.get(reply_type, f"{reply_type:#x}")

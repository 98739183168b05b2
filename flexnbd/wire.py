"""The NBD wire format for Python: constants mirrored from ``_wire.pxd`` and struct helpers.

``tests/unit/test_wire.py`` checks that every name here has the same value in ``_wire.pxd``.
All integers on the wire are big-endian.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

NBDMAGIC = 0x4E42444D41474943
OLDSTYLE_MAGIC = 0x0000420281861253
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x0003E889045565A9

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20
OLDSTYLE_GREETING_SIZE = 152
MAX_PAYLOAD = 32 * 1024 * 1024

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

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

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 32769
REPLY_TYPE_ERROR_OFFSET = 32770

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# The id flexnbd gives the base:allocation meta context, and its name.
BASE_ALLOCATION_ID = 1
BASE_ALLOCATION = b"base:allocation"

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EBADMSG = 74
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

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

# The cookie of mirror requests, as 0.5.0 sends it: the bytes ".MIRROR.", read big-endian.
MIRROR_COOKIE = 0x2E4D4952524F522E

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

"""The one wire definition: every constant of flexnbd/_wire.pxd reaches Python (flexnbd.wire,
through the compiled _wire module) with its value, the values are the NBD protocol's, and the
pack/unpack helpers round-trip."""

from __future__ import annotations

import ast
import operator
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexnbd import wire

PXD = Path(wire.__file__).with_name("_wire.pxd")

_OPS = {ast.LShift: operator.lshift, ast.Mult: operator.mul, ast.BitOr: operator.or_,
        ast.Add: operator.add, ast.Sub: operator.sub, ast.RShift: operator.rshift}


def _eval_int(text: str) -> int:
    """Evaluate a constant integer expression of the pxd (literals, << * | + -)."""
    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"cannot evaluate {text!r}")
    return ev(ast.parse(text.strip(), mode="eval").body)


def parse_pxd(text: str) -> dict[str, int]:
    """NAME -> value for every constant of _wire.pxd: the ``cdef``/``cpdef enum`` members and the
    ``#define FLEXNBD_...`` values under their Cython names."""
    consts: dict[str, int] = {}
    defines: dict[str, int] = {}
    for m in re.finditer(r"^\s*#define\s+(FLEXNBD_\w+)\s+(\S+)", text, re.M):
        value = re.sub(r"[uUlL]+$", "", m.group(2))
        defines[m.group(1)] = int(value, 0)
    aliases = re.findall(r"^\s*const\s+\w+\s+(\w+)\s+\"(FLEXNBD_\w+)\"", text, re.M)
    for name, cname in aliases:
        consts[name] = defines.pop(cname)
    for cname, value in defines.items():  # a define without a Cython alias
        consts[cname.removeprefix("FLEXNBD_")] = value
    in_enum = False
    for line in text.splitlines():
        code = line.split("#", 1)[0].rstrip()
        if re.match(r"^c(p)?def\s+enum\b.*:\s*$", code):
            in_enum = True
            continue
        if in_enum:
            if code and not code[0].isspace():
                in_enum = False
                continue
            m = re.match(r"^\s+(\w+)\s*=\s*(.+)$", code)
            if m:
                assert m.group(1) not in consts, f"{m.group(1)} defined twice in _wire.pxd"
                consts[m.group(1)] = _eval_int(m.group(2))
    return consts


PXD_CONSTANTS = parse_pxd(PXD.read_text())


def test_the_parser_finds_the_constants():
    # Guards the comparison below against a parser that silently finds nothing.
    assert len(PXD_CONSTANTS) > 80
    for name in ("NBDMAGIC", "OLDSTYLE_MAGIC", "IHAVEOPT", "OPTION_REPLY_MAGIC",
                 "REQUEST_MAGIC", "MAX_PAYLOAD", "CMD_BLOCK_STATUS", "REP_ERR_TOO_BIG",
                 "NBD_ESHUTDOWN", "FLAG_SEND_FAST_ZERO"):
        assert name in PXD_CONSTANTS


def test_parser_on_a_sample():
    sample = '''
cdef extern from *:
    """
    #define FLEXNBD_A  0x10ULL
    """
    const uint64_t A "FLEXNBD_A"
cpdef enum:
    B = 1 << 3   # a comment
    # only a comment
    C = 32 * 1024

    D = 0x80000001
cdef int e = 5
'''
    assert parse_pxd(sample) == {"A": 16, "B": 8, "C": 32768, "D": 0x80000001}


@pytest.mark.parametrize("name", sorted(PXD_CONSTANTS))
def test_every_pxd_constant_reaches_python_with_its_value(name):
    # A constant added to _wire.pxd outside a cpdef enum must be exported by _wire.pyx too.
    assert hasattr(wire, name), f"{name} is in _wire.pxd but not in flexnbd.wire"
    assert getattr(wire, name) == PXD_CONSTANTS[name], name


# The values of the NBD protocol (NBD-PROTOCOL.md), written independently of both files.
PROTOCOL = {
    "NBDMAGIC": int.from_bytes(b"NBDMAGIC", "big"),
    "OLDSTYLE_MAGIC": 0x0000420281861253,
    "IHAVEOPT": int.from_bytes(b"IHAVEOPT", "big"),
    "OPTION_REPLY_MAGIC": 0x0003E889045565A9,
    "REQUEST_MAGIC": 0x25609513,
    "SIMPLE_REPLY_MAGIC": 0x67446698,
    "STRUCTURED_REPLY_MAGIC": 0x668E33EF,
    "REQUEST_SIZE": 28, "SIMPLE_REPLY_SIZE": 16, "CHUNK_HEADER_SIZE": 20,
    "OLDSTYLE_GREETING_SIZE": 152, "MAX_PAYLOAD": 32 << 20,
    "FLAG_FIXED_NEWSTYLE": 1, "FLAG_NO_ZEROES": 2, "FLAG_C_FIXED_NEWSTYLE": 1,
    "FLAG_C_NO_ZEROES": 2,
    "FLAG_HAS_FLAGS": 1, "FLAG_READ_ONLY": 2, "FLAG_SEND_FLUSH": 4, "FLAG_SEND_FUA": 8,
    "FLAG_ROTATIONAL": 16, "FLAG_SEND_TRIM": 32, "FLAG_SEND_WRITE_ZEROES": 64,
    "FLAG_SEND_DF": 128, "FLAG_CAN_MULTI_CONN": 256, "FLAG_SEND_CACHE": 1024,
    "FLAG_SEND_FAST_ZERO": 2048,
    "CMD_READ": 0, "CMD_WRITE": 1, "CMD_DISC": 2, "CMD_FLUSH": 3, "CMD_TRIM": 4,
    "CMD_CACHE": 5, "CMD_WRITE_ZEROES": 6, "CMD_BLOCK_STATUS": 7,
    "CMD_FLAG_FUA": 1, "CMD_FLAG_NO_HOLE": 2, "CMD_FLAG_DF": 4, "CMD_FLAG_REQ_ONE": 8,
    "CMD_FLAG_FAST_ZERO": 16,
    "REPLY_FLAG_DONE": 1, "REPLY_TYPE_NONE": 0, "REPLY_TYPE_OFFSET_DATA": 1,
    "REPLY_TYPE_OFFSET_HOLE": 2, "REPLY_TYPE_BLOCK_STATUS": 5, "REPLY_TYPE_ERROR": 32769,
    "REPLY_TYPE_ERROR_OFFSET": 32770,
    "OPT_EXPORT_NAME": 1, "OPT_ABORT": 2, "OPT_LIST": 3, "OPT_STARTTLS": 5, "OPT_INFO": 6,
    "OPT_GO": 7, "OPT_STRUCTURED_REPLY": 8, "OPT_LIST_META_CONTEXT": 9,
    "OPT_SET_META_CONTEXT": 10,
    "REP_ACK": 1, "REP_SERVER": 2, "REP_INFO": 3, "REP_META_CONTEXT": 4,
    "REP_ERR_UNSUP": 2**31 + 1, "REP_ERR_POLICY": 2**31 + 2, "REP_ERR_INVALID": 2**31 + 3,
    "REP_ERR_PLATFORM": 2**31 + 4, "REP_ERR_TLS_REQD": 2**31 + 5, "REP_ERR_UNKNOWN": 2**31 + 6,
    "REP_ERR_SHUTDOWN": 2**31 + 7, "REP_ERR_BLOCK_SIZE_REQD": 2**31 + 8,
    "REP_ERR_TOO_BIG": 2**31 + 9,
    "INFO_EXPORT": 0, "INFO_NAME": 1, "INFO_DESCRIPTION": 2, "INFO_BLOCK_SIZE": 3,
    "STATE_HOLE": 1, "STATE_ZERO": 2,
    "NBD_EPERM": 1, "NBD_EIO": 5, "NBD_ENOMEM": 12, "NBD_EINVAL": 22, "NBD_ENOSPC": 28,
    "NBD_EBADMSG": 74, "NBD_EOVERFLOW": 75, "NBD_ENOTSUP": 95, "NBD_ESHUTDOWN": 108,
}


@pytest.mark.parametrize("name", sorted(PROTOCOL))
def test_protocol_values(name):
    assert getattr(wire, name) == PROTOCOL[name]
    assert PXD_CONSTANTS.get(name) == PROTOCOL[name]


def test_derived_constants():
    assert wire.OLDSTYLE_FLAGS == 13
    assert (wire.BLOCK_SIZE_MIN, wire.BLOCK_SIZE_PREFERRED, wire.BLOCK_SIZE_MAX) == (
        1, 4096, 32 << 20)
    assert wire.MIRROR_COOKIE.to_bytes(8, "big") == b".MIRROR."
    assert wire.OPTION_HEADER_SIZE == 16
    assert wire.OPTION_REPLY_HEADER_SIZE == 20
    assert wire.NEWSTYLE_GREETING_SIZE == 18
    for value, name in wire.ERROR_NAMES.items():
        assert getattr(wire, "NBD_" + name) == value
    assert set(wire.ERROR_NAMES) == {v for k, v in vars(wire).items() if k.startswith("NBD_E")}


# -- pack/unpack helpers -----------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(type=u16, offset=u64, length=u32, cookie=u64, flags=u16, magic=u32)
def test_request_round_trip(type, offset, length, cookie, flags, magic):
    data = wire.pack_request(type, offset, length, cookie, flags, magic)
    assert len(data) == wire.REQUEST_SIZE
    assert data == struct.pack(">IHHQQI", magic, flags, type, cookie, offset, length)
    assert wire.unpack_request(data) == wire.Request(magic, flags, type, cookie, offset, length)


def test_request_layout():
    data = wire.pack_request(wire.CMD_WRITE, offset=0x0102030405060708, length=0x0A0B0C0D,
                             cookie=0x1112131415161718, flags=wire.CMD_FLAG_FUA)
    assert data.hex() == ("25609513" "0001" "0001" "1112131415161718" "0102030405060708"
                          "0a0b0c0d")


@given(error=u32, cookie=u64)
def test_simple_reply_round_trip(error, cookie):
    data = wire.pack_simple_reply(error, cookie)
    assert len(data) == wire.SIMPLE_REPLY_SIZE
    assert data[:4] == bytes.fromhex("67446698")
    assert wire.unpack_simple_reply(data) == (wire.SIMPLE_REPLY_MAGIC, error, cookie)


@given(flags=u16, type=u16, cookie=u64, length=u32)
def test_chunk_header_round_trip(flags, type, cookie, length):
    data = wire.pack_chunk_header(flags, type, cookie, length)
    assert len(data) == wire.CHUNK_HEADER_SIZE
    assert data[:4] == bytes.fromhex("668e33ef")
    assert wire.unpack_chunk_header(data) == wire.ChunkHeader(
        wire.STRUCTURED_REPLY_MAGIC, flags, type, cookie, length)


@given(option=u32, data=st.binary(max_size=300))
def test_option_round_trip(option, data):
    packed = wire.pack_option(option, data)
    assert packed[:8] == b"IHAVEOPT"
    assert wire.unpack_option_header(packed[:wire.OPTION_HEADER_SIZE]) == (
        wire.IHAVEOPT, option, len(data))
    assert packed[wire.OPTION_HEADER_SIZE:] == data


@given(option=u32, reply_type=u32, data=st.binary(max_size=300))
def test_option_reply_round_trip(option, reply_type, data):
    packed = wire.pack_option_reply(option, reply_type, data)
    assert wire.unpack_option_reply_header(packed[:wire.OPTION_REPLY_HEADER_SIZE]) == (
        wire.OPTION_REPLY_MAGIC, option, reply_type, len(data))
    assert packed[wire.OPTION_REPLY_HEADER_SIZE:] == data
    assert wire.is_error_reply(reply_type) == (reply_type >= 2**31)


@given(size=u64, flags=u32)
def test_oldstyle_greeting(size, flags):
    data = wire.pack_oldstyle_greeting(size, flags)
    assert len(data) == wire.OLDSTYLE_GREETING_SIZE == 152
    assert data[:8] == b"NBDMAGIC"
    assert data[8:16] == bytes.fromhex("0000420281861253")
    assert struct.unpack(">QI", data[16:28]) == (size, flags)
    assert data[28:] == bytes(124)


def test_newstyle_greeting():
    data = wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES)
    assert data == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_error_replies():
    assert wire.is_error_reply(wire.REP_ERR_UNSUP)
    assert wire.is_error_reply(wire.REP_ERR_TOO_BIG)
    assert not wire.is_error_reply(wire.REP_ACK)
    assert not wire.is_error_reply(wire.REP_META_CONTEXT)

"""Request decoding and validation (``_core.decode_request``): a pure function, tested with bytes.

Every rule of SPEC section 3, the range check near 2^64 (the 0.5.0 overflow), and a property:
the result equals a small Python reference implementation of the rules.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from flexnbd import _core, wire
from tests.support.nbdmodel import expected_error

EPERM, EINVAL, ENOSPC, EBADMSG = wire.NBD_EPERM, wire.NBD_EINVAL, wire.NBD_ENOSPC, wire.NBD_EBADMSG
MAX = wire.MAX_PAYLOAD
U64 = 2**64

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    wire.CMD_READ, wire.CMD_WRITE, wire.CMD_DISC, wire.CMD_FLUSH, wire.CMD_TRIM, wire.CMD_CACHE,
    wire.CMD_WRITE_ZEROES, wire.CMD_BLOCK_STATUS)
ALL_COMMANDS = (READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS)
RANGED = (READ, WRITE, TRIM, CACHE, WZ, BS)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = (
    wire.CMD_FLAG_FUA, wire.CMD_FLAG_NO_HOLE, wire.CMD_FLAG_DF, wire.CMD_FLAG_REQ_ONE,
    wire.CMD_FLAG_FAST_ZERO)

SIZE = 1 << 20


def decode(type=READ, offset=0, length=512, flags=0, size=SIZE, magic=wire.REQUEST_MAGIC,
           cookie=0x0102030405060708, **opts):
    data = wire.pack_request(type, offset, length, cookie, flags, magic)
    return _core.decode_request(data, size, **opts)


def err(*args, **kwargs) -> int:
    return decode(*args, **kwargs)[0]


# Options under which every command and flag is at its most permissive.
PERMISSIVE = dict(structured=True, meta_context=True, fast_zero=True)


# -- decoding ----------------------------------------------------------------------------------

def test_fields_are_decoded():
    error, req = decode(WZ, offset=0x1000, length=0x200, flags=NO_HOLE | FUA,
                        cookie=0xDEADBEEFCAFEF00D)
    assert error == 0
    assert req.magic == wire.REQUEST_MAGIC
    assert req.flags == NO_HOLE | FUA
    assert req.type == WZ
    assert req.offset == 0x1000
    assert req.length == 0x200
    # The cookie is opaque: its 8 bytes as they came, read big-endian (as wire.Request has it).
    assert req.cookie == 0xDEADBEEFCAFEF00D


def test_cookie_with_zero_bytes_is_kept_whole():
    _, req = decode(cookie=0x0000000100000000)
    assert req.cookie == 0x0000000100000000
    _, req = decode(cookie=0)
    assert req.cookie == 0


@pytest.mark.parametrize("n", [0, 27, 29, 56])
def test_wrong_length_is_refused(n):
    with pytest.raises(ValueError):
        _core.decode_request(b"\0" * n, SIZE)


# -- magic -------------------------------------------------------------------------------------

@pytest.mark.parametrize("magic", [0, 0x25609512, 0x13956025, wire.SIMPLE_REPLY_MAGIC,
                                   0xFFFFFFFF])
def test_bad_magic_is_ebadmsg(magic):
    error, req = decode(READ, magic=magic)
    assert error == EBADMSG == 74
    assert req.magic == magic
    # The cookie is still decoded: the EBADMSG reply carries it.
    assert req.cookie == 0x0102030405060708


def test_bad_magic_wins_over_everything_else():
    assert err(0xFFFF, offset=U64 - 1, length=2**32 - 1, flags=0xFFFF, magic=0) == EBADMSG


# -- range -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,expected", [(WRITE, ENOSPC), (WZ, ENOSPC), (READ, EINVAL),
                                          (TRIM, EINVAL), (CACHE, EINVAL), (BS, EINVAL)])
def test_beyond_the_end(cmd, expected):
    assert err(cmd, offset=SIZE - 512, length=1024, **PERMISSIVE) == expected
    assert err(cmd, offset=SIZE, length=1, **PERMISSIVE) == expected
    assert err(cmd, offset=SIZE + 512, length=0, **PERMISSIVE) == expected
    assert err(cmd, offset=SIZE * 4, length=512, **PERMISSIVE) == expected


@pytest.mark.parametrize("cmd", RANGED)
def test_within_the_end(cmd):
    assert err(cmd, offset=0, length=SIZE if cmd not in (READ, WRITE) else MAX,
               size=max(SIZE, MAX), **PERMISSIVE) == 0
    assert err(cmd, offset=SIZE - 1, length=1, **PERMISSIVE) == 0
    assert err(cmd, offset=SIZE - 512, length=512, **PERMISSIVE) == 0


@pytest.mark.parametrize("cmd", RANGED)
def test_edge_cases_at_the_end(cmd):
    exp = ENOSPC if cmd in (WRITE, WZ) else EINVAL
    # empty, at the end: fine (but BLOCK_STATUS of nothing is invalid)
    assert err(cmd, offset=SIZE, length=0, **PERMISSIVE) == (EINVAL if cmd == BS else 0)
    assert err(cmd, offset=SIZE - 1, length=1, **PERMISSIVE) == 0
    assert err(cmd, offset=SIZE - 1, length=2, **PERMISSIVE) == exp
    assert err(cmd, offset=0, length=SIZE + 1, **PERMISSIVE) == exp


@pytest.mark.parametrize("cmd", RANGED)
@pytest.mark.parametrize("offset,length", [
    (0xFFFFFFFFFFFFFF00, 0x200),     # the 0.5.0 crash: offset + length wraps to 0x100
    (0xFFFFFFFFFFFFFF00, 0x100),     # wraps to exactly 0
    (U64 - 1, 1),
    (U64 - 1, 0),
    (U64 - 1, 512),
    (2**63, 512),
    (U64 - 512, 512),
    (U64 - SIZE, SIZE),
])
def test_no_overflow_near_2_64(cmd, offset, length):
    exp = ENOSPC if cmd in (WRITE, WZ) else EINVAL
    assert err(cmd, offset=offset, length=length, **PERMISSIVE) == exp


@pytest.mark.parametrize("cmd", [WZ, TRIM, CACHE, BS])
def test_huge_length_overflow(cmd):
    # Lengths that are not capped by the 32 MiB rule still must not overflow.
    exp = ENOSPC if cmd == WZ else EINVAL
    assert err(cmd, offset=U64 - 2**31, length=2**32 - 1, **PERMISSIVE) == exp
    assert err(cmd, offset=1, length=2**32 - 1, size=2**32 - 1, **PERMISSIVE) == exp
    assert err(cmd, offset=0, length=2**32 - 1, size=2**32 - 1, **PERMISSIVE) == 0


def test_export_size_near_2_64():
    big = U64 - 512
    assert err(WRITE, offset=big - 512, length=512, size=big) == 0
    assert err(WRITE, offset=big - 511, length=512, size=big) == ENOSPC
    assert err(READ, offset=big, length=0, size=big) == 0
    assert err(READ, offset=big, length=1, size=big) == EINVAL
    assert err(READ, offset=U64 - 1, length=1, size=U64 - 1) == EINVAL
    assert err(READ, offset=U64 - 2, length=1, size=U64 - 1) == 0


def test_empty_export():
    assert err(READ, offset=0, length=0, size=0) == 0
    assert err(READ, offset=0, length=1, size=0) == EINVAL
    assert err(WRITE, offset=0, length=1, size=0) == ENOSPC
    assert err(FLUSH, size=0) == 0


# -- length cap --------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [READ, WRITE])
def test_read_write_length_cap(cmd):
    big = 1 << 40
    assert err(cmd, offset=0, length=MAX, size=big) == 0
    assert err(cmd, offset=0, length=MAX + 1, size=big) == EINVAL
    assert err(cmd, offset=0, length=2**32 - 1, size=big) == EINVAL


@pytest.mark.parametrize("cmd", [TRIM, CACHE, WZ])
def test_other_commands_are_not_capped(cmd):
    assert err(cmd, offset=0, length=2**32 - 1, size=1 << 40, **PERMISSIVE) == 0


# -- commands and flags ------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [8, 9, 100, 0x7FFF, 0x8000, 0xFFFF])
def test_unknown_command(cmd):
    assert err(cmd, offset=0, length=0, **PERMISSIVE) == EINVAL
    assert err(cmd, offset=0, length=512, **PERMISSIVE) == EINVAL


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
@pytest.mark.parametrize("bit", range(5, 16))
def test_unknown_flag_bits(cmd, bit):
    assert err(cmd, offset=0, length=512 if cmd in RANGED else 0, flags=1 << bit,
               **PERMISSIVE) == EINVAL


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_fua_is_valid_on_every_command(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, offset=0, length=length, flags=FUA, **PERMISSIVE) == 0
    assert err(cmd, offset=0, length=length, flags=FUA) == (EINVAL if cmd == BS else 0)


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_no_hole_only_on_write_zeroes(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, length=length, flags=NO_HOLE, **PERMISSIVE) == (0 if cmd == WZ else EINVAL)
    assert err(cmd, length=length, flags=NO_HOLE | FUA, **PERMISSIVE) == (
        0 if cmd == WZ else EINVAL)


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_df_only_on_read_with_structured_replies(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, length=length, flags=DF, **PERMISSIVE) == (0 if cmd == READ else EINVAL)
    assert err(cmd, length=length, flags=DF, structured=False, meta_context=True,
               fast_zero=True) == EINVAL


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_req_one_only_on_block_status(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, length=length, flags=REQ_ONE, **PERMISSIVE) == (0 if cmd == BS else EINVAL)


@pytest.mark.parametrize("cmd", ALL_COMMANDS)
def test_fast_zero_only_on_write_zeroes_when_offered(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, length=length, flags=FAST_ZERO, **PERMISSIVE) == (
        0 if cmd == WZ else EINVAL)
    assert err(cmd, length=length, flags=FAST_ZERO, structured=True, meta_context=True,
               fast_zero=False) == EINVAL
    assert err(WZ, length=length, flags=FAST_ZERO | NO_HOLE | FUA, **PERMISSIVE) == 0


def test_block_status_needs_a_meta_context():
    assert err(BS, offset=0, length=512) == EINVAL
    assert err(BS, offset=0, length=512, structured=True) == EINVAL
    assert err(BS, offset=0, length=512, structured=True, meta_context=True) == 0
    assert err(BS, offset=0, length=512, flags=REQ_ONE, structured=True, meta_context=True) == 0


def test_block_status_of_nothing_is_invalid():
    assert err(BS, offset=0, length=0, **PERMISSIVE) == EINVAL
    assert err(BS, offset=0, length=1, **PERMISSIVE) == 0


def test_disc_and_flush():
    assert err(DISC, offset=0, length=0) == 0
    assert err(FLUSH, offset=0, length=0) == 0
    assert err(DISC, flags=NO_HOLE) == EINVAL
    assert err(FLUSH, flags=DF, structured=True) == EINVAL


# -- read-only ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [WRITE, TRIM, WZ])
def test_read_only_refuses_writes(cmd):
    assert err(cmd, offset=0, length=512, read_only=True, **PERMISSIVE) == EPERM
    assert err(cmd, offset=0, length=512, read_only=False, **PERMISSIVE) == 0


@pytest.mark.parametrize("cmd", [READ, CACHE, FLUSH, DISC, BS])
def test_read_only_allows_the_rest(cmd):
    length = 512 if cmd in RANGED else 0
    assert err(cmd, offset=0, length=length, read_only=True, **PERMISSIVE) == 0


def test_read_only_read_errors_are_unchanged():
    assert err(READ, offset=SIZE, length=1, read_only=True) == EINVAL
    assert err(READ, offset=0, length=MAX + 1, size=1 << 40, read_only=True) == EINVAL


# -- the rules as a Python reference (tests/support/nbdmodel.py), compared on random requests --

def _near(values):
    """Values and their close neighbours (the interesting edges)."""
    return st.sampled_from(values).flatmap(
        lambda v: st.integers(max(0, v - 2), min(U64 - 1, v + 2)))


sizes = st.one_of(st.integers(0, 1 << 24), st.sampled_from([0, 512, SIZE, MAX, 1 << 40, U64 - 1,
                                                              U64 - 512]))
offsets = st.one_of(st.integers(0, 1 << 24), st.integers(0, U64 - 1),
                    _near([0, SIZE, 1 << 32, 2**63, U64 - 512, U64 - 1]))
lengths = st.one_of(st.integers(0, 1 << 16), st.integers(0, 2**32 - 1),
                    _near([0, 1, 512, MAX, 2**31, 2**32 - 3]).map(lambda v: min(v, 2**32 - 1)))
flag_values = st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF),
                        st.sampled_from([0, FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO]))
types = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
magics = st.one_of(st.just(wire.REQUEST_MAGIC), st.integers(0, 2**32 - 1))


@settings(max_examples=1000, deadline=None)
@given(magic=magics, flags=flag_values, type=types, offset=offsets, length=lengths, size=sizes,
       read_only=st.booleans(), structured=st.booleans(), meta_context=st.booleans(),
       fast_zero=st.booleans(), cookie=st.integers(0, U64 - 1))
@example(magic=wire.REQUEST_MAGIC, flags=0, type=WRITE, offset=0xFFFFFFFFFFFFFF00, length=0x200,
         size=SIZE, read_only=False, structured=False, meta_context=False, fast_zero=False,
         cookie=1)
@example(magic=wire.REQUEST_MAGIC, flags=0, type=READ, offset=SIZE, length=0, size=SIZE,
         read_only=True, structured=False, meta_context=False, fast_zero=False, cookie=1)
@example(magic=wire.REQUEST_MAGIC, flags=0, type=BS, offset=0, length=0, size=SIZE,
         read_only=False, structured=True, meta_context=True, fast_zero=False, cookie=1)
def test_matches_the_reference(magic, flags, type, offset, length, size, read_only, structured,
                               meta_context, fast_zero, cookie):
    assume(not (structured is False and meta_context is True))  # meta context needs structured
    data = wire.pack_request(type, offset, length, cookie, flags, magic)
    error, req = _core.decode_request(data, size, read_only=read_only, structured=structured,
                                      meta_context=meta_context, fast_zero=fast_zero)
    assert error == expected_error(magic, flags, type, offset, length, size, read_only, structured,
                              meta_context, fast_zero)
    assert (req.magic, req.flags, req.type, req.offset, req.length) == (
        magic, flags, type, offset, length)
    assert req.cookie == cookie

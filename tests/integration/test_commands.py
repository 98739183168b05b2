"""The commands as SPEC §3 has them, with a raw client: FUA WRITE, FLUSH, DISC, TRIM,
WRITE_ZEROES (NO_HOLE, FAST_ZERO), structured READs, and the export size."""

from __future__ import annotations

import os

import pytest

from flexnbd import wire
from tests.support.serving import (
    CACHE,
    EINVAL,
    ENOSPC,
    FLUSH,
    READ,
    STYLES,
    TRIM,
    WZ,
    MiB,
    assert_closed_after,
    client,
    content,
)


@pytest.mark.parametrize("style", STYLES)
def test_fua_write_flush_and_read_back(serve, make_file, style):
    path = make_file(MiB)
    server = serve(path, *style)
    data = os.urandom(8192)
    with client(server) as c:
        assert c.write(4096, data, flags=wire.CMD_FLAG_FUA) == 0
        assert c.read(4096, 8192) == data
        assert content(path, 4096, 8192) == data
        more = os.urandom(1000)
        assert c.write(MiB - 1000, more) == 0
        assert c.request(FLUSH).error == 0
        assert c.request(FLUSH, flags=wire.CMD_FLAG_FUA).error == 0
        assert content(path, MiB - 1000) == more
        assert c.read(MiB - 1000, 1000) == more
        assert c.write(0, b"") == 0
        c.disconnect()
        assert_closed_after(c)
    assert os.path.getsize(path) == MiB


def test_disc_closes_without_a_reply(serve, make_file):
    server = serve(make_file(MiB))
    with client(server) as c:
        c.disconnect()
        assert_closed_after(c)


@pytest.mark.parametrize("structured", [False, True])
def test_trim_and_write_zeroes(serve, make_file, structured):
    path = make_file(4 * MiB)
    before = content(path)
    server = serve(path)
    with client(server, structured=structured) as c:
        assert c.flags & wire.FLAG_SEND_TRIM and c.flags & wire.FLAG_SEND_WRITE_ZEROES
        # WRITE_ZEROES (punches a hole), aligned
        assert c.request(WZ, MiB, 256 * 1024).error == 0
        assert c.read(MiB, 256 * 1024) == bytes(256 * 1024)
        # ... and unaligned, with FUA
        assert c.request(WZ, 100, 5000, flags=wire.CMD_FLAG_FUA).error == 0
        assert c.read(0, 8192) == before[:100] + bytes(5000) + before[5100:8192]
        # NO_HOLE: zeroes written or allocated
        for offset, length in [(2 * MiB, 128 * 1024), (3 * MiB + 17, 999)]:
            assert c.request(WZ, offset, length, flags=wire.CMD_FLAG_NO_HOLE).error == 0
            assert c.read(offset, length) == bytes(length)
        if c.flags & wire.FLAG_SEND_FAST_ZERO:
            reply = c.request(WZ, 1536 * 1024, 64 * 1024, flags=wire.CMD_FLAG_FAST_ZERO)
            assert reply.error == 0
            assert c.read(1536 * 1024, 64 * 1024) == bytes(64 * 1024)
        assert c.request(WZ, 0, 0).error == 0
        # TRIM: answered; the data around it is intact
        assert c.request(TRIM, 2 * MiB + 512 * 1024, 256 * 1024).error == 0
        assert c.request(TRIM, 0, 0).error == 0
        assert c.request(CACHE, 0, MiB).error == 0
        assert c.request(FLUSH).error == 0
        assert c.read(3 * MiB + 1024 * 64, 4096) == before[3 * MiB + 65536:3 * MiB + 69632]
        c.disconnect()
    after = content(path)
    assert len(after) == 4 * MiB
    assert after[MiB:MiB + 256 * 1024] == bytes(256 * 1024)
    assert after[2 * MiB:2 * MiB + 128 * 1024] == bytes(128 * 1024)
    assert after[:100] == before[:100] and after[5100:MiB] == before[5100:MiB]
    # WRITE_ZEROES without NO_HOLE punches a hole: the aligned range is no longer allocated.
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB
    finally:
        os.close(fd)


@pytest.mark.parametrize("style", STYLES)
def test_fast_zero_only_when_advertised(serve, make_file, style):
    path = make_file(MiB)
    before = content(path)
    server = serve(path, *style)
    with client(server) as c:
        reply = c.request(WZ, 0, 64 * 1024, flags=wire.CMD_FLAG_FAST_ZERO)
        if c.flags & wire.FLAG_SEND_FAST_ZERO:
            assert reply.error in (0, wire.NBD_ENOTSUP)
        else:
            # Not advertised (oldstyle never advertises it): the flag is not valid here.
            assert reply.error == EINVAL
            assert c.read(0, 64 * 1024) == before[:64 * 1024]


@pytest.mark.parametrize("style", STYLES)
def test_export_size_is_rounded_down_to_512(serve, make_file, style):
    path = make_file(1535)
    server = serve(path, *style)
    with client(server) as c:
        assert c.size == 1024
        assert c.read(0, 1024) == content(path, 0, 1024)
        assert c.read(1023, 1) == content(path, 1023, 1)
        assert c.request(READ, 1024, 1).error == EINVAL
        assert c.request(READ, 1000, 100).error == EINVAL
        assert c.write(1024, b"x") == ENOSPC
        assert c.write(1023, b"y") == 0
        assert c.read(1016, 8) == content(path, 1016, 7) + b"y"
    assert os.path.getsize(path) == 1535


def test_structured_read(serve, make_file):
    path = make_file(MiB)
    server = serve(path)
    with client(server, structured=True) as c:
        assert c.flags & wire.FLAG_SEND_DF
        reply = c.request(READ, 4096, 65536)
        assert reply.structured and reply.error == 0
        assert reply.data == content(path, 4096, 65536)
        assert c.read(0, 4096, flags=wire.CMD_FLAG_DF) == content(path, 0, 4096)
        reply = c.request(READ, MiB, 1)
        assert reply.structured and reply.error == EINVAL
        assert c.request(READ, 0, 0).error == 0
        assert c.read(MiB - 1, 1) == content(path, MiB - 1, 1)

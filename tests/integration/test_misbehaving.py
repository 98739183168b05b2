"""A real `flexnbd serve` against scripted misbehaving clients (tests/support/rawclient.py).

SPEC sections 2, 3 and 10: errors keep the stream in sync, bad clients end only their own
connection, the server never dies, and the client limit. (Commands, read-only, signals and
the log format have files of their own.)
"""

from __future__ import annotations

import struct

import pytest

from flexnbd import wire
from tests.support.hostile import rss_kib
from tests.support.rawclient import RawClient, ServerClosed
from tests.support.serving import (
    BS,
    CACHE,
    EBADMSG,
    EINVAL,
    ENOSPC,
    FLUSH,
    MAX,
    READ,
    STYLES,
    TRIM,
    WRITE,
    WZ,
    MiB,
    assert_closed_after,
    assert_serves,
    big_file,
    client,
    content,
    problem_lines_about,
    wait_for_problem_line,
)
from tests.support.waiting import wait_until

# -- bad magic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("cmd,length", [(READ, 512), (WRITE, 512), (FLUSH, 0)])
def test_bad_magic_gets_ebadmsg_then_close(serve, make_file, style, cmd, length):
    path = make_file(MiB)
    server = serve(path, *style)
    other = client(server)
    with client(server) as c:
        assert c.read(0, 512) == content(path, 0, 512)
        cookie = 0x0BADC0DE12345678
        c.send_request(cmd, 0, length, cookie=cookie, magic=0x12345678)
        reply = c.recv_reply()
        assert (reply.error, reply.cookie) == (EBADMSG, cookie)
        assert_closed_after(c)
    # The others carry on.
    with other:
        assert other.read(4096, 4096) == content(path, 4096, 4096)
    assert_serves(server, path)


# -- garbage instead of a handshake ------------------------------------------------------------

GARBAGE = [
    pytest.param(struct.pack(">I", 0x4), id="flag-bit-2"),
    pytest.param(struct.pack(">I", 0x80000003), id="flag-bit-31"),
    pytest.param(struct.pack(">I", 0xFFFFFFFF) + bytes(40), id="all-flags"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    pytest.param(bytes.fromhex("8badf00d") + bytes(range(256)) * 4, id="random-ish"),
    # Valid client flags, then a bad option magic.
    pytest.param(struct.pack(">I", 1) + b"IHAVEOPS" + struct.pack(">II", 7, 0), id="opt-magic"),
    # Valid client flags, then an option that claims 2 GiB of data.
    pytest.param(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, 2**31),
                 id="opt-length"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_handshake_newstyle(serve, make_file, garbage):
    path = make_file(MiB)
    server = serve(path)
    with RawClient.connect(server.port) as c:
        assert c.read_greeting().style == "newstyle"
        c.send(garbage)
        assert_closed_after(c)
    assert_serves(server, path)


def test_garbage_after_the_oldstyle_greeting(serve, make_file):
    path = make_file(MiB)
    server = serve(path, "--oldstyle")
    with RawClient.connect(server.port) as c:
        assert c.read_greeting().style == "oldstyle"
        c.send(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        data = c.read_until_closed()
        # At most the EBADMSG answer to the "request" the garbage forms, then the close.
        if data:
            assert len(data) == 16
            assert wire.unpack_simple_reply(data)[:2] == (wire.SIMPLE_REPLY_MAGIC, EBADMSG)
    assert_serves(server, path)


def test_garbage_and_close_mid_handshake(serve, make_file):
    path = make_file(MiB)
    server = serve(path)
    with RawClient.connect(server.port) as c:
        c.read_greeting()
        c.send(struct.pack(">I", 1) + b"IHAVE")   # half an option header, then gone
    with RawClient.connect(server.port) as c:
        c.reset()                                  # connect and reset at once
    assert_serves(server, path)


# -- options -----------------------------------------------------------------------------------

def test_unknown_options_are_unsupported_and_the_session_goes_on(serve, make_file):
    path = make_file(MiB)
    server = serve(path)
    with RawClient.connect(server.port) as c:
        c.read_greeting()
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        for option, data in [(42, b""), (wire.OPT_STARTTLS, b""), (99, b"some data" * 10)]:
            replies = c.option(option, data)
            assert [(r.option, r.type) for r in replies] == [(option, wire.REP_ERR_UNSUP)]
        assert c.option(wire.OPT_LIST, b"x")[-1].type == wire.REP_ERR_INVALID
        info = c.option(wire.OPT_INFO, c.info_request(b"", (wire.INFO_BLOCK_SIZE,)))
        assert info[-1].type == wire.REP_ACK
        block = [r.data for r in info if r.type == wire.REP_INFO and r.data[:2] == b"\0\3"]
        assert block == [struct.pack(">HIII", 3, 1, 4096, 32 * MiB)]
        c.go()
        assert c.size == MiB
        assert c.read(0, 4096) == content(path, 0, 4096)


def test_list_and_abort(serve, make_file):
    server = serve(make_file(MiB))
    with RawClient.connect(server.port) as c:
        c.read_greeting()
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        replies = c.option(wire.OPT_LIST)
        assert [r.type for r in replies] == [wire.REP_SERVER, wire.REP_ACK]
        assert replies[0].data[:4] == b"\0\0\0\0"
        assert [r.type for r in c.option(wire.OPT_ABORT)] == [wire.REP_ACK]
        assert_closed_after(c)


# -- range errors keep the stream in sync ------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
def test_write_near_2_64_is_enospc_and_drained(serve, make_file, style):
    path = make_file(MiB)
    before = content(path)
    server = serve(path, *style)
    with client(server) as c:
        # The payload looks like requests: if it were not drained, they would be answered.
        payload = (c.pack(READ, 0, 16, cookie=0xEEEE) * 19)[:512]
        cookie = c.send_request(WRITE, 0xFFFFFFFFFFFFFF00, 512, payload=payload)
        reply = c.recv_reply()
        assert (reply.error, reply.cookie) == (ENOSPC, cookie)
        # The next request on the same connection is answered correctly.
        assert c.read(0, 4096) == before[:4096]
        for offset, length in [(2**64 - 1, 1), (2**64 - 512, 512), (2**63, 512), (MiB, 1),
                               (MiB - 511, 512)]:
            assert c.write(offset, b"\xab" * length) == ENOSPC
            reply = c.request(WZ, offset, length)
            assert reply.error == ENOSPC
        assert c.read(MiB - 4096, 4096) == before[-4096:]
        c.disconnect()
    assert content(path) == before
    assert_serves(server, path)


@pytest.mark.parametrize("style", STYLES)
def test_read_past_end_is_einval(serve, make_file, style):
    path = make_file(MiB)
    server = serve(path, *style)
    with client(server) as c:
        for offset, length in [(MiB - 512, 1024), (MiB, 1), (MiB + 4096, 512),
                               (0xFFFFFFFFFFFFFF00, 512), (2**64 - 1, 1), (0, MiB + 1)]:
            reply = c.request(READ, offset, length)
            assert reply.error == EINVAL, (offset, length)   # not ENOSPC (0.5.0 defect)
            assert reply.data == b""
        for cmd in (TRIM, CACHE):
            assert c.request(cmd, MiB - 512, 1024).error == EINVAL
        assert c.read(MiB - 512, 512) == content(path, MiB - 512, 512)
        assert c.request(READ, MiB, 0).error == 0


def test_read_over_32_mib_is_einval(serve, make_file):
    path = big_file(make_file, 40 * MiB)
    server = serve(path)
    with client(server) as c:
        for length in (MAX + 1, MAX + 512, 2**32 - 1):
            reply = c.request(READ, 0, length)
            assert reply.error == EINVAL and reply.data == b""
        assert c.read(0, 4096) == content(path, 0, 4096)
        # Exactly 32 MiB is fine.
        assert c.read(MiB, MAX) == content(path, MiB, MAX)


@pytest.mark.parametrize("style", STYLES)
def test_write_over_32_mib_is_einval_and_drained(serve, make_file, style):
    path = big_file(make_file, 40 * MiB)
    before = content(path, 0, 2 * MiB)
    server = serve(path, *style)
    with client(server) as c:
        # A payload of request-lookalikes: any not drained would be answered.
        unit = c.pack(WRITE, 0, 0, cookie=0xEEEE)
        payload = (unit * ((MAX + 1) // len(unit) + 1))[:MAX + 1]
        cookie = c.send_request(WRITE, 0, MAX + 1, payload=payload)
        reply = c.recv_reply()
        assert (reply.error, reply.cookie) == (EINVAL, cookie)
        assert c.read(0, 2 * MiB) == before
        assert c.write(4096, b"\x5a" * 4096) == 0
        assert c.read(4096, 4096) == b"\x5a" * 4096
    assert_serves(server, path, 0, 8192)


@pytest.mark.parametrize("style", STYLES)
def test_write_claiming_4_gib_without_payload(serve, make_file, style):
    path = make_file(MiB)
    server = serve(path, *style)
    with client(server) as c:
        assert c.read(0, 512) == content(path, 0, 512)
        cookie = c.send_request(WRITE, 0, 0xFFFFFFFF)
        # The server answers (EINVAL) and/or disconnects; it does not wait for 4 GiB.
        data = c.read_until_closed()
        if data:
            assert len(data) == 16
            assert wire.unpack_simple_reply(data) == (wire.SIMPLE_REPLY_MAGIC, EINVAL, cookie)
    assert rss_kib(server.pid) < 500 * 1024
    assert_serves(server, path)
    assert rss_kib(server.pid) < 500 * 1024


# -- unknown commands and flags ----------------------------------------------------------------

@pytest.mark.parametrize("style", STYLES)
def test_unknown_commands_and_flags_are_einval(serve, make_file, style):
    path = make_file(MiB)
    before = content(path)
    server = serve(path, *style)
    with client(server) as c:
        bad = [
            (8, 0, 0, 0), (8, 0, 512, 0), (0xFFFF, 0, 0, 0), (0x8000, 4096, 4096, 0),
            (READ, 0, 512, 1 << 5), (READ, 0, 512, 0x8000), (READ, 0, 512, 0xFFFF),
            (READ, 0, 512, wire.CMD_FLAG_NO_HOLE), (READ, 0, 512, wire.CMD_FLAG_REQ_ONE),
            (READ, 0, 512, wire.CMD_FLAG_DF),            # DF needs structured replies
            (READ, 0, 512, wire.CMD_FLAG_FAST_ZERO),
            (FLUSH, 0, 0, wire.CMD_FLAG_NO_HOLE), (TRIM, 0, 512, wire.CMD_FLAG_DF),
            (CACHE, 0, 512, 1 << 7), (WZ, 0, 512, 1 << 9), (WZ, 0, 512, wire.CMD_FLAG_DF),
            (BS, 0, 512, 0),                             # no meta context selected
        ]
        # Pipelined: all sent at once, answered in order.
        stream = b"".join(c.pack(t, o, n, cookie=1000 + i, flags=f)
                          for i, (t, o, n, f) in enumerate(bad))
        c.send(stream)
        for i, (t, _, n, _) in enumerate(bad):
            reply = c.recv_reply(n if t == READ else None)
            assert (reply.cookie, reply.error) == (1000 + i, EINVAL), bad[i]
        # A WRITE with a bad flag: EINVAL, its payload drained, the file untouched.
        payload = (c.pack(READ, 0, 8, cookie=0xEEEE) * 300)[:8192]
        for flags in (1 << 6, wire.CMD_FLAG_NO_HOLE, wire.CMD_FLAG_DF, wire.CMD_FLAG_REQ_ONE):
            reply = c.request(WRITE, 0, 8192, flags=flags, payload=payload)
            assert reply.error == EINVAL, flags
        assert c.read(0, 8192) == before[:8192]
        c.disconnect()
    assert content(path) == before
    assert_serves(server, path)


# -- read-only ---------------------------------------------------------------------------------


# -- clients that vanish mid-request ------------------------------------------------------------


def test_client_vanishing_mid_read(serve, make_file):
    path = big_file(make_file, 40 * MiB, head=2 * MiB)
    server = serve(path)
    other = client(server)
    assert other.read(0, MiB) == content(path, 0, MiB)
    c = RawClient.connect(server.port, rcvbuf=16 * 1024)
    c.handshake()
    name = c.local_name
    cookie = c.send_request(READ, 0, MAX)
    head = c.recv_exact(16 + 8192)
    assert wire.unpack_simple_reply(head[:16]) == (wire.SIMPLE_REPLY_MAGIC, 0, cookie)
    assert head[16:] == content(path, 0, 8192)
    c.reset()
    lines = wait_for_problem_line(server, name)
    # The other client carries on, with correct data.
    assert other.read(MiB, MiB) == content(path, MiB, MiB)
    assert other.write(4096, b"\x11" * 4096) == 0
    assert other.read(0, 8192) == content(path, 0, 8192)
    assert_serves(server, path, 0, MiB)
    lines = problem_lines_about(server, name)
    assert len(lines) == 1, lines
    assert "READ" in lines[0], lines
    assert "Traceback" not in server.log()
    other.close()


@pytest.mark.parametrize("claimed,sent", [(4096, 100), (4096, 0), (MiB, 64 * 1024),
                                          (8 * MiB, 3 * MiB)])
def test_client_vanishing_mid_write(serve, make_file, claimed, sent):
    path = big_file(make_file, 16 * MiB, head=16 * MiB)
    server = serve(path)
    other = client(server)
    assert other.read(12 * MiB, MiB) == content(path, 12 * MiB, MiB)
    c = client(server)
    name = c.local_name
    c.send_request(WRITE, 0, claimed, payload=b"\x77" * sent)
    c.reset()
    lines = wait_for_problem_line(server, name)
    assert other.read(12 * MiB, MiB) == content(path, 12 * MiB, MiB)
    assert other.write(12 * MiB, b"\x22" * 4096) == 0
    assert other.read(12 * MiB, 8192) == content(path, 12 * MiB, 8192)
    assert_serves(server, path, 12 * MiB, MiB)
    lines = problem_lines_about(server, name)
    assert len(lines) == 1, lines
    assert "WRITE" in lines[0], lines
    assert "Traceback" not in server.log()
    other.close()


# -- the client limit ------------------------------------------------------------------------

def connect_counted(port: int) -> RawClient:
    """Connect a client that is let in. The port probe of the fixture, or a client just closed,
    may still count for a moment: a connection closed at once without a byte is retried."""
    def attempt():
        c = RawClient.connect(port)
        try:
            c.handshake()
            return c
        except ServerClosed as e:
            c.close()
            assert e.got == b"", "closed part-way through the greeting"
            return None
    c = wait_until(attempt, timeout=10)
    assert c is not None, "not let in"
    return c


@pytest.mark.parametrize("style", STYLES)
def test_sixteen_clients_and_the_seventeenth(serve, make_file, style):
    path = make_file(MiB)
    server = serve(path, *style, "--max-clients-per-address", "16")   # all from 127.0.0.1
    clients = []
    try:
        for _ in range(16):
            clients.append(connect_counted(server.port))
        for i, c in enumerate(clients):
            assert c.read(i * 4096, 4096) == content(path, i * 4096, 4096)
        # The 17th is accepted and closed at once, with nothing written.
        for _ in range(3):
            with RawClient.connect(server.port) as extra:
                assert extra.read_until_closed() == b""
        for i, c in enumerate(clients):
            assert c.read(i * 4096, 4096) == content(path, i * 4096, 4096)
        # One leaves: there is room for another.
        clients.pop().disconnect()
        clients.append(connect_counted(server.port))
        assert clients[-1].read(0, 4096) == content(path, 0, 4096)
    finally:
        for c in clients:
            c.close()
    assert_serves(server, path)


# -- signals -----------------------------------------------------------------------------------


# -- commands ----------------------------------------------------------------------------------


# -- logging -----------------------------------------------------------------------------------


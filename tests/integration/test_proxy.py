"""flexnbd-proxy (SPEC 7) with real clients and real processes on 127.0.0.1: qemu-img, qemu-io,
nbdinfo, nbdcopy, libnbd's Python binding and nbd-client through the proxy in front of a real
`flexnbd serve`; the proxy's own behaviour (handshake styles on both sides, a Unix socket, one
client at a time, DISC kept from upstream, signals, bad command lines, an unreachable upstream);
and the read-ahead cache (--cache), observed through the requests a fake upstream receives.

Every check is on data bytes, exit statuses, what the clients report and what upstream was
asked; none is on timing.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import (
    FLEXNBD_PROXY,
    FlexnbdProcess,
    free_port,
    require_tool,
)
from tests.fakes.fakedest import FakeDest, Script
from tests.integration.scripts.patterns import pattern
from tests.support.clients import (
    LIBNBD_READ_ONLY,
    ZEROING_SCRIPT,
    check,
    check_libnbd_aio,
    libnbd,
    libnbd_ops_done,
    libnbd_past_the_end,
    qemu_io,
    run,
    zeroing_done,
)
from tests.support.nbdmodel import DiskModel
from tests.support.rawclient import RawClient
from tests.support.serving import alive

MiB = 1 << 20
KiB = 1024

# (upstream serve options, proxy options): the handshake on each side, and the read-ahead.
SETUPS = {
    "newstyle": ((), ()),
    "cache": ((), ("--cache",)),
    "oldstyle-down": ((), ("--oldstyle",)),
    "oldstyle-up": (("--oldstyle",), ()),
}


def setups(*names: str) -> list:
    return [pytest.param(SETUPS[n], id=n) for n in names]


ALL_SETUPS = setups(*SETUPS)

# The flags nbdinfo/libnbd report that the proxy passes on from upstream as they are.
PASSED_FLAGS = ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_fast_zero",
                "is_read_only")


def qemu_img_size(uri: str) -> int:
    info = json.loads(check([require_tool("qemu-img"), "info", "--output=json", uri]))
    return info["virtual-size"]


def nbdinfo(uri: str) -> dict:
    return json.loads(check([require_tool("nbdinfo"), "--json", uri]))


def start(serve, proxy, make_file, setup, size: int = 2 * MiB, file: Path | None = None,
          proxy_extra: tuple[str, ...] = ()):
    """A file, a real upstream serving it and a proxy in front: (path, server, proxy)."""
    up_extra, px_extra = setup
    path = file if file is not None else make_file(size)
    server = serve(path, *up_extra)
    p = proxy(server.port, *px_extra, *proxy_extra)
    return path, server, p


def connections_logged(server) -> int:
    """How many NBD clients the upstream server has logged as connected (handshake done)."""
    return len(re.findall(r" connected \((?:newstyle|oldstyle)", server.log()))


@pytest.fixture
def proxy_process(tmp_path):
    """proxy_process(args, wait=True, env=None) -> FlexnbdProcess: flexnbd-proxy with exactly
    these arguments (a Unix socket, short options); killed at the end of the test."""
    started: list[FlexnbdProcess] = []

    def begin(args: list[str], wait: bool = True, env: dict | None = None) -> FlexnbdProcess:
        p = FlexnbdProcess(list(args), tmp_path / f"rawproxy{len(started)}.log", env,
                           command=FLEXNBD_PROXY)
        started.append(p)
        if wait:
            p.wait_for_log(" serving ")
        return p
    yield begin
    for p in started:
        p.kill()


def recv_any_reply(c: RawClient, expect: dict) -> tuple[int, int, bytes | None]:
    """One simple reply to any of the pipelined requests in ``expect`` (cookie -> (cmd, read
    length, ...)): (error, cookie, READ data or None)."""
    magic, error, cookie = struct.unpack(">IIQ", c.recv_exact(wire.SIMPLE_REPLY_SIZE))
    assert magic == wire.SIMPLE_REPLY_MAGIC, hex(magic)
    assert cookie in expect, f"reply to unknown cookie {cookie}"
    cmd, length = expect[cookie][:2]
    data = c.recv_exact(length) if cmd == wire.CMD_READ and error == 0 else None
    return error, cookie, data


@pytest.fixture
def fake_upstream(make_file):
    """fake_upstream(size) -> (FakeDest, path): a newstyle NBD server answering from a file and
    recording every request; closed at the end."""
    started: list[FakeDest] = []

    def begin(size: int) -> tuple[FakeDest, Path]:
        path = make_file(size)
        dest = FakeDest(size, path, default=Script(greeting="newstyle"))
        started.append(dest)
        return dest, path
    yield begin
    for dest in started:
        dest.close()


def upstream_reads(dest: FakeDest) -> list[tuple[int, int]]:
    assert len(dest.conns) == 1, "the proxy opened more than one upstream connection"
    return [(r.offset, r.length) for r in list(dest.conns[0].requests)
            if r.type == wire.CMD_READ]


def sequential_reads(port: int, path: Path, length: int, size: int) -> None:
    data = path.read_bytes()
    with RawClient.connect(port) as c:
        c.handshake()
        for off in range(0, size, length):
            n = min(length, size - off)
            assert c.read(off, n) == data[off:off + n], off
        c.disconnect()


# --------------------------------------------------------------------------------------------
# qemu-img and qemu-io through the proxy

@pytest.mark.parametrize("size,exported", [(4 * MiB, 4 * MiB), (1535, 1024),
                                           (3 * MiB + 700, 3 * MiB + 512)])
def test_qemu_img_info_sees_the_upstream_size(serve, proxy, make_file, size, exported):
    _, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], size)
    assert qemu_img_size(p.uri) == exported
    alive(server, p)


@pytest.mark.parametrize("setup", setups("cache", "oldstyle-down", "oldstyle-up"))
def test_qemu_img_info_every_handshake(serve, proxy, make_file, setup):
    _, server, p = start(serve, proxy, make_file, setup, 3 * MiB + 700)
    assert qemu_img_size(p.uri) == 3 * MiB + 512
    alive(server, p)


@pytest.mark.parametrize("setup", ALL_SETUPS)
def test_qemu_io_write_read_patterns(serve, proxy, make_file, setup):
    path, server, p = start(serve, proxy, make_file, setup, 2 * MiB)
    model = bytearray(path.read_bytes())
    # Aligned, unaligned, crossing 4 KiB blocks, tiny, big, up to the last byte of the export.
    writes = [(0xAB, 0, 64 * KiB), (0x11, 1000, 3001), (0x5C, 4095, 2), (0x77, 65537, 1),
              (0x3E, 131071, 200003), (0x01, 1 * MiB, 1 * MiB - 4096), (0xF0, 2 * MiB - 513, 513)]
    commands = []
    for byte, off, length in writes:
        commands += [f"write -P {byte:#x} {off} {length}", f"read -P {byte:#x} {off} {length}"]
        model[off:off + length] = bytes([byte]) * length
    # Small sequential reads across pattern boundaries: the read-ahead's territory.
    for off in range(16 * KiB, 64 * KiB, 2 * KiB):
        commands.append(f"read -P 0xab {off} 2048")
    out = qemu_io(p.uri, *commands)
    assert out.count("wrote ") == len(writes)
    assert path.read_bytes() == bytes(model)
    # A second client (the proxy keeps the upstream connection) reads back the last write and
    # the untouched bytes around it.
    qemu_io(p.uri, f"read -P 0xf0 {2 * MiB - 513} 513", "read -P 0x01 1048576 512",
            f"read -P 0x3e {131071 + 200000} 3")
    alive(server, p)


@pytest.mark.parametrize("setup", ALL_SETUPS)
def test_qemu_io_zeroes_discard_flush_fua(serve, proxy, make_file, setup):
    path, server, p = start(serve, proxy, make_file, setup, 1 * MiB)
    original = path.read_bytes()
    model = bytearray(original)
    # (the first read fills the read-ahead just before the zeroing)
    qemu_io(p.uri, "read 61440 4096", *ZEROING_SCRIPT)
    zeroing_done(model)
    data = path.read_bytes()
    # The discarded range: zeroes where TRIM reached upstream (a punched hole), the old data
    # where the handshake offers no TRIM. Nothing else.
    discarded = data[655360:720896]
    assert discarded in (original[655360:720896], bytes(65536))
    model[655360:720896] = discarded
    assert data == bytes(model)
    alive(server, p)


# --------------------------------------------------------------------------------------------
# nbdinfo

@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_nbdinfo_flags_follow_upstream_without_multi_conn(serve, proxy, make_file, read_only):
    extra = ("--read-only",) if read_only else ()
    path = make_file(3 * MiB + 1000)
    server = serve(path, *extra)
    p = proxy(server.port)
    direct = nbdinfo(server.uri)["exports"][0]
    info = nbdinfo(p.uri)
    [export] = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-size"] == 3 * MiB + 512
    assert direct["can_multi_conn"] is True      # upstream offers it; the proxy must not
    assert export["can_multi_conn"] is False
    assert export["is_read_only"] is read_only
    for flag in PASSED_FLAGS:
        assert export[flag] is direct[flag], (flag, export, direct)
    # Structured replies, DF and base:allocation pass on from upstream (it has them all).
    assert info["structured"] is True
    assert export["can_df"] is direct["can_df"] is True
    assert "base:allocation" in export["contexts"]
    alive(server, p)


def test_nbdinfo_oldstyle_upstream_is_detected(serve, proxy, make_file):
    _, server, p = start(serve, proxy, make_file, SETUPS["oldstyle-up"], 2 * MiB + 100)
    info = nbdinfo(p.uri)
    [export] = info["exports"]
    assert info["protocol"] == "newstyle-fixed"   # the client side is still newstyle
    assert export["export-size"] == 2 * MiB
    # What an oldstyle flexnbd offers: FLUSH and FUA, nothing else (SPEC 3).
    assert export["can_flush"] is True and export["can_fua"] is True
    for flag in ("can_trim", "can_zero", "can_cache", "can_fast_zero", "can_multi_conn",
                 "is_read_only"):
        assert export[flag] is False, (flag, export)
    alive(server, p)


def test_nbdinfo_oldstyle_downstream(serve, proxy, make_file):
    _, server, p = start(serve, proxy, make_file, SETUPS["oldstyle-down"], 2 * MiB)
    info = nbdinfo(p.uri)
    assert info["protocol"] == "oldstyle"
    [export] = info["exports"]
    assert export["export-size"] == 2 * MiB
    assert export["can_multi_conn"] is False
    assert export["is_read_only"] is False
    alive(server, p)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_handshake_offers_upstream_flags_and_structured_replies(serve, proxy, make_file,
                                                                structured):
    _, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    with RawClient.connect(server.port) as direct:
        size, up_flags = direct.handshake(structured=True)
        direct.disconnect()
    assert up_flags & wire.FLAG_CAN_MULTI_CONN and up_flags & wire.FLAG_SEND_DF
    with RawClient.connect(p.port) as c:
        greeting = c.read_greeting()
        assert greeting.style == "newstyle"
        assert greeting.flags is not None and greeting.flags & wire.FLAG_FIXED_NEWSTYLE
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        if structured:
            replies = c.option(wire.OPT_STRUCTURED_REPLY)
            assert [r.type for r in replies] == [wire.REP_ACK]
            c.structured = True
        c.go()
        assert c.size == size
        # DF only with structured replies (upstream offers it then)
        expected = up_flags & ~wire.FLAG_CAN_MULTI_CONN
        assert c.flags == (expected if structured else expected & ~wire.FLAG_SEND_DF)
        reply = c.request(wire.CMD_READ, 4096, 512)
        assert reply.structured is structured and reply.error == 0
        assert reply.data == server.file.read_bytes()[4096:4608]
        c.disconnect()
    alive(server, p)


# --------------------------------------------------------------------------------------------
# nbdcopy

@pytest.mark.parametrize("setup", setups("newstyle", "cache", "oldstyle-up"))
def test_nbdcopy_from_proxy(serve, proxy, make_file, tmp_path, setup):
    nbdcopy = require_tool("nbdcopy")
    size = 5 * MiB + 3584
    data = bytearray(os.urandom(size))
    data[MiB:2 * MiB + 4096] = bytes(MiB + 4096)  # a zero run: nbdcopy may skip or zero it
    path = make_file(data=bytes(data))
    _, server, p = start(serve, proxy, make_file, setup, file=path)
    out = tmp_path / "out.img"
    check([nbdcopy, p.uri, str(out)])
    assert out.read_bytes() == path.read_bytes() == bytes(data)
    alive(server, p)


@pytest.mark.parametrize("setup", setups("newstyle", "cache", "oldstyle-down"))
def test_nbdcopy_to_proxy(serve, proxy, make_file, tmp_path, setup):
    nbdcopy = require_tool("nbdcopy")
    size = 5 * MiB + 3584
    path, server, p = start(serve, proxy, make_file, setup, size)  # random: all overwritten
    src = bytearray(os.urandom(size))
    src[2 * MiB:3 * MiB + 512] = bytes(MiB + 512)  # a zero run: zeroes or WRITE_ZEROES
    src[size - 4096:] = bytes(4096)                # zeroes up to the end of the export
    inp = tmp_path / "in.img"
    with open(inp, "wb") as f:
        f.write(bytes(src[:2 * MiB]))
        f.seek(3 * MiB + 512)                      # a real hole in the source too
        f.write(bytes(src[3 * MiB + 512:]))
    check([nbdcopy, str(inp), p.uri])
    assert path.read_bytes() == bytes(src)
    back = tmp_path / "back.img"
    check([nbdcopy, p.uri, str(back)])
    assert back.read_bytes() == bytes(src)
    alive(server, p)


# --------------------------------------------------------------------------------------------
# libnbd's Python binding

@pytest.mark.parametrize("cache", [(), ("--cache=16384",)], ids=["plain", "cache"])
def test_libnbd_pipelined_aio(serve, proxy, make_file, cache):
    """64 writes, 64 reads, then 32 writes mixed with 32 reads, all in flight at once; the
    reads (12 KiB + 7, adjacent) are within reach of a 16 KiB read-ahead."""
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB,
                            proxy_extra=cache)
    model = bytearray(path.read_bytes())
    res = libnbd("aio", p.uri)
    assert res["max_in_flight"] >= 32
    check_libnbd_aio(res, path, model)
    alive(server, p)


@pytest.mark.parametrize("setup", setups("newstyle", "cache"))
def test_libnbd_every_command(serve, proxy, make_file, setup):
    path, server, p = start(serve, proxy, make_file, setup, 1 * MiB)
    model = bytearray(path.read_bytes())
    res = libnbd("ops", p.uri)
    assert res["structured"] is True          # (upstream has them)
    assert res["can_multi_conn"] is False
    assert res["steps"] == ["pwrite-fua", "pwrite", "trim", "zero", "fast-zero", "cache",
                            "flush"]
    assert res["fua_readback"] is True
    assert res["plain_readback"] is True
    assert res["zero_readback"] is True
    assert res["zero_no_hole_readback"] is True
    assert res["fast_zero"] == "ok"
    libnbd_ops_done(model)
    assert path.read_bytes() == bytes(model)
    alive(server, p)


@pytest.mark.parametrize("setup", setups("newstyle", "cache"))
def test_libnbd_upstream_errors_pass_through(serve, proxy, make_file, setup):
    """Errors upstream answers (past the end) reach the client as they are, and the session
    carries on (SPEC 7: passed through, not retried)."""
    path, server, p = start(serve, proxy, make_file, setup, 1 * MiB)
    original = path.read_bytes()
    res = libnbd("errors", p.uri)["results"]
    assert res == libnbd_past_the_end()
    assert path.read_bytes() == b"w" * 512 + original[512:]
    alive(server, p)


def test_libnbd_read_only_upstream(serve, proxy, make_file):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    server = serve(path, "--read-only")
    p = proxy(server.port, "--cache")
    res = libnbd("readonly", p.uri)
    assert res["is_read_only"] is True
    assert res["results"] == LIBNBD_READ_ONLY
    assert path.read_bytes() == original
    alive(server, p)


# --------------------------------------------------------------------------------------------
# nbd-client

def test_nbd_client_negotiates_through_the_proxy(serve, proxy, make_file):
    nbd_client = require_tool("nbd-client")
    if os.path.exists("/dev/nbd0"):
        pytest.skip("a kernel nbd device exists here; this test must not attach it")
    _, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 4 * MiB)
    res = run([nbd_client, "127.0.0.1", str(p.port), "/dev/nbd0", "-N", ""], timeout=30)
    out = res.stdout + res.stderr
    # The negotiation finished (nbd-client learnt the size) ...
    assert "Negotiation:" in out, out
    assert re.search(r"size = 4MB", out), out
    assert "oldstyle server" not in out, out
    # ... and it failed only at the kernel step: no nbd module / device here.
    assert res.returncode != 0
    assert re.search(r"netlink|nbd module|'nbd' module|/dev/nbd0|Cannot open NBD", out), out
    # The proxy carries on: the next client works.
    assert qemu_img_size(p.uri) == 4 * MiB
    alive(server, p)


# --------------------------------------------------------------------------------------------
# The proxy's own behaviour

def test_unix_socket_downstream(serve, make_file, tmp_path, proxy_process):
    path = make_file(2 * MiB)
    server = serve(path)
    sock_path = tmp_path / "px.sock"
    args = ["--addr", str(sock_path), "--conn-addr", "127.0.0.1", "--conn-port",
            str(server.port), "-v"]
    p = proxy_process(args)
    assert sock_path.is_socket()
    uri = f"nbd+unix:///?socket={sock_path}"
    assert qemu_img_size(uri) == 2 * MiB
    qemu_io(uri, "write -P 0x6d 12345 54321", "read -P 0x6d 12345 54321")
    assert path.read_bytes()[12345:12345 + 54321] == b"\x6d" * 54321
    assert nbdinfo(uri)["exports"][0]["export-size"] == 2 * MiB
    assert p.stop() == 0
    # A restart on the same path works (nothing stale is left in the way).
    p2 = proxy_process(args)
    qemu_io(uri, "read -P 0x6d 12345 54321")
    alive(server, p2)


def test_short_options(fake_upstream, proxy_process):
    """-l -p -C -P -c=BYTES -o: an oldstyle proxy with an 8 KiB read-ahead."""
    size = 64 * KiB
    dest, path = fake_upstream(size)
    port = free_port()
    p = proxy_process(["-l", "127.0.0.1", "-p", str(port), "-C", "127.0.0.1",
                       "-P", str(dest.port), "-c=8192", "-o", "-v"])
    before = upstream_reads(dest)
    with RawClient.connect(port) as c:
        assert c.read_greeting().style == "oldstyle"
        assert c.size == size
        data = path.read_bytes()
        for off in range(0, size, 8192):
            assert c.read(off, 8192) == data[off:off + 8192]
        c.disconnect()
    assert upstream_reads(dest)[len(before):] == [(off, 16384) for off in range(0, size, 16384)]
    alive(p)


def test_second_client_waits_until_the_first_leaves(serve, proxy, make_file):
    """SPEC §7: one client at a time; the next waits un-accepted in the backlog (no greeting,
    not closed) and is served once the first has gone."""
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    with RawClient.connect(p.port) as first:
        first.handshake()
        assert first.read(0, 4096) == path.read_bytes()[:4096]
        second = RawClient.connect(p.port, timeout=10)
        try:
            second.sock.settimeout(1.0)
            with pytest.raises(TimeoutError):       # waiting: neither greeted nor closed
                second.sock.recv(1)
            # The first client's session is untouched.
            assert first.write(8192, b"\x99" * 5000) == 0
            assert first.read(8192, 5000) == b"\x99" * 5000
            first.disconnect()
            second.sock.settimeout(10)
            second.handshake()                      # now it is served
            assert second.read(8192, 5000) == b"\x99" * 5000
            second.disconnect()
        finally:
            second.close()
    assert path.read_bytes()[8192:13192] == b"\x99" * 5000
    qemu_io(p.uri, "read -P 0x99 8192 5000")
    alive(server, p)


def test_disc_is_not_forwarded_and_upstream_is_kept(serve, proxy, make_file):
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    # Three clients one after the other, each ending with DISC.
    qemu_io(p.uri, "write -P 0x31 0 4096")
    assert nbdinfo(p.uri)["exports"][0]["export-size"] == 1 * MiB
    with RawClient.connect(p.port) as c:
        c.handshake()
        assert c.read(0, 4096) == b"\x31" * 4096
        c.disconnect()
        assert c.read_until_closed() == b""
    # Upstream: the proxy's one connection, never a DISC, never closed.
    with RawClient.connect(p.port) as c:
        c.handshake()
        assert c.read(0, 4096) == b"\x31" * 4096
        c.disconnect()
    log = server.log()
    assert connections_logged(server) == 1, log
    assert "disconnected after" not in log, log
    assert "closed the connection" not in log, log
    alive(server, p)


def test_disc_after_pipelined_requests_answers_them_first(serve, proxy, make_file):
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    original = path.read_bytes()
    with RawClient.connect(p.port) as c:
        c.handshake()
        stream = b""
        expect = {}
        for i in range(40):
            cookie = 1000 + i
            if i % 2:
                data = pattern(i, 3000)
                stream += wire.pack_request(wire.CMD_WRITE, 500_000 + i * 3000, 3000, cookie,
                                            0) + data
                expect[cookie] = (wire.CMD_WRITE, 0, None)
            else:
                expect[cookie] = (wire.CMD_READ, 3000, original[i * 3000:(i + 1) * 3000])
                stream += wire.pack_request(wire.CMD_READ, i * 3000, 3000, cookie, 0)
        stream += wire.pack_request(wire.CMD_DISC, 0, 0, 9999, 0)
        c.send(stream)
        for _ in range(len(expect)):
            error, cookie, data = recv_any_reply(c, expect)
            assert error == 0
            assert data == expect.pop(cookie)[2]
        assert c.read_until_closed() == b""
    for i in range(1, 40, 2):
        assert path.read_bytes()[500_000 + i * 3000:500_000 + (i + 1) * 3000] == pattern(i, 3000)
    alive(server, p)


@pytest.mark.parametrize("cmd", [wire.CMD_READ, wire.CMD_WRITE], ids=["READ", "WRITE"])
def test_request_over_32_mib_ends_only_that_session(serve, proxy, make_file, cmd):
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    original = path.read_bytes()
    with RawClient.connect(p.port) as c:
        c.handshake()
        c.send(wire.pack_request(wire.CMD_READ, 4096, 4096, 1, 0)
               + wire.pack_request(wire.CMD_WRITE, 8192, 100, 2, 0) + b"\x77" * 100
               + wire.pack_request(cmd, 0, wire.MAX_PAYLOAD + 1, 3, 0))
        # The replies due for the earlier requests come first, then the session ends.
        expect = {1: (wire.CMD_READ, 4096), 2: (wire.CMD_WRITE, 0)}
        got = {}
        for _ in range(2):
            error, cookie, data = recv_any_reply(c, expect)
            assert error == 0
            got[cookie] = data
        assert got[1] == original[4096:8192]
        assert c.read_until_closed() == b""
    assert path.read_bytes()[8192:8292] == b"\x77" * 100
    # The proxy carries on with the next client, on the same upstream connection.
    qemu_io(p.uri, "read -P 0x77 8192 100")
    assert connections_logged(server) == 1, server.log()
    alive(server, p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("client", [False, True], ids=["idle", "client"])
def test_signals_exit_0(serve, proxy, make_file, sig, client):
    _, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB)
    c = None
    if client:
        c = RawClient.connect(p.port)
        c.handshake()
        c.read(0, 4096)
    try:
        assert p.stop(sig) == 0, p.log()
        if c is not None:
            assert c.read_until_closed() == b""   # the client is let go, nothing stray sent
    finally:
        if c is not None:
            c.close()
    assert "Traceback" not in p.log(), p.log()
    alive(server)


def proxy_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(FLEXNBD_PROXY + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_bad_command_lines_exit_1_with_one_clear_line(serve, make_file):
    server = serve(make_file(1 * MiB))
    up = ["--conn-addr", "127.0.0.1", "--conn-port", str(server.port)]
    listen = ["--addr", "127.0.0.1", "--port", str(free_port())]
    cases = [
        # (arguments, a word the error line must contain)
        (listen + ["--conn-port", str(server.port)], "conn-addr"),
        (listen + ["--conn-addr", "127.0.0.1"], "conn-port"),
        (up + ["--port", str(free_port())], "addr"),
        (up + ["--addr", "127.0.0.1", "--port", "0"], "port"),
        (up + ["--addr", "127.0.0.1", "--port", "65536"], "port"),
        (up + ["--addr", "127.0.0.1", "--port", "http"], "port"),
        (listen + ["--conn-addr", "127.0.0.1", "--conn-port", "99999"], "port"),
        (listen + ["--conn-addr", "not-an-address!", "--conn-port", str(server.port)],
         "addr"),
        (listen + up + ["--frobnicate"], "frobnicate"),
        (listen + up + ["-Z"], "-Z"),
        (listen + up + ["--cache=lots"], "cache"),
    ]
    failures = []
    for args, word in cases:
        res = proxy_cli(*args)
        lines = res.stderr.splitlines()
        problem = None
        if res.returncode != 1:
            problem = f"exit {res.returncode}"
        elif "Traceback" in res.stderr + res.stdout:
            problem = "traceback"
        elif not lines or word.lower() not in lines[0].lower():
            problem = f"first stderr line does not name {word!r}"
        elif "usage" not in res.stderr.lower():
            problem = "no usage"
        elif " serving " in res.stderr:
            problem = "it started serving"
        if problem:
            failures.append(f"{args}: {problem}\nstdout: {res.stdout}\nstderr: {res.stderr}")
    assert not failures, "\n\n".join(failures)
    # None of them connected upstream.
    assert connections_logged(server) == 0, server.log()
    alive(server)


def test_help_prints_usage_and_exits_0():
    for flag in ("-h", "--help"):
        res = proxy_cli(flag)
        assert res.returncode == 0, res.stderr
        assert "usage" in res.stdout.lower(), res.stdout
        for option in ("--addr", "--port", "--conn-addr", "--conn-port", "--bind", "--cache",
                       "--oldstyle"):
            assert option in res.stdout, (option, res.stdout)
        assert "Traceback" not in res.stderr


def test_unreachable_upstream_listens_waits_and_says_so_once(tmp_path):
    """Nothing listens upstream: the proxy listens all the same (clients wait un-accepted),
    retries at the reconnect's pace, says so once, and stops cleanly on SIGTERM. (That it
    then serves once upstream comes: test_proxy_structured.py.)"""
    up_port = free_port()       # nothing listens there
    port = free_port()
    p = FlexnbdProcess(["--addr", "127.0.0.1", "--port", str(port), "--conn-addr",
                        "127.0.0.1", "--conn-port", str(up_port), "-v"],
                       tmp_path / "proxy.log", command=FLEXNBD_PROXY)
    try:
        p.wait_for_log("clients wait until upstream answers")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(1.5)
            with pytest.raises(TimeoutError):      # in the backlog: no greeting yet
                s.recv(1)
        time.sleep(2)               # (several attempts)
        assert p.stop() == 0
    finally:
        p.kill()
    err = p.log_path.read_text(errors="replace")
    assert " serving " not in err, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if str(up_port) in line]
    assert len(lines) == 1, err
    assert re.search(r"cannot connect to upstream .*Connection refused", lines[0]), err


# --------------------------------------------------------------------------------------------
# Read-ahead (--cache): what upstream is asked, seen from a fake upstream that logs requests

@pytest.mark.parametrize("option", ["--cache", "--cache=4096", "-c=4096"])
def test_cache_halves_upstream_reads_and_doubles_them(fake_upstream, proxy, option):
    size = 64 * KiB
    dest, path = fake_upstream(size)
    p = proxy(dest.port, option)
    before = upstream_reads(dest)
    sequential_reads(p.port, path, 4096, size)
    reads = upstream_reads(dest)[len(before):]
    # 16 client READs of 4 KiB: every other one is fetched as 8 KiB, the rest from memory.
    assert reads == [(off, 8192) for off in range(0, size, 8192)]
    alive(p)


@pytest.mark.parametrize("option", [None, "--cache=0"], ids=["no-option", "zero"])
def test_cache_off_asks_upstream_for_each_read(fake_upstream, proxy, option):
    size = 64 * KiB
    dest, path = fake_upstream(size)
    p = proxy(dest.port, *([option] if option else []))
    before = upstream_reads(dest)
    sequential_reads(p.port, path, 4096, size)
    assert upstream_reads(dest)[len(before):] == [(off, 4096) for off in range(0, size, 4096)]
    alive(p)


def test_cache_reads_bigger_than_the_cache_are_not_doubled(fake_upstream, proxy):
    size = 64 * KiB
    dest, path = fake_upstream(size)
    p = proxy(dest.port, "--cache=4096")
    before = upstream_reads(dest)
    sequential_reads(p.port, path, 8192, size)
    assert upstream_reads(dest)[len(before):] == [(off, 8192) for off in range(0, size, 8192)]
    alive(p)


def test_cache_read_ahead_stops_at_the_export_end(fake_upstream, proxy):
    size = 3 * 4096 + 2048
    dest, path = fake_upstream(size)
    p = proxy(dest.port, "--cache=4096")
    before = upstream_reads(dest)
    sequential_reads(p.port, path, 4096, size)   # 4096 x 3, then the last 2048
    reads = upstream_reads(dest)[len(before):]
    assert reads == [(0, 8192), (8192, size - 8192)]
    assert all(r.error == 0 for r in dest.conns[0].requests), dest.conns[0].requests
    alive(p)


def invalidate_by(c: RawClient, how: str) -> None:
    far = 48 * KiB     # nowhere near the cached range
    if how == "write":
        assert c.write(far, b"w" * 100) == 0
    elif how == "flush":
        assert c.request(wire.CMD_FLUSH).error == 0
    elif how == "trim":
        assert c.request(wire.CMD_TRIM, far, 4096).error == 0
    elif how == "write_zeroes":
        assert c.request(wire.CMD_WRITE_ZEROES, far, 4096).error == 0
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["write", "flush", "trim", "write_zeroes"])
def test_cache_is_emptied_by_write_flush_trim_zeroes(fake_upstream, proxy, how):
    """A READ fills the read-ahead; the data upstream then changes behind the proxy's back;
    after any WRITE, FLUSH, TRIM or WRITE_ZEROES the next READ goes upstream again and sees
    the new data (SPEC 7: any of them empties the cache)."""
    size = 64 * KiB
    dest, path = fake_upstream(size)
    p = proxy(dest.port, "--cache=4096")
    with RawClient.connect(p.port) as c:
        c.handshake()
        before = len(upstream_reads(dest))
        assert c.read(0, 4096) == path.read_bytes()[:4096]
        assert upstream_reads(dest)[before:] == [(0, 8192)]
        new = os.urandom(4096)
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), new, 4096)
        invalidate_by(c, how)
        assert c.read(4096, 4096) == new
        assert upstream_reads(dest)[before + 1][0] == 4096
        c.disconnect()
    alive(p)


def test_cache_read_after_own_write_sees_it(fake_upstream, proxy):
    size = 64 * KiB
    dest, path = fake_upstream(size)
    p = proxy(dest.port, "--cache")
    with RawClient.connect(p.port) as c:
        c.handshake()
        assert c.read(0, 4096) == path.read_bytes()[:4096]      # fetches 0..8192
        new = os.urandom(1000)
        assert c.write(5000, new) == 0                          # inside the read-ahead
        got = c.read(4096, 4096)
        assert got == path.read_bytes()[4096:8192]
        assert got[5000 - 4096:6000 - 4096] == new
        c.disconnect()
    alive(p)


def test_cache_read_ahead_overtaken_by_a_pipelined_write_is_not_kept(serve, proxy, make_file):
    """READ 0+4 KiB and WRITE 4 KiB+4 KiB sent together do not overlap for the client, but the
    READ's read-ahead covers the WRITE's range: whatever the order upstream saw them in, a
    READ after the WRITE's reply must see the written data."""
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB,
                            proxy_extra=("--cache=4096",))
    original = path.read_bytes()
    with RawClient.connect(p.port) as c:
        c.handshake()
        for k in range(50):
            base = k * 16384
            new = pattern(7000 + k, 4096)
            c.send(wire.pack_request(wire.CMD_READ, base, 4096, 1, 0)
                   + wire.pack_request(wire.CMD_WRITE, base + 4096, 4096, 2, 0) + new)
            expect = {1: (wire.CMD_READ, 4096), 2: (wire.CMD_WRITE, 0)}
            for _ in range(2):
                error, cookie, data = recv_any_reply(c, expect)
                assert error == 0
                if cookie == 1:
                    assert data == original[base:base + 4096], k
            assert c.read(base + 4096, 4096) == new, f"stale read-ahead at round {k}"
        c.disconnect()
    alive(server, p)


def sequential_workload(port: int, model: DiskModel, seed: int, reads_wanted: int) -> int:
    """A client walking the export with small sequential reads (the read-ahead's case), with
    writes, zeroing, trims and flushes along the way, some just ahead of the walk; every read
    must agree with ``model`` (kept up to date). Returns how many READs it sent."""
    size = model.size
    rng = random.Random(seed)
    pos = 0
    reads = 0
    with RawClient.connect(port) as c:
        c.handshake()
        while reads < reads_wanted:
            r = rng.random()
            if r < 0.75:
                length = rng.choice([512, 1000, 4096, 4096, 4096, 2048, 8192, 65536])
                length = min(length, size - pos)
                got = c.read(pos, length)
                mismatch = model.mismatch(pos, got)
                assert mismatch is None, f"read {reads}: {mismatch}"
                reads += 1
                pos += length
                if pos >= size or rng.random() < 0.03:
                    pos = rng.randrange(0, size // 512) * 512
                continue
            off = min(size - 1, max(0, pos + rng.randrange(-8192, 16384)))
            length = min(rng.randrange(1, 9000), size - off)
            if r < 0.88:
                data = os.urandom(length)
                assert c.write(off, data, wire.CMD_FLAG_FUA if r < 0.8 else 0) == 0
                model.write(off, data)
            elif r < 0.93:
                assert c.request(wire.CMD_WRITE_ZEROES, off, length).error == 0
                model.zero(off, length)
            elif r < 0.97:
                assert c.request(wire.CMD_TRIM, off, length).error == 0
                model.trim(off, length)
            else:
                assert c.request(wire.CMD_FLUSH).error == 0
        c.disconnect()
    return reads


@pytest.mark.parametrize("cache", ["--cache=0", "--cache=4096", "--cache=65536"])
def test_cache_random_sequential_workload_matches_a_model(serve, proxy, make_file, cache):
    """The walk above through a real upstream. The export ends off a 4 KiB boundary so the
    walk meets the end."""
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 1 * MiB + 1536,
                            proxy_extra=(cache,))
    model = DiskModel(path.read_bytes())
    assert model.size == 1 * MiB + 1536
    sequential_workload(p.port, model, 4242, 700)
    assert model.mismatch(0, path.read_bytes()) is None
    alive(server, p)


def test_cache_random_sequential_workload_is_served_partly_from_memory(fake_upstream, proxy):
    """The same walk through a fake upstream: the data is right and fewer READs reached
    upstream than the client sent (the read-ahead answered the rest)."""
    size = 1 * MiB + 1536
    dest, path = fake_upstream(size)
    p = proxy(dest.port, "--cache=4096")
    model = DiskModel(path.read_bytes())
    before = len(upstream_reads(dest))
    reads = sequential_workload(p.port, model, 99, 500)
    upstream = upstream_reads(dest)[before:]
    assert len(upstream) < reads * 0.9, (len(upstream), reads)
    assert all(off + length <= size for off, length in upstream)
    assert model.mismatch(0, path.read_bytes()) is None
    alive(p)


@pytest.mark.parametrize("cache", ["--cache=0", "--cache=4096"])
def test_cache_pipelined_random_batches_match_a_model(serve, proxy, make_file, cache):
    """Batches of up to 48 requests sent at once (reads, mostly small and sequential, and
    writes/zeroing on other ranges of the same batch; no two requests of a batch overlap),
    then every reply is checked against a model."""
    path, server, p = start(serve, proxy, make_file, SETUPS["newstyle"], 512 * KiB,
                            proxy_extra=(cache,))
    model = bytearray(path.read_bytes())
    size = len(model)
    rng = random.Random(777)
    cookie = 0
    cursor = 0
    with RawClient.connect(p.port) as c:
        c.handshake()
        for _ in range(40):
            taken: list[tuple[int, int]] = []
            expect: dict[int, tuple] = {}
            stream = bytearray()
            pending_writes = []
            for _ in range(rng.randint(8, 48)):
                if rng.random() < 0.6:
                    off, length = cursor, rng.choice([512, 4096, 4096, 4096, 3000])
                    cursor = (cursor + length) % (size - 8192)
                else:
                    length = rng.randrange(1, 6000)
                    off = rng.randrange(0, size - length)
                if any(off < b and a < off + length for a, b in taken):
                    continue
                taken.append((off, off + length))
                cookie += 1
                kind = rng.random()
                if kind < 0.6:
                    stream += wire.pack_request(wire.CMD_READ, off, length, cookie, 0)
                    expect[cookie] = (wire.CMD_READ, length, bytes(model[off:off + length]))
                elif kind < 0.9:
                    data = os.urandom(length)
                    stream += wire.pack_request(wire.CMD_WRITE, off, length, cookie, 0) + data
                    expect[cookie] = (wire.CMD_WRITE, 0, None)
                    pending_writes.append((off, data))
                else:
                    stream += wire.pack_request(wire.CMD_WRITE_ZEROES, off, length, cookie, 0)
                    expect[cookie] = (wire.CMD_WRITE_ZEROES, 0, None)
                    pending_writes.append((off, bytes(length)))
            c.send(bytes(stream))
            for _ in range(len(expect)):
                error, got_cookie, data = recv_any_reply(c, expect)
                assert error == 0
                want = expect.pop(got_cookie)[2]
                if want is not None:
                    assert data == want, f"READ cookie {got_cookie} disagrees with the model"
            for off, data in pending_writes:
                model[off:off + len(data)] = data
        c.disconnect()
    assert path.read_bytes() == bytes(model)
    alive(server, p)

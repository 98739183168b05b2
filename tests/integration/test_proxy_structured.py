"""flexnbd-proxy with structured replies and base:allocation (issue 26 item 6), real processes
on 127.0.0.1: the map and sparse copies through the proxy match direct ones (nbdinfo --map,
nbdcopy); a client that did not ask for structured replies still reads right behind an upstream
that sends chunks (with and without --cache); a reconnect in the middle of a structured reply
loses and duplicates nothing; an upstream that lies in its chunks is dropped (the proxy says
why, reconnects, and the client gets the right answer); an upstream that loses the features
across a reconnect is answered for safely; and a proxy started before its upstream waits for
it and then serves the client that came meanwhile.

The lying and cutting upstreams are tests/fakes/fakedest.py scripts (``structured=True``); the
clients are nbdinfo, nbdcopy, libnbd's Python binding and tests/support/rawclient.py, whose
replies are checked chunk by chunk here (no byte answered twice, all of the request covered).
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import threading
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import (
    FLEXNBD_PROXY,
    FlexnbdProcess,
    free_port,
    require_python_nbd,
    require_tool,
)
from tests.fakes.fakedest import FakeDest, Script
from tests.support.clients import check, run
from tests.support.hostile import map_built, raw_connect
from tests.support.rawclient import RawClient
from tests.support.serving import alive

KiB = 1 << 10
MiB = 1 << 20
READ, BLOCK_STATUS = wire.CMD_READ, wire.CMD_BLOCK_STATUS
SHORT_TIMEOUT = {"FLEXNBD_UPSTREAM_TIMEOUT": "1.5"}
HOLE_ZERO = wire.STATE_HOLE | wire.STATE_ZERO


def sparse_file(path: Path, size: int = 24 * MiB, seed: int = 1) -> Path:
    """A sparse file: data runs (one not 4 KiB aligned at its end) between real holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ((0, 64 * KiB), (3 * MiB, 2 * MiB + 1000), (9 * MiB, 4 * KiB),
                               (9 * MiB + 64 * KiB, 300 * KiB), (size - 8 * KiB, 8 * KiB)):
            if offset + length <= size:
                f.seek(offset)
                f.write(rnd.randbytes(length))
    return path


def structured_client(port: int, meta: bool = True) -> RawClient:
    """A raw client that agreed structured replies (and selected base:allocation)."""
    c = raw_connect(port)
    try:
        assert c.read_greeting().style == "newstyle"
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
        c.structured = True
        if meta:
            query = (struct.pack(">II", 0, 1) + struct.pack(">I", len(wire.BASE_ALLOCATION))
                     + wire.BASE_ALLOCATION)
            replies = c.option(wire.OPT_SET_META_CONTEXT, query)
            assert [r.type for r in replies] == [wire.REP_META_CONTEXT, wire.REP_ACK], replies
            assert struct.unpack_from(">I", replies[0].data)[0] == wire.BASE_ALLOCATION_ID
        c.go()
    except BaseException:
        c.close()
        raise
    return c


def simple_client(port: int) -> RawClient:
    c = raw_connect(port)
    try:
        c.handshake()
    except BaseException:
        c.close()
        raise
    return c


def read_data(chunks: list[tuple[int, int, bytes]], offset: int, length: int) -> bytes:
    """The data of a structured READ reply, checked: no error, no byte twice, every byte."""
    buf = bytearray(length)
    seen = bytearray(length)
    for _flags, ctype, payload in chunks:
        if ctype == wire.REPLY_TYPE_OFFSET_DATA:
            (at,) = struct.unpack_from(">Q", payload)
            data = payload[8:]
        elif ctype == wire.REPLY_TYPE_OFFSET_HOLE:
            at, n = struct.unpack(">QI", payload)
            data = bytes(n)
        else:
            raise AssertionError(f"chunk type {ctype} in a READ reply: {payload[:16]!r}")
        start = at - offset
        assert 0 <= start and start + len(data) <= length, (at, len(data))
        assert not any(seen[start:start + len(data)]), f"bytes at {at} answered twice"
        buf[start:start + len(data)] = data
        seen[start:start + len(data)] = b"\1" * len(data)
    assert all(seen), "some bytes were not answered"
    return bytes(buf)


def extents(chunks: list[tuple[int, int, bytes]]) -> list[tuple[int, int]]:
    """The extents of a BLOCK_STATUS reply for base:allocation (exactly one chunk)."""
    [(flags, ctype, payload)] = chunks
    assert flags & wire.REPLY_FLAG_DONE and ctype == wire.REPLY_TYPE_BLOCK_STATUS, chunks
    (context,) = struct.unpack_from(">I", payload)
    assert context == wire.BASE_ALLOCATION_ID
    return [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]


def file_extents(path: Path, offset: int, length: int) -> list[tuple[int, int]]:
    """What the FakeDest says about [offset, offset+length): cut at 4 KiB blocks of the
    file, zero or not, runs merged."""
    data = path.read_bytes()
    out: list[list[int]] = []
    at, end = offset, offset + length
    while at < end:
        n = min(end, (at // 4096 + 1) * 4096) - at
        state = HOLE_ZERO if data[at:at + n].count(0) == n else 0
        if out and out[-1][1] == state:
            out[-1][0] += n
        else:
            out.append([n, state])
        at += n
    return [(n, state) for n, state in out]


@pytest.fixture
def fake(tmp_path):
    """fake(path, scripts, default=...) -> FakeDest serving path; closed afterwards."""
    made: list[FakeDest] = []

    def make(path: Path, scripts: list[Script] | None = None,
             default: Script | None = None) -> FakeDest:
        dest = FakeDest(path.stat().st_size, path, scripts=scripts,
                        default=default or Script(greeting="newstyle", structured=True))
        made.append(dest)
        return dest
    yield make
    for dest in made:
        dest.close()


def lying(how: str) -> Script:
    return Script(greeting="newstyle", structured=True, chunks=how)


# --------------------------------------------------------------------------------------------
# Real clients: the map, sparse copies, READs of a client without structured replies

@pytest.mark.parametrize("cache", [(), ("--cache=65536",)], ids=["plain", "cache"])
def test_nbdinfo_map_through_the_proxy_equals_the_direct_map(serve, proxy, tmp_path, cache):
    nbdinfo = require_tool("nbdinfo")
    server = serve(sparse_file(tmp_path / "sparse.img"))
    map_built(server)
    p = proxy(server.port, *cache)
    assert "structured replies, base:allocation" in p.log()
    direct = check([nbdinfo, "--map", server.uri])
    through = check([nbdinfo, "--map", p.uri])
    assert through == direct
    assert "hole" in direct and "data" in direct        # (a map with holes to compare)
    assert re.search(r"client .* connected \(newstyle, structured replies, base:allocation\)",
                     p.log()), p.log()
    alive(server, p)


@pytest.mark.parametrize("cache", [(), ("--cache=65536",)], ids=["plain", "cache"])
def test_sparse_nbdcopy_through_the_proxy_stays_sparse(serve, proxy, tmp_path, cache):
    nbdcopy = require_tool("nbdcopy")
    source = sparse_file(tmp_path / "sparse.img")
    server = serve(source)
    map_built(server)
    p = proxy(server.port, *cache)
    direct, through = tmp_path / "direct.img", tmp_path / "through.img"
    check([nbdcopy, server.uri, str(direct)])
    check([nbdcopy, p.uri, str(through)])
    assert through.read_bytes() == source.read_bytes()
    # As sparse as a direct copy: nbdcopy skipped the holes the proxy passed on.
    assert os.stat(through).st_blocks == os.stat(direct).st_blocks
    assert os.stat(through).st_blocks * 512 < source.stat().st_size // 4
    assert re.search(r"connected \(newstyle, structured replies, base:allocation\)", p.log())
    alive(server, p)


def test_qemu_img_convert_through_the_proxy(serve, proxy, tmp_path):
    """qemu-img reads in structured READs (and asks for the map): the same bytes."""
    qemu_img = require_tool("qemu-img")
    source = sparse_file(tmp_path / "sparse.img", 8 * MiB + 4096)
    server = serve(source)
    map_built(server)
    p = proxy(server.port)
    out = tmp_path / "out.img"
    check([qemu_img, "convert", "-f", "raw", "-O", "raw", p.uri, str(out)])
    assert out.read_bytes() == source.read_bytes()
    assert os.stat(out).st_blocks * 512 < source.stat().st_size // 2
    alive(server, p)


LIBNBD_READS = r"""
import json, random, sys
import nbd
uri, path, structured = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
data = open(path, "rb").read()
h = nbd.NBD()
h.set_request_structured_replies(structured)
h.connect_uri(uri)
rnd = random.Random(7)
size = h.get_size()
reads = [(off, 4096) for off in range(3 * 1024 * 1024 - 65536, 3 * 1024 * 1024 + 65536, 4096)]
for _ in range(200):
    n = rnd.choice([1, 512, 4096, 12345, 65536, 1 << 20])
    reads.append((rnd.randrange(0, size - n), n))
bad = [(off, n) for off, n in reads if h.pread(n, off) != data[off:off + n]]
print(json.dumps({"structured": bool(h.get_structured_replies_negotiated()), "bad": bad}))
"""


@pytest.mark.parametrize("cache", [(), ("--cache=65536",)], ids=["plain", "cache"])
@pytest.mark.parametrize("upstream", ["serve", "fake"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_libnbd_reads_behind_a_structured_upstream(serve, proxy, fake, tmp_path, cache,
                                                   upstream, structured):
    """A client without structured replies gets simple replies assembled from upstream's
    chunks (holes as zeroes); one with them gets chunks; both with and without read-ahead."""
    python = require_python_nbd()
    source = sparse_file(tmp_path / "sparse.img")
    if upstream == "serve":
        up = serve(source)
        map_built(up)
        port = up.port
    else:
        port = fake(source).port
    p = proxy(port, *cache)
    assert "structured replies, base:allocation" in p.log()
    script = tmp_path / "reads.py"
    script.write_text(LIBNBD_READS)
    res = run([python, str(script), p.uri, str(source), "1" if structured else "0"],
              timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report == {"structured": structured, "bad": []}
    alive(p)


# --------------------------------------------------------------------------------------------
# Raw clients: what the proxy sends, chunk by chunk

def test_block_status_context_is_renamed_and_reads_keep_their_holes(fake, proxy, tmp_path):
    """The fake gives base:allocation id 7; the client sees id 1 (its own), the extents as
    upstream sent them, and READ data and holes as chunks, none twice."""
    source = sparse_file(tmp_path / "sparse.img", 12 * MiB)
    dest = fake(source)
    p = proxy(dest.port)
    with structured_client(p.port) as c:
        for offset, length in ((0, 12 * MiB), (3 * MiB - 4096, 64 * KiB), (9 * MiB, 1 * MiB)):
            cookie = c.send_request(BLOCK_STATUS, offset, length)
            assert extents(c.recv_chunks(cookie)) == file_extents(source, offset, length)
        for offset, length in ((3 * MiB - 8192, 16 * KiB), (9 * MiB, 128 * KiB), (0, 8 * MiB)):
            cookie = c.send_request(READ, offset, length)
            chunks = c.recv_chunks(cookie)
            assert read_data(chunks, offset, length) == \
                source.read_bytes()[offset:offset + length]
            # the holes came through as holes
            assert any(t == wire.REPLY_TYPE_OFFSET_HOLE for _, t, _ in chunks)
        cookie = c.send_request(READ, 4096, 0)
        assert c.recv_chunks(cookie) == [(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_NONE, b"")]
        c.disconnect()
    assert len(dest.conns) == 1
    alive(p)


@pytest.mark.parametrize("client, first", [("structured", "read"), ("structured", "status"),
                                           ("simple", "read")])
def test_reconnect_in_the_middle_of_a_structured_reply(fake, proxy, tmp_path, client, first):
    """Upstream sends half of the first reply and closes; the proxy reconnects, re-sends every
    request in flight, and each is answered once, whole and right (nothing of the cut reply
    went to the client). (A client without structured replies has no BLOCK_STATUS.)"""
    source = sparse_file(tmp_path / "sparse.img", 12 * MiB)
    dest = fake(source, scripts=[lying("cut")])
    p = proxy(dest.port)
    data = source.read_bytes()
    requests = [(READ, 3 * MiB - 8192, 1 * MiB), (READ, 0, 4 * MiB), (READ, 9 * MiB, 64 * KiB)]
    if client == "structured":
        requests.insert(0 if first == "status" else 1, (BLOCK_STATUS, 0, 12 * MiB))
    c = structured_client(p.port) if client == "structured" else simple_client(p.port)
    with c:
        cookies = [c.send_request(cmd, off, n) for cmd, off, n in requests]
        for cookie, (cmd, off, n) in zip(cookies, requests, strict=True):
            if client == "simple":
                reply = c.recv_reply(n, off)
                assert reply.cookie == cookie and reply.error == 0 and not reply.structured
                assert reply.data == data[off:off + n]
            elif cmd == READ:
                assert read_data(c.recv_chunks(cookie), off, n) == data[off:off + n]
            else:
                assert extents(c.recv_chunks(cookie)) == file_extents(source, off, n)
        # nothing more came: the next request's reply is the next thing on the wire
        cookie = c.send_request(READ, 4096, 512)
        if client == "simple":
            assert c.recv_reply(512, 4096).data == data[4096:4608]
        else:
            assert read_data(c.recv_chunks(cookie), 4096, 512) == data[4096:4608]
        c.disconnect()
    assert dest.conns[0].lies == 1 and len(dest.conns) == 2
    assert "reconnected to upstream" in p.log()
    alive(p)


# What the proxy says of each lie: (script, the request it answers, a piece of the log line)
LIES = [
    ("long", READ, "with a payload of 8200 bytes"),
    ("bad_hole", READ, "with a payload of 16 bytes"),
    ("badcookie", READ, "answered a request that was not waiting"),
    ("badmagic", READ, "sent a reply with bad magic 0x668e32ef"),
    ("outside", READ, "outside the request or over bytes already answered"),
    ("overlap", READ, "outside the request or over bytes already answered"),
    ("incomplete", READ, "without answering all of the request (2048 bytes answered)"),
    ("status_to_read", READ, "chunk of type 5 that the request cannot have"),
    ("context", BLOCK_STATUS, "answered BLOCK_STATUS for meta context 8"),
    ("empty_extent", BLOCK_STATUS, "with an invalid extent (number 0)"),
    ("endless", READ, "sent more reply chunks than a request may have"),
    ("trickle", READ, "a request was not answered in 1.5 s"),
]


@pytest.mark.parametrize("how, cmd, said, client", [
    pytest.param(*lie, client, id=f"{client}-{lie[0]}")
    for client in ("structured", "simple") for lie in LIES
    if client == "structured" or lie[1] == READ])     # (no BLOCK_STATUS without structured)
def test_a_lying_upstream_is_dropped(fake, proxy, tmp_path, how, cmd, said, client):
    """Each lie ends that upstream connection (logged with why); the proxy reconnects,
    re-sends, and the client gets the honest answer, never a byte of the lie."""
    source = sparse_file(tmp_path / "sparse.img", 4 * MiB)
    dest = fake(source, scripts=[lying(how)])
    p = proxy(dest.port, env=SHORT_TIMEOUT)
    data = source.read_bytes()
    offset, length = 3 * MiB - 2048, 4096          # (half data, half hole)
    c = structured_client(p.port) if client == "structured" else simple_client(p.port)
    with c:
        cookie = c.send_request(cmd, offset, length)
        if client == "simple":
            reply = c.recv_reply(length, offset)
            assert reply.cookie == cookie and reply.error == 0
            assert reply.data == data[offset:offset + length]
        elif cmd == READ:
            assert read_data(c.recv_chunks(cookie), offset, length) == \
                data[offset:offset + length]
        else:
            assert extents(c.recv_chunks(cookie)) == file_extents(source, offset, length)
        c.disconnect()
    assert dest.conns[0].lies >= 1 and len(dest.conns) >= 2
    log = p.log()
    assert f"upstream 127.0.0.1:{dest.port} " in log and said in log, log
    assert "reconnected to upstream" in log
    assert "Traceback" not in log
    alive(p)


def test_an_upstream_without_the_features_after_a_reconnect(fake, proxy, tmp_path):
    """The client agreed structured replies and base:allocation; the upstream it reconnects
    to has neither: READs come as one chunk, BLOCK_STATUS as all data (true, if slower)."""
    source = sparse_file(tmp_path / "sparse.img", 4 * MiB)
    dest = fake(source, scripts=[lying("cut")], default=Script(greeting="newstyle"))
    p = proxy(dest.port)
    data = source.read_bytes()
    with structured_client(p.port) as c:
        cookie = c.send_request(BLOCK_STATUS, 0, 4 * MiB)
        assert extents(c.recv_chunks(cookie)) == [(4 * MiB, 0)]
        cookie = c.send_request(READ, 3 * MiB - 2048, 8192)
        chunks = c.recv_chunks(cookie)
        assert [t for _, t, _ in chunks] == [wire.REPLY_TYPE_OFFSET_DATA]
        assert read_data(chunks, 3 * MiB - 2048, 8192) == data[3 * MiB - 2048:3 * MiB + 6144]
        # beyond the end: an error, as upstream would have said
        cookie = c.send_request(BLOCK_STATUS, 4 * MiB - 512, 1024)
        reply = c.recv_reply()
        assert reply.cookie == cookie and reply.error == wire.NBD_EINVAL
        c.disconnect()
    assert len(dest.conns) == 2 and not dest.conns[1].structured
    assert "no longer offers structured replies and base:allocation" in p.log()
    # the next client is offered what upstream has now: no structured replies
    with raw_connect(p.port) as c:
        assert c.read_greeting().style == "newstyle"
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ERR_UNSUP
    alive(p)


# --------------------------------------------------------------------------------------------
# Started before its upstream

def test_a_proxy_started_before_its_upstream_waits_then_serves(serve, tmp_path):
    up_port = free_port()
    port = free_port()
    p = FlexnbdProcess(["--addr", "127.0.0.1", "--port", str(port), "--conn-addr",
                        "127.0.0.1", "--conn-port", str(up_port), "-v"],
                       tmp_path / "proxy.log", command=FLEXNBD_PROXY)
    try:
        p.wait_for_log("clients wait until upstream answers")
        # A client connects meanwhile: it waits in the backlog, un-accepted.
        result: dict[str, object] = {}

        def client() -> None:
            try:
                with RawClient.connect(port, timeout=30) as c:
                    c.handshake()
                    result["data"] = c.read(4096, 8192)
                    c.disconnect()
            except Exception as e:      # noqa: BLE001 - reported below
                result["error"] = e

        waiting = threading.Thread(target=client)
        waiting.start()
        # Attempts go on (at the reconnect's pace, up to 2 s apart) without a line each.
        threading.Event().wait(3)
        assert p.proc.poll() is None
        source = sparse_file(tmp_path / "sparse.img", 4 * MiB)
        server = serve(source, port=up_port)
        waiting.join(30)
        assert not waiting.is_alive()
        assert result.get("data") == source.read_bytes()[4096:12288], result
        log = p.log()
        assert log.count("cannot connect to upstream") == 1, log
        assert re.search(r"upstream 127\.0\.0\.1:\d+ answered after [\d.]+ s and \d+ "
                         r"attempt", log), log
        assert " serving " in log and "Traceback" not in log
        alive(server)
        assert p.stop() == 0
    finally:
        p.kill()

"""flexnbd-proxy under faults (SPEC §7, §10): an upstream killed and restarted with requests in
flight (reads, writes, the middle of a WRITE payload), an upstream back with another size, a
read-ahead cache that a reconnect empties, error replies passed on once, an upstream that stops
answering, clients that vanish mid-request, and clients that send oversized requests or garbage.

The client is tests/support/pipeline.py (raw NBD, many requests in flight, every READ checked and
every acknowledged WRITE applied to a model of the export); faults are placed exactly with
tests/fakes/relay.py between the proxy and its upstream, or by killing the upstream from inside
the client's sender while a known part of a WRITE payload is out.

The tests that take ``sides`` run twice: in plaintext, and with TLS on both sides of the proxy
(upstream ``serve --tls=require`` with an X.509 certificate naming 127.0.0.1 and restarted the
same way; the proxy with ``--tls=require`` for its clients and ``--conn-tls-certificates`` to
upstream; the plaintext test client behind tests/support/tlsfront.py, which does STARTTLS and
the encryption for it). Plaintext only: the tests whose upstream is a fake that speaks no TLS
(FakeDest: error replies passed on once, an upstream that never answers), and those that place
or check a fault at an exact plaintext byte of the upstream stream
(test_upstream_lost_mid_write_payload_at_the_relay cuts the stream in the middle of a WRITE
payload, test_read_past_the_end_answered_once counts the request headers that went upstream):
under TLS the relay sees records of unknown size, not requests.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import select
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from flexnbd import wire
from tests.conftest import require_python_nbd
from tests.fakes.fakedest import FakeDest, Script
from tests.fakes.relay import Fault, Relay
from tests.support.nbdmodel import DiskModel
from tests.support.pipeline import Op, Pipeline
from tests.support.rawclient import RawClient, ServerClosed
from tests.support.tlscreds import make_x509
from tests.support.tlsfront import TlsFront
from tests.support.waiting import log_lines, wait_logged, wait_until

KiB = 1 << 10
MiB = 1 << 20
READ, WRITE, FLUSH = wire.CMD_READ, wire.CMD_WRITE, wire.CMD_FLUSH
HEADER = wire.REQUEST_SIZE                 # 28 bytes of request header before a payload
REPLY = wire.SIMPLE_REPLY_SIZE
SHORT_TIMEOUT = {"FLEXNBD_UPSTREAM_TIMEOUT": "1.5"}


# -- helpers ---------------------------------------------------------------------------------

@pytest.fixture
def relay():
    """relay(upstream_port, faults=None, default=None) -> Relay; all closed afterwards."""
    made: list[Relay] = []

    def make(upstream_port: int, faults: list[Fault | None] | None = None,
             default: Fault | None = None) -> Relay:
        r = Relay(upstream_port, faults, default=default)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


@dataclass
class Sides:
    """How a test starts its upstream and proxy and connects its client: ``serve(path, *extra,
    port=None)``, ``proxy(upstream_port, *extra, env=None)``, ``connect(proxy, **kwargs)`` (a
    RawClient in transmission, see connect_when_free)."""

    tls: bool
    serve: Callable
    proxy: Callable
    connect: Callable[..., RawClient]


@pytest.fixture(params=["plain", "tls"])
def sides(request, serve, proxy, tmp_path):
    """Plaintext, or TLS on both sides of the proxy (X.509) with the client behind a TlsFront
    (one per proxy; all closed afterwards)."""
    if request.param == "plain":
        yield Sides(False, serve, proxy, lambda px, **kw: connect_when_free(px.port, **kw))
        return
    server_dir, client_dir = make_x509(tmp_path / "x509")
    fronts: dict[int, TlsFront] = {}

    def serve_tls(path, *extra: str, port: int | None = None):
        return serve(path, "--tls=require", "--tls-certificates", str(server_dir), *extra,
                     port=port)

    def proxy_tls(upstream_port: int, *extra: str, env: dict | None = None):
        px = proxy(upstream_port, "--tls=require", "--tls-certificates", str(server_dir),
                   "--conn-tls-certificates", str(client_dir), *extra, env=env)
        serving = [line for line in px.log().splitlines() if " serving " in line]
        assert "TLS required" in serving[0] and "TLSv1.3" in serving[0], px.log()
        return px

    def connect(px, **kwargs) -> RawClient:
        if px.port not in fronts:
            fronts[px.port] = TlsFront(px.port, client_dir)
        front = fronts[px.port]
        try:
            return connect_when_free(front.port, **kwargs)
        except AssertionError as e:
            raise AssertionError(f"{e}; the TLS front: {front.errors}") from None

    yield Sides(True, serve_tls, proxy_tls, connect)
    for front in fronts.values():
        front.close()


def kill_and_restart(up, px, pipe, serve, path) -> None:
    """SIGKILL the upstream, wait until the proxy has noticed, start it again on its port.
    The client's requests are marked 1 while it is down and 2 once it is back."""
    up.kill()
    pipe.mark = 1
    wait_logged(px, "W", "upstream")
    pipe.mark = 2
    serve(path, port=up.port)


def assert_reconnected(px) -> None:
    assert log_lines(px, "W", "upstream"), px.log()
    assert log_lines(px, "I", "reconnected"), px.log()


def connect_when_free(port: int, timeout: float = 20.0, **kwargs) -> RawClient:
    """A client in transmission with the proxy. The proxy serves one client at a time and
    closes any other at once, so retry until the previous session is over."""
    deadline = time.monotonic() + timeout
    while True:
        c = RawClient.connect(port, **kwargs)
        try:
            c.handshake()
            return c
        except (ServerClosed, ConnectionError):
            c.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"the proxy on port {port} took no new client in "
                                     f"{timeout} s") from None
            time.sleep(0.05)
        except BaseException:
            c.close()
            raise


def reads(rng: random.Random, size: int, lengths: tuple[int, ...]) -> Iterator[Op]:
    while True:
        n = rng.choice(lengths)
        yield Op(READ, rng.randrange(size - n + 1), n)


def mixed(rng: random.Random, size: int, write_lengths: tuple[int, int],
          read_lengths: tuple[int, ...], writes: float = 0.6) -> Iterator[Op]:
    """Random READs and WRITEs (unaligned, payloads from ``rng``), with a FLUSH now and then."""
    while True:
        r = rng.random()
        if r < 0.03:
            yield Op(FLUSH)
        elif r < writes:
            n = rng.randrange(*write_lengths)
            yield Op(WRITE, rng.randrange(size - n + 1), n, rng.randbytes(n))
        else:
            n = rng.choice(read_lengths)
            yield Op(READ, rng.randrange(size - n + 1), n)


def assert_file_is(path, model: DiskModel) -> None:
    data = path.read_bytes()
    assert len(data) == model.size
    if data != bytes(model.data):
        first = next(i for i in range(len(data)) if data[i] != model.data[i])
        raise AssertionError(f"{path}: byte {first} is {data[first]:#x}, the client's model "
                             f"says {model.data[first]:#x}")


def recv_replies(c: RawClient, reads_by_cookie: dict[int, int], n: int) -> dict[int, tuple]:
    """Receive ``n`` simple replies in any order: cookie -> (error, data); ``reads_by_cookie``
    gives the length of the READs (their data follows a successful reply)."""
    got = {}
    for _ in range(n):
        reply = wire.unpack_simple_reply(c.recv_exact(REPLY))
        assert reply.magic == wire.SIMPLE_REPLY_MAGIC, f"bad reply magic {reply.magic:#x}"
        assert reply.cookie not in got, f"two replies for cookie {reply.cookie}"
        length = reads_by_cookie.get(reply.cookie, 0)
        data = c.recv_exact(length) if length and reply.error == 0 else b""
        got[reply.cookie] = (reply.error, data)
    return got


def nothing_to_read(c: RawClient, wait: float) -> bool:
    ready, _, _ = select.select([c.sock], [], [], wait)
    return not ready


def up_settles(conn, at_least: int, timeout: float = 15.0) -> bool:
    """Under TLS the relay counts records, not requests: wait until at least ``at_least``
    bytes went upstream on ``conn`` and the count stopped moving."""
    counts = [-1]

    def settled() -> bool:
        counts.append(conn.up)
        return counts[-1] >= at_least and counts[-1] == counts[-2]
    return bool(wait_until(settled, timeout, 0.2))


def relayed_proxy(serve_port: int, relay, proxy, *extra: str, env: dict | None = None):
    """A proxy whose upstream connections go through a relay. Connection 0 has a fault
    (``Fault()``, nothing planned yet) that the test may arm once the proxy's handshake is
    through: (relay, proxy, fault, handshake bytes up, handshake bytes down)."""
    fault = Fault()
    r = relay(serve_port, faults=[fault])
    px = proxy(r.port, "--cache=0", *extra, env=env)
    assert len(r.connections) == 1, r.connections
    conn = r.connections[0]
    assert conn.wait_settled()
    return r, px, fault, conn.up, conn.down


# -- 1. the upstream dies with requests in flight and comes back -----------------------------

def test_upstream_killed_with_reads_in_flight(sides, make_file):
    size = 32 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    px = sides.proxy(up.port, "--cache=0")
    ops = reads(random.Random(1), size, (4 * KiB, 64 * KiB, 512 * KiB, 2 * MiB))
    with Pipeline(sides.connect(px), model, ops, depth=16) as pipe:
        assert pipe.wait_done(40), pipe.failures
        # Freeze the upstream, let whatever it had answered reach the client, then kill it:
        # the requests still unanswered now were in flight at the kill.
        up.freeze()
        assert pipe.wait_quiet(0.5), pipe.failures
        in_flight = pipe.outstanding()
        kill_and_restart(up, px, pipe, sides.serve, path)
        assert pipe.wait_done(len(pipe.done) + 60), (pipe.failures, pipe.outstanding())
        assert pipe.finish(), pipe.failures
    assert len(in_flight) >= 8, in_flight
    assert all(op.error == 0 for op in in_flight), in_flight
    assert any(op.done_mark == 2 for op in in_flight), in_flight
    assert_reconnected(px)


def test_upstream_killed_mid_write_payload(sides, make_file):
    """Large WRITEs and READs in flight; the upstream is killed by the client's sender when it
    has sent half of a 4-8 MiB WRITE payload and at least two more requests are unanswered.
    (Under TLS the half sent may still be on its way through the TLS front: in flight all the
    same.)"""
    size = 64 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    px = sides.proxy(up.port, "--cache=0")
    killed = threading.Event()
    victim: list[tuple[Op, int, list[Op]]] = []

    def hook(pipe: Pipeline, op: Op, sent: int) -> None:
        if killed.is_set() or op.type != WRITE or op.index < 8 or sent < op.length // 2:
            return
        unanswered = pipe.outstanding()
        if len(unanswered) >= 3:
            os.kill(up.pid, signal.SIGKILL)
            victim.append((op, sent, unanswered))
            killed.set()

    ops = mixed(random.Random(2), size, (4 * MiB, 8 * MiB), (64 * KiB, MiB, 2 * MiB))
    with Pipeline(sides.connect(px), model, ops, depth=6, hook=hook) as pipe:
        assert pipe.wait(killed.is_set, 60), (pipe.failures, len(pipe.done))
        in_flight = pipe.outstanding()
        kill_and_restart(up, px, pipe, sides.serve, path)
        assert pipe.wait_done(len(pipe.done) + 20), (pipe.failures, pipe.outstanding())
        assert pipe.finish(), pipe.failures
    op, sent, unanswered = victim[0]
    assert 0 < sent < op.length
    assert op in in_flight and op.error == 0 and op.done_mark == 2, op
    assert all(o.error == 0 for o in unanswered), unanswered
    assert_file_is(path, model)
    assert_reconnected(px)


@pytest.mark.parametrize("how", ["reset", "stall-then-kill"])
def test_upstream_lost_mid_write_payload_at_the_relay(serve, proxy, relay, make_file, how):
    """The upstream connection dies (reset; or the upstream is killed while the relay holds
    the rest of the payload) when exactly half of the third WRITE's payload has reached it."""
    size, length = 48 * MiB, 6 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = serve(path)
    r, px, fault, hs_up, _ = relayed_proxy(up.port, relay, proxy)
    # Requests go upstream in the client's order: WRITEs 0 and 1 whole, WRITE 2 up to its middle.
    at = hs_up + 2 * (HEADER + length) + HEADER + length // 2
    if how == "reset":
        fault.reset_after_up = at
    else:
        fault.stall_after_up = at
    rng = random.Random(3)
    first = [Op(WRITE, i * length, length, rng.randbytes(length)) for i in range(4)]
    ops = itertools.chain(first, mixed(rng, size, (MiB, 4 * MiB), (4 * KiB, MiB)))
    with Pipeline(connect_when_free(px.port), model, ops, depth=4) as pipe:
        assert pipe.wait(lambda: r.connections[0].triggered, 30), \
            (r.connections, pipe.failures)
        if how == "stall-then-kill":
            assert pipe.wait_quiet(0.3), pipe.failures
            assert first[2] in pipe.outstanding()
            kill_and_restart(up, px, pipe, serve, path)
        assert pipe.wait_done(len(pipe.done) + 30), (pipe.failures, pipe.outstanding())
        assert pipe.finish(), pipe.failures
    assert r.connections[0].up == at, r.connections[0]
    assert len(r.connections) >= 2, r.connections
    assert all(op.error == 0 for op in first), first
    if how == "stall-then-kill":
        assert first[2].done_mark == 2, first[2]
    assert_file_is(path, model)
    assert_reconnected(px)


# -- 2. the upstream comes back with another size --------------------------------------------

@pytest.mark.parametrize("when", ["in-flight", "sent-while-down"])
def test_upstream_back_with_another_size(sides, relay, make_file, when):
    """The upstream dies with a READ and a WRITE unanswered (in flight at it, frozen, then
    killed; or sent after it died) and comes back with another size: refused, retried, nothing
    answered from it and nothing written to it; once the right size is back, both complete."""
    size = 8 * MiB
    path = make_file(size)
    wrong = make_file(12 * MiB)
    wrong_before = wrong.read_bytes()
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    port = up.port
    r, px, _, hs_up, _ = relayed_proxy(port, relay, sides.proxy)
    rng = random.Random(4)
    data = rng.randbytes(64 * KiB)
    with sides.connect(px) as c:
        assert c.size == size
        first = rng.randbytes(100 * KiB)
        assert c.write(5000, first) == 0
        model.write(5000, first)
        if when == "in-flight":
            up.freeze()
        else:
            up.kill()
            wait_logged(px, "W", "upstream")
        before = r.connections[0].up
        rc = c.send_request(READ, MiB + 3, 64 * KiB)
        wc = c.send_request(WRITE, 2 * MiB, len(data), payload=data)
        if when == "in-flight":
            if sides.tls:       # records: at least the plaintext, and then nothing more
                assert up_settles(r.connections[0], before + 2 * HEADER + len(data)), \
                    r.connections
            else:
                sent = hs_up + HEADER + len(first) + 2 * HEADER + len(data)
                assert wait_until(lambda: r.connections[0].up == sent, 15), r.connections
            up.kill()
            wait_logged(px, "W", "upstream")
        wrong_up = sides.serve(wrong, port=port)
        # Refused, and retried: two errors about that upstream.
        wait_logged(px, "E", "upstream", count=2)
        assert nothing_to_read(c, 0.5), "the proxy answered from an upstream of the wrong size"
        assert px.proc.poll() is None, px.log()
        wrong_up.kill()
        assert wrong.read_bytes() == wrong_before, "a WRITE reached the wrong-size upstream"
        sides.serve(path, port=port)
        got = recv_replies(c, {rc: 64 * KiB}, 2)
        assert got[wc] == (0, b""), got[wc]
        assert got[rc][0] == 0, got[rc][0]
        assert model.mismatch(MiB + 3, got[rc][1]) is None
        model.write(2 * MiB, data)
        assert model.mismatch(0, c.read(0, size)) is None
    assert_file_is(path, model)
    assert wrong.read_bytes() == wrong_before
    assert_reconnected(px)
    refused = log_lines(px, "E", "upstream")
    assert refused and all("size" in line for line in refused), \
        f"the errors about the refused upstream do not say 'size':\n{px.log()}"


def test_reconnect_empties_the_read_ahead_cache(sides, make_file):
    """With --cache (4096 bytes), a 4 KiB READ fetches 8 KiB and keeps the second half. After
    the upstream restarts (with that half changed meanwhile) the kept copy is not served."""
    size = MiB
    path = make_file(size)
    original = path.read_bytes()
    up = sides.serve(path)
    px = sides.proxy(up.port, "--cache")

    def change(offset: int) -> bytes:
        new = os.urandom(4096)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(new)
        return new

    with sides.connect(px) as c:
        # The cache is in use: a block changed behind the proxy's back still reads old.
        assert c.read(32 * KiB, 4096) == original[32 * KiB:36 * KiB]
        change(36 * KiB)
        assert c.read(36 * KiB, 4096) == original[36 * KiB:40 * KiB]
        assert c.read(0, 4096) == original[:4096]          # keeps 4096..8191
        up.kill()
        changed = change(4096)
        sides.serve(path, port=up.port)
        wait_logged(px, "I", "reconnected")
        assert c.read(4096, 4096) == changed, "a READ was answered from the cache of before " \
                                              "the reconnect"
    assert log_lines(px, "W", "upstream"), px.log()


# -- 3. error replies are passed on once -----------------------------------------------------

def test_error_replies_passed_on_once(make_file, proxy):
    """A fake upstream answers the second request EIO; READ and WRITE past the end get EINVAL
    and ENOSPC. The client gets each error once, the upstream sees each request once, the
    session goes on."""
    size = MiB
    path = make_file(size)
    original = path.read_bytes()
    script = Script(greeting="newstyle", fail_at=1, fault="error", error=wire.NBD_EIO)
    with FakeDest(size, path, default=script) as dest:
        px = proxy(dest.port, "--cache=0")
        data = os.urandom(4096)
        with connect_when_free(px.port) as c:
            assert c.size == size
            steps = [
                (READ, 0, 4096, b"", 0),
                (READ, 8192, 4096, b"", wire.NBD_EIO),
                (READ, size - 512, 1024, b"", wire.NBD_EINVAL),
                (WRITE, size, 512, bytes(512), wire.NBD_ENOSPC),
                (READ, 8192, 4096, b"", 0),
                (WRITE, 4096, 4096, data, 0),
                (READ, 0, 12288, b"", 0),
            ]
            got = [c.request(t, off, n, payload=p) for t, off, n, p, _ in steps]
            assert [g.error for g in got] == [s[4] for s in steps]
            assert got[0].data == original[:4096]
            assert got[4].data == original[8192:12288]
            assert got[6].data == original[:4096] + data + original[8192:12288]
            assert px.proc.poll() is None
        seen = [(q.type, q.offset, q.length, q.error) for q in dest.conns[0].requests]
    assert seen == [(t, off, n, e) for t, off, n, _, e in steps], seen
    assert len(dest.conns) == 1, "the proxy reconnected after an error reply"


NBD_PAST_END = r"""
import hashlib, json, sys
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
out = {"size": size}
try:
    h.pread(4096, size - 2048)
    out["past_end"] = "ok"
except nbd.Error as e:
    out["past_end"] = e.errno
out["after"] = hashlib.sha256(h.pread(65536, 0)).hexdigest()
h.shutdown()
print(json.dumps(out))
"""


def test_read_past_the_end_answered_once(serve, proxy, relay, make_file):
    """A real upstream answers a READ past the end EINVAL: python-libnbd gets EINVAL (0.5.0's
    proxy retried it forever), exactly one such request went upstream, the session goes on."""
    python = require_python_nbd()
    size = 2 * MiB
    path = make_file(size)
    up = serve(path)
    r, px, _, hs_up, _ = relayed_proxy(up.port, relay, proxy)
    res = subprocess.run([python, "-c", NBD_PAST_END, px.uri], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode()
    out = json.loads(res.stdout)
    assert out == {"size": size, "past_end": "EINVAL",
                   "after": hashlib.sha256(path.read_bytes()[:65536]).hexdigest()}, out
    # Two READ headers went upstream on one connection: the failed one was not retried.
    assert len(r.connections) == 1, r.connections
    assert r.connections[0].up - hs_up == 2 * HEADER, r.connections[0]
    assert px.proc.poll() is None


# -- 4. the upstream stops answering ---------------------------------------------------------

def test_upstream_never_answers(make_file, proxy):
    """A fake upstream takes the second request and never answers again: after
    FLEXNBD_UPSTREAM_TIMEOUT the proxy reconnects and re-sends what was unanswered."""
    size = 4 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    newstyle = Script(greeting="newstyle")
    hang = Script(greeting="newstyle", fail_at=1, fault="hang")
    with FakeDest(size, path, scripts=[hang], default=newstyle) as dest:
        px = proxy(dest.port, "--cache=0", env=SHORT_TIMEOUT)
        rng = random.Random(5)
        w0 = Op(WRITE, 1000, 64 * KiB, rng.randbytes(64 * KiB))
        r1 = Op(READ, 0, 256 * KiB)
        rest = list(itertools.islice(mixed(rng, size, (1, 256 * KiB), (4 * KiB, 64 * KiB)), 30))
        with Pipeline(connect_when_free(px.port), model, [w0, r1, *rest], depth=4) as pipe:
            assert pipe.finish(60, all_ops=True), pipe.failures
            assert len(pipe.done) == 2 + len(rest), pipe.sent
        assert dest.conns[0].fault_fired, dest.conns
        never = dest.conns[0].requests[1]                 # the one never answered
        assert (never.type, never.offset, never.length) == (READ, 0, r1.length), never
        assert len(dest.conns) >= 2, dest.conns
        resent = [(q.type, q.offset, q.length) for c in dest.conns[1:] for q in c.requests]
        assert (READ, 0, r1.length) in resent, resent
    assert w0.error == 0 and r1.error == 0
    assert_file_is(path, model)
    assert_reconnected(px)


def test_upstream_stalls_mid_reply(sides, relay, make_file):
    """The relay stops passing replies in the middle of the first READ's data (under TLS: in
    the middle of one of its records): the proxy gives up after FLEXNBD_UPSTREAM_TIMEOUT,
    reconnects (the relay passes the next connection), re-sends, and the client gets correct
    data."""
    size = 8 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    r, px, fault, _, hs_down = relayed_proxy(up.port, relay, sides.proxy, env=SHORT_TIMEOUT)
    fault.stall_after_down = hs_down + REPLY + 1000
    rng = random.Random(6)
    head = Op(READ, 12345, 64 * KiB)
    rest = list(itertools.islice(mixed(rng, size, (1, MiB), (4 * KiB, 256 * KiB)), 30))
    with Pipeline(sides.connect(px), model, [head, *rest], depth=4) as pipe:
        assert pipe.finish(60, all_ops=True), pipe.failures
        assert len(pipe.done) == 1 + len(rest), pipe.sent
    assert r.connections[0].triggered == ["stall_after_down"], r.connections[0]
    assert r.connections[0].down == hs_down + REPLY + 1000
    assert len(r.connections) >= 2, r.connections
    assert head.error == 0
    assert_file_is(path, model)
    assert_reconnected(px)


# -- 5. the client vanishes mid-request ------------------------------------------------------

@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_gone_mid_write_payload(sides, make_file, how):
    size = 32 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    px = sides.proxy(up.port, "--cache=0")
    rng = random.Random(7)
    a, b, half = rng.randbytes(MiB), rng.randbytes(MiB + 17), rng.randbytes(8 * MiB)
    c = sides.connect(px)
    try:
        assert c.write(0, a) == 0
        model.write(0, a)
        assert c.write(2 * MiB + 5, b) == 0
        model.write(2 * MiB + 5, b)
        c.send(wire.pack_request(WRITE, 8 * MiB, len(half), 99) + half[:4 * MiB])
    finally:
        if how == "close":
            c.close()
        else:
            c.reset()
    with sides.connect(px) as c2:
        assert model.mismatch(0, c2.read(0, 16 * MiB)) is None   # a and b, and no half
        later = rng.randbytes(3 * MiB)
        assert c2.write(10 * MiB, later) == 0
        model.write(10 * MiB, later)
        assert c2.read(10 * MiB, len(later)) == later
    assert px.proc.poll() is None, px.log()
    assert_file_is(path, model)


def test_client_gone_with_reads_in_flight(sides, relay, make_file):
    """16 READs of 2 MiB in flight, the proxy busy passing their data on, and the client
    resets. The next client (same cookies, other ranges) gets its own data only."""
    size = 32 * MiB
    path = make_file(size)
    original = path.read_bytes()
    up = sides.serve(path)
    r, px, _, _, hs_down = relayed_proxy(up.port, relay, sides.proxy)
    c = sides.connect(px, rcvbuf=32 * KiB)
    try:
        for i in range(16):
            c.send_request(READ, i * 2 * MiB, 2 * MiB)
        assert wait_until(lambda: r.down_total >= hs_down + MiB, 30), r.connections
    finally:
        c.reset()
    with sides.connect(px) as c2:
        want = {}
        for i in range(16):
            offset = (15 - i) * 2 * MiB + 4097
            cookie = c2.send_request(READ, offset, MiB - 3)
            want[cookie] = offset
        assert sorted(want) == list(range(1, 17))     # the cookies the first client used
        got = recv_replies(c2, {k: MiB - 3 for k in want}, 16)
        for cookie, offset in want.items():
            assert got[cookie] == (0, original[offset:offset + MiB - 3]), cookie
        data = os.urandom(5000)
        assert c2.write(777, data) == 0
        assert c2.read(0, 8192) == original[:777] + data + original[5777:8192]
    assert px.proc.poll() is None, px.log()


def test_a_client_that_reads_no_reply_is_dropped(sides, make_file):
    """A client that sends READs and never reads their replies is disconnected once nothing
    could be sent to it for FLEXNBD_SEND_TIMEOUT seconds, as the server drops such a client;
    the requests upstream already had are seen through, and the next client is served."""
    size = 64 * MiB
    path = make_file(size)
    original = path.read_bytes()
    up = sides.serve(path)
    px = sides.proxy(up.port, "--cache=0", env={"FLEXNBD_SEND_TIMEOUT": "1"})
    c = sides.connect(px, rcvbuf=32 * KiB)
    try:
        for i in range(16):
            c.send_request(READ, i * 4 * MiB, 4 * MiB)
        wait_logged(px, "W", "read no reply for 1 s", timeout=30)
    finally:
        c.close()
    with sides.connect(px) as c2:
        assert c2.read(4097, 8192) == original[4097:4097 + 8192]
    assert px.proc.poll() is None, px.log()
    assert not log_lines(px, "W", "upstream"), px.log()     # upstream was never in question


# -- 6, 7. oversized requests and garbage end the client's session only ----------------------

BIG = wire.MAX_PAYLOAD + 1


@pytest.mark.parametrize("bad", ["oversized-read", "oversized-write", "bad-magic"])
def test_bad_request_ends_the_session(sides, relay, make_file, bad):
    size = 40 * MiB
    path = make_file(size)
    model = DiskModel(path.read_bytes())
    up = sides.serve(path)
    r, px, _, _, _ = relayed_proxy(up.port, relay, sides.proxy)
    data = os.urandom(64 * KiB)
    c = sides.connect(px)
    try:
        stream = (wire.pack_request(WRITE, MiB, len(data), 1) + data
                  + wire.pack_request(READ, 4 * MiB, 64 * KiB, 2))
        if bad == "oversized-read":
            stream += wire.pack_request(READ, 0, BIG, 3)
        elif bad == "oversized-write":
            stream += wire.pack_request(WRITE, 0, BIG, 3) + os.urandom(64 * KiB)
        else:
            stream += wire.pack_request(READ, 0, 4096, 3, magic=0x12345678)
        try:
            c.send(stream)
        except OSError:
            pass                    # the proxy may close before taking the whole stream
        got = recv_replies(c, {2: 64 * KiB}, 2)
        assert got[1] == (0, b""), got[1]
        model.write(MiB, data)
        assert got[2][0] == 0 and model.mismatch(4 * MiB, got[2][1]) is None
        try:
            rest = c.read_until_closed()
        except TimeoutError:
            raise AssertionError(f"{bad}: the proxy kept the session open") from None
        if rest:                         # at most an error reply for the bad request
            assert len(rest) == REPLY, rest
            magic, error, cookie = struct.unpack(">IIQ", rest)
            assert (magic, cookie) == (wire.SIMPLE_REPLY_MAGIC, 3) and error != 0, rest
    finally:
        c.close()
    assert px.proc.poll() is None, px.log()
    with sides.connect(px) as c2:
        assert model.mismatch(0, c2.read(0, 8 * MiB)) is None
        more = os.urandom(10000)
        assert c2.write(3 * MiB, more) == 0
        model.write(3 * MiB, more)
        assert c2.read(3 * MiB, len(more)) == more
    assert_file_is(path, model)
    # Nothing of the bad request went upstream: the upstream connection is the first one.
    assert len(r.connections) == 1, (r.connections, px.log())

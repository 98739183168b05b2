"""A keyless peer never gets the disk (SPEC §11, issue 21): every side of flexnbd that takes
TLS input refuses a peer that lacks the key, skips a step or lies, with one line saying why;
nothing of the disk leaves to it, no file is unlinked, and a server keeps serving the others.

Client sides, each holding a PSK: the mirror of a `serve --tls=require --tls-psk`
(`mirror --wait --unlink`), flexnbd-proxy's upstream (`--conn-tls-psk`), `read` and `write`
(`--tls-psk`). Their peers (tests/fakes/tlsimpostor.py, or a real server with the wrong
credentials): a TLS server that knows no PSK but has a certificate (OpenSSL completes that
handshake for a PSK client that does not check: the impostor then takes WRITEs, answers FLUSH,
confirms DISC with a close_notify and serves forged READs), one that declines STARTTLS, one that
greets oldstyle, one that answers STARTTLS as if it were GO, one that answers it with garbage,
one that sends plaintext where TLS should begin, and `flexnbd serve` with another key or
another identity. Each side refuses at once with one line (the mirror without a retry, its
file kept and its clients served); the peer saw one connection, no request and no byte after
its TLS handshake. A mirror with X.509 credentials refuses a self-signed certificate and one
of its CA naming another host.

One deadline for the whole thing, not one per byte: an impostor with the right key trickles
everything from its greeting on (the mirror gives up at the greeting's 5 s), the FLUSH reply
(the attempt fails within the request limit, is retried, and `break` ends it) or the
close_notify after DISC (the outcome is unknown: exit 1, the file kept).

Server sides (`serve`, `listen`, and flexnbd-proxy towards its client, each `--tls=require`):
a TLS client with no key, the right identity with a wrong key, a client certificate of another
CA (`--tls-verify-peer`), a plaintext client (ERR_TLS_REQD for every option, a hang-up for
EXPORT_NAME, never the size), a client that trickles its ClientHello (cut at the whole
handshake's deadline while a legitimate client is served). Each is refused with one warning
line and the legitimate client is served.

Listen mode's single slot: a silent TCP connection, a plaintext client idle after its
handshake, a keyless client stalled in its TLS handshake, and all three at once, opened before
the mirror and held until it ends, cannot keep the migration out; nor can a crowd of 20
silent connections, more than the listener takes at once.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import FLEXNBD_PROXY, free_port, require_tool
from tests.fakes.relay import Relay
from tests.fakes.tlsimpostor import Impostor, Script
from tests.support import control as cu
from tests.support.clients import check, run
from tests.support.migration import (
    MiB,
    assert_completed,
    logs,
    mirror_cli,
    mirror_request,
    out,
    running,
    wait_exit,
)
from tests.support.rawclient import RawClient, connect_to_options
from tests.support.tlscreds import make_ca, make_psk, psk_uri, sign, x509_uri
from tests.support.waiting import log_lines, wait_logged, wait_until

SIZE = 2 * MiB
LIMIT = 1.0                  # FLEXNBD_MS_REQUEST_LIMIT_SECS of the trickle tests
HANDSHAKE_LIMIT = 2.0        # FLEXNBD_HANDSHAKE_TIMEOUT of the trickling client's test
NOT_PSK = "TLS handshake failed: the server did not use the pre-shared key"


def where(port: int, offset: int = 0, size: int = 4096) -> list[str]:
    return ["--addr", "127.0.0.1", "--port", str(port), "--from", str(offset),
            "--size", str(size)]


def one_line(text: bytes | str) -> str:
    """The one line a refusing client side says (never a traceback)."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def reply_and_why(text: bytes) -> tuple[str, str]:
    """What a refusing `mirror` says: the 0.5.0 reply text, then why on the next line."""
    decoded = text.decode(errors="replace")
    assert "Traceback" not in decoded, decoded
    lines = decoded.splitlines()
    assert len(lines) == 2, decoded
    return lines[0], lines[1]


def psk_key(keys: Path) -> bytes:
    return bytes.fromhex(keys.read_text().strip().split(":")[1])


def keyless_context() -> ssl.SSLContext:
    """A TLS 1.3 client that offers no PSK and takes any certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def client_hello() -> bytes:
    """The first flight of a keyless TLS client: its ClientHello record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = keyless_context().wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --------------------------------------------------------------------------------------------
# Client sides: mirror, read, write, proxy upstream, each holding the PSK file `psk`


def mirror_refused(start_server, run_flexnbd, tmp_path: Path, port: int,
                   serve_tls: list[str], read_tls: list[str]) -> tuple[str, str]:
    """A `serve` source with the TLS options ``serve_tls`` runs `mirror --wait --unlink` to
    ``port``, which it must refuse; what it said (the reply text, why). Checked: no retry (the
    mirror ended with its first attempt), the source's file is still there with its bytes, and
    the source serves (a `read` with ``read_tls``)."""
    data = os.urandom(SIZE)
    src_file = tmp_path / "source.img"
    src_file.write_bytes(data)
    src = start_server(src_file, *serve_tls)
    res = mirror_cli(src, port, "--wait", "--unlink", timeout=40)
    assert res.returncode != 0, out(res)
    assert res.stdout == b"", out(res)
    said = reply_and_why(res.stderr)
    assert wait_until(lambda: cu.status(src.sock)["is_mirroring"] == "false"), src.log()
    assert running(src) and "retrying" not in src.log(), src.log()
    assert src_file.read_bytes() == data
    res = run_flexnbd("read", *where(src.port), *read_tls, timeout=30)
    assert res.returncode == 0 and res.stdout == data[:4096], res.stderr
    return said


@pytest.fixture(params=["mirror", "read", "write", "proxy"])
def psk_client(request, start_server, run_flexnbd, tmp_path, psk) -> Callable[[int], str]:
    """psk_client(port): this client side dials the server on ``port``, which it must
    refuse; the one line it said. Checked here, per side: the exit status; for the mirror,
    what mirror_refused checks; for read, nothing on stdout; for the proxy, it never
    listened."""
    side = request.param

    def mirror(port: int) -> str:
        reply, why = mirror_refused(start_server, run_flexnbd, tmp_path, port,
                                    ["--tls=require", "--tls-psk", str(psk)],
                                    ["--tls-psk", str(psk)])
        assert reply == "Mirror was rejected", (reply, why)
        return why

    def read(port: int) -> str:
        res = run_flexnbd("read", *where(port), "--tls-psk", str(psk), timeout=15)
        assert res.returncode == 1, (res.returncode, res.stderr)
        assert res.stdout == b"", res.stdout[:32]
        return one_line(res.stderr)

    def write(port: int) -> str:
        res = run_flexnbd("write", *where(port), "--tls-psk", str(psk),
                          input=os.urandom(4096), timeout=15)
        assert res.returncode == 1, (res.returncode, res.stderr)
        return one_line(res.stderr)

    def proxy(port: int) -> str:
        listen = free_port()
        res = subprocess.run(FLEXNBD_PROXY + ["--addr", "127.0.0.1", "--port", str(listen),
                                              "--conn-addr", "127.0.0.1", "--conn-port",
                                              str(port), "--conn-tls-psk", str(psk)],
                             capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        assert res.returncode == 1, (res.returncode, res.stderr)
        line = one_line(res.stderr)
        assert line.startswith(f"flexnbd-proxy: upstream 127.0.0.1:{port}: "), line
        with pytest.raises(OSError):                 # it never listened
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
        return line

    return {"mirror": mirror, "read": read, "write": write, "proxy": proxy}[side]


@dataclass
class Peer:
    port: int
    reason: str | None                 # what the refusal must say (None: any reason)
    untouched: Callable[[], None]      # asserts: one connection, nothing of the disk got to it


# The impostors, and what a client side refusing each must say.
IMPOSTORS = {
    "certificate-only": (Script(), NOT_PSK),
    "no-tls": (Script(starttls="unsup"), "the server does not offer TLS"),
    "oldstyle": (Script(greeting="oldstyle"), "oldstyle handshake, which has no TLS"),
    "starttls-answered-as-go": (Script(starttls="skip"), None),
    "garbage-for-starttls": (Script(starttls="garbage"), None),
    "plaintext-after-ack": (Script(starttls="plaintext"), "TLS handshake failed"),
}


@pytest.fixture(params=[*IMPOSTORS, "other-key", "other-identity"])
def hostile_peer(request, tmp_path, serve, make_file, psk) -> Iterator[Peer]:
    """A server a client holding ``psk`` must refuse: an impostor, or `flexnbd serve` with
    another key (identity alice) or another identity (bob, with alice's key)."""
    name = request.param
    if name in IMPOSTORS:
        script, reason = IMPOSTORS[name]
        ca = make_ca(tmp_path / "impostor")           # a self-signed certificate
        with Impostor(SIZE, script, certificate=(ca / "ca-cert.pem", ca / "ca-key.pem")) as imp:
            def untouched() -> None:
                assert len(imp.conns) == 1, imp.conns                # no retry
                conn = imp.conns[0]
                imp.wait(lambda: conn.ended, timeout=5)
                assert not conn.options and not conn.requests and conn.payload == 0, conn
                if script.starttls != "plaintext":       # (there, the ClientHello came)
                    assert conn.received == 0, conn
            yield Peer(imp.port, reason, untouched)
        return
    if name == "other-key":
        keys = make_psk(tmp_path / "other")
    else:
        keys = make_psk(tmp_path / "bob", identity="bob", key=psk_key(psk))
    data = os.urandom(SIZE)
    path = make_file(data=data)
    server = serve(path, "--tls=require", "--tls-psk", str(keys))
    with Relay(server.port) as relay:                   # (it counts the connections)
        def untouched_server() -> None:
            assert len(relay.connections) == 1, relay.connections
            wait_logged(server, "W", "handshake failed")
            assert path.read_bytes() == data
            assert server.proc.poll() is None, server.log()
        yield Peer(relay.port, "TLS handshake failed", untouched_server)


def test_a_psk_client_side_refuses_a_peer_without_the_key(psk_client, hostile_peer):
    started = time.monotonic()
    line = psk_client(hostile_peer.port)
    # At once, though the impostors never hang up first: within the greeting's deadline.
    assert time.monotonic() - started < 10
    if hostile_peer.reason is not None:
        assert hostile_peer.reason in line, line
    hostile_peer.untouched()


@pytest.mark.parametrize("problem", ["self-signed", "names-another-host"])
def test_an_x509_mirror_refuses_a_certificate_it_cannot_trust(start_server, run_flexnbd,
                                                              tmp_path, x509, problem):
    """The same, for a source with X.509 credentials: the destination's certificate must be
    signed by its CA and name the address dialled."""
    server_dir, client_dir = x509
    if problem == "self-signed":
        ca = make_ca(tmp_path / "impostor")
        certificate = (ca / "ca-cert.pem", ca / "ca-key.pem")
    else:
        elsewhere = tmp_path / "elsewhere"
        sign(tmp_path / "x509" / "ca", elsewhere, "server", "serverAuth", ("nbd.example.com",))
        certificate = (elsewhere / "server-cert.pem", elsewhere / "server-key.pem")
    with Impostor(SIZE, Script(), certificate=certificate) as imp:
        reply, why = mirror_refused(start_server, run_flexnbd, tmp_path, imp.port,
                                    ["--tls=require", "--tls-certificates", str(server_dir)],
                                    ["--tls-certificates", str(client_dir)])
        assert reply == "Mirror was rejected", (reply, why)
        assert why.startswith("TLS handshake failed: "), why
        # the usual causes, for X.509
        assert why.endswith(" (TLS: is its certificate signed by our ca-cert.pem, and made "
                            "for 127.0.0.1?)"), why
        assert len(imp.conns) == 1 and imp.conns[0].received == 0, imp.conns


# --------------------------------------------------------------------------------------------
# The mirror's deadlines: one for a whole reply, however it trickles in


def trickle_source(start_server, tmp_path: Path, keys: Path) -> tuple[cu.Proc, Path, bytes]:
    data = os.urandom(SIZE)
    src_file = tmp_path / "source.img"
    src_file.write_bytes(data)
    src = start_server(src_file, "--tls=require", "--tls-psk", str(keys),
                       env={"FLEXNBD_MS_REQUEST_LIMIT_SECS": str(LIMIT)})
    # A mirror that finds the map unbuilt lets its first connection go and connects again
    # (SPEC §6.2): wait, so that the impostor's first connection is the one that migrates.
    src.wait_for_log("allocation map: built", timeout=30)
    return src, src_file, data


def test_a_trickled_greeting_is_given_up_at_the_greeting_deadline(start_server, run_flexnbd,
                                                                   tmp_path, psk):
    """The destination sends everything one byte every 0.5 s (its 18-byte greeting alone takes
    9 s): the mirror waits at most 5 s for the greeting (SPEC §6.2), not 5 s per byte."""
    with Impostor(SIZE, Script(trickle="greeting", gap=0.5), psk_file=psk) as imp:
        started = time.monotonic()
        said = mirror_refused(start_server, run_flexnbd, tmp_path, imp.port,
                              ["--tls=require", "--tls-psk", str(psk)], ["--tls-psk", str(psk)])
        elapsed = time.monotonic() - started
        assert said == ("Remote server failed to respond", "no NBD greeting within 5 s"), said
        assert elapsed < 8, f"gave up after {elapsed:.1f} s"
        assert len(imp.conns) == 1 and imp.conns[0].received == 0, imp.conns


def test_a_trickled_flush_reply_fails_the_attempt_within_the_request_limit(start_server,
                                                                           tmp_path, psk):
    """The destination (with the key) sends the FLUSH reply's record one byte every 0.3 s (it
    would take about 11 s): the attempt fails at the request limit (1 s), before DISC, and is
    retried; `break` then stops the mirror and the source serves on with its file."""
    src, src_file, data = trickle_source(start_server, tmp_path, psk)
    with Impostor(SIZE, Script(trickle="flush"), psk_file=psk) as imp:
        assert mirror_request(src, imp.port, action="unlink") == "0: Mirror started\n"
        assert imp.wait(lambda: imp.conns and imp.conns[0].flush_time is not None, 30), \
            src.log()
        first = imp.conns[0]
        assert first.tls and first.payload == SIZE, first
        assert imp.wait(lambda: first.client_gone is not None, 3 * LIMIT + 2), \
            f"the source still waits for the trickled FLUSH reply:\n{src.log()}"
        assert first.client_gone - first.flush_time < 3 * LIMIT, first
        assert first.disc_time is None, first
        assert imp.wait(lambda: len(imp.conns) >= 2, 10), src.log()      # retried
        assert cu.stopped(cu.control(src.sock, "break"))
    assert "retrying" in src.log()
    assert cu.status(src.sock)["is_mirroring"] == "false"
    assert running(src) and src_file.read_bytes() == data


def test_a_trickled_close_notify_after_disc_leaves_the_outcome_unknown(start_server,
                                                                       tmp_path, psk):
    """After DISC the close_notify comes one byte every 0.3 s (about 7 s for the record): at
    the request limit the outcome is unknown (SPEC §6.7): exit 1, the file kept, no retry."""
    src, src_file, data = trickle_source(start_server, tmp_path, psk)
    with Impostor(SIZE, Script(trickle="close"), psk_file=psk) as imp:
        res = mirror_cli(src, imp.port, "--wait", "--unlink", timeout=30)
        assert res.returncode == 1, out(res)
        assert "migration outcome unknown" in res.stderr.decode(), out(res)
        conn = imp.conns[0]
        assert conn.disc_time is not None, conn
        assert imp.wait(lambda: conn.client_gone is not None, 10), src.log()
        assert conn.client_gone - conn.disc_time < 3 * LIMIT, conn
        assert len(imp.conns) == 1
    assert wait_exit(src, 30) == 1
    assert src_file.read_bytes() == data
    assert "migration completed" not in src.log()


# --------------------------------------------------------------------------------------------
# Server sides: serve, listen, and flexnbd-proxy towards its client, each --tls=require


@pytest.fixture(params=["serve", "listen", "proxy"])
def server_kind(request) -> str:
    return request.param


@pytest.fixture
def tls_server(server_kind, serve, proxy, make_file):
    """tls_server(*tls_args, env=None): a server of this kind requiring TLS with ``tls_args``
    (the proxy in front of a plaintext `serve`), ready."""
    def start(*tls_args: str, env: dict | None = None):
        if server_kind == "proxy":
            upstream = serve(make_file(SIZE))
            return proxy(upstream.port, *tls_args, env=env)
        return serve(make_file(SIZE), *tls_args, env=env, mode=server_kind)
    return start


def assert_serves_with(server, uri: str) -> None:
    """A legitimate client (nbdinfo with its credentials in ``uri``) sees the export."""
    assert int(check([require_tool("nbdinfo"), "--size", uri], timeout=30).strip()) == SIZE
    assert server.proc.poll() is None, server.log()


def refusals(server) -> list[str]:
    """The server's warning lines about failed TLS handshakes."""
    return log_lines(server, "W", "handshake")


def test_a_tls_client_without_a_key_is_refused(tls_server, psk):
    server = tls_server("--tls=require", "--tls-psk", str(psk))
    with connect_to_options(server.port) as c:
        assert [r.type for r in c.option(wire.OPT_STARTTLS)] == [wire.REP_ACK]
        with pytest.raises((ssl.SSLError, OSError)):
            c.sock = keyless_context().wrap_socket(c.sock)
            c.go()                           # had it got in: the size, then the data
        assert c.size is None
    assert wait_until(lambda: refusals(server)), server.log()
    assert_serves_with(server, psk_uri(server, psk))
    assert len(refusals(server)) == 1, server.log()
    assert not log_lines(server, "E") and "Traceback" not in server.log(), server.log()


def test_the_right_identity_with_a_wrong_key_is_refused(tls_server, run_flexnbd, tmp_path,
                                                        psk):
    server = tls_server("--tls=require", "--tls-psk", str(psk))
    wrong = make_psk(tmp_path / "wrong")                 # alice, another key
    res = run_flexnbd("read", *where(server.port), "--tls-psk", str(wrong), timeout=30)
    assert res.returncode == 1 and res.stdout == b"", (res.returncode, res.stderr)
    assert "TLS handshake failed" in one_line(res.stderr)
    res = run([require_tool("nbdinfo"), "--size", psk_uri(server, wrong)], timeout=30)
    assert res.returncode != 0 and str(SIZE) not in res.stdout, res.stdout + res.stderr
    assert_serves_with(server, psk_uri(server, psk))
    assert len(refusals(server)) == 2, server.log()


def test_a_client_certificate_of_another_ca_is_refused(tls_server, run_flexnbd, tmp_path,
                                                       x509):
    server_dir, client_dir = x509
    server = tls_server("--tls=require", "--tls-certificates", str(server_dir),
                        "--tls-verify-peer")
    intruder = tmp_path / "intruder"                     # trusts the server, signed elsewhere
    sign(make_ca(tmp_path / "other-ca"), intruder, "client", "clientAuth", ("intruder",))
    (intruder / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    certless = tmp_path / "certless"                     # trusts the server, shows nothing
    certless.mkdir()
    (certless / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    for directory in (intruder, certless):
        res = run_flexnbd("read", *where(server.port), "--tls-certificates", str(directory),
                          timeout=30)
        assert res.returncode == 1 and res.stdout == b"", (res.returncode, res.stderr)
        one_line(res.stderr)
    assert wait_until(lambda: len(refusals(server)) >= 2), server.log()
    assert_serves_with(server, x509_uri(server, client_dir))


# Before TLS, every option but STARTTLS and ABORT: the known ones, PEEK_EXPORT (4),
# EXTENDED_HEADERS (11) and one nobody knows.
OPTIONS_BEFORE_TLS = [wire.OPT_LIST, 4, wire.OPT_INFO, wire.OPT_GO, wire.OPT_STRUCTURED_REPLY,
                      wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT, 11, 0x4242]


def test_a_plaintext_client_gets_only_err_tls_reqd(tls_server, psk):
    server = tls_server("--tls=require", "--tls-psk", str(psk))
    size = SIZE.to_bytes(8, "big")
    with connect_to_options(server.port) as c:
        for option in OPTIONS_BEFORE_TLS:
            data = RawClient.info_request() if option in (wire.OPT_INFO, wire.OPT_GO) else b""
            replies = c.option(option, data)
            assert [r.type for r in replies] == [wire.REP_ERR_TLS_REQD], (option, replies)
            assert size not in replies[0].data
        assert c.option(wire.OPT_ABORT)[-1].type == wire.REP_ACK
        assert c.is_closed_by_server()
    with connect_to_options(server.port) as c:          # EXPORT_NAME has no error reply
        c.send_option(wire.OPT_EXPORT_NAME, b"")
        assert c.read_until_closed() == b""
    assert_serves_with(server, psk_uri(server, psk))


def trickle(sock: socket.socket, data: bytes, gap: float, until: float) -> float | None:
    """Send ``data`` one byte every ``gap`` seconds until the server closes the connection;
    when it did (time.monotonic()), or None if it had not by ``until``."""
    for byte in data:
        if time.monotonic() > until:
            return None
        try:
            sock.sendall(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], gap)
            if readable and not sock.recv(4096):
                return time.monotonic()
        except OSError:
            return time.monotonic()
    return None


def test_a_trickled_client_hello_is_cut_at_the_handshake_deadline(tls_server, server_kind,
                                                                  psk):
    """A client sends its ClientHello a byte every 0.2 s (a minute's worth): the server cuts
    it at the whole handshake's deadline (2 s), and meanwhile serves a legitimate client (the
    proxy serves one client at a time: its next client is served once the cut is made)."""
    server = tls_server("--tls=require", "--tls-psk", str(psk),
                        env={"FLEXNBD_HANDSHAKE_TIMEOUT": str(HANDSHAKE_LIMIT)})
    hello = client_hello()
    with connect_to_options(server.port) as c:
        accepted = time.monotonic()
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ACK
        cut: list[float | None] = []
        trickler = threading.Thread(target=lambda: cut.append(
            trickle(c.sock, hello, 0.2, accepted + 4 * HANDSHAKE_LIMIT)), daemon=True)
        trickler.start()
        served = None
        try:
            if server_kind != "proxy":
                assert_serves_with(server, psk_uri(server, psk))
                served = time.monotonic()
        finally:
            trickler.join(6 * HANDSHAKE_LIMIT)
    assert cut and cut[0] is not None, f"not cut in {4 * HANDSHAKE_LIMIT} s:\n{server.log()}"
    assert cut[0] - accepted < 3 * HANDSHAKE_LIMIT
    assert served is None or served < cut[0]
    wait_logged(server, "W", "handshake")
    assert_serves_with(server, psk_uri(server, psk))


# --------------------------------------------------------------------------------------------
# Listen mode: squatters cannot keep the migration out of its single slot


@contextlib.contextmanager
def squatter(how: str, port: int) -> Iterator[RawClient]:
    """A connection to the listener, open until the block ends: ``silent`` (greeted, sends
    nothing), ``idle`` (a plaintext client in transmission that sends no request) or
    ``keyless`` (STARTTLS, then half a keyless ClientHello, then nothing)."""
    c = RawClient.connect(port)
    try:
        if how == "silent":
            c.read_greeting()
        elif how == "idle":
            c.handshake()
        else:
            c.read_greeting()
            c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)
            assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ACK
            hello = client_hello()
            c.send(hello[:len(hello) // 2])
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("squatters, listener_tls", [
    (("silent",), "require"),
    (("idle",), "off"),
    (("keyless",), "require"),
    (("silent", "idle", "keyless"), "on"),
], ids=["silent-tcp", "idle-after-handshake", "keyless-mid-tls", "all-three"])
def test_squatters_do_not_keep_the_migration_out(pair, tmp_path, psk, squatters,
                                                 listener_tls):
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(4 * MiB))
    keys = [] if listener_tls == "off" else ["--tls-psk", str(psk)]
    p = pair(src_file, src_args=["--tls=require", *keys] if keys else [],
             dst_args=[f"--tls={listener_tls}", *keys] if keys else [],
             dst_env={"FLEXNBD_LISTEN_IDLE": "2"})
    with contextlib.ExitStack() as held:
        for how in squatters:
            held.enter_context(squatter(how, p.dst.port))
        res = mirror_cli(p.src, p.dst.port, "--wait", timeout=60)
        assert res.returncode == 0, out(res) + "\n" + logs(p.src, p.dst)
    assert_completed(p)


def test_a_crowd_of_silent_connections_does_not_keep_the_migration_out(pair, tmp_path, psk):
    """20 silent connections, more than a listener takes at once (pending handshakes: 16 at
    most, and 8 from one address), each held open: the mirror's connection cuts the oldest
    silent handshake in its way instead of being refused, and the migration completes."""
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(4 * MiB))
    keys = ["--tls=require", "--tls-psk", str(psk)]
    p = pair(src_file, src_args=keys, dst_args=keys)   # (the handshake deadline: 30 s)
    with contextlib.ExitStack() as held:
        for _ in range(20):
            held.enter_context(RawClient.connect(p.dst.port))
        res = mirror_cli(p.src, p.dst.port, "--wait", timeout=25)
        assert res.returncode == 0, out(res) + "\n" + logs(p.src, p.dst)
    assert_completed(p)
    assert "cut the oldest handshake" in p.dst.log()

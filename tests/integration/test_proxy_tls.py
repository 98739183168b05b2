"""flexnbd-proxy over TLS (SPEC §7, §11): ``--tls``/``--tls-psk``/``--tls-certificates``/
``--tls-verify-peer`` for its clients and ``--conn-tls-psk``/``--conn-tls-certificates`` to
upstream, each side on its own.

Real clients through the proxy (nbdinfo and nbdcopy with nbds:// URIs, qemu-img with
tls-creds objects) with PSK and X.509 credentials; TLS upstream only (nbdkit as the upstream)
and downstream only; an upstream killed and restarted under a copying nbdcopy. Then what the
real clients never do, with a raw client (Python's ssl, X.509): plaintext against
``--tls=require``, a wrong key or an untrusted CA, a forged record, a record that never ends.
Then the proxy's own failures: bad TLS credentials upstream at the start (exit 1, one line),
usage errors, an upstream that comes back with the wrong key (retried, loudly, until the
right one is back; the client's requests wait and are then answered), and a record corrupted
between the proxy and upstream (tests/fakes/relay.py flips a byte: a lost upstream, not
wrong bytes).

The proxy's fault tests with TLS on both sides are in test_proxy_faults.py (``sides``).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import FLEXNBD_PROXY, free_port, require_tool
from tests.fakes.relay import Fault, Relay
from tests.support.clients import check, run
from tests.support.procstat import tcp_unread_bytes
from tests.support.rawclient import RawClient, ServerClosed, connect_to_options
from tests.support.serving import alive
from tests.support.tlscreds import (
    PSK_IDENTITY,
    client_uri,
    make_ca,
    make_psk,
    psk_uri,
    sign,
    starttls,
    tls_args,
    tls_client,
    x509_uri,
)
from tests.support.waiting import log_lines, wait_logged, wait_until

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB + 4096


def conn_tls(kind: str, creds) -> list[str]:
    """The proxy's options for TLS to upstream with ``creds``."""
    if kind == "psk":
        return ["--conn-tls-psk", str(creds)]
    return ["--conn-tls-certificates", str(creds[1])]


def disk(make_file, size: int = SIZE) -> Path:
    """Random bytes with a zero run (which nbdcopy may skip or zero)."""
    data = bytearray(os.urandom(size))
    data[MiB:2 * MiB + 4096] = bytes(MiB + 4096)
    return make_file(data=bytes(data))


def tls_both_sides(serve, proxy, path: Path, kind: str, creds, *extra: str):
    """An upstream ``serve --tls=require`` and a proxy with TLS on both sides: (up, proxy)."""
    up = serve(path, *tls_args(kind, creds))
    px = proxy(up.port, *tls_args(kind, creds), *conn_tls(kind, creds), *extra)
    return up, px


def tls_connected(px) -> list[str]:
    """The proxy's lines about clients connected over TLS."""
    return [line for line in px.log().splitlines() if re.search(r" connected \(newstyle, TLSv1",
                                                                line)]


def assert_no_reply(c: RawClient, wait: float, *procs) -> None:
    """Nothing comes from the proxy for ``wait`` seconds (and the connection stays open);
    else what came, and the logs of ``procs`` (the proxy, its upstream)."""
    c.sock.settimeout(wait)
    try:
        got = c.sock.recv(64)
    except TimeoutError:
        return
    finally:
        c.sock.settimeout(15)
    logs = "\n".join(f"--- {p.pid}:\n{p.log()}" for p in procs)
    pytest.fail(f"the proxy sent {got!r} (b'': it closed the connection)\n{logs}")


# --------------------------------------------------------------------------------------------
# Real clients


def test_nbdinfo_and_nbdcopy_both_ways(serve, proxy, make_file, tmp_path, kind, creds):
    nbdinfo, nbdcopy = require_tool("nbdinfo"), require_tool("nbdcopy")
    path = disk(make_file)
    up, px = tls_both_sides(serve, proxy, path, kind, creds)
    uri = client_uri(kind, creds, px)
    assert int(check([nbdinfo, "--size", uri]).strip()) == SIZE
    out = tmp_path / "out.img"
    check([nbdcopy, uri, str(out)], timeout=120)
    assert out.read_bytes() == path.read_bytes()
    new = os.urandom(SIZE)
    src = tmp_path / "new.img"
    src.write_bytes(new)
    check([nbdcopy, src, uri], timeout=120)
    assert path.read_bytes() == new
    assert len(tls_connected(px)) == 3, px.log()
    assert "TLSv1.3" in up.log()
    assert not log_lines(px, "W") and not log_lines(px, "E"), px.log()
    alive(up, px)


def test_qemu_img_convert(serve, proxy, make_file, tmp_path, kind, creds):
    qemu_img = require_tool("qemu-img")
    path = disk(make_file)
    up, px = tls_both_sides(serve, proxy, path, kind, creds)
    if kind == "psk":       # qemu wants DIR/keys.psk
        obj = f"tls-creds-psk,id=tls0,endpoint=client,dir={creds.parent},username={PSK_IDENTITY}"
    else:
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={creds[1]}"
    image = f"driver=nbd,host=127.0.0.1,port={px.port},tls-creds=tls0"
    out = tmp_path / "out.img"
    check([qemu_img, "convert", "--object", obj, "--image-opts", image, "-O", "raw", str(out)],
          timeout=120)
    assert out.read_bytes() == path.read_bytes()
    assert tls_connected(px), px.log()
    alive(up, px)


def test_tls_upstream_only_to_nbdkit(nbdkit_tls, proxy, make_file, tmp_path, psk):
    """nbdkit with TLS required (PSK) upstream; the proxy's clients in plaintext."""
    nbdcopy = require_tool("nbdcopy")
    path = disk(make_file)
    port = nbdkit_tls(path, f"--tls-psk={psk}")
    px = proxy(port, "--conn-tls-psk", str(psk))
    assert "TLSv1.3" in px.log(), px.log()          # the serving line: upstream's TLS
    with RawClient.connect(px.port) as c:           # STARTTLS is not offered downstream
        assert c.read_greeting().style == "newstyle"
        c.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE)
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ERR_UNSUP
        c.go()
        assert c.read(0, 64 * KiB) == path.read_bytes()[:64 * KiB]
    out = tmp_path / "out.img"
    check([nbdcopy, px.uri, str(out)], timeout=120)
    assert out.read_bytes() == path.read_bytes()
    new = os.urandom(SIZE)
    src = tmp_path / "new.img"
    src.write_bytes(new)
    check([nbdcopy, src, px.uri], timeout=120)
    assert path.read_bytes() == new
    assert not tls_connected(px)
    alive(px)


def test_tls_downstream_only(serve, proxy, make_file, tmp_path, psk):
    """A plaintext upstream; the proxy requires TLS (PSK) of its clients."""
    nbdcopy = require_tool("nbdcopy")
    path = disk(make_file)
    up = serve(path)
    px = proxy(up.port, "--tls=require", "--tls-psk", str(psk))
    out = tmp_path / "out.img"
    check([nbdcopy, psk_uri(px, psk), str(out)], timeout=120)
    assert out.read_bytes() == path.read_bytes()
    new = os.urandom(SIZE)
    src = tmp_path / "new.img"
    src.write_bytes(new)
    check([nbdcopy, src, psk_uri(px, psk)], timeout=120)
    assert path.read_bytes() == new
    assert len(tls_connected(px)) == 2, px.log()
    assert "TLS" not in up.log()
    alive(up, px)


def test_tls_on_serves_plaintext_and_tls_clients(serve, proxy, make_file, psk):
    nbdinfo = require_tool("nbdinfo")
    up = serve(disk(make_file), "--tls=require", "--tls-psk", str(psk))
    px = proxy(up.port, "--tls=on", "--tls-psk", str(psk), "--conn-tls-psk", str(psk))
    assert int(check([nbdinfo, "--size", px.uri]).strip()) == SIZE
    assert int(check([nbdinfo, "--size", psk_uri(px, psk)]).strip()) == SIZE
    assert len(tls_connected(px)) == 1, px.log()
    alive(up, px)


@pytest.mark.parametrize("direction", ["from-proxy", "to-proxy"])
def test_nbdcopy_through_an_upstream_restart(serve, proxy, make_file, tmp_path, psk,
                                             direction):
    """nbdcopy copies 128 MiB through the proxy, TLS (PSK) on both sides; once a tenth of it
    has landed the upstream is SIGKILLed and started again on its port. The copy completes,
    the bytes are identical, and requests were in flight at the kill (re-sent)."""
    nbdcopy = require_tool("nbdcopy")
    size = 128 * MiB
    data = os.urandom(size)
    if direction == "from-proxy":
        path = make_file(data=data)
        landing = tmp_path / "out.img"
        src, dst = None, landing
    else:
        path = make_file(size, random=False)       # sparse: allocation shows the progress
        landing = path
        src, dst = make_file(data=data), None
    up = serve(path, "--tls=require", "--tls-psk", str(psk))
    px = proxy(up.port, "--tls=require", "--tls-psk", str(psk), "--conn-tls-psk", str(psk))
    uri = psk_uri(px, psk)
    cmd = [nbdcopy, "--connections=1", str(src or uri), str(dst or uri)]
    copy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def landed() -> int:
            try:
                return landing.stat().st_blocks * 512
            except FileNotFoundError:
                return 0
        assert wait_until(lambda: landed() >= size // 10 or copy.poll() is not None, 60, 0.002)
        # Frozen first, killed once the proxy has sent it requests it never read: so requests
        # are surely in flight at the kill (nbdcopy may be between two batches).
        up.freeze()
        at_kill = landed()
        assert wait_until(lambda: tcp_unread_bytes(up.port) > 0 or copy.poll() is not None,
                          30, 0.005)
        up.kill()
        assert copy.poll() is None, f"the copy ended before the kill: {copy.stdout.read()}"
        wait_logged(px, "W", "upstream")
        serve(path, "--tls=require", "--tls-psk", str(psk), port=up.port)
        out, _ = copy.communicate(timeout=120)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert copy.returncode == 0, out
    assert at_kill < size, at_kill
    assert landing.read_bytes() == data
    reconnected = log_lines(px, "I", "reconnected")
    assert len(reconnected) == 1, px.log()
    resent = int(re.search(r"re-sending (\d+) request", reconnected[0]).group(1))
    assert resent >= 1, reconnected
    assert len(tls_connected(px)) == 1, px.log()
    alive(px)


# --------------------------------------------------------------------------------------------
# Clients that do not get in, and clients that break their TLS: only their own connection


@pytest.mark.parametrize("option", [wire.OPT_GO, wire.OPT_LIST, wire.OPT_INFO],
                         ids=["GO", "LIST", "INFO"])
def test_require_refuses_a_plaintext_client(serve, proxy, make_file, psk, option):
    nbdinfo = require_tool("nbdinfo")
    up, px = tls_both_sides(serve, proxy, disk(make_file), "psk", psk)
    with connect_to_options(px.port) as c:
        data = RawClient.info_request() if option in (wire.OPT_INFO, wire.OPT_GO) else b""
        assert [r.type for r in c.option(option, data)] == [wire.REP_ERR_TLS_REQD]
        assert c.option(wire.OPT_ABORT)[-1].type == wire.REP_ACK
        assert c.is_closed_by_server()
    with connect_to_options(px.port) as c:      # EXPORT_NAME has no error reply: hung up on
        c.send_option(wire.OPT_EXPORT_NAME, b"")
        assert c.read_until_closed() == b""
    assert int(check([nbdinfo, "--size", psk_uri(px, psk)]).strip()) == SIZE
    alive(up, px)


def test_a_wrong_key_fails_and_the_proxy_serves_the_next(serve, proxy, make_file, tmp_path,
                                                         psk):
    nbdinfo = require_tool("nbdinfo")
    up, px = tls_both_sides(serve, proxy, disk(make_file), "psk", psk)
    res = run([nbdinfo, "--size", psk_uri(px, make_psk(tmp_path / "wrong"))])
    assert res.returncode != 0, res.stdout
    wait_logged(px, "W", "handshake failed")
    assert int(check([nbdinfo, "--size", psk_uri(px, psk)]).strip()) == SIZE
    alive(up, px)


def test_an_untrusted_ca_fails_and_the_proxy_serves_the_next(serve, proxy, make_file,
                                                             tmp_path, x509):
    nbdinfo = require_tool("nbdinfo")
    up, px = tls_both_sides(serve, proxy, disk(make_file), "x509", x509)
    stranger = make_ca(tmp_path / "other-ca")       # a client that trusts another CA
    res = run([nbdinfo, "--size", x509_uri(px, stranger)])
    assert res.returncode != 0, res.stdout
    wait_logged(px, "W", "handshake failed")
    assert int(check([nbdinfo, "--size", x509_uri(px, x509[1])]).strip()) == SIZE
    alive(up, px)


def test_verify_peer_wants_a_client_certificate(serve, proxy, make_file, tmp_path, x509):
    path = disk(make_file)
    server_dir, client_dir = x509
    up = serve(path)
    px = proxy(up.port, "--tls=require", "--tls-certificates", str(server_dir),
               "--tls-verify-peer")
    with tls_client(px, client_dir, cert=True) as c:
        assert c.read(0, 4096) == path.read_bytes()[:4096]
    # Without a certificate, and with one signed by another CA: out.
    other = make_ca(tmp_path / "other")
    sign(other, tmp_path / "intruder", "client", "clientAuth", ("intruder",))
    (tmp_path / "intruder" / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    for directory, cert in ((client_dir, False), (tmp_path / "intruder", True)):
        with connect_to_options(px.port) as c:
            with pytest.raises((OSError, ServerClosed)):
                starttls(c, directory, cert=cert)
                c.go()
    wait_logged(px, "W", "handshake failed", count=2)
    with tls_client(px, client_dir, cert=True) as c:
        assert c.read(MiB, 4096) == path.read_bytes()[MiB:MiB + 4096]
    alive(up, px)


def test_a_garbage_record_ends_that_client_only(serve, proxy, make_file, x509):
    """A forged record straight onto the TCP stream, under a client's TLS, in transmission:
    that client's session ends; the upstream connection is kept; the next client is served."""
    path = disk(make_file)
    up, px = tls_both_sides(serve, proxy, path, "x509", x509)
    with tls_client(px, x509[1]) as bad:
        assert bad.read(0, 4096) == path.read_bytes()[:4096]
        os.write(bad.sock.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
        with pytest.raises((OSError, ServerClosed)):
            bad.read(4096, 4096)
    with tls_client(px, x509[1]) as good:
        assert good.read(4096, 4096) == path.read_bytes()[4096:8192]
        assert good.write(MiB, b"\x42" * 5000) == 0
    assert path.read_bytes()[MiB:MiB + 5000] == b"\x42" * 5000
    assert len(tls_connected(px)) == 2, px.log()
    assert log_lines(px, "W", "connection failed", "tls error"), px.log()   # not "closed"
    assert not log_lines(px, "I", "reconnected") and not log_lines(px, "W", "upstream"), \
        px.log()
    alive(up, px)


def assert_waits(px, wait: float = 1.0) -> None:
    """A new client is neither greeted nor refused for ``wait`` seconds."""
    with RawClient.connect(px.port, timeout=wait) as waiting:
        with pytest.raises(TimeoutError):
            waiting.sock.recv(1)
    assert px.proc.poll() is None, px.log()


def test_a_client_stalled_mid_record_holds_the_slot_until_it_goes(serve, proxy, make_file,
                                                                   x509):
    """A TLS client sends the first bytes of a record and nothing more. The proxy serves one
    client at a time, so the next client waits (in the backlog: neither greeted nor refused)
    while the stalled one keeps its connection, as it would behind an idle plaintext client
    (there is no idle or mid-record deadline in transmission: for as long as it likes); it is
    served as soon as the stalled one goes, and a stop is not held up by it."""
    path = disk(make_file)
    up, px = tls_both_sides(serve, proxy, path, "x509", x509)
    stalled = tls_client(px, x509[1])
    try:
        assert stalled.read(0, 4096) == path.read_bytes()[:4096]
        os.write(stalled.sock.fileno(), b"\x17\x03")
        assert_waits(px)
    finally:
        stalled.close()
    with tls_client(px, x509[1]) as good:
        assert good.read(8 * MiB, 4096) == path.read_bytes()[8 * MiB:8 * MiB + 4096]
    stalled = tls_client(px, x509[1])
    try:
        os.write(stalled.sock.fileno(), b"\x17\x03\x03\x40")     # a 16 KiB record's header
        assert_waits(px)
        assert px.stop(timeout=30) == 0
    finally:
        stalled.close()
    assert "Traceback" not in px.log(), px.log()


# --------------------------------------------------------------------------------------------
# Start-up: TLS failures upstream are final; usage errors


def proxy_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(FLEXNBD_PROXY + list(args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def listen_args() -> list[str]:
    return ["--addr", "127.0.0.1", "--port", str(free_port())]


def upstream_args(port: int) -> list[str]:
    return ["--conn-addr", "127.0.0.1", "--conn-port", str(port)]


def assert_one_line_exit_1(res: subprocess.CompletedProcess, pattern: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    assert len(lines) == 1, res.stderr
    assert re.fullmatch(pattern, lines[0]), lines[0]
    return lines[0]


def test_a_wrong_upstream_key_ends_the_start(serve, make_file, tmp_path, psk):
    up = serve(disk(make_file), "--tls=require", "--tls-psk", str(psk))
    listen = listen_args()
    res = proxy_cli(*listen, *upstream_args(up.port), "--conn-tls-psk",
                    str(make_psk(tmp_path / "wrong")), "-v")
    assert_one_line_exit_1(res, rf"flexnbd-proxy: upstream 127\.0\.0\.1:{up.port}: TLS "
                                r"handshake failed: .+")
    with pytest.raises(OSError):                # it never listened
        socket.create_connection(("127.0.0.1", int(listen[3])), timeout=1).close()
    alive(up)


def test_an_upstream_without_tls_ends_the_start(serve, make_file, psk):
    up = serve(disk(make_file))
    res = proxy_cli(*listen_args(), *upstream_args(up.port), "--conn-tls-psk", str(psk), "-v")
    assert_one_line_exit_1(res, rf"flexnbd-proxy: upstream 127\.0\.0\.1:{up.port}: "
                                r"the server does not offer TLS.*")
    alive(up)


@pytest.mark.parametrize("problem", ["untrusted-ca", "names-another-host"])
def test_an_upstream_certificate_not_trusted_ends_the_start(serve, make_file, tmp_path, x509,
                                                            problem):
    server_dir, client_dir = x509
    if problem == "untrusted-ca":
        trusts = make_ca(tmp_path / "stranger")
        why = r".*certificate.*"
    else:
        # Signed by the CA the proxy trusts, but for another name than --conn-addr.
        server_dir = tmp_path / "elsewhere"
        sign(tmp_path / "x509" / "ca", server_dir, "server", "serverAuth",
             ("nbd.example.com",))
        (server_dir / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
        trusts = client_dir
        why = r".*mismatch.*"
    up = serve(disk(make_file), "--tls=require", "--tls-certificates", str(server_dir))
    res = proxy_cli(*listen_args(), *upstream_args(up.port), "--conn-tls-certificates",
                    str(trusts), "-v")
    assert_one_line_exit_1(res, rf"flexnbd-proxy: upstream 127\.0\.0\.1:{up.port}: TLS "
                                rf"handshake failed: {why}")
    alive(up)


@pytest.mark.parametrize("args, words", [
    (["--conn-tls-psk", "PSK", "--conn-tls-certificates", "DIR"], "not both"),
    (["--tls=on"], "needs exactly one of"),
    (["--tls=require", "--tls-psk", "PSK", "--tls-certificates", "DIR"], "exactly one"),
    (["--tls-psk", "PSK"], "--tls=off"),
    (["--oldstyle", "--tls=require", "--tls-psk", "PSK"], "oldstyle"),
    (["--tls=on", "--tls-psk", "PSK", "--tls-verify-peer"], "--tls-certificates"),
    (["--tls=maybe"], "invalid choice"),
])
def test_usage_errors(serve, make_file, psk, x509, args, words):
    up = serve(disk(make_file))
    subst = {"PSK": str(psk), "DIR": str(x509[0])}
    res = proxy_cli(*listen_args(), *upstream_args(up.port), *(subst.get(a, a) for a in args))
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    first = res.stderr.splitlines()[0]
    assert first.startswith("flexnbd-proxy: ") and words in first, res.stderr
    assert "usage: flexnbd-proxy" in res.stderr, res.stderr
    assert " connected " not in up.log(), up.log()       # it never went upstream


@pytest.mark.parametrize("args, words", [
    (["--conn-tls-psk", "MISSING"], "cannot read the PSK file"),
    (["--conn-tls-psk", "BADPSK"], "identity:hexkey"),
    (["--conn-tls-certificates", "MISSING"], "does not exist"),
    (["--conn-tls-certificates", "EMPTY"], "ca-cert.pem is missing"),
])
def test_bad_upstream_credentials(serve, make_file, tmp_path, args, words):
    up = serve(disk(make_file))
    bad = tmp_path / "bad.psk"
    bad.write_text("alice=0011\n")
    (tmp_path / "empty").mkdir()
    subst = {"MISSING": str(tmp_path / "nope"), "BADPSK": str(bad),
             "EMPTY": str(tmp_path / "empty")}
    res = proxy_cli(*listen_args(), *upstream_args(up.port), *(subst.get(a, a) for a in args))
    line = assert_one_line_exit_1(res, r"flexnbd-proxy: .+")
    assert words in line, line
    assert " connected " not in up.log(), up.log()


# --------------------------------------------------------------------------------------------
# Reconnecting to an upstream with the wrong key


@pytest.mark.parametrize("when", ["in-flight", "sent-while-down"])
def test_reconnect_to_a_wrong_key_is_retried_until_the_right_one(serve, proxy, make_file,
                                                                 tmp_path, psk, when):
    """The upstream dies with a READ and a WRITE of the client unanswered (sent to it frozen,
    then it is killed; or sent after it died); an upstream with another key comes up on the
    port: every attempt fails its handshake, said at error level, retried; nothing is answered
    and nothing reaches that upstream. Once the right key is back, both requests complete."""
    path = disk(make_file)
    original = path.read_bytes()
    decoy = make_file(data=os.urandom(SIZE))
    decoy_before = decoy.read_bytes()
    wrong = make_psk(tmp_path / "wrong")
    up = serve(path, "--tls=require", "--tls-psk", str(psk))
    px = proxy(up.port, "--conn-tls-psk", str(psk))
    data = os.urandom(64 * KiB)
    with RawClient.connect(px.port) as c:
        c.handshake()
        assert c.read(0, 4096) == original[:4096]
        if when == "in-flight":
            up.freeze()
        else:
            up.kill()
            wait_logged(px, "W", "upstream")
        rc = c.send_request(wire.CMD_READ, 3 * MiB + 5, 100 * KiB)
        wc = c.send_request(wire.CMD_WRITE, 5 * MiB, len(data), payload=data)
        if when == "in-flight":
            assert_no_reply(c, 0.5, px, up)         # (and the proxy sends them meanwhile)
            up.kill()
            wait_logged(px, "W", "upstream", "2 request(s) in flight")
        impostor = serve(decoy, "--tls=require", "--tls-psk", str(wrong), port=up.port)
        wait_logged(px, "E", "tls handshake failed", "retrying", count=2)
        assert_no_reply(c, 0.5, px)
        assert px.proc.poll() is None, px.log()
        impostor.kill()
        assert decoy.read_bytes() == decoy_before
        serve(path, "--tls=require", "--tls-psk", str(psk), port=up.port)
        got = {}
        for _ in range(2):                      # in any order
            reply = wire.unpack_simple_reply(c.recv_exact(wire.SIMPLE_REPLY_SIZE))
            assert reply.magic == wire.SIMPLE_REPLY_MAGIC, reply
            n = 100 * KiB if reply.cookie == rc and reply.error == 0 else 0
            got[reply.cookie] = (reply.error, c.recv_exact(n) if n else b"")
        assert got == {rc: (0, original[3 * MiB + 5:3 * MiB + 5 + 100 * KiB]), wc: (0, b"")}
        assert c.read(5 * MiB, len(data)) == data
    assert path.read_bytes() == original[:5 * MiB] + data + original[5 * MiB + len(data):]
    assert decoy.read_bytes() == decoy_before
    failed = log_lines(px, "E", "tls handshake failed")
    assert all(re.search(rf"upstream 127\.0\.0\.1:{up.port}: TLS handshake failed: .+; "
                         r"retrying \(attempt \d+\)$", line) for line in failed), failed
    attempts = [int(re.search(r"attempt (\d+)", line).group(1)) for line in failed]
    assert attempts == sorted(set(attempts)), attempts      # every attempt, counted up
    reconnected = log_lines(px, "I", "reconnected")
    assert len(reconnected) == 1, px.log()
    if when == "in-flight":                 # sent to the upstream that died: sent again
        assert "re-sending 2 request(s)" in reconnected[0], reconnected
    alive(px)


# --------------------------------------------------------------------------------------------
# A corrupted record between the proxy and upstream


@pytest.mark.parametrize("direction", ["down", "up"])
def test_a_corrupted_upstream_record_is_a_lost_upstream(serve, proxy, make_file, x509,
                                                        direction):
    """One byte flipped inside a TLS record between the proxy and upstream (in a READ's reply
    data; or in a WRITE's payload): in plaintext it would pass unnoticed, under TLS the
    record fails its check. Nothing of it reaches the client or the file: the proxy drops
    that connection, reconnects, re-sends, and the client gets the right bytes."""
    path = disk(make_file)
    original = path.read_bytes()
    up = serve(path, *tls_args("x509", x509))
    fault = Fault()
    with Relay(up.port, faults=[fault]) as r:
        px = proxy(r.port, *conn_tls("x509", x509))
        conn = r.connections[0]
        assert conn.wait_settled()
        data = os.urandom(256 * KiB)
        with RawClient.connect(px.port) as c:
            c.handshake()
            if direction == "down":
                fault.corrupt_down_at = conn.down + 5000
                assert c.read(MiB, 256 * KiB) == original[MiB:MiB + 256 * KiB]
            else:
                fault.corrupt_up_at = conn.up + 5000
                assert c.write(MiB, data) == 0
                assert c.read(MiB, len(data)) == data
            assert c.read(0, 64 * KiB) == original[:64 * KiB]
        assert conn.triggered == [f"corrupt_{direction}"], conn
        assert len(r.connections) == 2, r.connections
    if direction == "up":
        assert path.read_bytes() == original[:MiB] + data + original[MiB + len(data):]
    else:
        assert path.read_bytes() == original
    # (down: the proxy's TLS fails, EPROTO; up: the upstream's does, and it hangs up with an
    # alert or without)
    assert len(log_lines(px, "W", "upstream", "1 request(s) in flight")) == 1, px.log()
    assert len(log_lines(px, "I", "reconnected", "re-sending 1 request(s)")) == 1, px.log()
    alive(px)

"""NBD over TLS on the server side (serve): STARTTLS with PSK and X.509 credentials made in
the test, against real clients (nbdinfo and nbdcopy with nbds:// URIs, qemu-img with
tls-creds objects) and a raw client (Python's ssl over the raw protocol) for what the real
clients never do: plaintext options against --tls=require, a second STARTTLS, garbage or
silence instead of a TLS handshake, a wrong key, an untrusted certificate.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import require_tool
from tests.support.clients import check, run
from tests.support.layout import punch_fd
from tests.support.rawclient import RawClient, connect_to_options
from tests.support.serving import MiB, assert_serves
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
from tests.support.waiting import wait_until

SIZE = 9 * MiB + 4096


def tls_server(serve, path, kind, creds, *extra, mode="require", env=None):
    """A server with TLS (``kind`` psk or x509) and the URI a libnbd client uses."""
    server = serve(path, *tls_args(kind, creds, mode), *extra, env=env)
    return server, client_uri(kind, creds, server)


def with_holes(make_file) -> Path:
    path = make_file(SIZE)
    with open(path, "r+b") as f:
        punch_fd(f.fileno(), 1 * MiB, 2 * MiB)     # a hole: OFFSET_HOLE chunks over TLS
        punch_fd(f.fileno(), 8 * MiB, MiB)
    return path


# --------------------------------------------------------------------------------------------
# Real clients


def test_nbdinfo_sees_the_export_over_tls(serve, make_file, kind, creds):
    nbdinfo = require_tool("nbdinfo")
    server, uri = tls_server(serve, make_file(SIZE), kind, creds)
    out = check([nbdinfo, "--size", uri])
    assert int(out.strip()) == SIZE
    assert "TLSv1.3" in server.log()


def test_nbdcopy_both_ways_over_tls(serve, make_file, tmp_path, kind, creds):
    nbdcopy = require_tool("nbdcopy")
    path = with_holes(make_file)
    server, uri = tls_server(serve, path, kind, creds)
    out = tmp_path / "out.img"
    check([nbdcopy, uri, str(out)], timeout=120)
    assert out.read_bytes() == path.read_bytes()
    # And new bytes back in, through WRITEs decrypted by the serve loop.
    new = os.urandom(SIZE)
    src = tmp_path / "new.img"
    src.write_bytes(new)
    check([nbdcopy, str(src), uri], timeout=120)
    assert path.read_bytes() == new
    assert "went away" not in server.log()


def qemu_object(kind: str, creds) -> str:
    if kind == "psk":
        return (f"tls-creds-psk,id=tls0,endpoint=client,dir={creds.parent},"
                f"username={PSK_IDENTITY}")
    return f"tls-creds-x509,id=tls0,endpoint=client,dir={creds[1]}"


def test_qemu_img_over_tls(serve, make_file, tmp_path, kind, creds):
    qemu_img = require_tool("qemu-img")
    path = with_holes(make_file)
    server, _ = tls_server(serve, path, kind, creds)
    image = f"driver=nbd,host=127.0.0.1,port={server.port},tls-creds=tls0"
    out = tmp_path / "out.img"
    check([qemu_img, "convert", "--object", qemu_object(kind, creds), "--image-opts", image,
           "-O", "raw", str(out)], timeout=120)
    assert out.read_bytes() == path.read_bytes()


def client_tls_args(kind: str, creds) -> list[str]:
    """Our client side's options for the credentials of ``kind``."""
    return ["--tls-psk", str(creds)] if kind == "psk" else ["--tls-certificates", str(creds[1])]


def test_read_and_write_over_tls(serve, run_flexnbd, make_file, kind, creds):
    path = make_file(SIZE)
    server, _ = tls_server(serve, path, kind, creds)
    where = ["--addr", "127.0.0.1", "--port", str(server.port)]
    new = os.urandom(3 * MiB)
    res = run_flexnbd("write", *where, "--from", str(MiB), "--size", str(len(new)),
                      *client_tls_args(kind, creds), input=new)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes()[MiB:4 * MiB] == new
    res = run_flexnbd("read", *where, "--from", "0", "--size", str(SIZE),
                      *client_tls_args(kind, creds))
    assert res.returncode == 0, res.stderr
    assert res.stdout == path.read_bytes()


def test_our_client_side_against_nbdkit_tls(nbdkit_tls, run_flexnbd, make_file, kind, creds):
    path = make_file(SIZE)
    if kind == "psk":
        port = nbdkit_tls(path, f"--tls-psk={creds}")
    else:
        port = nbdkit_tls(path, f"--tls-certificates={creds[0]}")
    where = ["--addr", "127.0.0.1", "--port", str(port)]
    res = run_flexnbd("read", *where, "--from", "4096", "--size", str(2 * MiB),
                      *client_tls_args(kind, creds))
    assert res.returncode == 0, res.stderr
    assert res.stdout == path.read_bytes()[4096:4096 + 2 * MiB]
    new = os.urandom(MiB)
    res = run_flexnbd("write", *where, "--from", "0", "--size", str(MiB),
                      *client_tls_args(kind, creds), input=new)
    assert res.returncode == 0, res.stderr
    assert path.read_bytes()[:MiB] == new


def test_our_client_with_a_wrong_key_or_no_tls(serve, run_flexnbd, make_file, tmp_path, psk):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    where = ["--addr", "127.0.0.1", "--port", str(server.port), "--from", "0", "--size", "512"]
    res = run_flexnbd("read", *where, "--tls-psk", str(make_psk(tmp_path / "wrong")))
    assert res.returncode == 1
    assert b"TLS handshake failed" in res.stderr and b"Traceback" not in res.stderr
    res = run_flexnbd("read", *where)
    assert res.returncode == 1
    assert b"requires TLS" in res.stderr and b"Traceback" not in res.stderr
    plain = serve(make_file(SIZE))
    res = run_flexnbd("read", "--addr", "127.0.0.1", "--port", str(plain.port), "--from", "0",
                      "--size", "512", "--tls-psk", str(psk))
    assert res.returncode == 1
    assert b"does not offer TLS" in res.stderr and b"Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------
# The protocol, with a raw client


@pytest.mark.parametrize("option", [wire.OPT_LIST, wire.OPT_INFO, wire.OPT_GO,
                                    wire.OPT_STRUCTURED_REPLY, wire.OPT_LIST_META_CONTEXT])
def test_require_refuses_options_before_tls(serve, make_file, psk, option):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    with connect_to_options(server.port) as c:
        data = RawClient.info_request() if option in (wire.OPT_INFO, wire.OPT_GO) else b""
        reply = c.option(option, data)
        assert [r.type for r in reply] == [wire.REP_ERR_TLS_REQD]   # no size, no name
        assert c.option(wire.OPT_ABORT)[-1].type == wire.REP_ACK
        assert c.is_closed_by_server()
    assert_serves_tls(server, psk)


def test_require_hangs_up_on_export_name(serve, make_file, psk):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    with connect_to_options(server.port) as c:
        c.send_option(wire.OPT_EXPORT_NAME, b"")
        assert c.read_until_closed() == b""        # EXPORT_NAME has no error reply
    assert_serves_tls(server, psk)


def assert_serves_tls(server, keys: Path) -> None:
    out = check([require_tool("nbdinfo"), "--size", psk_uri(server, keys)])
    assert int(out.strip()) == SIZE


def test_tls_on_serves_plaintext_and_tls_clients(serve, make_file, psk):
    path = make_file(SIZE)
    server = serve(path, "--tls=on", "--tls-psk", str(psk))
    assert_serves(server, path)
    assert_serves_tls(server, psk)


def test_starttls_without_tls_is_unsupported(serve, make_file):
    path = make_file(SIZE)
    server = serve(path)
    with connect_to_options(server.port) as c:
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ERR_UNSUP
        c.go()                                   # and the client may go on in plaintext
        assert c.read(0, 4096) == path.read_bytes()[:4096]


def test_options_start_again_inside_tls(serve, make_file, x509):
    path = make_file(SIZE)
    server_dir, client_dir = x509
    server = serve(path, "--tls=on", "--tls-certificates", str(server_dir))
    with connect_to_options(server.port) as c:
        # Structured replies agreed in plaintext are forgotten by STARTTLS.
        assert c.option(wire.OPT_STRUCTURED_REPLY)[-1].type == wire.REP_ACK
        starttls(c, client_dir)
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ERR_INVALID   # a second one
        c.go()
        c.structured = False
        assert c.read(0, 65536) == path.read_bytes()[:65536]   # a simple reply
        big = c.read(MiB, 2 * MiB)                           # past the bounce buffer's size
        assert big == path.read_bytes()[MiB:3 * MiB]
        assert c.write(4096, b"z" * 8192) == 0
        assert path.read_bytes()[4096:12288] == b"z" * 8192


def test_starttls_with_data_is_invalid(serve, make_file, psk):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    with connect_to_options(server.port) as c:
        assert c.option(wire.OPT_STARTTLS, b"x")[-1].type == wire.REP_ERR_INVALID


# --------------------------------------------------------------------------------------------
# Failures cost only their own connection


def test_a_wrong_key_fails_and_the_server_carries_on(serve, make_file, tmp_path, psk):
    nbdinfo = require_tool("nbdinfo")
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    wrong = make_psk(tmp_path / "wrong")
    res = run([nbdinfo, "--size", psk_uri(server, wrong)])
    assert res.returncode != 0
    # (the client may give up before the server has written its line)
    assert wait_until(lambda: "TLS handshake failed" in server.log(), 15), server.log()
    assert_serves_tls(server, psk)


def test_an_untrusted_certificate_fails(serve, make_file, tmp_path, x509):
    nbdinfo = require_tool("nbdinfo")
    server_dir, _ = x509
    server = serve(make_file(SIZE), "--tls=require", "--tls-certificates", str(server_dir))
    stranger = make_ca(tmp_path / "other-ca")       # a client that trusts another CA
    res = run([nbdinfo, "--size", x509_uri(server, stranger)])
    assert res.returncode != 0
    assert server.proc.poll() is None


def test_verify_peer_wants_a_client_certificate(serve, make_file, tmp_path, x509):
    path = make_file(SIZE)
    server_dir, client_dir = x509
    server = serve(path, "--tls=require", "--tls-certificates", str(server_dir),
                   "--tls-verify-peer")
    with connect_to_options(server.port) as c:                      # a certificate from our CA: in
        starttls(c, client_dir, cert=True)
        c.go()
        assert c.read(0, 4096) == path.read_bytes()[:4096]
    with connect_to_options(server.port) as c:                      # none: out
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            starttls(c, client_dir, cert=False)
            c.go()
    # A certificate signed by another CA: out too.
    other = make_ca(tmp_path / "other")
    sign(other, tmp_path / "intruder", "client", "clientAuth", ("intruder",))
    (tmp_path / "intruder" / "ca-cert.pem").write_bytes((client_dir / "ca-cert.pem").read_bytes())
    with connect_to_options(server.port) as c:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            starttls(c, tmp_path / "intruder", cert=True)
            c.go()
    assert "TLS handshake failed" in server.log()
    with connect_to_options(server.port) as c:
        starttls(c, client_dir, cert=True)
        c.go()
        assert c.read(0, 4096) == path.read_bytes()[:4096]


def test_garbage_instead_of_a_tls_handshake(serve, make_file, psk):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk))
    with connect_to_options(server.port) as c:
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ACK
        c.send(b"\x16\x03\x01\x00\x05hello" + os.urandom(3000))
        c.read_until_closed()
    assert "TLS handshake failed" in server.log()
    assert_serves_tls(server, psk)


def test_silence_instead_of_a_tls_handshake_times_out(serve, make_file, psk):
    server = serve(make_file(SIZE), "--tls=require", "--tls-psk", str(psk),
                   env={"FLEXNBD_HANDSHAKE_TIMEOUT": "1"})
    with connect_to_options(server.port) as c:
        assert c.option(wire.OPT_STARTTLS)[-1].type == wire.REP_ACK
        c.send(b"\x16\x03\x01")                      # the start of a record, then nothing
        assert c.is_closed_by_server(timeout=20)
    assert_serves_tls(server, psk)


def test_a_garbage_record_mid_transmission_ends_that_client_only(serve, make_file, x509):
    path = make_file(SIZE)
    server_dir, client_dir = x509
    server = serve(path, "--tls=require", "--tls-certificates", str(server_dir))
    with tls_client(server, client_dir) as good, tls_client(server, client_dir) as bad:
        # A forged record straight onto the TCP stream, under the TLS layer.
        os.write(bad.sock.fileno(), b"\x17\x03\x03\x00\x20" + os.urandom(32))
        assert good.read(0, 4096) == path.read_bytes()[:4096]
        with pytest.raises((ssl.SSLError, ConnectionError, OSError, AssertionError)):
            bad.read(0, 4096)
        assert good.read(4096, 4096) == path.read_bytes()[4096:8192]


def test_a_client_stalled_mid_record_holds_only_itself(serve, make_file, x509):
    path = make_file(SIZE)
    server_dir, client_dir = x509
    server = serve(path, "--tls=require", "--tls-certificates", str(server_dir))
    with tls_client(server, client_dir) as stalled:
        # The first bytes of a record header, then nothing: the server waits for the rest.
        os.write(stalled.sock.fileno(), b"\x17\x03")
        good = tls_client(server, client_dir)
        for i in range(8):
            assert good.read(i * MiB, 4096) == path.read_bytes()[i * MiB:i * MiB + 4096]
        good.close()
        # And a stop is not held up by it for longer than the stop grace.
        assert server.stop(timeout=30) == 0


# --------------------------------------------------------------------------------------------
# Bad options


@pytest.mark.parametrize("args, words", [
    (["--tls=on"], "needs exactly one of"),
    (["--tls-psk", "PSK"], "--tls=off"),
    (["--tls=require", "--oldstyle", "--tls-psk", "PSK"], "oldstyle"),
    (["--tls=on", "--tls-psk", "PSK", "--tls-certificates", "DIR"], "exactly one"),
    (["--tls=on", "--tls-psk", "PSK", "--tls-verify-peer"], "--tls-certificates"),
    (["--tls=on", "--tls-psk", "BADPSK"], "identity:hexkey"),
    (["--tls=on", "--tls-psk", "MISSING"], "cannot read the PSK file"),
    (["--tls=on", "--tls-certificates", "MISSING"], "does not exist"),
    (["--tls=on", "--tls-certificates", "EMPTY"], "server-cert.pem is missing"),
    (["--tls=maybe"], "invalid choice"),
])
def test_bad_tls_options(run_flexnbd, make_file, tmp_path, psk, args, words):
    from tests.conftest import free_port

    bad = tmp_path / "bad.psk"
    bad.write_text("alice=0011\n")
    (tmp_path / "empty").mkdir()
    subst = {"PSK": str(psk), "BADPSK": str(bad), "MISSING": str(tmp_path / "nope"),
             "DIR": str(tmp_path), "EMPTY": str(tmp_path / "empty")}
    args = [subst.get(a, a) for a in args]
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(make_file(MiB)), *args, timeout=30)
    assert res.returncode != 0
    assert b"Traceback" not in res.stderr
    assert words.encode() in res.stderr, res.stderr



"""Migration over TLS: a `flexnbd serve` source started with TLS credentials uses them for its
mirror (STARTTLS, then every request, the FLUSH, DISC and the confirmed close inside TLS) into
a `flexnbd listen --tls=require` destination. A sender without the key, or without TLS at all,
is refused at once (no retry loop) and the listener keeps waiting for the right one.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from flexnbd import wire
from flexnbd._tls import TlsContext
from flexnbd.handshake import ExportInfo, TlsPolicy, serve_handshake
from tests.fakes.relay import Relay
from tests.support import control as cu
from tests.support.migration import (
    KiB,
    MiB,
    allocated,
    assert_completed,
    logs,
    mirror_cli,
    out,
    running,
    sparse_file,
    wait_exit,
)
from tests.support.rawclient import recv_exact
from tests.support.tlscreds import make_psk, tls_args
from tests.support.waiting import wait_until


def test_migration_over_tls_completes(pair, tmp_path, kind, creds):
    """Both ends with the same credentials: one PSK file, or one X.509 server directory whose
    certificate names 127.0.0.1 (the source checks it) and whose CA the source trusts."""
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(24 * MiB + 4096))
    args = tls_args(kind, creds)
    p = pair(src_file, src_args=args, dst_args=args)
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)
    text = logs(p.src, p.dst)
    assert "mirror connected" in text and "TLSv1.3" in text, text


def test_sparse_migration_over_tls_sends_about_the_data(pair, tmp_path, psk):
    size = 128 * MiB
    src_file = tmp_path / "sparse.img"
    data = sparse_file(src_file, size, pieces=48, piece=64 * KiB)   # 3 MiB of data
    args = tls_args("psk", psk)
    p = pair(src_file, src_args=args, dst_args=args)
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")
    with Relay(p.dst.port) as relay:
        res = mirror_cli(p.src, relay.port)
        assert res.returncode == 0, out(res)
        assert_completed(p)
        wire_up = relay.up_total
    # The data, the requests for the holes, and TLS's own bytes (a handshake, ~22 bytes per
    # record of up to 16 KiB).
    assert data <= wire_up < data * 1.1 + 64 * KiB, (wire_up, data)
    assert allocated(p.dst_file) <= data + MiB


def test_a_sender_with_the_wrong_key_is_refused_and_the_listener_keeps_waiting(
        start_server, tmp_path):
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(8 * MiB))
    dst_file = tmp_path / "dst.img"
    dst_file.write_bytes(b"\0" * (8 * MiB))
    right = make_psk(tmp_path / "right")
    wrong = make_psk(tmp_path / "wrong")                  # same identity, another key
    dst = start_server(dst_file, "--tls=require", "--tls-psk", str(right), mode="listen")
    intruder = start_server(src_file, "--tls=require", "--tls-psk", str(wrong))
    res = mirror_cli(intruder, dst.port)
    assert res.returncode != 0
    # The 0.5.0 reply, then why, with the usual cause of a PSK failure.
    assert res.stderr.startswith(b"Mirror was rejected\nTLS handshake failed: "), out(res)
    assert res.stderr.endswith(b" (TLS: wrong key or identity?)\n"), out(res)
    # Final: the intruder does not retry, and its clients are served again.
    assert wait_until(lambda: cu.status(intruder.sock)["is_mirroring"] == "false")
    assert "retrying" not in intruder.log()
    assert running(dst) and dst_file.read_bytes() == b"\0" * (8 * MiB)
    # The listener still takes the right sender.
    src = start_server(src_file, "--tls=require", "--tls-psk", str(right))
    res = mirror_cli(src, dst.port)
    assert res.returncode == 0, out(res)
    assert wait_until(lambda: not running(dst), timeout=60)
    assert dst_file.read_bytes() == src_file.read_bytes()


def test_a_sender_without_tls_is_refused_by_a_listener_that_requires_it(start_server,
                                                                        tmp_path):
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(4 * MiB))
    dst_file = tmp_path / "dst.img"
    dst_file.write_bytes(b"\0" * (4 * MiB))
    dst = start_server(dst_file, "--tls=require", "--tls-psk",
                       str(make_psk(tmp_path / "psk")), mode="listen")
    src = start_server(src_file)
    res = mirror_cli(src, dst.port)
    assert res.returncode != 0
    assert b"requires TLS" in res.stdout + res.stderr, out(res)
    assert "retrying" not in src.log()
    assert running(dst)


def test_a_tls_sender_into_a_listener_without_tls_is_refused(start_server, tmp_path):
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(4 * MiB))
    dst_file = tmp_path / "dst.img"
    dst_file.write_bytes(b"\0" * (4 * MiB))
    dst = start_server(dst_file, mode="listen")
    src = start_server(src_file, "--tls=require", "--tls-psk", str(make_psk(tmp_path / "psk")))
    res = mirror_cli(src, dst.port)
    assert res.returncode != 0
    assert b"does not offer TLS" in res.stdout + res.stderr, out(res)
    assert running(dst)


def fake_tls_destination(listener: socket.socket, keys: Path, size: int, *,
                         close_notify: bool) -> None:
    """A TLS destination built from flexnbd's own handshake: it answers every request with
    success and, after DISC, closes with (or without) a TLS close_notify."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        policy = TlsPolicy(TlsContext(server=True, psk_file=keys), require=True)
        agreed = serve_handshake(conn, ExportInfo(size), False, policy)
        assert agreed is not None and agreed.tls is not None
        tls = agreed.tls
        while True:
            request = wire.unpack_request(recv_exact(tls, wire.REQUEST_SIZE))
            if request.type == wire.CMD_WRITE:
                recv_exact(tls, request.length)
            if request.type == wire.CMD_DISC:
                if close_notify:
                    tls.close_notify()
                return                                   # then the FIN
            tls.sendall(wire.pack_simple_reply(0, request.cookie))


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "bare-FIN"])
def test_only_a_tls_close_notify_confirms_the_handoff(start_server, tmp_path, close_notify):
    """After DISC, a FIN alone could come from anyone on the path: under TLS only the
    destination's close_notify means it took control; otherwise the outcome is unknown."""
    keys = make_psk(tmp_path / "psk")
    size = 2 * MiB
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(size))
    src = start_server(src_file, "--tls=require", "--tls-psk", str(keys))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        fake = threading.Thread(target=fake_tls_destination, daemon=True,
                                args=(listener, keys, size), kwargs={"close_notify": close_notify})
        fake.start()
        res = mirror_cli(src, listener.getsockname()[1])
        assert res.returncode == 0, out(res)
        rc = wait_exit(src, 60)
        fake.join(30)
    if close_notify:
        assert rc == 0, src.log()
        assert "migration outcome unknown" not in src.log()
    else:
        assert rc == 1, src.log()
        assert "migration outcome unknown" in src.log()
        assert src_file.exists()

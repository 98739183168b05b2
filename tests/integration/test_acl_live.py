"""The ACL on a running server (SPEC §8): refused connections are accepted and closed at once
with nothing written and one log line; CIDR; IPv6 ``::1``; IPv4-mapped peers on a server
listening on ``::``; ``--default-deny``; replacing the ACL kicks clients it no longer allows.
"""

from __future__ import annotations

import time

import pytest

from tests.support import control as cu
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until

MiB = 1 << 20

needs_ipv6 = pytest.mark.skipif(not cu.ipv6_loopback(), reason="no IPv6 loopback here")
needs_dual_stack = pytest.mark.skipif(not (cu.ipv6_loopback() and cu.dual_stack()),
                                      reason="no dual-stack IPv6 here")


def refused(host: str, port: int, bind: str | None = None) -> bool:
    with cu.connect(host, port, bind) as s:
        return cu.closed_without_a_byte(s)


def allowed(host: str, port: int, bind: str | None = None) -> bool:
    with cu.connect(host, port, bind) as s:
        return cu.greets(s)


def refusal_lines(srv) -> list[str]:
    return [line for line in srv.log().splitlines() if "not allowed by the ACL" in line]


def test_refused_client_gets_nothing_and_one_log_line(start_server, make_file):
    srv = start_server(make_file(MiB), "10.1.2.3")
    assert wait_until(lambda: len(refusal_lines(srv)) == 1)  # the readiness probe
    assert refused("127.0.0.1", srv.port)
    assert wait_until(lambda: len(refusal_lines(srv)) == 2)
    assert "127.0.0.1" in refusal_lines(srv)[-1]
    assert cu.status(srv.sock)["num_clients"] == "0"
    assert srv.proc.poll() is None


def test_refusal_is_logged_at_the_default_level(start_server, make_file):
    srv = start_server(make_file(MiB), "10.1.2.3", verbose=False)
    assert refused("127.0.0.1", srv.port)
    assert wait_until(lambda: len(refusal_lines(srv)) >= 2)


def test_cidr(start_server, make_file):
    srv = start_server(make_file(MiB), "127.0.0.0/30", "10.0.0.0/8")
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        assert allowed("127.0.0.1", srv.port, bind=host), host
    for host in ("127.0.0.4", "127.0.0.5", "127.1.0.1"):
        assert refused("127.0.0.1", srv.port, bind=host), host


def test_single_address_entry(start_server, make_file):
    srv = start_server(make_file(MiB), "127.0.0.2")
    assert allowed("127.0.0.1", srv.port, bind="127.0.0.2")
    assert refused("127.0.0.1", srv.port, bind="127.0.0.1")


def test_allowed_client_is_served(start_server, make_file):
    path = make_file(MiB)
    srv = start_server(path, "127.0.0.1/32")
    with RawClient.connect(srv.port) as c:
        c.handshake()
        assert c.read(0, 4096) == path.read_bytes()[:4096]


@needs_ipv6
def test_ipv6_loopback(start_server, make_file):
    srv = start_server(make_file(MiB), "::1", host="::1")
    assert allowed("::1", srv.port)
    srv2 = start_server(make_file(MiB), "::2", "fe80::/10", "127.0.0.1", host="::1")
    assert refused("::1", srv2.port)
    srv3 = start_server(make_file(MiB), "::/1", host="::1")
    assert allowed("::1", srv3.port)


@needs_dual_stack
def test_v4_mapped_peer_matches_ipv4_entries(start_server, make_file):
    srv = start_server(make_file(MiB), "127.0.0.1", host="::")
    assert allowed("127.0.0.1", srv.port)   # seen as ::ffff:127.0.0.1
    assert refused("::1", srv.port)         # a real IPv6 peer is not 127.0.0.1
    assert refused("127.0.0.1", srv.port, bind="127.0.0.9")
    srv2 = start_server(make_file(MiB), "10.0.0.0/8", "::1", host="::")
    assert refused("127.0.0.1", srv2.port)
    assert allowed("::1", srv2.port)
    assert cu.control(srv2.sock, "acl", "127.0.0.0/8") == "0: updated\n"
    assert allowed("127.0.0.1", srv2.port, bind="127.0.0.9")


def test_default_deny(start_server, make_file):
    srv = start_server(make_file(MiB), "--default-deny")
    assert refused("127.0.0.1", srv.port)
    assert cu.control(srv.sock, "acl", "127.0.0.1") == "0: updated\n"
    assert allowed("127.0.0.1", srv.port)
    # default-deny survives the replacement: an empty ACL refuses everyone again
    assert cu.control(srv.sock, "acl") == "0: updated\n"
    assert refused("127.0.0.1", srv.port)


def test_empty_acl_without_default_deny_allows_everyone(start_server, make_file):
    srv = start_server(make_file(MiB), "10.0.0.1")
    assert refused("127.0.0.1", srv.port)
    assert cu.control(srv.sock, "acl") == "0: updated\n"
    assert allowed("127.0.0.1", srv.port)
    assert allowed("127.0.0.1", srv.port, bind="127.0.0.77")


def test_short_option_default_deny_with_entries(start_server, make_file):
    srv = start_server(make_file(MiB), "-d", "127.0.0.1")
    assert allowed("127.0.0.1", srv.port)
    assert refused("127.0.0.1", srv.port, bind="127.0.0.2")


def test_replacement_kicks_clients_no_longer_allowed(start_server, make_file):
    path = make_file(MiB)
    srv = start_server(path)
    stays = RawClient.connect(srv.port)  # from 127.0.0.1
    goes = RawClient(cu.connect("127.0.0.1", srv.port, bind="127.0.0.2"))
    in_handshake = RawClient(cu.connect("127.0.0.1", srv.port, bind="127.0.0.3"))
    try:
        stays.handshake()
        goes.handshake()
        in_handshake.read_greeting()  # and then says nothing
        assert wait_until(lambda: cu.status(srv.sock)["num_clients"] == "3")
        assert cu.control(srv.sock, "acl", "127.0.0.1") == "0: updated\n"
        assert goes.is_closed_by_server()
        assert in_handshake.is_closed_by_server()
        assert wait_until(lambda: cu.status(srv.sock)["num_clients"] == "1")
        # The one still allowed carries on.
        assert stays.read(0, 4096) == path.read_bytes()[:4096]
        assert "127.0.0.2" in srv.log() and "no longer allowed" in srv.log()
        # New connections follow the new ACL.
        assert refused("127.0.0.1", srv.port, bind="127.0.0.2")
    finally:
        for c in (stays, goes, in_handshake):
            c.close()


def test_replacement_lets_the_current_request_finish(start_server, make_file):
    from flexnbd import wire

    path = make_file(MiB)
    srv = start_server(path)
    c = RawClient(cu.connect("127.0.0.1", srv.port, bind="127.0.0.2"))
    try:
        c.handshake()
        cookie = c.send_request(wire.CMD_WRITE, 0, 8192, payload=b"\x77" * 4096)
        time.sleep(0.5)  # the server has begun the request (read its header)
        assert cu.control(srv.sock, "acl", "127.0.0.1") == "0: updated\n"
        c.send(b"\x77" * 4096)  # the rest of the payload
        reply = c.recv_reply()
        assert (reply.error, reply.cookie) == (0, cookie)
        assert c.is_closed_by_server()
        assert path.read_bytes()[:8192] == b"\x77" * 8192
    finally:
        c.close()


def test_unix_socket_clients_are_not_subject_to_the_acl(start_server, make_file, tmp_path):
    import socket

    nbd_sock = tmp_path / "nbd.sock"
    srv = start_server(make_file(MiB), "--default-deny", "--unix", str(nbd_sock))
    assert refused("127.0.0.1", srv.port)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(str(nbd_sock))
        assert cu.greets(s)


@pytest.mark.parametrize("entry", ["127.0.0.1/33", "nope", "::1/0", "1.2.3.4/"])
def test_bad_entry_on_the_command_line(run_flexnbd, make_file, tmp_path, entry):
    from tests.conftest import free_port

    sock = tmp_path / "ctl.sock"
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(make_file(MiB)), "--sock", str(sock), "127.0.0.1", entry, timeout=30)
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr
    lines = res.stderr.decode().rstrip("\n").splitlines()
    assert len(lines) == 2, lines
    assert entry in lines[0] and "ACL" in lines[0], lines
    assert lines[1].startswith("usage: flexnbd serve ")
    assert not sock.exists()

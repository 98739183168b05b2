"""The control socket of a running server (SPEC §5): a transcript for every row of the table
over a raw Unix socket, the client modes' output and exit codes, the status line, the socket's
lifetime (stale file replaced, live socket refused) and abuse that must not hurt the server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import free_port, wait_for_port
from tests.support import control as cu
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until

MiB = 1 << 20


def text(res) -> str:
    return (res.stdout + res.stderr).decode(errors="replace")


@pytest.fixture
def server(start_server, make_file):
    return start_server(make_file(MiB, random=False))


def raw(server, data: bytes, **kw) -> bytes:
    return cu.control_raw(server.sock, data, **kw)


# --------------------------------------------------------------------------------------------
# every row of the table, byte for byte

TRANSCRIPT = [
    # acl
    (b"acl\n127.0.0.1\n\n", b"0: updated\n"),
    (b"acl\n127.0.0.0/8\n::1\n10.0.0.0/8\n\n", b"0: updated\n"),
    (b"acl\n127.0.0.1\nfoo\n\n", b"1: bad spec: foo\n"),
    (b"acl\n127.0.0.1/33\n\n", b"1: bad spec: 127.0.0.1/33\n"),
    (b"acl\n::1/129\n\n", b"1: bad spec: ::1/129\n"),
    (b"acl\n10.0.0.0/0\n\n", b"1: bad spec: 10.0.0.0/0\n"),
    (b"acl\n10.0.0.0/x\n\n", b"1: bad spec: 10.0.0.0/x\n"),
    # mirror: malformed requests, in the order they are checked
    (b"mirror\n\n", b"1: mirror takes at least two parameters\n"),
    (b"mirror\n127.0.0.1\n\n", b"1: mirror takes at least two parameters\n"),
    (b"mirror\n127.0.0.256\n4000\n\n", b"1: bad IP address\n"),
    (b"mirror\nexample_com\n4000\n\n", b"1: bad IP address\n"),  # (a name: looked up, 0.6)
    (b"mirror\n127.0.0.1\n0\n\n", b"1: bad IP port number\n"),
    (b"mirror\n127.0.0.1\n65536\n\n", b"1: bad IP port number\n"),
    (b"mirror\n127.0.0.1\nhttp\n\n", b"1: bad IP port number\n"),
    (b"mirror\n127.0.0.1\n4000\nexplode\n\n",
     b"1: action must be 'exit', 'unlink' or 'nothing'\n"),
    (b"mirror\n127.0.0.1\n4000\nexit\nnowhere!\n\n", b"1: bad bind address\n"),
    (b"mirror\n127.0.0.1\n4000\nunlink\n127.0.0.1\n18446744073709551616\n\n",
     b"1: max_bps out of range\n"),
    (b"mirror\n127.0.0.1\n4000\nnothing\n127.0.0.1\nfast\n\n",
     b"1: max_bps couldn't be parsed\n"),
    (b"mirror\n127.0.0.1\n4000\nexit\n127.0.0.1\n1000\nmore\n\n",
     b"1: unrecognised parameters to mirror\n"),
    (b"mirror\nbad!\n4000\nexit\n127.0.0.1\n1000\nmore\n\n", b"1: bad IP address\n"),
    # mirror: well-formed, to a port where nothing listens (1: tcpmux, never served here): the
    # reply line is 0.5.0's; why follows on a line of its own (new in 0.6)
    (b"mirror\n127.0.0.1\n1\n\n",
     b"1: Mirror failed to connect\nECONNREFUSED: Connection refused\n"),
    (b"mirror\n127.0.0.1\n1\nnothing\n127.0.0.1\n18446744073709551615\n\n",
     b"1: Mirror failed to connect\nECONNREFUSED: Connection refused\n"),
    (b"mirror_wait\n\n", b"1: not mirroring\n"),
    # mirror_max_bps
    (b"mirror_max_bps\n1000000\n\n", b"1: Not currently mirroring\n"),
    (b"mirror_max_bps\n\n", b"1: Bad format\n"),
    (b"mirror_max_bps\n1\n2\n\n", b"1: Bad format\n"),
    (b"mirror_max_bps\n18446744073709551616\n\n", b"1: max_bps out of range\n"),
    (b"mirror_max_bps\n10k\n\n", b"1: max_bps couldn't be parsed\n"),
    (b"mirror_max_bps\n-5\n\n", b"1: max_bps couldn't be parsed\n"),
    # break
    (b"break\n\n", b"1: not mirroring\n"),
    # nothing
    (b"", b"9: missing command\n"),
    (b"\n", b"9: missing command\n"),
    (b"\n\nstatus\n\n", b"9: missing command\n"),
    # anything else
    (b"frobnicate\n\n", b"10: unknown command\n"),
    (b"STATUS\n\n", b"10: unknown command\n"),
    (b"status now\n\n", b"10: unknown command\n"),
    (b" status\n\n", b"10: unknown command\n"),
]


@pytest.mark.parametrize("request_bytes,reply", TRANSCRIPT,
                         ids=[r[0].decode()[:40].replace("\n", "|") or "empty"
                              for r in TRANSCRIPT])
def test_transcript(server, request_bytes, reply):
    # The whole answer: one line (a failed mirror's: and the line saying why), then the server
    # closed the connection.
    assert raw(server, request_bytes) == reply
    # EOF instead of the empty line ends the request the same way.
    if request_bytes.endswith(b"\n\n"):
        assert raw(server, request_bytes[:-1]) == reply


def test_transcript_status(server):
    reply = raw(server, b"status\n\n").decode()
    m = re.fullmatch(cu.STATUS_RE, reply)
    assert m, repr(reply)
    assert int(m.group(1)) == server.pid
    assert int(m.group(2)) == MiB
    # status with EOF, with CRLF, and with ignored extra lines
    for request in (b"status\n", b"status\r\n\r\n", b"status\nextra\n\n"):
        assert re.fullmatch(cu.STATUS_RE, raw(server, request).decode()), request


def test_unknown_command_has_nothing_after_the_newline(server):
    """0.5.0 sent stray bytes after this reply (SPEC §10)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(str(server.sock))
        s.sendall(b"what\n\n")
        got = b""
        while True:
            chunk = s.recv(1)
            if not chunk:
                break
            got += chunk
        assert got == b"10: unknown command\n"


def test_acl_bad_spec_leaves_the_acl_unchanged(server):
    assert cu.control(server.sock, "acl", "10.9.9.9") == "0: updated\n"
    assert cu.control(server.sock, "acl", "127.0.0.1", "bad") == "1: bad spec: bad\n"
    # Still 10.9.9.9 only: a local client is refused.
    with cu.connect("127.0.0.1", server.port) as s:
        assert cu.closed_without_a_byte(s)
    assert cu.control(server.sock, "acl") == "0: updated\n"  # empty: everyone
    with cu.connect("127.0.0.1", server.port) as s:
        assert cu.greets(s)


def test_requests_after_abuse_still_work_and_nbd_still_serves(server):
    with RawClient.connect(server.port) as client:
        client.handshake()
        assert client.write(0, b"x" * 4096) == 0
        raw(server, os.urandom(5000))
        assert cu.status(server.sock)["num_clients"] == "1"
        assert client.read(0, 4096) == b"x" * 4096


# --------------------------------------------------------------------------------------------
# status

def test_status_fields(start_server, make_file):
    path = make_file(MiB + 1000, random=False)  # exported size rounds down to 512
    srv = start_server(path)
    # (the readiness probe's connection stops counting as soon as the server sees it closed)
    assert wait_until(lambda: cu.status(srv.sock)["num_clients"] == "0")
    st = cu.status(srv.sock)
    assert list(st) == ["pid", "size", "is_mirroring", "clients_allowed", "num_clients",
                        "has_control", "allocation_map_method", "handshake"]
    assert st["pid"] == str(srv.pid)
    assert st["size"] == str(MiB + 512)
    assert st["is_mirroring"] == "false"
    assert st["clients_allowed"] == "true"
    assert st["num_clients"] == "0"
    assert st["has_control"] == "true"
    assert st["handshake"] == "newstyle"
    assert wait_until(lambda: cu.status(srv.sock)["allocation_map_method"]
                      in ("fiemap", "seek", "none"))


def test_status_oldstyle_and_listen_mode(start_server, make_file):
    path = make_file(64 * 1024, random=False)
    old = start_server(path, "--oldstyle")
    assert cu.status(old.sock)["handshake"] == "oldstyle"
    listen = start_server(make_file(64 * 1024, random=False), mode="listen")
    st = cu.status(listen.sock)
    assert st["has_control"] == "false"
    assert st["handshake"] == "newstyle"


def test_num_clients_goes_up_and_down(server):
    def count() -> int:
        return int(cu.status(server.sock)["num_clients"])

    clients = []
    try:
        for i in range(1, 6):
            if i % 2:
                c = RawClient.connect(server.port)
                c.handshake()
            else:  # still in the handshake counts too
                c = RawClient.connect(server.port)
                c.read_greeting()
            clients.append(c)
            assert wait_until(lambda i=i: count() == i), (i, count())
        while clients:
            clients.pop().close()
            assert wait_until(lambda: count() == len(clients)), (len(clients), count())
        # A client that says goodbye (DISC) stops counting too.
        c = RawClient.connect(server.port)
        c.handshake()
        assert wait_until(lambda: count() == 1)
        c.disconnect()
        assert wait_until(lambda: count() == 0)
        c.close()
    finally:
        for c in clients:
            c.close()


def test_num_clients_does_not_count_refused_connections(start_server, make_file):
    # (16 clients from 127.0.0.1: lift the per-address limit)
    server = start_server(make_file(MiB, random=False), "--max-clients-per-address", "16")
    clients = [RawClient.connect(server.port) for _ in range(16)]
    try:
        for c in clients:
            c.read_greeting()
        assert wait_until(lambda: cu.status(server.sock)["num_clients"] == "16")
        with cu.connect("127.0.0.1", server.port) as extra:
            assert cu.closed_without_a_byte(extra)
        assert cu.status(server.sock)["num_clients"] == "16"
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------------------------------
# the client modes

def test_cli_status(server, run_flexnbd):
    res = run_flexnbd("status", "--sock", str(server.sock))
    assert res.returncode == 0, text(res)
    assert re.fullmatch(cu.STATUS_RE, "0: " + res.stdout.decode()), res.stdout
    assert res.stderr == b""
    res = run_flexnbd("status", "-s", str(server.sock), "--json")
    assert res.returncode == 0, text(res)
    import json

    st = json.loads(res.stdout)
    assert st["pid"] == server.pid and st["size"] == MiB
    assert st["is_mirroring"] is False and st["has_control"] is True
    assert st["num_clients"] == 0 and st["handshake"] == "newstyle"


def test_cli_acl(server, run_flexnbd):
    res = run_flexnbd("acl", "--sock", str(server.sock), "127.0.0.1", "::1/128", "10.0.0.0/8")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"updated\n", b""), text(res)
    res = run_flexnbd("acl", "-s", str(server.sock), "127.0.0.1", "300.1.1.1")
    assert (res.returncode, res.stdout, res.stderr) == (1, b"", b"bad spec: 300.1.1.1\n")
    res = run_flexnbd("acl", "-s", str(server.sock))
    assert (res.returncode, res.stdout) == (0, b"updated\n"), text(res)


REFUSED = b"Mirror failed to connect\nECONNREFUSED: Connection refused\n"


@pytest.mark.parametrize("args,code,err", [
    (["break"], 1, b"not mirroring\n"),
    (["mirror", "--addr", "127.0.0.1", "--port", "1"], 1, REFUSED),
    (["mirror", "-l", "127.0.0.1", "-p", "1", "-u", "-b", "127.0.0.1"], 1, REFUSED),
    (["mirror", "-l", "127.0.0.1", "-p", "1", "--wait"], 1, REFUSED),
    (["mirror", "-l", "127.0.0.1", "-p", "1", "--max-speed", "1.5M"], 1, REFUSED),
    (["mirror-speed", "--max-speed", "1000000"], 1, b"Not currently mirroring\n"),
    (["mirror-speed", "-m", "0"], 1, b"Not currently mirroring\n"),
])
def test_cli_other_requests(server, run_flexnbd, args, code, err):
    res = run_flexnbd(*args[:1], "--sock", str(server.sock), *args[1:])
    assert (res.returncode, res.stdout, res.stderr) == (code, b"", err), text(res)


def test_cli_mirror_sends_unlink_and_bind(server, run_flexnbd):
    run_flexnbd("mirror", "-s", str(server.sock), "-l", "127.0.0.1", "-p", "4000", "--unlink",
                "--bind", "127.0.0.2")
    log = server.log()
    assert "control: mirror 127.0.0.1 4000 unlink 127.0.0.2" in log, log


@pytest.mark.parametrize("args,mentions", [
    (["status"], "--sock"),
    (["acl"], "--sock"),
    (["break"], "--sock"),
    (["mirror", "--sock", "S", "--port", "4000"], "--addr"),
    (["mirror", "--sock", "S", "--addr", "127.0.0.1"], "--port"),
    (["mirror", "--addr", "127.0.0.1", "--port", "4000"], "--sock"),
    (["mirror", "--sock", "S", "--addr", "nowhere!", "--port", "4000"], "address"),
    (["mirror", "--sock", "S", "--addr", "127.0.0.1", "--port", "0"], "port"),
    (["mirror-speed", "--sock", "S"], "--max-speed"),
    (["mirror-speed", "--sock", "S", "--max-speed", "fast"], "speed"),
    (["mirror-speed", "--sock", "S", "--max-speed", str(1 << 64)], "speed"),
    (["status", "--sock", "S", "--bogus"], "--bogus"),
    (["break", "--sock", "S", "extra"], "extra"),
    (["acl", "--sock", "S", ""], "cannot send"),
])
def test_cli_bad_input(run_flexnbd, args, mentions):
    res = run_flexnbd(*args, timeout=30)
    assert res.returncode == 1, text(res)
    assert b"Traceback" not in res.stderr
    assert res.stdout == b""
    lines = res.stderr.decode().rstrip("\n").splitlines()
    assert len(lines) == 2, text(res)
    assert mentions.lower() in lines[0].lower(), lines[0]
    assert lines[1].startswith(f"usage: flexnbd {args[0]} "), lines[1]


@pytest.mark.parametrize("mode", ["status", "acl", "break"])
def test_cli_no_server_behind_the_socket(run_flexnbd, tmp_path, mode):
    res = run_flexnbd(mode, "--sock", str(tmp_path / "nothing.sock"), timeout=30)
    assert res.returncode == 1, text(res)
    assert b"Traceback" not in res.stderr and res.stdout == b""
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "nothing.sock" in err, err


def test_help_lists_the_modes(run_flexnbd):
    res = run_flexnbd("help")
    assert res.returncode == 0
    out = res.stdout.decode()
    for mode in ("serve", "listen", "acl", "break", "status", "read", "write", "help"):
        assert f"flexnbd {mode} " in out or f"flexnbd {mode}\n" in out, (mode, out)
    assert "flexnbd mirror " in out and "flexnbd mirror-speed " in out
    for mode, options in [("mirror", ["--addr", "--port", "--sock", "--unlink", "--bind"]),
                          ("mirror-speed", ["--sock", "--max-speed"]),
                          ("acl", ["--sock", "ACL"]), ("break", ["--sock"]),
                          ("status", ["--sock", "--json"]),
                          ("listen", ["--addr", "--port", "--file", "--sock",
                                      "--default-deny"]),
                          ("serve", ["--sock", "--default-deny", "--killswitch", "-k", "-d",
                                     "-s"])]:
        for args in (["help", mode], [mode, "-h"], [mode, "--help"]):
            res = run_flexnbd(*args)
            assert res.returncode == 0, text(res)
            for option in options:
                assert option in res.stdout.decode(), (args, option)


# --------------------------------------------------------------------------------------------
# lifetime of the socket

def test_socket_answers_as_soon_as_it_exists(start_server, make_file, tmp_path):
    srv = start_server(make_file(MiB), wait=False)
    deadline = time.monotonic() + 30
    while not srv.sock.exists():
        assert srv.proc.poll() is None, srv.log()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    # No retry: the first request is answered.
    assert cu.control(srv.sock, "status").startswith("0: pid=")
    # And the NBD port accepts already.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15):
        pass


def test_socket_removed_on_exit(server):
    assert server.sock.exists()
    assert server.stop() == 0
    assert not server.sock.exists()


def test_stale_socket_file_is_replaced(start_server, make_file, tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: stale
    assert path.exists()
    srv = start_server(make_file(MiB), sock=path)
    assert cu.status(path)["pid"] == str(srv.pid)
    assert srv.stop() == 0
    assert not path.exists()


def test_live_socket_is_refused(start_server, make_file, tmp_path, run_flexnbd):
    first = start_server(make_file(MiB))
    port = free_port()
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(port), "--file",
                      str(make_file(MiB)), "--sock", str(first.sock), timeout=30)
    assert res.returncode == 1, text(res)
    assert b"Traceback" not in res.stderr
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "already in use" in err, err
    # The first server still owns its socket and its port.
    assert first.sock.exists()
    assert cu.status(first.sock)["pid"] == str(first.pid)
    with cu.connect("127.0.0.1", first.port) as c:
        assert cu.greets(c)
    # The refused one did not keep its port.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_socket_path_that_is_not_a_socket(run_flexnbd, make_file, tmp_path):
    path = tmp_path / "regular-file"
    path.write_text("not a socket")
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(make_file(MiB)), "--sock", str(path), timeout=30)
    assert res.returncode == 1, text(res)
    assert b"Traceback" not in res.stderr
    assert "not a socket" in res.stderr.decode()
    assert path.read_text() == "not a socket"


# --------------------------------------------------------------------------------------------
# abuse: nothing a control client does may block or crash the server

def _nbd_still_serves(srv) -> None:
    with RawClient.connect(srv.port) as c:
        c.handshake()
        assert c.write(4096, b"\x42" * 512) == 0
        assert c.read(4096, 512) == b"\x42" * 512


def test_silent_client_blocks_nobody(start_server, make_file):
    srv = start_server(make_file(MiB), env={"FLEXNBD_CONTROL_TIMEOUT_SECS": "2"})
    silent = socket.socket(socket.AF_UNIX)
    try:
        silent.connect(str(srv.sock))
        half = socket.socket(socket.AF_UNIX)
        half.connect(str(srv.sock))
        half.sendall(b"stat")  # mid-line, then nothing
        # Others are answered while these two say nothing.
        for _ in range(5):
            assert cu.control(srv.sock, "status", timeout=5).startswith("0: ")
        _nbd_still_serves(srv)
        # The silent ones are dropped after the timeout, without a reply.
        for s in (silent, half):
            s.settimeout(30)
            assert s.recv(100) == b""
        half.close()
    finally:
        silent.close()
    assert "sent no complete request" in srv.log()


def test_silent_client_default_timeout_then_still_serving(server):
    """With the default timeout (10 s) a silent client is still dropped in the end."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.sock))
        s.settimeout(60)
        assert s.recv(100) == b""
    assert cu.status(server.sock)["num_clients"] == "0"


def test_huge_line(server):
    """10 MB without a newline: answered at once, the rest is not read."""
    result: dict[str, object] = {}

    def send() -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(server.sock))
            try:
                s.sendall(b"A" * (10 * MiB))
                result["sent"] = True
            except OSError as e:
                result["send_error"] = e.errno
            try:
                result["reply"] = s.recv(100)
            except OSError as e:
                result["recv_error"] = e.errno

    t = threading.Thread(target=send)
    t.start()
    t.join(60)
    assert not t.is_alive()
    # Either the reply arrived, or the server closed while the client was still sending.
    assert result.get("reply", b"10: unknown command\n") in (b"10: unknown command\n", b""), \
        result
    assert cu.status(server.sock)["pid"] == str(server.pid)
    _nbd_still_serves(server)


@pytest.mark.parametrize("data,reply", [
    (b"status" + b"x" * 300 + b"\n\n", b"10: unknown command\n"),
    (b"s" * 257 + b"\n\n", b"10: unknown command\n"),
    (b"acl\n127.0.0.1\n" + b"1" * 300 + b"\n\n", None),
    # the overlong line ends the request: the port is never read
    (b"mirror\n" + b"1" * 300 + b"\n4000\n\n", b"1: mirror takes at least two parameters\n"),
    (b"mirror\n127.0.0.1\n" + b"1" * 300 + b"\n\n", b"1: bad IP port number\n"),
    (b"mirror_max_bps\n" + b"9" * 300 + b"\n\n", b"1: max_bps couldn't be parsed\n"),
])
def test_overlong_lines(server, data, reply):
    got = raw(server, data)
    if reply is None:
        assert got.startswith(b"1: bad spec: 111") and got.endswith(b"\n"), got
        assert got.count(b"\n") == 1 and len(got) < 400, got
    else:
        assert got == reply
    assert cu.status(server.sock)["pid"] == str(server.pid)


def test_a_line_of_exactly_256_bytes_is_fine(server):
    line = b"1" * 256
    assert raw(server, b"mirror_max_bps\n" + line + b"\n\n") == b"1: max_bps out of range\n"


def test_binary_garbage(server):
    rng = __import__("random").Random(4)
    for i in range(30):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000)))
        got = raw(server, data)
        assert got == b"" or (got.endswith(b"\n") and got.count(b"\n") == 1 and
                              re.match(rb"\d+: ", got)), (i, got)
    assert raw(server, b"\x00\xff\xfe\n\n") == b"10: unknown command\n"
    assert raw(server, b"status\x00\n\n") == b"10: unknown command\n"
    assert cu.status(server.sock)["pid"] == str(server.pid)
    _nbd_still_serves(server)


def test_disconnect_mid_line(server):
    for data in (b"stat", b"acl\n127.0.0.", b"acl\n10.0.0.1\n10.0", b"mirror\n127.0.0.1\n40"):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(server.sock))
            s.sendall(data)
        with socket.socket(socket.AF_UNIX) as s:  # and with a reset
            s.connect(str(server.sock))
            s.sendall(data)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # A half-sent ACL line was not applied: local clients are still allowed.
    with cu.connect("127.0.0.1", server.port) as c:
        assert cu.greets(c)
    assert cu.status(server.sock)["pid"] == str(server.pid)


def test_a_request_cut_in_the_middle_of_a_line_is_not_run(server):
    """The stream ended in the middle of a line: the request is incomplete, nothing of it
    runs and there is no reply."""
    assert raw(server, b"acl\n10.0.0.1\n10.0") == b""
    assert raw(server, b"status") == b""
    with cu.connect("127.0.0.1", server.port) as c:
        assert cu.greets(c)  # the ACL is still empty
    assert "left in the middle of a line" in server.log()


def test_client_that_never_reads_its_reply(server):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(server.sock))
        s.sendall(b"status\n\n")
        time.sleep(0.5)
    assert cu.status(server.sock)["pid"] == str(server.pid)


def test_100_clients_in_a_burst(server):
    replies: list[bytes] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            request = [b"status\n\n", b"break\n\n", b"nope\n\n", b"\n"][i % 4]
            got = cu.control_raw(server.sock, request, timeout=60, shutdown=False)
            with lock:
                replies.append(got)
        except BaseException as e:  # noqa: BLE001
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    with RawClient.connect(server.port) as c:  # NBD carries on meanwhile
        c.handshake()
        assert c.read(0, 4096) == bytes(4096)
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert len(replies) == 100
    assert sum(r.startswith(b"0: pid=") for r in replies) == 25
    assert replies.count(b"1: not mirroring\n") == 25
    assert replies.count(b"10: unknown command\n") == 25
    assert replies.count(b"9: missing command\n") == 25
    _nbd_still_serves(server)


# --------------------------------------------------------------------------------------------
# during the shutdown the control socket is still there until the clients are done

def test_requests_during_shutdown(start_server, make_file):
    srv = start_server(make_file(MiB))
    client = RawClient.connect(srv.port)
    try:
        client.handshake()
        # A WRITE whose payload is half sent: the request is running.
        cookie = client.send_request(wire.CMD_WRITE, 0, 8192, payload=b"\x11" * 4096)
        time.sleep(0.5)  # the server has begun the request (read its header)
        srv.signal(signal.SIGTERM)
        # Listener closed, control socket still up and answering.
        assert wait_until(lambda: _port_closed(srv.port))
        assert cu.control(srv.sock, "mirror", "127.0.0.1", "4000") == "1: shutting down\n"
        assert cu.status(srv.sock)["num_clients"] == "1"
        # The request finishes and is answered; then the server closes the connection.
        client.send(b"\x11" * 4096)
        reply = client.recv_reply()
        assert (reply.error, reply.cookie) == (0, cookie)
        assert client.is_closed_by_server()
        assert srv.proc.wait(30) == 0
        assert not srv.sock.exists()
        assert (Path(srv.args[srv.args.index("--file") + 1]).read_bytes()[:8192]
                == b"\x11" * 8192)
    finally:
        client.close()


def _port_closed(port: int) -> bool:
    try:
        wait_for_port(port, timeout=0.2)
    except TimeoutError:
        return True
    return False

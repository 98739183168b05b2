"""The control-socket grammar and replies (SPEC §5) without a server: reading requests,
parsing commands, every reply string byte for byte, and ``execute`` against a fake target.
Also the listener thread in-process against the fake target."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexnbd import acl
from flexnbd.control import protocol as p
from flexnbd.control.client import mirror_lines
from flexnbd.control.client import request as client_request
from flexnbd.control.server import ControlServer, execute
from flexnbd.errors import FlexnbdError
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import MirrorSettings
from flexnbd.status import Status

# --------------------------------------------------------------------------------------------
# replies, byte for byte (SPEC §5 table)

TABLE = [
    (p.UPDATED, b"0: updated\n"),
    (p.MIRROR_STARTED, b"0: Mirror started\n"),
    (p.MIRROR_FAILED_TO_CONNECT, b"1: Mirror failed to connect\n"),
    (p.MIRROR_REJECTED, b"1: Mirror was rejected\n"),
    (p.REMOTE_NO_RESPONSE, b"1: Remote server failed to respond\n"),
    (p.REMOTE_SIZE_MISMATCH, b"1: Remote size does not match local size\n"),
    (p.MIRRORING_ABANDONED, b"1: Mirroring abandoned\n"),
    (p.MIRROR_TOO_FEW, b"1: mirror takes at least two parameters\n"),
    (p.BAD_IP, b"1: bad IP address\n"),
    (p.BAD_PORT, b"1: bad IP port number\n"),
    (p.BAD_ACTION, b"1: action must be 'exit', 'unlink' or 'nothing'\n"),
    (p.BAD_BIND, b"1: bad bind address\n"),
    (p.BPS_OUT_OF_RANGE, b"1: max_bps out of range\n"),
    (p.BPS_UNPARSEABLE, b"1: max_bps couldn't be parsed\n"),
    (p.MIRROR_EXTRA, b"1: unrecognised parameters to mirror\n"),
    (p.MIRROR_RUNNING, b"1: mirror already running\n"),
    (p.SHUTTING_DOWN, b"1: shutting down\n"),
    (p.NOT_CURRENTLY_MIRRORING, b"1: Not currently mirroring\n"),
    (p.BAD_FORMAT, b"1: Bad format\n"),
    (p.MIRROR_STOPPED, b"0: mirror stopped\n"),
    (p.MIRROR_COMPLETED, b"1: mirror completed\n"),
    (p.NOT_MIRRORING, b"1: not mirroring\n"),
    (p.MISSING_COMMAND, b"9: missing command\n"),
    (p.UNKNOWN_COMMAND, b"10: unknown command\n"),
    (p.bad_spec("1.2.3.4/99"), b"1: bad spec: 1.2.3.4/99\n"),
    (p.status_reply("pid=1 size=2 \n"), b"0: pid=1 size=2 \n"),
]


@pytest.mark.parametrize("reply,wire", TABLE, ids=[w.decode().strip() for _, w in TABLE])
def test_reply_bytes(reply, wire):
    assert reply.encode() == wire
    assert p.Reply.decode(wire) == reply


def test_reply_text_is_one_printable_line():
    assert p.bad_spec("a\nb\x00c\x1b").encode() == b"1: bad spec: a?b?c?\n"


@pytest.mark.parametrize("bad", [b"", b"hello\n", b"x: y\n", b"0 updated\n", b"0: a\nb\nc\n",
                                 b"-1: x\n", b"detail\n0: a\n"])
def test_reply_decode_refuses_non_replies(bad):
    with pytest.raises(ValueError):
        p.Reply.decode(bad)


def test_reply_decode_without_lf():
    assert p.Reply.decode(b"0: updated") == p.UPDATED


def test_a_detail_is_the_second_line():
    """New in 0.6: a reply line, then at most one DETAIL line; the reply line is unchanged."""
    reply = p.Reply(1, "Mirror failed to connect", "ECONNREFUSED: Connection refused")
    wire = b"1: Mirror failed to connect\nECONNREFUSED: Connection refused\n"
    assert reply.encode() == wire
    assert wire.split(b"\n")[0] + b"\n" == p.MIRROR_FAILED_TO_CONNECT.encode()
    assert p.Reply.decode(wire) == reply
    assert p.Reply.decode(wire[:-1]) == reply
    assert p.Reply.decode(b"0: updated\n").detail is None
    # made one printable line, as the text is
    assert p.Reply(0, "x", "a\nb\x00").encode() == b"0: x\na?b?\n"


# --------------------------------------------------------------------------------------------
# reading a request

def read_all(data: bytes, chunk: int | None = None) -> p.LineReader:
    r = p.LineReader()
    chunk = chunk or max(1, len(data))
    for i in range(0, len(data), chunk):
        if r.feed(data[i:i + chunk]):
            return r
    r.eof()
    return r


@pytest.mark.parametrize("data,lines", [
    (b"status\n\n", ["status"]),
    (b"status\n", ["status"]),
    (b"status\r\n\r\n", ["status"]),
    (b"acl\n1.2.3.4\n::1\n\nignored\n", ["acl", "1.2.3.4", "::1"]),
    (b"\n", []),
    (b"", []),
    (b"\nstatus\n", []),
    (b"a\r\r\n\n", ["a\r"]),
])
def test_reader_lines(data, lines):
    for chunk in (None, 1, 3):
        r = read_all(data, chunk)
        assert r.done and r.lines == lines and not r.overlong and not r.incomplete


def test_reader_eof_mid_line_is_incomplete():
    r = read_all(b"acl\n10.0.0.1\n10.0")
    assert r.incomplete and r.lines == ["acl", "10.0.0.1"]
    r = read_all(b"status")
    assert r.incomplete and r.lines == []


def test_reader_256_bytes_is_fine_257_is_overlong():
    r = read_all(b"x" * 256 + b"\n\n")
    assert r.lines == ["x" * 256] and not r.overlong
    r = read_all(b"x" * 256 + b"\r\n\n")
    assert r.lines == ["x" * 256] and not r.overlong
    for chunk in (None, 1, 100):
        r = read_all(b"a\n" + b"x" * 257 + b"\n\n", chunk)
        assert r.overlong and r.done
        assert r.lines[0] == "a"
        assert r.lines[1].startswith("x" * 256) and r.lines[1] != "x" * 256
        assert len(r.lines) == 2


def test_reader_stops_at_an_overlong_line_without_reading_on():
    r = p.LineReader()
    assert r.feed(b"status" + b"y" * 1000)
    assert r.overlong
    assert p.parse_request(r.lines) == p.UNKNOWN_COMMAND


def test_reader_caps_the_whole_request():
    r = p.LineReader(max_request=1000)
    done = False
    for _ in range(200):
        done = r.feed(b"1.2.3.4\n")
        if done:
            break
    assert done and r.overlong
    assert sum(len(line) + 1 for line in r.lines) < 1100


def test_reader_binary_is_decoded_with_replacement():
    r = read_all(b"\xff\xfe\n\n")
    assert r.lines == ["\ufffd\ufffd"]
    assert p.parse_request(r.lines) == p.UNKNOWN_COMMAND


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_reader_never_fails(data, chunk):
    r = read_all(data, chunk)
    assert r.done
    assert all(len(line.encode("utf-8", "surrogatepass")) <= 4 * 260 for line in r.lines)
    reply = execute(r.lines, FakeTarget())
    assert reply.encode().endswith(b"\n") and reply.encode().count(b"\n") == 1


# --------------------------------------------------------------------------------------------
# parsing commands

@pytest.mark.parametrize("lines,expected", [
    ([], p.MISSING_COMMAND),
    (["frob"], p.UNKNOWN_COMMAND),
    (["Status"], p.UNKNOWN_COMMAND),
    (["status"], p.StatusCommand()),
    (["status", "junk"], p.StatusCommand()),
    (["break"], p.BreakCommand()),
    (["acl"], p.AclCommand(())),
    (["acl", "a", "b"], p.AclCommand(("a", "b"))),
    (["mirror"], p.MIRROR_TOO_FEW),
    (["mirror", "1.2.3.4"], p.MIRROR_TOO_FEW),
    (["mirror", "1.2.3.4", "80"], MirrorSettings("1.2.3.4", 80)),
    (["mirror", "::1", "80", "unlink"], MirrorSettings("::1", 80, "unlink")),
    (["mirror", "0:0::1", "65535", "nothing", "10.0.0.1", "5"],
     MirrorSettings("::1", 65535, "nothing", "10.0.0.1", 5)),
    (["mirror", "1.2.3.4", "80", "exit", "::", "0"],
     MirrorSettings("1.2.3.4", 80, "exit", "::", None)),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", str((1 << 64) - 1)],
     MirrorSettings("1.2.3.4", 80, "exit", "1.1.1.1", (1 << 64) - 1)),
    # (flexnbd 0.6) a host name, in lower case; what is no name is still a bad IP address
    (["mirror", "DB1.Example.", "80"], MirrorSettings("db1.example", 80)),
    (["mirror", "1.2.3.4", "80", "exit", "Src.example"],
     MirrorSettings("1.2.3.4", 80, "exit", "src.example")),
    (["mirror", "host_1", "80"], p.BAD_IP),
    (["mirror", "-host", "80"], p.BAD_IP),
    (["mirror", "1.2.3.400", "80"], p.BAD_IP),
    (["mirror", "a" * 64 + ".example", "80"], p.BAD_IP),
    (["mirror", "", "80"], p.BAD_IP),
    (["mirror", "1.2.3.4", "0"], p.BAD_PORT),
    (["mirror", "1.2.3.4", "65536"], p.BAD_PORT),
    (["mirror", "1.2.3.4", "-1"], p.BAD_PORT),
    (["mirror", "1.2.3.4", "८०"], p.BAD_PORT),
    (["mirror", "1.2.3.4", "000080"], p.BAD_PORT),
    (["mirror", "1.2.3.4", "80", "EXIT"], p.BAD_ACTION),
    (["mirror", "1.2.3.4", "80", "exit", "bind me"], p.BAD_BIND),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", str(1 << 64)], p.BPS_OUT_OF_RANGE),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", "9" * 300], p.BPS_OUT_OF_RANGE),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", "1e6"], p.BPS_UNPARSEABLE),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", ""], p.BPS_UNPARSEABLE),
    (["mirror", "1.2.3.4", "80", "exit", "1.1.1.1", "5", "x"], p.MIRROR_EXTRA),
    (["mirror", "x!", "80", "exit", "1.1.1.1", "5", "x"], p.BAD_IP),
    (["mirror_max_bps"], p.BAD_FORMAT),
    (["mirror_max_bps", "1", "2"], p.BAD_FORMAT),
    (["mirror_max_bps", "100"], p.MaxBpsCommand(100)),
    (["mirror_max_bps", "0"], p.MaxBpsCommand(None)),
    (["mirror_max_bps", str(1 << 64)], p.BPS_OUT_OF_RANGE),
    (["mirror_max_bps", "1k"], p.BPS_UNPARSEABLE),
    (["mirror_max_bps", "+1"], p.BPS_UNPARSEABLE),
    (["mirror_max_bps", "1" + p.OVERLONG_MARK], p.BPS_UNPARSEABLE),
])
def test_parse_request(lines, expected):
    assert p.parse_request(lines) == expected


def test_encode_request():
    assert p.encode_request(["acl", "1.2.3.4"]) == b"acl\n1.2.3.4\n\n"
    assert p.encode_request(["status"]) == b"status\n\n"
    for bad in (["acl", ""], ["a\nb"], ["x" * 257], ["a\r"]):
        with pytest.raises(ValueError):
            p.encode_request(bad)


# --------------------------------------------------------------------------------------------
# execute against a fake target

class FakeTarget:
    def __init__(self) -> None:
        self.acl: list[acl.Network] | None = None
        self.mirrors: list[MirrorSettings] = []
        self.bps: list[int | None] = []
        self.breaks = 0

    def status(self) -> Status:
        return Status(pid=99, size=4096, num_clients=2)

    def set_acl(self, entries: Sequence[acl.Network]) -> None:
        self.acl = list(entries)

    def start_mirror(self, settings: MirrorSettings) -> Result:
        self.mirrors.append(settings)
        return Result(Outcome.STARTED)

    def set_mirror_max_bps(self, max_bps: int | None) -> bool:
        self.bps.append(max_bps)
        return True

    def break_mirror(self) -> Result:
        self.breaks += 1
        return Result(Outcome.STOPPED)


def test_execute():
    t = FakeTarget()
    assert execute(["status"], t).encode() == (
        b"0: pid=99 size=4096 is_mirroring=false clients_allowed=true num_clients=2 "
        b"has_control=true allocation_map_method=none handshake=newstyle \n")
    assert execute(["acl", "10.0.0.0/8", "::1"], t) == p.UPDATED
    assert t.acl == acl.parse_entries(["10.0.0.0/8", "::1"])
    assert execute(["acl", "10.0.0.1", "oops", "bad2"], t) == p.bad_spec("oops")
    assert t.acl == acl.parse_entries(["10.0.0.0/8", "::1"])  # unchanged
    assert execute(["acl"], t) == p.UPDATED and t.acl == []
    assert execute(["mirror", "1.2.3.4", "99", "unlink"], t) == p.MIRROR_STARTED
    assert t.mirrors == [MirrorSettings("1.2.3.4", 99, "unlink")]
    assert execute(["mirror", "1.2.3.4"], t) == p.MIRROR_TOO_FEW
    assert len(t.mirrors) == 1  # a bad request never reaches the target
    assert execute(["mirror_max_bps", "5"], t) == p.UPDATED and t.bps == [5]
    assert execute(["mirror_max_bps", "x"], t) == p.BPS_UNPARSEABLE and t.bps == [5]
    assert execute(["break"], t) == p.MIRROR_STOPPED and t.breaks == 1
    assert execute([], t) == p.MISSING_COMMAND
    assert execute(["nope"], t) == p.UNKNOWN_COMMAND


# --------------------------------------------------------------------------------------------
# the listener thread, in-process

@pytest.fixture
def control_server(tmp_path):
    servers = []

    def make(target=None, timeout: float = 10.0) -> tuple[ControlServer, str]:
        path = str(tmp_path / f"c{len(servers)}.sock")
        srv = ControlServer(path, target or FakeTarget(), read_timeout=timeout)
        srv.start()
        servers.append(srv)
        return srv, path
    yield make
    for srv in servers:
        srv.close()


def test_listener_serves_and_removes_its_socket(control_server):
    srv, path = control_server()
    assert client_request(path, ["status"]).text.startswith("pid=99 ")
    assert client_request(path, ["break"]) == p.MIRROR_STOPPED
    srv.close()
    assert not os.path.exists(path)
    with pytest.raises(FlexnbdError):
        client_request(path, ["status"])


def test_listener_survives_a_failing_target(control_server):
    class Broken(FakeTarget):
        def break_mirror(self) -> Result:
            raise RuntimeError("boom")

    srv, path = control_server(Broken())
    with pytest.raises(FlexnbdError, match="without a reply"):
        client_request(path, ["break"])
    assert client_request(path, ["status"]).code == 0


def test_listener_requests_run_one_at_a_time(control_server):
    running = []
    overlap = []

    class Slow(FakeTarget):
        def break_mirror(self) -> Result:
            running.append(1)
            if len(running) > 1:
                overlap.append(1)
            time.sleep(0.05)
            running.pop()
            return Result(Outcome.NOT_MIRRORING)

    srv, path = control_server(Slow())
    threads = [threading.Thread(target=client_request, args=(path, ["break"]))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not overlap


def test_listener_drops_silent_clients_after_the_timeout(control_server):
    srv, path = control_server(timeout=0.3)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        s.settimeout(30)
        assert s.recv(10) == b""
    assert client_request(path, ["status"]).code == 0


def test_listener_refuses_a_second_live_server(control_server, tmp_path):
    srv, path = control_server()
    other = ControlServer(path, FakeTarget())
    with pytest.raises(FlexnbdError, match="already in use"):
        other.bind()
    other.close()
    assert os.path.exists(path)  # the other one did not remove the live socket
    assert client_request(path, ["status"]).code == 0


def test_listener_close_leaves_a_replacement_alone(tmp_path):
    """While a server runs, its lock turns a second one away; if someone replaced its socket
    file (and its lock file) meanwhile, its close leaves the replacements alone."""
    path = str(tmp_path / "x.sock")
    first = ControlServer(path, FakeTarget())
    first.start()
    with pytest.raises(FlexnbdError, match="already in use by a running server"):
        ControlServer(path, FakeTarget()).bind()
    for name in (path, f"{path}.lock"):
        os.unlink(name)
        with open(name, "w") as f:
            f.write("someone else's")
    first.close()
    assert [open(name).read() for name in (path, f"{path}.lock")] == ["someone else's"] * 2


def test_listener_close_removes_its_files(tmp_path):
    path = str(tmp_path / "x.sock")
    server = ControlServer(path, FakeTarget())
    server.start()
    assert client_request(path, ["status"]).code == 0
    server.close()
    assert os.listdir(tmp_path) == []


def test_the_cli_mirror_request_carries_the_limit():
    """`mirror --max-speed`: MAX_BPS comes after BIND_IP, so without --bind the wildcard
    address of the destination's family stands there (it binds to nothing in particular)."""
    assert p.parse_request(mirror_lines("10.0.0.2", 9, max_bps=5)) == \
        MirrorSettings("10.0.0.2", 9, "exit", "0.0.0.0", 5)
    assert p.parse_request(mirror_lines("::1", 9, unlink=True, max_bps=5)) == \
        MirrorSettings("::1", 9, "unlink", "::", 5)
    assert p.parse_request(mirror_lines("::1", 9, bind="::2", max_bps=5)) == \
        MirrorSettings("::1", 9, "exit", "::2", 5)
    # no limit (or 0): the 0.5.0 request, BIND_IP only with --bind
    assert mirror_lines("10.0.0.2", 9, max_bps=0) == ["mirror", "10.0.0.2", "9", "exit"]
    assert mirror_lines("10.0.0.2", 9, bind="10.0.0.1") == \
        ["mirror", "10.0.0.2", "9", "exit", "10.0.0.1"]

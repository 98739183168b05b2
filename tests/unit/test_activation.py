"""flexnbd.activation: sd_listen_fds(3)'s rules for LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES, and
the checks on each passed descriptor. Real sockets, moved to free descriptor numbers (the
functions take the first number, 3 under systemd)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flexnbd import activation
from flexnbd.errors import FlexnbdError, UsageError

VARIABLES = {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}


def _free_run(count: int) -> int:
    """The first of ``count`` consecutive descriptor numbers that are not open."""
    first = 600
    while True:
        numbers = range(first, first + count)
        if not any(_is_open(fd) for fd in numbers):
            return first
        first += count


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.fixture
def passed():
    """passed(*objects) -> first: dup each object's descriptor (inheritable, as systemd
    leaves them) to consecutive numbers; all closed at the end."""
    taken: list[int] = []

    def place(*objects) -> int:
        first = _free_run(len(objects))
        for i, obj in enumerate(objects):
            os.dup2(obj.fileno(), first + i, inheritable=True)
            taken.append(first + i)
        return first
    yield place
    for fd in taken:
        try:
            os.close(fd)
        except OSError:
            pass


def _listener(family: int = socket.AF_INET, path: str | None = None) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(path if family == socket.AF_UNIX else ("::1" if family == socket.AF_INET6
                                                   else "127.0.0.1", 0))
    s.listen()
    return s


def env(pid: int | str, fds: int | str | None, names: str | None = None) -> dict[str, str]:
    e = {"LISTEN_PID": str(pid), "OTHER": "kept"}
    if fds is not None:
        e["LISTEN_FDS"] = str(fds)
    if names is not None:
        e["LISTEN_FDNAMES"] = names
    return e


# --------------------------------------------------------------------------------------------
# listen_fds: the variables

def test_the_descriptors_for_us_get_cloexec_and_the_variables_go(passed):
    a, b = _listener(), _listener()
    first = passed(a, b)
    e = env(4242, 2, "x:y")
    assert activation.listen_fds(e, pid=4242, first=first) == [first, first + 1]
    assert e == {"OTHER": "kept"}
    assert not os.get_inheritable(first) and not os.get_inheritable(first + 1)
    a.close()
    b.close()


@pytest.mark.parametrize("e", [
    env(1, 2, "x:y"),           # another process's
    env(4242, 0),               # none
    env(4242, None),            # no LISTEN_FDS
    {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "x:y", "OTHER": "kept"},  # no LISTEN_PID
], ids=["other-pid", "zero", "no-LISTEN_FDS", "no-LISTEN_PID"])
def test_nothing_for_us_is_none_and_the_variables_still_go(passed, e):
    s = _listener()
    first = passed(s)
    assert activation.listen_fds(e, pid=4242, first=first) == []
    assert e == {"OTHER": "kept"}
    assert os.get_inheritable(first)             # not ours: left alone
    s.close()


@pytest.mark.parametrize("e,message", [
    (env("abc", 1), "LISTEN_PID='abc' is not a process id"),
    (env(0, 1), "LISTEN_PID='0' is not a process id"),
    (env(4242, "-1"), "LISTEN_FDS='-1' is not a number of descriptors"),
    (env(4242, "1x"), "LISTEN_FDS='1x' is not a number of descriptors"),
    (env(4242, "99999999999"), "is not a number of descriptors"),
])
def test_bad_variables_are_errors_and_still_go(e, message):
    with pytest.raises(FlexnbdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        activation.listen_fds(e, pid=4242, first=_free_run(1))
    assert e == {"OTHER": "kept"}


def test_a_descriptor_that_is_not_open_is_an_error(passed):
    s = _listener()
    first = passed(s)
    e = env(4242, 2)
    with pytest.raises(FlexnbdError, match=rf"descriptor {first + 1} is not open "
                                           rf"\(LISTEN_FDS=2 passes {first}..{first + 1}\)"):
        activation.listen_fds(e, pid=4242, first=first)
    assert e == {"OTHER": "kept"}
    s.close()


def test_children_do_not_inherit_the_variables(monkeypatch):
    """With the process environment (the default), a child started afterwards sees none of
    the three variables, whether or not they were for us."""
    for pid in (os.getpid() + 1, os.getpid()):
        monkeypatch.setenv("LISTEN_PID", str(pid))
        monkeypatch.setenv("LISTEN_FDS", "0")
        monkeypatch.setenv("LISTEN_FDNAMES", "x")
        assert activation.listen_fds() == []
        out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.environ))"],
                             capture_output=True, text=True, check=True).stdout
        assert not VARIABLES & set(eval(out)), out


# --------------------------------------------------------------------------------------------
# listening_sockets: each descriptor

def test_listening_tcp_tcp6_and_unix_sockets_are_taken(passed, tmp_path):
    have_v6 = socket.has_ipv6
    try:
        v6 = _listener(socket.AF_INET6) if have_v6 else None
    except OSError:
        v6 = None
    objects = [_listener(), _listener(socket.AF_UNIX, str(tmp_path / "u.sock"))]
    objects += [v6] if v6 is not None else []
    first = passed(*objects)
    socks = activation.listening_sockets(range(first, first + len(objects)))
    try:
        assert [s.fileno() for s in socks] == list(range(first, first + len(objects)))
        assert [activation.is_tcp(s) for s in socks] == [True, False] + [True] * (v6 is not None)
        assert activation.describe(socks[0]) == f"127.0.0.1:{objects[0].getsockname()[1]}"
        assert activation.describe(socks[1]) == str(tmp_path / "u.sock")
        assert activation.served(socks[1]) == f"inherited socket {tmp_path / 'u.sock'} (systemd)"
        if v6 is not None:
            assert activation.describe(socks[2]) == f"[::1]:{v6.getsockname()[1]}"
    finally:
        for s in socks:
            s.detach()
        for obj in objects:
            obj.close()


def test_an_abstract_unix_socket_is_described_with_an_at():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"flexnbd-test-{os.getpid()}"
    s.bind("\0" + name)
    s.listen()
    with s:
        assert activation.describe(s) == "@" + name


def _udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _not_listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def _seqpacket():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind("")     # autobind
    s.listen()
    return s


def _netlink():
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)


@pytest.mark.parametrize("make,message", [
    (lambda: open(os.devnull, "rb"), "is not a socket"),
    (_udp, "is a datagram socket, not a stream socket"),
    (_seqpacket, "is a SOCK_SEQPACKET socket, not a stream socket"),
    (_not_listening, "is not listening: flexnbd needs Accept=no"),
    (lambda: socket.socketpair()[0], r"\(an unnamed Unix socket\) is not listening"),
    (_netlink, "is an AF_NETLINK socket; flexnbd serves AF_INET, AF_INET6 or AF_UNIX"),
], ids=["file", "udp", "seqpacket", "not-listening", "connected", "netlink"])
def test_what_is_not_a_listening_stream_socket_is_an_error(passed, make, message):
    good = _listener()
    bad = make()
    first = passed(good, bad)
    with pytest.raises(FlexnbdError, match=rf"socket activation: descriptor {first + 1}.*"
                                           rf"{message}"):
        activation.listening_sockets([first, first + 1])
    # the descriptors are left as they were, the good one included
    assert _is_open(first) and _is_open(first + 1)
    good.close()
    bad.close()


# --------------------------------------------------------------------------------------------
# inherited_sockets: with the command line

def test_options_that_say_where_to_listen_are_a_usage_error(passed):
    s = _listener()
    first = passed(s)
    e = env(4242, 1)
    with pytest.raises(UsageError, match=r"^--addr/--port and socket activation exclude each "
                                         r"other \(systemd passed LISTEN_FDS=1\): drop "
                                         r"--addr/--port to serve on the passed socket\(s\)$"):
        activation.inherited_sockets(["--addr", "--port"], e, pid=4242, first=first)
    assert e == {"OTHER": "kept"}
    s.close()


def test_options_without_sockets_for_us_are_fine():
    e = env(1, 1)
    assert activation.inherited_sockets(["--addr", "--port"], e, pid=4242,
                                        first=_free_run(1)) == []
    assert e == {"OTHER": "kept"}


def test_inherited_sockets_are_the_checked_sockets(passed):
    s = _listener()
    first = passed(s)
    socks = activation.inherited_sockets([], env(4242, 1), pid=4242, first=first)
    try:
        assert [x.fileno() for x in socks] == [first]
        assert socks[0].getsockname() == s.getsockname()
    finally:
        for x in socks:
            x.close()
        s.close()

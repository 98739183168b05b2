"""The command line of flexnbd: the read and write client modes against a real server (both
handshakes), their error reporting, and the handling of bad input and help (SPEC 1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flexnbd
from flexnbd.cli import MODES
from tests.conftest import FLEXNBD, FLEXNBD_PROXY, free_port

MiB = 1 << 20
HANDSHAKES = [pytest.param((), id="newstyle"), pytest.param(("--oldstyle",), id="oldstyle")]


def text(res: subprocess.CompletedProcess) -> str:
    return (res.stdout + res.stderr).decode(errors="replace")


def no_traceback(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in text(res), text(res)


def read(run_flexnbd, port: int, offset: int, size: int, *, short: bool = False,
         **kw) -> subprocess.CompletedProcess:
    if short:
        args = ["-l", "127.0.0.1", "-p", str(port), "-F", str(offset), "-S", str(size)]
    else:
        args = ["--addr", "127.0.0.1", "--port", str(port), "--from", str(offset),
                "--size", str(size)]
    return run_flexnbd("read", *args, **kw)


def write(run_flexnbd, port: int, offset: int, data: bytes, *, short: bool = False,
          **kw) -> subprocess.CompletedProcess:
    if short:
        args = ["-l", "127.0.0.1", "-p", str(port), "-F", str(offset), "-S", str(len(data))]
    else:
        args = ["--addr", "127.0.0.1", "--port", str(port), "--from", str(offset),
                "--size", str(len(data))]
    return run_flexnbd("write", *args, input=data, **kw)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, text(res)
    no_traceback(res)
    return res


# --------------------------------------------------------------------------------------------
# read / write against a server

@pytest.mark.parametrize("style", HANDSHAKES)
@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
def test_read_prints_exactly_the_bytes(serve, make_file, run_flexnbd, style, short):
    path = make_file(1 * MiB)
    data = path.read_bytes()
    server = serve(path, *style)
    for offset, size in [(4096, 100), (0, 1), (1, 4095), (12345, 67891), (MiB - 1, 1),
                         (MiB - 70000, 70000), (0, MiB)]:
        res = ok(read(run_flexnbd, server.port, offset, size, short=short))
        assert res.stdout == data[offset:offset + size], (offset, size)


@pytest.mark.parametrize("style", HANDSHAKES)
@pytest.mark.parametrize("short", [False, True], ids=["long", "short"])
def test_write_puts_stdin_into_the_file(serve, make_file, run_flexnbd, style, short):
    path = make_file(1 * MiB)
    model = bytearray(path.read_bytes())
    server = serve(path, *style)
    for offset, size in [(4096, 100), (0, 1), (12345, 67891), (MiB - 1, 1), (MiB - 4097, 4097)]:
        payload = os.urandom(size)
        ok(write(run_flexnbd, server.port, offset, payload, short=short))
        model[offset:offset + size] = payload
        assert path.read_bytes() == bytes(model), (offset, size)
    # And read mode sees it through the server.
    res = ok(read(run_flexnbd, server.port, 12000, 80000, short=short))
    assert res.stdout == bytes(model[12000:92000])


@pytest.mark.parametrize("style", HANDSHAKES)
def test_read_and_write_more_than_32_mib(serve, make_file, run_flexnbd, style):
    """40 MiB (and not a multiple of it) must be split into requests of at most 32 MiB: the
    server refuses longer ones (SPEC 3), so an unsplit transfer fails."""
    size = 48 * MiB
    path = make_file(size)
    data = path.read_bytes()
    server = serve(path, *style)
    length = 40 * MiB + 1000
    res = ok(read(run_flexnbd, server.port, 3 * MiB + 5, length))
    assert len(res.stdout) == length
    assert res.stdout == data[3 * MiB + 5:3 * MiB + 5 + length]
    payload = os.urandom(length)
    ok(write(run_flexnbd, server.port, 7 * MiB + 3, payload))
    expected = data[:7 * MiB + 3] + payload + data[7 * MiB + 3 + length:]
    assert path.read_bytes() == expected
    res = ok(read(run_flexnbd, server.port, 0, size))
    assert res.stdout == expected


@pytest.mark.parametrize("style", HANDSHAKES)
@pytest.mark.parametrize("mode,offset_from_end,size,errno_name", [
    ("read", 0, 1, "EINVAL"),            # starts at the end
    ("read", -100, 4096, "EINVAL"),      # crosses the end
    ("read", 1 << 40, 512, "EINVAL"),    # far beyond
    ("write", 0, 1, "ENOSPC"),
    ("write", -100, 4096, "ENOSPC"),
    ("write", 1 << 40, 512, "ENOSPC"),
])
def test_server_error_prints_the_errno_name(serve, make_file, run_flexnbd, style, mode,
                                            offset_from_end, size, errno_name):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    server = serve(path, *style)
    offset = MiB + offset_from_end
    if mode == "read":
        res = read(run_flexnbd, server.port, offset, size)
    else:
        res = write(run_flexnbd, server.port, offset, b"\x99" * size)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert errno_name in res.stderr.decode(), text(res)
    assert path.read_bytes() == original
    assert server.proc.poll() is None


@pytest.mark.parametrize("mode,errno_name", [("read", "EINVAL"), ("write", "ENOSPC")])
def test_offset_up_to_2_62_is_accepted_and_refused_by_the_server(serve, make_file, run_flexnbd,
                                                                 mode, errno_name):
    server = serve(make_file(1 * MiB))
    if mode == "read":
        res = read(run_flexnbd, server.port, 1 << 62, 512)
    else:
        res = write(run_flexnbd, server.port, 1 << 62, b"\1" * 512)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert errno_name in res.stderr.decode(), text(res)
    assert "usage" not in res.stderr.decode().lower()  # the CLI accepted it


@pytest.mark.parametrize("style", HANDSHAKES)
def test_write_to_a_read_only_server_is_eperm(serve, make_file, run_flexnbd, style):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    server = serve(path, *style, "--read-only")
    res = write(run_flexnbd, server.port, 0, b"x" * 4096)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert "EPERM" in res.stderr.decode(), text(res)
    assert path.read_bytes() == original
    res = ok(read(run_flexnbd, server.port, 0, 4096))
    assert res.stdout == original[:4096]


def test_read_of_size_0_prints_nothing(serve, make_file, run_flexnbd):
    server = serve(make_file(64 * 1024))
    res = ok(read(run_flexnbd, server.port, 4096, 0))
    assert res.stdout == b""


def test_write_with_short_stdin_fails_cleanly(serve, make_file, run_flexnbd):
    """SIZE bytes are promised; stdin ending early is an error (exit 1), not a hang."""
    server = serve(make_file(64 * 1024))
    res = run_flexnbd("write", "--addr", "127.0.0.1", "--port", str(server.port),
                      "--from", "0", "--size", "10000", input=b"abc", timeout=30)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert len(res.stderr.decode().strip().splitlines()) == 1, text(res)
    assert server.proc.poll() is None


@pytest.mark.parametrize("mode", ["read", "write"])
def test_connection_refused(run_flexnbd, mode):
    port = free_port()  # nothing listens there
    if mode == "read":
        res = read(run_flexnbd, port, 0, 512, timeout=30)
    else:
        res = write(run_flexnbd, port, 0, b"\0" * 512, timeout=30)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    err = res.stderr.decode()
    assert re.search(r"ECONNREFUSED|[Cc]onnection refused", err), err
    assert len(err.strip().splitlines()) == 1, err
    assert res.stdout == b""


# --------------------------------------------------------------------------------------------
# bad input: one clear line, the usage, exit 1, never a traceback

def _port_args(port: str) -> list[str]:
    return ["--addr", "127.0.0.1", "--port", port]


BAD_INPUT = [
    pytest.param(["serve", *_port_args("PORT"), "--file", "FILE", "--bogus"], "--bogus",
                 id="serve-unknown-option"),
    pytest.param(["serve", "-Z", *_port_args("PORT"), "--file", "FILE"], "-Z",
                 id="serve-unknown-short-option"),
    pytest.param(["serve", *_port_args("PORT")], "--file", id="serve-missing-file"),
    pytest.param(["serve", *_port_args("0"), "--file", "FILE"], "port", id="serve-port-0"),
    pytest.param(["serve", *_port_args("70000"), "--file", "FILE"], "port",
                 id="serve-port-70000"),
    pytest.param(["serve", *_port_args("abc"), "--file", "FILE"], "port", id="serve-port-abc"),
    pytest.param(["serve", "--addr", "1.2.3.4.5", "--port", "PORT", "--file", "FILE"],
                 "address", id="serve-bad-address"),
    pytest.param(["serve", "--addr", "localhost_ish", "--port", "PORT", "--file", "FILE"],
                 "address", id="serve-bad-address-name"),
    pytest.param(["serve", *_port_args("PORT"), "--file", "MISSING"], "MISSING",
                 id="serve-file-does-not-exist"),
    *[pytest.param(["serve", *_port_args("PORT"), "--file", "FILE", "--max-clients", n],
                   "--max-clients", id=f"serve-max-clients-{n}")
      for n in ("0", "-1", "1025", "abc")],
    pytest.param(["serve", *_port_args("PORT"), "--file", "FILE", "--max-clients", "4",
                  "--max-clients-per-address", "5"], "more than --max-clients",
                 id="serve-per-address-over-max-clients"),
    pytest.param(["read", *_port_args("PORT"), "--from", "0", "--size", "1", "--bogus"],
                 "--bogus", id="read-unknown-option"),
    pytest.param(["read", *_port_args("PORT"), "--from", "0"], "--size",
                 id="read-missing-size"),
    pytest.param(["read", *_port_args("0"), "--from", "0", "--size", "1"], "port",
                 id="read-port-0"),
    pytest.param(["read", *_port_args("70000"), "--from", "0", "--size", "1"], "port",
                 id="read-port-70000"),
    pytest.param(["write", *_port_args("abc"), "--from", "0", "--size", "1"], "port",
                 id="write-port-abc"),
    pytest.param(["write", "--addr", "999.1.1.1", "--port", "PORT", "--from", "0", "--size",
                  "1"], "address", id="write-bad-address"),
    pytest.param(["read", *_port_args("PORT"), "--from", "x", "--size", "1"], "offset",
                 id="read-bad-offset"),
    pytest.param(["read", *_port_args("PORT"), "--from", str((1 << 62) + 1), "--size", "1"],
                 "offset", id="read-offset-over-2-62"),
    pytest.param(["read", *_port_args("PORT"), "--from", "0", "--size", "-5"], "size",
                 id="read-negative-size"),
    pytest.param(["write", *_port_args("PORT"), "--from", "0", "--size", str((1 << 30) + 1)],
                 "size", id="write-size-over-2-30"),
]


@pytest.mark.parametrize("args,mentions", BAD_INPUT)
def test_bad_input(run_flexnbd, make_file, tmp_path, args, mentions):
    port = str(free_port())
    file = str(make_file(4096))
    missing = str(tmp_path / "no-such-file.img")
    args = [{"PORT": port, "FILE": file, "MISSING": missing}.get(a, a) for a in args]
    mentions = {"MISSING": missing}.get(mentions, mentions)
    res = run_flexnbd(*args, timeout=20)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert res.stdout == b""
    lines = res.stderr.decode().rstrip("\n").splitlines()
    assert len(lines) == 2, f"expected one message line and one usage line:\n{text(res)}"
    message, usage = lines
    assert mentions.lower() in message.lower(), message
    assert usage.startswith(f"usage: flexnbd {args[0]} "), usage


def test_unknown_mode(run_flexnbd):
    res = run_flexnbd("frobnicate", "--addr", "127.0.0.1", timeout=20)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    err = res.stderr.decode()
    first, *rest = err.splitlines()
    assert "frobnicate" in first and "mode" in first, err
    assert any(line.startswith("usage:") for line in rest), err
    assert res.stdout == b""


def test_help_for_an_unknown_mode(run_flexnbd):
    res = run_flexnbd("help", "frobnicate", timeout=20)
    assert res.returncode == 1, text(res)
    no_traceback(res)
    assert "frobnicate" in res.stderr.decode().splitlines()[0]


# --------------------------------------------------------------------------------------------
# help

@pytest.mark.parametrize("args,must_mention", [
    (["help"], ["serve", "read", "write", "help"]),
    (["-h"], ["serve", "read", "write"]),
    (["--help"], ["serve", "read", "write"]),
    (["help", "serve"], ["--addr", "--port", "--file", "--oldstyle", "--read-only", "--unix"]),
    (["serve", "-h"], ["--addr", "--port", "--file", "--oldstyle", "--read-only"]),
    (["serve", "--help"], ["--addr", "--port", "--file"]),
    (["help", "read"], ["--addr", "--port", "--from", "--size", "--bind"]),
    (["read", "-h"], ["--from", "--size"]),
    (["help", "write"], ["--addr", "--port", "--from", "--size", "--bind"]),
    (["write", "--help"], ["--from", "--size"]),
])
def test_help_exits_0_with_usage(run_flexnbd, args, must_mention):
    res = run_flexnbd(*args, timeout=20)
    assert res.returncode == 0, text(res)
    no_traceback(res)
    out = res.stdout.decode()
    assert "usage:" in out.lower(), out
    for word in must_mention:
        assert word in out, (word, out)


@pytest.mark.parametrize("mode", [*MODES, "help"])
def test_help_of_every_mode(run_flexnbd, mode):
    res = run_flexnbd("help", mode, timeout=20)
    assert res.returncode == 0, text(res)
    assert res.stderr == b""
    assert res.stdout.decode().startswith(f"usage: flexnbd {mode} "), text(res)


def test_help_help_lists_every_topic(run_flexnbd):
    out = ok(run_flexnbd("help", "help", timeout=20)).stdout.decode()
    assert "MODE" in out
    for word in [*MODES, "proxy"]:
        assert re.search(rf"\b{re.escape(word)}\b", out), (word, out)


def test_help_proxy_points_at_the_proxy(run_flexnbd):
    res = ok(run_flexnbd("help", "proxy", timeout=20))
    out = " ".join(res.stdout.decode().split())
    assert "flexnbd-proxy --help" in out and "man flexnbd-proxy" in out, out
    assert "separate program" in out, out


def test_main_usage_mentions_version(run_flexnbd):
    out = ok(run_flexnbd("help", timeout=20)).stdout.decode()
    assert "--version" in out and "man flexnbd" in out, out


VERSION = f"{flexnbd.__version__}\n".encode()


@pytest.mark.parametrize("args", [
    ["--version"], ["-V"],
    # after a mode, as nbdkit and qemu-nbd have it, whatever else is on the line
    ["serve", "--version"], ["status", "-V"], ["read", "-vV"],
    ["serve", "--port", "1", "--file", "/nonexistent", "--version"],
])
def test_version(run_flexnbd, args):
    res = run_flexnbd(*args, timeout=20)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"flexnbd " + VERSION, b""), text(res)


@pytest.mark.parametrize("args", [["--version"], ["-V"], ["--addr", "1.2.3.4.5", "-V"]])
def test_proxy_version(args):
    res = subprocess.run([*FLEXNBD_PROXY, *args], capture_output=True, timeout=20)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"flexnbd-proxy " + VERSION, b"")


def test_version_after_double_dash_is_not_an_option(run_flexnbd):
    """`--` ends the options: `--version` after it is an ACL entry (a bad one)."""
    res = run_flexnbd("acl", "--sock", "/nonexistent", "--", "--version", timeout=20)
    assert res.returncode == 1 and b"flexnbd 0" not in res.stdout, text(res)


def test_help_ignores_other_options(run_flexnbd):
    """`serve -h` with otherwise bad options still just prints help (nothing is started)."""
    res = run_flexnbd("serve", "-h", "--port", "1", "--file", "/nonexistent", timeout=20)
    assert res.returncode == 0, text(res)
    assert "usage:" in res.stdout.decode()


# --------------------------------------------------------------------------------------------
# python -m flexnbd equals the flexnbd console script

def _console_script() -> str:
    beside = Path(sys.executable).with_name("flexnbd")
    if beside.exists():
        return str(beside)
    found = shutil.which("flexnbd")
    assert found, "the flexnbd console script is not installed"
    return found


@pytest.mark.parametrize("args", [
    ["help"], ["help", "serve"], ["read", "-h"], ["serve", "--bogus"], ["frob"], ["--version"],
    ["help", "proxy"],
    ["read", "--addr", "127.0.0.1", "--port", "0", "--from", "0", "--size", "1"],
])
def test_python_m_flexnbd_equals_the_console_script(args):
    script = _console_script()
    a = subprocess.run([script, *args], capture_output=True, timeout=20)
    b = subprocess.run([*FLEXNBD, *args], capture_output=True, timeout=20)
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert b"Traceback" not in a.stdout + a.stderr


def test_console_script_reads_from_a_server(serve, make_file):
    path = make_file(64 * 1024)
    server = serve(path)
    res = subprocess.run([_console_script(), "read", "-l", "127.0.0.1", "-p", str(server.port),
                          "-F", "100", "-S", "1000"], capture_output=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == path.read_bytes()[100:1100]

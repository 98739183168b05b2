"""Driving a migration from the command line (issue 25, part 2): `mirror --max-speed RATE`
applies from the first request; `wait` (and `mirror --wait` on a running mirror to the same
destination) follows a mirror to its outcome; `break` says what it stopped; RATE and byte
counts take K/M/G/T suffixes, and bad ones are usage errors. Real processes on 127.0.0.1.

No timed assertions: a mirror that must still be running runs under a limit so low it cannot
have finished (8 MiB at 256 KiB/s: 32 s), and one that must complete is let go with
`mirror-speed 0` once its follower is attached (the source logged its `mirror_wait`).
"""

from __future__ import annotations

import re
import socket
import subprocess

import pytest

from tests.conftest import FLEXNBD
from tests.support import control as cu
from tests.support.migration import (
    MiB,
    assert_completed,
    mirror_cli,
    mirror_request,
    out,
    running,
)
from tests.support.waiting import wait_until

SLOW = 256 * 1024              # B/s: 8 MiB take 32 s
BAD_RATES = ["fast", "", "-1", "1.5", "0.1K", "1e6", "5X", "5 M", "5iB", "1P",
             str(1 << 64), "16777216T"]


def background(*args: str) -> subprocess.Popen:
    return subprocess.Popen(FLEXNBD + list(args), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{proc.args} did not end: {stdout!r} {stderr!r}")
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def followers(src) -> int:
    return src.log().count("control: mirror_wait")


def let_go(src, followers_expected: int) -> None:
    """Once ``followers_expected`` followers wait, lift the limit: the mirror completes."""
    assert wait_until(lambda: followers(src) >= followers_expected, 30), src.log()
    res = subprocess.run(FLEXNBD + ["mirror-speed", "--sock", str(src.sock), "-m", "0"],
                         capture_output=True, timeout=30)
    assert (res.returncode, res.stdout) == (0, b"updated\n"), out(res)


# --------------------------------------------------------------------------------------------
# --max-speed RATE

def test_a_speed_given_at_start_applies_from_the_first_request(pair, make_file, run_flexnbd):
    """`mirror --max-speed 256K` on 8 MiB: at the first status the mirror still runs, under
    its limit, with nearly everything left; `break` then says where it went and how far it
    got. (Sent 0.3 s later with `mirror-speed`, the limit came after a small disk was done.)"""
    size = 8 * MiB
    p = pair(make_file(size))
    res = mirror_cli(p.src, p.dst.port, "--max-speed", "256K")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"Mirror started\n", b""), out(res)
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true", st
    assert st["migration_speed_limit"] == str(SLOW), st
    assert int(st["migration_speed"]) <= SLOW, st
    assert st["migration_destination"] == f"127.0.0.1:{p.dst.port}", st
    # (the CLI sent the limit in the request: a wildcard BIND_IP stands before MAX_BPS)
    assert f"control: mirror 127.0.0.1 {p.dst.port} exit 0.0.0.0 {SLOW}" in p.src.log()
    # The same parser for mirror-speed: 1.5M is 1572864 B/s.
    res = run_flexnbd("mirror-speed", "--sock", str(p.src.sock), "--max-speed", "1.5M")
    assert (res.returncode, res.stdout) == (0, b"updated\n"), out(res)
    assert cu.status(p.src.sock)["migration_speed_limit"] == "1572864"
    res = run_flexnbd("mirror-speed", "--sock", str(p.src.sock), "--max-speed", "256k")
    assert (res.returncode, res.stdout) == (0, b"updated\n"), out(res)
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true" and int(st["migration_speed"]) <= 1572864, st
    # break: the 0.5.0 line, then what it stopped.
    res = run_flexnbd("break", "--sock", str(p.src.sock))
    assert (res.returncode, res.stderr) == (0, b""), out(res)
    m = re.fullmatch(rf"mirror stopped\nto 127\.0\.0\.1 port {p.dst.port}, attempt 1: "
                     r"(\d+) of (\d+) bytes sent\n", res.stdout.decode())
    assert m, out(res)
    sent, total = int(m.group(1)), int(m.group(2))
    assert total == size and sent < size, (sent, total)
    assert cu.status(p.src.sock)["migration_outcome"] == "stopped"
    assert running(p.dst) and cu.status(p.dst.sock)["has_control"] == "false"


def test_break_before_anything_was_sent_says_so(pair, make_file):
    """A mirror that waits for its allocation map has sent nothing: `break` says so."""
    slow_map = {"FLEXNBD_ALLOCMAP_METHOD": "seek", "FLEXNBD_ALLOCMAP_DELAY_MS": "200"}
    p = pair(make_file(8 * MiB), src_env=slow_map)
    assert cu.status(p.src.sock)["allocation_map_method"] == "pending"
    assert mirror_request(p.src, p.dst.port) == "0: Mirror started\n"
    assert cu.control(p.src.sock, "break") == \
        f"0: mirror stopped\nto 127.0.0.1 port {p.dst.port}: stopped before its first " \
        "attempt sent anything\n"


@pytest.mark.parametrize("rate", BAD_RATES)
@pytest.mark.parametrize("mode", ["mirror", "mirror-speed"])
def test_a_bad_rate_is_a_usage_error(run_flexnbd, tmp_path, mode, rate):
    extra = ["--addr", "127.0.0.1", "--port", "4000"] if mode == "mirror" else []
    res = run_flexnbd(mode, "--sock", str(tmp_path / "none.sock"), *extra, "--max-speed", rate,
                      timeout=30)
    assert res.returncode == 1 and res.stdout == b"", out(res)
    assert b"Traceback" not in res.stderr
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 2, out(res)
    assert lines[0].startswith(f"flexnbd {mode}: argument -m/--max-speed: bad speed"), lines
    assert repr(rate) in lines[0], lines
    assert lines[1].startswith(f"usage: flexnbd {mode} "), lines


@pytest.mark.parametrize("option,value,why", [
    ("--size", "1.5", "not a whole number"), ("--size", "2G", "more than 1073741824"),
    ("--size", "4KB4", "is not a number of bytes"), ("--from", "-4K", "is not a number"),
    ("--from", "4.5M5", "is not a number"), ("--from", "4194305T", "more than"),
])
@pytest.mark.parametrize("mode", ["read", "write"])
def test_a_bad_byte_count_is_a_usage_error(run_flexnbd, mode, option, value, why):
    args = {"--from": "0", "--size": "4K", option: value}
    res = run_flexnbd(mode, "--addr", "127.0.0.1", "--port", "1",
                      *[f"{k}={v}" for k, v in args.items()], input=b"", timeout=30)
    assert res.returncode == 1 and res.stdout == b"", out(res)
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 2 and why in lines[0] and repr(value) in lines[0], out(res)
    assert lines[1].startswith(f"usage: flexnbd {mode} "), lines


def test_read_and_write_take_suffixes(start_server, make_file, run_flexnbd):
    path = make_file(MiB)
    srv = start_server(path)
    where = ["--addr", "127.0.0.1", "--port", str(srv.port)]
    data = bytes(range(256)) * 16
    res = run_flexnbd("write", *where, "--from", "8K", "--size", "4K", input=data)
    assert res.returncode == 0, out(res)
    res = run_flexnbd("read", *where, "--from", "8KiB", "--size", "0.5k")
    assert (res.returncode, res.stdout) == (0, data[:512]), out(res)
    assert path.read_bytes()[8192:12288] == data


# --------------------------------------------------------------------------------------------
# wait, and mirror --wait on a running mirror

def test_wait_follows_the_running_mirror_to_completion(pair, make_file):
    p = pair(make_file(8 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=SLOW) == "0: Mirror started\n"
    follower = background("wait", "--sock", str(p.src.sock))
    let_go(p.src, 1)
    rc, stdout, stderr = finish(follower)
    assert (rc, stderr) == (0, ""), (rc, stdout, stderr)
    assert stdout.startswith(f"following the mirror to 127.0.0.1:{p.dst.port}\n"), stdout
    assert stdout.endswith("migration completed\n"), stdout
    assert_completed(p)


def test_wait_reports_a_stopped_mirror_as_a_failure(pair, make_file, run_flexnbd):
    p = pair(make_file(8 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=SLOW) == "0: Mirror started\n"
    follower = background("wait", "--sock", str(p.src.sock))
    assert wait_until(lambda: followers(p.src) >= 1, 30), p.src.log()
    assert cu.stopped(cu.control(p.src.sock, "break"), p.dst.port)
    rc, stdout, stderr = finish(follower)
    assert (rc, stderr) == (1, "mirror stopped\n"), (rc, stdout, stderr)
    # No mirror now: `wait` says so at once, and how the last one ended.
    res = run_flexnbd("wait", "--sock", str(p.src.sock), timeout=30)
    assert (res.returncode, res.stdout, res.stderr) == \
        (1, b"", b"not mirroring\nthe last mirror ended: stopped\n"), out(res)


def test_wait_with_no_mirror(start_server, make_file, run_flexnbd, tmp_path):
    src = start_server(make_file(MiB))
    res = run_flexnbd("wait", "--sock", str(src.sock), timeout=30)
    assert (res.returncode, res.stdout, res.stderr) == (1, b"", b"not mirroring\n"), out(res)
    # No server behind the socket: one line, exit 1.
    res = run_flexnbd("wait", "--sock", str(tmp_path / "none.sock"), timeout=30)
    assert res.returncode == 1 and res.stdout == b"", out(res)
    assert len(res.stderr.splitlines()) == 1 and b"none.sock" in res.stderr, out(res)
    assert b"Traceback" not in res.stderr


def test_wait_with_too_many_waiters(pair, make_file, run_flexnbd):
    """16 `mirror_wait` requests wait already: `wait` is answered at once, exit 1."""
    p = pair(make_file(8 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=SLOW) == "0: Mirror started\n"
    waiters: list[socket.socket] = []
    try:
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiters.append(s)
            s.settimeout(15)
            s.connect(str(p.src.sock))
            s.sendall(b"mirror_wait\n\n")
        assert wait_until(lambda: followers(p.src) >= 16, 15), p.src.log()
        res = run_flexnbd("wait", "--sock", str(p.src.sock), timeout=30)
        assert (res.returncode, res.stderr) == \
            (1, b"too many mirror_wait requests waiting\n"), out(res)
        assert cu.status(p.src.sock)["is_mirroring"] == "true"
    finally:
        for s in waiters:
            s.close()
    assert cu.stopped(cu.control(p.src.sock, "break"), p.dst.port)


def test_mirror_wait_follows_a_running_mirror_to_the_same_destination(pair, make_file):
    """A second `mirror --wait` to where the running mirror goes: the 0.5.0 answer, then it
    follows that mirror to its outcome (exit 0: completed)."""
    p = pair(make_file(8 * MiB))
    assert mirror_request(p.src, p.dst.port, max_bps=SLOW) == "0: Mirror started\n"
    again = background("mirror", "--sock", str(p.src.sock), "--addr", "127.0.0.1", "--port",
                       str(p.dst.port), "--wait")
    let_go(p.src, 1)
    rc, stdout, stderr = finish(again)
    assert (rc, stderr) == (0, "mirror already running\n"), (rc, stdout, stderr)
    assert stdout.startswith(f"following the running mirror to 127.0.0.1:{p.dst.port}\n")
    assert stdout.endswith("migration completed\n"), stdout
    assert_completed(p)


def test_mirror_wait_does_not_follow_a_mirror_that_goes_elsewhere(pair, make_file,
                                                                   start_server, tmp_path):
    p = pair(make_file(8 * MiB))
    other_file = tmp_path / "other.img"
    with open(other_file, "wb") as f:
        f.truncate(8 * MiB)
    other = start_server(other_file, mode="listen")
    assert mirror_request(p.src, p.dst.port, max_bps=SLOW) == "0: Mirror started\n"
    res = mirror_cli(p.src, other.port, "--wait", timeout=30)
    assert (res.returncode, res.stdout) == (1, b""), out(res)
    assert res.stderr.decode() == (
        f"mirror already running\nthe running mirror goes to 127.0.0.1:{p.dst.port}, not "
        f"127.0.0.1:{other.port}; not following it\n"), out(res)
    # The running mirror is untouched; the other destination was never contacted.
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true", st
    assert st["migration_destination"] == f"127.0.0.1:{p.dst.port}", st
    assert followers(p.src) == 0
    assert "connected" not in other.log().split("serving", 1)[-1]
    assert cu.stopped(cu.control(p.src.sock, "break"), p.dst.port)

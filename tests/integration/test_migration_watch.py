"""Watching a migration (issue 25, "watch it"): at the DEFAULT log level (no -v) both hosts log
the milestones, with the figures right; the progress line's interval can be shortened for
tests; the listener says why it exits, also on SIGTERM; ``-q`` silences it all; the listener's
status carries what its sender wrote (received, zeroed, covered).

Real processes on 127.0.0.1; every server is started without -v."""

from __future__ import annotations

import json
import os
import re
import signal
import socket

from flexnbd import wire
from tests.support import control as cu
from tests.support.migration import (
    MiB,
    _request,
    _sender,
    logs,
    mirror_cli,
    mirror_request,
    out,
    same_files,
    sparse_file,
    wait_exit,
)
from tests.support.serving import LOG_LINE
from tests.support.waiting import wait_until

KiB = 1 << 10


def _quiet_pair(start_server, tmp_path, src_file, src_env=None):
    """A listen destination (a fresh sparse file of the same size) and a serve source, both
    at the default log level."""
    dst_file = tmp_path / (src_file.name + ".dst")
    with open(dst_file, "wb") as f:
        f.truncate(os.path.getsize(src_file))
    dst = start_server(dst_file, mode="listen", verbose=False)
    src = start_server(src_file, env=src_env, verbose=False)
    return src, dst, dst_file


def _one(pattern: str, text: str) -> re.Match:
    found = list(re.finditer(pattern, text, re.M))
    assert len(found) == 1, f"{len(found)} lines match {pattern!r} in:\n{text}"
    return found[0]


def _info_lines(text: str) -> list[str]:
    lines = text.splitlines()
    for line in lines:
        assert LOG_LINE.match(line), f"bad log line: {line!r}"
    return [line for line in lines if line.split(":")[1] == "I"]


def test_both_hosts_log_the_milestones_at_the_default_level(start_server, tmp_path):
    size = 64 * MiB
    src_file = tmp_path / "disk.img"
    written = sparse_file(src_file, size, pieces=16, piece=256 * KiB)     # 4 MiB of data
    src, dst, dst_file = _quiet_pair(start_server, tmp_path, src_file)
    assert wait_until(lambda: cu.status(src.sock)["allocation_map_method"] != "pending")
    res = mirror_cli(src, dst.port)
    assert res.returncode == 0, out(res)
    assert (wait_exit(src), wait_exit(dst)) == (0, 0), logs(src, dst)
    assert same_files(src_file, dst_file)
    s, d = src.log(), dst.log()

    # the source: start, end (nothing else at info: the default level still hides the rest)
    start = _one(r"migration\.mirror:\d+: migration to 127\.0\.0\.1 port (\d+) started: (\d+) "
                 r"bytes, (\d+) bytes of data to send \(newstyle, no TLS, holes as "
                 r"WRITE_ZEROES\)$", s)
    assert int(start[1]) == dst.port and int(start[2]) == size
    data = int(start[3])
    assert written <= data <= size, (written, data)
    end = _one(r"migration\.mirror:\d+: migration completed: (\d+) bytes of data sent, (\d+) "
               r"bytes on the wire, in ([\d.]+) s \([\d.]+ [KMG]?i?B/s on average, 1 attempt; ", s)
    assert int(end[1]) == data
    assert data < int(end[2]) < data + MiB      # plus 28-byte headers and replies
    assert "serving" not in s and "mirror connected" not in s, s
    assert {line.split(" ")[2].split(":")[0] for line in _info_lines(s)} == {"migration.mirror"}

    # the listener: the sender, what it wrote, the final sync, why it exits
    _one(r"sender 127\.0\.0\.1:\d+ connected \(newstyle, no TLS, migration [0-9a-f]{32}\)$", d)
    got = _one(r"sender 127\.0\.0\.1:\d+: received (\d+) bytes of data and (\d+) bytes of "
               r"zeroes in (\d+) requests, covering (\d+) of (\d+) bytes \(then DISC\)$", d)
    assert int(got[1]) == data                    # what the source had, and no more
    assert int(got[2]) == size - data             # the holes, as WRITE_ZEROES
    assert int(got[4]) == int(got[5]) == size
    _one(rf"migration completed: {re.escape(str(dst_file))} received all {size} bytes from "
         r"127\.0\.0\.1:\d+, final sync in [\d.]+ s; this server has control now", d)
    _one(r"lifecycle:\d+: stopping on migration completed$", d)
    _one(r"exiting: the migration completed and was handed off \(exit status 0\)$", d)
    _one(r"lifecycle:\d+: stopped; exit status 0$", d)
    assert "serving" not in d, d
    assert len(_info_lines(d)) == 6, d


def test_a_progress_line_comes_at_the_interval_set(start_server, tmp_path):
    """FLEXNBD_MIRROR_PROGRESS_SECS=0.1; the speed limit makes the first pass last at least
    3.75 s (the average stays under 4 MiB/s), so progress lines must come."""
    size = 16 * MiB
    src_file = tmp_path / "dense.img"
    src_file.write_bytes(os.urandom(size))
    src, dst, dst_file = _quiet_pair(start_server, tmp_path, src_file,
                                     src_env={"FLEXNBD_MIRROR_PROGRESS_SECS": "0.1"})
    assert wait_until(lambda: cu.status(src.sock)["allocation_map_method"] != "pending")
    assert mirror_request(src, dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    assert (wait_exit(src), wait_exit(dst)) == (0, 0), logs(src, dst)
    assert same_files(src_file, dst_file)
    lines = re.findall(rf"migration\.mirror:\d+: migration to 127\.0\.0\.1 port {dst.port}: "
                       r"([\d.]+)% \((\d+) bytes of data sent, (\d+) left\), ([\d.]+) "
                       r"([KMG]?i?B)/s, (.+) left, attempt 1, (first pass|dirty pass \d+|"
                       r"endgame)$", src.log(), re.M)
    assert lines, src.log()
    for percent, sent, left, rate, unit, _eta, _phase in lines:
        assert 0 < float(percent) <= 100
        assert 0 < int(sent) <= size and int(left) <= size
        # the limit holds (one chunk of slack: the average counts what was sent)
        assert float(rate) * {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": 1 << 30}[unit] <= 5 * MiB
    sent = [int(line[1]) for line in lines if line[6] == "first pass"]
    assert sent == sorted(sent)


def _write(s: socket.socket, offset: int, data: bytes) -> None:
    assert _request(s, wire.CMD_WRITE, offset, len(data), data) == 0


def _received(sock) -> tuple[int, int, int]:
    st = cu.status(sock)
    assert list(st)[-3:] == ["received_bytes", "zeroed_bytes", "covered_bytes"], st
    return int(st["received_bytes"]), int(st["zeroed_bytes"]), int(st["covered_bytes"])


def test_listener_status_and_its_exit_on_sigterm(start_server, make_file, run_flexnbd):
    size = 4 * MiB
    dst = start_server(make_file(size, random=False), mode="listen", verbose=False)
    assert _received(dst.sock) == (0, 0, 0)
    s, _info = _sender(dst.port)
    with s:
        _write(s, 0, os.urandom(MiB))
        _write(s, 2 * MiB, os.urandom(64 * KiB))          # a second range, and again
        _write(s, 2 * MiB, os.urandom(64 * KiB))
        assert _received(dst.sock) == (MiB + 128 * KiB, 0, MiB + 64 * KiB)
        assert _request(s, wire.CMD_WRITE_ZEROES, MiB, size - MiB) == 0
        assert _received(dst.sock) == (MiB + 128 * KiB, size - MiB, size)
        res = run_flexnbd("status", "--sock", str(dst.sock), "--json")
        assert res.returncode == 0, out(res)
        st = json.loads(res.stdout)
        assert (st["received_bytes"], st["zeroed_bytes"], st["covered_bytes"]) == \
            (MiB + 128 * KiB, size - MiB, size)
        assert st["has_control"] is False
    # gone without DISC: nothing completed, the last sender's figures stay
    assert wait_until(lambda: "no DISC" in dst.log()), dst.log()
    assert _received(dst.sock) == (MiB + 128 * KiB, size - MiB, size)
    assert dst.stop(signal.SIGTERM) == 1
    d = dst.log()
    _one(r"sender 127\.0\.0\.1:\d+ connected \(newstyle, no TLS\)$", d)
    _one(rf"sender 127\.0\.0\.1:\d+: received {MiB + 128 * KiB} bytes of data and "
         rf"{size - MiB} bytes of zeroes in 4 requests, covering {size} of {size} bytes "
         r"\(no DISC\)$", d)
    _one(r"no migration completed: the sender left without DISC", d)      # (a warning)
    _one(r"lifecycle:\d+: stopping on SIGTERM$", d)
    _one(rf"exiting without a completed migration \(exit status 1\): the last sender covered "
         rf"{size} of {size} bytes$", d)
    _one(r"lifecycle:\d+: stopped; exit status 1$", d)


def test_sigterm_while_a_sender_is_connected(start_server, make_file):
    """The sender's figures are logged, then the exit, which quotes them (its session ended
    first)."""
    size = 2 * MiB
    dst = start_server(make_file(size, random=False), mode="listen", verbose=False)
    s, _info = _sender(dst.port)
    with s:
        _write(s, 0, os.urandom(MiB))
        assert dst.stop(signal.SIGTERM) == 1
    d = dst.log()
    got = _one(rf"sender 127\.0\.0\.1:\d+: received {MiB} bytes of data and 0 bytes of zeroes in "
               rf"1 requests, covering {MiB} of {size} bytes \(no DISC\)$", d)
    gone = _one(rf"exiting without a completed migration \(exit status 1\): the last sender "
                rf"covered {MiB} of {size} bytes$", d)
    assert _one(r"stopping on SIGTERM$", d).start() < got.start() < gone.start(), d


def test_a_listener_without_a_sender_says_so_on_sigterm(start_server, make_file):
    dst = start_server(make_file(MiB, random=False), mode="listen", verbose=False)
    assert dst.stop(signal.SIGTERM) == 1
    _one(r"exiting without a completed migration \(exit status 1\): no sender connected$",
         dst.log())


def test_quiet_silences_the_milestones(start_server, make_file):
    dst = start_server(make_file(MiB, random=False), "-q", mode="listen", verbose=False)
    s, _info = _sender(dst.port)
    with s:
        _write(s, 0, os.urandom(64 * KiB))
    assert wait_until(lambda: cu.status(dst.sock)["num_clients"] == "0")
    assert dst.stop(signal.SIGTERM) == 1
    assert dst.log() == ""


def test_a_bad_progress_interval_is_a_usage_error(run_flexnbd, make_file):
    path = make_file(MiB)
    for bad in ("soon", "0", "-1"):
        res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", "1", "--file", str(path),
                          env={"FLEXNBD_MIRROR_PROGRESS_SECS": bad})
        assert res.returncode == 1, out(res)
        err = res.stderr.decode()
        assert "FLEXNBD_MIRROR_PROGRESS_SECS" in err and "Traceback" not in err, err
        assert "usage:" in err, err

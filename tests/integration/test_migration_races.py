"""Races around a migration (SPEC §6.6): a stop signal at every point of a mirror's life, a
second `mirror` while one runs, `break` while running, at varied moments, and with nothing
to break.

The invariant of the signal race: a source that exits 0 has moved the data (the destination
completed and exits 0 with an identical file); a source whose migration did not complete exits
1 and the destination has not completed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import FlexnbdProcess, free_port, require_tool
from tests.support import control as cu
from tests.support.migration import (
    MiB,
    assert_completed,
    mirror_cli,
    mirror_request,
    out,
    running,
    same_files,
    wait_exit,
)
from tests.support.waiting import wait_until


def _ready(proc: FlexnbdProcess, port: int, sock: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not sock.exists():
        if proc.proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.proc.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sock} did not appear:\n{proc.log()}")
        time.sleep(0.01)
    while "serving" not in proc.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not serving:\n{proc.log()}")
        time.sleep(0.01)


def _one_run(tmp_path: Path, n: int, src_file: Path, size: int, delay: float,
             max_bps: int) -> tuple[str, str]:
    """Start a listener and a source, ask for a mirror, SIGTERM the source ``delay`` seconds
    after the request went out; check the invariant. (outcome, control reply)."""
    run_dir = tmp_path / f"run{n}"
    run_dir.mkdir()
    dst_file = run_dir / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    dport, sport = free_port(), free_port()
    dsock, ssock = run_dir / "dst.sock", run_dir / "src.sock"
    dst = FlexnbdProcess(["listen", "-l", "127.0.0.1", "-p", str(dport), "-f", str(dst_file),
                  "-s", str(dsock), "-v"], run_dir / "dst.log")
    src = FlexnbdProcess(["serve", "-l", "127.0.0.1", "-p", str(sport), "-f", str(src_file),
                  "-s", str(ssock), "-v"], run_dir / "src.log")
    try:
        _ready(dst, dport, dsock)
        _ready(src, sport, ssock)
        reply: list[str] = []

        def ask() -> None:
            try:
                reply.append(cu.control(ssock, "mirror", "127.0.0.1", str(dport), "exit",
                                        "127.0.0.1", str(max_bps), timeout=30))
            except OSError as e:
                reply.append(f"control failed: {e}")

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(delay)
        src.signal(signal.SIGTERM)
        src_rc = src.proc.wait(30)
        asker.join(30)
        answer = reply[0] if reply else "no reply"
        context = f"run {n} delay {delay:.3f} reply {answer!r} source exit {src_rc}\n" \
                  f"--- source ---\n{src.log()}\n--- destination ---\n{dst.log()}"
        if src_rc == 0 and answer == "0: Mirror started\n":
            # The data moved: the destination completed.
            assert dst.proc.wait(20) == 0, context
            assert same_files(src_file, dst_file), context
            return "completed", answer
        if answer == "0: Mirror started\n":
            assert src_rc == 1, context
        else:
            # The mirror never started: the signal came first (the control socket closed
            # without reading the request, or answered "1: shutting down"), or it was
            # abandoned. The source never took the request on: 0 or 1 both say "not moved"
            # here, and the control reply (none, or an error) told the requester so.
            assert answer == "" or answer.startswith(("1: ", "control failed")), context
            assert "control: mirror" not in src.log() or answer.startswith("1: "), context
            assert src_rc in (0, 1), context
        # Nothing completed at the destination: it waits on, and exits 1 when stopped.
        assert wait_until(lambda: "no migration completed" in dst.log()
                          or "connected" not in dst.log().split("serving", 1)[-1]
                          or not running(dst), 10), context
        time.sleep(0.1)
        assert running(dst), context
        assert cu.status(dsock)["has_control"] == "false", context
        assert dst.stop() == 1, context
        kind = "stopped" if answer == "0: Mirror started\n" else \
            f"not started ({answer.strip() or 'no reply'}, exit {src_rc})"
        return kind, answer
    finally:
        src.kill()
        dst.kill()


def test_sigterm_at_varied_moments(tmp_path):
    """50 runs: SIGTERM to the source from 0 to 1.5 s after the mirror request; the mirror of
    16 MiB at 16 MB/s takes about 1 s."""
    size = 16 * MiB
    src_file = tmp_path / "src.img"
    src_file.write_bytes(os.urandom(size))
    runs = 50
    outcomes: Counter[str] = Counter()
    for n in range(runs):
        delay = 1.5 * n / (runs - 1)
        kind, _ = _one_run(tmp_path, n, src_file, size, delay, max_bps=16 * MiB)
        outcomes[kind] += 1
    print(dict(outcomes))
    # Both ends of the race happened.
    assert outcomes["completed"] >= 5, outcomes
    assert outcomes["stopped"] >= 5, outcomes


# --------------------------------------------------------------------------------------------
# a second mirror, break

def test_second_mirror_while_one_runs(pair, make_file, start_server, tmp_path):
    size = 16 * MiB
    p = pair(make_file(size))
    other_file = tmp_path / "other.img"
    with open(other_file, "wb") as f:
        f.truncate(size)
    other = start_server(other_file, mode="listen")
    assert mirror_request(p.src, p.dst.port, max_bps=6 * MiB) == "0: Mirror started\n"
    # The same destination, another one, over the socket and with the CLI.
    assert mirror_request(p.src, p.dst.port) == "1: mirror already running\n"
    assert mirror_request(p.src, other.port, "nothing") == "1: mirror already running\n"
    res = mirror_cli(p.src, other.port)
    assert (res.returncode, res.stdout, res.stderr) == \
        (1, b"", b"mirror already running\n"), out(res)
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true" and st["migration_speed_limit"] == str(6 * MiB), st
    assert_completed(p)
    # The second destination was never contacted.
    assert running(other) and cu.status(other.sock)["has_control"] == "false"
    assert "connected" not in other.log().split("serving", 1)[-1]


def test_break_then_mirror_again(pair, make_file, run_flexnbd):
    size = 16 * MiB
    p = pair(make_file(size))
    assert mirror_request(p.src, p.dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    time.sleep(0.5)
    assert cu.status(p.src.sock)["is_mirroring"] == "true"
    assert cu.stopped(cu.control(p.src.sock, "break"))
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    assert "migration_speed" not in st
    assert cu.control(p.src.sock, "break") == "1: not mirroring\n"
    # The source serves on.
    nbdinfo = require_tool("nbdinfo")
    res = subprocess.run([nbdinfo, "--size", f"nbd://127.0.0.1:{p.src.port}"],
                         capture_output=True, timeout=30)
    assert res.stdout.strip() == str(size).encode(), res
    # The destination did not complete.
    assert wait_until(lambda: "no migration completed" in p.dst.log(), 10), p.dst.log()
    assert running(p.dst) and cu.status(p.dst.sock)["has_control"] == "false"
    # Again: break with the CLI this time, then a mirror that completes.
    assert mirror_request(p.src, p.dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    time.sleep(0.3)
    res = run_flexnbd("break", "--sock", str(p.src.sock))
    assert (res.returncode, res.stderr) == (0, b""), out(res)
    assert cu.stopped(f"0: {res.stdout.decode()}", p.dst.port), out(res)
    res = mirror_cli(p.src, p.dst.port)
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert_completed(p)


def test_endgame_with_a_stuck_client_and_a_break_meanwhile(pair, make_file):
    """A client stuck in the middle of a WRITE payload holds the endgame up until it is cut
    (the 10 s stop grace). Meanwhile new clients are refused (clients_allowed=false), and a
    `break` that arrives then must answer truthfully: the migration (action `nothing`)
    completes, so `1: mirror completed`, never `0: mirror stopped`. What the stuck client's
    payload changed in the source file must be on the destination too."""
    size = 4 * MiB
    p = pair(make_file(size))
    from flexnbd import wire
    from tests.support.migration import raw_client

    stuck = raw_client(p.src.port)
    try:
        # (with a 4 MB/s limit the first pass has sent the first 2 MB after 0.5 s)
        assert mirror_request(p.src, p.dst.port, "nothing", max_bps=4 * MiB) == \
            "0: Mirror started\n"
        time.sleep(0.5)
        stuck.sendall(wire.pack_request(wire.CMD_WRITE, 0, 2 * MiB, cookie=7)
                      + b"\xcd" * MiB)
        assert wait_until(lambda: cu.status(p.src.sock)["clients_allowed"] == "false", 10), \
            p.src.log()
        st = cu.status(p.src.sock)
        assert st["is_mirroring"] == "true", st
        with cu.connect("127.0.0.1", p.src.port) as s:
            assert cu.closed_without_a_byte(s)
        answer: list[str] = []
        breaker = threading.Thread(target=lambda: answer.append(
            cu.control(p.src.sock, "break", timeout=60)))
        breaker.start()
        assert wait_exit(p.dst, 40) == 0, p.dst.log()
        breaker.join(60)
        assert answer == ["1: mirror completed\n"], (answer, p.src.log())
        st = cu.status(p.src.sock)
        assert st["is_mirroring"] == "false" and st["clients_allowed"] == "true", st
    finally:
        stuck.close()
    assert same_files(p.src_file, p.dst_file), "the stuck client's partial write is missing"


def test_break_racing_the_finish(start_server, make_file, tmp_path):
    """30 times: a `break` that waits for an endgame (held up by a client in the middle of a
    WRITE for 0.2 s) must tell the truth: the migration (action `nothing`) completes, so the
    answer may be `1: mirror completed`, never `0: mirror stopped` with a destination that
    completed."""
    from flexnbd import wire
    from tests.support.migration import raw_client

    size = 4 * MiB
    src_file = make_file(size)
    src = start_server(src_file)
    outcomes: Counter[str] = Counter()
    for n in range(30):
        dst_file = tmp_path / f"dst{n}.img"
        with open(dst_file, "wb") as f:
            f.truncate(size)
        dst = start_server(dst_file, mode="listen")
        assert wait_until(lambda: cu.status(src.sock)["num_clients"] == "0", 10)
        with raw_client(src.port) as s:
            s.sendall(wire.pack_request(wire.CMD_WRITE, 0, 65536, cookie=7) + b"\xcd" * 1000)
            assert mirror_request(src, dst.port, "nothing") == "0: Mirror started\n"
            assert wait_until(lambda: cu.status(src.sock)["clients_allowed"] == "false", 10)
            answer: list[str] = []
            breaker = threading.Thread(target=lambda a=answer: a.append(
                cu.control(src.sock, "break", timeout=60)))
            breaker.start()
            time.sleep(0.2)
            s.sendall(b"\xcd" * (65536 - 1000))       # the request completes: endgame goes on
            breaker.join(60)
        dst_rc = wait_exit(dst, 20)
        context = f"run {n}: break answered {answer!r}, destination exit {dst_rc}"
        assert dst_rc == 0, context
        assert answer == ["1: mirror completed\n"], context
        assert same_files(src_file, dst_file), context
        outcomes[answer[0]] += 1
    assert running(src)


@pytest.mark.parametrize("action", ["exit", "nothing"])
def test_sigterm_during_the_endgame(pair, make_file, action):
    """A stop signal that arrives while the endgame runs (held up by a client in the middle of
    a WRITE) waits for it: the migration completes and the source exits 0 (SPEC 6.6), for
    action `nothing` too (the data moved)."""
    from flexnbd import wire
    from tests.support.migration import raw_client

    for n in range(4):
        p = pair(make_file(4 * MiB))
        with raw_client(p.src.port) as s:
            s.sendall(wire.pack_request(wire.CMD_WRITE, 0, 65536, cookie=7) + b"\xcd" * 1000)
            assert mirror_request(p.src, p.dst.port, action) == "0: Mirror started\n"
            assert wait_until(lambda p=p: cu.status(p.src.sock)["clients_allowed"] == "false",
                              10)
            p.src.signal(signal.SIGTERM)
            time.sleep(0.1 * n)
            s.sendall(b"\xcd" * (65536 - 1000))
            src_rc = wait_exit(p.src, 30)
        dst_rc = wait_exit(p.dst, 20)
        context = f"run {n}: source exit {src_rc}, destination exit {dst_rc}\n{p.src.log()}"
        assert dst_rc == 0, context
        assert same_files(p.src_file, p.dst_file), context
        assert src_rc == 0, context


def test_break_with_nothing_running(start_server, make_file, run_flexnbd):
    src = start_server(make_file(MiB))
    assert cu.control(src.sock, "break") == "1: not mirroring\n"
    res = run_flexnbd("break", "-s", str(src.sock))
    assert (res.returncode, res.stdout, res.stderr) == (1, b"", b"not mirroring\n"), out(res)
    assert src.stop() == 0


def test_break_at_varied_moments(pair, make_file, start_server, tmp_path):
    """`break` from 0 to 1.2 s into a ~0.8 s mirror with action `nothing` (the source stays):
    either it stopped the mirror (the destination did not complete) or the mirror had
    completed (the destination exits 0 with an identical file)."""
    size = 8 * MiB
    src_file = make_file(size)
    src = start_server(src_file)
    outcomes: Counter[str] = Counter()
    for n in range(8):
        dst_file = tmp_path / f"dst{n}.img"
        with open(dst_file, "wb") as f:
            f.truncate(size)
        dst = start_server(dst_file, mode="listen")
        assert mirror_request(src, dst.port, "nothing", max_bps=10 * MiB) == \
            "0: Mirror started\n"
        time.sleep(1.2 * n / 7)
        answer = cu.control(src.sock, "break")
        context = f"run {n}: {answer!r}\n{src.log()}\n{dst.log()}"
        assert cu.stopped(answer, dst.port) or answer == "1: mirror completed\n", context
        answer = answer.split("\n")[0]     # (counted by the reply line)
        assert wait_until(lambda: cu.status(src.sock)["is_mirroring"] == "false", 10)
        if answer == "1: mirror completed":
            assert wait_exit(dst, 20) == 0, context
            assert same_files(src_file, dst_file)
        else:
            ended = wait_until(lambda d=dst: "no migration completed" in d.log()
                               or not running(d), 10)
            context = f"run {n}: {answer!r}\n{src.log()}\n{dst.log()}"
            assert ended, context
            assert running(dst), context
            assert dst.stop() == 1, context
        outcomes[answer] += 1
        assert cu.status(src.sock)["clients_allowed"] == "true"
    assert running(src)
    assert src.stop() == 0, src.log()
    assert outcomes["0: mirror stopped"] >= 1, outcomes

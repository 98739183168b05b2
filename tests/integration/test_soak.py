"""A hostile-client soak (issue 11, SPEC §11), bounded to well under a minute, on 127.0.0.0/8.

One `flexnbd serve` of a 64 MiB random file, with FLEXNBD_SEND_TIMEOUT=2 and
FLEXNBD_HANDSHAKE_TIMEOUT=2 so that the flood is cleared while it runs. From 127.0.0.2 a flood:

- 200 connections that do the handshake, pipeline four 32 MiB READs, shut down their sending
  side and never read (held open 0.2 to 4 s, many past the send timeout, and one in ten left
  open until the end of the test: only the server can end those); most are refused by the
  per-address limit while 8 are held, and come back later;
- 50 slowloris handshakes (one byte of an option every 0.6 s);
- random garbage connections (before or after the greeting);
- oversized options (an NBD_OPT header claiming 2^31 bytes of data).

Meanwhile one honest client from 127.0.0.1 runs, in a loop: `nbdcopy` of the whole export to
a file (compared byte for byte with the model), and `qemu-io` writes of patterns into the last
16 MiB (which the flood never writes) verified by `qemu-io` reads.

Pass: the honest client never fails; once the flood is over the server's thread count
(/proc/PID/task) and descriptor count (/proc/PID/fd) return to their starting values within a
bounded wait; the server's RSS stays under 300 MB throughout (sampled every 0.1 s); nothing
is lost (the file equals the model). The figures are printed on one line starting "SOAK:".
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import threading
import time
from collections import Counter

from flexnbd import wire
from tests.conftest import require_tool
from tests.support.hostile import (
    fd_count,
    half_closed_reader,
    map_built,
    raw_connect,
    rss_kib,
    settled_count,
    task_count,
)
from tests.support.rawclient import RawClient, ServerClosed
from tests.support.waiting import wait_until as wait_for

MiB = 1 << 20
SIZE = 64 * MiB
HONEST_REGION = (48 * MiB, 64 * MiB)      # only the honest client writes here
HOSTILE = "127.0.0.2"
RSS_BOUND_KIB = 300 * 1024
FLOOD_CAP_SECS = 35.0                      # the flood stops by then whatever is left
SETTLE_SECS = 15.0                         # threads and descriptors back within this


def _closed_within(c: RawClient, timeout: float) -> bool:
    """The server closes the connection (anything it still sends is read and dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not c.sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


class Flood:
    """The hostile side: worker threads with quotas, counting what happened."""

    def __init__(self, port: int, seed: int = 11) -> None:
        self.port = port
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.done = threading.Event()            # stop the open-ended workers
        self.deadline = time.monotonic() + FLOOD_CAP_SECS
        self.seed = seed
        self.quota = {"half_closed": 200, "slowloris": 50}
        self.taken = Counter()
        self.problems: list[str] = []
        self.kept: list[RawClient] = []        # half-closed clients left open to the end

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def take(self, kind: str) -> bool:
        with self.lock:
            if self.taken[kind] >= self.quota[kind] or time.monotonic() > self.deadline:
                return False
            self.taken[kind] += 1
            return True

    # -- the kinds of hostile connection -------------------------------------------------------

    def half_closed(self, rng: random.Random) -> None:
        while self.take("half_closed"):
            try:
                c = half_closed_reader(self.port, HOSTILE)
            except ServerClosed:
                self.count("half_closed refused")
                time.sleep(rng.uniform(0.5, 2.0))     # the next try, later
                continue
            except OSError:
                self.count("half_closed connect failed")
                time.sleep(rng.uniform(0.5, 2.0))
                continue
            self.count("half_closed in")
            if rng.random() < 0.1:
                # Never closed until the end of the test: only the server can end it.
                with self.lock:
                    self.kept.append(c)
                continue
            try:
                time.sleep(rng.uniform(0.2, 4.0))
            finally:
                c.close()

    def slowloris(self, rng: random.Random) -> None:
        option = struct.pack(">QII", wire.IHAVEOPT, wire.OPT_GO, 64)
        while self.take("slowloris"):
            try:
                c = raw_connect(self.port, HOSTILE, timeout=5)
            except OSError:
                self.count("slowloris connect failed")
                continue
            try:
                try:
                    c.read_greeting()
                except ServerClosed:
                    self.count("slowloris refused")
                    time.sleep(rng.uniform(0.5, 2.0))
                    continue
                c.send(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
                started = time.monotonic()
                for i in range(len(option)):
                    try:
                        c.send(option[i:i + 1])
                    except OSError:
                        break
                    if c.is_closed_by_server(0.6):
                        break
                else:
                    self.count("slowloris never cut")
                    self.problems.append("a slowloris handshake outlived its option header "
                                         f"({time.monotonic() - started:.1f} s)")
                    continue
                took = time.monotonic() - started
                self.count("slowloris cut")
                if took > 6.0:
                    self.problems.append(f"a slowloris handshake lasted {took:.1f} s")
            except OSError:
                self.count("slowloris reset")
            finally:
                c.close()

    def garbage(self, rng: random.Random) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            try:
                c = raw_connect(self.port, HOSTILE, timeout=5)
            except OSError:
                self.count("garbage connect failed")
                continue
            try:
                if rng.random() < 0.5:
                    c.sock.settimeout(5)
                    c.sock.recv(18)                  # the greeting, if any
                c.send(rng.randbytes(rng.randint(1, 4096)))
                if _closed_within(c, 5.0):
                    self.count("garbage closed")
                else:
                    self.problems.append("a garbage connection was kept open 5 s")
            except OSError:
                self.count("garbage closed")
            finally:
                c.close()
            time.sleep(rng.uniform(0.02, 0.2))

    def oversized(self, rng: random.Random) -> None:
        while not self.done.is_set() and time.monotonic() < self.deadline:
            try:
                c = raw_connect(self.port, HOSTILE, timeout=5)
            except OSError:
                self.count("oversized connect failed")
                continue
            try:
                try:
                    c.read_greeting()
                except ServerClosed:
                    self.count("oversized refused")
                    time.sleep(rng.uniform(0.1, 0.5))
                    continue
                c.send(struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES))
                option = rng.choice([wire.OPT_GO, wire.OPT_INFO, wire.OPT_EXPORT_NAME, 0x4242])
                c.send(struct.pack(">QII", wire.IHAVEOPT, option, 1 << 31)
                       + rng.randbytes(rng.randint(0, 1024)))
                if _closed_within(c, 5.0):
                    self.count("oversized closed")
                else:
                    self.problems.append("an oversized option was not refused within 5 s")
            except OSError:
                self.count("oversized closed")
            finally:
                c.close()
            time.sleep(rng.uniform(0.02, 0.2))

    def run(self) -> list[threading.Thread]:
        workers = []
        plan = [(self.half_closed, 20), (self.slowloris, 10), (self.garbage, 2),
                (self.oversized, 1)]
        n = 0
        for target, count in plan:
            for _ in range(count):
                n += 1
                rng = random.Random(self.seed * 1000 + n)
                workers.append(threading.Thread(target=self._guard, args=(target, rng),
                                                daemon=True))
        for w in workers:
            w.start()
        return workers

    def _guard(self, target, rng: random.Random) -> None:
        try:
            target(rng)
        except Exception as e:  # noqa: BLE001 - a flood worker's own bug is reported
            self.problems.append(f"{target.__name__} worker failed: {e!r}")


class Monitor:
    """Samples the server's threads, descriptors and RSS every 0.1 s; keeps the peaks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = {"threads": 0, "fds": 0, "rss_kib": 0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                now = {"threads": task_count(self.pid), "fds": fd_count(self.pid),
                       "rss_kib": rss_kib(self.pid)}
            except (OSError, AssertionError):
                return
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)


def _fds(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out


def _threads(pid: int) -> list[str]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out.append(f.read().strip())
        except OSError:
            pass
    return out


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_hostile_soak(serve, make_file, tmp_path, capsys):
    nbdcopy = require_tool("nbdcopy")
    qemu_io = require_tool("qemu-io")
    path = make_file(SIZE)
    model = bytearray(path.read_bytes())
    server = serve(path, env={"FLEXNBD_SEND_TIMEOUT": "2", "FLEXNBD_HANDSHAKE_TIMEOUT": "2"})
    map_built(server)
    pid = server.pid
    threads_start = settled_count(task_count, pid)
    fds_start = settled_count(fd_count, pid)
    rss_start = rss_kib(pid)
    monitor = Monitor(pid)
    monitor.thread.start()
    t0 = time.monotonic()

    flood = Flood(server.port)
    workers = flood.run()
    quota_workers = workers[:30]         # half_closed and slowloris: they end by quota

    rng = random.Random(7)
    honest = Counter()
    failures: list[str] = []
    copy = tmp_path / "copy.img"
    try:
        while True:
            flooding = any(w.is_alive() for w in quota_workers)
            # nbdcopy of the whole export, compared with the model.
            copy.unlink(missing_ok=True)
            res = _run([nbdcopy, f"nbd://127.0.0.1:{server.port}", str(copy)], timeout=120)
            if res.returncode != 0:
                failures.append(f"nbdcopy exited {res.returncode}: {res.stderr}")
                break
            if copy.read_bytes() != model:
                failures.append("nbdcopy read something other than the model")
                break
            honest["nbdcopy"] += 1
            # qemu-io: a few pattern writes into the honest region, each verified by a read.
            for _ in range(3):
                length = rng.choice([4096, 65536, 1 << 20]) - rng.choice([0, 512])
                offset = rng.randrange(HONEST_REGION[0], HONEST_REGION[1] - length, 512)
                pattern = rng.randrange(1, 256)
                res = _run([qemu_io, "-f", "raw",
                            "-c", f"write -P {pattern} {offset} {length}",
                            "-c", f"read -P {pattern} {offset} {length}",
                            f"nbd://127.0.0.1:{server.port}"])
                out = res.stdout + res.stderr
                if res.returncode != 0 or "fail" in out.lower():
                    failures.append(f"qemu-io exited {res.returncode}: {out}")
                    break
                model[offset:offset + length] = bytes([pattern]) * length
                honest["qemu-io write+read"] += 1
            if failures or not flooding:
                break
            if time.monotonic() - t0 > FLOOD_CAP_SECS + 10:
                failures.append("the flood did not end in time")
                break
    except BaseException:
        for c in flood.kept:
            c.close()
        raise
    finally:
        flood.done.set()
        for w in workers:
            w.join(15)
    flood_secs = time.monotonic() - t0
    assert not failures, "\n".join(failures) + f"\n{server.log()[-5000:]}"
    assert server.proc.poll() is None, server.log()[-5000:]

    # The flood is over: threads and descriptors come back to their starting values.
    settle_started = time.monotonic()
    back = wait_for(lambda: task_count(pid) == threads_start and fd_count(pid) == fds_start,
                    SETTLE_SECS, interval=0.1)
    settle_secs = time.monotonic() - settle_started
    monitor.stop.set()
    monitor.thread.join(5)
    threads_end, fds_end, rss_end = task_count(pid), fd_count(pid), rss_kib(pid)

    for c in flood.kept:
        c.close()

    # Nothing lost: the file as the server has it, and as a client reads it.
    res = _run([nbdcopy, f"nbd://127.0.0.1:{server.port}", str(copy)], timeout=120)
    assert res.returncode == 0, res.stderr
    copied_ok = copy.read_bytes() == model
    file_ok = path.read_bytes() == model

    figures = (
        f"SOAK: {flood_secs:.1f} s flood; threads start={threads_start} "
        f"peak={monitor.peak['threads']} end={threads_end}; fds start={fds_start} "
        f"peak={monitor.peak['fds']} end={fds_end}; RSS start={rss_start // 1024} MiB "
        f"peak={monitor.peak['rss_kib'] // 1024} MiB end={rss_end // 1024} MiB "
        f"(bound {RSS_BOUND_KIB // 1024} MB); settled in {settle_secs:.1f} s; honest: "
        f"{honest['nbdcopy']} nbdcopy of 64 MiB, {honest['qemu-io write+read']} qemu-io "
        f"write+verify, 0 failures; flood: {len(flood.kept)} half-closed kept open, "
        + ", ".join(f"{k} {v}" for k, v in sorted(flood.counts.items())))
    with capsys.disabled():
        print("\n" + figures)

    assert not flood.problems, "\n".join(flood.problems[:20]) + "\n" + figures
    assert flood.taken["half_closed"] == 200 and flood.taken["slowloris"] == 50, figures
    assert honest["nbdcopy"] >= 2 and honest["qemu-io write+read"] >= 3, figures
    assert back, f"threads/fds did not return to their starting values in {SETTLE_SECS} s: " \
        f"{figures}\nthreads: {_threads(pid)}\nfds: {_fds(pid)}\n{server.log()[-3000:]}"
    assert monitor.peak["rss_kib"] < RSS_BOUND_KIB, figures
    assert copied_ok and file_ok, f"lost data (client copy ok={copied_ok}, file ok={file_ok})"

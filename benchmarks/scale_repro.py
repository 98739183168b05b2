#!/usr/bin/env python3
"""Issue 24: does a sparse migration cost time and memory in proportion to the logical size?

For each logical size N: a sparse source file of N bytes with EXTENTS random 4 KiB blocks of
random data (deterministic seed), a sparse destination of the same size, then
``flexnbd listen`` on the destination, ``flexnbd serve`` on the source with a control socket,
and ``flexnbd mirror --wait``, timed. Then the two files are compared over their allocated
extents only (SEEK_DATA/SEEK_HOLE, where one side has data the other must have the same bytes
or zeroes) plus their sizes: no full read of a 15 TiB file. Prints the time, the peak RSS
(VmHWM polled from /proc, and ru_maxrss from wait4) of serve and listen, the map build time,
what the maps held in memory (from the servers' logs, where they say it) and, with --count,
what crossed the wire (a relay between the mirror and the listener parses the sender's
requests: WRITE and WRITE_ZEROES, how many and how big). --perf FILE records both servers.

Stdlib only; traffic on 127.0.0.1, ephemeral ports; files under --dir (it needs a file
system that takes files of N bytes: ext4 allows just under 16 TiB).

    .venv/bin/python benchmarks/scale_repro.py --sizes 64G,1T,4T,15T [--count]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BLOCK = 4096
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
REQUEST_MAGIC = 0x25609513
CMD_NAMES = {0: "READ", 1: "WRITE", 2: "DISC", 3: "FLUSH", 4: "TRIM", 6: "WRITE_ZEROES"}


def parse_size(text: str) -> int:
    text = text.strip().upper().rstrip("IB")
    if text[-1:] in UNITS:
        return int(float(text[:-1]) * UNITS[text[-1]])
    return int(text)


def size_text(n: int) -> str:
    for unit in "TGMK":
        if n >= UNITS[unit] and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]} {unit}iB"
    return f"{n} B"


# -- the files ----------------------------------------------------------------------------------

def make_source(path: Path, size: int, extents: int, seed: int) -> None:
    """A sparse file of SIZE bytes with EXTENTS blocks of random data at random 4 KiB-aligned
    offsets (distinct; adjacent ones merge into one extent on disk)."""
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(size // BLOCK), extents))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for block in offsets:
            os.pwrite(fd, rng.randbytes(BLOCK), block * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_destination(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of the data extents, by SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:           # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def merged(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def compare(src: Path, dst: Path) -> tuple[bool, str]:
    """Equal sizes, and equal bytes wherever either file has data (a hole reads as zeroes)."""
    if src.stat().st_size != dst.stat().st_size:
        return False, f"sizes differ: {src.stat().st_size} != {dst.stat().st_size}"
    size = src.stat().st_size
    with open(src, "rb") as fs, open(dst, "rb") as fd:
        a = data_extents(fs.fileno(), size)
        b = data_extents(fd.fileno(), size)
        for start, end in merged(a, b):
            pos = start
            while pos < end:
                n = min(end - pos, 8 << 20)
                if os.pread(fs.fileno(), n, pos) != os.pread(fd.fileno(), n, pos):
                    return False, f"contents differ in [{pos}, {pos + n})"
                pos += n
    data_a = sum(e - s for s, e in a)
    data_b = sum(e - s for s, e in b)
    return True, f"{len(a)} / {len(b)} extents, {data_a} / {data_b} data bytes (src / dst)"


# -- the processes --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Proc:
    """A flexnbd process whose peak RSS is followed (VmHWM polled; ru_maxrss at exit)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log_path = log
        self.logf = open(log, "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "flexnbd", *args],
                                  stdout=self.logf, stderr=subprocess.STDOUT)
        self.hwm_kib = 0
        self.maxrss_kib = 0
        self.status: int | None = None

    def poll_hwm(self) -> None:
        try:
            text = Path(f"/proc/{self.p.pid}/status").read_text()
        except OSError:
            return
        m = re.search(r"VmHWM:\s+(\d+) kB", text)
        if m:
            self.hwm_kib = max(self.hwm_kib, int(m.group(1)))

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            self.poll_hwm()
            pid, status, usage = os.wait4(self.p.pid, os.WNOHANG)
            if pid:
                self.p.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss_kib = usage.ru_maxrss
                self.status = self.p.returncode
                self.logf.close()
                return self.status
            if time.monotonic() > deadline:
                self.p.kill()
                self.p.wait()
                raise RuntimeError(f"{self.log_path.name}: did not exit in {timeout} s")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.p.poll() is None and self.status is None:
            self.p.kill()
            self.p.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# -- the counting relay ---------------------------------------------------------------------------

class Counter:
    """Relays one TCP connection (the mirror's) to the listener and parses the sender's side:
    the handshake's options are skipped, then every request is counted by type, with its
    length (WRITE payloads are skipped over)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.counts: dict[str, int] = {}
        self.lengths: dict[str, int] = {}
        self.max_len: dict[str, int] = {}
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.connections += 1
            u = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(u, c), daemon=True).start()
            threading.Thread(target=self._parse, args=(c, u), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _parse(self, src: socket.socket, dst: socket.socket) -> None:
        buf = bytearray()
        need_flags = True
        transmission = False
        skip = 0                       # payload bytes still to pass through unparsed
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
                buf += data
                pos = 0
                while True:
                    if skip:
                        k = min(skip, len(buf) - pos)
                        pos += k
                        skip -= k
                        if skip:
                            break
                    if need_flags:
                        if len(buf) - pos < 4:
                            break
                        pos += 4
                        need_flags = False
                        continue
                    if not transmission:
                        if len(buf) - pos < 4:
                            break
                        if struct.unpack_from(">I", buf, pos)[0] == REQUEST_MAGIC:
                            transmission = True
                            continue
                        if len(buf) - pos < 16:
                            break
                        _, _, n = struct.unpack_from(">QII", buf, pos)
                        pos += 16
                        skip = n
                        continue
                    if len(buf) - pos < 28:
                        break
                    _, _, cmd, _, _, length = struct.unpack_from(">IHHQQI", buf, pos)
                    pos += 28
                    name = CMD_NAMES.get(cmd, str(cmd))
                    self.counts[name] = self.counts.get(name, 0) + 1
                    self.lengths[name] = self.lengths.get(name, 0) + length
                    self.max_len[name] = max(self.max_len.get(name, 0), length)
                    if cmd == 1:
                        skip = length
                del buf[:pos]
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.lsock.close()

    def summary(self) -> str:
        parts = []
        for name in sorted(self.counts):
            parts.append(f"{name} {self.counts[name]} req / {self.lengths[name]} B "
                         f"(max {self.max_len[name]})")
        return f"{self.connections} connection(s): " + "; ".join(parts)


# -- one run --------------------------------------------------------------------------------------

def run_one(workdir: Path, size: int, extents: int, seed: int, count: bool,
            verbose: bool, perf: str | None = None) -> dict:
    src = workdir / "src.img"
    dst = workdir / "dst.img"
    sock = workdir / "src.ctl"
    t0 = time.monotonic()
    make_source(src, size, extents, seed)
    make_destination(dst, size)
    setup_s = time.monotonic() - t0
    lport = free_port()
    listener = Proc(["listen", "--addr", "127.0.0.1", "--port", str(lport), "--file", str(dst),
                     "-v"], workdir / "listen.log")
    server = None
    counter = None
    try:
        wait_for(lambda: port_open(lport), 30, "the listener's port")
        sport = free_port()
        server = Proc(["serve", "--addr", "127.0.0.1", "--port", str(sport), "--file", str(src),
                       "--sock", str(sock), "-v"], workdir / "serve.log")
        wait_for(lambda: sock.exists() and port_open(sport), 30, "the server")
        target = lport
        if count:
            counter = Counter(lport)
            target = counter.port
        recorder = None
        if perf:
            # perf over both processes for the mirror's duration (report: perf report -i)
            recorder = subprocess.Popen(["perf", "record", "-g", "-q", "-o", perf, "-p",
                                         f"{server.p.pid},{listener.p.pid}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        t1 = time.monotonic()
        mirror = subprocess.run([sys.executable, "-m", "flexnbd", "mirror", "--addr", "127.0.0.1",
                                 "--port", str(target), "--sock", str(sock), "--wait"],
                                capture_output=True, text=True, timeout=3600)
        elapsed = time.monotonic() - t1
        if recorder is not None:
            recorder.wait(60)          # (it ends with the processes it follows)
        serve_rc = server.wait(120)
        listen_rc = listener.wait(120)
    except BaseException:
        for p in (server, listener):
            if p is not None:
                print(f"---- {p.log_path.name}\n" + p.log()[-3000:], file=sys.stderr)
        raise
    finally:
        for p in (server, listener):
            if p is not None:
                p.kill()
        if counter is not None:
            counter.close()
    ok, detail = compare(src, dst)
    slog, llog = server.log(), listener.log()
    build = re.search(r"allocation map: built with (\w+) in (\d+) ms, (\d+) extents", slog)
    done = re.search(r"migration completed: (\d+) bytes of data sent, (\d+) bytes on the wire, "
                     r"in ([\d.]+) s", slog)
    result = {
        "size": size,
        "setup_s": setup_s,
        "time_s": elapsed,
        "mirror_rc": mirror.returncode,
        "mirror_out": (mirror.stdout + mirror.stderr).strip(),
        "serve_rc": serve_rc,
        "listen_rc": listen_rc,
        "equal": ok,
        "detail": detail,
        "serve_hwm_mib": server.hwm_kib / 1024,
        "serve_maxrss_mib": server.maxrss_kib / 1024,
        "listen_hwm_mib": listener.hwm_kib / 1024,
        "listen_maxrss_mib": listener.maxrss_kib / 1024,
        "map_build_ms": int(build.group(2)) if build else None,
        "map_extents": int(build.group(3)) if build else None,
        "data_sent": int(done.group(1)) if done else None,
        "wire_bytes": int(done.group(2)) if done else None,
        "mirror_s": float(done.group(3)) if done else None,
        "wire": counter.summary() if counter else None,
        # what each map held in memory (bytes), from the servers' logs (when they say it)
        "maps": {name: int(m.group(1)) for name, m in (
            ("allocation (serve)", re.search(r"allocation map: built .* (\d+) bytes in memory",
                                             slog)),
            ("allocation (listen)", re.search(r"allocation map: built .* (\d+) bytes in "
                                              r"memory", llog)),
            ("dirty", re.search(r"dirty map: (\d+) bytes in memory", slog)),
            ("coverage", re.search(r"coverage: (\d+) bytes in memory", llog))) if m},
    }
    if verbose or not ok or mirror.returncode or serve_rc or listen_rc:
        print("---- serve log\n" + slog[-3000:] + "\n---- listen log\n" + llog[-3000:],
              file=sys.stderr)
    for f in (src, dst):
        f.unlink()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64G,1T,4T,15T", help="logical sizes, comma-separated")
    ap.add_argument("--extents", type=int, default=20000, help="4 KiB blocks of data")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--dir", default="/var/tmp", help="where the sparse files go")
    ap.add_argument("--count", action="store_true",
                    help="relay the mirror through a counter of requests (slows it down)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--perf", metavar="FILE", help="perf record both servers into FILE")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the servers' logs")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="flexnbd-scale-", dir=args.dir))
    failed = False
    try:
        print(f"{'size':>8} {'time s':>7} {'mirror s':>8} {'map ms':>6} {'serve MiB':>9} "
              f"{'listen MiB':>10} {'wire MiB':>8}  equal")
        for text in args.sizes.split(","):
            size = parse_size(text)
            for _ in range(args.repeat):
                r = run_one(workdir, size, args.extents, args.seed, args.count, args.verbose,
                           args.perf)
                failed |= not r["equal"] or bool(r["mirror_rc"] or r["serve_rc"] or
                                                 r["listen_rc"])
                wire = f"{r['wire_bytes'] / 2**20:8.1f}" if r["wire_bytes"] is not None \
                    else f"{'?':>8}"
                print(f"{size_text(size):>8} {r['time_s']:7.2f} "
                      f"{r['mirror_s'] if r['mirror_s'] is not None else float('nan'):8.2f} "
                      f"{r['map_build_ms'] if r['map_build_ms'] is not None else -1:6d} "
                      f"{max(r['serve_hwm_mib'], r['serve_maxrss_mib']):9.1f} "
                      f"{max(r['listen_hwm_mib'], r['listen_maxrss_mib']):10.1f} {wire}  "
                      f"{'yes' if r['equal'] else 'NO'} ({r['detail']}); "
                      f"rc mirror/serve/listen {r['mirror_rc']}/{r['serve_rc']}/"
                      f"{r['listen_rc']}", flush=True)
                if r["maps"]:
                    tib = size / UNITS["T"]
                    print("         maps: " + "; ".join(
                        f"{name} {n / 1024:.1f} KiB ({n / 1024 / tib:.1f} KiB/TiB)"
                        for name, n in r["maps"].items()), flush=True)
                if r["wire"]:
                    print(f"         wire: {r['wire']}", flush=True)
                if r["mirror_rc"]:
                    print(f"         mirror: {r['mirror_out']}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark flexnbd against nbdkit and qemu-nbd with nbdcopy and fio.

Each server serves the same scratch file on 127.0.0.1, one server at a time (the target
machines have 2 cores, so anything running alongside would skew the numbers). For every
row we start a fresh server, run one client, and record throughput (MiB/s) or IOPS plus
the server's CPU time per GiB moved. See benchmarks/README.md.

Standard library only, so it runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
HOST = "127.0.0.1"  # all traffic stays on loopback
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_WORKDIR = "/var/tmp/flexnbd-bench"  # /var/tmp: real disk, and kept between runs
IHAVEOPT = b"IHAVEOPT"
SERVER_NAMES = ("flexnbd", "nbdkit", "qemu-nbd")

# Row name -> client settings. Reads come before writes so the read rows see the data
# file as generated; every row starts from a synced, warm page cache.
ROWS: dict[str, dict] = {
    "nbdcopy seq read": {"client": "nbdcopy", "unit": "MiB/s"},
    "fio seq read 1M qd16": {"rw": "read", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    "fio rand read 4k qd1": {"rw": "randread", "bs": "4k", "iodepth": 1, "unit": "IOPS"},
    "fio rand read 4k qd32": {"rw": "randread", "bs": "4k", "iodepth": 32, "unit": "IOPS"},
    "fio seq write 1M qd16": {"rw": "write", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    "fio rand write 4k qd1": {"rw": "randwrite", "bs": "4k", "iodepth": 1, "unit": "IOPS"},
    "fio rand write 4k qd32": {"rw": "randwrite", "bs": "4k", "iodepth": 32, "unit": "IOPS"},
}
# Short aliases for --rows.
ROW_ALIASES = {
    "nbdcopy": "nbdcopy seq read",
    "seqread": "fio seq read 1M qd16",
    "randread1": "fio rand read 4k qd1",
    "randread32": "fio rand read 4k qd32",
    "seqwrite": "fio seq write 1M qd16",
    "randwrite1": "fio rand write 4k qd1",
    "randwrite32": "fio rand write 4k qd32",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'2G', '512M', '1048576' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# ---------------------------------------------------------------- the data file


def make_data_file(path: Path, size: int) -> None:
    """Create PATH with SIZE random bytes, or reuse it if it already has that size.

    Plain os.urandom: the kernel's ChaCha generator does a few hundred MB/s, so 2 GiB
    takes seconds, and the data neither compresses nor dedupes.
    """
    if path.exists() and path.stat().st_size == size:
        log(f"reusing {path} ({size / GiB:.2f} GiB)")
        return
    log(f"writing {size / GiB:.2f} GiB of random data to {path} ...")
    start = time.monotonic()
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    log(f"  done in {time.monotonic() - start:.1f} s")


def settle(path: Path) -> None:
    """Flush dirty pages from earlier writes, then pull the whole file into the page cache,
    so every row and every server starts from the same state."""
    os.sync()
    buf = bytearray(16 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# ---------------------------------------------------------------- servers


def free_port() -> int:
    """An ephemeral port that is free right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_flexnbd() -> str | None:
    # Prefer the flexnbd next to this interpreter (the project's .venv).
    beside = Path(sys.executable).parent / "flexnbd"
    return str(beside) if beside.exists() else shutil.which("flexnbd")


def nbdkit_has_exit_with_parent(nbdkit: str) -> bool:
    out = subprocess.run([nbdkit, "--help"], capture_output=True, text=True).stdout
    return "--exit-with-parent" in out


def server_command(name: str, port: int | str, path: Path) -> list[str] | None:
    """The command line that serves PATH on HOST:PORT, or None if NAME is not installed."""
    if name == "flexnbd":
        exe = find_flexnbd()
        if not exe:
            return None
        return [exe, "serve", "--addr", HOST, "--port", str(port), "--file", str(path)]
    if name == "nbdkit":
        exe = shutil.which("nbdkit")
        if not exe:
            return None
        cmd = [exe, "-f", "-i", HOST, "-p", str(port)]
        if nbdkit_has_exit_with_parent(exe):
            cmd.append("--exit-with-parent")  # no orphan if we are killed hard
        return [*cmd, "file", str(path)]
    if name == "qemu-nbd":
        exe = shutil.which("qemu-nbd")
        if not exe:
            return None
        # -t: keep serving after a client leaves (our port probe is a client too).
        # Defaults otherwise: --cache=writeback, --aio=threads, --shared=1.
        return [exe, "-f", "raw", "-b", HOST, "-p", str(port), "-t", str(path)]
    raise ValueError(name)


def server_version(name: str) -> str:
    if name == "flexnbd":
        try:
            from importlib.metadata import version

            return "flexnbd " + version("flexnbd")
        except Exception:
            return "flexnbd (version unknown)"
    exe = shutil.which(name)
    if not exe:
        return "missing"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else name


class Server:
    """One running server process; a context manager that always stops it."""

    def __init__(self, name: str, port: int, path: Path, logpath: Path):
        cmd = server_command(name, port, path)
        assert cmd is not None
        self.name, self.port, self.cmd, self.logpath = name, port, cmd, logpath
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.logfile = open(self.logpath, "ab")
        self.logfile.write(f"\n=== {' '.join(self.cmd)}\n".encode())
        self.logfile.flush()
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT
        )
        try:
            self.wait_ready()
        except BaseException:  # __exit__ does not run if __enter__ fails (Ctrl-C too)
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the server completes a handshake (greeting, then NBD_OPT_ABORT)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start")
            try:
                nbd_probe(self.port)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout} s: {e}") from e
            time.sleep(0.05)
        # qemu-nbd serves one client at a time (--shared=1): give it a moment to notice
        # that the probe left before the real client connects.
        time.sleep(0.3)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s; killing it")
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode

    def cpu_seconds(self) -> float:
        """utime+stime of the server, its threads and its children, live or reaped."""
        assert self.proc is not None
        return sum(proc_cpu(pid) for pid in process_tree(self.proc.pid))

    def log_tail(self, lines: int = 15) -> str:
        self.logfile.flush()
        text = self.logpath.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(text) if line.startswith("=== ")]
        return "\n".join(text[starts[-1] + 1 if starts else 0 :][-lines:])


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection during the probe")
        data += chunk
    return data


def nbd_probe(port: int) -> None:
    """Fixed-newstyle greeting, then NBD_OPT_ABORT: a polite client that leaves at once,
    so the servers' logs stay free of 'connection reset' noise."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        greeting = recv_exact(s, 18)
        if greeting[:16] != b"NBDMAGIC" + IHAVEOPT:
            raise ConnectionError(f"unexpected NBD greeting {greeting!r}")
        (server_flags,) = struct.unpack(">H", greeting[16:])
        s.sendall(struct.pack(">I", 1 | (server_flags & 2)))  # C_FIXED_NEWSTYLE [NO_ZEROES]
        s.sendall(IHAVEOPT + struct.pack(">II", 2, 0))  # NBD_OPT_ABORT, no data
        recv_exact(s, 20)  # the ACK (magic, option, type, length 0)


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; comm may contain spaces."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """Fields 14-17: utime, stime (all threads) and cutime, cstime (reaped children)."""
    f = read_stat(pid)
    if f is None:
        return 0.0
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def process_tree(root: int) -> list[int]:
    """ROOT and its live descendants (a server might fork helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = read_stat(int(entry))
            if f is not None:
                parents.setdefault(int(f[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


# ---------------------------------------------------------------- clients


class ClientError(Exception):
    pass


def run_client(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        # Keep the messages, not fio's JSON report (it starts at a line "{").
        out = proc.stdout.split("\n{", 1)[0] if not proc.stdout.startswith("{") else ""
        lines = (proc.stderr + out).strip().splitlines()[-20:]
        raise ClientError(f"{' '.join(cmd)}\nexit {proc.returncode}\n" + "\n".join(lines))
    return proc


@functools.cache
def nbdcopy_destination() -> str:
    """'null:' throws the data away inside nbdcopy; older nbdcopy lacks it."""
    out = subprocess.run(["nbdcopy", "--help"], capture_output=True, text=True)
    return "null:" if "null:" in out.stdout + out.stderr else "/dev/null"


def run_nbdcopy(port: int, size: int, runtime: int) -> tuple[float, int, list[str]]:
    """Copy the whole export, again and again until RUNTIME seconds have passed (one
    2 GiB copy takes about a second, too short to time alone); returns (MiB/s, bytes,
    command)."""
    cmd = ["nbdcopy", f"nbd://{HOST}:{port}", nbdcopy_destination()]
    moved, start = 0, time.monotonic()
    while moved == 0 or time.monotonic() - start < runtime:
        run_client(cmd, timeout=600)
        moved += size
    return moved / MiB / (time.monotonic() - start), moved, cmd


def fio_command(port: int, row: dict, runtime: int) -> list[str]:
    return [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd://{HOST}:{port}/",
        f"--rw={row['rw']}", f"--bs={row['bs']}", f"--iodepth={row['iodepth']}",
        "--time_based", f"--runtime={runtime}", "--norandommap", "--randrepeat=0",
        "--output-format=json",
    ]  # fmt: skip


def run_fio(port: int, row: dict, runtime: int) -> tuple[float, int, list[str]]:
    """Run one fio job; returns (MiB/s or IOPS, bytes moved, command)."""
    cmd = fio_command(port, row, runtime)
    out = run_client(cmd, timeout=runtime + 120).stdout
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    data = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)
    job = data["jobs"][0]
    if job.get("error"):
        raise ClientError(f"{' '.join(cmd)}\nfio job error {job['error']}")
    side = job["read" if "read" in row["rw"] else "write"]
    value = side["iops"] if row["unit"] == "IOPS" else side["bw_bytes"] / MiB
    return value, side["io_bytes"], cmd


def children_cpu() -> float:
    """CPU seconds of our finished child processes (the clients; servers are reaped later)."""
    t = os.times()
    return t.children_user + t.children_system


def measure(server: Server, row: dict, size: int, runtime: int) -> dict:
    """Run one row's client against a running server and measure it."""
    cpu0, client0 = server.cpu_seconds(), children_cpu()
    try:
        if row.get("client") == "nbdcopy":
            value, moved, cmd = run_nbdcopy(server.port, size, runtime)
        else:
            value, moved, cmd = run_fio(server.port, row, runtime)
    except ClientError as e:
        # The server's side of the story is usually what explains a client failure.
        state = "still running" if server.alive() else f"exited {server.proc.returncode}"
        raise ClientError(
            f"{e}\n--- {server.name} ({state}), log tail:\n{server.log_tail()}"
        ) from None
    cpu, client_cpu = server.cpu_seconds() - cpu0, children_cpu() - client0
    if not server.alive():
        raise ClientError(f"{server.name} died during the run:\n{server.log_tail()}")
    return {
        "value": value,
        "unit": row["unit"],
        "bytes": moved,
        "server_cpu_s": cpu,
        "cpu_s_per_gib": cpu / (moved / GiB) if moved else None,
        # The client's CPU too: on 2 cores, client and server compete for the same CPUs.
        "client_cpu_s_per_gib": client_cpu / (moved / GiB) if moved else None,
        "command": " ".join(cmd),
    }


# ---------------------------------------------------------------- raw loopback


# Receive sizes for the loopback test: big reads are the ceiling; 256 KiB is what nbdcopy
# asks for per request by default, so a client reading that much at a time sees this.
LOOPBACK_RECV_SIZES = {"4M": 4 * MiB, "256K": 256 * 1024}


def receive_all(listener: socket.socket, bufsize: int, got: list[int]) -> None:
    """Accept one connection and count what arrives until EOF."""
    conn, _ = listener.accept()
    buf = bytearray(bufsize)
    with conn:
        while n := conn.recv_into(buf):
            got[0] += n


def loopback_once(path: Path, size: int, bufsize: int) -> float:
    """sendfile() SIZE bytes of PATH into a loopback TCP socket, recv_into() them; MiB/s."""
    with socket.create_server((HOST, 0)) as listener:
        got = [0]
        thread = threading.Thread(target=receive_all, args=(listener, bufsize, got))
        thread.start()
        start = time.monotonic()
        with socket.create_connection(listener.getsockname()) as s, open(path, "rb") as f:
            s.sendfile(f, 0, size)
        thread.join()
        elapsed = time.monotonic() - start
    if got[0] != size:
        raise RuntimeError(f"loopback test moved {got[0]} of {size} bytes")
    return size / MiB / elapsed


def loopback_mib_s(path: Path, size: int, runs: int = 3) -> dict[str, float]:
    """Per receive size, best of RUNS loopback_once(): what one TCP connection can move.

    An NBD server's read path is sendfile too, so this is the yardstick for sequential
    reads. Both calls drop the GIL, so the two threads run in parallel at C speed.
    """
    return {
        name: max(loopback_once(path, size, bufsize) for _ in range(runs))
        for name, bufsize in LOOPBACK_RECV_SIZES.items()
    }


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu_model": model}


def git_head() -> str | None:
    """The flexnbd commit measured (plus '-dirty' if the work tree had changes)."""
    here = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(results: dict, servers: list[str]) -> str:
    """Markdown: one line per row, value per server, flexnbd/best peer, CPU s/GiB."""
    peers = [s for s in servers if s != "flexnbd"]
    head = ["row", "unit", *servers]
    if "flexnbd" in servers and peers:
        head.append("flexnbd / best peer")
    head += [f"CPU s/GiB {s}" for s in servers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in results.items():
        unit = ROWS[row]["unit"]
        vals = {s: cells.get(s, {}).get("value") for s in servers}
        line = [row, unit] + [fmt(vals[s]) if vals[s] is not None else "ERR" for s in servers]
        if "flexnbd" in servers and peers:
            best = max((vals[p] for p in peers if vals[p] is not None), default=None)
            ratio = vals["flexnbd"] / best if vals["flexnbd"] is not None and best else None
            line.append(f"{ratio:.2f}" if ratio is not None else "-")
        line += [fmt(cells.get(s, {}).get("cpu_s_per_gib")) for s in servers]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def client_table(results: dict, servers: list[str]) -> str:
    lines = ["| row | " + " | ".join(servers) + " |", "|" + "---|" * (len(servers) + 1)]
    for row, cells in results.items():
        vals = [fmt(cells.get(s, {}).get("client_cpu_s_per_gib")) for s in servers]
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def run_row(
    name: str, row: str, data: Path, size: int, runtime: int, workdir: Path, errors: list[str]
) -> dict | None:
    """One measurement on a fresh server; errors go to ERRORS (and the row is skipped)."""
    settle(data)
    try:
        with Server(name, free_port(), data, workdir / f"{name}.log") as server:
            cell = measure(server, ROWS[row], size, runtime)
            status = server.stop()
    except (ClientError, RuntimeError, subprocess.TimeoutExpired) as e:
        log(f"  ERROR: {e}")
        errors.append(f"{name} / {row}: {e}")
        return None
    if status != 0 and name == "flexnbd":
        # flexnbd promises exit 0 on SIGTERM; anything else is a bug.
        errors.append(f"{name} / {row}: exit status {status} on SIGTERM")
    log(f"  {fmt(cell['value'])} {cell['unit']}, {fmt(cell['cpu_s_per_gib'])} CPU s/GiB")
    return cell


def combine(cells: list[dict]) -> dict:
    """Median of repeated runs of one cell; the single values are kept as 'samples'."""
    if len(cells) == 1:
        return cells[0]
    out = dict(cells[0])
    for key in ("value", "server_cpu_s", "cpu_s_per_gib", "client_cpu_s_per_gib"):
        values = [c[key] for c in cells if c[key] is not None]
        out[key] = statistics.median(values) if values else None
    out["bytes"] = sum(c["bytes"] for c in cells)
    out["samples"] = [c["value"] for c in cells]
    return out


def select(names: str | None, known: list[str], aliases: dict[str, str]) -> list[str]:
    if not names:
        return known
    chosen = []
    for name in (n.strip() for n in names.split(",")):
        name = aliases.get(name, name)
        if name not in known:
            raise SystemExit(f"unknown name {name!r}; choose from {', '.join(known)}")
        chosen.append(name)
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the data file lives")
    p.add_argument("--size", default="2G", help="data file size (default 2G)")
    p.add_argument("--runtime", type=int, default=8, help="seconds per fio row (default 8)")
    p.add_argument(
        "--rows",
        help="comma-separated rows (names or aliases: " + ", ".join(ROW_ALIASES) + ")",
    )
    p.add_argument("--servers", help="comma-separated servers: " + ", ".join(SERVER_NAMES))
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per cell; the table shows the median"
    )
    p.add_argument("--json", help="results file (default WORKDIR/results.json)")
    p.add_argument("--no-loopback", action="store_true", help="skip the raw TCP test")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size)
    rows = select(args.rows, list(ROWS), ROW_ALIASES)
    servers = select(args.servers, list(SERVER_NAMES), {})
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"data-{size}.img"
    json_path = Path(args.json) if args.json else workdir / "results.json"

    # Skip what is not installed rather than fail half-way.
    missing_tools = [t for t in ("nbdcopy", "fio") if not shutil.which(t)]
    for tool in missing_tools:
        log(f"{tool} not found: skipping its rows")
    rows = [r for r in rows if ("nbdcopy" if ROWS[r].get("client") else "fio") not in missing_tools]
    available = []
    for name in servers:
        if server_command(name, "PORT", data) is None:
            log(f"{name} not found: skipping its column")
        else:
            available.append(name)
    servers = available

    make_data_file(data, size)
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "size": size,
        "runtime": args.runtime,
        "repeat": args.repeat,
        "git_head": git_head(),
        "servers": {},
        "rows": {r: {} for r in rows},
        "errors": [],
        # Other work on the machine skews everything; keep the evidence with the numbers.
        "loadavg_start": os.getloadavg(),
    }
    if report["loadavg_start"][0] > 0.5:
        log(f"note: load average {report['loadavg_start'][0]:.2f} before starting")

    if not args.no_loopback:
        settle(data)
        report["loopback_mib_s"] = loopback_mib_s(data, size)
        for recv, mib_s in report["loopback_mib_s"].items():
            log(f"raw loopback TCP (sendfile -> recv_into {recv}): {mib_s:,.0f} MiB/s")

    for name in servers:
        report["servers"][name] = {
            "version": server_version(name),
            "command": " ".join(server_command(name, "PORT", data) or []),
        }
    samples: dict[tuple[str, str], list[dict]] = {}
    # Row-major, servers interleaved: the servers compared in one row run close together
    # in time, so background load on a shared machine hits them alike.
    for rep in range(args.repeat):
        for row in rows:
            for name in servers:
                log(
                    f"{name}: {row}"
                    + (f" (run {rep + 1}/{args.repeat})" if args.repeat > 1 else "")
                )
                cell = run_row(name, row, data, size, args.runtime, workdir, report["errors"])
                if cell:
                    samples.setdefault((row, name), []).append(cell)
    for (row, name), cells in samples.items():
        report["rows"][row][name] = combine(cells)
    report["loadavg_end"] = os.getloadavg()  # includes our own load (about 2)

    print(table(report["rows"], servers))
    print("\nClient (nbdcopy/fio) CPU s/GiB, for context:\n")
    print(client_table(report["rows"], servers))
    if "loopback_mib_s" in report:
        print()
        for recv, loop in report["loopback_mib_s"].items():
            print(f"raw loopback TCP, {recv} reads: {loop:,.0f} MiB/s")
            for row in ("nbdcopy seq read", "fio seq read 1M qd16"):
                cell = report["rows"].get(row, {}).get("flexnbd")
                if cell:
                    print(f"  flexnbd {row}: {cell['value'] / loop:.0%} of it")
    for err in report["errors"]:
        print(f"\nERROR {err}")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {json_path}")
    return 1 if report["errors"] else 0


def exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds the with-blocks, which stop the servers


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # the Server context managers have already stopped the servers

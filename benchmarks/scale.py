#!/usr/bin/env python3
"""Issue 24: what flexnbd costs as the disk, its extents and its clients grow.

Three tables, each cell the median of --repeat samples:

- logical size: a sparse file of SIZE bytes holding --extents-data random 4 KiB blocks (20k:
  80 MiB; a --sizes entry SIZE:N holds N); flexnbd's time to ready, its map build, a migration
  (`flexnbd mirror --wait` from serve into listen) and the peak RSS of serve and listen.
- extents: a sparse file (--extents-size, 16 GiB) of N random 4 KiB blocks; per server
  (flexnbd, nbdkit, qemu-nbd) the time to ready, `nbdinfo --map` of the whole disk (flexnbd:
  once its map is built), a sparse `nbdcopy` into a file; flexnbd also the migration.
- clients: N fio jobs (one NBD connection each; rand read 4k qd8, and a 70/30 rand read/write
  mix) on a dense file: aggregate IOPS and p99 completion latency per server; flexnbd's
  threads, descriptors and RSS while they run and after they left. A reference column,
  `nbdkit -t 1` (nbdkit working one request at a time per connection, as flexnbd does), shows
  what nbdkit's per-connection thread pool is worth; it is not a peer in the ratio.

Fails (exit 1) on an error: a client or server that fails, a migrated or copied file that
differs from its source, a map that reports other data than the file's; never on a ratio.
Stdlib only; 127.0.0.1; files in --workdir (it must take 15 TiB sparse files: ext4 does).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    HOST,
    ClientError,
    LoggedServer,
    MiB,
    Server,
    data_runs,
    default_json,
    find_flexnbd,
    finish_report,
    flexnbd_cmd,
    fmt,
    free_port,
    git_head,
    log,
    machine_info,
    make_data_file,
    nbd_uri,
    parse_size,
    ratio_text,
    run_client,
    run_script,
    server_command,
    size_text,
)
from run import percentiles_us

BLOCK = 4096
PEERS = ("nbdkit", "qemu-nbd")
# nbdkit with one thread per connection: a reference in the clients table, not a peer.
NBDKIT_ONE_THREAD = "nbdkit -t 1"
BUILT_RE = re.compile(r"allocation map: built with (\w+) in (\d+) ms, (\d+) extents")
FIO_ROWS = {
    "rand read 4k qd8": ["--rw=randread"],
    "rand 70/30 r/w 4k qd8": ["--rw=randrw", "--rwmixread=70"],
}


# ---------------------------------------------------------------- files


def make_sparse(path: Path, size: int, extents: int, seed: int = 24) -> None:
    """SIZE bytes with EXTENTS random 4 KiB blocks at random, never adjacent, offsets."""
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size // BLOCK // 2), extents))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for slot in slots:
            os.pwrite(fd, rng.randbytes(BLOCK), 2 * slot * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_empty(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """[(start, end)] of PATH's data, by SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_runs(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def merged(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(a + b):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def differs(src: Path, dst: Path) -> str:
    """Why DST is not a copy of SRC ("" if it is): sizes, or the bytes wherever either has
    data (a hole reads as zeroes), so a 15 TiB file is never read whole."""
    if src.stat().st_size != dst.stat().st_size:
        return f"sizes differ: {src.stat().st_size} != {dst.stat().st_size}"
    with open(src, "rb") as fs, open(dst, "rb") as fd:
        for start, end in merged(data_extents(src), data_extents(dst)):
            for pos in range(start, end, 8 * MiB):
                n = min(end - pos, 8 * MiB)
                if os.pread(fs.fileno(), n, pos) != os.pread(fd.fileno(), n, pos):
                    return f"{dst.name} differs from {src.name} in [{pos}, {pos + n})"
    return ""


# ---------------------------------------------------------------- process facts


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB), Threads of PID, and its descriptors as FDs."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
        out["FDs"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


class Peak:
    """Polls a process's status every 50 ms in a thread and keeps each field's maximum
    (a server that exits by itself takes its VmHWM with it)."""

    def __init__(self, pid: int):
        self.pid, self.max = pid, proc_status(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            for key, value in proc_status(self.pid).items():
                self.max[key] = max(self.max.get(key, 0), value)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.max


def serve_cmd(name: str, port: int, path: Path, clients: int = 0) -> list[str]:
    """NAME serving PATH, taking CLIENTS connections at once if given (flexnbd: verbose, so
    its map build is logged)."""
    one_thread = name == NBDKIT_ONE_THREAD
    cmd = server_command("nbdkit" if one_thread else name, port, path)
    assert cmd is not None
    if one_thread:
        cmd[1:1] = ["-t", "1"]
    if name == "flexnbd":
        cmd.append("-v")
        if clients:
            cmd += ["--max-clients", str(clients), "--max-clients-per-address", str(clients)]
    if name == "qemu-nbd" and clients:
        cmd[-1:-1] = ["-e", str(clients)]  # --shared: 1 by default
    return cmd


def map_built_s(server: Server, timeout: float = 600) -> tuple[float, int]:
    """Wait for flexnbd's map; (seconds its build took, extents) from its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.logfile.flush()
        m = BUILT_RE.search(server.logpath.read_text(errors="replace").split("\n=== ")[-1])
        if m:
            return int(m.group(2)) / 1000, int(m.group(3))
        time.sleep(0.05)
    raise ClientError(f"flexnbd's map not built in {timeout} s\n{server.log_tail()}")


def nbdinfo_map(port: int) -> tuple[float, int]:
    """Time `nbdinfo --map` of the whole disk; (seconds, data bytes it reports)."""
    start = time.monotonic()
    out = run_client(["nbdinfo", "--map", nbd_uri(port)], timeout=600).stdout
    elapsed = time.monotonic() - start
    data = sum(int(f[1]) for f in (ln.split() for ln in out.splitlines())
               if len(f) >= 3 and not int(f[2]) & 1)  # fmt: skip
    return elapsed, data


# ---------------------------------------------------------------- migration


def migrate(workdir: Path, src: Path) -> dict:
    """`flexnbd mirror --wait` of SRC (served) into a fresh sparse file (listen): times,
    peak RSS of both, what the source's log says; 'error' if the copy differs."""
    dst = workdir / "dst.img"
    make_empty(dst, src.stat().st_size)
    sock = workdir / "src.ctl"
    lport, sport = free_port(), free_port()
    listen_cmd = flexnbd_cmd("listen", lport, dst)
    with LoggedServer("flexnbd", lport, dst, workdir / "listen.log", listen_cmd) as listener:
        start = time.monotonic()
        with LoggedServer("flexnbd", sport, src, workdir / "serve.log",
                          flexnbd_cmd("serve", sport, src, sock)) as server:  # fmt: skip
            ready_s = time.monotonic() - start
            build_s, _ = map_built_s(server)
            peaks = Peak(server.proc.pid), Peak(listener.proc.pid)  # type: ignore[union-attr]
            t0 = time.monotonic()
            run_client([str(find_flexnbd()), "mirror", "--addr", HOST, "--port", str(lport),
                        "--sock", str(sock), "--wait"], timeout=3600)  # fmt: skip
            serve_rc, listen_rc = server.wait_exit(600), listener.wait_exit(600)
            mirror_s = time.monotonic() - t0
            serve_peak, listen_peak = (p.stop() for p in peaks)
    result = {
        "ready_s": ready_s, "map_build_s": build_s, "migration_s": mirror_s,
        "serve_rss_mib": serve_peak.get("VmHWM", 0) / 1024,
        "listen_rss_mib": listen_peak.get("VmHWM", 0) / 1024,
    }  # fmt: skip
    why = "" if (serve_rc, listen_rc) == (0, 0) else f"exits serve {serve_rc} listen {listen_rc}"
    result["error"] = why or differs(src, dst)
    dst.unlink()
    return result


# ---------------------------------------------------------------- the three tables


def size_sample(workdir: Path, size: int, extents: int) -> dict:
    src = workdir / "src.img"
    make_sparse(src, size, extents)
    try:
        return migrate(workdir, src)
    finally:
        src.unlink()


def extents_sample(workdir: Path, src: Path, name: str) -> dict:
    """One server on SRC: time to ready, nbdinfo --map, sparse nbdcopy (and migration)."""
    port = free_port()
    start = time.monotonic()
    with Server(name, port, src, workdir / f"{name}.log", serve_cmd(name, port, src)) as server:
        out: dict = {"ready_s": time.monotonic() - start}
        if name == "flexnbd":
            out["map_build_s"], _ = map_built_s(server)
        out["map_s"], data = nbdinfo_map(port)
        copy = workdir / "copy.img"
        copy.unlink(missing_ok=True)
        t0 = time.monotonic()
        run_client(["nbdcopy", nbd_uri(port), str(copy)], timeout=3600)
        out["nbdcopy_s"] = time.monotonic() - t0
    want = sum(e - s for s, e in data_extents(src))
    out["error"] = differs(src, copy) or (
        f"nbdinfo --map reports {data} data bytes, the file has {want}" if data != want else "")
    copy.unlink()
    if name == "flexnbd" and not out["error"]:
        out["migration_s"] = migrate(workdir, src)["migration_s"]
    return out


def fio_sample(port: int, jobs: int, options: list[str], runtime: float) -> dict:
    """JOBS fio jobs, one NBD connection each, 4k qd8: aggregate IOPS, p99 clat (µs)."""
    cmd = ["fio", "--name=scale", "--ioengine=nbd", f"--uri={nbd_uri(port)}", *options,
           "--bs=4k", "--iodepth=8", f"--numjobs={jobs}", "--group_reporting",
           "--time_based", f"--runtime={runtime * 1000:.0f}ms", "--norandommap",
           "--randrepeat=0", "--output-format=json"]  # fmt: skip
    out = run_client(cmd, timeout=runtime + 120).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise ClientError(f"fio job error {job['error']}\n{' '.join(cmd)}")
    sides = [job[s] for s in ("read", "write") if job[s]["total_ios"]]
    return {
        "iops": sum(s["iops"] for s in sides),
        "p99_us": max(percentiles_us(s["clat_ns"])["p99_us"] for s in sides),
    }


def clients_cell(workdir: Path, data: Path, name: str, jobs: int, runtime: float) -> dict:
    """One server, JOBS clients: each fio row, and (flexnbd) its threads, fds and RSS."""
    port = free_port()
    cmd = serve_cmd(name, port, data, jobs)
    out: dict = {}
    with Server(name, port, data, workdir / f"{name}.log", cmd) as server:
        pid = server.proc.pid  # type: ignore[union-attr]
        time.sleep(0.3)  # the readiness probe's thread ends
        idle = proc_status(pid)
        peak = Peak(pid)
        for row, options in FIO_ROWS.items():
            out[row] = fio_sample(port, jobs, options, runtime)
        busy = peak.stop()
        time.sleep(1)  # the clients' threads end
        after = proc_status(pid)
    if name == "flexnbd":
        out["process"] = {"idle": idle, "busy": busy, "after": after}
    return out


# ---------------------------------------------------------------- report


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(ours: float | None, peers: list[float | None], lower_is_better: bool) -> str:
    best = [p for p in peers if p is not None]
    if ours is None or not best or not ours:
        return "-"
    return ratio_text(min(best) / ours if lower_is_better else ours / max(best))


def size_table(rows: dict) -> str:
    """One row per size; the migration's ratio is to the first row with as many extents (the
    smallest disk: issue 24 asks for 15 TiB within 2x of 64 GiB)."""
    lines = ["| logical size | ready s | map build s | migration s | migration / smallest | "
             "serve RSS MiB | listen RSS MiB |", "|---|---|---|---|---|---|---|"]
    firsts: dict[str, float] = {}
    for label, samples in rows.items():
        meds = {k: median([s[k] for s in samples if not s["error"]]) for k in
                ("ready_s", "map_build_s", "migration_s", "serve_rss_mib", "listen_rss_mib")}
        first = firsts.setdefault(label.partition(", ")[2], meds["migration_s"] or 0.0)
        vs = f"{meds['migration_s'] / first:.2f}" if first and meds["migration_s"] else "-"
        cells = [fmt(meds[k]) for k in ("ready_s", "map_build_s", "migration_s")] + [vs] + \
            [fmt(meds[k]) for k in ("serve_rss_mib", "listen_rss_mib")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EXTENT_COLUMNS = {"ready_s": "ready s", "map_s": "nbdinfo --map s", "nbdcopy_s": "nbdcopy s"}


def extents_table(rows: dict, servers: list[str]) -> str:
    head = ["extents", "measure", *servers, "flexnbd / best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_server in rows.items():
        for key, title in {**EXTENT_COLUMNS, "map_build_s": "flexnbd map build s",
                           "migration_s": "flexnbd migration s"}.items():
            meds = {n: median([s[key] for s in by_server.get(n, []) if key in s])
                    for n in servers}  # fmt: skip
            peers = [meds[n] for n in servers if n != "flexnbd"]
            r = ratio(meds["flexnbd"], peers, True) if key in EXTENT_COLUMNS else "-"
            lines.append(f"| {label} | {title} | "
                         + " | ".join(fmt(meds[n]) for n in servers) + f" | {r} |")
    return "\n".join(lines)


def clients_table(rows: dict, servers: list[str]) -> str:
    head = ["clients", "fio row", *[f"{n} IOPS / p99 µs" for n in servers], "flexnbd / best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for jobs, by_server in rows.items():
        for row in FIO_ROWS:
            meds = {n: (median([s[row]["iops"] for s in by_server.get(n, [])]),
                        median([s[row]["p99_us"] for s in by_server.get(n, [])]))
                    for n in servers}  # fmt: skip
            peers = [meds[n][0] for n in servers if n not in ("flexnbd", NBDKIT_ONE_THREAD)]
            cells = [f"{fmt(i)} / {fmt(p)}" for i, p in meds.values()]
            lines.append(f"| {jobs} | {row} | " + " | ".join(cells)
                         + f" | {ratio(meds['flexnbd'][0], peers, False)} |")
    return "\n".join(lines)


def process_table(rows: dict) -> str:
    lines = ["| clients | threads idle / busy / after | fds idle / busy / after | "
             "RSS MiB idle / peak / after |", "|---|---|---|---|"]
    for jobs, by_server in rows.items():
        samples = by_server.get("flexnbd", [])
        if not samples:
            continue
        p = samples[-1]["process"]
        cols = [" / ".join(str(p[w].get(k, "-")) for w in ("idle", "busy", "after"))
                for k in ("Threads", "FDs")]
        rss = (p["idle"].get("VmRSS", 0), p["busy"].get("VmRSS", 0), p["after"].get("VmRSS", 0))
        cols.append(" / ".join(f"{v / 1024:.1f}" for v in rss))
        lines.append(f"| {jobs} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CI: 64G,1T; 10k extents; clients 1,4,16; 1 sample, 1 s fio runs")
    p.add_argument("--sizes", help="logical sizes, SIZE or SIZE:EXTENTS "
                   "(default 64G,1T,4T,15T,15T:1000000)")
    p.add_argument("--extents-data", type=int, default=20000, help="4 KiB blocks per size row")
    p.add_argument("--extents-size", help="the extents rows' file (default 16G; quick 4G)")
    p.add_argument("--extents", help="extent counts (default 10000,100000,1000000)")
    p.add_argument("--clients", help="client counts (default 1,4,16,64)")
    p.add_argument("--repeat", type=int, help="samples per cell (default 3)")
    p.add_argument("--repeat-1m", type=int, default=1, help="samples of the 1M-extent rows")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 5)")
    p.add_argument("--data-size", default="1G", help="the clients' dense file")
    p.add_argument("--servers", default="flexnbd,nbdkit,qemu-nbd")
    p.add_argument("--json", help="results file")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    a = p.parse_args()
    quick = a.quick
    a.sizes = a.sizes or ("64G,1T" if quick else "64G,1T,4T,15T,15T:1000000")
    a.extents_size = a.extents_size or ("4G" if quick else "16G")
    a.extents = a.extents or ("10000" if quick else "10000,100000,1000000")
    a.clients = a.clients or ("1,4,16" if quick else "1,4,16,64")
    a.repeat = a.repeat or (1 if quick else 3)
    a.runtime = a.runtime or (1.0 if quick else 5.0)
    if quick:
        a.data_size = "256M"
    return a


def run_cell(errors: list[str], what: str, fn, *args) -> dict | None:
    """FN(*ARGS), or None with the error recorded (first line names the cell)."""
    try:
        result = fn(*args)
    except (ClientError, RuntimeError, OSError, ValueError) as e:
        errors.append(f"{what}: {e}")
        return None
    if isinstance(result, dict) and result.get("error"):
        errors.append(f"{what}: {result['error']}")
    return result


def main() -> int:
    args = parse_args()
    servers = [s for s in args.servers.split(",") if s == "flexnbd" or shutil.which(s)]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    report: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "git_head": git_head(), "machine": machine_info(),
                    "loadavg_start": os.getloadavg(), "settings": vars(args), "errors": errors}

    sizes: dict = {}
    for entry in args.sizes.split(","):
        text, _, count = entry.partition(":")
        n = int(count) if count else args.extents_data
        label = f"{size_text(parse_size(text))}, {n:,} extents"
        log(f"logical size {label}")
        repeat = args.repeat_1m if n >= 1_000_000 else args.repeat
        runs = [run_cell(errors, f"size {label}", size_sample, workdir, parse_size(text), n)
                for _ in range(repeat)]  # fmt: skip
        sizes[label] = [r for r in runs if r]

    extents: dict = {}
    src = workdir / "extents.img"
    for count in (int(c) for c in args.extents.split(",")):
        log(f"extents {count}: writing the file")
        make_sparse(src, parse_size(args.extents_size), count)
        repeat = args.repeat_1m if count >= 1_000_000 and not args.quick else args.repeat
        cell: dict = {}
        for _ in range(repeat):
            for name in servers:
                r = run_cell(errors, f"extents {count} / {name}", extents_sample, workdir, src,
                             name)
                if r and not r["error"]:
                    cell.setdefault(name, []).append(r)
        extents[f"{count:,}"] = cell
    src.unlink(missing_ok=True)

    clients: dict = {}
    client_servers = servers + ([NBDKIT_ONE_THREAD] if "nbdkit" in servers and not args.quick
                                else [])  # fmt: skip
    data = workdir / f"data-{args.data_size}.img"
    make_data_file(data, parse_size(args.data_size))
    for jobs in (int(c) for c in args.clients.split(",")):
        log(f"clients {jobs}")
        cell = {}
        for _ in range(args.repeat):
            for name in client_servers:
                r = run_cell(errors, f"clients {jobs} / {name}", clients_cell, workdir, data,
                             name, jobs, args.runtime)
                if r:
                    cell.setdefault(name, []).append(r)
        clients[jobs] = cell

    tables = [
        "Cost against logical size (flexnbd; migration: mirror --wait, serve into listen):",
        size_table(sizes),
        f"Extents ({args.extents_size} file; nbdcopy: sparse copy into a file):",
        extents_table(extents, servers),
        "Clients (fio nbd engine, one connection per job, 4k qd8 each; aggregate IOPS, "
        "p99 clat):",
        clients_table(clients, client_servers),
        "flexnbd's process with N clients (idle before, peak while fio runs, 1 s after):",
        process_table(clients),
    ]
    report.update(sizes=sizes, extents=extents, clients=clients,
                  loadavg_end=os.getloadavg(), markdown="\n\n".join(tables))
    print("\n\n".join(tables))
    return finish_report(report, Path(args.json) if args.json else
                         default_json("scale", args.quick))


if __name__ == "__main__":
    run_script(main)

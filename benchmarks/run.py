#!/usr/bin/env python3
"""Benchmark flexnbd against nbdkit, qemu-nbd and nbd-server with nbdcopy and fio.

Each server serves the same scratch file on 127.0.0.1, one server at a time (the target
machines have 2 cores, so anything running alongside would skew the numbers). For every
row we start a fresh server, warm it up with a short run of the row's client, run the
client, and record throughput (MiB/s) or IOPS plus the server's CPU time per GiB moved,
and for the qd1 rows the p50 and p99 latency. See benchmarks/README.md.

Exit status 1 if any cell failed (a client that exits non-zero or reports an error, a server
that dies, fails to start or exits non-zero on SIGTERM, flexnbd misreporting the sparse
file's holes); each error names its cell. --quick: a small run for CI (`make bench-ci`).

Standard library only, so it runs with any Python 3.10+.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    RATIO_MARK,
    SERVER_NAMES,
    ClientError,
    GiB,
    MiB,
    Server,
    data_bytes,
    default_json,
    finish_report,
    fmt,
    free_port,
    git_head,
    log,
    loopback_copy_s,
    machine_info,
    make_data_file,
    make_sparse_file,
    nbd_read_chunks,
    nbd_uri,
    nbdinfo_hole_bytes,
    parse_size,
    ratio_text,
    run_client,
    run_script,
    select,
    server_command,
    server_version,
    settle,
    size_text,
)

# Row name -> client settings ("options": extra client options). Reads come before writes
# so the read rows see the data file as generated; every row starts from a synced, warm page
# cache.
ROWS: dict[str, dict] = {
    "nbdcopy seq read": {"client": "nbdcopy", "unit": "MiB/s"},
    # nbdcopy opens one connection per core (up to 4) to a server that offers multi-conn
    # (flexnbd, nbdkit, nbd-server), one to qemu-nbd: this row gives each server one.
    "nbdcopy seq read 1 conn": {
        "client": "nbdcopy",
        "unit": "MiB/s",
        "options": ["--connections=1"],
    },
    "fio seq read 1M qd16": {"rw": "read", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    "fio seq read 1M qd1": {"rw": "read", "bs": "1M", "iodepth": 1, "unit": "MiB/s"},
    "fio rand read 4k qd1": {"rw": "randread", "bs": "4k", "iodepth": 1, "unit": "IOPS"},
    "fio rand read 4k qd32": {"rw": "randread", "bs": "4k", "iodepth": 32, "unit": "IOPS"},
    "fio seq write 1M qd16": {"rw": "write", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    # One FLUSH at the end. fio counts it in the job's time, so its MiB/s (bw_bytes:
    # io_bytes over a runtime that includes the final fsync) is what it took to get the data
    # to the disk; checked with strace delaying the server's fdatasync by 1 s.
    "fio seq write 1M qd16 end_fsync": {
        "rw": "write",
        "bs": "1M",
        "iodepth": 16,
        "unit": "MiB/s",
        "options": ["--end_fsync=1"],
    },
    "fio seq write 1M qd1": {"rw": "write", "bs": "1M", "iodepth": 1, "unit": "MiB/s"},
    "fio rand write 4k qd1": {"rw": "randwrite", "bs": "4k", "iodepth": 1, "unit": "IOPS"},
    # A FLUSH after every write: IOPS counts the writes, each with its FLUSH.
    "fio rand write 4k qd1 fsync": {
        "rw": "randwrite",
        "bs": "4k",
        "iodepth": 1,
        "unit": "IOPS",
        "options": ["--fsync=1"],
    },
    "fio rand write 4k qd32": {"rw": "randwrite", "bs": "4k", "iodepth": 32, "unit": "IOPS"},
    # The same reads on the sparse file (same size, --sparse-data of it data, the rest
    # holes): MiB/s here is effective, file size / time, holes included.
    "sparse nbdcopy seq read": {"client": "nbdcopy", "unit": "MiB/s", "file": "sparse"},
    "sparse fio seq read 1M qd16": {
        "rw": "read",
        "bs": "1M",
        "iodepth": 16,
        "unit": "MiB/s",
        "file": "sparse",
    },
}
# Short aliases for --rows.
ROW_ALIASES = {
    "nbdcopy": "nbdcopy seq read",
    "nbdcopy1": "nbdcopy seq read 1 conn",
    "seqread": "fio seq read 1M qd16",
    "seqread1": "fio seq read 1M qd1",
    "randread1": "fio rand read 4k qd1",
    "randread32": "fio rand read 4k qd32",
    "seqwrite": "fio seq write 1M qd16",
    "seqwrite-endfsync": "fio seq write 1M qd16 end_fsync",
    "seqwrite1": "fio seq write 1M qd1",
    "randwrite1": "fio rand write 4k qd1",
    "randwrite1-fsync": "fio rand write 4k qd1 fsync",
    "randwrite32": "fio rand write 4k qd32",
    "sparse-nbdcopy": "sparse nbdcopy seq read",
    "sparse-seqread": "sparse fio seq read 1M qd16",
}
# Before it is measured, each fresh server gets this share of the row's runtime of the
# same client (1 s by default, 0.25 s on --quick), thrown away: a server's first run can be
# much slower than the next (nbdkit's first fio run read at ~0.9 GiB/s, later ones at 2+),
# and the rows compare servers at work.
WARMUP_SHARE = 1 / 8
# The qd1 rows' latency figures, in µs: per request, p50 and p99 of fio's total latency
# (lat = slat + clat; with the nbd engine the request, a write's payload included, is sent
# while fio submits it, so clat alone leaves that out), and of the FLUSHes' where there are.
LATENCY_KEYS = ("p50_us", "p99_us", "sync_p50_us", "sync_p99_us")


@functools.cache
def nbdcopy_destination() -> str:
    """'null:' throws the data away inside nbdcopy; older nbdcopy lacks it."""
    out = subprocess.run(["nbdcopy", "--help"], capture_output=True, text=True)
    return "null:" if "null:" in out.stdout + out.stderr else "/dev/null"


def run_nbdcopy(port: int, row: dict, size: int, runtime: float) -> dict:
    """Copy the whole export, again and again until RUNTIME seconds have passed (one
    2 GiB copy takes about a second, too short to time alone)."""
    cmd = ["nbdcopy", *row.get("options", []), nbd_uri(port), nbdcopy_destination()]
    moved, start = 0, time.monotonic()
    while moved == 0 or time.monotonic() - start < runtime:
        run_client(cmd, timeout=600)
        moved += size
    return {
        "value": moved / MiB / (time.monotonic() - start),
        "bytes": moved,
        "command": " ".join(cmd),
    }


def fio_command(port: int, row: dict, runtime: float) -> list[str]:
    return [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={nbd_uri(port)}",
        f"--rw={row['rw']}", f"--bs={row['bs']}", f"--iodepth={row['iodepth']}",
        *row.get("options", []),
        "--time_based", f"--runtime={runtime * 1000:.0f}ms", "--norandommap", "--randrepeat=0",
        "--lat_percentiles=1", "--output-format=json",
    ]  # fmt: skip


def percentiles_us(lat_ns: dict, prefix: str = "") -> dict:
    """p50 and p99 of one of fio's latency reports, in µs (keys PREFIX + p50_us, p99_us)."""
    pct = lat_ns["percentile"]
    return {f"{prefix}p50_us": pct["50.000000"] / 1000, f"{prefix}p99_us": pct["99.000000"] / 1000}


def run_fio(port: int, row: dict, runtime: float) -> dict:
    """Run one fio job: MiB/s or IOPS, bytes moved and command; for a qd1 row also the
    latency percentiles (LATENCY_KEYS)."""
    cmd = fio_command(port, row, runtime)
    out = run_client(cmd, timeout=runtime + 60).stdout
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    try:
        data = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)
        job = data["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise ClientError(
            f"fio printed no JSON report ({e})\n{' '.join(cmd)}\n{out[-500:]}"
        ) from None
    if job.get("error"):
        raise ClientError(f"fio job error {job['error']}\n{' '.join(cmd)}")
    side = job["read" if "read" in row["rw"] else "write"]
    if not side["io_bytes"]:
        raise ClientError(f"fio moved no data\n{' '.join(cmd)}")
    result = {
        "value": side["iops"] if row["unit"] == "IOPS" else side["bw_bytes"] / MiB,
        "bytes": side["io_bytes"],
        "command": " ".join(cmd),
    }
    if row["iodepth"] == 1:
        result.update(percentiles_us(side["lat_ns"]))
        if job["sync"]["total_ios"]:  # --fsync=1 (end_fsync's one FLUSH is not counted)
            result.update(percentiles_us(job["sync"]["lat_ns"], "sync_"))
    return result


def run_row_client(port: int, row: dict, size: int, runtime: float) -> dict:
    if row.get("client") == "nbdcopy":
        return run_nbdcopy(port, row, size, runtime)
    return run_fio(port, row, runtime)


def children_cpu() -> float:
    """CPU seconds of our finished child processes (the clients; servers are reaped later)."""
    t = os.times()
    return t.children_user + t.children_system


def measure(server: Server, row: dict, size: int, runtime: int) -> dict:
    """Warm a fresh server up with the row's client (WARMUP_SHARE of RUNTIME), then measure
    the row."""
    try:
        run_row_client(server.port, row, size, runtime * WARMUP_SHARE)
        cpu0, client0 = server.cpu_seconds(), children_cpu()
        result = run_row_client(server.port, row, size, runtime)
    except ClientError as e:
        # The server's side of the story is usually what explains a client failure.
        assert server.proc is not None
        state = "still running" if server.alive() else f"exited {server.proc.returncode}"
        raise ClientError(
            f"{e}\n--- {server.name} ({state}), log tail:\n{server.log_tail()}"
        ) from None
    cpu, client_cpu = server.cpu_seconds() - cpu0, children_cpu() - client0
    if not server.alive():
        assert server.proc is not None
        raise ClientError(
            f"{server.name} died during the run (exit {server.proc.returncode})\n"
            + server.log_tail()
        )
    gib = result["bytes"] / GiB
    return {
        **result,
        "unit": row["unit"],
        "server_cpu_s": cpu,
        "cpu_s_per_gib": cpu / gib if gib else None,
        # The client's CPU too: on 2 cores, client and server compete for the same CPUs.
        "client_cpu_s_per_gib": client_cpu / gib if gib else None,
    }


# ---------------------------------------------------------------- raw loopback


# Receive sizes for the loopback test: big reads are the ceiling; 256 KiB is what nbdcopy
# asks for per request by default, so a client reading that much at a time sees this.
LOOPBACK_RECV_SIZES = {"4M": 4 * MiB, "256K": 256 * 1024}


def loopback_once(path: Path, size: int, bufsize: int) -> float:
    """sendfile() SIZE bytes of PATH into a loopback TCP socket, recv_into() them; MiB/s."""
    return size / MiB / loopback_copy_s(path, size, bufsize, "loopback test")


def loopback_mib_s(path: Path, size: int, runs: int = 3) -> dict[str, float]:
    """Per receive size, best of RUNS loopback_once(): what one TCP connection can move.

    An NBD server's read path is sendfile too, so this is the yardstick for sequential
    reads. Both calls drop the GIL, so the two threads run in parallel at C speed.
    """
    return {
        name: max(loopback_once(path, size, bufsize) for _ in range(runs))
        for name, bufsize in LOOPBACK_RECV_SIZES.items()
    }


def ratios(results: dict, servers: list[str]) -> list[dict]:
    """Per row: flexnbd's figure over the best peer's (above 1: flexnbd wins)."""
    peers = [s for s in servers if s != "flexnbd"]
    out = []
    if "flexnbd" not in servers or not peers:
        return out
    for row, cells in results.items():
        vals = {s: cells.get(s, {}).get("value") for s in servers}
        measured = [p for p in peers if vals[p] is not None]
        best = max(measured, key=lambda p: vals[p], default=None)
        ratio = None
        if best is not None and vals["flexnbd"] is not None and vals[best]:
            ratio = vals["flexnbd"] / vals[best]
        out.append({
            "row": row, "unit": ROWS[row]["unit"], "flexnbd": vals["flexnbd"],
            "best_peer": best, "best_peer_value": vals[best] if best else None,
            "ratio": ratio, "marked": ratio is not None and ratio < RATIO_MARK,
        })  # fmt: skip
    return out


def table(results: dict, servers: list[str]) -> str:
    """Markdown: one line per row, value per server ('ERR': that cell failed), flexnbd / best
    peer (marked '<< 0.80' under 0.8), CPU s/GiB."""
    by_row = {r["row"]: r for r in ratios(results, servers)}
    head = ["row", "unit", *servers]
    if by_row:
        head.append("flexnbd / best peer")
    head += [f"CPU s/GiB {s}" for s in servers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in results.items():
        unit = ROWS[row]["unit"]
        line = [row, unit] + [value_text(cells.get(s)) for s in servers]
        if by_row:
            line.append(ratio_text(by_row[row]["ratio"]))
        line += [fmt(cells.get(s, {}).get("cpu_s_per_gib")) for s in servers]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def latency_text(cell: dict | None, prefix: str = "") -> str:
    """'p50 / p99' in µs; 'ERR' for a failed cell."""
    if cell is None:
        return "ERR"
    return f"{fmt(cell.get(prefix + 'p50_us'))} / {fmt(cell.get(prefix + 'p99_us'))}"


def latency_table(results: dict, servers: list[str]) -> str:
    """Markdown: per qd1 row, p50 / p99 latency per server; the fsync row gets a second
    line for its FLUSHes."""
    lines = ["| row | " + " | ".join(servers) + " |", "|" + "---|" * (len(servers) + 1)]
    for row, cells in results.items():
        if ROWS[row].get("iodepth") != 1:
            continue
        lines.append(f"| {row} | " + " | ".join(latency_text(cells.get(s)) for s in servers) + " |")
        if any("sync_p50_us" in cell for cell in cells.values()):
            texts = [latency_text(cells.get(s), "sync_") for s in servers]
            lines.append(f"| {row}: its FLUSHes | " + " | ".join(texts) + " |")
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
    """One measurement on a fresh server; errors go to ERRORS, first line naming the cell
    (and the cell is left out: 'ERR' in the table)."""
    settle(data)
    try:
        with Server(name, free_port(), data, workdir / f"{name}.log") as server:
            cell = measure(server, ROWS[row], size, runtime)
            status = server.stop()
    except (ClientError, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log(f"  ERROR: {e}")
        errors.append(f"cell {row} / {name}: {e}")
        return None
    if status != 0:
        # Every server here exits 0 on SIGTERM (flexnbd promises it; nbdkit, qemu-nbd and
        # nbd-server do too); anything else is a failure of that cell.
        errors.append(f"cell {row} / {name}: {name} exited {status} on SIGTERM (want 0)")
    log(f"  {fmt(cell['value'])} {cell['unit']}, {fmt(cell['cpu_s_per_gib'])} CPU s/GiB")
    return cell


def run_cells(
    rows: list[str],
    servers: list[str],
    files: dict[str, Path],
    size: int,
    runtime: int,
    repeat: int,
    workdir: Path,
    errors: list[str],
    label: str = "",
) -> dict:
    """REPEAT samples of every (row, server) cell, each on a fresh server, on the row's file
    in FILES ("dense" or "sparse"): {row: {server: combined cell}} (a failed cell left out)."""
    samples: dict[tuple[str, str], list[dict]] = {}
    # Row-major, servers interleaved: the servers compared in one row run close together
    # in time, so background load on a shared machine hits them alike.
    for rep in range(repeat):
        for row in rows:
            for name in servers:
                run = f" (run {rep + 1}/{repeat})" if repeat > 1 else ""
                log(f"{name}: {row}{label}{run}")
                path = files[ROWS[row].get("file", "dense")]
                cell = run_row(name, row, path, size, runtime, workdir, errors)
                if cell:
                    samples.setdefault((row, name), []).append(cell)
    results: dict = {r: {} for r in rows}
    for (row, name), cells in samples.items():
        results[row][name] = combine(cells)
    return results


def check_sparse(name: str, path: Path, workdir: Path, errors: list[str]) -> dict | None:
    """What a server tells a client about the sparse file's holes: the hole bytes that
    `nbdinfo --map` gets via BLOCK_STATUS, and the reply chunks of a READ of the first hole
    (OFFSET_HOLE, or the zero bytes as OFFSET_DATA)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        hole_len = min(os.lseek(fd, hole, os.SEEK_DATA) - hole, MiB)
    except OSError:  # no data after the first hole
        hole_len = MiB
    finally:
        os.close(fd)
    try:
        with Server(name, free_port(), path, workdir / f"{name}.log") as server:
            check = {
                "file_hole_bytes": path.stat().st_size - data_bytes(path),
                "map_hole_bytes": nbdinfo_hole_bytes(server.port),
                "hole_read_chunks": nbd_read_chunks(server.port, hole, hole_len),
            }
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        errors.append(f"sparse check / {name}: {e}")
        return None
    if name == "flexnbd":
        # What flexnbd promises about holes (BLOCK_STATUS, OFFSET_HOLE): a deterministic check.
        holes = check["map_hole_bytes"]
        if holes is not None and holes != check["file_hole_bytes"]:
            errors.append(
                f"sparse check / flexnbd: nbdinfo --map shows {check['map_hole_bytes']} bytes "
                f"of holes, the file has {check['file_hole_bytes']}"
            )
        if check["hole_read_chunks"] != ["OFFSET_HOLE"]:
            errors.append(
                "sparse check / flexnbd: a READ of a hole got "
                f"{', '.join(check['hole_read_chunks'])}, not one OFFSET_HOLE chunk"
            )
    log(f"{name}: {sparse_text(check)}")
    return check


def sparse_text(check: dict) -> str:
    """What check_sparse found, in words."""
    holes, chunks = check["map_hole_bytes"], check["hole_read_chunks"]
    shown = "gives no map" if holes is None else f"shows {fmt(holes / MiB)} MiB of holes"
    answer = "a simple reply" if chunks == ["simple"] else ", ".join(chunks)
    return (
        f"`nbdinfo --map` (BLOCK_STATUS) {shown}, the file has "
        f"{fmt(check['file_hole_bytes'] / MiB)} MiB of holes; a READ of a hole is answered "
        f"with {answer}"
    )


def combine(cells: list[dict]) -> dict:
    """Median of repeated runs of one cell; the single values are kept as 'samples'."""
    if len(cells) == 1:
        return cells[0]
    out = dict(cells[0])
    for key in ("value", "server_cpu_s", "cpu_s_per_gib", "client_cpu_s_per_gib", *LATENCY_KEYS):
        values = [c[key] for c in cells if c.get(key) is not None]
        if key in out:  # the latency keys are on the qd1 rows only
            out[key] = statistics.median(values) if values else None
    out["bytes"] = sum(c["bytes"] for c in cells)
    out["samples"] = [c["value"] for c in cells]
    out["spread"] = spread(out["samples"])
    return out


def spread(values: list[float]) -> float | None:
    """(max - min) / median of a cell's samples: how far to trust its median."""
    middle = statistics.median(values) if len(values) > 1 else 0
    return (max(values) - min(values)) / middle if middle else None


def value_text(cell: dict | None) -> str:
    """A cell's median, and its spread when it has several samples; 'ERR' for a failed one."""
    if cell is None or cell.get("value") is None:
        return "ERR"
    if cell.get("spread") is None:
        return fmt(cell["value"])
    return f"{fmt(cell['value'])} ({cell['spread']:.0%})"


QUICK = {"size": "256M", "sparse_data": "32M", "runtime": 2, "configs": ""}
FULL = {"size": "2G", "sparse_data": "256M", "runtime": 8, "configs": "1G/4,2G/6"}
# The rows measured again in each --configs setup: the depth-16 sequential rows, whose
# outcome an independent harness (issue 27: 1 GiB / 4 s and 2 GiB / 6 s, fresh servers
# interleaved) once found to differ from the main table's.
CONFIG_ROWS = ("fio seq read 1M qd16", "fio seq write 1M qd16")


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'1G/4,2G/6' -> [(file size, seconds per sample), ...]."""
    configs = []
    for item in filter(None, text.split(",")):
        size, sep, runtime = item.partition("/")
        if not sep or not runtime.strip().isdigit() or int(runtime) < 1:
            raise SystemExit(f"--configs: {item!r} is not SIZE/SECONDS (e.g. 1G/4)")
        configs.append((parse_size(size.strip()), int(runtime)))
    return configs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the data file lives")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run for CI: 256M files (32M of data in the sparse one), 2 s per row",
    )
    p.add_argument("--size", help="data file size (default 2G)")
    p.add_argument(
        "--sparse-data",
        help="data in the sparse file (same size as --size, 1 MiB pieces; default 256M)",
    )
    p.add_argument("--runtime", type=int, help="seconds per fio row (default 8)")
    p.add_argument(
        "--configs",
        help="SIZE/SECONDS,...: the depth-16 sequential rows again on a file of each SIZE, "
        "SECONDS per sample, each in its own table (default 1G/4,2G/6; --quick: none; "
        "'' for none)",
    )
    p.add_argument(
        "--rows",
        help="comma-separated rows (names or aliases: " + ", ".join(ROW_ALIASES) + ")",
    )
    p.add_argument("--servers", help="comma-separated servers: " + ", ".join(SERVER_NAMES))
    p.add_argument(
        "--repeat", type=int, default=1, help="runs per cell; the table shows the median"
    )
    p.add_argument(
        "--json",
        help="results file (default benchmarks/results/run.json; --quick: "
        "benchmarks/out/run-quick.json)",
    )
    p.add_argument("--no-loopback", action="store_true", help="skip the raw TCP test")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = parse_size(args.size)
    rows = select(args.rows, list(ROWS), ROW_ALIASES)
    servers = select(args.servers, list(SERVER_NAMES), {})
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"data-{size}.img"
    sparse_data = parse_size(args.sparse_data)
    files = {"dense": data, "sparse": workdir / f"sparse-{size}-{sparse_data}.img"}
    json_path = Path(args.json) if args.json else default_json("run", args.quick)

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
    if any(ROWS[r].get("file") == "sparse" for r in rows):
        make_sparse_file(files["sparse"], size, sparse_data)
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "size": size,
        "sparse_data": sparse_data,
        "runtime": args.runtime,
        "repeat": args.repeat,
        "quick": args.quick,
        "git_head": git_head(),
        "servers": {},
        "rows": {},
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
    if any(ROWS[r].get("file") == "sparse" for r in rows):
        report["sparse_check"] = {
            name: check_sparse(name, files["sparse"], workdir, report["errors"]) for name in servers
        }
    report["rows"] = run_cells(
        rows, servers, files, size, args.runtime, args.repeat, workdir, report["errors"]
    )
    report["configs"] = {}
    for config_size, config_runtime in parse_configs(args.configs):
        config_data = workdir / f"data-{config_size}.img"
        make_data_file(config_data, config_size)
        label = f"{size_text(config_size)} file, {config_runtime} s per sample"
        report["configs"][label] = run_cells(
            [r for r in rows if r in CONFIG_ROWS], servers, {"dense": config_data},
            config_size, config_runtime, args.repeat, workdir, report["errors"], f", {label}",
        )  # fmt: skip
    report["loadavg_end"] = os.getloadavg()  # includes our own load (about 2)

    report["ratios"] = ratios(report["rows"], servers)
    out = [
        f"{report['git_head']}, {size_text(size)} files ({size_text(sparse_data)} of data in the "
        f"sparse one), {args.runtime} s per fio row, {args.repeat} sample(s) per cell; load "
        f"{report['loadavg_start'][0]:.2f} → {report['loadavg_end'][0]:.2f}",
        "",
        table(report["rows"], servers),
    ]
    if any(ROWS[r].get("iodepth") == 1 for r in rows):
        out += [
            "",
            "Latency of the qd1 rows, µs, p50 / p99 per request (fio's total latency: "
            "submission and completion; the fsync row also gives its FLUSHes'):",
            "",
            latency_table(report["rows"], servers),
        ]
    out += [
        "",
        "Client (nbdcopy/fio) CPU s/GiB, for context:",
        "",
        client_table(report["rows"], servers),
    ]
    for label, results in report["configs"].items():
        out += ["", f"The depth-16 sequential rows on a {label}:", "", table(results, servers)]
    if args.repeat > 1:
        out += ["", "(n %): the cell's spread, (max - min) / median of its samples."]
    marked = [r for r in report["ratios"] if r["marked"]]
    if marked:
        out.append("")
        out += [
            f"{r['row']}: flexnbd {r['ratio']:.2f}x {r['best_peer']} << {RATIO_MARK:.2f} "
            "(a mark, not an error: check with --repeat 3 before believing it)"
            for r in marked
        ]
    for name, check in report.get("sparse_check", {}).items():
        if check:
            out.append("")
            out.append(f"{name} on the sparse file: {sparse_text(check)}")
    if "loopback_mib_s" in report:
        out.append("")
        for recv, loop in report["loopback_mib_s"].items():
            out.append(f"raw loopback TCP, {recv} reads: {loop:,.0f} MiB/s")
            for row in ("nbdcopy seq read", "fio seq read 1M qd16"):
                cell = report["rows"].get(row, {}).get("flexnbd")
                if cell:
                    out.append(f"  flexnbd {row}: {cell['value'] / loop:.0%} of it")
    report["markdown"] = "\n".join(out)
    print(report["markdown"])
    return finish_report(report, json_path)


if __name__ == "__main__":
    run_script(main)

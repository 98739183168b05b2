#!/usr/bin/env python3
"""Time flexnbd's allocation map build: FIEMAP against the SEEK_DATA/SEEK_HOLE fallback.

Makes a big sparse file (default 1 TiB) with many small scattered extents (default 10 000
of 4 KiB at random 4 KiB-aligned positions, never adjacent), then builds
flexnbd._allocmap.AllocationMap over it with each method in turn, timing only build().
The file is deleted at the end. The sparse *read* rows (nbdcopy and fio against the three
servers) are in run.py ("sparse nbdcopy seq read", "sparse fio seq read 1M qd16").

Run with the project's interpreter (it imports flexnbd): .venv/bin/python benchmarks/sparse.py
Exit status 1 if a map misses or invents data, or the method asked for is not the one used.
--quick: a small run for CI (`make bench-ci`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    default_json,
    finish_report,
    git_head,
    log,
    machine_info,
    parse_size,
    run_script,
    seek_extents,
    size_text,
)

BLOCK = 4096


def make_file(path: Path, size: int, extents: int, seed: int) -> list[int]:
    """SIZE-byte sparse file with EXTENTS blocks of random data at random block offsets,
    no two adjacent (so each is its own extent). Returns the offsets."""
    slots = random.Random(seed).sample(range(size // (2 * BLOCK)), extents)
    offsets = sorted(slot * 2 * BLOCK for slot in slots)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for off in offsets:
            os.pwrite(fd, os.urandom(BLOCK), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return offsets


def time_build(fd: int, size: int, method: str) -> dict:
    from flexnbd._allocmap import AllocationMap

    t0 = time.perf_counter()
    amap = AllocationMap(size)
    t1 = time.perf_counter()
    used = amap.build(fd, method)
    t2 = time.perf_counter()
    return {
        "build_ms": (t2 - t1) * 1000,
        "alloc_ms": (t1 - t0) * 1000,  # creating the (empty) bitmap, not part of build
        "method_used": used,
        "extents_found": amap.extents_found,
        "allocated_bytes": amap.allocated_bytes(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the file is made")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run for CI: 64 GiB file, 1000 extents, 2 builds per method",
    )
    p.add_argument("--size", help="file size (default 1T)")
    p.add_argument("--extents", type=int, help="4 KiB extents (default 10000)")
    p.add_argument("--repeat", type=int, help="builds per method (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--json",
        help="results file (default benchmarks/results/sparse.json; --quick: "
        "benchmarks/out/sparse-quick.json)",
    )
    p.add_argument("--keep", action="store_true", help="keep the file afterwards")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


QUICK = {"size": "64G", "extents": 1_000, "repeat": 2}
FULL = {"size": "1T", "extents": 10_000, "repeat": 5}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from flexnbd._allocmap import METHODS
    except ImportError as e:
        raise SystemExit(
            f"cannot import flexnbd ({e}); run with the project's .venv/bin/python"
        ) from None
    size = parse_size(args.size)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"allocmap-{size}.img"
    json_path = Path(args.json) if args.json else default_json("sparse", args.quick)
    methods = [m for m in ("fiemap", "seek") if m in METHODS]
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "git_head": git_head(),
        "size": size,
        "extents": args.extents,
        "repeat": args.repeat,
        "quick": args.quick,
        "loadavg_start": os.getloadavg(),
        "runs": {m: [] for m in methods},
    }
    errors = []
    log(f"making {path}: {size_text(size)}, {args.extents} extents of 4 KiB ...")
    t0 = time.monotonic()
    try:
        offsets = make_file(path, size, args.extents, args.seed)
        log(f"  done in {time.monotonic() - t0:.1f} s")
        fd = os.open(path, os.O_RDONLY)
        try:
            count, data = seek_extents(fd, size)
            report["file"] = {"seek_extents": count, "data_bytes": data}
            if count != len(offsets) or data != len(offsets) * BLOCK:
                errors.append(f"file has {count} extents / {data} bytes, expected {len(offsets)}")
            for rep in range(args.repeat):  # methods interleaved: load hits both alike
                for method in methods:
                    run = time_build(fd, size, method)
                    report["runs"][method].append(run)
                    log(
                        f"{method} (run {rep + 1}/{args.repeat}): {run['build_ms']:.1f} ms, "
                        f"{run['extents_found']} extents, {run['allocated_bytes']} bytes"
                    )
                    if run["method_used"] != method:
                        errors.append(f"asked for {method}, the map used {run['method_used']}")
                    if run["allocated_bytes"] != data:
                        errors.append(
                            f"{method}: map has {run['allocated_bytes']} bytes, the file {data}"
                        )
        finally:
            os.close(fd)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    report["loadavg_end"] = os.getloadavg()
    report["errors"] = errors

    out = [
        f"{report['git_head']}: allocation map build, {size_text(size)} file, "
        f"{args.extents} extents of 4 KiB, {args.repeat} builds per method; load "
        f"{report['loadavg_start'][0]:.2f} → {report['loadavg_end'][0]:.2f}",
        "",
        "| method | median ms | min ms | max ms | extents found | allocated bytes |",
        "|---|---|---|---|---|---|",
    ]
    for method, runs in report["runs"].items():
        if not runs:
            continue
        ms = [r["build_ms"] for r in runs]
        out.append(
            f"| {method} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} "
            f"| {runs[-1]['extents_found']:,} | {runs[-1]['allocated_bytes']:,} |"
        )
    alloc = [r["alloc_ms"] for runs in report["runs"].values() for r in runs]
    if alloc:
        out.append(
            f"\n(creating the empty {size // BLOCK // 8 / (1 << 20):g} MiB bitmap, not "
            f"included: median {statistics.median(alloc):.2f} ms)"
        )
    report["markdown"] = "\n".join(out)
    print(report["markdown"])
    return finish_report(report, json_path)


if __name__ == "__main__":
    run_script(main)

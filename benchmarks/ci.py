#!/usr/bin/env python3
"""`make bench-ci`: every benchmark script in its quick mode, one JSON file, one verdict.

Runs run.py, sparse.py, migration.py, proxy.py, tls.py and scale.py with --quick, one after
the other (never two at once: 2 cores), each printing its usual tables straight into the log;
then prints every throughput ratio against the best peer, marked "<< 0.80" where it is under 0.8,
and writes all the scripts' results into one JSON file (default benchmarks/out/bench-ci.json).

It FAILS (exit 1) on what is deterministic: a script that exits non-zero (it found a client
or server error, a non-zero exit, a migrated file that differs, a sparse migration sending
more than 1.1x the data, a wrong allocation map ...), crashes, writes no results or outlives
its time limit; and, with FLEXNBD_REQUIRE_TOOLS=1 (as in CI), a cell not measured because a
tool is missing. It does NOT fail on throughput or time ratios: the machines it runs on are
shared and noisy, so a ratio is a mark for a human to look at, not a verdict.

Standard library only; all traffic on 127.0.0.1. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    OUT_DIR,
    RATIO_MARK,
    SERVER_NAMES,
    fmt,
    git_head,
    machine_info,
    ratio_text,
    run_script,
    select,
)

HERE = Path(__file__).resolve().parent
SCRIPTS = ["run", "sparse", "migration", "proxy", "tls", "scale"]
# Seconds each script may take before it is stopped (and counted as failed): about 3x what
# it takes on the 2-core reference machine, so only a hang trips it.
TIME_LIMIT = {"run": 600, "sparse": 120, "migration": 300, "proxy": 240, "tls": 240, "scale": 270}
DEFAULT_WORKDIR = "/var/tmp/flexnbd-bench-ci"  # apart from the full runs' files and logs


def require_tools() -> bool:
    return os.environ.get("FLEXNBD_REQUIRE_TOOLS", "") not in ("", "0")


def run_one(name: str, workdir: str, json_path: Path) -> dict:
    """Run benchmarks/NAME.py --quick; its output goes straight to ours. Returns exit status,
    duration, command and the script's JSON report (None if it wrote none)."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--quick", "--workdir", workdir]
    cmd += ["--json", str(json_path)]
    print(f"\n=== {name}.py: {' '.join(cmd[1:])}\n", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    timed_out = False
    try:
        rc = proc.wait(TIME_LIMIT[name])
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGTERM)  # the scripts unwind on SIGTERM and stop their servers
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    except BaseException:  # Ctrl-C or SIGTERM to us: stop the script too, by its PID
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        raise
    report = None
    try:
        report = json.loads(json_path.read_text())
    except (OSError, ValueError):
        pass
    return {
        "command": " ".join(cmd),
        "exit": rc,
        "timed_out": timed_out,
        "duration_s": time.monotonic() - started,
        "report": report,
    }


def expected_missing(name: str, report: dict) -> list[str]:
    """What a complete quick run of NAME measures but REPORT lacks (a tool was missing, or
    the part failed, in which case the script has already said why)."""
    missing = []
    if name == "run":
        from run import ROWS

        for row in ROWS:
            for server in SERVER_NAMES:
                if server not in report.get("rows", {}).get(row, {}):
                    missing.append(f"cell {row} / {server}")
    elif name == "sparse":
        for method, runs in report.get("runs", {}).items():
            if not runs:
                missing.append(f"map build with {method}")
        if not report.get("runs"):
            missing.append("map builds")
    elif name == "migration":
        for case in ("dense", "sparse", "writes"):
            if case not in report.get("summary", {}):
                missing.append(f"case {case}")
        for kind in ("idle", "migrating", "endgame"):
            if kind not in report.get("latency_summary", {}):
                missing.append(f"latency {kind}")
    elif name == "tls":
        from tls import COLUMNS, ROWS

        for row in ROWS:
            for column in COLUMNS:
                if column not in report.get("rows", {}).get(row, {}):
                    missing.append(f"cell {row} / {column}")
        for kind, runs in report.get("migration", {"migration": None}).items():
            if not runs or not runs.get("seconds"):
                missing.append(f"migration {kind}")
    elif name == "proxy":
        from proxy import PROXY_ROWS

        for row in PROXY_ROWS:
            if row not in report.get("rows", {}):
                missing.append(f"row {row}")
        for sig in ("SIGKILL", "SIGTERM"):
            if sig not in report.get("pause", {}).get("summary", {}):
                missing.append(f"pause after {sig}")
        if "sparse_copy" not in report:
            missing.append("sparse nbdcopy")
    return missing


def failures_of(name: str, res: dict) -> list[str]:
    """Why the quick run of NAME failed (empty: it passed)."""
    report, rc = res["report"], res["exit"]
    out = []
    if res["timed_out"]:
        out.append(f"{name}.py: still running after {TIME_LIMIT[name]} s, stopped")
    if report is None:
        out.append(f"{name}.py crashed: exit {rc}, no results written (traceback above)")
        return out
    errors = report.get("errors", [])
    for err in errors:
        out.append(f"{name}.py: {err.splitlines()[0] if err else '(empty error)'}")
    if rc != 0 and not errors and not res["timed_out"]:
        out.append(f"{name}.py exited {rc} (see its output above)")
    if rc == 0 and errors:
        out.append(f"{name}.py exited 0 despite {len(errors)} error(s)")
    missing = expected_missing(name, report)
    if missing and require_tools():
        out.append(f"{name}.py did not measure: {', '.join(missing)} (FLEXNBD_REQUIRE_TOOLS=1)")
    res["missing"] = missing
    return out


def ratio_lines(results: dict) -> list[str]:
    """Every ratio of the quick runs, in one place; marked, never judged."""
    lines = [
        "Ratios (quick run, 1 sample: informative, never a failure; '<< 0.80': under 0.8 of "
        "the yardstick, '>> L': over a time limit L)",
    ]
    run = (results.get("run") or {}).get("report")
    if run and run.get("ratios"):
        peers = ", ".join(name for name in run["servers"] if name != "flexnbd")
        lines.append(f"run.py, flexnbd / best peer ({peers}):")
        for r in run["ratios"]:
            detail = (
                f"flexnbd {fmt(r['flexnbd'])}, {r['best_peer']} {fmt(r['best_peer_value'])} "
                f"{r['unit']}"
                if r["ratio"] is not None
                else "not measured"
            )
            lines.append(f"  {r['row']:<31} {ratio_text(r['ratio']):<14} ({detail})")
    proxy = (results.get("proxy") or {}).get("report")
    if proxy and proxy.get("rows"):
        lines.append("proxy.py, through flexnbd-proxy / direct to flexnbd (bare relay / direct):")
        for row, s in proxy["rows"].items():
            relay = f"relay {s['relay_ratio']:.2f}" if s.get("relay_ratio") is not None else ""
            lines.append(
                f"  {row:<31} {ratio_text(s['ratio']):<14} (direct {fmt(s['direct'])}, proxy "
                f"{fmt(s['proxy'])} {s['unit']}; {relay})"
            )
    copy = (proxy or {}).get("sparse_copy")
    if copy:
        lines.append(
            f"  {'sparse nbdcopy (speed)':<31} {ratio_text(copy['ratio']):<14} (direct "
            f"{fmt(copy['direct_s'])} s, proxy {fmt(copy['proxy_s'])} s; wire proxy/direct "
            f"{copy['wire_proxy'] / max(copy['wire_direct'], 1):.2f}, allocated "
            f"{copy['allocated_proxy'] / max(copy['allocated_direct'], 1):.2f})"
        )
    mig = (results.get("migration") or {}).get("report")
    if mig:
        lines.append("migration.py (against yardsticks measured in the same run):")
        from migration import DISK_RATIO_LIMIT, LATENCY_P99_LIMIT, SPARSE_WIRE_LIMIT

        s = mig.get("summary", {})
        dd = mig.get("dd_summary", {})
        dense = s.get("dense", {})
        if dense.get("src_exit_s") and dd.get("yardstick"):
            r = dense["src_exit_s"] / dd[dd["yardstick"]]["s"]
            mark = f" >> {DISK_RATIO_LIMIT}" if r > DISK_RATIO_LIMIT else ""
            lines.append(
                f"  dense, to durable / `dd {dd['yardstick']}`: {r:.2f}x{mark} "
                f"({fmt(dense['src_exit_s'])} s vs {fmt(dd[dd['yardstick']]['s'])} s)"
            )
        sparse = s.get("sparse", {})
        if sparse.get("wire_bytes"):
            r = sparse["wire_bytes"] / sparse["data_size"]
            lines.append(f"  sparse, wire / data: {r:.3f} (over {SPARSE_WIRE_LIMIT} is a failure)")
        lat = mig.get("latency_summary", {})
        if "p99_ratio" in lat:
            r = lat["p99_ratio"]
            mark = f" >> {LATENCY_P99_LIMIT}" if r > LATENCY_P99_LIMIT else ""
            lines.append(f"  client p99 during a migration / idle: {r:.2f}x{mark}")
    sparse_rep = (results.get("sparse") or {}).get("report")
    if sparse_rep and sparse_rep.get("runs"):
        ms = {m: min(r["build_ms"] for r in runs) for m, runs in sparse_rep["runs"].items() if runs}
        lines.append(
            "sparse.py, map build (best of the quick builds): "
            + ", ".join(f"{m} {v:.1f} ms" for m, v in ms.items())
        )
    marked = 0
    if run:
        marked += sum(1 for r in run.get("ratios", []) if r["marked"])
    if proxy:
        marked += sum(1 for r in proxy.get("rows", {}).values() if r["ratio"] < RATIO_MARK)
        marked += 1 if copy and copy["ratio"] < RATIO_MARK else 0
    lines.append(f"{marked} ratio(s) marked '<< {RATIO_MARK:.2f}'")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"default {DEFAULT_WORKDIR}")
    p.add_argument("--json", help="the one results file (default benchmarks/out/bench-ci.json)")
    p.add_argument("--scripts", help="comma-separated subset of " + ", ".join(SCRIPTS))
    args = p.parse_args(argv)
    scripts = select(args.scripts, SCRIPTS, {})
    json_path = Path(args.json) if args.json else OUT_DIR / "bench-ci.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    out: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "git_head": git_head(),
        "machine": machine_info(),
        "loadavg_start": os.getloadavg(),
        "scripts": {},
        "failures": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-ci-") as tmp:
        for name in scripts:
            res = run_one(name, args.workdir, Path(tmp) / f"{name}.json")
            res["failures"] = failures_of(name, res)
            out["scripts"][name] = res
            out["failures"] += res["failures"]
            verdict = "FAILED" if res["failures"] else "ok"
            print(f"\n=== {name}.py: {verdict}, exit {res['exit']}, {res['duration_s']:.0f} s")
    out["loadavg_end"] = os.getloadavg()
    out["duration_s"] = time.monotonic() - started
    out["ratios_text"] = ratio_lines(out["scripts"])

    print("\n=== bench-ci summary\n")
    print("\n".join(out["ratios_text"]))
    print()
    for name, res in out["scripts"].items():
        missing = res.get("missing")
        note = f"; not measured: {', '.join(missing)}" if missing else ""
        print(f"{name}.py: exit {res['exit']}, {res['duration_s']:.0f} s{note}")
    print(
        f"{out['git_head']}; load {out['loadavg_start'][0]:.2f} → {out['loadavg_end'][0]:.2f}; "
        f"{out['duration_s']:.0f} s in all; results in {json_path}"
    )
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    if out["failures"]:
        print(f"\nbench-ci FAILED ({len(out['failures'])}):")
        for f in out["failures"]:
            print(f"  {f}")
        return 1
    print("\nbench-ci passed: no client or server error in any benchmark")
    return 0


if __name__ == "__main__":
    run_script(main)

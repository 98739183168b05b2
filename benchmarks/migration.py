#!/usr/bin/env python3
"""Benchmark flexnbd's live migration: `flexnbd mirror --wait` from a serve to a listen server.

Cases (issue 5): 'dense', 1 GiB of random data; 'sparse', 4 GiB with 256 MiB of data in
scattered 1 MiB pieces; 'writes', the dense case with fio writing random 4 KiB blocks to the
source throughout, until the endgame disconnects it. Each case runs --repeat times; the
table shows medians. Per run: wall time from the mirror request to `mirror --wait`
returning, the bytes on the wire the source logs, the CPU seconds of each end during the
migration (exact, from wait4() when they exit), both exit statuses, and `cmp` of the two
files afterwards. With --relay (default on) one more run per case goes through a counting
TCP relay, an independent count of the bytes on the wire. See benchmarks/README.md.

Standard library only; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    HOST,
    MiB,
    Server,
    allocated_bytes,
    find_flexnbd,
    finish_report,
    fmt,
    free_port,
    git_head,
    log,
    machine_info,
    make_data_file,
    make_sparse_file,
    parse_size,
    run_script,
    select,
    server_version,
    settle,
)

# The reference: flexnbd 0.5.0 on this machine (issue 5), and the targets derived from it.
REFERENCE_S = {"dense": 7.3, "sparse": 10.0}
TARGET_SPEEDUP = {"dense": 5.0, "sparse": 10.0}
SPARSE_WIRE_LIMIT = 1.1  # bytes on the wire / data size

COMPLETED_RE = re.compile(
    r"migration completed: (\d+) bytes of data sent, (\d+) bytes on the wire, in ([\d.]+) s"
)
ENDGAME_RE = re.compile(r"mirror endgame: (\d+) bytes dirty")
MAP_RE = re.compile(r"allocation map: built with (\w+) in (\d+) ms")


# ---------------------------------------------------------------- counting relay


class CountingRelay:
    """A TCP relay HOST:port -> HOST:target that counts the bytes in each direction.

    Data moves with splice() through a pipe, never through Python buffers, so the relay
    costs little CPU. Every accepted connection is relayed (a retrying mirror reconnects).
    """

    def __init__(self, target: int):
        self.target = target
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.to_target = self.from_target = self.connections = 0
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((HOST, self.target))
            except OSError:
                conn.close()
                continue
            self.connections += 1
            for sock in (conn, upstream):  # forward small requests and replies at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst, up in ((conn, upstream, True), (upstream, conn, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, up), daemon=True)
                t.start()
                self.threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
        except OSError:
            pass
        try:
            while n := os.splice(src.fileno(), w, MiB):
                with self.lock:
                    if up:
                        self.to_target += n
                    else:
                        self.from_target += n
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(timeout)


# ---------------------------------------------------------------- one migration


def flexnbd_cmd(mode: str, port: int, path: Path, sock: Path) -> list[str]:
    exe = find_flexnbd()
    assert exe
    return [
        exe,
        mode,
        "--addr",
        HOST,
        "--port",
        str(port),
        "--file",
        str(path),
        "--sock",
        str(sock),
        "-v",
    ]


def fresh_destination(path: Path, size: int) -> None:
    """An empty (all-hole) file of SIZE bytes, as a new destination would have."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def raw_copy_s(src: Path, dst: Path, size: int) -> float:
    """Yardstick: sendfile() SRC into a loopback TCP socket, recv_into() and pwrite() into a
    fresh DST; seconds. The bare copy a dense migration does, without NBD and without the
    destination's final fdatasync."""
    fresh_destination(dst, size)
    with socket.create_server((HOST, 0)) as listener:
        got = [0]

        def receive() -> None:
            conn, _ = listener.accept()
            buf = bytearray(8 * MiB)
            view = memoryview(buf)
            fd = os.open(dst, os.O_WRONLY)
            try:
                with conn:
                    while n := conn.recv_into(buf):
                        k = 0
                        while k < n:
                            k += os.pwrite(fd, view[k:n], got[0] + k)
                        got[0] += n
            finally:
                os.close(fd)

        thread = threading.Thread(target=receive)
        thread.start()
        start = time.monotonic()
        with socket.create_connection(listener.getsockname()) as s, open(src, "rb") as f:
            s.sendfile(f, 0, size)
        thread.join()
        elapsed = time.monotonic() - start
    if got[0] != size:
        raise RuntimeError(f"raw copy moved {got[0]} of {size} bytes")
    return elapsed


def wait_for_log(path: Path, pattern: re.Pattern, timeout: float) -> re.Match | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(path.read_text(errors="replace"))
        if m:
            return m
        time.sleep(0.02)
    return None


def writer_command(port: int) -> list[str]:
    """fio writing random 4 KiB blocks at queue depth 1, for longer than any migration;
    the endgame cuts it off (fio then reports an error, which is expected here)."""
    return [
        "fio",
        "--name=writer",
        "--ioengine=nbd",
        f"--uri=nbd://{HOST}:{port}/",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=1",
        "--time_based",
        "--runtime=600",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]


def parse_fio(out: str) -> dict:
    """Writes done and IOPS from fio's JSON, if it printed any before it stopped."""
    start = out.find("\n{") + 1 if not out.startswith("{") else 0
    try:
        job = json.loads(out[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return {}
    w = job.get("write", {})
    return {"writes": w.get("total_ios"), "iops": w.get("iops"), "fio_error": job.get("error")}


def wait_all(servers: list[Server], timeout: float) -> dict[str, tuple[int, float]]:
    """Wait for SERVERS to exit by themselves: name -> (exit status, monotonic exit time)."""
    ended: dict[str, tuple[int, float]] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(servers) and time.monotonic() < deadline:
        for srv in servers:
            if srv.name not in ended:
                rc = srv.wait_exit(0)
                if rc is not None:
                    ended[srv.name] = (rc, time.monotonic())
        time.sleep(0.005)
    return ended


def files_equal(a: Path, b: Path) -> tuple[bool, str]:
    out = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def migrate_once(
    case: str, src: Path, dst: Path, size: int, workdir: Path, relay: bool, writer: bool
) -> dict:
    """One migration src -> dst; returns the measurements (and 'errors', a list)."""
    errors: list[str] = []
    fresh_destination(dst, size)
    settle(src)  # synced, and in the page cache, like a long-running server's file
    src_sock, dst_sock = workdir / "mig-src.sock", workdir / "mig-dst.sock"
    for s in (src_sock, dst_sock):
        s.unlink(missing_ok=True)
    src_log, dst_log = workdir / "migration-src.log", workdir / "migration-dst.log"
    for p in (src_log, dst_log):
        p.write_text("")  # one run per log, so the patterns below see only this run
    p_src, p_dst = free_port(), free_port()
    result: dict = {"case": case, "relay": relay, "writer": writer}
    fio: subprocess.Popen | None = None
    fio_out = workdir / "migration-fio.json"
    relay_obj: CountingRelay | None = None
    with (
        Server("listen", p_dst, dst, dst_log, flexnbd_cmd("listen", p_dst, dst, dst_sock)) as d,
        Server("serve", p_src, src, src_log, flexnbd_cmd("serve", p_src, src, src_sock)) as s,
    ):
        try:
            m = wait_for_log(src_log, MAP_RE, 60)
            if m:
                result["map_method"], result["map_build_ms"] = m.group(1), int(m.group(2))
            else:
                errors.append("the source's allocation map was not built within 60 s")
            if writer:
                with open(fio_out, "w") as out:
                    fio = subprocess.Popen(
                        writer_command(p_src),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                time.sleep(1.0)  # let it connect and write for a while first
                if fio.poll() is not None:
                    errors.append(f"fio writer exited early ({fio.returncode})")
            target = p_dst
            if relay:
                relay_obj = CountingRelay(p_dst)
                target = relay_obj.port
            cpu0_src, cpu0_dst = s.cpu_seconds(), d.cpu_seconds()
            cli0 = os.times()
            mirror = [
                str(find_flexnbd()),
                "mirror",
                "--addr",
                HOST,
                "--port",
                str(target),
                "--sock",
                str(src_sock),
                "--wait",
            ]
            t0 = time.monotonic()
            proc = subprocess.run(mirror, capture_output=True, text=True, timeout=900)
            result["wall_s"] = time.monotonic() - t0
            cli1 = os.times()
            result["mirror_cli_cpu_s"] = (cli1.children_user + cli1.children_system) - (
                cli0.children_user + cli0.children_system
            )
            result["mirror_rc"] = proc.returncode
            result["mirror_output"] = (proc.stdout + proc.stderr).strip()[-2000:]
            if proc.returncode != 0:
                errors.append(f"mirror --wait exited {proc.returncode}: {result['mirror_output']}")
            # Both ends exit by themselves after a completed migration (action exit); the
            # destination only after it has synced the file (fdatasync) to the disk.
            ended = wait_all([s, d], 120)
            rc_src, rc_dst = (ended[x.name][0] if x.name in ended else None for x in (s, d))
            result["src_exit"], result["dst_exit"] = rc_src, rc_dst
            if d.name in ended:
                result["dst_exited_s"] = ended[d.name][1] - t0
            if rc_src != 0 or rc_dst != 0:
                errors.append(f"exit status: source {rc_src}, destination {rc_dst} (want 0, 0)")
            result["src_cpu_s"] = s.cpu_seconds() - cpu0_src
            result["dst_cpu_s"] = d.cpu_seconds() - cpu0_dst
            result["src_cpu_total_s"], result["dst_cpu_total_s"] = s.cpu_seconds(), d.cpu_seconds()
        finally:
            if fio is not None:
                try:
                    fio.wait(30)  # cut off by the endgame, it ends by itself
                except subprocess.TimeoutExpired:
                    errors.append("fio writer still running 30 s after the migration; killed")
                    fio.kill()
                    fio.wait()
            if relay_obj is not None:
                relay_obj.close()
    # The Server context managers have stopped anything still running (by PID).
    text = src_log.read_text(errors="replace")
    m = COMPLETED_RE.search(text)
    if m:
        result["data_bytes"], result["wire_bytes"] = int(m.group(1)), int(m.group(2))
        result["src_reported_s"] = float(m.group(3))
    else:
        errors.append("no 'migration completed' line in the source's log")
    m = ENDGAME_RE.search(text)
    if m:
        result["endgame_dirty_bytes"] = int(m.group(1))
    result["failed_attempts"] = text.count("mirror attempt failed")
    if result["failed_attempts"]:
        errors.append(f"{result['failed_attempts']} failed mirror attempt(s): see {src_log}")
    if relay_obj is not None:
        result["relay_to_dst_bytes"] = relay_obj.to_target
        result["relay_from_dst_bytes"] = relay_obj.from_target
        result["relay_connections"] = relay_obj.connections
    if fio is not None:
        result["fio_rc"] = fio.returncode  # nonzero expected: the endgame disconnected it
        result.update(parse_fio(fio_out.read_text(errors="replace")))
    equal, detail = files_equal(src, dst)
    result["identical"] = equal
    if not equal:
        errors.append(f"destination differs from source: {detail}")
    result["dst_allocated_bytes"] = allocated_bytes(dst)
    result["src_allocated_bytes"] = allocated_bytes(src)
    result["errors"] = errors
    return result


# ---------------------------------------------------------------- report


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(case: str, runs: list[dict], data_size: int) -> dict:
    keys = (
        "wall_s",
        "dst_exited_s",
        "src_reported_s",
        "wire_bytes",
        "data_bytes",
        "src_cpu_s",
        "dst_cpu_s",
        "endgame_dirty_bytes",
        "writes",
        "dst_allocated_bytes",
    )
    out: dict = {k: median(runs, k) for k in keys}
    out["samples_wall_s"] = [r.get("wall_s") for r in runs]
    out["runs"] = len(runs)
    out["ok"] = sum(1 for r in runs if not r["errors"])
    out["data_size"] = data_size
    if case in REFERENCE_S and out["wall_s"]:
        out["speedup"] = REFERENCE_S[case] / out["wall_s"]
        out["target_speedup"] = TARGET_SPEEDUP[case]
    return out


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def table(summary: dict) -> str:
    head = [
        "case",
        "runs ok",
        "wall s (median)",
        "wall s samples",
        "source's own s",
        "destination exited s",
        "wire MiB",
        "data MiB",
        "wire / data",
        "CPU s source",
        "CPU s destination",
        "destination allocated MiB",
        "vs 0.5.0 (target)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, s in summary.items():
        ratio = s["wire_bytes"] / s["data_size"] if s["wire_bytes"] else None
        vs = f"{s['speedup']:.1f}x ({s['target_speedup']:.0f}x)" if s.get("speedup") else "-"
        samples = " / ".join(fmt(w) for w in s["samples_wall_s"] if w is not None)
        lines.append(
            "| "
            + " | ".join(
                [
                    case,
                    f"{s['ok']}/{s['runs']}",
                    fmt(s["wall_s"]),
                    samples,
                    fmt(s["src_reported_s"]),
                    fmt(s["dst_exited_s"]),
                    mib(s["wire_bytes"]),
                    mib(s["data_size"]),
                    f"{ratio:.3f}" if ratio else "-",
                    fmt(s["src_cpu_s"]),
                    fmt(s["dst_cpu_s"]),
                    mib(s["dst_allocated_bytes"]),
                    vs,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main

CASES = ("dense", "sparse", "writes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the files live")
    p.add_argument("--cases", help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--dense-size", default="1G", help="dense and writes cases (default 1G)")
    p.add_argument("--sparse-size", default="4G", help="sparse case file size (default 4G)")
    p.add_argument("--sparse-data", default="256M", help="data in it (default 256M)")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (default 3)")
    p.add_argument("--no-relay", action="store_true", help="skip the counting-relay run")
    p.add_argument("--no-raw", action="store_true", help="skip the raw TCP copy yardstick")
    p.add_argument("--json", help="results file (default WORKDIR/results-migration.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = select(args.cases, list(CASES), {})
    if not find_flexnbd():
        raise SystemExit("flexnbd not found (run `make install`)")
    if "writes" in cases and not shutil.which("fio"):
        log("fio not found: skipping the 'writes' case")
        cases.remove("writes")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else workdir / "results-migration.json"
    dense_size = parse_size(args.dense_size)
    sparse_size, sparse_data = parse_size(args.sparse_size), parse_size(args.sparse_data)
    dense = workdir / f"data-{dense_size}.img"
    sparse = workdir / f"sparse-{sparse_size}-{sparse_data}.img"
    if {"dense", "writes"} & set(cases):
        make_data_file(dense, dense_size)
    if "sparse" in cases:
        make_sparse_file(sparse, sparse_size, sparse_data)
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "git_head": git_head(),
        "flexnbd": server_version("flexnbd"),
        "repeat": args.repeat,
        "loadavg_start": os.getloadavg(),
        "runs": [],
        "relay_runs": [],
        "raw_copy_s": [],
        "errors": [],
    }
    log(f"load average {report['loadavg_start'][0]:.2f} before starting")
    copy = workdir / "mig-src-writes.img"  # the writes case changes its source: a copy
    dst = workdir / "mig-dst.img"
    plan = [(rep, case, False) for rep in range(args.repeat) for case in cases]
    if not args.no_relay:
        plan += [(args.repeat, case, True) for case in cases]
    try:
        for rep, case, relay in plan:
            src, size = (sparse, sparse_size) if case == "sparse" else (dense, dense_size)
            if case == "writes":
                shutil.copyfile(dense, copy)
                src = copy
            what = "relay run" if relay else f"run {rep + 1}/{args.repeat}"
            if case == "dense" and not relay and not args.no_raw:
                settle(src)
                raw = raw_copy_s(src, dst, size)
                report["raw_copy_s"].append(raw)
                log(f"raw TCP copy of {mib(size)} MiB into a fresh file: {raw:.2f} s")
            log(f"{case} ({what}) ...")
            r = migrate_once(case, src, dst, size, workdir, relay, case == "writes")
            r["loadavg"] = os.getloadavg()
            (report["relay_runs"] if relay else report["runs"]).append(r)
            log(
                f"  {fmt(r.get('wall_s'))} s, {mib(r.get('wire_bytes'))} MiB on the wire"
                + (f" (relay: {mib(r.get('relay_to_dst_bytes'))} MiB)" if relay else "")
                + f", CPU {fmt(r.get('src_cpu_s'))} s source / {fmt(r.get('dst_cpu_s'))} s "
                f"destination, identical: {r['identical']}"
                + (f", {r.get('writes')} writes by fio" if case == "writes" else "")
            )
            for e in r["errors"]:
                log(f"  ERROR: {e}")
                report["errors"].append(f"{case} ({what}): {e}")
    finally:
        copy.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    report["loadavg_end"] = os.getloadavg()
    data_sizes = {"dense": dense_size, "writes": dense_size, "sparse": sparse_data}
    summary = {
        case: summarize(case, [r for r in report["runs"] if r["case"] == case], data_sizes[case])
        for case in cases
    }
    report["summary"] = summary

    print(table(summary))
    print()
    for case, s in summary.items():
        if s.get("speedup"):
            met = s["speedup"] >= s["target_speedup"]
            line = (
                f"{case}: {s['speedup']:.1f}x faster than 0.5.0's {REFERENCE_S[case]} s "
                f"(target {s['target_speedup']:.0f}x: {'met' if met else 'MISSED'})"
            )
            if case == "sparse" and s["wire_bytes"]:
                ratio = s["wire_bytes"] / s["data_size"]
                ok = ratio <= SPARSE_WIRE_LIMIT
                line += (
                    f"; wire/data {ratio:.3f} (target <= {SPARSE_WIRE_LIMIT}: "
                    f"{'met' if ok else 'MISSED'})"
                )
            print(line)
        if case == "writes":
            print(
                f"writes: fio wrote {fmt(s['writes'])} 4 KiB blocks per run (median), "
                f"{mib(s['endgame_dirty_bytes'])} MiB dirty at the endgame"
            )
    if report["raw_copy_s"]:
        raw = report["raw_copy_s"]
        print(
            f"yardstick: raw TCP copy (sendfile -> recv_into + pwrite) of {mib(dense_size)} MiB "
            f"into a fresh file: median {statistics.median(raw):.2f} s "
            f"({' / '.join(f'{x:.2f}' for x in raw)}), run before each dense migration"
        )
    for r in report["relay_runs"]:
        print(
            f"relay check, {r['case']}: the relay counted {r.get('relay_to_dst_bytes'):,} bytes "
            f"to the destination ({r.get('relay_connections')} connection(s)), the source "
            f"logged {r.get('wire_bytes') or 0:,}; {r.get('relay_from_dst_bytes'):,} bytes "
            f"back"
        )
    return finish_report(report, json_path)


if __name__ == "__main__":
    run_script(main)

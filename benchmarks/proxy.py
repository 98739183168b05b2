#!/usr/bin/env python3
"""Benchmark flexnbd-proxy: fio through the proxy vs fio straight to the same server.

One `flexnbd serve` and one `flexnbd-proxy` in front of it, started fresh for every sample
of every row; fio runs once against the server's port, once against the proxy's and once
through a bare splice relay (no NBD, the yardstick for one more hop), in rotating order, so
background load hits all alike. The table shows, per row, the median of each side, the
median of the per-sample ratios proxy / direct and their range, relay / direct, and the
proxy's CPU seconds per GiB. Then the pause test: a small client reads through the
proxy while the upstream server is killed (SIGKILL, then SIGTERM) and restarted on the
same port; measured is the time from the restarted server serving to the client's first
completed request. And the sparse copy: `nbdcopy` of a sparse file through the proxy and
straight to the server (structured replies and base:allocation pass through the proxy, so
nbdcopy skips the holes either way), timed, with the bytes that crossed the wire to nbdcopy
and the blocks the copy allocated. See benchmarks/README.md.

Exit status 1 on any error (a fio failure, a server or proxy that dies or exits non-zero on
SIGTERM, a pause client that gets an error, a disconnect or wrong data); a row under 0.8x is
marked ("<< 0.80"), not an error. --quick: a small run for CI (`make bench-ci`).

Standard library only; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import os
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    HOST,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    RATIO_MARK,
    ClientError,
    CountingRelay,
    GiB,
    LoggedServer,
    Server,
    default_json,
    find_flexnbd,
    find_proxy,
    finish_report,
    flexnbd_cmd,
    fmt,
    free_port,
    git_head,
    log,
    log_lines,
    log_time,
    machine_info,
    make_data_file,
    make_sparse_file,
    nbd_greet,
    nbd_option,
    parse_size,
    proxy_cmd,
    ratio_text,
    recv_exact,
    run_script,
    select,
    server_version,
    settle,
    size_text,
)
from run import ROWS, WARMUP_SHARE, children_cpu, run_fio

# The rows of run.py measured here (same fio jobs), in this order.
PROXY_ROWS = [
    "fio seq read 1M qd16",
    "fio seq write 1M qd16",
    "fio rand read 4k qd1",
    "fio rand read 4k qd32",
]
ROW_ALIASES = {
    "seqread": "fio seq read 1M qd16",
    "seqwrite": "fio seq write 1M qd16",
    "randread1": "fio rand read 4k qd1",
    "randread32": "fio rand read 4k qd32",
}
TARGET_RATIO = RATIO_MARK  # through the proxy, at least this fraction of the direct figure
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}

# ---------------------------------------------------------------- throughput


def run_side(server: Server, proxy: Server, port: int, row: dict, runtime: float) -> dict:
    """One fio job against PORT (the server's, the proxy's or the relay's); value and CPU
    per GiB (relay: this process, whose threads run the relay while fio runs)."""
    cpu_server, cpu_proxy, cpu_client = server.cpu_seconds(), proxy.cpu_seconds(), children_cpu()
    cpu_relay = time.process_time()
    result = run_fio(port, row, runtime)
    gib = result["bytes"] / GiB

    def per_gib(seconds: float) -> float | None:
        return seconds / gib if gib else None

    return {
        "value": result["value"],
        "bytes": result["bytes"],
        "server_cpu_s_per_gib": per_gib(server.cpu_seconds() - cpu_server),
        "proxy_cpu_s_per_gib": per_gib(proxy.cpu_seconds() - cpu_proxy),
        "client_cpu_s_per_gib": per_gib(children_cpu() - cpu_client),
        "relay_cpu_s_per_gib": per_gib(time.process_time() - cpu_relay),
        "command": result["command"],
    }


def measure_sample(
    row: str, order: list[str], data: Path, args: argparse.Namespace, workdir: Path
) -> dict:
    """A fresh server and proxy, warmed up as run.py warms its servers up (the row's fio job
    for WARMUP_SHARE of the runtime, thrown away; through the proxy, which passes it on to
    the server); then fio direct, through the proxy and (if in ORDER) through a bare splice
    relay to the same server, in ORDER."""
    settle(data)
    sport, pport = free_port(), free_port()
    slog, plog = workdir / "proxy-bench-server.log", workdir / "proxy-bench-proxy.log"
    sample: dict = {"order": list(order)}
    with (
        LoggedServer("flexnbd", sport, data, slog, flexnbd_cmd("serve", sport, data)) as server,
        LoggedServer("flexnbd-proxy", pport, data, plog, proxy_cmd(pport, sport, args.cache)) as px,
    ):
        ports = {"warm-up": px.port, "direct": server.port, "proxy": px.port}
        for how in ["warm-up", *order]:
            relay = CountingRelay(server.port) if how == "relay" else None
            port = relay.port if relay else ports[how]
            runtime = args.runtime * (WARMUP_SHARE if how == "warm-up" else 1)
            try:
                result = run_side(server, px, port, ROWS[row], runtime)
                if how != "warm-up":  # the warm-up is thrown away
                    sample[how] = result
            except ClientError as e:
                raise ClientError(
                    f"{how}: {e}\n--- flexnbd-proxy log tail:\n{px.log_tail()}"
                    f"\n--- flexnbd serve log tail:\n{server.log_tail()}"
                ) from None
            finally:
                if relay is not None:
                    relay.close()
        for who in (px, server):
            if not who.alive():
                assert who.proc is not None
                raise ClientError(
                    f"{who.name} died during the run (exit {who.proc.returncode})\n"
                    + who.log_tail()
                )
        sample["proxy_exit"] = px.stop()
        sample["server_exit"] = server.stop()
    sample["ratio"] = sample["proxy"]["value"] / sample["direct"]["value"]
    if "relay" in sample:
        sample["relay_ratio"] = sample["relay"]["value"] / sample["direct"]["value"]
    return sample


def summarize_row(row: str, samples: list[dict]) -> dict:
    def med(side: str, key: str) -> float | None:
        values = [s[side][key] for s in samples if side in s and s[side][key] is not None]
        return statistics.median(values) if values else None

    ratios = [s["ratio"] for s in samples]
    relay_ratios = [s["relay_ratio"] for s in samples if "relay_ratio" in s]
    return {
        "unit": ROWS[row]["unit"],
        "samples": len(samples),
        "direct": med("direct", "value"),
        "proxy": med("proxy", "value"),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratios": ratios,
        "direct_samples": [s["direct"]["value"] for s in samples],
        "proxy_samples": [s["proxy"]["value"] for s in samples],
        "proxy_cpu_s_per_gib": med("proxy", "proxy_cpu_s_per_gib"),
        "server_cpu_s_per_gib_direct": med("direct", "server_cpu_s_per_gib"),
        "server_cpu_s_per_gib_proxied": med("proxy", "server_cpu_s_per_gib"),
        "client_cpu_s_per_gib_direct": med("direct", "client_cpu_s_per_gib"),
        "client_cpu_s_per_gib_proxied": med("proxy", "client_cpu_s_per_gib"),
        "target_met": statistics.median(ratios) >= TARGET_RATIO,
        # The yardstick: a bare splice relay (no NBD), i.e. the price of one more hop.
        "relay": med("relay", "value"),
        "relay_ratio": statistics.median(relay_ratios) if relay_ratios else None,
        "relay_ratio_min": min(relay_ratios, default=None),
        "relay_ratio_max": max(relay_ratios, default=None),
        "relay_samples": [s["relay"]["value"] for s in samples if "relay" in s],
        "relay_cpu_s_per_gib": med("relay", "relay_cpu_s_per_gib"),
    }


def table(rows: dict) -> str:
    relay = any(s["relay_ratio"] is not None for s in rows.values())
    head = [
        "row", "unit", "direct", "through proxy", "proxy / direct", "min-max of ratios",
        "CPU s/GiB proxy", "CPU s/GiB server (direct / proxied)",
        "CPU s/GiB fio (direct / proxied)",
    ]  # fmt: skip
    if relay:
        head += ["bare relay / direct (min-max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, s in rows.items():
        ratio = ratio_text(s["ratio"], TARGET_RATIO)
        cells = [
            row, s["unit"], fmt(s["direct"]), fmt(s["proxy"]), ratio,
            f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f}", fmt(s["proxy_cpu_s_per_gib"]),
            f"{fmt(s['server_cpu_s_per_gib_direct'])} / {fmt(s['server_cpu_s_per_gib_proxied'])}",
            f"{fmt(s['client_cpu_s_per_gib_direct'])} / {fmt(s['client_cpu_s_per_gib_proxied'])}",
        ]  # fmt: skip
        if relay:
            cells.append(
                f"{s['relay_ratio']:.2f} ({s['relay_ratio_min']:.2f}-{s['relay_ratio_max']:.2f})"
                if s["relay_ratio"] is not None
                else "-"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- pause


def nbd_connect(port: int) -> socket.socket:
    """Fixed-newstyle handshake, NBD_OPT_GO on the default export, no structured replies
    (so every READ gets a simple reply); a socket in transmission phase."""
    s = socket.create_connection((HOST, port), timeout=120)
    try:
        nbd_greet(s)
        rtype = nbd_option(s, 7, struct.pack(">IH", 0, 0))  # GO, no name, no requests
        if rtype != 1:  # not NBD_REP_ACK: an error
            raise ConnectionError(f"NBD_OPT_GO refused ({rtype:#x})")
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    except BaseException:
        s.close()
        raise


class ReadLoop(threading.Thread):
    """4 KiB READs at random offsets, one at a time, with INTERVAL s between them; records
    when each completed (time.monotonic()) and checks its bytes against the file."""

    def __init__(self, port: int, path: Path, size: int, interval: float):
        super().__init__(name="read-loop", daemon=True)
        self.port, self.path, self.size, self.interval = port, path, size, interval
        self.done: list[float] = []  # completion times, in order
        self.mismatches = 0
        self.error: str | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        rnd = random.Random(2)
        cookie = 0
        try:
            with nbd_connect(self.port) as s:
                while not self.stopping.is_set():
                    offset = rnd.randrange(self.size // 4096) * 4096
                    cookie += 1
                    s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, cookie, offset, 4096))
                    magic, err, got = struct.unpack(">IIQ", recv_exact(s, 16))
                    if magic != NBD_SIMPLE_REPLY_MAGIC or got != cookie:
                        raise ConnectionError(f"bad reply: magic {magic:#x}, cookie {got}")
                    if err:
                        raise ConnectionError(f"READ at {offset} failed with error {err}")
                    data = recv_exact(s, 4096)
                    self.done.append(time.monotonic())
                    if data != os.pread(fd, 4096, offset):
                        self.mismatches += 1
                    if self.interval:
                        time.sleep(self.interval)
                s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 2, 0, 0, 0))  # DISC
        except Exception as e:  # reported by the main thread
            self.error = f"{type(e).__name__}: {e} (after {len(self.done)} reads)"
        finally:
            os.close(fd)

    def first_after(self, t: float) -> float | None:
        done = self.done[:]
        i = bisect.bisect_left(done, t)
        return done[i] if i < len(done) else None

    def last_before(self, t: float) -> float | None:
        done = self.done[:]
        i = bisect.bisect_left(done, t)
        return done[i - 1] if i else None


def pause_test(data: Path, size: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One proxy with a reading client; the upstream server is stopped with each signal of
    the plan, restarted on the same port after --downtime s, and the client's pause
    measured."""
    plan = [sig for _ in range(args.pauses) for sig in args.pause_signals]
    settle(data)
    sport, pport = free_port(), free_port()
    slog, plog = workdir / "proxy-pause-server.log", workdir / "proxy-pause-proxy.log"
    for p in (slog, plog):
        p.write_text("")
    events: list[dict] = []
    errors: list[str] = []
    scmd = flexnbd_cmd("serve", sport, data)
    upstream = LoggedServer("flexnbd", sport, data, slog, scmd).__enter__()
    reader: ReadLoop | None = None
    try:
        with LoggedServer("flexnbd-proxy", pport, data, plog, proxy_cmd(pport, sport, None)) as px:
            reader = ReadLoop(px.port, data, size, args.interval)
            reader.start()
            for n, sig in enumerate(plan):
                time.sleep(args.steady)  # reads flow through the proxy for a while
                if reader.error or not reader.is_alive():
                    errors.append(f"pause client failed before event {n + 1}: {reader.error}")
                    break
                before = len(reader.done)
                t_stop = time.monotonic()
                assert upstream.proc is not None
                upstream.proc.send_signal(SIGNALS[sig])
                rc = upstream.proc.wait(15)
                upstream.stop()  # reaped already: closes its log
                time.sleep(max(0.0, t_stop + args.downtime - time.monotonic()))
                t_start = time.monotonic()
                upstream = LoggedServer("flexnbd", sport, data, slog, scmd)
                upstream.__enter__()
                t_serving = log_time(slog, " serving ") or time.monotonic()
                deadline = time.monotonic() + 60
                while reader.first_after(t_serving) is None and time.monotonic() < deadline:
                    if reader.error:
                        break
                    time.sleep(0.005)
                first = reader.first_after(t_serving)
                last = reader.last_before(t_stop)
                t_lost = log_time(plog, "upstream", t_stop)
                t_back = log_time(plog, "reconnected", t_stop)
                ev = {
                    "signal": sig,
                    "server_exit": rc,
                    "reads_before": before,
                    "server_start_to_serving_s": t_serving - t_start,
                    "stop_to_serving_s": t_serving - t_stop,
                    "pause_s": first - t_serving if first else None,
                    "reconnected_after_serving_s": t_back - t_serving if t_back else None,
                    "first_read_after_reconnected_s": first - t_back if first and t_back else None,
                    "proxy_noticed_s": t_lost - t_stop if t_lost else None,
                    "client_stall_s": first - last if first and last else None,
                    "reads_between_stop_and_serving": len(
                        [t for t in reader.done[before:] if t_stop <= t < t_serving]
                    ),
                }
                events.append(ev)
                log(
                    f"  {sig}: serving again {ev['stop_to_serving_s']:.2f} s after the signal; "
                    f"first read completed {fmt(ev['pause_s'])} s after that "
                    f"(client stalled {fmt(ev['client_stall_s'])} s)"
                )
                if first is None:
                    errors.append(f"{sig} event {n + 1}: no read completed within 60 s")
                    break
                if (sig == "SIGTERM") and rc != 0:
                    errors.append(f"{sig} event {n + 1}: flexnbd serve exited {rc}")
            reader.stopping.set()
            reader.join(30)
            if reader.error:
                errors.append(f"pause client: {reader.error}")
            if reader.mismatches:
                errors.append(f"pause client: {reader.mismatches} READs returned wrong data")
            proxy_exit = px.stop()
            if proxy_exit != 0:
                errors.append(f"flexnbd-proxy exited {proxy_exit} on SIGTERM")
            if not any("reconnected" in line for _, line in log_lines(plog)):
                errors.append("the proxy never logged 'reconnected'")
    finally:
        if reader is not None:
            reader.stopping.set()
        upstream.stop()
    summary = {}
    for sig in args.pause_signals:
        pauses = [e["pause_s"] for e in events if e["signal"] == sig and e["pause_s"] is not None]
        stalls = [e["client_stall_s"] for e in events if e["signal"] == sig and e["client_stall_s"]]
        if pauses:
            summary[sig] = {
                "events": len(pauses),
                "pause_s_median": statistics.median(pauses),
                "pause_s_min": min(pauses),
                "pause_s_max": max(pauses),
                "stall_s_median": statistics.median(stalls) if stalls else None,
                "stall_s_min": min(stalls, default=None),
                "stall_s_max": max(stalls, default=None),
            }
    return {
        "downtime_s": args.downtime,
        "interval_s": args.interval,
        "reads": len(reader.done) if reader else 0,
        "events": events,
        "summary": summary,
        "errors": errors,
    }


# ---------------------------------------------------------------- the sparse copy


def served_with_map(name: str, port: int, path: Path, logpath: Path, cmd: list[str]):
    """A LoggedServer that is ready once its allocation map is built too (before that,
    BLOCK_STATUS calls every byte data, and the copy would not be sparse)."""
    server = LoggedServer(name, port, path, logpath, cmd)
    server.__enter__()
    deadline = time.monotonic() + 120
    while log_time(logpath, "allocation map: built") is None:
        if time.monotonic() > deadline or not server.alive():
            server.stop()
            raise RuntimeError(f"{name}: no allocation map after 120 s\n{server.log_tail()}")
        time.sleep(0.05)
    return server


def copy_once(port: int, dest: Path, counted: bool) -> dict:
    """nbdcopy the export at PORT into a fresh DEST: seconds, the bytes that reached nbdcopy
    (counted through a CountingRelay, in an untimed copy, when COUNTED), blocks allocated."""
    dest.unlink(missing_ok=True)
    relay = CountingRelay(port) if counted else None
    try:
        start = time.monotonic()
        res = subprocess.run(["nbdcopy", f"nbd://{HOST}:{relay.port if relay else port}",
                              str(dest)], capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - start
    finally:
        if relay is not None:
            relay.close()
    if res.returncode != 0:
        raise ClientError(f"nbdcopy exited {res.returncode}: {res.stderr.strip()}")
    out = {"s": seconds, "allocated": dest.stat().st_blocks * 512}
    if relay is not None:
        out["wire"] = relay.from_target
    return out


def sparse_copy(args: argparse.Namespace, workdir: Path) -> dict:
    """The sparse nbdcopy row: ARGS.repeat samples of direct and through the proxy, in
    rotating order, against one server and one proxy; then one counted copy each."""
    size, data = parse_size(args.sparse_size), parse_size(args.sparse_data)
    path = workdir / f"sparse-{size}-{data}.img"
    make_sparse_file(path, size, data)
    sport, pport = free_port(), free_port()
    slog, plog = workdir / "proxy-sparse-server.log", workdir / "proxy-sparse-proxy.log"
    dest = workdir / "proxy-sparse-copy.img"
    samples: list[dict] = []
    errors: list[str] = []
    server = served_with_map("flexnbd", sport, path, slog, flexnbd_cmd("serve", sport, path))
    try:
        with LoggedServer("flexnbd-proxy", pport, path, plog, proxy_cmd(pport, sport, None)) as px:
            ports = {"direct": sport, "proxy": pport}
            for rep in range(args.repeat):
                order = ["direct", "proxy"] if rep % 2 == 0 else ["proxy", "direct"]
                sample = {how: copy_once(ports[how], dest, False) for how in order}
                sample["ratio"] = sample["direct"]["s"] / sample["proxy"]["s"]
                samples.append(sample)
                log(f"  sparse nbdcopy sample {rep + 1}: direct {sample['direct']['s']:.2f} s, "
                    f"proxy {sample['proxy']['s']:.2f} s: {sample['ratio']:.2f}")
            counted = {how: copy_once(ports[how], dest, True) for how in ("direct", "proxy")}
            if subprocess.run(["cmp", "-s", str(path), str(dest)]).returncode != 0:
                errors.append("the sparse copy through the proxy differs from the file")
            if px.stop() != 0:
                errors.append("flexnbd-proxy exited non-zero on SIGTERM (sparse copy)")
    finally:
        server.stop()
        dest.unlink(missing_ok=True)
    ratios = [s["ratio"] for s in samples]
    return {
        "size": size,
        "data": data,
        "samples": samples,
        "direct_s": statistics.median(s["direct"]["s"] for s in samples),
        "proxy_s": statistics.median(s["proxy"]["s"] for s in samples),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "wire_direct": counted["direct"]["wire"],
        "wire_proxy": counted["proxy"]["wire"],
        "allocated_direct": counted["direct"]["allocated"],
        "allocated_proxy": counted["proxy"]["allocated"],
        "errors": errors,
    }


def sparse_table(c: dict) -> str:
    mib = 1 << 20
    return "\n".join([
        "| sparse nbdcopy | direct | through the proxy | proxy / direct |",
        "|---|---|---|---|",
        f"| {size_text(c['size'])} file, {size_text(c['data'])} of data: seconds (median) | "
        f"{c['direct_s']:.2f} | {c['proxy_s']:.2f} | {c['ratio']:.2f}x speed "
        f"({c['ratio_min']:.2f}-{c['ratio_max']:.2f}) |",
        f"| MiB on the wire to nbdcopy | {c['wire_direct'] / mib:.1f} | "
        f"{c['wire_proxy'] / mib:.1f} | {c['wire_proxy'] / max(c['wire_direct'], 1):.2f} |",
        f"| MiB allocated by the copy | {c['allocated_direct'] / mib:.1f} | "
        f"{c['allocated_proxy'] / mib:.1f} | "
        f"{c['allocated_proxy'] / max(c['allocated_direct'], 1):.2f} |",
    ])  # fmt: skip


def pause_table(pause: dict) -> str:
    head = [
        "upstream stopped with", "events", "pause s: median (min-max)",
        "client stall s: median (min-max)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sig, s in pause["summary"].items():
        lines.append(
            f"| {sig} | {s['events']} | {s['pause_s_median']:.3f} ({s['pause_s_min']:.3f}-"
            f"{s['pause_s_max']:.3f}) | {fmt(s['stall_s_median'])} ({fmt(s['stall_s_min'])}-"
            f"{fmt(s['stall_s_max'])}) |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


QUICK = {"size": "256M", "runtime": 2, "repeat": 1, "pauses": 1, "sparse_size": "1G",
         "sparse_data": "64M"}
FULL = {"size": "1G", "runtime": 5, "repeat": 3, "pauses": 3, "sparse_size": "8G",
        "sparse_data": "512M"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the data file lives")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small run for CI: 256M file, 2 s per fio job, 1 sample, 1 pause per signal",
    )
    p.add_argument("--size", help="data file size (default 1G)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 5)")
    p.add_argument("--repeat", type=int, help="samples per row (default 3)")
    p.add_argument("--rows", help="comma-separated rows (aliases: " + ", ".join(ROW_ALIASES) + ")")
    p.add_argument(
        "--cache",
        help="run the proxy with --cache=BYTES for the fio rows (default: no --cache, off)",
    )
    p.add_argument("--pauses", type=int, help="stops per signal (default 3)")
    p.add_argument("--pause-signals", default="SIGKILL,SIGTERM", help="default SIGKILL,SIGTERM")
    p.add_argument(
        "--downtime", type=float, default=1.0, help="s from stopping to restarting (default 1)"
    )
    p.add_argument("--steady", type=float, default=1.0, help="s of reads before each stop")
    p.add_argument(
        "--interval", type=float, default=0.001, help="s between the pause client's reads"
    )
    p.add_argument("--sparse-size", help="the sparse copy's file size (default 8G)")
    p.add_argument("--sparse-data", help="... and its data, in scattered MiB (default 512M)")
    p.add_argument("--no-sparse", action="store_true", help="skip the sparse nbdcopy row")
    p.add_argument("--no-relay", action="store_true", help="skip the bare splice relay yardstick")
    p.add_argument("--no-fio", action="store_true", help="only the pause test")
    p.add_argument("--no-pause", action="store_true", help="only the fio rows")
    p.add_argument(
        "--json",
        help="results file (default benchmarks/results/proxy.json; --quick: "
        "benchmarks/out/proxy-quick.json)",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = select(args.rows, PROXY_ROWS, ROW_ALIASES)
    args.pause_signals = select(args.pause_signals, list(SIGNALS), {})
    if not find_flexnbd() or not find_proxy():
        raise SystemExit("flexnbd or flexnbd-proxy not found (run `make install`)")
    if not args.no_fio and not shutil.which("fio"):
        log("fio not found: skipping the fio rows")
        args.no_fio = True
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else default_json("proxy", args.quick)
    size = parse_size(args.size)
    data = workdir / f"data-{size}.img"
    make_data_file(data, size)
    report: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "git_head": git_head(),
        "flexnbd": server_version("flexnbd"),
        "size": size,
        "runtime": args.runtime,
        "repeat": args.repeat,
        "quick": args.quick,
        "proxy_cache": args.cache or "off (no --cache)",
        "commands": {
            "server": " ".join(flexnbd_cmd("serve", 0, data)).replace("--port 0", "--port S"),
            "proxy": " ".join(proxy_cmd(0, 0, args.cache))
            .replace("--port 0 ", "--port P ")
            .replace("--conn-port 0", "--conn-port S"),
        },
        "loadavg_start": os.getloadavg(),
        "samples": {},
        "rows": {},
        "errors": [],
    }
    log(f"load average {report['loadavg_start'][0]:.2f} before starting")
    if not args.no_fio:
        # Row-major; which side goes first rotates from one sample to the next.
        sides = ["direct", "proxy"] if args.no_relay else ["direct", "proxy", "relay"]
        for rep in range(args.repeat):
            for i, row in enumerate(rows):
                k = (rep + i) % len(sides)
                order = sides[k:] + sides[:k]
                log(f"{row} (sample {rep + 1}/{args.repeat}, order {', '.join(order)})")
                try:
                    sample = measure_sample(row, order, data, args, workdir)
                except (ClientError, RuntimeError, subprocess.TimeoutExpired) as e:
                    log(f"  ERROR: {e}")
                    report["errors"].append(f"{row}: {e}")
                    continue
                report["samples"].setdefault(row, []).append(sample)
                log(
                    f"  direct {fmt(sample['direct']['value'])}, proxy "
                    f"{fmt(sample['proxy']['value'])} {ROWS[row]['unit']}: "
                    f"{sample['ratio']:.2f}; proxy CPU "
                    f"{fmt(sample['proxy']['proxy_cpu_s_per_gib'])} s/GiB"
                    + (
                        f"; bare relay {fmt(sample['relay']['value'])}: {sample['relay_ratio']:.2f}"
                        if "relay" in sample
                        else ""
                    )
                )
                for who in ("proxy", "server"):
                    if sample[f"{who}_exit"] != 0:  # both promise exit 0 on SIGTERM
                        report["errors"].append(
                            f"{row}: {who} exit status {sample[f'{who}_exit']} on SIGTERM"
                        )
        for row in rows:
            if report["samples"].get(row):
                report["rows"][row] = summarize_row(row, report["samples"][row])
    if not args.no_pause:
        log(
            f"pause test: {args.pauses} x {', '.join(args.pause_signals)}, upstream restarted "
            f"{args.downtime} s after each stop"
        )
        try:
            report["pause"] = pause_test(data, size, args, workdir)
            report["errors"] += report["pause"]["errors"]
        except (ClientError, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            log(f"  ERROR: {e}")
            report["errors"].append(f"pause test: {e}")
    if not args.no_sparse and shutil.which("nbdcopy"):
        log(f"sparse nbdcopy: {args.repeat} sample(s) direct and through the proxy")
        try:
            report["sparse_copy"] = sparse_copy(args, workdir)
            report["errors"] += report["sparse_copy"]["errors"]
        except (ClientError, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            log(f"  ERROR: {e}")
            report["errors"].append(f"sparse nbdcopy: {e}")
    elif not args.no_sparse:
        log("nbdcopy not found: skipping the sparse copy")
    report["loadavg_end"] = os.getloadavg()

    out = [
        f"{report['git_head']}, {size_text(size)} file, {args.runtime} s per fio job, "
        f"{args.repeat} sample(s) per row, proxy cache {report['proxy_cache']}; load "
        f"{report['loadavg_start'][0]:.2f} → {report['loadavg_end'][0]:.2f}",
    ]
    if report["rows"]:
        out += ["", table(report["rows"]), ""]
        for row, s in report["rows"].items():
            if not s["target_met"]:
                relay = (
                    f" (the bare relay: {s['relay_ratio']:.2f}x)"
                    if s["relay_ratio"] is not None
                    else ""
                )
                out.append(
                    f"{row}: {s['ratio']:.2f}x through the proxy << {TARGET_RATIO:.2f}{relay}"
                )
        if all(s["target_met"] for s in report["rows"].values()):
            out.append(f"every row at least {TARGET_RATIO}x through the proxy (median of ratios)")
    if report.get("pause", {}).get("summary"):
        out += ["", pause_table(report["pause"])]
        out.append(
            f"\npause: from the restarted server logging ' serving ' to the first READ "
            f"completed through the proxy; stall: the client's gap between completed READs "
            f"around the event ({report['pause']['reads']:,} READs in all)"
        )
    if report.get("sparse_copy"):
        out += ["", sparse_table(report["sparse_copy"])]
    report["markdown"] = "\n".join(out)
    print(report["markdown"])
    return finish_report(report, json_path)


if __name__ == "__main__":
    run_script(main)

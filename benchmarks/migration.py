#!/usr/bin/env python3
"""Benchmark flexnbd's live migration: a mirror from a serve to a listen server.

Cases: 'dense', 1 GiB of random data; 'sparse', 4 GiB with 256 MiB of data in scattered
1 MiB pieces; 'writes', the dense case with fio writing random 4 KiB blocks to the source
throughout, until the endgame disconnects it (issue 5); 'latency', fio 4 KiB random reads at
queue depth 1 through flexnbd-proxy to the source, idle and during a speed-limited migration
(issue 10); 'resume', the dense file through a counting relay, uncut, cut at 50% (the retry
resumes) and cut at 50% into `listen --oldstyle` (the retry starts over, as 0.5.0 did), bytes
on the wire and times against the uncut migration (issue 25). Each case runs --repeat times;
the tables show medians.

Per migration: the time from the mirror request (sent on the source's control socket, as
`flexnbd mirror --wait` sends it) to the source confirming the end (`mirror --wait` would
return), to the source process's exit and to the destination's exit; the bytes on the wire
the source logs; the CPU seconds of each end (exact, from wait4()); what the disk under the
destination did (/proc/diskstats); both exit statuses; `cmp` of the two files. Yardsticks in
the same run and file system: `dd` of the same data with oflag=direct and with
conv=fdatasync (the disk's durable write time), and a bare TCP copy. With --relay (default
on) one more run per case goes through a counting TCP relay, an independent count of the
bytes on the wire. --quick: a small version for CI. See benchmarks/README.md.

flexnbd 0.5.0's times (7.3 s dense, 10 s sparse) are external figures, quoted from issue 5,
not measured here; they hold for the sizes they were measured at (1 GiB dense; 4 GiB with
256 MiB of data sparse). At other sizes the script shows them scaled by the file size, as an
estimate, and gives no verdict on the targets derived from them.

Exit status 1 if any migration failed or retried (but the resume case's cut ones), left a
destination that differs from the source, sent more than 1.1x the data on the wire in the
sparse case, or either end exited non-zero; if the migration cut at 50% and resumed sent more
than 1.1x the uncut one's bytes on the wire; or if fio or dd failed.

Standard library only; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_WORKDIR,
    HOST,
    CountingRelay,
    DiskStats,
    GiB,
    LoggedServer,
    MiB,
    Server,
    allocated_bytes,
    default_json,
    drop_caches,
    find_flexnbd,
    find_proxy,
    finish_report,
    flexnbd_cmd,
    flexnbd_module,
    fmt,
    free_port,
    git_head,
    log,
    log_time,
    loopback_copy_s,
    machine_info,
    make_data_file,
    make_sparse_file,
    parse_size,
    proxy_cmd,
    run_script,
    select,
    server_version,
    settle,
    size_text,
)
from run import ROWS, fio_command

# flexnbd 0.5.0's migration times: EXTERNAL figures, quoted from issue 5 (measured by hand on
# this kind of machine then), not measured by this script, and valid for the sizes they were
# measured at only. 0.5.0 sent every byte of the file, holes included, so at another size the
# script scales them by the file size, as an estimate, and gives no verdict on the targets.
# The targets (issue 10) are measured to a durable destination, i.e. to the source's exit.
REFERENCE_050 = {
    "dense": {"s": 7.3, "file_size": GiB, "data_size": GiB},
    "sparse": {"s": 10.0, "file_size": 4 * GiB, "data_size": 256 * MiB},
}
TARGET_SPEEDUP = {"dense": 3.0, "sparse": 10.0}
DISK_RATIO_LIMIT = 1.3  # dense: to the source's exit / the disk's durable write of the data
SPARSE_WIRE_LIMIT = 1.1  # bytes on the wire / data size
LATENCY_P99_LIMIT = 2.0  # p99 during a migration / p99 idle
RESUME_WIRE_LIMIT = 1.1  # issue 25: bytes on the wire of a migration cut at 50% / uncut
RESUME_CUT = 0.5  # the resume case cuts the first connection after this share of the file

COMPLETED_RE = re.compile(
    r"migration completed: (\d+) bytes of data sent, (\d+) bytes on the wire, in ([\d.]+) s"
)
ENDGAME_RE = re.compile(r"mirror endgame: (\d+) bytes dirty")
MAP_RE = re.compile(r"allocation map: built with (\w+) in (\d+) ms")
ATTEMPTS_RE = re.compile(r"migration completed: .* on average, (\d+) attempts?;")
RESUMES_RE = re.compile(
    r"attempt (\d+) resumes: the destination holds (\d+) of (\d+) bytes, skipped; (\d+) bytes "
    r"of data to send and (\d+) dirty"
)
RESTARTS_RE = re.compile(r"attempt (\d+) starts over from offset 0")
FAILED_RE = re.compile(r"mirror attempt failed: (.*?); retrying")
# The resume case's variants: (key, label, cut the first connection?, listen --oldstyle?).
RESUME_VARIANTS = (
    ("uncut", "uncut", False, False),
    ("resumed", "cut at 50%, resumed", True, False),
    ("restart", "cut at 50%, `listen --oldstyle` (0.5.0's restart)", True, True),
)

# ---------------------------------------------------------------- helpers


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
    fd = os.open(dst, os.O_WRONLY)

    def write(piece: memoryview, offset: int) -> None:
        k = 0
        while k < len(piece):
            k += os.pwrite(fd, piece[k:], offset + k)

    try:
        return loopback_copy_s(src, size, 8 * MiB, "raw copy", write)
    finally:
        os.close(fd)


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


def files_equal(a: Path, b: Path) -> tuple[bool, str]:
    out = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    return out.returncode == 0, (out.stdout + out.stderr).strip()


def keep_logs(errors: list[str], logs: list[Path], what: str) -> None:
    """After a failed run, copy its server logs to WORKDIR/failed/ (the next run overwrites
    them) and name the copies in ERRORS."""
    if not errors:
        return
    folder = logs[0].parent / "failed"
    folder.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%H%M%S")
    kept = []
    for path in logs:
        copy = folder / f"{stamp}-{what}-{path.name}"
        shutil.copyfile(path, copy)
        kept.append(str(copy))
    errors.append("logs kept: " + ", ".join(kept))


# ---------------------------------------------------------------- the control socket


def control_request(sock: Path, lines: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """One request on a flexnbd control socket (SPEC §5): the lines, an empty line; the
    reply `CODE: TEXT`. ConnectionError if the server closes without a reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall("".join(f"{line}\n" for line in lines).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while len(answer) < 65536 and (chunk := s.recv(4096)):
            answer += chunk
    code, sep, text = answer.decode(errors="replace").rstrip("\n").partition(": ")
    if not sep or not code.isdigit():
        raise ConnectionError(f"no control reply from {sock}: {answer[:80]!r}")
    return int(code), text


class MirrorRequest(threading.Thread):
    """Start a migration and follow it to its end, as `flexnbd mirror --wait` does: `mirror`
    on the source's control socket, then `mirror_wait`, whose reply comes when the source has
    finished the migration (cli=True runs `flexnbd mirror --wait` itself, so the times include
    its start-up, ~0.1 s, as in the tables of issue 5). ACTION and MAX_BPS go in the `mirror`
    request itself, so a speed limit holds from the first byte.

    t0: when the request went out; t_started: the `Mirror started` reply (connected);
    t_done: the end confirmed (mirror_wait answered, or the CLI exited); ok: it completed."""

    def __init__(
        self,
        sock: Path,
        port: int,
        action: str = "exit",
        max_bps: int | None = None,
        cli: bool = False,
    ):
        super().__init__(name="mirror-request", daemon=True)
        self.sock, self.port, self.action, self.max_bps, self.cli = sock, port, action, max_bps, cli
        self.t0: float | None = None
        self.t_started: float | None = None
        self.t_done: float | None = None
        self.ok = False
        self.detail = ""
        self.started = threading.Event()  # set once the `mirror` request was answered

    def lines(self) -> list[str]:
        lines = ["mirror", HOST, str(self.port), self.action]
        if self.max_bps is not None:
            lines += [HOST, str(self.max_bps)]  # BIND_IP comes before MAX_BPS
        return lines

    def command(self) -> list[str]:
        if self.cli:
            exe = find_flexnbd()
            assert exe and self.action == "exit" and self.max_bps is None
            cmd = [exe, "mirror", "--addr", HOST, "--port", str(self.port)]
            return cmd + ["--sock", str(self.sock), "--wait"]
        return ["control:", *self.lines(), "+ mirror_wait"]

    def run(self) -> None:
        try:
            if self.cli:
                self.t0 = time.monotonic()
                proc = subprocess.run(self.command(), capture_output=True, text=True, timeout=900)
                self.t_done = time.monotonic()
                self.ok = proc.returncode == 0
                self.detail = f"exit {proc.returncode}: " + (proc.stdout + proc.stderr).strip()
                return
            self.t0 = time.monotonic()
            code, text = control_request(self.sock, self.lines())
            self.t_started = time.monotonic()
            self.started.set()
            if code != 0:
                self.detail = f"mirror: {code}: {text}"
                return
            code, text = control_request(self.sock, ["mirror_wait"], timeout=900)
            self.t_done = time.monotonic()
            self.ok = code == 0
            self.detail = f"{code}: {text}"
        except (OSError, ConnectionError) as e:
            self.t_done = time.monotonic()
            self.detail = f"{type(e).__name__}: {e}"
        finally:
            self.started.set()


# ---------------------------------------------------------------- disk yardstick

DD_VARIANTS = {"oflag=direct": ["oflag=direct"], "conv=fdatasync": ["conv=fdatasync"]}


def dd_once(variant: str, src: Path, out: Path, disk: DiskStats, drop: bool) -> dict:
    """`dd if=SRC of=OUT bs=8M <variant>` into a new file, timed; SRC in the page cache (as a
    migration's source is), the page cache dropped before if DROP."""
    out.unlink(missing_ok=True)
    dropped = drop_caches() if drop else False
    settle(src)
    cmd = ["dd", f"if={src}", f"of={out}", "bs=8M", *DD_VARIANTS[variant]]
    d0 = disk.snapshot()
    c0 = os.times()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    elapsed = time.monotonic() - t0
    c1 = os.times()
    d1 = disk.snapshot()
    size = out.stat().st_size if out.exists() else 0
    out.unlink(missing_ok=True)
    return {
        "variant": variant,
        "command": " ".join(cmd),
        "s": elapsed,
        "rc": proc.returncode,
        "bytes": size,
        "dropped_caches": dropped,
        "cpu_user_s": c1.children_user - c0.children_user,
        "cpu_sys_s": c1.children_system - c0.children_system,
        "disk": DiskStats.delta(d0, d1),
        "stderr": proc.stderr.strip()[-500:],
    }


# ---------------------------------------------------------------- one migration


def wait_exits(
    servers: list[Server], req: MirrorRequest, timeout: float
) -> dict[str, tuple[int, float]]:
    """Wait for SERVERS to exit by themselves: name -> (exit status, monotonic exit time,
    5 ms resolution). Gives up TIMEOUT s after the start, or 10 s after REQ failed."""
    ended: dict[str, tuple[int, float]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    while time.monotonic() < deadline:
        for srv in servers:
            if srv.name not in ended:
                rc = srv.wait_exit(0)
                if rc is not None:
                    ended[srv.name] = (rc, time.monotonic())
        if len(ended) == len(servers):
            break
        if failed_at is None and not req.is_alive() and not req.ok:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > 10:
            break
        time.sleep(0.005)
    return ended


def record_ends(result: dict, errors: list[str], ended: dict, s: LoggedServer,
                d: LoggedServer, t0: float, cpu0_src: float, cpu0_dst: float) -> None:
    """Both ends' exit statuses, when they exited (from ``t0``) and the CPU they used."""
    rc_src, rc_dst = (ended[x.name][0] if x.name in ended else None for x in (s, d))
    result["src_exit"], result["dst_exit"] = rc_src, rc_dst
    if s.name in ended:
        result["src_exit_s"] = ended[s.name][1] - t0
    if d.name in ended:
        result["dst_exited_s"] = ended[d.name][1] - t0
    if rc_src != 0 or rc_dst != 0:
        errors.append(f"exit status: source {rc_src}, destination {rc_dst} (want 0, 0)")
    result["src_cpu_s"] = s.cpu_seconds() - cpu0_src
    result["dst_cpu_s"] = d.cpu_seconds() - cpu0_dst


def migrate_once(
    case: str,
    src: Path,
    dst: Path,
    size: int,
    workdir: Path,
    relay: bool,
    writer: bool,
    disk: DiskStats,
    args: argparse.Namespace,
) -> dict:
    """One migration src -> dst; returns the measurements (and 'errors', a list)."""
    errors: list[str] = []
    fresh_destination(dst, size)
    result: dict = {"case": case, "relay": relay, "writer": writer}
    result["dropped_caches"] = drop_caches() if not args.no_drop_caches else False
    settle(src)  # synced, and in the page cache, like a long-running server's file
    src_sock, dst_sock = workdir / "mig-src.sock", workdir / "mig-dst.sock"
    for path in (src_sock, dst_sock):
        path.unlink(missing_ok=True)
    src_log, dst_log = workdir / "migration-src.log", workdir / "migration-dst.log"
    for p in (src_log, dst_log):
        p.write_text("")  # one run per log, so the patterns below see only this run
    p_src, p_dst = free_port(), free_port()
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
            req = MirrorRequest(src_sock, target, cli=args.cli)
            result["mirror_command"] = " ".join(req.command())
            cpu0_src, cpu0_dst = s.cpu_seconds(), d.cpu_seconds()
            disk0 = disk.snapshot()
            req.start()
            # Both ends exit by themselves after a completed migration (action exit).
            ended = wait_exits([s, d], req, 900)
            req.join(30)
            disk1 = disk.snapshot()
            t0 = req.t0 if req.t0 is not None else time.monotonic()
            result["mirror_ok"], result["mirror_output"] = req.ok, req.detail[-2000:]
            if req.t_done is not None:
                result["wait_s"] = result["wall_s"] = req.t_done - t0
            if req.t_started is not None:
                result["started_s"] = req.t_started - t0
            if not req.ok:
                errors.append(f"the mirror did not complete: {req.detail}")
            record_ends(result, errors, ended, s, d, t0, cpu0_src, cpu0_dst)
            result["src_cpu_total_s"], result["dst_cpu_total_s"] = s.cpu_seconds(), d.cpu_seconds()
            result["disk"] = DiskStats.delta(disk0, disk1)
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
    keep_logs(errors, [src_log, dst_log], case)
    result["errors"] = errors
    return result


# ---------------------------------------------------------------- resume (issue 25)


def resume_once(
    variant: str, src: Path, dst: Path, size: int, workdir: Path, args: argparse.Namespace
) -> dict:
    """One migration of SRC (action exit) through a counting relay into a fresh DST, for the
    resume case. VARIANT 'uncut': no fault. 'resumed': the relay cuts the first connection
    once RESUME_CUT of SIZE went up, and relays the retry cleanly; the retry should resume.
    'restart': the same cut, into `flexnbd listen --oldstyle`, which offers no coverage
    context, so the retry starts over from offset 0 (what flexnbd 0.5.0 did)."""
    _, label, cut, oldstyle = next(v for v in RESUME_VARIANTS if v[0] == variant)
    errors: list[str] = []
    notes: list[str] = []
    fresh_destination(dst, size)
    result: dict = {"case": "resume", "variant": variant, "label": label, "oldstyle": oldstyle}
    result["dropped_caches"] = drop_caches() if not args.no_drop_caches else False
    settle(src)
    src_sock, dst_sock = workdir / "resume-src.sock", workdir / "resume-dst.sock"
    for path in (src_sock, dst_sock):
        path.unlink(missing_ok=True)
    src_log, dst_log = workdir / "resume-src.log", workdir / "resume-dst.log"
    for path in (src_log, dst_log):
        path.write_text("")
    p_src, p_dst = free_port(), free_port()
    listen_cmd = flexnbd_cmd("listen", p_dst, dst, dst_sock) + (["--oldstyle"] if oldstyle else [])
    result["listen_command"] = " ".join(listen_cmd)
    cut_after = int(size * RESUME_CUT) if cut else None
    result["cut_after_up_bytes"] = cut_after
    relay: CountingRelay | None = None
    # The listener is ready when it logs ' serving ' (an NBD probe cannot greet an oldstyle
    # one), the same test for the three variants.
    with (
        LoggedServer("listen", p_dst, dst, dst_log, listen_cmd) as d,
        Server("serve", p_src, src, src_log, flexnbd_cmd("serve", p_src, src, src_sock)) as s,
    ):
        try:
            if not wait_for_log(src_log, MAP_RE, 60):
                errors.append("the source's allocation map was not built within 60 s")
            relay = CountingRelay(p_dst, close_after_up=cut_after)
            req = MirrorRequest(src_sock, relay.port, cli=args.cli)
            result["mirror_command"] = " ".join(req.command())
            cpu0_src, cpu0_dst = s.cpu_seconds(), d.cpu_seconds()
            req.start()
            ended = wait_exits([s, d], req, 900)
            req.join(30)
            t0 = req.t0 if req.t0 is not None else time.monotonic()
            result["mirror_ok"], result["mirror_output"] = req.ok, req.detail[-2000:]
            if req.t_done is not None:
                result["wait_s"] = req.t_done - t0
            if not req.ok:
                errors.append(f"the mirror did not complete: {req.detail}")
            record_ends(result, errors, ended, s, d, t0, cpu0_src, cpu0_dst)
            if relay.cut_at is not None:
                result["cut_s"] = relay.cut_at - t0
        finally:
            if relay is not None:
                relay.close()
    if relay is not None:
        result["relay_up_bytes"] = relay.to_target
        result["relay_down_bytes"] = relay.from_target
        result["relay_connections"] = relay.connections
        result["relay_up_per_connection"] = list(relay.up_per_connection)
        result["relay_cut"] = relay.cut_at is not None
        if cut and relay.cut_at is None:
            errors.append(
                f"the relay did not cut the first connection (it carried "
                f"{relay.up_per_connection[:1]} bytes up, the cut was due at {cut_after:,}): "
                "no failed attempt to resume from"
            )
    text = src_log.read_text(errors="replace")
    m = COMPLETED_RE.search(text)
    if m:
        result["data_bytes"], result["wire_bytes"] = int(m.group(1)), int(m.group(2))
        result["src_reported_s"] = float(m.group(3))
    else:
        errors.append("no 'migration completed' line in the source's log")
    m = ATTEMPTS_RE.search(text)
    result["attempts"] = int(m.group(1)) if m else None
    result["failed_attempts"] = FAILED_RE.findall(text)
    result["resumed_attempts"] = [
        {"attempt": int(a), "held_bytes": int(h), "size": int(z), "to_send_bytes": int(d),
         "dirty_bytes": int(k)}
        for a, h, z, d, k in RESUMES_RE.findall(text)
    ]  # fmt: skip
    result["restarted_attempts"] = [int(a) for a in RESTARTS_RE.findall(text)]
    if not cut and result["failed_attempts"]:
        errors.append(
            f"{len(result['failed_attempts'])} failed mirror attempt(s) without a cut: "
            f"{result['failed_attempts'][0]}"
        )
    if cut:
        if result["attempts"] is not None and result["attempts"] != 2:
            notes.append(f"{result['attempts']} attempts (expected 2: the cut one, the retry)")
        if not oldstyle and not result["resumed_attempts"]:
            notes.append(
                "no attempt resumed (no 'attempt N resumes' line in the source's log); "
                f"restarted: {result['restarted_attempts']}"
            )
        if oldstyle and result["resumed_attempts"]:
            notes.append("an attempt resumed from an --oldstyle listener (expected a restart)")
    equal, detail = files_equal(src, dst)
    result["identical"] = equal
    if not equal:
        errors.append(f"destination differs from source: {detail}")
    if notes:
        keep_logs(notes, [src_log, dst_log], f"resume-{variant}-odd")
    keep_logs(errors, [src_log, dst_log], f"resume-{variant}")
    result["errors"] = errors
    result["notes"] = notes
    return result


# ---------------------------------------------------------------- client latency


def latency_fio_command(port: int, runtime: float) -> list[str]:
    """run.py's 'fio rand read 4k qd1' job, with percentiles of the total latency too."""
    cmd = fio_command(port, ROWS["fio rand read 4k qd1"], math.ceil(runtime))
    return cmd + ["--lat_percentiles=1", "--percentile_list=50:90:99:99.9"]


def parse_fio_latency(out: str) -> dict:
    """IOPS and latency (µs) of the read side of fio's JSON: p50... of the total latency
    (lat = slat + clat), clat_p50... of the completion latency alone. With the nbd engine a
    request's send counts in slat, and a reply already there when fio commits the request
    gives a clat of 2-3 µs, so clat alone understates the latency a client sees."""
    start = 0 if out.startswith("{") else out.find("\n{") + 1
    try:
        job = json.loads(out[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        return {}
    rd = job.get("read", {})
    res: dict[str, Any] = {
        "fio_error": job.get("error"),
        "iops": rd.get("iops"),
        "ios": rd.get("total_ios"),
    }
    for prefix, key in (("", "lat_ns"), ("clat_", "clat_ns")):
        stats = rd.get(key, {})
        pct = stats.get("percentile", {})
        for name, q in (("p50", "50"), ("p90", "90"), ("p99", "99"), ("p99_9", "99.9")):
            value = pct.get(f"{float(q):.6f}")
            res[f"{prefix}{name}_us"] = value / 1000 if value is not None else None
        for name in ("mean", "max"):
            value = stats.get(name)
            res[f"{prefix}{name}_us"] = value / 1000 if value is not None else None
    return res


def latency_once(
    kind: str, src: Path, dst: Path, size: int, workdir: Path, args: argparse.Namespace
) -> dict:
    """fio 4 KiB random reads at qd1 through flexnbd-proxy to a `flexnbd serve` of SRC, for
    --latency-runtime s. KIND 'idle': nothing else runs. 'migrating': a migration of SRC to a
    listen server, action `nothing` (the source goes on serving afterwards) with the speed
    limit in the request, started --latency-lead s before fio, so that fio's window lies
    inside the transfer. 'endgame': as 'migrating', fio running until 2 s past the end of the
    transfer: the endgame disconnects the proxy from the source, which it must hide from fio
    (not in the medians)."""
    errors: list[str] = []
    migrating = kind != "idle"
    speed = args.latency_speed
    runtime = args.latency_runtime
    if kind == "endgame":
        runtime = max(runtime, size / speed - args.latency_lead + 2)
    result: dict = {"case": "latency", "kind": kind, "max_bps": speed if migrating else None}
    fresh_destination(dst, size)
    result["dropped_caches"] = drop_caches() if not args.no_drop_caches else False
    settle(src)
    src_sock, dst_sock = workdir / "lat-src.sock", workdir / "lat-dst.sock"
    for p in (src_sock, dst_sock):
        p.unlink(missing_ok=True)
    src_log, dst_log = workdir / "latency-src.log", workdir / "latency-dst.log"
    px_log = workdir / "latency-proxy.log"
    for p in (src_log, dst_log, px_log):
        p.write_text("")
    p_src, p_dst, p_px = free_port(), free_port(), free_port()
    fio_cmd = latency_fio_command(p_px, runtime)
    result["fio_command"] = " ".join(fio_cmd)
    req: MirrorRequest | None = None
    servers: list[Server] = []
    try:
        if migrating:
            cmd = flexnbd_cmd("listen", p_dst, dst, dst_sock)
            servers.append(Server("listen", p_dst, dst, dst_log, cmd).__enter__())
        s = Server("serve", p_src, src, src_log, flexnbd_cmd("serve", p_src, src, src_sock))
        servers.append(s.__enter__())
        if not wait_for_log(src_log, MAP_RE, 60):
            errors.append("the source's allocation map was not built within 60 s")
        px = LoggedServer("flexnbd-proxy", p_px, src, px_log, proxy_cmd(p_px, p_src, None))
        servers.append(px.__enter__())
        result["proxy_command"] = " ".join(px.cmd)
        if migrating:
            req = MirrorRequest(src_sock, p_dst, action="nothing", max_bps=speed)
            result["mirror_command"] = " ".join(req.command())
            req.start()
            req.started.wait(60)
            if req.t_started is None:
                errors.append(f"the mirror did not start: {req.detail}")
            time.sleep(args.latency_lead)
        cpu0 = {srv.name: srv.cpu_seconds() for srv in servers}
        t_fio0 = time.monotonic()
        proc = subprocess.run(
            fio_cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=runtime + 120,
        )  # fmt: skip
        t_fio1 = time.monotonic()
        result["cpu_s"] = {srv.name: srv.cpu_seconds() - cpu0[srv.name] for srv in servers}
        result["fio_window_s"] = t_fio1 - t_fio0
        result["fio_rc"] = proc.returncode
        result.update(parse_fio_latency(proc.stdout))
        if proc.returncode != 0 or result.get("fio_error") or result.get("p99_us") is None:
            tail = (proc.stderr + proc.stdout.split("\n{", 1)[0]).strip()[-1000:]
            errors.append(f"fio exit {proc.returncode}, error {result.get('fio_error')}: {tail}")
        if req is not None:
            req.join(size / speed * 3 + 120)
            if not req.ok:
                errors.append(f"the mirror did not complete: {req.detail}")
            t0 = req.t0 or t_fio0
            result["mirror_done_s"] = (req.t_done - t0) if req.t_done else None
            result["fio_started_s"] = t_fio0 - t0
            result["fio_ended_s"] = t_fio1 - t0
            t_end = log_time(src_log, "mirror endgame")
            result["endgame_s"] = t_end - t0 if t_end else None
            result["endgame_in_fio_window"] = bool(t_end and t_fio0 <= t_end <= t_fio1)
            m = COMPLETED_RE.search(src_log.read_text(errors="replace"))
            if m:
                result["migration_s"] = float(m.group(3))
                result["migration_mb_s"] = int(m.group(1)) / float(m.group(3)) / 1e6
            rc = servers[0].wait_exit(60)  # the listen server exits after its migration
            result["dst_exit"] = rc
            if rc != 0:
                errors.append(f"the destination exited {rc} after the migration (want 0)")
        result["proxy_reconnects"] = px_log.read_text(errors="replace").count("reconnected")
        for srv in reversed(servers):
            if srv.alive():
                rc = srv.stop()
                result[f"{srv.name}_exit"] = rc
                if rc != 0:
                    errors.append(f"{srv.name} exited {rc} on SIGTERM (want 0)")
    finally:
        for srv in reversed(servers):
            srv.stop()
    if migrating:
        equal, detail = files_equal(src, dst)
        result["identical"] = equal
        if not equal:
            errors.append(f"destination differs from source: {detail}")
    keep_logs(errors, [src_log, dst_log, px_log], f"latency-{kind}")
    result["errors"] = errors
    return result


# ---------------------------------------------------------------- report


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def disk_median(runs: list[dict], key: str) -> float | None:
    values = [r["disk"][key] for r in runs if r.get("disk") and key in r["disk"]]
    return statistics.median(values) if values else None


def summarize(case: str, runs: list[dict], data_size: int, file_size: int) -> dict:
    keys = (
        "wait_s",
        "src_exit_s",
        "dst_exited_s",
        "started_s",
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
    for k in ("write_bytes", "busy_ms", "flushes", "write_ms"):
        out[f"disk_{k}"] = disk_median(runs, k)
    out["samples_wait_s"] = [r.get("wait_s") for r in runs]
    out["samples_src_exit_s"] = [r.get("src_exit_s") for r in runs]
    out["samples_dst_exited_s"] = [r.get("dst_exited_s") for r in runs]
    out["runs"] = len(runs)
    out["ok"] = sum(1 for r in runs if not r["errors"])
    out["data_size"] = data_size
    out["file_size"] = file_size
    ref = REFERENCE_050.get(case)
    if ref and out["src_exit_s"]:
        # External: quoted, not measured. A verdict only at the sizes it was measured at.
        same = file_size == ref["file_size"] and data_size == ref["data_size"]
        ref_s = ref["s"] if same else ref["s"] * file_size / ref["file_size"]
        out["reference_050"] = {
            "source": "external figure from issue 5, not measured by this script",
            "s": ref["s"],
            "file_size": ref["file_size"],
            "data_size": ref["data_size"],
            "scaled_s": None if same else ref_s,
            "comparable": same,
        }
        out["speedup"] = ref_s / out["src_exit_s"]
        out["target_speedup"] = TARGET_SPEEDUP[case]
        out["target_comparable"] = same
        if out["wait_s"]:
            out["speedup_wait"] = ref_s / out["wait_s"]
    return out


def reference_text(case: str, s: dict) -> str:
    """How 0.5.0's external figure compares, in words: a verdict at its own sizes only."""
    ref = s["reference_050"]
    at = size_text(ref["file_size"]) + (
        f" with {size_text(ref['data_size'])} of data"
        if ref["data_size"] != ref["file_size"]
        else ""
    )
    if s["target_comparable"]:
        met = s["speedup"] >= s["target_speedup"]
        return (
            f"{s['speedup']:.1f}x faster than 0.5.0's {ref['s']} s (an external figure from "
            f"issue 5 at {at}, not measured here; target {s['target_speedup']:.0f}x: "
            f"{'met' if met else 'MISSED'})"
        )
    return (
        f"0.5.0's external figure ({ref['s']} s at {at}, issue 5, not measured here) scaled by "
        f"file size to {size_text(s['file_size'])} is ~{ref['scaled_s']:.2f} s: ~"
        f"{s['speedup']:.1f}x, an estimate; no verdict on the {s['target_speedup']:.0f}x target "
        "at this size"
    )


def summarize_dd(samples: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for variant in DD_VARIANTS:
        runs = [x for x in samples if x["variant"] == variant and x["rc"] == 0]
        if runs:
            out[variant] = {
                "s": statistics.median(x["s"] for x in runs),
                "samples_s": [x["s"] for x in runs],
                "bytes": runs[0]["bytes"],
                "disk_write_bytes": disk_median(runs, "write_bytes"),
                "disk_busy_ms": disk_median(runs, "busy_ms"),
                "disk_flushes": disk_median(runs, "flushes"),
                "cpu_s": statistics.median(x["cpu_user_s"] + x["cpu_sys_s"] for x in runs),
                "command": runs[0]["command"],
            }
    if out:
        best = min(out, key=lambda v: out[v]["s"])
        out["yardstick"] = best
    return out


def summarize_latency(runs: list[dict]) -> dict:
    out: dict = {}
    for kind in ("idle", "migrating", "endgame"):
        rs = [r for r in runs if r["kind"] == kind and r.get("p99_us") is not None]
        if not rs:
            continue
        k: dict[str, Any] = {key: median(rs, key) for key in (
            "iops", "p50_us", "p90_us", "p99_us", "p99_9_us", "mean_us", "max_us",
            "clat_p50_us", "clat_p99_us",
            "migration_mb_s", "mirror_done_s", "endgame_s", "fio_started_s", "fio_ended_s",
        )}  # fmt: skip
        k["samples"] = len(rs)
        k["ok"] = sum(1 for r in rs if not r["errors"])
        k["samples_p99_us"] = [r["p99_us"] for r in rs]
        k["samples_p50_us"] = [r["p50_us"] for r in rs]
        k["endgame_in_fio_window"] = [r.get("endgame_in_fio_window") for r in rs]
        k["proxy_reconnects"] = [r.get("proxy_reconnects") for r in rs]
        names = {n for r in rs for n in r.get("cpu_s", {})}
        k["cpu_s"] = {
            n: statistics.median(r["cpu_s"][n] for r in rs if n in r["cpu_s"]) for n in names
        }
        out[kind] = k
    if "idle" in out and "migrating" in out:
        out["p99_ratio"] = out["migrating"]["p99_us"] / out["idle"]["p99_us"]
        out["p50_ratio"] = out["migrating"]["p50_us"] / out["idle"]["p50_us"]
        out["target_met"] = out["p99_ratio"] <= LATENCY_P99_LIMIT
    return out


def mib(x: float | None) -> str:
    return "-" if x is None else f"{x / MiB:,.1f}"


def count(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def samples_text(values: list) -> str:
    return " / ".join(fmt(v) for v in values if v is not None)


def migration_table(summary: dict, dd: dict) -> str:
    head = [
        "case", "runs ok", "to mirror --wait s", "to source exit s (median)",
        "to source exit s samples", "destination exited s", "wire MiB", "data MiB",
        "wire / data", "CPU s source / destination", "disk written MiB, busy s, flushes",
        "vs disk (target)", "vs 0.5.0 (external figure; target)",
    ]  # fmt: skip
    yard = dd.get(dd["yardstick"]) if dd.get("yardstick") else None
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, s in summary.items():
        ratio = s["wire_bytes"] / s["data_size"] if s["wire_bytes"] else None
        vs = "-"
        if s.get("speedup") and s["target_comparable"]:
            met = s["speedup"] >= s["target_speedup"]
            vs = f"{s['speedup']:.1f}x (≥{s['target_speedup']:.0f}x: {'met' if met else 'MISSED'})"
        elif s.get("speedup"):
            vs = f"~{s['speedup']:.1f}x (scaled to this size: an estimate, no verdict)"
        vs_disk = "-"
        if case == "dense" and yard and s["src_exit_s"]:
            r = s["src_exit_s"] / yard["s"]
            verdict = "met" if r <= DISK_RATIO_LIMIT else "MISSED"
            vs_disk = f"{r:.2f}x (≤{DISK_RATIO_LIMIT}x: {verdict})"
        if case == "sparse" and ratio:
            ok = ratio <= SPARSE_WIRE_LIMIT
            wire = f"{ratio:.3f} (≤{SPARSE_WIRE_LIMIT}: {'met' if ok else 'MISSED'})"
        else:
            wire = f"{ratio:.3f}" if ratio else "-"
        busy = s["disk_busy_ms"] / 1000 if s["disk_busy_ms"] is not None else None
        cells = [
            case, f"{s['ok']}/{s['runs']}", fmt(s["wait_s"]), fmt(s["src_exit_s"]),
            samples_text(s["samples_src_exit_s"]), fmt(s["dst_exited_s"]), mib(s["wire_bytes"]),
            mib(s["data_size"]), wire, f"{fmt(s['src_cpu_s'])} / {fmt(s['dst_cpu_s'])}",
            f"{mib(s['disk_write_bytes'])}, {fmt(busy)}, {count(s['disk_flushes'])}", vs_disk, vs,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def yardstick_table(dd: dict, raw: list[float], size: int) -> str:
    head = [
        "yardstick", "MiB", "s (median)", "samples s", "MiB/s",
        "disk written MiB, busy s, flushes", "CPU s",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in DD_VARIANTS:
        if variant not in dd:
            continue
        v = dd[variant]
        busy = v["disk_busy_ms"] / 1000 if v["disk_busy_ms"] is not None else None
        mark = " (the yardstick: the faster)" if dd.get("yardstick") == variant else ""
        lines.append(
            f"| `dd bs=8M {variant}`{mark} | {mib(v['bytes'])} | {fmt(v['s'])} | "
            f"{samples_text(v['samples_s'])} | {fmt(v['bytes'] / MiB / v['s'])} | "
            f"{mib(v['disk_write_bytes'])}, {fmt(busy)}, {count(v['disk_flushes'])} | "
            f"{fmt(v['cpu_s'])} |"
        )
    if raw:
        med = statistics.median(raw)
        lines.append(
            f"| bare TCP copy (sendfile → recv_into + pwrite, no sync) | {mib(size)} | "
            f"{fmt(med)} | {samples_text(raw)} | {fmt(size / MiB / med)} | - | - |"
        )
    return "\n".join(lines)


def latency_table(lat: dict) -> str:
    head = [
        "fio randread 4k qd1 through flexnbd-proxy", "samples ok", "IOPS", "p50 µs", "p99 µs",
        "p99 µs samples", "p99.9 µs", "max µs", "clat only: p50 / p99 µs", "migration MB/s",
        "CPU s source / proxy / destination",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {"idle": "idle (no migration)", "migrating": "during a migration",
             "endgame": "across the endgame (check, not in the medians)"}  # fmt: skip
    for kind, label in names.items():
        if kind not in lat:
            continue
        k = lat[kind]
        cpu = k["cpu_s"]
        cells = [
            label, f"{k['ok']}/{k['samples']}", fmt(k["iops"]), fmt(k["p50_us"]),
            fmt(k["p99_us"]), samples_text(k["samples_p99_us"]), fmt(k["p99_9_us"]),
            fmt(k["max_us"]), f"{fmt(k['clat_p50_us'])} / {fmt(k['clat_p99_us'])}",
            fmt(k["migration_mb_s"]),
            " / ".join(fmt(cpu.get(n)) for n in ("serve", "flexnbd-proxy", "listen")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_resume(runs: list[dict], size: int) -> dict:
    """Per variant of the resume case: medians of the bytes and times, the samples, and the
    ratios to the uncut variant (of the medians); the verdict on issue 25's target."""
    out: dict = {"file_size": size, "cut_after_up_bytes": int(size * RESUME_CUT)}
    keys = (
        "relay_up_bytes", "relay_down_bytes", "wire_bytes", "data_bytes", "wait_s",
        "src_exit_s", "dst_exited_s", "src_reported_s", "cut_s", "attempts", "src_cpu_s",
        "dst_cpu_s",
    )  # fmt: skip
    variants: dict = {}
    for key, label, cut, oldstyle in RESUME_VARIANTS:
        rs = [r for r in runs if r["variant"] == key]
        if not rs:
            continue
        v: dict[str, Any] = {k: median(rs, k) for k in keys}
        v.update(label=label, cut=cut, oldstyle=oldstyle, runs=len(rs))
        v["ok"] = sum(1 for r in rs if not r["errors"])
        for k in ("relay_up_bytes", "wire_bytes", "wait_s", "attempts"):
            v[f"samples_{k}"] = [r.get(k) for r in rs]
        v["exits"] = [(r.get("src_exit"), r.get("dst_exit")) for r in rs]
        v["identical"] = all(r.get("identical") for r in rs)
        v["resumed"] = [bool(r.get("resumed_attempts")) for r in rs]
        held = [a["held_bytes"] for r in rs for a in r.get("resumed_attempts", [])[:1]]
        v["held_bytes"] = statistics.median(held) if held else None
        variants[key] = v
    base = variants.get("uncut", {})
    for v in variants.values():
        for k, ref in (("relay_up_bytes", "bytes"), ("wire_bytes", "src_bytes"),
                       ("wait_s", "time")):  # fmt: skip
            num, den = v.get(k), base.get(k)
            v[f"{ref}_ratio"] = num / den if num is not None and den else None
    out["variants"] = variants
    r = variants.get("resumed", {}).get("bytes_ratio")
    out["target"] = RESUME_WIRE_LIMIT
    out["target_met"] = None if r is None else r <= RESUME_WIRE_LIMIT
    return out


def resume_table(res: dict) -> str:
    head = [
        f"migration of the dense file ({size_text(res['file_size'])})", "runs ok", "attempts",
        "bytes up on the wire, relay (MiB)", "bytes vs uncut", "on the wire, source's count "
        "(MiB)", "to mirror --wait s (median)", "samples s", "time vs uncut",
        "exit source / destination", "identical",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, v in res["variants"].items():
        ratio = v["bytes_ratio"]
        bytes_vs = f"{ratio:.3f}x" if ratio is not None else "-"
        if key == "resumed" and ratio is not None:
            bytes_vs += f" (≤{RESUME_WIRE_LIMIT}x: {'met' if res['target_met'] else 'MISSED'})"
        exits = sorted({f"{a} / {b}" for a, b in v["exits"]})
        cells = [
            v["label"], f"{v['ok']}/{v['runs']}",
            " / ".join(str(a) for a in v["samples_attempts"]), mib(v["relay_up_bytes"]),
            bytes_vs, mib(v["wire_bytes"]), fmt(v["wait_s"]), samples_text(v["samples_wait_s"]),
            f"{v['time_ratio']:.2f}x" if v["time_ratio"] is not None else "-",
            ", ".join(exits), "yes" if v["identical"] else "NO",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

CASES = ("dense", "sparse", "writes", "latency", "resume")
QUICK = {
    "dense_size": "256M", "sparse_size": "1G", "sparse_data": "64M", "repeat": 1,
    "resume_size": "512M",
    "latency_runtime": 5.0, "latency_speed": 40_000_000,
}  # fmt: skip
FULL = {
    "dense_size": "1G", "sparse_size": "4G", "sparse_data": "256M", "repeat": 3,
    "latency_runtime": 9.0, "latency_speed": 100_000_000,
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR, help="where the files live")
    p.add_argument("--cases", help="comma-separated subset of " + ", ".join(CASES))
    p.add_argument("--quick", action="store_true",
                   help="a small run for CI: 256M dense, 1G sparse with 64M data, 512M "
                        "resume, 1 sample, no relay runs but the resume case's, 5 s fio at "
                        "40 MB/s (about 50 s)")  # fmt: skip
    p.add_argument("--dense-size", help="dense, writes and latency cases (default 1G)")
    p.add_argument(
        "--resume-size",
        help="the resume case's dense file (default: --dense-size; --quick: 512M, where the "
        "up to ~40 MiB a cut costs, the window in flight and the torn write, stays under 10%%)",
    )
    p.add_argument("--sparse-size", help="sparse case file size (default 4G)")
    p.add_argument("--sparse-data", help="data in it (default 256M)")
    p.add_argument("--repeat", type=int, help="runs per case (default 3)")
    p.add_argument("--latency-runtime", type=float, help="s of fio per latency sample (default 9)")
    p.add_argument(
        "--latency-speed",
        type=int,
        help="the migration's speed limit in the latency case, bytes/s (default 1e8)",
    )
    p.add_argument(
        "--latency-lead",
        type=float,
        default=0.5,
        help="s between the mirror request and fio's start (default 0.5)",
    )
    p.add_argument(
        "--no-endgame-check", action="store_true", help="skip the latency run across the endgame"
    )
    p.add_argument("--no-relay", action="store_true", help="skip the counting-relay runs")
    p.add_argument("--no-raw", action="store_true", help="skip the raw TCP copy yardstick")
    p.add_argument("--no-dd", action="store_true", help="skip the dd disk yardstick")
    p.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="do not drop the page cache before each sample",
    )
    p.add_argument("--cli", action="store_true",
                   help="time `flexnbd mirror --wait` (CLI start-up included) instead of "
                        "sending the request on the control socket")  # fmt: skip
    p.add_argument(
        "--json",
        help="results file (default benchmarks/results/migration.json; --quick: "
        "benchmarks/out/migration-quick.json); the printed tables are in it as 'markdown'",
    )
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.no_relay = True
    return args


def code_stamp(module: str | None) -> float | None:
    """The newest modification time of the flexnbd package's .py and .so files."""
    if not module:
        return None
    package = Path(module).parent
    times = [p.stat().st_mtime for p in package.rglob("*") if p.suffix in (".py", ".so")]
    return max(times, default=None)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    cases = select(args.cases, list(CASES), {})
    if not find_flexnbd():
        raise SystemExit("flexnbd not found (run `make install`)")
    for case in ("writes", "latency"):
        if case in cases and not shutil.which("fio"):
            log(f"fio not found: skipping the '{case}' case")
            cases.remove(case)
    if "latency" in cases:
        if not find_proxy():
            log("flexnbd-proxy not found: skipping the 'latency' case")
            cases.remove("latency")
    if args.no_dd is False and not shutil.which("dd"):
        args.no_dd = True
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else default_json("migration", args.quick)
    dense_size = parse_size(args.dense_size)
    sparse_size, sparse_data = parse_size(args.sparse_size), parse_size(args.sparse_data)
    dense = workdir / f"data-{dense_size}.img"
    sparse = workdir / f"sparse-{sparse_size}-{sparse_data}.img"
    if {"dense", "writes", "latency"} & set(cases):
        make_data_file(dense, dense_size)
    resume_size = parse_size(args.resume_size or args.dense_size)
    resume_src = workdir / f"data-{resume_size}.img"
    if "resume" in cases:
        make_data_file(resume_src, resume_size)
    if "sparse" in cases:
        make_sparse_file(sparse, sparse_size, sparse_data)
    disk = DiskStats(workdir)
    report: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "git_head": git_head(),
        "flexnbd": server_version("flexnbd"),
        "flexnbd_module": flexnbd_module(),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "disk_device": disk.name,
        "code_stamp_start": None,
        "args": vars(args),
        "repeat": args.repeat,
        "loadavg_start": os.getloadavg(),
        "runs": [],
        "relay_runs": [],
        "raw_copy_s": [],
        "dd": [],
        "latency_runs": [],
        "resume_runs": [],
        "resume_notes": [],
        "errors": [],
    }
    report["code_stamp_start"] = code_stamp(report["flexnbd_module"])
    log(f"load average {report['loadavg_start'][0]:.2f} before starting; flexnbd from "
        f"{report['flexnbd_module']}; disk {disk.name}")  # fmt: skip
    if not args.no_drop_caches and not drop_caches():
        log("cannot drop the page cache (not root?): samples start with a warm cache")
        args.no_drop_caches = True
    copy = workdir / "mig-src-writes.img"  # the writes case changes its source: a copy
    dst = workdir / "mig-dst.img"
    dd_out = workdir / "dd-out.img"  # same file system as the destination
    plan = [(rep, case, False) for rep in range(args.repeat) for case in cases]
    if not args.no_relay:
        plan += [(args.repeat, case, True) for case in cases if case not in ("latency", "resume")]
    if "latency" in cases and not args.no_endgame_check:
        plan.append((args.repeat, "endgame", False))
    try:
        for rep, case, relay in plan:
            if case in ("latency", "endgame"):
                kinds = ["endgame"] if case == "endgame" else ["idle", "migrating"]
                if rep % 2:
                    kinds.reverse()
                for kind in kinds:
                    what = "check" if kind == "endgame" else f"run {rep + 1}/{args.repeat}"
                    log(f"latency, {kind} ({what}) ...")
                    r = latency_once(kind, dense, dst, dense_size, workdir, args)
                    r["loadavg"] = os.getloadavg()
                    report["latency_runs"].append(r)
                    log(
                        f"  {fmt(r.get('iops'))} IOPS, p50 {fmt(r.get('p50_us'))} µs, p99 "
                        f"{fmt(r.get('p99_us'))} µs, max {fmt(r.get('max_us'))} µs"
                        + (
                            f"; migration {fmt(r.get('migration_mb_s'))} MB/s, done at "
                            f"{fmt(r.get('mirror_done_s'))} s, fio from "
                            f"{fmt(r.get('fio_started_s'))} to {fmt(r.get('fio_ended_s'))} s, "
                            f"endgame at {fmt(r.get('endgame_s'))} s, proxy reconnects "
                            f"{r.get('proxy_reconnects')}"
                            if kind != "idle"
                            else ""
                        )
                    )
                    for e in r["errors"]:
                        log(f"  ERROR: {e}")
                        report["errors"].append(f"latency {kind} ({what}): {e}")
                continue
            if case == "resume":
                order = [v[0] for v in RESUME_VARIANTS]  # rotated from run to run
                for variant in order[rep % 3 :] + order[: rep % 3]:
                    what = f"run {rep + 1}/{args.repeat}"
                    log(f"resume, {variant} ({what}) ...")
                    r = resume_once(variant, resume_src, dst, resume_size, workdir, args)
                    r["rep"], r["loadavg"] = rep, os.getloadavg()
                    report["resume_runs"].append(r)
                    log(
                        f"  mirror --wait {fmt(r.get('wait_s'))} s, {r.get('attempts')} "
                        f"attempt(s), relay: {mib(r.get('relay_up_bytes'))} MiB up over "
                        f"{r.get('relay_connections')} connection(s) "
                        f"({', '.join(mib(x) for x in r.get('relay_up_per_connection', []))}), "
                        f"source: {mib(r.get('wire_bytes'))} MiB on the wire"
                        + "".join(
                            f", attempt {a['attempt']} resumed: the destination held "
                            f"{mib(a['held_bytes'])} MiB"
                            for a in r["resumed_attempts"]
                        )
                        + "".join(f", attempt {a} restarted" for a in r["restarted_attempts"])
                        + f", exits {r.get('src_exit')} / {r.get('dst_exit')}, identical: "
                        f"{r['identical']}"
                    )
                    for e in r["errors"]:
                        log(f"  ERROR: {e}")
                        report["errors"].append(f"resume {variant} ({what}): {e}")
                    for n in r["notes"]:
                        log(f"  NOTE: {n}")
                        report["resume_notes"].append(f"resume {variant} ({what}): {n}")
                continue
            src, size = (sparse, sparse_size) if case == "sparse" else (dense, dense_size)
            if case == "writes":
                shutil.copyfile(dense, copy)
                src = copy
            what = "relay run" if relay else f"run {rep + 1}/{args.repeat}"
            if case == "dense" and not relay:
                # The yardsticks, in an order that rotates from run to run.
                steps = [] if args.no_dd else list(DD_VARIANTS)
                steps += [] if args.no_raw else ["raw"]
                k = rep % len(steps) if steps else 0
                for step in steps[k:] + steps[:k]:
                    if step == "raw":
                        if not args.no_drop_caches:
                            drop_caches()
                        settle(src)
                        raw = raw_copy_s(src, dst, size)
                        dst.unlink(missing_ok=True)
                        report["raw_copy_s"].append(raw)
                        log(f"raw TCP copy of {mib(size)} MiB into a fresh file: {raw:.2f} s")
                        continue
                    x = dd_once(step, src, dd_out, disk, not args.no_drop_caches)
                    x["rep"] = rep
                    report["dd"].append(x)
                    log(f"dd {step} of {mib(x['bytes'])} MiB: {x['s']:.2f} s (exit {x['rc']})")
                    if x["rc"] != 0 or x["bytes"] != size:
                        report["errors"].append(f"dd {step}: exit {x['rc']}: {x['stderr']}")
            log(f"{case} ({what}) ...")
            r = migrate_once(case, src, dst, size, workdir, relay, case == "writes", disk, args)
            r["loadavg"] = os.getloadavg()
            wire = r.get("wire_bytes")
            if case == "sparse" and wire and wire > SPARSE_WIRE_LIMIT * sparse_data:
                r["errors"].append(
                    f"{wire:,} bytes on the wire for {sparse_data:,} bytes of data: "
                    f"{wire / sparse_data:.3f}x, over the {SPARSE_WIRE_LIMIT}x limit"
                )
            (report["relay_runs"] if relay else report["runs"]).append(r)
            log(
                f"  mirror --wait {fmt(r.get('wait_s'))} s, source exit {fmt(r.get('src_exit_s'))}"
                f" s, destination exit {fmt(r.get('dst_exited_s'))} s, "
                f"{mib(r.get('wire_bytes'))} MiB on the wire"
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
        dd_out.unlink(missing_ok=True)
    report["loadavg_end"] = os.getloadavg()
    report["code_stamp_end"] = code_stamp(report["flexnbd_module"])
    if report["code_stamp_end"] != report["code_stamp_start"]:
        report["errors"].append(
            f"the flexnbd code in {report['flexnbd_module']} changed during the run: the "
            "numbers mix two versions (run on a snapshot: PYTHONPATH=DIR)"
        )
    data_sizes = {"dense": dense_size, "writes": dense_size, "sparse": sparse_data}
    file_sizes = {"dense": dense_size, "writes": dense_size, "sparse": sparse_size}
    summary = {
        case: summarize(
            case,
            [r for r in report["runs"] if r["case"] == case],
            data_sizes[case],
            file_sizes[case],
        )
        for case in cases
        if case not in ("latency", "resume")
    }
    report["summary"] = summary
    dd = summarize_dd(report["dd"])
    report["dd_summary"] = dd
    lat = summarize_latency(report["latency_runs"])
    report["latency_summary"] = lat
    res = summarize_resume(report["resume_runs"], resume_size) if report["resume_runs"] else {}
    report["resume"] = res
    if res and res["target_met"] is False:
        r = res["variants"]["resumed"]["bytes_ratio"]
        report["errors"].append(
            f"resume: the migration cut at 50% put {r:.3f}x the uncut migration's bytes on "
            f"the wire (relay's count), over the {RESUME_WIRE_LIMIT}x limit of issue 25"
        )
    report["duration_s"] = time.monotonic() - started

    out: list[str] = []
    if summary:
        out += [migration_table(summary, dd), ""]
        out.append(
            "Times from the mirror request ("
            + ("`flexnbd mirror --wait` started" if args.cli else "sent on the control socket")
            + f"); medians of {args.repeat}. 'to mirror --wait': the source confirmed the end "
            "(mirror_wait answered); 'to source exit': the source process exited (reaped); "
            "'destination exited': the listen server exited."
        )
        out.append("")
    if dd or report["raw_copy_s"]:
        out += [yardstick_table(dd, report["raw_copy_s"], dense_size), ""]
        drop = "dropped (sync; echo 3 > drop_caches)" if not args.no_drop_caches else "not dropped"
        out.append(
            f"Same file system as the destination ({disk.name or 'device unknown'}); page cache "
            f"{drop} before every sample, then the input read into it (a migration's source is "
            "in the page cache too)."
        )
        out.append("")
    for case, s in summary.items():
        if not s.get("speedup"):
            continue
        line = (
            f"{case}: to the source's exit {fmt(s['src_exit_s'])} s, {reference_text(case, s)}; "
            f"to mirror --wait {fmt(s['wait_s'])} s"
        )
        if case == "dense" and dd.get("yardstick"):
            y = dd[dd["yardstick"]]
            r = s["src_exit_s"] / y["s"]
            line += (
                f"; {r:.2f}x the disk's durable write of the same data (`dd {dd['yardstick']}`,"
                f" {fmt(y['s'])} s; target ≤ {DISK_RATIO_LIMIT}x: "
                f"{'met' if r <= DISK_RATIO_LIMIT else 'MISSED'})"
            )
        if case == "sparse" and s["wire_bytes"]:
            ratio = s["wire_bytes"] / s["data_size"]
            ok = ratio <= SPARSE_WIRE_LIMIT
            verdict = "met" if ok else "MISSED"
            line += f"; wire/data {ratio:.3f} (target ≤ {SPARSE_WIRE_LIMIT}: {verdict})"
        out.append(line)
    if "writes" in summary:
        s = summary["writes"]
        out.append(
            f"writes: fio wrote {fmt(s['writes'])} 4 KiB blocks per run (median), "
            f"{mib(s['endgame_dirty_bytes'])} MiB dirty at the endgame"
        )
    for r in report["relay_runs"]:
        out.append(
            f"relay check, {r['case']}: the relay counted {r.get('relay_to_dst_bytes'):,} bytes "
            f"to the destination ({r.get('relay_connections')} connection(s)), the source "
            f"logged {r.get('wire_bytes') or 0:,}; {r.get('relay_from_dst_bytes'):,} bytes back"
        )
    if res:
        out += ["", resume_table(res), ""]
        out.append(
            f"The dense file, each variant {args.repeat} time(s), interleaved; medians. Every "
            "migration goes through a counting relay (splice): 'bytes up' is all it carried "
            "from the source to the destination over all connections (handshakes, requests, "
            "data), the independent count; the source's count is the 'bytes on the wire' of "
            "its completion line (both ways, all attempts). The cut: the relay shut the first "
            f"connection down once {mib(res['cut_after_up_bytes'])} MiB ({RESUME_CUT:.0%} of "
            "the file) had gone up, then relayed the retry cleanly; the source retries 1 s "
            "after a failed attempt. `--oldstyle`: the listener offers no coverage context, so "
            "the retry starts over from offset 0, as flexnbd 0.5.0 did (same code, same "
            "machine). Times from the mirror request to the source's mirror_wait answer."
        )
        v = res["variants"]
        resumed, restart = v.get("resumed", {}), v.get("restart", {})
        if resumed.get("bytes_ratio") is not None:
            line = (
                f"resume (issue 25): cut at 50% and resumed, {resumed['bytes_ratio']:.3f}x "
                f"the uncut migration's bytes on the wire (target ≤ {RESUME_WIRE_LIMIT}x: "
                f"{'met' if res['target_met'] else 'MISSED'})"
            )
            if restart.get("bytes_ratio") is not None:
                line += f"; 0.5.0's restart {restart['bytes_ratio']:.3f}x"
            if resumed.get("time_ratio") is not None:
                line += (
                    f"; time {resumed['time_ratio']:.2f}x the uncut "
                    f"{fmt(v['uncut']['wait_s'])} s"
                    + (
                        f" (restart: {restart['time_ratio']:.2f}x)"
                        if restart.get("time_ratio") is not None
                        else ""
                    )
                )
            out.append(line)
        if resumed.get("held_bytes") is not None:
            out.append(
                f"the resumed attempts: the destination held {mib(resumed['held_bytes'])} MiB "
                f"of {mib(res['file_size'])} (median), which the source skipped"
            )
        for n in report["resume_notes"]:
            out.append(f"NOTE (odd): {n}")
    if lat:
        out += ["", latency_table(lat), ""]
        out.append(
            f"fio `--rw=randread --bs=4k --iodepth=1`, {fmt(args.latency_runtime)} s, through "
            f"flexnbd-proxy to the source ({mib(dense_size)} MiB, in the page cache); during: a "
            f"migration of it with action `nothing` and max_bps {args.latency_speed:,} in the "
            f"mirror request, fio started {args.latency_lead} s after the request, so its window "
            "lies inside the transfer. Latency: fio's total latency per request (lat = slat + "
            "clat; with the nbd engine clat alone misses the send, and is 2-3 µs for a reply "
            "that was already there); medians over the samples of each percentile."
        )
        if "p99_ratio" in lat:
            out.append(
                f"p99 during / idle: {lat['p99_ratio']:.2f}x (target ≤ {LATENCY_P99_LIMIT}x: "
                f"{'met' if lat['target_met'] else 'MISSED'}); p50: {lat['p50_ratio']:.2f}x"
            )
        if "endgame" in lat:
            e = lat["endgame"]
            out.append(
                f"endgame check: fio ran across the endgame ({e['endgame_in_fio_window']}), "
                f"{e['ok']}/{e['samples']} without error, proxy reconnects "
                f"{e['proxy_reconnects']}, longest request {fmt(e['max_us'])} µs"
            )
    out.append("")
    out.append(
        f"{report['date']}, {report['git_head']}, flexnbd from {report['flexnbd_module']}; load "
        f"{report['loadavg_start'][0]:.2f} → {report['loadavg_end'][0]:.2f}; "
        f"{report['duration_s']:.0f} s in all"
    )
    report["markdown"] = "\n".join(out)
    print(report["markdown"])
    return finish_report(report, json_path)


if __name__ == "__main__":
    run_script(main)

"""One chaos scenario: a source behind flexnbd-proxy with a client writing through it, a
destination listener across a veth pair, a migration started at a random moment, and one to
three faults at random moments; the harness plays systemd and a careful operator meanwhile.

Network: the harness runs in namespace A (source, proxy, workload, the relays on 127.0.0.1);
the destination runs in namespace B at 10.201.0.2. The mirror dials the link relay, which
forwards across the veth pair; the proxy dials the service relay, which forwards to the source
and, once the destination owns the disk, to a server started there on the received file.

The operator's rules (what a user would do):
- the proxy is restarted when it dies (systemd Restart=always);
- a destination listener that ended without completing is started again, fresh;
- a source that ended without completing: first fence the destination (SIGTERM the listener,
  SIGKILL after 5 s); if the listener then reports the migration completed, the destination
  owns the disk; otherwise the source is started again on its file with a fresh listener;
- a `mirror --wait` that ended without completing is issued again 1 s later (or after the
  `break` that ended it, 0.5-2 s later);
- once the listener has exited 0, a server is started on the destination's file and the
  service address moves there.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos import eio, faults
from tests.chaos.link import Link
from tests.chaos.procs import (
    FLEXNBD,
    FLEXNBD_PROXY,
    SYSTEM_PYTHON,
    Proc,
    control,
    free_port,
    proc_figures,
    status,
)

MiB = 1024 * 1024
DEST_IP = "10.201.0.2"
REQUEST_LIMIT = 5          # FLEXNBD_MS_REQUEST_LIMIT_SECS of the source: stalls outlast it
GIVE_UP = 25.0             # after the last fault ended, seconds for the migration to complete
AFTER_TAKEOVER = 1.0       # seconds of writes to the new owner before the end
# The listener's line once its file is synced (not its "no migration completed: ..." line),
# and the source's once the destination confirmed.
COMPLETED_LINE = re.compile(r"migration\.listen:\d+: migration completed: .* received all ")
CONFIRMED_LINE = re.compile(r"migration\.mirror:\d+: migration completed")
# Bounds of a server while it runs (leaks): threads and descriptors.
MAX_THREADS = 48
MAX_FDS = 128


@dataclass
class RunEnv:
    """What every scenario of a run shares."""
    root: Path               # the run's tmpfs
    base: Path               # the 256 MiB image (data and holes)
    shim: Path               # the EIO shim
    netns_b: str             # the destination's namespace
    veth: str                # namespace A's end of the veth pair (tc applies there)
    psk: Path
    port_seq: int = 20000


@dataclass
class Fault:
    kind: str
    at: float
    injected: str | None = None
    injected_at: float | None = None
    ends_at: float | None = None
    ended: bool = False


@dataclass
class Outcome:
    seed: int
    plan: str
    faults: list[Fault]
    migrated: bool = False
    unknown_reported: bool = False
    gave_up: bool = False
    mirror_runs: int = 0
    retried: bool = False           # an attempt failed and the mirror tried again
    completed_at: float | None = None
    evidence: list[str] = field(default_factory=list)       # violations found while running
    notes: list[str] = field(default_factory=list)
    figures: dict[str, tuple[int, int]] = field(default_factory=dict)
    duration: float = 0.0


class Scenario:
    def __init__(self, run: RunEnv, seed: int) -> None:
        self.run = run
        self.seed = seed
        rng = random.Random(seed)
        self.rng = rng
        self.tls = rng.random() < 0.25
        self.unlink = rng.random() < 0.5
        self.max_bps = rng.choice([0, 64 * MiB, 128 * MiB, 256 * MiB])
        self.mirror_at = rng.uniform(0.3, 2.0)
        # (about how long the first attempt takes: the limit counts holes too)
        expected = 0.7 if not self.max_bps else 256 * MiB / self.max_bps
        plan = []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(faults.KINDS)
            plan.append(Fault(kind.name, self.mirror_at + rng.uniform(-0.3, expected)))
        self.faults = sorted(plan, key=lambda f: f.at)
        self.dir = run.root / f"s{seed}"
        self.dst_dir = self.dir / "dst"
        self.src_file = self.dir / "src.img"
        self.dst_file = self.dst_dir / "dst.img"
        self.src_sock = self.dir / "src.sock"
        self.dst_sock = self.dir / "dst.sock"
        self.owner_sock = self.dir / "owner.sock"
        self.journal = self.dir / "journal"
        self.stop_file = self.dir / "stop"
        self.acl_changed: set[Path] = set()
        self.broken_at: float | None = None
        self.t0 = 0.0
        self.outcome = Outcome(seed, self.describe_plan(), self.faults)

    def describe_plan(self) -> str:
        return (f"{'tls ' if self.tls else ''}{'unlink' if self.unlink else 'exit'} "
                f"speed={self.max_bps // MiB or 'max'} mirror@{self.mirror_at:.1f}s faults=" +
                ",".join(f"{f.kind}@{f.at:.1f}s" for f in self.faults))

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- set-up ----------------------------------------------------------------------------

    def _setup(self) -> None:
        self.dir.mkdir()
        self.dst_dir.mkdir()
        # The destination's disk: a small filesystem of its own, room for the file and a bit.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={320 * MiB}", "chaos-dst",
                        str(self.dst_dir)], check=True)
        subprocess.run(["cp", "--sparse=always", str(self.run.base), str(self.src_file)],
                       check=True)
        with open(self.dst_file, "wb") as f:
            f.truncate(self.run.base.stat().st_size)
        self.run.port_seq = self.run.port_seq + 2 if self.run.port_seq < 29000 else 20000
        self.dst_port = self.run.port_seq
        self.owner_port = self.run.port_seq + 1
        self.src_port = free_port()
        self.proxy_port = free_port()
        self.service = Link(("127.0.0.1", self.src_port))
        self.link = Link((DEST_IP, self.dst_port))
        self.switches = {"source": eio.Switch(self.dir / "src.eio"),
                         "destination": eio.Switch(self.dir / "dst.eio")}
        tls_src = ["--tls", "on", "--tls-psk", str(self.run.psk)] if self.tls else []
        tls_dst = ["--tls", "require", "--tls-psk", str(self.run.psk)] if self.tls else []
        src_env = eio.environment(self.run.shim, self.src_file, self.dir / "src.eio",
                                  self.dir / "src.eio.log")
        src_env["FLEXNBD_MS_REQUEST_LIMIT_SECS"] = str(REQUEST_LIMIT)
        self.source = Proc("source", FLEXNBD + [
            "serve", "--addr", "127.0.0.1", "--port", str(self.src_port), "--file",
            str(self.src_file), "--sock", str(self.src_sock), "-v", *tls_src],
            self.dir / "source.log", src_env)
        self.listener = Proc("destination", FLEXNBD + [
            "listen", "--addr", DEST_IP, "--port", str(self.dst_port), "--file",
            str(self.dst_file), "--sock", str(self.dst_sock), "-v", *tls_dst],
            self.dir / "listener.log",
            eio.environment(self.run.shim, self.dst_file, self.dir / "dst.eio",
                            self.dir / "dst.eio.log"), netns=self.run.netns_b)
        self.owner = Proc("new owner", FLEXNBD + [
            "serve", "--addr", DEST_IP, "--port", str(self.owner_port), "--file",
            str(self.dst_file), "--sock", str(self.owner_sock), "-v"],
            self.dir / "owner.log", netns=self.run.netns_b)
        self.proxy = Proc("proxy", FLEXNBD_PROXY + [
            "--addr", "127.0.0.1", "--port", str(self.proxy_port), "--conn-addr", "127.0.0.1",
            "--conn-port", str(self.service.port), "-v"], self.dir / "proxy.log")
        self.workload = Proc("workload", [
            SYSTEM_PYTHON, str(Path(__file__).with_name("workload.py")), str(self.proxy_port),
            str(self.run.base), str(self.journal), str(self.stop_file), str(self.seed)],
            self.dir / "workload.log")
        self.mirror: Proc | None = None

    def server(self, role: str) -> Proc | None:
        """The process a fault on ``role`` acts on: the destination is the listener until the
        migration completed, then the server on the received file."""
        if role == "source":
            return self.source
        return self.owner if self.outcome.migrated else self.listener

    def eio_switch(self, side: str) -> eio.Switch | None:
        return self.switches[side]

    # -- the run ---------------------------------------------------------------------------

    def run_it(self) -> Outcome:
        started = time.monotonic()
        self._setup()
        try:
            self.t0 = time.monotonic()
            self.source.start()
            self.listener.start()
            self._wait_ready(self.source, self.src_sock)
            self._wait_ready(self.listener, self.dst_sock)
            self.proxy.start()
            self.workload.start()
            self._operate()
        finally:
            self._finish()
            self.outcome.duration = time.monotonic() - started
        return self.outcome

    def _wait_ready(self, proc: Proc, sock: Path, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.alive():
            if status(sock):
                return True
            time.sleep(0.02)
        return False

    def _operate(self) -> None:
        out = self.outcome
        next_sample = 0.0
        mirror_retry_at = self.mirror_at
        proxy_dead_at: float | None = None
        taken_over_at: float | None = None
        while True:
            now = self.now()
            self._faults_due(now)
            last_fault = max((f.ends_at or f.injected_at or f.at) for f in self.faults)
            if now >= next_sample:
                self._sample()
                next_sample = now + 0.25
            # systemd: the proxy comes back
            if not self.proxy.alive():
                if proxy_dead_at is None:
                    proxy_dead_at = now
                elif now - proxy_dead_at > 0.2:
                    self.proxy.start()
                    proxy_dead_at = None
            if out.migrated:
                if taken_over_at is None:
                    taken_over_at = now
                if not self.owner.alive():
                    self.owner.start()      # (a fault killed the new owner: systemd again)
                    self._wait_ready(self.owner, self.owner_sock)
                if now - taken_over_at >= AFTER_TAKEOVER:
                    return                  # (faults not due yet are not injected)
                time.sleep(0.05)
                continue
            # the destination
            if not self.listener.alive():
                if self._listener_completed():
                    self._take_over()
                    continue
                self._start_listener()
            # the source
            if not self.source.alive():
                self._source_ended()
                mirror_retry_at = self.now() + 1.0
                continue
            # the mirror
            if self.mirror is None or not self.mirror.alive():
                if self.mirror is not None:
                    ended = (self.mirror.ended_at or time.monotonic()) - self.t0
                    delay = self.rng.uniform(0.5, 2.0) if self.broken_at is not None and \
                        self.broken_at >= ended - 1.0 else 1.0
                    mirror_retry_at = max(mirror_retry_at, ended + delay)
                    self.broken_at = None
                    self._mirror_ended()
                    self.mirror = None
                if now >= mirror_retry_at and self.listener.alive():
                    self._start_mirror()
            if now > last_fault + GIVE_UP:
                out.gave_up = True
                control(self.src_sock, "break")
                return
            time.sleep(0.05)

    def _faults_due(self, now: float) -> None:
        for f in self.faults:
            kind = faults.BY_NAME[f.kind]
            if f.injected_at is None and not f.ended and now >= f.at:
                f.injected = kind.inject(self, self.rng)
                f.injected_at = now
                if f.injected is None or kind.lasts is None:
                    f.ended = True
                else:
                    f.ends_at = now + self.rng.uniform(*kind.lasts)
            elif f.ends_at is not None and not f.ended and now >= f.ends_at:
                assert kind.end is not None
                kind.end(self)
                f.ended = True

    def _sample(self) -> None:
        """Threads and descriptors of each running server (leaks)."""
        for proc in (self.source, self.listener, self.owner, self.proxy):
            if proc.alive() and proc.pid is not None:
                fig = proc_figures(proc.pid)
                if fig is None:
                    continue
                old = self.outcome.figures.get(proc.role, (0, 0))
                self.outcome.figures[proc.role] = (max(old[0], fig[0]), max(old[1], fig[1]))
                if fig[0] > MAX_THREADS or fig[1] > MAX_FDS:
                    self._violation(f"{proc.role} over its bounds: {fig[0]} threads, "
                                    f"{fig[1]} descriptors (at most {MAX_THREADS}, {MAX_FDS})")

    def _violation(self, text: str) -> None:
        if text not in self.outcome.evidence:
            self.outcome.evidence.append(f"{self.now():.2f}s {text}")

    def _listener_completed(self) -> bool:
        """The listener ended after completing the migration: it says so only once its file
        was synced (a kill after that line, which seed 1709 met, does not undo it)."""
        return not self.listener.alive() and \
            COMPLETED_LINE.search(self.listener.this_run_log()) is not None

    def _start_listener(self) -> None:
        self.outcome.notes.append(f"{self.now():.2f}s fresh listener")
        self.listener.start()
        self._wait_ready(self.listener, self.dst_sock)

    def _start_mirror(self) -> None:
        argv = FLEXNBD + ["mirror", "--addr", "127.0.0.1", "--port", str(self.link.port),
                          "--sock", str(self.src_sock), "--wait"]
        if self.unlink:
            argv.append("--unlink")
        self.mirror = Proc("mirror", argv, self.dir / "mirror.log")
        self.mirror.start()
        self.outcome.mirror_runs += 1
        if self.max_bps:
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and self.mirror.alive():
                if control(self.src_sock, "mirror_max_bps", str(self.max_bps)).startswith("0"):
                    break
                time.sleep(0.01)

    def _mirror_ended(self) -> None:
        assert self.mirror is not None
        text = self.mirror.this_run_log()
        if "outcome unknown" in text:
            self.outcome.unknown_reported = True
        self.outcome.notes.append(f"{self.now():.2f}s mirror --wait ended {self.mirror.rc}: "
                                  f"{text.splitlines()[-1] if text.strip() else ''}")

    def _source_ended(self) -> None:
        """The source is gone before the destination completed: fence the destination, then
        either it owns the disk, or the source comes back on its file."""
        log = self.source.this_run_log()
        self.outcome.notes.append(f"{self.now():.2f}s source ended rc={self.source.rc} "
                                  f"({self.source.signalled or 'by itself'})")
        if "migration outcome unknown" in log:
            self.outcome.unknown_reported = True
        confirmed = CONFIRMED_LINE.search(log) is not None
        if confirmed:
            self.listener.wait(10)        # (it confirmed: its exit follows)
        if self.listener.alive():
            self.listener.signal(signal.SIGTERM)
            if self.listener.wait(5) is None:
                self.listener.kill_group()
        if self._listener_completed():
            self._take_over()
            return
        if confirmed:
            self._violation("the source reported the migration completed, but the "
                            "destination did not complete it")
        if not self.src_file.exists():
            self._violation("the source's file is gone, but the destination did not complete")
            return
        if self.source.rc == 0 and self.source.signalled is None:
            self._violation("the source exited 0 by itself without a completed migration")
        self.source.start()
        self._wait_ready(self.source, self.src_sock)
        self._start_listener()

    def _take_over(self) -> None:
        """The destination completed: the source must be done, the new owner serves."""
        out = self.outcome
        out.migrated = True
        out.completed_at = self.now()
        deadline = time.monotonic() + 10
        while self.source.alive() and time.monotonic() < deadline:
            st = status(self.src_sock)
            if st and st.get("clients_allowed") == "false":
                break         # fenced (outcome unknown, or exiting)
            time.sleep(0.05)
        if self.source.alive() and status(self.src_sock).get("clients_allowed") == "true":
            self._violation("two owners: the destination completed and the source still "
                            "admits clients")
        self.owner.start()
        self._wait_ready(self.owner, self.owner_sock)
        self.service.target = (DEST_IP, self.owner_port)
        self.service.cut(reset=False)     # (the proxy reconnects to the new owner)

    # -- the end ---------------------------------------------------------------------------

    def _finish(self) -> None:
        out = self.outcome
        self.stop_file.touch()
        if self.workload.wait(1.0) is None:
            self.workload.kill_group()
        for f in self.faults:
            if f.ends_at is not None and not f.ended:
                kind = faults.BY_NAME[f.kind]
                assert kind.end is not None
                kind.end(self)
                f.ended = True
        if self.mirror is not None:
            self.mirror.wait(10)
            if self.mirror.alive():
                self.mirror.stop(2)
            self._mirror_ended()
        out.retried = "retrying" in self.source.log_text()
        # Who ended how: the source, the listener (a gave-up run may still complete here).
        if self.listener.alive():
            self.listener.stop()
        if not out.migrated and self._listener_completed():
            self._take_over()             # (completed as we gave up: checked there)
        clean = []
        for proc in (self.owner, self.source, self.proxy):
            if proc.alive():
                proc.signal(signal.SIGTERM)
                rc = proc.wait(10)
                if rc is None:
                    self._violation(f"{proc.role} did not stop within 10 s of SIGTERM")
                    proc.kill_group()
                else:
                    clean.append(proc)
        for proc, sock in ((self.source, self.src_sock), (self.owner, self.owner_sock)):
            if proc in clean and sock.exists():
                self._violation(f"{proc.role} left its control socket {sock} behind")
        for proc in (self.mirror, self.listener, self.workload):
            if proc is not None:
                proc.kill_group()
        self.service.close()
        self.link.close()
        subprocess.run(["tc", "qdisc", "del", "dev", self.run.veth, "root"],
                       capture_output=True)
        leftover = _processes_mentioning(str(self.dir))
        if leftover:
            self._violation(f"processes left behind: {leftover}")

    def cleanup(self, keep: Path | None) -> None:
        """Remove the scenario's files, or move them to ``keep`` (a violation's evidence)."""
        if keep is not None:
            shutil.copytree(self.dir, keep, dirs_exist_ok=True,
                            ignore=lambda _, names: [n for n in names if n.endswith(".sock")])
        subprocess.run(["umount", "-l", str(self.dst_dir)], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found

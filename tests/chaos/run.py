"""``make chaos``: the randomized fault campaign (issue 22). Run as root: it makes two network
namespaces joined by a veth pair, a tmpfs for the scenarios' files, and a small tmpfs per
scenario for the destination's disk.

    CHAOS_N=200 CHAOS_SEED=1 python -m tests.chaos [--json FILE] [--keep DIR]

Scenario i runs with seed CHAOS_SEED + i (CHAOS_SEED defaults to the time); each prints one
line with its seed, so ``CHAOS_SEED=S CHAOS_N=1`` repeats it. A violation prints the seed, the
fault log and the evidence, and keeps the scenario's files under --keep (default
./chaos-failures); CHAOS_VERBOSE=1 prints every scenario's fault log, CHAOS_KEEP_ALL=1 keeps
every scenario's files. The last line is ``chaos: N scenarios, K faults injected, V
violations``; the exit status is 1 when V > 0. --json writes the figures RESULTS.md's "Faults"
section is made from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from tests.chaos import checker, eio, faults
from tests.chaos.scenario import MiB, RunEnv, Scenario

DISK = 256 * MiB
# (named after the campaign's process, so that two campaigns can run side by side)
TAG = os.environ.get("CHAOS_TAG") or str(os.getpid())
NS_A, NS_B = f"flexnbd-chaos-{TAG}-a", f"flexnbd-chaos-{TAG}-b"
VETH_A, VETH_B = f"fxc{TAG}a"[:15], f"fxc{TAG}b"[:15]


def main() -> int:
    ap = argparse.ArgumentParser(prog="make chaos")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", type=Path, default=Path("chaos-failures"),
                    help="where a violating scenario's files are kept")
    args = ap.parse_args()
    n = int(os.environ.get("CHAOS_N") or 200)
    seed = int(os.environ.get("CHAOS_SEED") or int(time.time()) % 1_000_000)
    verbose = os.environ.get("CHAOS_VERBOSE") == "1"
    if os.geteuid() != 0:
        print("chaos: must run as root (network namespaces, tc, tmpfs mounts)", file=sys.stderr)
        return 2
    # (a stop signal unwinds: every scenario's processes, mounts and namespaces are removed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.environ.get("CHAOS_INSIDE") != NS_A:
        return _in_namespaces(n, seed)
    return _campaign(n, seed, args.json, args.keep.resolve(), verbose)


def _in_namespaces(n: int, seed: int) -> int:
    """Make the namespaces, run the campaign inside A, take them down whatever happens."""
    _teardown()
    cmds = [["ip", "netns", "add", NS_A], ["ip", "netns", "add", NS_B],
            ["ip", "link", "add", VETH_A, "netns", NS_A, "type", "veth", "peer", "name", VETH_B,
             "netns", NS_B],
            ["ip", "-n", NS_A, "addr", "add", "10.201.0.1/30", "dev", VETH_A],
            ["ip", "-n", NS_B, "addr", "add", "10.201.0.2/30", "dev", VETH_B],
            ["ip", "-n", NS_A, "link", "set", VETH_A, "up"],
            ["ip", "-n", NS_B, "link", "set", VETH_B, "up"],
            ["ip", "-n", NS_A, "link", "set", "lo", "up"],
            ["ip", "-n", NS_B, "link", "set", "lo", "up"]]
    try:
        for cmd in cmds:
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"chaos: {' '.join(cmd)}: {res.stderr.strip()}", file=sys.stderr)
                return 2
        env = {**os.environ, "CHAOS_INSIDE": NS_A, "CHAOS_TAG": TAG, "CHAOS_N": str(n),
               "CHAOS_SEED": str(seed)}
        child = subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, "-m",
                                  "tests.chaos", *sys.argv[1:]], env=env)
        # A stop signal goes to the campaign, which unwinds; Ctrl-C reaches it by itself.
        signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return child.wait()
    finally:
        _teardown()


def _teardown() -> None:
    for ns in (NS_A, NS_B):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _campaign(n: int, seed: int, json_path: Path | None, keep: Path, verbose: bool) -> int:
    root = Path(tempfile.mkdtemp(prefix="flexnbd-chaos-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3g", "flexnbd-chaos", str(root)],
                   check=True)
    try:
        run = RunEnv(root=root, base=root / "base.img", shim=eio.build(root), netns_b=NS_B,
                     veth=VETH_A, psk=root / "keys.psk")
        _make_base(run.base, seed)
        run.psk.write_text("chaos:" + random.Random(seed).randbytes(32).hex() + "\n")
        run.psk.chmod(0o600)
        print(f"chaos: {n} scenarios, seeds {seed}..{seed + n - 1}", flush=True)
        tally = Tally()
        for i in range(n):
            sc = Scenario(run, seed + i)
            outcome = sc.run_it()
            journal = checker.read_journal(sc.journal)
            owner = sc.dst_file if outcome.migrated else sc.src_file
            found = outcome.evidence + journal.violations + \
                checker.check_disk(owner, run.base, journal)
            if journal.writes == 0:
                found.append("the workload had no write acknowledged in the whole scenario")
            tally.add(sc, outcome, journal, found)
            print(f"[{i + 1}/{n}] seed={sc.seed} {tally.label(outcome)} "
                  f"{outcome.duration:.1f}s writes={journal.writes} flushes={journal.flushes} "
                  f"| {outcome.plan}", flush=True)
            where = keep / f"seed-{sc.seed}"
            if found or verbose:
                if found:
                    print(f"  VIOLATION in seed {sc.seed} (files kept in {where}):")
                for f in outcome.faults:
                    print(f"  fault {f.kind} at {f.at:.2f}s: {f.injected or 'nothing to act on'}"
                          + (f", ended at {f.ends_at:.2f}s" if f.ends_at else ""))
                for note in outcome.notes:
                    print(f"  note {note}")
                for line in found:
                    print(f"  evidence: {line}")
                sys.stdout.flush()
            if found or os.environ.get("CHAOS_KEEP_ALL") == "1":
                sc.cleanup(where)
            else:
                sc.cleanup(None)
        if json_path is not None:
            json_path.write_text(json.dumps(tally.figures(seed, n), indent=1) + "\n")
        print(f"chaos: {n} scenarios, {tally.injected} faults injected, "
              f"{tally.violations} violations", flush=True)
        return 1 if tally.violations else 0
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
        os.rmdir(root)


def _make_base(path: Path, seed: int) -> None:
    """256 MiB of random data and holes, in runs of 64 KiB to 4 MiB, about half of each."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(DISK)
        offset = 0
        while offset < DISK:
            length = min(DISK - offset, rng.randrange(1, 65) * 64 * 1024)
            if rng.random() < 0.5:
                f.seek(offset)
                f.write(rng.randbytes(length))
            offset += length


class Tally:
    def __init__(self) -> None:
        self.injected = 0
        self.violations = 0
        self.scenarios = 0
        self.kinds: Counter[str] = Counter()          # faults injected, by kind
        self.not_injected: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.recovery: dict[str, list[float]] = defaultdict(list)   # fault -> completion
        self.pause: dict[str, list[float]] = defaultdict(list)      # fault -> next write
        self.duration: list[float] = []
        self.figures_seen: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.records: list[dict] = []

    @staticmethod
    def label(o) -> str:
        if o.migrated:
            return "completed-after-retry" if o.mirror_runs > 1 or o.retried else "completed"
        if o.unknown_reported:
            return "unknown-and-fenced"
        return "not-completed"

    def add(self, sc: Scenario, o, journal: checker.Journal, found: list[str]) -> None:
        self.scenarios += 1
        self.duration.append(o.duration)
        self.outcomes[self.label(o)] += 1
        self.records.append({"seed": o.seed, "outcome": self.label(o), "plan": o.plan,
                             "seconds": round(o.duration, 2), "violations": found,
                             "faults": [[f.kind, round(f.at, 2), f.injected]
                                        for f in o.faults]})
        if found:
            self.violations += 1
        for role, (threads, fds) in o.figures.items():
            seen = self.figures_seen[role]
            seen[0], seen[1] = max(seen[0], threads), max(seen[1], fds)
        for f in o.faults:
            if f.injected is None:
                self.not_injected[f.kind] += 1
                continue
            self.injected += 1
            self.kinds[f.kind] += 1
            start = f.ends_at if f.ends_at is not None else f.injected_at
            assert start is not None
            if o.migrated and o.completed_at is not None and o.completed_at >= start:
                self.recovery[f.kind].append(o.completed_at - start)
            at_ms = (sc.t0 + start) * 1000
            later = [t for t in journal.ack_times if t >= at_ms]
            if later:
                self.pause[f.kind].append((later[0] - at_ms) / 1000)

    def figures(self, seed: int, n: int) -> dict:
        def spread(values: list[float]) -> dict:
            return {"n": len(values), "median": round(statistics.median(values), 2),
                    "max": round(max(values), 2)} if values else {"n": 0}
        return {
            "seeds": [seed, seed + n - 1], "scenarios": self.scenarios,
            "faults_injected": self.injected, "violations": self.violations,
            "outcomes": dict(self.outcomes),
            "kinds": {k.name: {"injected": self.kinds[k.name],
                               "nothing_to_act_on": self.not_injected[k.name],
                               "completion_after": spread(self.recovery[k.name]),
                               "next_write_after": spread(self.pause[k.name]),
                               "completion_after_all": [round(x, 2) for x in
                                                        self.recovery[k.name]],
                               "next_write_after_all": [round(x, 2) for x in
                                                        self.pause[k.name]]}
                      for k in faults.KINDS},
            "scenario_seconds": spread(self.duration),
            "max_threads_fds": {k: v for k, v in self.figures_seen.items()},
            "scenarios_run": self.records,
        }


if __name__ == "__main__":
    sys.exit(main())

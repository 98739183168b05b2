"""The "Faults" section of benchmarks/RESULTS.md from one or more campaigns' JSON (--json of
``python -m tests.chaos``): ``python -m tests.chaos.report A.json [B.json ...]`` prints the
tables (markdown) and writes the merged figures to benchmarks/results/chaos.json."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from tests.chaos.faults import KINDS

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "chaos.json"


def merge(parts: list[dict]) -> dict:
    outcomes: Counter[str] = Counter()
    for p in parts:
        outcomes.update(p["outcomes"])
    kinds = {}
    for k in KINDS:
        rows = [p["kinds"][k.name] for p in parts]
        kinds[k.name] = {
            "injected": sum(r["injected"] for r in rows),
            "nothing_to_act_on": sum(r["nothing_to_act_on"] for r in rows),
            "completion_after_all": [x for r in rows for x in r["completion_after_all"]],
            "next_write_after_all": [x for r in rows for x in r["next_write_after_all"]]}
    seconds = [s["seconds"] for p in parts for s in p["scenarios_run"]]
    figures: dict[str, list[int]] = {}
    for p in parts:
        for role, (threads, fds) in p["max_threads_fds"].items():
            old = figures.get(role, [0, 0])
            figures[role] = [max(old[0], threads), max(old[1], fds)]
    return {"seeds": [[p["seeds"][0], p["seeds"][1]] for p in parts],
            "scenarios": sum(p["scenarios"] for p in parts),
            "faults_injected": sum(p["faults_injected"] for p in parts),
            "violations": sum(p["violations"] for p in parts),
            "outcomes": dict(outcomes), "kinds": kinds, "scenario_seconds": seconds,
            "max_threads_fds": figures,
            "scenarios_run": [s for p in parts for s in p["scenarios_run"]]}


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} / {max(values):.1f}"


def markdown(m: dict) -> str:
    lines = [f"{m['scenarios']} scenarios (seeds {', '.join(f'{a}-{b}' for a, b in m['seeds'])}),"
             f" {m['faults_injected']} faults injected, **{m['violations']} violations**.", "",
             "| outcome | scenarios |", "|---|---|"]
    for name in ("completed", "completed-after-retry", "unknown-and-fenced", "not-completed"):
        lines.append(f"| {name} | {m['outcomes'].get(name, 0)} |")
    lines += ["", "| fault | injected | found nothing to act on | migration completed after "
              "(s, median / max) | next acknowledged write after (s, median / max) |",
              "|---|---|---|---|---|"]
    for name, k in m["kinds"].items():
        lines.append(f"| {name} | {k['injected']} | {k['nothing_to_act_on']} | "
                     f"{_spread(k['completion_after_all'])} | "
                     f"{_spread(k['next_write_after_all'])} |")
    s = m["scenario_seconds"]
    lines += ["", f"Scenario length: median {statistics.median(s):.1f} s, max {max(s):.1f} s. "
              "Most threads / descriptors seen in a running process: " +
              ", ".join(f"{role} {t} / {f}" for role, (t, f) in
                        sorted(m["max_threads_fds"].items())) + "."]
    return "\n".join(lines)


def main() -> int:
    parts = [json.loads(Path(a).read_text()) for a in sys.argv[1:]]
    if not parts:
        print("usage: python -m tests.chaos.report A.json [B.json ...]", file=sys.stderr)
        return 2
    merged = merge(parts)
    RESULTS.write_text(json.dumps(merged, indent=1) + "\n")
    print(markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())

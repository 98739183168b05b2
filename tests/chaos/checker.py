"""What must hold after a chaos scenario, judged from the workload's journal and the owner's
file (the ownership and leak rules are checked while the scenario runs, in scenario.py).

For every block the workload wrote: the owner's file holds a whole block of ours, a version
that was sent, and at least as new as the newest FLUSH-acknowledged one ("FLUSHed write lost"
otherwise) and the newest acknowledged one ("acknowledged write lost": NBD allows that only on
a crash of the machine, and here only processes die, so we hold flexnbd to it); a block never
acknowledged may hold the original. Every block the workload never touched equals the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.workload import BLOCK, parse

CHUNK = 1024 * 1024


@dataclass
class Journal:
    sent: dict[int, set[int]] = field(default_factory=dict)
    acked: dict[int, int] = field(default_factory=dict)
    flushed: dict[int, int] = field(default_factory=dict)
    writes: int = 0
    flushes: int = 0
    errors: int = 0
    reconnects: int = 0
    ack_times: list[int] = field(default_factory=list)       # ms, CLOCK_MONOTONIC
    violations: list[str] = field(default_factory=list)


def read_journal(path: Path) -> Journal:
    j = Journal()
    acked_since_flush: dict[int, int] = {}
    pending: dict[int, int] | None = None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return j
    for line in lines:
        word = line.split()
        if not word:
            continue
        try:
            if word[0] == "w":
                j.sent.setdefault(int(word[1]), set()).add(int(word[2]))
            elif word[0] == "a" and len(word) == 4:
                b, v = int(word[1]), int(word[2])
                j.acked[b] = max(j.acked.get(b, 0), v)
                acked_since_flush[b] = v
                j.writes += 1
                j.ack_times.append(int(word[3]))
            elif word[0] == "e":
                j.errors += 1
            elif word[0] == "f":
                # what this FLUSH covers: every write acknowledged before it was sent (those
                # of a FLUSH that failed or was cut included)
                pending = {**(pending or {}), **acked_since_flush}
                acked_since_flush = {}
            elif word[0] == "F" and len(word) == 2 and pending is not None:
                for b, v in pending.items():
                    j.flushed[b] = max(j.flushed.get(b, 0), v)
                pending = None
                j.flushes += 1
            elif word[0] == "c":
                j.reconnects += 1
            elif word[0] == "V":
                j.violations.append(line[2:])
        except (ValueError, IndexError):
            continue            # (the last line, cut by the kill)
    return j


def check_disk(owner: Path, base: Path, j: Journal) -> list[str]:
    """The owner's file against the journal and the original; the violations."""
    found: list[str] = []
    written = set(j.sent)
    try:
        o, b = open(owner, "rb"), open(base, "rb")
    except OSError as e:
        return [f"the owner's file cannot be read: {e}"]
    with o, b:
        offset = 0
        while True:
            mine, orig = o.read(CHUNK), b.read(CHUNK)
            if not orig:
                if mine:
                    found.append(f"the owner's file is longer than the disk ({owner})")
                break
            if len(mine) != len(orig):
                found.append(f"the owner's file is shorter than the disk ({owner})")
                break
            for i in range(0, len(orig), BLOCK):
                blk = (offset + i) // BLOCK
                got = mine[i:i + BLOCK]
                if blk not in written:
                    if got != orig[i:i + BLOCK]:
                        found.append(f"block {blk}, never written, differs from the original")
                    continue
                found.extend(_check_block(blk, got, orig[i:i + BLOCK], j))
            offset += len(orig)
            if len(found) > 20:
                found.append("(more not listed)")
                break
    return found


def _check_block(blk: int, got: bytes, orig: bytes, j: Journal) -> list[str]:
    acked, flushed = j.acked.get(blk, 0), j.flushed.get(blk, 0)
    seen = parse(got)
    if seen is None:
        if got != orig:
            return [f"block {blk} holds neither a block of ours nor the original"]
        if flushed:
            return [f"FLUSHed write lost: block {blk} holds the original, version {flushed} "
                    "was FLUSH-acknowledged"]
        if acked:
            return [f"acknowledged write lost: block {blk} holds the original, version "
                    f"{acked} was acknowledged"]
        return []
    off, version = seen
    if off != blk * BLOCK:
        return [f"block {blk} holds the block written at offset {off}"]
    if version not in j.sent[blk]:
        return [f"block {blk} holds version {version}, which was never sent"]
    if version < flushed:
        return [f"FLUSHed write lost: block {blk} holds version {version}, version {flushed} "
                "was FLUSH-acknowledged"]
    if version < acked:
        return [f"acknowledged write lost: block {blk} holds version {version}, version "
                f"{acked} was acknowledged"]
    return []

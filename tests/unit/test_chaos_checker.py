"""The chaos campaign's checker finds what it must: a lost FLUSHed or acknowledged write, a
version never sent, a torn block, a changed block nobody wrote; and nothing in a good file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.checker import check_disk, read_journal
from tests.chaos.workload import BLOCK, block

BLOCKS = 600          # more than one checker chunk (256 blocks)


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.img"
    base.write_bytes(os.urandom(BLOCKS * BLOCK))
    owner = tmp_path / "owner.img"
    owner.write_bytes(base.read_bytes())
    return base, owner


def put(path: Path, blk: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(blk * BLOCK)
        f.write(data)


def journal(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "journal"
    path.write_text("".join(line + "\n" for line in lines))
    return path


# block 5: version 1 acknowledged and FLUSHed, version 2 acknowledged after the last FLUSH;
# block 300: version 1 sent, no answer (the connection died); block 599: version 1
# acknowledged, a FLUSH failed, version 2 acknowledged, a FLUSH acknowledged (covers both).
LINES = ["c 1", "w 5 1", "a 5 1 10", "f", "F 11", "w 300 1",
         "c 13", "w 599 1", "a 599 1 14", "f", "x", "w 599 2", "a 599 2 15", "f", "F 16",
         "w 5 2", "a 5 2 17", "w 7 1"]     # (a last line cut by the kill: no answer)


def good(owner: Path) -> None:
    put(owner, 5, block(5 * BLOCK, 2))
    put(owner, 599, block(599 * BLOCK, 2))


def test_a_good_file_passes(tmp_path, disk):
    base, owner = disk
    good(owner)
    j = read_journal(journal(tmp_path, *LINES))
    assert (j.writes, j.flushes, j.reconnects) == (4, 2, 2)
    assert j.flushed == {5: 1, 599: 2} and j.acked == {5: 2, 599: 2}
    assert check_disk(owner, base, j) == []
    put(owner, 300, block(300 * BLOCK, 1))        # the unanswered write landed: fine too
    put(owner, 7, block(7 * BLOCK, 1))
    assert check_disk(owner, base, j) == []


@pytest.mark.parametrize("blk,data,words", [
    (5, None, "FLUSHed write lost"),                      # back to the original
    (599, 1, "FLUSHed write lost"),                       # the failed FLUSH's write, old
    (5, 1, "acknowledged write lost"),                    # flushed 1 kept, acked 2 lost
    (5, 3, "never sent"),
    (300, 2, "never sent"),
    (5, "torn", "neither a block of ours nor the original"),
    (6, "other", "never written, differs"),
    (5, "moved", "written at offset"),
])
def test_each_violation_is_found(tmp_path, disk, blk, data, words):
    base, owner = disk
    good(owner)
    if data is None:
        put(owner, blk, base.read_bytes()[blk * BLOCK:(blk + 1) * BLOCK])
    elif data == "torn":
        put(owner, blk, block(blk * BLOCK, 2)[:2048] + block(blk * BLOCK, 1)[2048:])
    elif data == "other":
        put(owner, blk, b"x" * BLOCK)
    elif data == "moved":
        put(owner, blk, block(6 * BLOCK, 2))
    else:
        put(owner, blk, block(blk * BLOCK, data))
    found = check_disk(owner, base, read_journal(journal(tmp_path, *LINES)))
    assert len(found) == 1 and words in found[0], found


def test_a_short_or_missing_file_is_a_violation(tmp_path, disk):
    base, owner = disk
    j = read_journal(journal(tmp_path, *LINES))
    with open(owner, "r+b") as f:
        f.truncate(100 * BLOCK)
    assert any("shorter" in v for v in check_disk(owner, base, j))
    owner.unlink()
    assert any("cannot be read" in v for v in check_disk(owner, base, j))


def test_the_harness_tells_a_completion_from_its_absence():
    """A harness that took "no migration completed: ..." for a completion started a second
    owner itself (an early campaign): the lines are told apart."""
    from tests.chaos.scenario import COMPLETED_LINE, CONFIRMED_LINE
    done = ("1:I:7 client-1 migration.listen:80: migration completed: /d.img received all "
            "268435456 bytes from 10.201.0.1:5")
    not_done = ("1:W:7 client-1 migration.listen:63: 10.201.0.1:5: no migration completed: "
                "the sender left without DISC after writing 1 of 2 bytes")
    assert COMPLETED_LINE.search(done) and not COMPLETED_LINE.search(not_done)
    assert CONFIRMED_LINE.search("1:I:7 mirror migration.mirror:418: migration completed: 2 "
                                 "bytes of data sent")
    assert not CONFIRMED_LINE.search(done) and not CONFIRMED_LINE.search(not_done)

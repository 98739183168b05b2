"""Listen mode's completion rule (SPEC §6.1): the destination side of a migration.

A migration into a listening server has COMPLETED only when one sender, in one session, wrote
every byte of the export at least once (WRITE and WRITE_ZEROES both count), had no request
answered with an error, and then sent NBD_CMD_DISC. A probe that connects and sends DISC, a
sender that drops half-way or sends a bad request: nothing completes, and the next sender
starts over with an empty coverage map.

Coverage is kept by the hot path in a bitmap of 512-byte blocks (export sizes are multiples of
512), set for blocks a single request covered entirely; the pieces of blocks that a request
covered only in part are listed too (at most 4 MiB of them per session: beyond that an
unaligned write is refused with EINVAL), and checked when the session ends, so a sender whose
unaligned writes cover every byte between them completes, and no byte is ever counted that was
not written.
"""

from __future__ import annotations

from flexnbd import _core
from flexnbd._allocmap import AllocationMap

COVERAGE_SHIFT = 9


def new_coverage(size: int) -> AllocationMap:
    """An empty coverage map for one sender's session."""
    coverage = AllocationMap(size, COVERAGE_SHIFT)
    coverage.set_complete()
    return coverage


def covered_bytes(coverage: AllocationMap, connection: _core.Connection) -> int:
    """Bytes in blocks that the session wrote entirely: blocks one request covered (the map),
    plus blocks that several unaligned requests covered together (their pieces, counted by
    the hot path without building a Python object per piece)."""
    return coverage.count_bytes() + connection.partial_covered_bytes()


def session_outcome(result: _core.ServeResult, coverage: AllocationMap,
                    connection: _core.Connection, size: int) -> str | None:
    """None when the session completed the migration, else why it did not (for the log)."""
    covered = covered_bytes(coverage, connection)
    errors = connection.errors
    if result.reason != _core.Reason.REASON_DISC:
        return f"the sender left without DISC after writing {covered} of {size} bytes"
    if errors:
        return f"{errors} request(s) of the sender were answered with an error"
    if covered < size:
        return f"the sender sent DISC after writing only {covered} of {size} bytes"
    return None

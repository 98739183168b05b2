"""Listen mode's completion rule (SPEC §6.1): the destination side of a migration.

A migration into a listening server has COMPLETED only when one sender, in one session, wrote
every byte of the export at least once (WRITE and WRITE_ZEROES both count), had no request
answered with an error, and then sent NBD_CMD_DISC. A probe that connects and sends DISC, a
sender that drops half-way or sends a bad request: nothing completes, and the next sender
starts over with an empty coverage map.

Coverage is kept by the hot path as the list of byte ranges the session wrote, merged as they
come (a mirror writes in order: one range, whatever the export's size, and no memory or time
in proportion to it). A sender whose writes, aligned or not, cover every byte between them
completes, and no byte is ever counted that was not written. At most 256 Ki disjoint ranges
(4 MiB) per session: beyond that a write that would start one more is refused with EINVAL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flexnbd import _core, log
from flexnbd._allocmap import CoverageMap

_log = log.get("server")
# What the operator sees at the default level: who sent, what came, the final sync, the exit.
_milestones = log.milestones()


def new_coverage(size: int) -> CoverageMap:
    """An empty coverage map for one sender's session."""
    return CoverageMap(size)


def session_outcome(result: _core.ServeResult, coverage: CoverageMap,
                    connection: _core.Connection, size: int) -> str | None:
    """None when the session completed the migration, else why it did not (for the log)."""
    covered = coverage.covered_bytes()
    errors = connection.errors
    if result.reason != _core.Reason.REASON_DISC:
        return f"the sender left without DISC after writing {covered} of {size} bytes"
    if errors:
        return f"{errors} request(s) of the sender were answered with an error"
    if covered < size:
        return f"the sender sent DISC after writing only {covered} of {size} bytes"
    return None


def take_control(name: str, result: _core.ServeResult, coverage: CoverageMap,
                 connection: _core.Connection, export: _core.Export,
                 refuse_everyone: Callable[[], None]) -> bool | None:
    """A sender's session ended. True when it completed the migration and this server took
    control: every byte covered, then DISC; new clients refused; the file synced. Only then
    may the sender's socket be closed normally (its confirmation, SPEC §6.7). None when the
    session completed nothing (wait for the next sender); False when the final sync failed,
    or when a write or sync of the file failed with EIO (the sender is told with a reset; the
    listener exits 1: the error is sticky, so no later sender could complete, and a fresh
    listener, which a new sender rewrites entirely, can)."""
    why_not = session_outcome(result, coverage, connection, export.size)
    _milestones.info("sender %s: received %d bytes of data and %d bytes of zeroes in %d "
                     "requests, covering %d of %d bytes (%s)", name, coverage.received_bytes,
                     coverage.zeroed_bytes, connection.requests, coverage.covered_bytes(),
                     export.size, "then DISC" if result.reason == _core.Reason.REASON_DISC
                     else "no DISC")
    if why_not is not None and export.io_error:
        _log.critical("%s: no migration completed, and a write or sync of %s failed with an "
                      "I/O error: this listener cannot vouch for the file any more; exiting "
                      "(a fresh listener can receive the migration again)", name, export.path)
        return False
    if why_not is not None:
        _log.warning("%s: no migration completed: %s; waiting for the next sender", name,
                     why_not)
        return None
    refuse_everyone()
    started = time.monotonic()
    try:
        export.sync()
    except OSError as e:
        _log.critical("migration received but %s could not be synced: %s; the sender is told "
                      "with a reset and keeps its copy", export.path, e.strerror)
        return False
    _milestones.info("migration completed: %s received all %d bytes from %s, final sync in "
                     "%.2f s; this server has control now and admits no one (coverage: %d "
                     "bytes in memory)", export.path, export.size, name,
                     time.monotonic() - started, coverage.memory_bytes)
    return True


def log_exit(has_control: bool, sender: CoverageMap | None, size: int) -> None:
    """The listener stops: say whether it holds a completed migration (exit 0) or not (1)."""
    if has_control:
        _milestones.info("exiting: the migration completed and was handed off (exit status 0)")
        return
    covered = sender.covered_bytes() if sender is not None else 0
    _milestones.info("exiting without a completed migration (exit status 1): %s",
                     f"the last sender covered {covered} of {size} bytes"
                     if sender is not None else "no sender connected")

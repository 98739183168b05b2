"""Listen mode's completion rule (SPEC §6.1): the destination side of a migration.

A migration into a listening server has COMPLETED only when its sender wrote every byte of
the export at least once (WRITE and WRITE_ZEROES both count), had no request of its last
session answered with an error, and then sent NBD_CMD_DISC. A probe that connects and sends
DISC, a sender that drops half-way or sends a bad request: nothing completes.

What "its sender wrote" spans (``Coverage``): a flexnbd sender names its migration (the meta
context flexnbd:coverage:<migration id>, one id per `mirror`); its sessions with that id, one
after another in this process, share one coverage map, which a reconnecting sender reads with
BLOCK_STATUS to resend only what is missing (issue 25). A session of another migration starts
a new map; a session of none (0.5.0's sender, a probe) gets a map of its own, and if it sent a
single write-type request the kept map is dropped (the file may have changed under it). The
map lives in this process only: a restarted listener knows no migration, and its sender
resends everything. That is the listener's incarnation: nothing survives it to be trusted.

Coverage is kept by the hot path as the list of byte ranges the session wrote, merged as they
come (a mirror writes in order: one range, whatever the export's size, and no memory or time
in proportion to it). A sender whose writes, aligned or not, cover every byte between them
completes, and no byte is ever counted that was not written. At most 256 Ki disjoint ranges
(4 MiB) per map (one migration, or one session of none): beyond that a write that would start
one more is refused with EINVAL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flexnbd import _core, log
from flexnbd._allocmap import CoverageMap

_log = log.get("server")
# What the operator sees at the default level: who sent, what came, the final sync, the exit.
_milestones = log.milestones()


class Coverage:
    """What the migration being received covers, kept across its sender's reconnects."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.migration_id: str | None = None     # the migration kept (None: none)
        self.kept: CoverageMap | None = None
        self.current: CoverageMap | None = None   # the map of the sender in the slot, or last
        self._lock = threading.Lock()

    def take(self, migration_id: str | None) -> CoverageMap:
        """A session takes the sender's slot (under the admission lock: one at a time, and
        only once the previous holder's ``ended`` ran): the map it writes into. The kept
        one for the same migration, else a new one (kept when the session names one)."""
        with self._lock:
            if migration_id is not None and migration_id == self.migration_id and \
                    self.kept is not None:
                _milestones.info("migration %s resumes: %d of %d bytes received before",
                                 migration_id, self.kept.covered_bytes(), self.size)
                coverage = self.kept
            else:
                coverage = CoverageMap(self.size)
                if migration_id is not None:
                    self._drop(f"migration {migration_id} began")
                    self.migration_id, self.kept = migration_id, coverage
            self.current = coverage
            return coverage

    def ended(self, coverage: CoverageMap, writes: int) -> None:
        """A session that held the slot ended after ``writes`` write-type requests: one of
        no migration that may have changed the file drops the kept map."""
        with self._lock:
            if coverage is not self.kept and writes:
                self._drop("a sender of no migration wrote to the file")

    def _drop(self, why: str) -> None:
        if self.kept is not None and self.kept.covered_bytes():
            _milestones.info("coverage of migration %s dropped (%s): its sender will resend "
                             "everything", self.migration_id, why)
        self.migration_id = self.kept = None


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

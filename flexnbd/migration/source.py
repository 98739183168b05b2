"""The source side's control of migrations: one ``MirrorControl`` per server.

It owns the running mirror and the migration lock, and answers the control socket's mirror
requests (start, speed, break, wait) with outcomes (``flexnbd.migration.outcome``), which the
control socket words. It reaches the server only through the narrow ``SourceHost`` below.

The lock is held around a mirror's start, its endgame (inside ``Mirror``), ``break`` and
``shutdown()``: a stop signal or a ``break`` either prevents a mirror from starting or waits
for its endgame, and then sees it completed (or its outcome unknown), never half done.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Protocol

from flexnbd import log, sockets
from flexnbd.migration import outcome
from flexnbd.migration.mirror import Mirror, MirrorHost
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import PROGRESS_SECS, REQUEST_LIMIT_SECS, MirrorSettings
from flexnbd.status import Migration

_log = log.get("server")


class SourceHost(MirrorHost, Protocol):
    """What migrations need from the server, beyond what one mirror needs."""

    @property
    def has_control(self) -> bool: ...

    def request_stop(self, reason: str) -> None: ...


class MirrorControl:
    """``request_limit``: the server's FLEXNBD_MS_REQUEST_LIMIT_SECS, for every mirror;
    ``progress_interval``: its FLEXNBD_MIRROR_PROGRESS_SECS."""

    def __init__(self, host: SourceHost, request_limit: float = REQUEST_LIMIT_SECS,
                 progress_interval: float = PROGRESS_SECS) -> None:
        self.host = host
        self.request_limit = request_limit
        self.progress_interval = progress_interval
        self.lock = threading.Lock()
        self.mirror: Mirror | None = None
        self.migrated = False            # a mirror completed with action exit or unlink
        self.stopped_while_mirroring = False
        self.shutting_down = False

    # -- the control socket's requests --------------------------------------------------------

    def start(self, settings: MirrorSettings) -> Result:
        """Start a mirror; the outcome of its first attempt."""
        with self.lock:
            if self.shutting_down:
                return Result(Outcome.SHUTTING_DOWN)
            if self.mirror is not None and (self.mirror.running or self.migrated):
                return Result(Outcome.BUSY)
            if not self.host.has_control:
                # A listener that has not received its migration has nothing to send.
                return Result(Outcome.ABANDONED)
            # (the request names the destination; how long to wait is this server's setting)
            settings = dataclasses.replace(settings, request_limit=self.request_limit,
                                           progress_interval=self.progress_interval)
            mirror = Mirror(self.host, settings, self.lock, self._finished)
            self.mirror = mirror
            mirror.running = True
        _log.info("mirror to %s port %d (action %s) requested", settings.addr, settings.port,
                  settings.action)
        return mirror.start()

    def set_max_bps(self, max_bps: int | None) -> bool:
        """Change the running mirror's speed limit; False if no mirror runs."""
        mirror = self.mirror
        if mirror is None or not mirror.running:
            return False
        mirror.set_max_bps(max_bps)
        return True

    def break_(self) -> Result:
        """Stop the running mirror: STOPPED with what it stopped, or why there was none to
        stop (COMPLETED, UNKNOWN, NOT_MIRRORING)."""
        with self.lock:      # never in the middle of an endgame
            mirror = self.mirror
            if mirror is None:
                return Result(Outcome.NOT_MIRRORING)
            if mirror.completed:
                return Result(Outcome.COMPLETED)
            if mirror.outcome_unknown:
                return Result(Outcome.UNKNOWN)
            if not mirror.running:
                return Result(Outcome.NOT_MIRRORING)
            mirror.stop()
        mirror.join()
        # (after the join: the figures the attempt ended with)
        p = mirror.settings
        return Result(Outcome.STOPPED, outcome.stopped(
            p.addr, p.port, mirror.attempts if mirror.announced else 0, mirror.bytes_sent,
            mirror.bytes_sent + mirror.bytes_left()))

    def wait(self) -> Result | Callable[[], Result]:
        """NOT_MIRRORING now, or a function that waits until the mirror ends: its result."""
        mirror = self.mirror
        if mirror is None:
            return Result(Outcome.NOT_MIRRORING)

        def ended() -> Result:
            mirror.finished.wait()
            return mirror.result
        return ended

    # -- the status line ----------------------------------------------------------------------

    @property
    def is_mirroring(self) -> bool:
        return self.mirror is not None and self.mirror.running

    def figures(self) -> Migration | None:
        """The migration figures of the status line, while mirroring."""
        mirror = self.mirror
        if mirror is None or not mirror.running:
            return None
        return Migration(speed=mirror.speed(), duration=mirror.duration(),
                         seconds_left=max(mirror.seconds_left(), 0),
                         bytes_left=mirror.bytes_left(),
                         speed_limit=mirror.settings.max_bps,
                         destination=sockets.host_port(mirror.settings.addr,
                                                       mirror.settings.port))

    def outcome_key(self) -> str | None:
        """The status line's migration_outcome: only once a mirror has ended."""
        mirror = self.mirror
        if mirror is None or not mirror.finished.is_set():
            return None
        if mirror.completed:
            return "completed"
        if mirror.outcome_unknown:
            return "unknown"
        stopped = mirror.result.outcome in (Outcome.STOPPED, Outcome.SHUTTING_DOWN)
        return "stopped" if stopped else "failed"

    # -- the server stopping ------------------------------------------------------------------

    def shutdown(self) -> None:
        """The server stops: no mirror may start from now on; a running one is stopped (its
        data did not move), one in its endgame is waited for."""
        with self.lock:
            self.shutting_down = True
            mirror = self.mirror
            if mirror is not None and mirror.running and not mirror.completed:
                self.stopped_while_mirroring = True
                mirror.stop(shutting_down=True)
        if mirror is not None:
            mirror.join()

    def exit_status(self) -> int:
        """0, but 1 if a mirror was stopped with its data not moved, or its outcome is
        unknown."""
        if self.migrated:
            return 0
        if self.mirror is not None and self.mirror.outcome_unknown:
            return 1
        return 1 if self.stopped_while_mirroring else 0

    def _finished(self, mirror: Mirror) -> None:
        if mirror.settings.action not in ("exit", "unlink"):
            return
        if mirror.completed:
            self.migrated = True
            self.host.request_stop("migration completed")
        elif mirror.outcome_unknown:
            self.host.request_stop("migration outcome unknown")

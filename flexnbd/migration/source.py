"""The source side's control of migrations: one ``MirrorControl`` per server.

It owns the running mirror and the migration lock, and answers the control socket's mirror
requests (start, speed, break, wait) with the replies of ``flexnbd.control.protocol``. It
reaches the server only through the narrow ``SourceHost`` below.

The lock is held around a mirror's start, its endgame (inside ``Mirror``), ``break`` and
``shutdown()``: a stop signal or a ``break`` either prevents a mirror from starting or waits
for its endgame, and then sees it completed (or its outcome unknown), never half done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from flexnbd import log
from flexnbd.control import protocol
from flexnbd.control.protocol import Reply
from flexnbd.migration.mirror import (
    SHUTTING_DOWN,
    STOPPED,
    Mirror,
    MirrorHost,
    MirrorParams,
)
from flexnbd.status import Migration

_log = log.get("server")


class SourceHost(MirrorHost, Protocol):
    """What migrations need from the server, beyond what one mirror needs."""

    @property
    def has_control(self) -> bool: ...

    def request_stop(self, reason: str) -> None: ...


class MirrorControl:
    def __init__(self, host: SourceHost) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.mirror: Mirror | None = None
        self.migrated = False            # a mirror completed with action exit or unlink
        self.stopped_while_mirroring = False
        self.shutting_down = False

    # -- the control socket's requests --------------------------------------------------------

    def start(self, command: protocol.MirrorCommand) -> Reply:
        with self.lock:
            if self.shutting_down:
                return protocol.SHUTTING_DOWN
            if self.mirror is not None and (self.mirror.running or self.migrated):
                return protocol.MIRROR_RUNNING
            if not self.host.has_control:
                # A listener that has not received its migration has nothing to send.
                return protocol.MIRRORING_ABANDONED
            mirror = Mirror(self.host, MirrorParams(command.ip, command.port, command.action,
                                                    command.bind, command.max_bps),
                            self.lock, self._finished)
            self.mirror = mirror
            mirror.running = True
        _log.info("mirror to %s port %d (action %s) requested", command.ip, command.port,
                  command.action)
        return mirror.start()

    def set_max_bps(self, max_bps: int | None) -> Reply:
        mirror = self.mirror
        if mirror is None or not mirror.running:
            return protocol.NOT_CURRENTLY_MIRRORING
        mirror.set_max_bps(max_bps)
        return protocol.UPDATED

    def break_(self) -> Reply:
        with self.lock:      # never in the middle of an endgame
            mirror = self.mirror
            if mirror is None:
                return protocol.NOT_MIRRORING
            if mirror.completed:
                return protocol.MIRROR_COMPLETED
            if mirror.outcome_unknown:
                return protocol.MIGRATION_OUTCOME_UNKNOWN
            if not mirror.running:
                return protocol.NOT_MIRRORING
            mirror.stop()
        mirror.join()
        return protocol.MIRROR_STOPPED

    def wait(self) -> Reply | Callable[[], Reply]:
        mirror = self.mirror
        if mirror is None:
            return protocol.NOT_MIRRORING

        def outcome() -> Reply:
            mirror.finished.wait()
            return Reply(0 if mirror.completed else 1, mirror.outcome.text)
        return outcome

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
                         bytes_left=mirror.bytes_left(), speed_limit=mirror.max_bps)

    def outcome_key(self) -> str | None:
        """The status line's migration_outcome: only once a mirror has ended."""
        mirror = self.mirror
        if mirror is None or not mirror.finished.is_set():
            return None
        if mirror.completed:
            return "completed"
        if mirror.outcome_unknown:
            return "unknown"
        return "stopped" if mirror.outcome in (STOPPED, SHUTTING_DOWN) else "failed"

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
        if mirror.params.action not in ("exit", "unlink"):
            return
        if mirror.completed:
            self.migrated = True
            self.host.request_stop("migration completed")
        elif mirror.outcome_unknown:
            self.host.request_stop("migration outcome unknown")

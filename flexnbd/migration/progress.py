"""What a running mirror tells the operator: the pacing of its progress lines, and the words
and units of its milestone lines (start, progress, failed attempts, end).

The lines themselves are logged by ``flexnbd.migration.mirror`` through ``log.milestones()``,
so that they show at the default level and name the mirror's module (scripts match
``migration.mirror:LINE: migration completed``). Figures are exact byte counts; rates and
times are rounded for people.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flexnbd.migration.outcome import Outcome
from flexnbd.migration.settings import PROGRESS_SECS

# How a mirror that did not complete ended, for its last line.
ENDED = {
    Outcome.STOPPED: "stopped (break)",
    Outcome.SHUTTING_DOWN: "stopped (the server is stopping)",
    Outcome.UNKNOWN: "ended with its outcome unknown",
    Outcome.REJECTED: "failed (the destination refused it)",
    Outcome.ABANDONED: "abandoned",
}


class Pacer:
    """Says when the next progress line is due: once ``interval`` seconds have passed since
    the last one (or since ``restart()``). ``clock`` is injectable for tests."""

    def __init__(self, interval: float = PROGRESS_SECS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last = clock()

    def restart(self) -> None:
        self._last = self.clock()

    def due(self) -> bool:
        now = self.clock()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


def rate(bytes_per_second: float) -> str:
    """``12.3 MiB/s`` (binary units, as the sizes in the README)."""
    value = float(bytes_per_second)
    for unit in ("B/s", "KiB/s", "MiB/s"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB/s"


def eta(seconds: int) -> str:
    """Seconds left as a person reads them; ``unknown`` before anything was sent."""
    if seconds < 0:
        return "unknown"
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def percent(sent: int, left: int) -> float:
    """How far the attempt is: what it sent of what it sent plus what is left (dirty data
    makes it step back, as it should)."""
    total = sent + left
    return 100.0 * sent / total if total else 100.0

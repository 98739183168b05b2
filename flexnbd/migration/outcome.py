"""What became of a mirror, or of a request about one, in the migration's own words.

The migration package reports outcomes; it never words them. ``flexnbd.control.protocol``
turns them into the control socket's replies (one outcome may read differently per request: a
stopped mirror is a success for ``break`` and a failure for ``mirror_wait``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.Enum):
    # the first attempt of a mirror (a failure of it ends the mirror too)
    STARTED = enum.auto()                    # connected and checked: the mirror runs
    FAILED_TO_CONNECT = enum.auto()          # no TCP connection
    REJECTED = enum.auto()                   # not NBD, refused the handshake, or TLS failed
    NO_RESPONSE = enum.auto()                # the handshake did not finish in time
    SIZE_MISMATCH = enum.auto()              # the destination exports another size
    # how a mirror ended
    COMPLETED = enum.auto()                  # the destination confirmed (SPEC §6.7)
    UNKNOWN = enum.auto()                    # DISC went out and was not confirmed
    STOPPED = enum.auto()                    # `break`
    SHUTTING_DOWN = enum.auto()              # the server stops
    ABANDONED = enum.auto()                  # ended for no cause of its own, or nothing to send
    # requests that found no mirror to act on, or one too many
    BUSY = enum.auto()                       # one runs already, or one has migrated the disk
    NOT_MIRRORING = enum.auto()


@dataclass(frozen=True)
class Result:
    """An outcome and why, where that is worth saying (None otherwise)."""

    outcome: Outcome
    detail: str | None = None

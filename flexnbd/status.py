"""The status line (SPEC §5.1): what ``status`` on the control socket answers.

The line is space-separated ``key=value`` pairs, each pair followed by ONE space, then LF (so
the line ends in ``" \\n"``). Keys and values never contain a space or ``=``; booleans are
``true``/``false``. The control reply is ``0: `` followed by this line.

Always present, in this order:

``pid``
    the server's process id.
``size``
    the export size in bytes (the file size rounded down to a multiple of 512).
``is_mirroring``
    a migration (mirror) is running.
``clients_allowed``
    new clients are accepted; false during the migration endgame.
``num_clients``
    clients connected right now, counted from accept (handshake included) to close; refused
    connections never count and a closed connection stops counting at once.
``has_control``
    this server owns the data: always true in serve mode; in listen mode false until a
    migration into it has completed.

Only while mirroring, in this order, after ``has_control``:

``migration_speed``
    payload bytes per second, averaged since the current attempt began (holes sent as
    WRITE_ZEROES carry none: the speed limit applies to what the network carries).
``migration_duration``
    seconds since the current attempt began.
``migration_seconds_left``
    estimated seconds until the migration completes.
``migration_bytes_left``
    payload bytes still to send (the first pass's data, or all of it to a destination without
    WRITE_ZEROES, plus dirty data).
``migration_speed_limit``
    the ``mirror_max_bps`` limit in bytes per second, only when a limit is set.

New keys (flexnbd 0.6), after the above; old keys keep their meaning:

``allocation_map_method``
    how the allocation map was built: ``fiemap``, ``seek`` (SEEK_DATA/SEEK_HOLE), ``none``
    (everything counts as allocated), or ``pending`` while it is still being built.
``handshake``
    the handshake the server offers: ``newstyle`` (fixed newstyle) or ``oldstyle``.
``migration_destination``
    only while mirroring: where the mirror sends, ``ADDR:PORT`` (``[ADDR]:PORT`` for IPv6), the
    address as the ``mirror`` request gave it, normalised (``mirror --wait`` follows a running
    mirror only if it goes where it asked).
``migration_outcome``
    only once a mirror has ended: ``completed`` (the destination confirmed), ``unknown`` (DISC
    was sent and the destination did not confirm: it may own the disk, SPEC §6.7),
    ``stopped`` (``break`` or a stop signal) or ``failed``.
``io_error``
    only once a write or sync of the file failed with EIO: ``true``. Acknowledged data may be
    lost; every later FLUSH and FUA request fails with EIO until the server restarts.

Listen mode only, last (flexnbd 0.6), about the current sender's session, or the last one's
once it ended (all 0 before any sender):

``received_bytes``
    bytes of data the sender wrote (WRITE payloads answered without error).
``zeroed_bytes``
    bytes the sender zeroed (WRITE_ZEROES answered without error: a mirror's holes).
``covered_bytes``
    bytes of the export the sender has written at least once, by either; the migration can
    complete (DISC) once it equals ``size``.

Pure: formatting and parsing only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

Value = Union[bool, int, float, str]

BASE_KEYS = ("pid", "size", "is_mirroring", "clients_allowed", "num_clients", "has_control")
MIGRATION_KEYS = ("migration_speed", "migration_duration", "migration_seconds_left",
                  "migration_bytes_left", "migration_speed_limit")
EXTRA_KEYS = ("allocation_map_method", "handshake", "migration_destination", "migration_outcome",
              "io_error")
RECEIVED_KEYS = ("received_bytes", "zeroed_bytes", "covered_bytes")


@dataclass
class Migration:
    """The migration figures shown while mirroring."""

    speed: int                   # B/s, average since the attempt began
    duration: int                # seconds
    seconds_left: int
    bytes_left: int
    speed_limit: int | None = None   # B/s, None when no limit is set
    destination: str | None = None   # ADDR:PORT ([ADDR]:PORT for IPv6)


@dataclass
class Received:
    """Listen mode: what the current (or last) sender wrote (over its migration's sessions)."""

    data: int = 0                # WRITE payload bytes
    zeroed: int = 0              # WRITE_ZEROES bytes
    covered: int = 0             # bytes of the export written at least once
    migration_id: str | None = None    # the migration they belong to (a flexnbd sender's)


@dataclass
class Status:
    pid: int
    size: int
    is_mirroring: bool = False
    clients_allowed: bool = True
    num_clients: int = 0
    has_control: bool = True
    migration: Migration | None = None
    allocation_map_method: str = "none"
    handshake: str = "newstyle"
    migration_outcome: str | None = None     # completed | unknown | stopped | failed
    io_error: bool = False
    received: Received | None = None         # listen mode only

    def pairs(self) -> list[tuple[str, Value]]:
        """(key, value) in the order of the status line."""
        out: list[tuple[str, Value]] = [
            ("pid", self.pid), ("size", self.size), ("is_mirroring", self.is_mirroring),
            ("clients_allowed", self.clients_allowed), ("num_clients", self.num_clients),
            ("has_control", self.has_control),
        ]
        m = self.migration
        if self.is_mirroring and m is not None:
            out += [("migration_speed", m.speed), ("migration_duration", m.duration),
                    ("migration_seconds_left", m.seconds_left),
                    ("migration_bytes_left", m.bytes_left)]
            if m.speed_limit is not None:
                out.append(("migration_speed_limit", m.speed_limit))
        out += [("allocation_map_method", self.allocation_map_method),
                ("handshake", self.handshake)]
        if self.is_mirroring and m is not None and m.destination is not None:
            out.append(("migration_destination", m.destination))
        if self.migration_outcome is not None:
            out.append(("migration_outcome", self.migration_outcome))
        if self.io_error:
            out.append(("io_error", True))
        r = self.received
        if r is not None:
            out += [("received_bytes", r.data), ("zeroed_bytes", r.zeroed),
                    ("covered_bytes", r.covered)]
            if r.migration_id is not None:
                out.append(("migration_id", r.migration_id))
        return out

    def line(self) -> str:
        """The status line, with the trailing space and LF."""
        return format_pairs(self.pairs())


def format_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if not text or any(c in text for c in " =\n\r\t"):
        raise ValueError(f"status value {text!r} has a space or '='")
    return text


def format_pairs(pairs: list[tuple[str, Value]]) -> str:
    return "".join(f"{key}={format_value(value)} " for key, value in pairs) + "\n"


def parse_line(line: str) -> dict[str, str]:
    """A status line -> {key: value text}, in order. ValueError if a pair has no ``=``."""
    out: dict[str, str] = {}
    for pair in line.split():
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"bad status pair {pair!r}")
        out[key] = value
    return out


def typed(value: str) -> Value:
    """``true``/``false`` -> bool, a decimal number -> int (or float), anything else as is."""
    if value == "true":
        return True
    if value == "false":
        return False
    if value.isascii() and value.lstrip("-").isdigit():
        return int(value)
    try:
        number = float(value)
    except ValueError:
        return value
    return number if value.isascii() and any(c.isdigit() for c in value) else value


def to_json(line: str) -> str:
    """A status line as one JSON object with typed values, keys in line order."""
    return json.dumps({k: typed(v) for k, v in parse_line(line).items()})

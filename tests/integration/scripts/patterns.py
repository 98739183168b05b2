"""Deterministic test data, shared by the libnbd script (system python) and the tests (venv).

Standard library only: it is imported by both interpreters.
"""

from __future__ import annotations

import hashlib


def pattern(seed: int, length: int) -> bytes:
    """`length` bytes that depend on `seed` and look random (no short period)."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:length])

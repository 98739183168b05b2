"""Byte counts and rates as an operator writes them on the command line: ``4096``, ``50M``,
``1.5G``, ``64KiB``. The one parser for ``--max-speed`` (mirror, mirror-speed) and ``--from``
/ ``--size`` (read, write).

A number, then optionally a suffix K, M, G or T, case-insensitive, each a power of 1024 (so
``M``, ``MB`` and ``MiB`` all mean 2^20: block devices count in binary), optionally followed
by ``B`` or ``iB``; a bare ``B`` after the number is allowed too. A fraction is allowed
(``1.5G``) when the result is a whole number of bytes (``0.5K`` is 512; ``0.1K`` is refused:
a count of bytes has no fraction). No sign, exponent, space or digit grouping. The control
socket's wire stays decimal (``flexnbd.control.protocol``): this is for people, not peers.

Pure: parsing only.
"""

from __future__ import annotations

import re
from fractions import Fraction

SUFFIXES = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
HELP = ("a number of bytes, or with a suffix K, M, G or T (powers of 1024, case-insensitive; "
        "an optional B or iB may follow: 64K, 50MiB, 1.5G)")
# Longer than any count that fits in 64 bits with a fraction: refuse before doing arithmetic.
_MAX_TEXT = 48
_FORM = re.compile(r"([0-9]+)(?:\.([0-9]+))?([kmgt]?)(i?b)?", re.ASCII | re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """``text`` as a whole number of bytes. ValueError (with a message fit for a usage error)
    when it is not one."""
    m = _FORM.fullmatch(text) if len(text) <= _MAX_TEXT else None
    if m is None:
        raise ValueError(f"{text!r} is not {HELP}")
    whole, fraction, suffix, unit = m.groups()
    if unit is not None and unit.lower() == "ib" and not suffix:
        raise ValueError(f"{text!r}: 'iB' needs a K, M, G or T before it")
    value = Fraction(int(whole)) + (Fraction(int(fraction), 10 ** len(fraction))
                                    if fraction else 0)
    value *= 1024 ** SUFFIXES[suffix.lower()]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)

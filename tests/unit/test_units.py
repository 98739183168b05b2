"""Byte counts and rates as operators write them (``flexnbd.units``): the one parser of
``--max-speed``, ``--from`` and ``--size``."""

from __future__ import annotations

import pytest

from flexnbd.units import parse_bytes

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize("text,value", [
    ("0", 0), ("4096", 4096), ("007", 7),
    ("64K", 64 * K), ("64k", 64 * K), ("64KB", 64 * K), ("64KiB", 64 * K), ("64kib", 64 * K),
    ("50M", 50 * M), ("50MB", 50 * M), ("50MiB", 50 * M), ("50m", 50 * M),
    ("1G", G), ("1.5G", G + G // 2), ("2T", 2 * T), ("0.5K", 512), ("0.25M", 256 * K),
    ("512B", 512), ("512b", 512), ("1.0", 1),
    ("18446744073709551615", (1 << 64) - 1),
])
def test_good(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", [
    "", " ", "K", "M", ".5K", "5.", "-5", "+5", "1e6", "5X", "5P", "5E", "5 M", " 5M", "5M ",
    "5_000", "5,000", "0x10", "5iB", "5MBB", "5Mi", "١٢٣", "5K\n", "nan", "inf",
    "0.1K",          # 102.4 bytes: not a whole number
    "1.5",           # a fraction of a byte
    "9" * 49,        # too long to be any count
])
def test_bad(text):
    with pytest.raises(ValueError) as e:
        parse_bytes(text)
    assert repr(text) in str(e.value)

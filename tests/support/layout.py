"""The data/hole layout of a file as the tests expect the allocation map to see it: an
independent SEEK_DATA/SEEK_HOLE scan, block runs, and hole punching."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

BS = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def seek_scan(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] data extents of the file below ``size``, from SEEK_DATA/SEEK_HOLE."""
    out = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        if data >= size:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        out.append((data, min(hole, size)))
        pos = hole
    return out


def block_runs(data: Iterable[tuple[int, int]], size: int, start: int = 0,
               end: int | None = None) -> list[tuple[int, int, bool]]:
    """Merged (offset, length, allocated) runs covering [start, end) of a ``size``-byte map in
    which every block touching a data extent is allocated."""
    end = size if end is None else end
    spans: list[list[int]] = []
    for s, e in sorted(data):
        s = s // BS * BS
        e = min(-(-e // BS) * BS, size)
        if s >= e:
            continue
        if spans and s <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], e)
        else:
            spans.append([s, e])
    runs: list[tuple[int, int, bool]] = []

    def add(a: int, b: int, state: bool) -> None:
        a, b = max(a, start), min(b, end)
        if a >= b:
            return
        if runs and runs[-1][2] == state and runs[-1][0] + runs[-1][1] == a:
            runs[-1] = (runs[-1][0], runs[-1][1] + b - a, state)
        else:
            runs.append((a, b - a, state))
    pos = 0
    for s, e in spans:
        add(pos, s, False)
        add(s, e, True)
        pos = e
    add(pos, size, False)
    return runs


def punch_fd(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

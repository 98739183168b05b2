"""The export's own mapping for copied READs: made when the file is at most the bound
(FLEXNBD_EXPORT_MAP_MIB, read once by the CLI), never for a larger or empty one. The CLI's
whole-number variables refuse anything but ASCII digits in range."""

from __future__ import annotations

import os

import pytest

from flexnbd import _core, cli
from flexnbd.config import EXPORT_MAP_MAX
from flexnbd.errors import UsageError

MiB = 1 << 20


@pytest.mark.parametrize("text,expected", [
    (None, EXPORT_MAP_MAX), ("", EXPORT_MAP_MAX), ("0", 0), ("16", 16 * MiB),
    ("1048576", 1 << 40),
])
def test_the_bound_from_the_environment(monkeypatch, text, expected):
    if text is None:
        monkeypatch.delenv("FLEXNBD_EXPORT_MAP_MIB", raising=False)
    else:
        monkeypatch.setenv("FLEXNBD_EXPORT_MAP_MIB", text)
    assert cli._export_map_max() == expected


@pytest.mark.parametrize("text", ["x", "-1", "1.5", "1048577", " 8", "\u00b2", "\u0661"])
@pytest.mark.parametrize("name,read", [("FLEXNBD_EXPORT_MAP_MIB", cli._export_map_max),
                                       ("FLEXNBD_IDLE_SPIN_US", cli._idle_spin)])
def test_a_bad_number_is_a_usage_error(monkeypatch, text, name, read):
    """Anything but ASCII digits within the range, "²" (a digit to str.isdigit, not to int)
    and "١" (an Arabic-Indic one) among them, is a usage error naming the variable."""
    monkeypatch.setenv(name, text)
    with pytest.raises(UsageError, match=name):
        read()


@pytest.mark.parametrize("size,bound,mapped", [
    (4 * MiB, 4 * MiB, True), (4 * MiB + 4096, 4 * MiB, False), (4 * MiB, 0, False),
    (0, 4 * MiB, False),
])
def test_the_export_is_mapped_only_up_to_the_bound(tmp_path, size, bound, mapped):
    path = tmp_path / "disk"
    path.write_bytes(b"")
    os.truncate(path, size)
    fd = os.open(path, os.O_RDWR)
    try:
        export = _core.Export(fd, size, False, str(path), map_max=bound)
        assert export.mapped is mapped
        del export                               # (unmapped: the fd can go)
    finally:
        os.close(fd)

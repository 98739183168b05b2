"""A mirror's settings: the speed limit has one home (the running mirror's settings, replaced
whole), and FLEXNBD_MS_REQUEST_LIMIT_SECS is read once by the CLI, a bad value meaning the
default as it always has."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from flexnbd import cli
from flexnbd.migration.mirror import CHUNK, Mirror
from flexnbd.migration.settings import REQUEST_LIMIT_SECS, MirrorSettings

MiB = 1 << 20


def test_the_speed_limit_has_one_home():
    host = SimpleNamespace(size=MiB)
    settings = MirrorSettings("127.0.0.1", 10809, "nothing", max_bps=10 * MiB)
    mirror = Mirror(host, settings, threading.Lock(), lambda m: None)  # type: ignore[arg-type]
    assert mirror._chunk() == MiB                  # a tenth of a second's worth
    mirror.set_max_bps(2 * MiB)
    assert mirror.settings == MirrorSettings("127.0.0.1", 10809, "nothing", max_bps=2 * MiB)
    assert mirror._chunk() == 2 * MiB // 10 // 4096 * 4096
    mirror.set_max_bps(0)                          # 0: no limit
    assert mirror.settings.max_bps is None and mirror._chunk() == CHUNK


@pytest.mark.parametrize("text,expected", [
    (None, REQUEST_LIMIT_SECS), ("", REQUEST_LIMIT_SECS), ("2", 2.0), ("0.5", 0.5),
    ("x", REQUEST_LIMIT_SECS), ("0", REQUEST_LIMIT_SECS), ("-3", REQUEST_LIMIT_SECS),
    ("nan", REQUEST_LIMIT_SECS),
])
def test_request_limit_from_the_environment(monkeypatch, text, expected):
    if text is None:
        monkeypatch.delenv("FLEXNBD_MS_REQUEST_LIMIT_SECS", raising=False)
    else:
        monkeypatch.setenv("FLEXNBD_MS_REQUEST_LIMIT_SECS", text)
    assert cli._request_limit() == expected

"""A mirror stopped before its supervisor started (a SIGTERM between the `mirror` request and
the thread's start; CI met it in test_sigterm_at_varied_moments: "cannot join thread before
it is started", a traceback and exit 1) neither starts nor fails the server's stop."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from flexnbd.migration.mirror import Mirror
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import MirrorSettings


def test_a_mirror_stopped_before_it_starts_never_starts():
    finished: list[Mirror] = []
    host = SimpleNamespace(size=1 << 20, export=SimpleNamespace(track_dirty=lambda on: None))
    mirror = Mirror(host, MirrorSettings("127.0.0.1", 10809), threading.Lock(),  # type: ignore[arg-type]
                    finished.append)
    mirror.stop(shutting_down=True)
    mirror.join()                                   # at once, no error
    assert mirror.start() == Result(Outcome.ABANDONED)
    assert (mirror.running, mirror.completed, mirror.result) == \
        (False, False, Result(Outcome.SHUTTING_DOWN))
    assert mirror.finished.is_set() and finished == [mirror]
    assert mirror._thread is None                   # no supervisor was started

"""lifecycle.StopSignals: a stop signal or request always ends the wait, whenever it comes."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest

from flexnbd import lifecycle


@pytest.fixture
def handlers():
    """StopSignals installs process-wide handlers: put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (*lifecycle.STOP_SIGNALS, signal.SIGPIPE)}
    made: list[lifecycle.StopSignals] = []
    yield made
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    for s in made:
        os.close(s._wake_r)
        os.close(s._wake_w)


def test_a_signal_at_any_moment_of_the_wait_ends_it(handlers):
    """Signals at random moments early in the wait (the handler runs on the main thread
    while it waits) each end it with that signal."""
    rng = random.Random(27)
    for _ in range(300):
        s = lifecycle.StopSignals()
        handlers.append(s)
        timer = threading.Timer(rng.uniform(0, 0.003), os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        assert s.wait(10) == signal.SIGTERM
        timer.join()
        assert s.name() == "SIGTERM"


def test_a_request_from_another_thread_ends_the_wait(handlers):
    s = lifecycle.StopSignals()
    handlers.append(s)
    threading.Timer(0.01, s.request_stop, ("a finished migration",)).start()
    assert s.wait(10) is None
    assert s.name() == "a finished migration"


def test_the_first_reason_is_kept(handlers):
    s = lifecycle.StopSignals()
    handlers.append(s)
    s.request_stop("first")
    os.kill(os.getpid(), signal.SIGINT)
    assert s.wait(10) is None and s.name() == "first"


def test_a_wait_with_nothing_times_out(handlers):
    s = lifecycle.StopSignals()
    handlers.append(s)
    assert s.wait(0.05) is None

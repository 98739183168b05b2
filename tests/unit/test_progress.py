"""A running mirror's progress lines (flexnbd.migration.progress): paced by an injected
clock, never more often than the interval; rates, times left and percentages as people read
them."""

from __future__ import annotations

from flexnbd.migration.outcome import Outcome
from flexnbd.migration.progress import ENDED, Pacer, eta, percent, rate


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_most_every_interval():
    clock = Clock()
    pacer = Pacer(10.0, clock)
    due = []
    for _ in range(100):          # a send every 0.7 s for 70 s
        clock.now += 0.7
        due.append(pacer.due())
    times = [i for i, d in enumerate(due) if d]
    assert len(times) == 6        # at 10.5, 21, 31.5, 42, 52.5, 63 s
    assert all((b - a) * 0.7 >= 10.0 for a, b in zip(times, times[1:], strict=False))


def test_restart_waits_a_whole_interval_again():
    clock = Clock()
    pacer = Pacer(10.0, clock)
    clock.now += 9.9
    pacer.restart()               # a new attempt begins
    clock.now += 9.9
    assert not pacer.due()
    clock.now += 0.1
    assert pacer.due() and not pacer.due()


def test_a_stalled_mirror_gets_no_line_of_its_own():
    """Lines come with sends: a long stall, then one line, not a burst."""
    clock = Clock()
    pacer = Pacer(10.0, clock)
    clock.now += 95
    assert pacer.due() and not pacer.due()


def test_units():
    assert rate(0) == "0.0 B/s"
    assert rate(1536) == "1.5 KiB/s"
    assert rate(3 * 1024 * 1024) == "3.0 MiB/s"
    assert rate(5 << 30) == "5.0 GiB/s"
    assert eta(-1) == "unknown"
    assert eta(42) == "42 s"
    assert eta(600) == "10 min 0 s"
    assert eta(3 * 3600 + 120) == "3 h 2 min"
    assert percent(0, 0) == 100.0
    assert percent(25, 75) == 25.0


def test_every_end_of_a_mirror_that_did_not_complete_has_words():
    for outcome in (Outcome.STOPPED, Outcome.SHUTTING_DOWN, Outcome.UNKNOWN, Outcome.REJECTED,
                    Outcome.ABANDONED):
        assert ENDED[outcome]

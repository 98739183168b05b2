"""The one polling wait of the tests, and waiting for a process's log lines."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02):
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def log_lines(proc, level: str, *words: str) -> list[str]:
    """The log lines of ``proc`` at ``level`` (I, W, E) that contain every word (any case)."""
    return [line for line in proc.log().splitlines()
            if f":{level}:" in line and all(w in line.lower() for w in words)]


def wait_logged(proc, level: str, *words: str, count: int = 1, timeout: float = 30.0) -> None:
    assert wait_until(lambda: len(log_lines(proc, level, *words)) >= count, timeout), \
        f"no {count} {level} line(s) with {words} in the log of {proc.args}:\n{proc.log()}"

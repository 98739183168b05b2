"""Logging in the SPEC §9 format, to stderr.

Each line: ``<monotonic ms>:<D|I|W|E|F>:<pid> <thread name> <module:line>: <message>``.
The handler formats the whole line first and writes it with one ``os.write`` under a lock, so
lines from different threads never interleave (and a line stays whole even if stderr is a pipe
shared with other processes, up to PIPE_BUF bytes).

Milestones: a migration's start, progress, failed attempts and end, and why a listener exits,
are logged at info (``I``) through ``milestones()``, a logger whose own level lets info
through at the default verbosity: an operator sees a migration without ``-v``, and still no
other info line. ``-q`` silences them with the rest; ``-v`` changes nothing for them. The
line format is unchanged (no new level letter), so parsers of SPEC §9 keep working.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time

LOGGER_NAME = "flexnbd"
MILESTONES_NAME = f"{LOGGER_NAME}.milestones"

_LEVEL_LETTERS = {
    logging.DEBUG: "D",
    logging.INFO: "I",
    logging.WARNING: "W",
    logging.ERROR: "E",
    logging.CRITICAL: "F",
}


class LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ms = int(time.monotonic() * 1000)
        letter = _LEVEL_LETTERS.get(record.levelno, "I")
        message = record.getMessage().replace("\n", " ")
        if record.exc_info and record.levelno <= logging.DEBUG:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        thread = record.threadName or "main"
        return (f"{ms}:{letter}:{record.process} {thread.replace(' ', '_')} "
                f"{_module_name(record.pathname, record.module)}:{record.lineno}: {message}")


@functools.lru_cache(maxsize=256)
def _module_name(pathname: str, module: str) -> str:
    """The module's dotted path inside the package (control.server, not just server)."""
    marker = os.sep + "flexnbd" + os.sep
    if marker not in pathname:
        return module
    inner = pathname.rsplit(marker, 1)[1]
    return os.path.splitext(inner)[0].replace(os.sep, ".")


class LineHandler(logging.Handler):
    """Writes each formatted line with a single write(2) to a file descriptor."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self._write_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            with self._write_lock:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
        except Exception:  # noqa: BLE001 - logging must never take the server down
            pass


def setup(verbosity: int = 0) -> logging.Logger:
    """verbosity: -1 quiet (fatal only), 0 warnings and errors, 1 info (debug with
    FLEXNBD_DEBUG=1)."""
    root = logging.getLogger(LOGGER_NAME)
    if verbosity < 0:
        level = logging.CRITICAL
    elif verbosity == 0:
        level = logging.WARNING
    elif os.environ.get("FLEXNBD_DEBUG") == "1":
        level = logging.DEBUG
    else:
        level = logging.INFO
    root.setLevel(level)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = LineHandler(2)
    handler.setFormatter(LineFormatter())
    root.addHandler(handler)
    root.propagate = False
    # (its records reach the root's handler whatever the root's level: only this one counts)
    milestones().setLevel(logging.CRITICAL if verbosity < 0 else logging.INFO)
    logging.raiseExceptions = False
    return root


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def milestones() -> logging.Logger:
    """The logger of a migration's milestones: info lines shown at the default level."""
    return logging.getLogger(MILESTONES_NAME)

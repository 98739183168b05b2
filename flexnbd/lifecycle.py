"""Process lifecycle: stop signals, readiness, ordered shutdown, exit status.

SIGINT, SIGTERM and SIGQUIT ask the running program to stop; SIGPIPE is ignored (a client that
goes away is an error return, never a dead process). The handlers only set an event; the main
thread does the ordered shutdown:

1. tell systemd ``STOPPING=1`` (when NOTIFY_SOCKET is set);
2. stop accepting and close the NBD listener(s);
3. let each connected client finish its current request, then close it (clients still in the
   handshake are closed at once);
4. remove the control socket;
5. exit: 0, but 1 if a migration was running (its data did not move) or, in listen mode, if no
   migration completed.

Readiness: ``READY=1`` goes to systemd once ``start()`` has returned, that is once the NBD
listener(s) accept and the control socket answers.

The server is reached through the small ``Runnable`` interface below; this module never imports
the server.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from typing import Protocol

from flexnbd import log, notify

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)

_log = log.get("lifecycle")


class StopSignals:
    """Installs the stop-signal handlers; ``wait()`` returns the signal that arrived.

    ``request_stop()`` ends the wait from any thread without a signal (for example when a
    finished migration ends the program).

    The handler takes no lock: it records the signal and writes a byte to a pipe that
    ``wait()`` polls. (It once set a threading.Event, whose lock the main thread holds for a
    moment in every Event.wait(); a signal handled in that moment, handlers run on the main
    thread, waited for that lock for ever: a server that never stopped on SIGTERM.)"""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.reason: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None and self.reason is None:
            self.signum = signum
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass             # (the pipe is full of wake-ups already)

    def request_stop(self, reason: str) -> None:
        if self.signum is None and self.reason is None:
            self.reason = reason
        self._wake()

    def wait(self, timeout: float | None = None) -> int | None:
        """Until a stop signal or request (its signal, None for a request), or ``timeout``
        seconds (None). Polled in short slices so the main thread runs the handlers
        promptly."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if select.select([self._wake_r], [], [], max(left, 0))[0]:
                return self.signum
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def name(self) -> str:
        if self.signum:
            return signal.Signals(self.signum).name
        return self.reason or "request"


class Runnable(Protocol):
    request_stop: Callable[[str], None]

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def exit_status(self) -> int: ...


def run(server: Runnable, signals: StopSignals, announce_stop: bool = False) -> int:
    """Start the server, report readiness, serve until a stop signal, stop in order; the
    exit status. ``announce_stop``: why and how it stops are milestones, logged at the
    default level (a listener: its exit says whether the migration arrived)."""
    said = log.milestones().info if announce_stop else _log.info
    server.request_stop = signals.request_stop
    server.start()
    _notified(notify.ready())
    signals.wait()
    # Already stopping: further stop signals change nothing. Ignoring them (rather than
    # keeping the Python handler) also covers the end of interpreter shutdown, where Python
    # puts its own handlers back to the default action, which would kill the process.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    said("stopping on %s", signals.name())
    _notified(notify.stopping())
    server.stop()
    status = server.exit_status()
    said("stopped; exit status %d", status)
    return status


def _notified(error: str | None) -> None:
    if error:
        _log.warning("%s", error)

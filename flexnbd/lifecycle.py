"""Process lifecycle: stop signals and waiting for them.

SIGINT, SIGTERM and SIGQUIT ask the running program to stop; SIGPIPE is ignored (a client that
goes away is an error return, never a dead process). The handlers only set an event; the main
thread does the ordered shutdown.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


class StopSignals:
    """Installs the stop-signal handlers; ``wait()`` returns the signal that arrived."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    def wait(self, timeout: float | None = None) -> int | None:
        # Event.wait in short slices so the main thread runs the handlers promptly.
        while not self.event.wait(0.5 if timeout is None else timeout):
            if timeout is not None:
                return None
        return self.signum

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "request"

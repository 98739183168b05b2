"""The accept loop the fake peers share: accept until stopped, hand each socket over."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable


def accept_until(listener: socket.socket, stop: threading.Event,
                 on_accept: Callable[[socket.socket], None], poll: float = 0.1) -> None:
    """Accept connections on ``listener`` until ``stop`` is set (checked every ``poll``
    seconds) or the listener is closed; ``on_accept`` gets each new socket."""
    while not stop.is_set():
        try:
            ready, _, _ = select.select([listener], [], [], poll)
        except (OSError, ValueError):
            return
        if not ready:
            continue
        try:
            sock, _ = listener.accept()
        except OSError:
            continue
        on_accept(sock)

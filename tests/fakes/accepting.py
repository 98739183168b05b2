"""What the fake peers share: the accept loop (accept until stopped, hand each socket over),
and closing their sockets: with a reset, or all at once when the peer is shut down."""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable, Iterable


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


def reset(sock: socket.socket) -> None:
    """Close with a reset (RST), not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def close_all(socks: Iterable[socket.socket], threads: Iterable[threading.Thread],
              timeout: float) -> None:
    """Wake the threads blocked on ``socks`` (shutdown), join them, then close the sockets."""
    socks = list(socks)
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    for t in threads:
        t.join(timeout)
    for s in socks:
        s.close()

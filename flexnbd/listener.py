"""The NBD listening sockets of one program (serve, listen or flexnbd-proxy): one accept loop for
all of them, and one handshake deadline for every connection they accept (SPEC §2, §7, §11).

A ``Listener`` binds what it is asked to (a TCP address, a Unix socket path) and takes the
sockets systemd passed (socket activation). ``start()`` runs the accept loop on a thread of its
own and hands each connection to its owner as an ``Accepted``: the server admits or refuses it
and gives it a thread (``flexnbd.admission``); the proxy serves it on the loop's thread, so that
the next client waits in the backlog until this one has left. When accept() fails for want of
descriptors, accepting pauses (``sockets.AcceptBackoff``) instead of spinning.

Every accepted connection is in its handshake until its owner says the handshake is done, or
closes it. ``Handshakes``, one thread, cuts (shuts down the socket of) each one still in its
handshake ``handshake_timeout`` seconds after accept: one deadline for the whole handshake, so
that a byte now and then does not extend it; the thread serving it then ends at once.

``close()`` stops accepting (``stop_fd`` turns readable: the owner's connections may watch it
too), cuts the handshakes still running (nothing will serve them now), closes the listening
sockets and removes the Unix socket file it made (never one systemd made).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence

from flexnbd import activation, log, sockets

_log = log.get("listener")


class Accepted:
    """An accepted connection until ``close()``: its socket (blocking), the peer's name for log
    lines, and whether it was cut. Its socket is only ever shut down while it is open (cut()
    and close() take one lock), so a shutdown never reaches a descriptor number reused since."""

    def __init__(self, sock: socket.socket, handshakes: Handshakes) -> None:
        self.sock = sock
        self.name = sockets.peer_name(sock)
        self.accepted_ns = time.monotonic_ns()
        self.deadline_ns = self.accepted_ns + int(handshakes.timeout * 1e9)
        self.is_cut = False          # by its owner, at the deadline or as the listener closed
        self.is_open = True
        self._handshakes = handshakes

    def handshake_done(self) -> None:
        """Its handshake is over: the deadline no longer applies."""
        self._handshakes.done(self)

    def cut(self) -> None:
        """Shut its socket down (the thread serving it ends at once) and mark it cut."""
        self._handshakes.cut(self)

    def close(self) -> None:
        self._handshakes.closing(self)
        self.sock.close()


class Handshakes:
    """The accepted connections still in their handshake, and the thread that cuts each one
    still there at its deadline and then calls ``on_late`` with it (to say so in the log)."""

    def __init__(self, timeout: float, on_late: Callable[[Accepted], None]) -> None:
        self.timeout = timeout
        self._on_late = on_late
        self._lock = threading.Condition()
        # In accept order, which is deadline order: the first is the next to expire.
        self._pending: dict[Accepted, None] = {}
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deadline", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket) -> Accepted:
        accepted = Accepted(sock, self)
        with self._lock:
            self._pending[accepted] = None
            self._lock.notify()
        return accepted

    def done(self, accepted: Accepted) -> None:
        with self._lock:
            self._pending.pop(accepted, None)

    def closing(self, accepted: Accepted) -> None:
        """(Before its socket is closed: never shut down from then on.)"""
        with self._lock:
            self._pending.pop(accepted, None)
            accepted.is_open = False

    def cut(self, accepted: Accepted) -> None:
        with self._lock:
            self._cut(accepted)

    def cut_all(self) -> None:
        """Cut every connection still in its handshake."""
        with self._lock:
            for accepted in self._pending:
                self._cut(accepted)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _cut(accepted: Accepted) -> None:
        """(Called with the lock held.)"""
        if accepted.is_open:
            accepted.is_cut = True
            sockets.shutdown(accepted.sock)

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopped:
                    return
                late = self._cut_late()
                if not late:
                    self._lock.wait(self._until_next())
                    continue
            for accepted in late:
                self._on_late(accepted)

    def _cut_late(self) -> list[Accepted]:
        """Cut the connections past their deadline, and forget them; those that were not cut
        already (by their owner). Called with the lock held."""
        now = time.monotonic_ns()
        expired = [a for a in self._pending if a.deadline_ns <= now]
        for accepted in expired:
            del self._pending[accepted]
        late = [a for a in expired if a.is_open and not a.is_cut]
        for accepted in late:
            self._cut(accepted)
        return late

    def _until_next(self) -> float | None:
        """Seconds until the next deadline; None when no connection is in its handshake."""
        first = next(iter(self._pending), None)
        if first is None:
            return None
        return max(0.0, (first.deadline_ns - time.monotonic_ns()) / 1e9)


class Listener:
    """``bind()``, then ``start()``; ``close()`` when done. ``on_late`` is told of each
    connection cut at its handshake deadline (each owner words that line its own way)."""

    def __init__(self, handshake_timeout: float, on_late: Callable[[Accepted], None]) -> None:
        # Readable once the listener closes: ends the accept loop (and whatever else watches it).
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sockets: list[socket.socket] = []
        self._places: list[str] = []
        self._unix: sockets.OwnedPath | None = None   # the socket file this listener made
        self._handshakes = Handshakes(handshake_timeout, on_late)
        self._backoff = sockets.AcceptBackoff(_log.warning)
        self._closing = False
        self._thread: threading.Thread | None = None

    def bind(self, addr: str | None, port: int | None, unix: str | None = None,
             inherited: Sequence[socket.socket] = (), unix_mode: int = 0o660,
             backlog: int = 64) -> None:
        """Listen on addr:port (when both are given) and on the Unix socket ``unix``, and take
        the ``inherited`` sockets (socket activation). FlexnbdError if one cannot be bound;
        none is left open then."""
        try:
            if addr is not None and port is not None:
                bound, failures = sockets.tcp_listeners(addr, port, backlog)
                for sock, place in bound:
                    self._sockets.append(sock)
                    self._places.append(place)
                if failures:
                    _log.warning("%s: %s; listening on its other addresses", addr,
                                 "; ".join(failures))
            if unix:
                sock, self._unix = sockets.unix_listener(unix, backlog, unix_mode)
                self._sockets.append(sock)
                self._places.append(unix)
        except BaseException:
            self._close_sockets()
            raise
        self._sockets.extend(inherited)
        self._places.extend(activation.served(sock) for sock in inherited)

    @property
    def where(self) -> str:
        """Where it listens, for the start-up log line."""
        return " and ".join(self._places)

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        for sock in self._sockets:
            if activation.is_tcp(sock):
                return sock.getsockname()[1]
        return None

    def start(self, on_connection: Callable[[Accepted], None], thread_name: str) -> None:
        """Accept on every socket, on a thread called ``thread_name``; ``on_connection`` gets
        each connection on that thread, and owns it from there (it must close it)."""
        for sock in self._sockets:
            sock.setblocking(False)
        self._handshakes.start()
        self._thread = threading.Thread(target=self._accept_loop, args=(on_connection,),
                                        name=thread_name, daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Stop accepting, cut the handshakes still running, close the sockets. False if the
        accept loop's thread (busy in ``on_connection``) has not ended within ``timeout``."""
        self._closing = True
        os.eventfd_write(self.stop_fd, 1)
        self._handshakes.cut_all()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
        self._handshakes.stop()
        self._close_sockets()
        return ended

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._unix is not None:
            self._unix.remove()
            self._unix = None

    def _accept_loop(self, on_connection: Callable[[Accepted], None]) -> None:
        listening = {sock.fileno(): sock for sock in self._sockets}
        poller = select.poll()
        for fd in (*listening, self.stop_fd):
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                # (on_connection may have run long: look at the stop first)
                if self._closing or fd == self.stop_fd:
                    return
                try:
                    sock, _ = listening[fd].accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as e:
                    pause = self._backoff.failed(e)
                    if pause and select.select([self.stop_fd], [], [], pause)[0]:
                        return
                    continue
                self._backoff.succeeded()
                sock.setblocking(True)
                on_connection(self._handshakes.add(sock))

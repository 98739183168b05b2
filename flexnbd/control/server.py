"""The control-socket listener: one thread that reads requests and runs them one at a time.

The grammar and replies are documented in ``flexnbd.control.protocol``. This module reaches the
running server only through the ``ControlTarget`` it is handed (``flexnbd.server.Server``
implements it); it never imports the server. The target answers mirror requests with migration
outcomes; ``execute`` words them as replies (``flexnbd.control.protocol``).

One thread serves the socket with a selector: it reads from many clients at once (so a client
that says nothing delays nobody), and whenever a client's request is complete it runs it, sends
the reply and closes that client; the next complete request runs after it. A client gets
``read_timeout`` seconds (FLEXNBD_CONTROL_TIMEOUT_SECS, default 10, read by the CLI) to
complete its request, else it is dropped without a reply and nothing is executed. At most
``max_pending`` clients wait at once; more are accepted and closed at once.

Who may speak: the socket is created mode 0600 (``--sock-mode`` widens it, for a group), and a
peer whose SO_PEERCRED uid is neither root nor the server's own is closed without a reply: the
socket can copy the disk anywhere and delete it.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from flexnbd import acl, log, sockets
from flexnbd.control import protocol
from flexnbd.control.protocol import Reply
from flexnbd.migration.outcome import Result
from flexnbd.migration.settings import MirrorSettings
from flexnbd.status import Status

_log = log.get("control")

DEFAULT_READ_TIMEOUT = 10.0
MAX_PENDING = 128
REPLY_TIMEOUT = 5.0
# The socket commands the server (it can copy the disk anywhere and delete it): owner only,
# unless --sock-mode widens it; and only root or our own uid may speak (SO_PEERCRED).
DEFAULT_MODE = 0o600
# mirror_wait requests waiting at once (each holds a thread until the mirror ends).
MAX_WAITERS = 16


class ControlTarget(Protocol):
    """What the control socket needs from the server it controls."""

    def status(self) -> Status:
        """The figures of the status line."""
        ...

    def set_acl(self, entries: Sequence[acl.Network]) -> None:
        """Replace the ACL entries (the default-deny choice stays) and disconnect connected
        clients that the new ACL refuses."""
        ...

    def start_mirror(self, settings: MirrorSettings) -> Result:
        """Start a migration; its outcome once the first connection attempt is decided."""
        ...

    def set_mirror_max_bps(self, max_bps: int | None) -> bool:
        """Change the running mirror's speed limit (None: no limit); False if none runs."""
        ...

    def break_mirror(self) -> Result:
        """Stop the running mirror."""
        ...

    def wait_mirror(self) -> Result | Callable[[], Result]:
        """A result now (no mirror), or a function that blocks until the running mirror ends
        and returns its result (run on a thread of its own)."""
        ...


def execute(lines: list[str], target: ControlTarget) -> Reply | Callable[[], Reply]:
    """Run one request against the target; its reply, or a function giving it later."""
    command = protocol.parse_request(lines)
    if isinstance(command, Reply):
        return command
    if isinstance(command, protocol.StatusCommand):
        return protocol.status_reply(target.status().line())
    if isinstance(command, protocol.AclCommand):
        try:
            entries = acl.parse_entries(command.entries)
        except acl.BadEntry as e:
            return protocol.bad_spec(e.entry)
        target.set_acl(entries)
        return protocol.UPDATED
    if isinstance(command, MirrorSettings):
        return protocol.mirror_reply(target.start_mirror(command))
    if isinstance(command, protocol.MaxBpsCommand):
        return protocol.max_bps_reply(target.set_mirror_max_bps(command.max_bps))
    if isinstance(command, protocol.MirrorWaitCommand):
        waiting = target.wait_mirror()
        if isinstance(waiting, Result):
            return protocol.wait_reply(waiting)
        return lambda: protocol.wait_reply(waiting())
    return protocol.break_reply(target.break_mirror())


class _Pending:
    __slots__ = ("sock", "reader", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.reader = protocol.LineReader()
        self.deadline = deadline


class ControlServer:
    """The control socket at ``path``; ``bind()`` creates it, ``start()`` serves it,
    ``close()`` stops serving and removes it."""

    def __init__(self, path: str, target: ControlTarget,
                 read_timeout: float = DEFAULT_READ_TIMEOUT,
                 max_pending: int = MAX_PENDING, mode: int = DEFAULT_MODE) -> None:
        self.path = path
        self.mode = mode
        self.target = target
        self.read_timeout = read_timeout
        self.max_pending = max_pending
        self._listener: socket.socket | None = None
        self._owned: sockets.OwnedPath | None = None
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._waiters: list[threading.Thread] = []
        self._backoff = sockets.AcceptBackoff(lambda text: _log.warning("control %s", text))

    def bind(self) -> None:
        """Create the socket (replacing a stale one). FlexnbdError if a live server has it."""
        self._listener, self._owned = sockets.unix_listener(self.path, backlog=MAX_PENDING,
                                                            mode=self.mode)

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._thread.start()
        _log.info("control socket %s", self.path)

    def close(self) -> None:
        """Stop serving (a request being run finishes first) and remove the socket file."""
        if self._closed:
            return
        self._closed = True
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join()
        for waiter in self._waiters:      # woken already when the mirror ended
            waiter.join(REPLY_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._owned is not None:
                self._owned.remove()
        os.close(self._wake_fd)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._listener is not None
        listener = self._listener
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(self._wake_fd, selectors.EVENT_READ)
        pending: dict[socket.socket, _Pending] = {}
        try:
            while True:
                now = time.monotonic()
                timeout = None
                if pending:
                    timeout = max(0.0, min(p.deadline for p in pending.values()) - now)
                for key, _ in sel.select(timeout):
                    if key.fileobj == self._wake_fd:
                        return
                    if key.fileobj is listener:
                        self._accept(listener, sel, pending)
                        continue
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        self._readable(sock, sel, pending)
                    except Exception:  # noqa: BLE001 - one client must not end the socket
                        _log.exception("control client failed")
                        self._drop(sock, sel, pending)
                now = time.monotonic()
                for sock, p in list(pending.items()):
                    if p.deadline <= now:
                        _log.warning("control client sent no complete request in %g s; "
                                     "dropped", self.read_timeout)
                        self._drop(sock, sel, pending)
        finally:
            for sock in list(pending):
                self._drop(sock, sel, pending)
            sel.close()

    def _accept(self, listener: socket.socket, sel: selectors.BaseSelector,
                pending: dict[socket.socket, _Pending]) -> None:
        for _ in range(self.max_pending):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                delay = self._backoff.failed(e)
                if delay:
                    time.sleep(delay)  # out of descriptors: do not spin
                return
            self._backoff.succeeded()
            uid = sockets.peer_uid(sock)
            if uid not in (0, os.getuid()):
                _log.warning("control: refused a client with uid %s (only root and uid %d may "
                             "command this server)", uid, os.getuid())
                sock.close()
                continue
            if len(pending) >= self.max_pending:
                _log.warning("%d control clients waiting already; refusing one",
                             self.max_pending)
                sock.close()
                continue
            sock.setblocking(False)
            pending[sock] = _Pending(sock, time.monotonic() + self.read_timeout)
            sel.register(sock, selectors.EVENT_READ)

    def _readable(self, sock: socket.socket, sel: selectors.BaseSelector,
                  pending: dict[socket.socket, _Pending]) -> None:
        p = pending[sock]
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            _log.info("control client failed: %s; request dropped", e.strerror or e)
            self._drop(sock, sel, pending)
            return
        if data:
            if not p.reader.feed(data):
                return
        else:
            p.reader.eof()
        sel.unregister(sock)
        del pending[sock]
        kept = False
        try:
            if p.reader.incomplete:
                _log.warning("control client left in the middle of a line; request dropped")
            else:
                kept = self._answer(sock, p.reader)
        finally:
            if not kept:
                sock.close()

    def _answer(self, sock: socket.socket, reader: protocol.LineReader) -> bool:
        """Run the request and reply. True when the reply comes later from a thread of its
        own, which then owns (and closes) the socket."""
        lines = reader.lines
        what = lines[0][:40] if lines else "(nothing)"
        if lines and lines[0] == "status":
            _log.debug("control: %s", what)
        else:
            _log.info("control: %s%s", what,
                      f" {' '.join(a[:60] for a in lines[1:])}" if len(lines) > 1 else "")
        try:
            answer = execute(lines, self.target)
        except Exception:  # noqa: BLE001 - a failing request must not end the control socket
            _log.exception("control request %r failed", what)
            return False
        if callable(answer):
            self._waiters = [w for w in self._waiters if w.is_alive()]
            if len(self._waiters) >= MAX_WAITERS:
                self._send_reply(sock, what, protocol.TOO_MANY_WAITERS)
                return False
            waiter = threading.Thread(target=self._answer_later, args=(sock, what, answer),
                                      name="control-wait", daemon=True)
            self._waiters.append(waiter)
            waiter.start()
            return True
        self._send_reply(sock, what, answer)
        return False

    def _answer_later(self, sock: socket.socket, what: str,
                      answer: Callable[[], Reply]) -> None:
        try:
            self._send_reply(sock, what, answer())
        except Exception:  # noqa: BLE001 - the waiter must not take anything down
            _log.exception("control request %r failed", what)
        finally:
            sock.close()

    def _send_reply(self, sock: socket.socket, what: str, reply: Reply) -> None:
        if reply.code:
            _log.info("control: %s -> %d: %s", what, reply.code, reply.text)
        try:
            sock.setblocking(True)
            sock.settimeout(REPLY_TIMEOUT)
            sock.sendall(reply.encode())
        except OSError as e:
            _log.info("control client went away before its reply: %s", e.strerror or e)

    @staticmethod
    def _drop(sock: socket.socket, sel: selectors.BaseSelector,
              pending: dict[socket.socket, _Pending]) -> None:
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        pending.pop(sock, None)
        sock.close()

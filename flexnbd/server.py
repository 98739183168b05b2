"""The NBD server: listeners, the accept loop, and one thread per client.

The accept loop and the handshake are Python; once a client enters transmission its thread
calls ``_core.Connection.serve()``, which runs the whole request loop in C without the GIL.

The server is also the ``ControlTarget`` of its control socket (``flexnbd.control.server``):
status figures, ACL replacement, and the mirror hooks (answered honestly until migration
exists). With ``--killswitch`` a watchdog thread cuts a client whose request runs too long.
"""

from __future__ import annotations

import errno as errno_mod
import os
import select
import selectors
import socket
import threading
from collections.abc import Callable, Sequence

from flexnbd import _allocmap, _core, acl, log, sockets
from flexnbd.config import ServeConfig
from flexnbd.control import protocol as control_protocol
from flexnbd.control.server import ControlServer
from flexnbd.errors import FlexnbdError, HandshakeError, PeerClosed
from flexnbd.handshake import ExportInfo, serve_handshake
from flexnbd.migration import listen
from flexnbd.migration.mirror import SHUTTING_DOWN, STARTED, STOPPED, Mirror, MirrorParams
from flexnbd.status import Migration, Status

_log = log.get("server")

# At the client limit, how long a new client may wait for the threads of clients that have
# hung up to end (so that a client reconnecting at once is not refused).
HANDOVER_WAIT = 2.0

Reason = _core.Reason


def open_export(path: str, read_only: bool) -> tuple[int, int]:
    """Open FILE; its size rounded down to 512 is the export size (0.5.0 behaviour)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FlexnbdError(f"cannot open {path}: {e.strerror}") from None
    size = os.fstat(fd).st_size
    return fd, size - size % 512


class _Client:
    """A connected client, from accept until its thread has ended."""

    def __init__(self, sock: socket.socket, name: str, peer_ip: str | None) -> None:
        self.sock = sock
        self.name = name
        self.peer_ip = peer_ip       # None for a Unix-socket client
        self.connection: _core.Connection | None = None
        self.accepted_ns = _core.monotonic_ns()
        self.killed = False          # cut by the watchdog (killswitch or handshake deadline)


class Server:
    """Serves one file to up to ``config.max_clients`` clients at once."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.fd, self.size = open_export(config.file, config.read_only)
        self.allocmap = _allocmap.AllocationMap(self.size)
        self.export = _core.Export(self.fd, self.size, config.read_only, config.file,
                                   self.allocmap)
        self.export_info = ExportInfo(self.size, config.read_only, self.export.can_punch)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._listeners: list[socket.socket] = []
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._accept_thread: threading.Thread | None = None
        self._accept_backoff = sockets.AcceptBackoff(_log.warning)
        self._client_seq = 0
        self.stopping = False
        self.acl = acl.Acl(config.acl, config.default_deny)
        self.clients_allowed = True
        # serve mode owns its data; listen mode only once a migration into it completed
        self.has_control = config.mode != "listen"
        self.control = (ControlServer(config.sock, self, config.control_timeout,
                                      mode=config.sock_mode)
                        if config.sock else None)
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self._unix_bound = False
        # Migration (source side). The lock is held around a mirror's start and its endgame,
        # and by stop(): a stop signal either prevents a start or waits for the finish.
        self.file = config.file
        self.migration_lock = threading.Lock()
        self.mirror: Mirror | None = None
        self.migrated = False            # a mirror completed with action exit or unlink
        self.stopped_while_mirroring = False
        # How the server asks its process to stop (set by flexnbd.lifecycle.run).
        self.request_stop: Callable[[str], None] = lambda reason: None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the listeners and start accepting. When this returns, the server serves."""
        cfg = self.config
        try:
            if cfg.addr is not None and cfg.port is not None:
                self._listeners.append(sockets.tcp_listener(cfg.addr, cfg.port))
            if cfg.unix:
                self._listeners.append(sockets.unix_listener(cfg.unix, mode=cfg.unix_mode))
                self._unix_bound = True
            if self.control is not None:
                self.control.bind()
        except BaseException:
            self._close_listeners()
            raise
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept",
                                               daemon=True)
        self._accept_thread.start()
        if self.control is not None:
            self.control.start()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()
        self._start_allocmap_builder()
        where = []
        if cfg.addr is not None:
            where.append(f"{cfg.addr} port {cfg.port}")
        if cfg.unix:
            where.append(cfg.unix)
        _log.info("serving %s (%d bytes%s, %s handshake) on %s", cfg.file, self.size,
                  ", read-only" if cfg.read_only else "",
                  "oldstyle" if cfg.oldstyle else "newstyle", " and ".join(where))

    def _start_allocmap_builder(self) -> None:
        """Build the allocation map in the background, after the server serves: on a big file
        it takes a while, and readiness must not wait for it. Until it is complete the map
        answers "allocated" everywhere, and writes mark their blocks meanwhile.

        Test knobs: FLEXNBD_ALLOCMAP_METHOD (fiemap|seek|none) forces a method,
        FLEXNBD_ALLOCMAP_DELAY_MS slows the builder down."""
        method = os.environ.get("FLEXNBD_ALLOCMAP_METHOD") or None
        delay_ms = int(os.environ.get("FLEXNBD_ALLOCMAP_DELAY_MS") or 0)
        fd = os.dup(self.fd)  # the builder may outlive stop(), which closes self.fd

        def build() -> None:
            started = _core.monotonic_ns()
            try:
                chosen = self.allocmap.build(fd, method, delay_ms)
            except Exception as e:  # noqa: BLE001 - the map stays "all allocated"
                _log.error("allocation map: build failed: %s", e)
                return
            finally:
                os.close(fd)
            _log.info("allocation map: built with %s in %.0f ms, %d extents, %d of %d bytes "
                      "allocated", chosen, (_core.monotonic_ns() - started) / 1e6,
                      self.allocmap.extents_found, self.allocmap.allocated_bytes(), self.size)

        _log.info("allocation map: building in the background")
        threading.Thread(target=build, name="allocmap", daemon=True).start()

    @property
    def allocation_map_method(self) -> str:
        """fiemap, seek or none once built; pending while building."""
        return self.allocmap.method

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        for sock in self._listeners:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return sock.getsockname()[1]
        return None

    @property
    def num_clients(self) -> int:
        """Clients connected right now. A client that has closed its side stops counting at
        once, even before its thread has noticed."""
        with self._lock:
            return self._connected_count()

    def _connected_count(self) -> int:
        """(self._lock held.)"""
        gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        poller = select.poll()
        for client in self._clients:
            poller.register(client.sock, select.POLLRDHUP)
        closed = sum(1 for _, events in poller.poll(0) if events & gone)
        return len(self._clients) - closed

    def stop(self) -> None:
        """Stop accepting, let clients finish their current request, close everything.

        A running mirror is stopped (its data did not move: exit status 1); a mirror in its
        endgame is waited for (the migration lock)."""
        with self.migration_lock:
            if self.mirror is not None and self.mirror.running and not self.mirror.completed:
                self.stopped_while_mirroring = True
                self.mirror.stop(shutting_down=True)
            with self._lock:
                if self.stopping:
                    return
                self.stopping = True
                clients = list(self._clients)
        if self.mirror is not None:
            self.mirror.join()
        os.eventfd_write(self._stop_fd, 1)
        if self._accept_thread:
            self._accept_thread.join()
        self._close_listeners()
        for client in clients:
            if client.connection is None:  # still in the handshake: nothing to finish
                _shutdown(client.sock)
            else:
                client.connection.kick()
        if not self._wait_clients(self.config.stop_grace):
            with self._lock:
                clients = list(self._clients)
            _log.warning("%d client(s) did not finish their request in %.0f s; cutting them",
                         len(clients), self.config.stop_grace)
            for client in clients:
                _shutdown(client.sock)
            self._wait_clients(5.0)
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        if self.control is not None:
            self.control.close()
        os.close(self.fd)

    def exit_status(self) -> int:
        """The process exit status after stop(): 0, but 1 if a migration was running or, in
        listen mode, if no migration completed."""
        if self.config.mode == "listen":
            return 0 if self.has_control else 1
        if self.migrated:
            return 0
        if self.mirror is not None and self.mirror.outcome_unknown:
            return 1
        return 1 if self.stopped_while_mirroring else 0

    def _wait_clients(self, timeout: float) -> bool:
        deadline = _core.monotonic_ns() + int(timeout * 1e9)
        while _core.monotonic_ns() < deadline:
            with self._lock:
                if not self._clients:
                    return True
            threading.Event().wait(0.02)
        return False

    def _close_listeners(self) -> None:
        for sock in self._listeners:
            sock.close()
        self._listeners = []
        if self.config.unix and self._unix_bound:  # never remove a live server's socket
            self._unix_bound = False
            try:
                os.unlink(self.config.unix)
            except FileNotFoundError:
                pass

    # -- accepting -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self._listeners:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._stop_fd, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._stop_fd:
                        return
                    delay = self._accept_one(key.fileobj)  # type: ignore[arg-type]
                    if delay and select.select([self._stop_fd], [], [], delay)[0]:
                        return
        finally:
            sel.close()

    def _accept_one(self, listener: socket.socket) -> float:
        """Accept one connection; seconds to pause accepting (out of descriptors), or 0."""
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return 0.0
        except OSError as e:
            return self._accept_backoff.failed(e)
        self._accept_backoff.succeeded()
        sock.setblocking(True)
        name = sockets.peer_name(sock)
        peer_ip = _peer_ip(sock)
        refused = self._admit(sock, name, peer_ip)
        if refused is None:
            # Slots held by peers that have hung up: make their threads end now (a client
            # reconnecting at once must not be refused), and look again.
            self._wait_clients_gone(self._hung_up_holders(), HANDOVER_WAIT)
            refused = self._admit(sock, name, peer_ip)
        if refused is None:
            refused = self._limit_text(peer_ip)
        if refused:
            _log.warning("refused %s: %s", name, refused)
            sock.close()
        return 0.0

    def _admit(self, sock: socket.socket, name: str, peer_ip: str | None) -> str | None:
        """Start serving the connection: "" when admitted, else why not (None: a client limit
        is reached). A connection counts until its thread has ended, whatever its socket
        shows."""
        with self._lock:
            if not self.acl.allows(peer_ip):
                return "not allowed by the ACL"
            if not self.clients_allowed:
                return "new clients are not allowed now"
            if self._limit_text(peer_ip):
                return None
            self._client_seq += 1
            client = _Client(sock, name, peer_ip)
            self._clients.add(client)
            threading.Thread(target=self._serve_client, args=(client,),
                             name=f"client-{self._client_seq}", daemon=True).start()
        return ""

    def _limit_text(self, peer_ip: str | None) -> str:
        """(self._lock held, or a log line.) Which client limit a new client from peer_ip
        would pass, or ""."""
        cfg = self.config
        if len(self._clients) >= cfg.max_clients:
            return f"already {cfg.max_clients} clients"
        if peer_ip is not None and cfg.max_clients_per_address < cfg.max_clients and \
                sum(1 for c in self._clients if c.peer_ip == peer_ip) >= \
                cfg.max_clients_per_address:
            return f"already {cfg.max_clients_per_address} clients from that address"
        return ""

    def _hung_up_holders(self) -> list[_Client]:
        """Shut down the sockets of clients whose peer has hung up (they cannot be served
        any more; their threads then end at once); the clients."""
        gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        with self._lock:
            clients = {c.sock.fileno(): c for c in self._clients}
            poller = select.poll()
            for fd in clients:
                poller.register(fd, select.POLLRDHUP)
            hung = [clients[fd] for fd, events in poller.poll(0) if events & gone]
            for client in hung:
                _shutdown(client.sock)
        return hung

    def _wait_clients_gone(self, leaving: list[_Client], timeout: float) -> None:
        """Wait (bounded) until the given clients' threads have ended."""
        if not leaving:
            return
        deadline = _core.monotonic_ns() + int(timeout * 1e9)
        while _core.monotonic_ns() < deadline:
            with self._lock:
                if not any(c in self._clients for c in leaving):
                    return
            threading.Event().wait(0.005)

    # -- one client ------------------------------------------------------------------------

    def _serve_client(self, client: _Client) -> None:
        sock = client.sock
        took_control = False
        try:
            if self.config.mode == "listen":
                # Should this process die before it took control, the kernel must end the
                # sender's connection with a reset, never the FIN it reads as "taken"
                # (SPEC §6.7): linger 0 from the start, undone only for the normal close.
                sockets.reset_on_close(sock)
            sockets.set_client_options(sock)
            sock.settimeout(self.config.handshake_timeout)
            agreed = serve_handshake(sock, self.export_info, self.config.oldstyle)
            if agreed is None:
                _log.info("%s left during the handshake", client.name)
                return
            sock.settimeout(None)
            # A reply that makes no progress this long ends the client (send() and sendfile()
            # in the hot path then fail with EAGAIN).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            sockets.timeval(self.config.send_timeout))
            coverage = listen.new_coverage(self.size) if self.config.mode == "listen" else None
            with self._lock:
                if self.stopping:
                    return
                client.connection = _core.Connection(
                    sock.fileno(), self.export, stop_fd=self._stop_fd,
                    structured=agreed.structured, meta_context=agreed.meta_context,
                    fast_zero=agreed.style == "newstyle" and self.export.can_punch,
                    coverage=coverage,
                    splice_all=coverage is not None and agreed.style == "newstyle")
            _log.info("%s connected (%s%s)", client.name, agreed.style,
                      ", structured replies" if agreed.structured else "")
            result = client.connection.serve()
            self._report(client, result)
            if coverage is not None:
                took_control = self._listen_session_ended(client, result, coverage)
        except HandshakeError as e:
            _log.warning("%s: bad handshake: %s", client.name, e)
        except (PeerClosed, ConnectionResetError, BrokenPipeError):
            _log.info("%s closed the connection during the handshake", client.name)
        except TimeoutError:
            _log.warning("%s: handshake timed out", client.name)
        except OSError as e:
            _log.warning("%s: connection failed: %s", client.name, e.strerror or e)
        except Exception:  # noqa: BLE001 - one client's failure must never reach the others
            _log.exception("%s: unexpected error", client.name)
        finally:
            with self._lock:
                self._clients.discard(client)
            if took_control:
                # The one normal close a sender may see: it reads it as "the destination took
                # control" (SPEC §6.7). Every other listen-mode session ends with a reset.
                sockets.close_normally(sock)
            sock.close()

    # -- listen mode -----------------------------------------------------------------------

    def _listen_session_ended(self, client: _Client, result: _core.ServeResult,
                              coverage: _allocmap.AllocationMap) -> bool:
        """The sender's session ended. True when it completed the migration and this server
        took control: every byte covered, then DISC; the file synced; new clients refused.
        Only then may the sender's socket be closed normally (the sender's confirmation)."""
        assert client.connection is not None
        why_not = listen.session_outcome(result, coverage, client.connection, self.size)
        if why_not is not None:
            _log.warning("%s: no migration completed: %s; waiting for the next sender",
                         client.name, why_not)
            return False
        with self._lock:
            self.clients_allowed = False     # from now on this server admits no one
        try:
            self.export.sync()
        except OSError as e:
            _log.critical("migration received but %s could not be synced: %s; the sender is "
                          "told with a reset and keeps its copy", self.file, e.strerror)
            self.request_stop("sync failure")
            return False
        self.has_control = True
        _log.info("migration completed: %s received all %d bytes from %s", self.file,
                  self.size, client.name)
        self.request_stop("migration completed")
        return True

    # -- the mirror's host interface (flexnbd.migration.mirror.MirrorHost) ----------------

    def forbid_clients(self) -> None:
        """Refuse new clients; disconnect the connected ones after their current request and
        wait until they are gone (a client stuck mid-request is cut after the stop grace)."""
        with self._lock:
            self.clients_allowed = False
            clients = list(self._clients)
        for client in clients:
            if client.connection is not None:
                client.connection.kick()
            else:
                _shutdown(client.sock)
        if not self._wait_clients(self.config.stop_grace):
            with self._lock:
                clients = list(self._clients)
            for client in clients:
                _shutdown(client.sock)
            self._wait_clients(5.0)

    def allow_clients(self) -> None:
        with self._lock:
            self.clients_allowed = True

    def close_listeners(self) -> None:
        """Stop serving NBD: the accept loop ends and the listeners close."""
        os.eventfd_write(self._stop_fd, 1)
        if self._accept_thread:
            self._accept_thread.join()
        self._close_listeners()

    def mirror_finished(self, mirror: Mirror, completed: bool) -> None:
        if mirror.params.action not in ("exit", "unlink"):
            return
        if completed:
            self.migrated = True
            self.request_stop("migration completed")
        elif mirror.outcome_unknown:
            self.request_stop("migration outcome unknown")

    # -- the control socket's interface (flexnbd.control.server.ControlTarget) -------------

    @property
    def is_mirroring(self) -> bool:
        return self.mirror is not None and self.mirror.running

    @property
    def handshake(self) -> str:
        return "oldstyle" if self.config.oldstyle else "newstyle"

    def status(self) -> Status:
        mirror = self.mirror
        migration = None
        if mirror is not None and mirror.running:
            migration = Migration(speed=mirror.speed(), duration=mirror.duration(),
                                  seconds_left=max(mirror.seconds_left(), 0),
                                  bytes_left=mirror.bytes_left(), speed_limit=mirror.max_bps)
        return Status(pid=os.getpid(), size=self.size, is_mirroring=self.is_mirroring,
                      clients_allowed=self.clients_allowed, num_clients=self.num_clients,
                      has_control=self.has_control, migration=migration,
                      allocation_map_method=self.allocation_map_method,
                      handshake=self.handshake,
                      migration_outcome=_outcome_key(mirror),
                      io_error=self.export.io_error)

    def set_acl(self, entries: Sequence[acl.Network]) -> None:
        """Replace the ACL entries (default-deny stays) and disconnect the connected clients
        the new ACL refuses: after their current request, or at once if still in the
        handshake."""
        with self._lock:
            self.acl = self.acl.replaced(entries)
            refused = [c for c in self._clients if not self.acl.allows(c.peer_ip)]
            for client in refused:
                if client.connection is not None:
                    client.connection.kick()
                else:
                    _shutdown(client.sock)
        _log.info("ACL replaced: %s", self.acl)
        for client in refused:
            _log.warning("%s is no longer allowed by the ACL; disconnecting it", client.name)

    def start_mirror(self, command: control_protocol.MirrorCommand) -> control_protocol.Reply:
        with self.migration_lock:
            if self.stopping:
                return control_protocol.SHUTTING_DOWN
            if self.mirror is not None and (self.mirror.running or self.migrated):
                return control_protocol.MIRROR_RUNNING
            if not self.has_control:
                # A listener that has not received its migration has nothing to send.
                return control_protocol.MIRRORING_ABANDONED
            mirror = Mirror(self, MirrorParams(command.ip, command.port, command.action,
                                               command.bind, command.max_bps))
            self.mirror = mirror
            mirror.running = True
        _log.info("mirror to %s port %d (action %s) requested", command.ip, command.port,
                  command.action)
        text = mirror.start()
        return control_protocol.Reply(0 if text == STARTED else 1, text)

    def set_mirror_max_bps(self, max_bps: int | None) -> control_protocol.Reply:
        mirror = self.mirror
        if mirror is None or not mirror.running:
            return control_protocol.NOT_CURRENTLY_MIRRORING
        mirror.set_max_bps(max_bps)
        return control_protocol.UPDATED

    def break_mirror(self) -> control_protocol.Reply:
        with self.migration_lock:      # never in the middle of an endgame
            mirror = self.mirror
            if mirror is None:
                return control_protocol.NOT_MIRRORING
            if mirror.completed:
                return control_protocol.MIRROR_COMPLETED
            if mirror.outcome_unknown:
                return control_protocol.MIGRATION_OUTCOME_UNKNOWN
            if not mirror.running:
                return control_protocol.NOT_MIRRORING
            mirror.stop()
        mirror.join()
        return control_protocol.MIRROR_STOPPED

    def wait_mirror(self) -> control_protocol.Reply | Callable[[], control_protocol.Reply]:
        mirror = self.mirror
        if mirror is None:
            return control_protocol.NOT_MIRRORING

        def outcome() -> control_protocol.Reply:
            mirror.finished.wait()
            return control_protocol.Reply(0 if mirror.completed else 1, mirror.outcome)
        return outcome

    # -- the watchdog: handshake deadline and killswitch ------------------------------------

    def _watch(self) -> None:
        """Cut (shut down the socket of) each client still in its handshake after the
        handshake timeout (one deadline for the whole handshake: a byte now and then does not
        extend it), and with the killswitch each client whose current request, reply
        included, has run too long. The others carry on."""
        cfg = self.config
        handshake_ns = int(cfg.handshake_timeout * 1e9)
        limits = [cfg.handshake_timeout]
        if cfg.killswitch is not None:
            limits.append(cfg.killswitch)
        interval = min(1.0, max(0.01, min(limits) / 4))
        while not self._watchdog_stop.wait(interval):
            # (one call per round: no reference to a client outlives the round, so a client
            # that has gone is freed with its buffers and descriptors at once)
            self._cut_late_clients(handshake_ns)

    def _cut_late_clients(self, handshake_ns: int) -> None:
        cfg = self.config
        now = _core.monotonic_ns()
        late: list[tuple[_Client, str]] = []
        with self._lock:
            for c in self._clients:
                if c.killed:
                    continue
                if c.connection is None:
                    if now - c.accepted_ns > handshake_ns:
                        late.append((c, f"handshake not done in {cfg.handshake_timeout:g} s"))
                elif cfg.killswitch is not None and \
                        c.connection.request_age_ns > cfg.killswitch * 1e9:
                    late.append((c, f"killswitch: request ran over {cfg.killswitch:g} s"))
            for client, _ in late:
                client.killed = True
                _shutdown(client.sock)
        for client, why in late:
            _log.warning("%s: %s; disconnected it", client.name, why)

    def _report(self, client: _Client, result: _core.ServeResult) -> None:
        what = (f"{result.command} offset {result.offset} length {result.length}"
                if result.requests else "no request")
        err = _errno_text(result.errno)
        reason = result.reason
        if reason == Reason.REASON_DISC:
            _log.info("%s disconnected after %d requests", client.name, result.requests)
        elif reason == Reason.REASON_CLOSED:
            _log.info("%s closed the connection after %d requests", client.name,
                      result.requests)
        elif reason == Reason.REASON_STOPPED:
            _log.info("%s disconnected by the server", client.name)
        elif result.errno in (errno_mod.EAGAIN, errno_mod.EWOULDBLOCK):
            _log.warning("%s: no progress sending a reply for %g s (%s); disconnected",
                         client.name, self.config.send_timeout, what)
        elif reason == Reason.REASON_VANISHED:
            _log.warning("%s went away in the middle of a request (%s)%s", client.name, what,
                         err)
        elif reason == Reason.REASON_BAD_MAGIC:
            _log.warning("%s sent a request with a bad magic; answered EBADMSG and "
                         "disconnected", client.name)
        elif reason == Reason.REASON_TOO_BIG:
            _log.warning("%s sent a %d-byte WRITE, too long to drain; disconnected",
                         client.name, result.length)
        elif reason == Reason.REASON_IO_FATAL:
            _log.error("%s: I/O error on %s while sending %s%s; disconnected", client.name,
                       self.config.file, what, err)
        else:
            _log.warning("%s: socket error%s", client.name, err)


def _outcome_key(mirror: Mirror | None) -> str | None:
    """The status line's migration_outcome: only once a mirror has ended."""
    if mirror is None or not mirror.finished.is_set():
        return None
    if mirror.completed:
        return "completed"
    if mirror.outcome_unknown:
        return "unknown"
    return "stopped" if mirror.outcome in (STOPPED, SHUTTING_DOWN) else "failed"


def _errno_text(e: int) -> str:
    if not e:
        return ""
    return f": {os.strerror(e)} ({errno_mod.errorcode.get(e, e)})"


def _peer_ip(sock: socket.socket) -> str | None:
    """The client's IP address; None for a Unix-socket client."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return sock.getpeername()[0]
    except OSError:
        return "?"  # gone already: an address no ACL entry matches


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass

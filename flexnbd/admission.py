"""Client admission: who may connect and who may stay (SPEC §2, §8, §11).

One ``Admission`` per server. Its ``flexnbd.listener.Listener`` accepts the connections (and
cuts those whose handshake runs past its deadline); it admits a client only when the ACL
allows it, new clients are allowed (not during a migration's endgame, nor after a listener
took control), and the limits leave room: ``max_clients`` in all and
``max_clients_per_address`` from one address. A connection counts from accept until its
thread has ended, whatever its socket shows; at the limit, the sockets of clients whose peer
has hung up are shut down so that their threads end at once (a client reconnecting at once is
not refused). Each admitted client gets a thread running the ``serve`` function it is
given; its socket is closed when that returns.

Listen mode (``max_handshakes`` set) keeps the migration's one slot for a sender (SPEC §11):
connections in their handshake (under ``--tls=require``, the TLS authentication is part of
it) count only against ``max_handshakes``, and a client takes the slot when its handshake is
done (``attach``). A finished handshake that finds the slot taken is refused, unless the
holder has sent no request for ``listen_idle`` seconds: it then gives the slot up (a sender
whose old connection died unseen gets back in). A client that sends no request within
``listen_idle`` of its handshake is cut. When the handshake limits are reached (from one
address, or in all), a new connection cuts the oldest handshake in its way rather than being
refused: a crowd of silent connections cannot keep a sender from its greeting. So no peer
that stays silent, stalls its handshake or holds no key can make a migration fail.

A watchdog thread cuts, with the killswitch, clients whose current request (reply included)
runs too long, and in listen mode clients that sent no request within ``listen_idle`` of their
handshake.

``cut_clients()`` is the one routine that ends every client: after its current request, or at
once if still in the handshake, and by shutting its socket down after the grace period.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from flexnbd import _core, acl, log, sockets
from flexnbd.config import ServeConfig
from flexnbd.listener import Accepted, Listener

_log = log.get("server")

# At the client limit, how long a new client may wait for the threads of clients that have
# hung up to end (so that a client reconnecting at once is not refused).
HANDOVER_WAIT = 2.0
# ... and how many times it looks (cutting, between looks, the holders that hung up or idled).
HANDOVER_ROUNDS = 3
# attach's answer while the server stops.
STOPPING = "the server is stopping"


class Client:
    """A connected client, from accept until its thread has ended."""

    def __init__(self, accepted: Accepted, peer_ip: str | None) -> None:
        self.accepted = accepted
        self.sock = accepted.sock
        self.name = accepted.name
        self.peer_ip = peer_ip       # None for a Unix-socket client
        self.local = _on_this_host(self.sock, peer_ip)
        self.connection: _core.Connection | None = None
        # listen mode: when the handshake ended, and when a request was last seen
        self.attached_ns = 0
        self.active_ns = 0
        self.seen_requests = 0

    @property
    def killed(self) -> bool:
        """Cut: by the watchdog, to make room, or at the handshake deadline."""
        return self.accepted.is_cut

    def cut(self) -> None:
        self.accepted.cut()

    def end_soon(self) -> None:
        """End after the current request; at once if still in the handshake."""
        if self.connection is not None:
            self.connection.kick()
        else:
            sockets.shutdown(self.sock)


class Admission:
    def __init__(self, config: ServeConfig, serve: Callable[[Client], None]) -> None:
        self.config = config
        self._serve = serve
        self.listener = Listener(config.handshake_timeout, self._late)
        # Readable once the server stops: ends the accept loop, and idle connections.
        self.stop_fd = self.listener.stop_fd
        self.acl = acl.Acl(config.acl, config.default_deny)
        self.clients_allowed = True
        self.stopping = False
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._seq = 0
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()

    # -- listeners ----------------------------------------------------------------------------

    def bind(self) -> None:
        cfg = self.config
        # systemd's sockets (socket activation) are admitted like the others, by family
        self.listener.bind(cfg.addr, cfg.port, cfg.unix, cfg.inherited, cfg.unix_mode)

    def start(self) -> None:
        self.listener.start(self._accept, "accept")
        if self.config.killswitch is not None or self.config.listen_idle is not None:
            self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._watchdog.start()

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        return self.listener.port

    def close_listeners(self) -> None:
        """Stop accepting: the accept loop ends and the listeners close."""
        self.listener.close()

    # -- who is connected ---------------------------------------------------------------------

    @property
    def num_clients(self) -> int:
        """Clients connected right now. A client that has closed its side stops counting at
        once, even before its thread has noticed (the limits count threads)."""
        with self._lock:
            return len(self._clients) - len(_hung_up(self._clients))

    def attach(self, client: Client, connection: Callable[[], _core.Connection]) -> str:
        """The client finished its handshake: give it its connection (made under the lock,
        so that stopping and cutting see it). "" when it has it, else why not: the server is
        stopping (STOPPING), or in listen mode the slot is another sender's."""
        # Each round cuts the holders that cannot use the slot and waits for their threads.
        # More than one round: while this client waited, another that had hung up (a probe
        # whose handshake ended just before) may have taken the slot freed for it.
        for attempt in range(HANDOVER_ROUNDS):
            with self._lock:
                if self.stopping:
                    return STOPPING
                now = time.monotonic_ns()
                holders = self._slot_holders()
                if len(holders) < self.config.max_clients:
                    client.connection = connection()
                    client.connection.local = client.local
                    client.accepted.handshake_done()
                    client.attached_ns = client.active_ns = now
                    self._choose_read_path(client)
                    return ""
                # A holder whose peer hung up (say a readiness probe) cannot be served any
                # more; one that sent nothing for FLEXNBD_LISTEN_IDLE gives the slot up.
                limit = self.config.listen_idle
                hung = _hung_up(holders)
                idle = [c for c in holders if c in hung
                        or (limit is not None and self._idle_ns(c, now) >= limit * 1e9)]
                if not idle or attempt == HANDOVER_ROUNDS - 1:
                    break
                for holder in idle:
                    holder.cut()
            for holder in idle:
                if holder not in hung:
                    _log.warning("%s sent no request for %g s: it gives the migration's slot "
                                 "up to %s", holder.name, self.config.listen_idle, client.name)
            self._wait_clients(HANDOVER_WAIT, idle)
        return "a sender already holds the migration's slot"

    def _slot_holders(self) -> list[Client]:
        """Listen mode: the clients past their handshake (holding the slot); in serve mode
        none (every connection counted against max_clients at accept)."""
        if self.config.max_handshakes is None:
            return []
        return [c for c in self._clients if c.connection is not None]

    @staticmethod
    def _idle_ns(client: Client, now: int) -> int:
        """How long the client (past its handshake) has had no request, as far as seen: its
        request count is sampled here and by the watchdog. Called with the lock held."""
        connection = client.connection
        assert connection is not None
        requests = connection.requests
        if requests != client.seen_requests or connection.request_age_ns:
            client.seen_requests = requests
            client.active_ns = now
        return now - client.active_ns

    def forbid(self) -> None:
        """Admit no one from now on (a migration's endgame, or a listener that took
        control); the connected clients stay."""
        with self._lock:
            self.clients_allowed = False

    def allow(self) -> None:
        with self._lock:
            self.clients_allowed = True

    def set_acl(self, entries: Sequence[acl.Network]) -> None:
        """Replace the ACL entries (default-deny stays) and end the connected clients the new
        ACL refuses, after their current request."""
        with self._lock:
            self.acl = self.acl.replaced(entries)
            refused = [c for c in self._clients if not self.acl.allows(c.peer_ip)]
            for client in refused:
                client.end_soon()
        _log.info("ACL replaced: %s", self.acl)
        for client in refused:
            _log.warning("%s is no longer allowed by the ACL; disconnecting it", client.name)

    def cut_clients(self, why: str) -> bool:
        """End every connected client after its current request; shut down the sockets of
        those still there after the stop grace; return once all their threads have ended
        (True), or 5 s more have passed (False: some thread is still in a system call, a
        pwrite or fdatasync of a failing disk)."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.end_soon()
        if not self._wait_clients(self.config.stop_grace):
            with self._lock:
                clients = list(self._clients)
            _log.warning("%d client(s) did not finish their request in %.0f s (%s); cutting "
                         "them", len(clients), self.config.stop_grace, why)
            for client in clients:
                sockets.shutdown(client.sock)
            return self._wait_clients(5.0)
        return True

    def stop(self) -> bool:
        """Stop accepting, end every client, stop the watchdog. True once every client's
        thread has ended; False if one still runs (see cut_clients)."""
        with self._lock:
            self.stopping = True
        self.close_listeners()
        ended = self.cut_clients("stopping")
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        return ended

    def _wait_clients(self, timeout: float, leaving: Sequence[Client] | None = None) -> bool:
        """Wait until no client (or none of ``leaving``) is left; False on the timeout."""
        deadline = time.monotonic_ns() + int(timeout * 1e9)
        while time.monotonic_ns() < deadline:
            with self._lock:
                if not (self._clients if leaving is None
                        else [c for c in leaving if c in self._clients]):
                    return True
            threading.Event().wait(0.005)
        return False

    # -- accepting ----------------------------------------------------------------------------

    def _accept(self, accepted: Accepted) -> None:
        """A new connection (on the listener's thread): admit it, or close it at once with
        nothing written."""
        peer_ip = _peer_ip(accepted.sock)
        refused = self._admit(accepted, peer_ip)
        if refused is None:
            # Slots held by peers that have hung up: make their threads end now, look again.
            self._wait_clients(HANDOVER_WAIT, self._cut_hung_up())
            refused = self._admit(accepted, peer_ip)
        if refused is None:
            refused = self._limit_text(peer_ip)
        if refused:
            _log.warning("refused %s: %s", accepted.name, refused)
            accepted.close()

    def _admit(self, accepted: Accepted, peer_ip: str | None) -> str | None:
        """Start serving the connection: "" when admitted, else why not (None: a client limit
        is reached)."""
        with self._lock:
            if not self.acl.allows(peer_ip):
                return "not allowed by the ACL"
            if not self.clients_allowed:
                return "new clients are not allowed now"
            if self._limit_text(peer_ip) and not self._make_room(accepted.name, peer_ip):
                return None
            self._seq += 1
            client = Client(accepted, peer_ip)
            self._clients.add(client)
            threading.Thread(target=self._run, args=(client,), name=f"client-{self._seq}",
                             daemon=True).start()
        return ""

    def _limit_text(self, peer_ip: str | None) -> str:
        """Which client limit a new client from peer_ip would pass, or "". (Listen mode: a
        handshake already cut to make room does not count; see _make_room.)"""
        cfg = self.config
        capacity = cfg.max_clients
        counted = self._clients
        if cfg.max_handshakes is None:
            if len(self._clients) >= cfg.max_clients:
                return f"already {cfg.max_clients} clients"
        else:
            capacity += cfg.max_handshakes
            counted = {c for c in self._clients if not (c.killed and c.connection is None)}
            if sum(1 for c in counted if c.connection is None) >= cfg.max_handshakes:
                return f"already {cfg.max_handshakes} connections in their handshake"
        if peer_ip is not None and cfg.max_clients_per_address < capacity and \
                sum(1 for c in counted if c.peer_ip == peer_ip) >= \
                cfg.max_clients_per_address:
            return f"already {cfg.max_clients_per_address} clients from that address"
        return ""

    def _make_room(self, name: str, peer_ip: str | None) -> bool:
        """Listen mode, a handshake limit reached: cut the oldest handshake in the way (from
        the same address when that limit is the one reached) so that the new connection gets
        its greeting. Silent connections thus cannot keep a sender out: a sender's handshake
        takes milliseconds, theirs never ends. True when the limits now leave room. Called
        with the lock held; threads of cut handshakes end at once (their socket is shut
        down), and no more than 2 x max_handshakes are ever pending."""
        cfg = self.config
        if cfg.max_handshakes is None:
            return False
        pending = [c for c in self._clients if c.connection is None]
        if len(pending) >= 2 * cfg.max_handshakes:
            return False
        while (limit := self._limit_text(peer_ip)):
            same_address = limit.endswith("from that address")
            in_the_way = [c for c in pending if not c.killed and
                          (not same_address or c.peer_ip == peer_ip)]
            if not in_the_way:
                return False
            oldest = min(in_the_way, key=lambda c: c.accepted.accepted_ns)
            oldest.cut()
            _log.warning("%s: %s; cut the oldest handshake, %s's, to make room",
                         name, limit, oldest.name)
        return True

    def _cut_hung_up(self) -> list[Client]:
        """Shut down the sockets of clients whose peer has hung up (they cannot be served any
        more; their threads then end at once); those clients."""
        with self._lock:
            hung = _hung_up(self._clients)
            for client in hung:
                sockets.shutdown(client.sock)
        return hung

    def _run(self, client: Client) -> None:
        try:
            self._serve(client)
        finally:
            with self._lock:
                self._clients.discard(client)
                self._choose_read_path(client)
            client.accepted.close()   # (only now: the set holds open sockets only)

    def _choose_read_path(self, changed: Client) -> None:
        """A client on this host came or went: its connections (those of its address) copy
        reads out of the page cache while it has more than one, and use sendfile while it has
        one (measured: several connections leave the client the bottleneck, and the copy
        here spares it the cold page-cache copy; one leaves our thread the bottleneck).
        Remote clients always get sendfile. Called with the lock held."""
        if not changed.local:
            return
        peers = [c.connection for c in self._clients
                 if c.local and c.peer_ip == changed.peer_ip and c.connection is not None]
        for connection in peers:
            connection.copy_reads = len(peers) > 1

    # -- the handshake deadline (the listener's), the watchdog: killswitch and idle senders ---

    def _late(self, accepted: Accepted) -> None:
        _log.warning("%s: handshake not done in %g s; disconnected it", accepted.name,
                     self.config.handshake_timeout)

    def _watch(self) -> None:
        """Cut (shut down the socket of), with the killswitch, each client whose current
        request, reply included, has run too long, and in listen mode each client that sent
        no request within the idle limit of its handshake. The others carry on."""
        cfg = self.config
        limits = []
        if cfg.killswitch is not None:
            limits.append(cfg.killswitch)
        if cfg.listen_idle is not None:
            limits.append(cfg.listen_idle)
        interval = min(1.0, max(0.01, min(limits) / 4))
        while not self._watchdog_stop.wait(interval):
            # (one call per round: no reference to a client outlives the round, so a client
            # that has gone is freed with its buffers and descriptors at once)
            self._cut_late_clients()

    def _cut_late_clients(self) -> None:
        cfg = self.config
        now = time.monotonic_ns()
        late: list[tuple[Client, str]] = []
        with self._lock:
            for c in self._clients:
                if c.killed or c.connection is None:   # (a handshake: see _late)
                    continue
                if cfg.killswitch is not None and \
                        c.connection.request_age_ns > cfg.killswitch * 1e9:
                    late.append((c, f"killswitch: request ran over {cfg.killswitch:g} s"))
                elif cfg.listen_idle is not None:
                    self._idle_ns(c, now)          # (samples its activity)
                    if c.seen_requests == 0 and now - c.attached_ns > cfg.listen_idle * 1e9:
                        late.append((c, f"no request within {cfg.listen_idle:g} s of its "
                                        "handshake (the migration's slot is for a sender)"))
            for client, _ in late:
                client.cut()
        for client, why in late:
            _log.warning("%s: %s; disconnected it", client.name, why)


def _hung_up(clients: Iterable[Client]) -> list[Client]:
    """The clients whose peer has hung up (or whose socket failed), without waiting."""
    gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
    by_fd = {c.sock.fileno(): c for c in clients}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLRDHUP)
    return [by_fd[fd] for fd, events in poller.poll(0) if events & gone]


def _peer_ip(sock: socket.socket) -> str | None:
    """The client's IP address; None for a Unix-socket client."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return sock.getpeername()[0]
    except OSError:
        return "?"  # gone already: an address no ACL entry matches


def _on_this_host(sock: socket.socket, peer_ip: str | None) -> bool:
    """The client runs on this host: a Unix socket, a loopback address or our own address."""
    if peer_ip is None:
        return True
    try:
        address = ipaddress.ip_address(peer_ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)      # ::ffff:127.0.0.1
        return (mapped or address).is_loopback or sock.getsockname()[0] == peer_ip
    except (ValueError, OSError):
        return False

"""flexnbd-proxy: one NBD client in front of an NBD server that may restart or move (SPEC §7).

The client (downstream) sees one steady server. Behind the proxy the upstream connection may
fail, stall, or end because the server finished a migration and exited; the proxy reconnects
(every few seconds, for as long as it takes) to whatever serves the same address with the same
size, re-sends the requests that were not answered, and the client only sees a pause.

Structured replies and base:allocation: the proxy asks upstream for both, and offers the client
what upstream agreed (and DF, if upstream offers it). The relay passes chunks through, holding
each reply until it is whole (see ``flexnbd._proxy``); for a client without structured replies
it assembles upstream's chunks into simple replies. An upstream that comes back after a
reconnect without them is taken all the same (see Proxy._warn_lost for why that is safe).

Started before its upstream, the proxy listens at once but accepts nobody until upstream
answers (the handshake needs upstream's size and flags): clients wait in the listen backlog,
the attempts go on at the reconnect's pace, and the wait is logged once. An upstream that is
there but fails the handshake (TLS, or a peer that is not an NBD server) still ends the start
(a configuration to fix, not an outage); once waiting, every failure is retried.

Threads: the main thread waits for stop signals (``flexnbd.lifecycle``). "session", the
accept loop of the proxy's ``flexnbd.listener.Listener``, accepts one client, runs its
handshake in Python (under the listener's deadline for all of it), then the relay
(``flexnbd._proxy.Relay.run``) in C without the GIL; when the relay reports that upstream
failed, it reconnects and lets the relay replay. Only when that client has left does it accept
the next: further clients wait in the listen backlog, never refused (a client reconnecting
before we noticed its old connection died is served as soon as we do). The upstream
connection outlives clients and is only ever touched by "session".

TLS, on either side or both (``--tls…`` for the client, ``--conn-tls…`` for upstream): the
handshakes stay in Python, the relay encrypts and decrypts in C; every reconnect shakes hands
again, and a reconnect that fails TLS (a wrong key) is retried like any other failure, louder.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable

from flexnbd import _proxy, credentials, hosts, log, sockets, wire
from flexnbd._tls import TlsSession
from flexnbd.config import ProxyConfig
from flexnbd.errors import FlexnbdError, TlsError, errno_text
from flexnbd.handshake import ExportInfo, ServerInfo, client_handshake, serve_handshake
from flexnbd.listener import Accepted, Listener

_log = log.get("proxy")

End = _proxy.End
Problem = _proxy.Problem
RelayState = _proxy.RelayState

# Upstream's transmission flags that the client is offered as they are. Never CAN_MULTI_CONN
# (one client at a time); DF only when upstream agreed structured replies (and then only to a
# client that agrees them too: see ExportInfo.transmission_flags).
PASSED_FLAGS = (wire.FLAG_READ_ONLY | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
                | wire.FLAG_ROTATIONAL | wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES
                | wire.FLAG_SEND_CACHE | wire.FLAG_SEND_FAST_ZERO)


def offered_flags(upstream_flags: int, structured: bool = False) -> int:
    if not upstream_flags & wire.FLAG_HAS_FLAGS:
        return wire.FLAG_HAS_FLAGS
    passed = PASSED_FLAGS | (wire.FLAG_SEND_DF if structured else 0)
    return wire.FLAG_HAS_FLAGS | (upstream_flags & passed)


def meta_id(info: ServerInfo) -> int | None:
    """The id upstream gave base:allocation; None if it was not selected."""
    return info.contexts.get(wire.BASE_ALLOCATION) if info.structured else None


def _features(info: ServerInfo) -> str:
    """", structured replies, base:allocation" for a log line (what upstream agreed)."""
    return ((", structured replies" if info.structured else "")
            + (", base:allocation" if meta_id(info) is not None else ""))


# What an upstream that broke the protocol did, by Problem ({} is the relay's bad_value).
_LIES = {
    Problem.UP_BAD_COOKIE: "answered a request that was not waiting (cookie {:#x})",
    Problem.UP_UNEXPECTED_CHUNK: "sent a reply chunk of type {} that the request cannot have",
    Problem.UP_BAD_CHUNK_LENGTH: "sent a reply chunk with a payload of {} bytes, which its "
                                 "type or request does not allow",
    Problem.UP_CHUNK_OUTSIDE: "sent READ data or a hole at offset {}, outside the request or "
                              "over bytes already answered",
    Problem.UP_BAD_CONTEXT: "answered BLOCK_STATUS for meta context {}, not the one it gave "
                            "base:allocation",
    Problem.UP_BAD_EXTENTS: "answered BLOCK_STATUS with an invalid extent (number {})",
    Problem.UP_INCOMPLETE: "ended a reply (DONE) without answering all of the request ({} "
                           "bytes answered)",
    Problem.UP_TOO_MANY_CHUNKS: "sent more reply chunks than a request may have ({} bytes "
                                "of them)",
    Problem.UP_BAD_SIMPLE: "sent a simple reply where chunks were due (command {})",
}


class Unreachable(FlexnbdError):
    """Upstream could not be connected to at all (nothing listens there yet, no route): the
    one failure a starting proxy waits out. A server that answers but fails the handshake
    (its TLS, an impostor, not NBD) is a configuration to fix, and ends the start."""


def _connected_to_itself(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except OSError:
        return False


def _tls_text(mode: str | None) -> str:
    return f", TLS {'required' if mode == 'require' else 'offered'}" if mode else ""


def _version(tls: TlsSession | None) -> str:
    """", TLSv1.3 TLS_AES_128_GCM_SHA256" for a log line; "" without TLS."""
    return f", {tls.version}" if tls is not None else ""


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


class Proxy:
    """Serves one client at a time, relaying to the upstream server."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstream_name = sockets.host_port(config.conn_addr, config.conn_port)
        # Upstream's addresses (and --bind's), looked up once: every (re)connect tries them
        # in order. A name without an address stops the start (FlexnbdError).
        self._conn_addresses = hosts.resolve(config.conn_addr)
        self._bind_addresses = sockets.local_addresses(config.bind)
        if self._conn_addresses != (config.conn_addr,):
            _log.info("upstream %s", hosts.described(config.conn_addr, self._conn_addresses))
        self._stopping = threading.Event()
        # Its stop_fd also ends the relay.
        self.listener = Listener(config.handshake_timeout, self._late)
        self._upstream: socket.socket | None = None
        self.upstream_info: ServerInfo | None = None
        # TLS: for the clients, and to upstream (loaded now: bad credentials stop the start)
        self._tls = credentials.server_policy(config.tls)
        self._conn_tls = credentials.client_context(config.conn_tls, read_ahead=True)
        self.relay: _proxy.Relay | None = None
        # (start() and stop() race when upstream comes while the proxy stops)
        self._start_lock = threading.Lock()
        # How the proxy asks its process to stop (set by flexnbd.lifecycle.run).
        self.request_stop: Callable[[str], None] = lambda reason: None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Listen, and serve once upstream answers: now, or after waiting for it on a thread
        of its own (clients wait un-accepted in the backlog meanwhile: a handshake needs
        upstream's size and flags, and the handshake deadline starts at accept). FlexnbdError
        if the listener cannot be made, or if upstream answers but its handshake fails (TLS, a
        key or certificate to fix; a peer that is not the NBD server meant): not an outage,
        the start ends, as before. Only an upstream that cannot be reached is waited for."""
        cfg = self.config
        first: tuple[socket.socket, ServerInfo] | None = None
        failure = ""
        try:
            first = self._connect_upstream()
        except Unreachable as e:
            failure = str(e)
        try:
            # (TCP, a Unix socket path or systemd's sockets: the CLI lets only one through)
            self.listener.bind(cfg.addr, cfg.port, cfg.unix, cfg.inherited, backlog=8)
        except BaseException:
            if first is not None:
                _close(first[0])
            raise
        if first is not None:
            self._begin(*first)
            return
        _log.warning("%s; listening on %s, clients wait until upstream answers (retrying)",
                     failure, self.listener.where)
        threading.Thread(target=self._await_upstream, args=(failure,), name="upstream",
                         daemon=True).start()

    def _begin(self, sock: socket.socket, info: ServerInfo) -> None:
        """Upstream answered: make the relay, then accept clients."""
        cfg = self.config
        self._upstream = sock
        self.upstream_info = info
        self.relay = _proxy.Relay(sock.fileno(), info.size, info.flags, self.listener.stop_fd,
                                  cfg.cache_bytes, cfg.upstream_timeout, info.tls,
                                  cfg.send_timeout, info.structured, meta_id(info))
        self.listener.start(self._session, "session")
        _log.info("serving %s (%s handshake%s) for upstream %s: %d bytes, flags %#x, %s%s%s; "
                  "read-ahead %s", self.listener.where, "oldstyle" if cfg.oldstyle else "newstyle",
                  _tls_text(cfg.tls.mode if cfg.tls else None), self.upstream_name, info.size,
                  info.flags, info.style, _version(info.tls), _features(info),
                  f"{cfg.cache_bytes} bytes" if cfg.cache_bytes else "off")

    def _await_upstream(self, failure: str) -> None:
        """(Thread "upstream") Connect to upstream at the reconnect's pace, then serve."""
        started = time.monotonic()
        got = self._retry_upstream(failure)
        with self._start_lock:
            if got is None or self._stopping.is_set():
                if got is not None:
                    _close(got[0])
                return
            _log.info("upstream %s answered after %.2f s and %d attempt(s)", self.upstream_name,
                      time.monotonic() - started, got[2])
            self._begin(got[0], got[1])

    def _retry_upstream(self, failure: str) -> tuple[socket.socket, ServerInfo, int] | None:
        """Try again and again (the reconnect's backoff) until upstream answers: its socket,
        what it agreed and the attempts it took; None if the proxy stops first. A failure is
        logged when it differs from the one before (so a long wait logs once)."""
        cfg = self.config
        delay = cfg.reconnect_first
        attempts = 1
        last = failure
        while not self._stopping.wait(delay):
            attempts += 1
            try:
                sock, info = self._connect_upstream()
            except FlexnbdError as e:
                if str(e) != last:
                    (_log.error if isinstance(e, TlsError) else _log.warning)(
                        "%s; still waiting (attempt %d)", e, attempts)
                    last = str(e)
            else:
                return sock, info, attempts
            delay = min(delay * 2, cfg.reconnect_most)
        return None

    def stop(self) -> None:
        """Stop: end the session (requests in flight get no answer), close both sides."""
        with self._start_lock:
            self._stopping.set()
        # (the relay ends on the listener's stop_fd, a client in its handshake is cut)
        if self.listener.close(timeout=5.5):
            _close(self._upstream)  # (only then: else the relay may still use it)

    def exit_status(self) -> int:
        return 0

    # -- upstream --------------------------------------------------------------------------

    def _connect_upstream(self) -> tuple[socket.socket, ServerInfo]:
        cfg = self.config
        try:
            sock = sockets.connect(self._conn_addresses, cfg.conn_port, self._bind_addresses,
                                   cfg.connect_timeout)
        except OSError as e:
            raise Unreachable(f"cannot connect to upstream {self.upstream_name}: "
                              f"{e.strerror or e}") from None
        if _connected_to_itself(sock):
            # With nothing listening on a local port in the ephemeral range, a connect can
            # pick that very port as its source and succeed, connected to itself.
            _close(sock)
            raise Unreachable(f"cannot connect to upstream {self.upstream_name}: "
                              "Connection refused")
        try:
            info = client_handshake(sock, tls=self._conn_tls, server_hostname=cfg.conn_addr,
                                    timeout=cfg.handshake_timeout, structured=True,
                                    meta_contexts=[wire.BASE_ALLOCATION])
            sockets.set_client_options(sock)
            sock.setblocking(False)
        except TlsError as e:
            _close(sock)
            raise TlsError(f"upstream {self.upstream_name}: {e}") from None
        except (OSError, FlexnbdError) as e:
            _close(sock)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or \
                type(e).__name__
            raise FlexnbdError(f"upstream {self.upstream_name}: handshake failed: "
                               f"{reason}") from None
        return sock, info

    def _reconnect(self) -> bool:
        """Reconnect until a server of the same size answers; False if the proxy stops."""
        assert self.relay is not None and self.upstream_info is not None
        if self._upstream is not None:
            # A reset: what the kernel still holds to send to a server we gave up on is
            # dropped, not delivered later behind the re-sent requests' backs.
            sockets.reset_on_close(self._upstream)
            _close(self._upstream)
        self._upstream = None
        cfg = self.config
        started = time.monotonic()
        delay = cfg.reconnect_first
        attempts = 0
        while not self._stopping.is_set():
            attempts += 1
            try:
                sock, info = self._connect_upstream()
            except TlsError as e:
                # Not a network outage: someone must fix a key or certificate. Said every
                # time (at the delay's pace), and retried: the client's requests wait.
                _log.error("%s; retrying (attempt %d)", e, attempts)
            except FlexnbdError as e:
                # The first failure and then one in ten, so a long outage does not flood.
                if attempts == 1 or attempts % 10 == 0:
                    _log.warning("%s; retrying (attempt %d)", e, attempts)
            else:
                if info.size != self.upstream_info.size:
                    _log.error("upstream %s has a different size now, %d bytes, not %d: "
                               "refused, retrying",
                               self.upstream_name, info.size, self.upstream_info.size)
                    _close(sock)
                else:
                    if info.flags != self.upstream_info.flags:
                        _log.warning("upstream %s flags changed from %#x to %#x; carrying on",
                                     self.upstream_name, self.upstream_info.flags, info.flags)
                    self._warn_lost(self.upstream_info, info)
                    self._upstream = sock
                    self.upstream_info = info       # (what the next client is offered)
                    resent = self.relay.set_upstream(sock.fileno(), info.flags, info.tls,
                                                     info.structured, meta_id(info))
                    _log.info("reconnected to upstream %s (%s%s) after %.2f s and %d "
                              "attempt(s); re-sending %d request(s)", self.upstream_name,
                              info.style, _version(info.tls),
                              time.monotonic() - started, attempts, resent)
                    return True
            self._stopping.wait(delay)
            delay = min(delay * 2, cfg.reconnect_most)
        return False

    def _warn_lost(self, before: ServerInfo, now: ServerInfo) -> None:
        """The new upstream lacks what the old one agreed. It is taken all the same: refusing
        it would stall the client until a server with them came back, maybe never (a
        migration to an older server). The relay answers safely without them: READ data goes
        to a structured client in one chunk, and BLOCK_STATUS is answered here as "all data,
        no holes", which is always true (a hole reads as zeroes: it is only a slower copy)."""
        lost = [name for name, had, has in (
            ("structured replies", before.structured, now.structured),
            ("base:allocation", meta_id(before) is not None, meta_id(now) is not None))
            if had and not has]
        if lost:
            _log.warning("upstream %s no longer offers %s: READs answered in one piece and "
                         "BLOCK_STATUS as all data, by the proxy", self.upstream_name,
                         " and ".join(lost))

    def _describe_upstream_end(self, end: End) -> str:
        assert self.relay is not None
        if end == End.END_UPSTREAM_TIMEOUT:
            return (f"a request was not answered in {self.config.upstream_timeout:g} s "
                    "(FLEXNBD_UPSTREAM_TIMEOUT)")
        state = self.relay.state()
        if state.problem == Problem.UP_EOF:
            return "closed the connection"
        if state.problem == Problem.UP_ERRNO:
            return f"failed: {errno_text(state.err)}"
        if state.problem == Problem.UP_BAD_MAGIC:
            return f"sent a reply with bad magic {state.bad_value:#x}"
        return _LIES.get(state.problem, "broke the protocol ({:#x})").format(state.bad_value)

    # -- clients ---------------------------------------------------------------------------

    def _session(self, accepted: Accepted) -> None:
        """One client, on the listener's thread: the next waits in the backlog meanwhile."""
        try:
            self._serve(accepted)
        except Exception as e:  # noqa: BLE001 - one client's trouble must not end the proxy
            _log.error("client %s: %s", accepted.name, e, exc_info=True)
        finally:
            accepted.close()

    def _late(self, accepted: Accepted) -> None:
        _log.warning("client %s: handshake not finished in %g s: disconnected", accepted.name,
                     self.config.handshake_timeout)

    def _export_info(self) -> ExportInfo:
        """Offer the client what upstream agreed: structured replies, base:allocation, DF."""
        info = self.upstream_info
        assert info is not None
        return ExportInfo(info.size, block_status=meta_id(info) is not None,
                          structured_replies=info.structured,
                          flags=offered_flags(info.flags, info.structured))

    def _serve(self, accepted: Accepted) -> None:
        assert self.relay is not None
        sock, name = accepted.sock, accepted.name
        sockets.set_client_options(sock)
        sock.settimeout(self.config.handshake_timeout)
        # (The listener's deadline covers the whole handshake: a byte now and then must not
        # keep the one client slot, the next clients wait behind it.)
        try:
            agreed = serve_handshake(sock, self._export_info(), self.config.oldstyle,
                                     self._tls)
        except (OSError, FlexnbdError) as e:
            if not accepted.is_cut and not self._stopping.is_set():   # (cut: see _late)
                _log.warning("client %s: handshake failed: %s", name,
                             e.strerror if isinstance(e, OSError) and e.strerror else e)
            return
        finally:
            accepted.handshake_done()
        if agreed is None:
            _log.info("client %s left during the handshake", name)
            return
        sock.setblocking(False)
        self.relay.attach(sock.fileno(), agreed.tls, agreed.structured, agreed.meta_context)
        _log.info("client %s connected (%s%s%s%s)", name, agreed.style, _version(agreed.tls),
                  ", structured replies" if agreed.structured else "",
                  ", base:allocation" if agreed.meta_context else "")
        requests_before = self.relay.state().requests
        while True:
            end = self.relay.run()
            if end not in (End.END_UPSTREAM_LOST, End.END_UPSTREAM_TIMEOUT):
                break
            _log.warning("upstream %s %s; %d request(s) in flight; reconnecting",
                         self.upstream_name, self._describe_upstream_end(end),
                         self.relay.state().in_flight)
            if not self._reconnect():
                return
        if end == End.END_DISC and agreed.tls is not None:
            agreed.tls.close_notify()       # (as a server ends a TLS session after DISC)
        self._log_end(name, end, self.relay.state(), requests_before)

    def _log_end(self, name: str, end: End, state: RelayState, requests_before: int) -> None:
        requests = state.requests - requests_before
        if end == End.END_STOPPED:
            _log.info("client %s: stopping with %d request(s) in flight", name,
                      state.in_flight)
        elif end == End.END_DISC:
            _log.info("client %s disconnected after %d request(s)", name, requests)
        elif end == End.END_CLIENT_GONE and state.client_err == errno.ETIMEDOUT:
            _log.warning("client %s read no reply for %g s (FLEXNBD_SEND_TIMEOUT): "
                         "disconnected after %d request(s)", name, self.config.send_timeout,
                         requests)
        elif end == End.END_CLIENT_GONE and state.client_err:
            # (EPROTO: its TLS session broke, a forged or corrupted record)
            _log.warning("client %s: connection failed after %d request(s): %s", name,
                         requests, "TLS error (a bad record)" if state.client_err ==
                         errno.EPROTO else errno_text(state.client_err))
        elif end == End.END_CLIENT_GONE:
            _log.info("client %s closed the connection after %d request(s)", name, requests)
        elif end == End.END_BAD_MAGIC:
            _log.warning("client %s sent a request with bad magic %#x: disconnected", name,
                         state.bad_value)
        elif end == End.END_TOO_BIG:
            _log.warning("client %s sent a request of %d bytes (more than %d): disconnected",
                         name, state.bad_value, wire.MAX_PAYLOAD)
        else:
            _log.error("client %s: no memory for a request of %d bytes: disconnected", name,
                       state.bad_value)

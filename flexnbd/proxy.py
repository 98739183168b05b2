"""flexnbd-proxy: one NBD client in front of an NBD server that may restart or move (SPEC §7).

The client (downstream) sees one steady server. Behind the proxy the upstream connection may
fail, stall, or end because the server finished a migration and exited; the proxy reconnects
(every few seconds, for as long as it takes) to whatever serves the same address with the same
size, re-sends the requests that were not answered, and the client only sees a pause.

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

from flexnbd import _proxy, credentials, log, sockets, wire
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
# (one client at a time) and never DF (no structured replies through the proxy).
PASSED_FLAGS = (wire.FLAG_READ_ONLY | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
                | wire.FLAG_ROTATIONAL | wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES
                | wire.FLAG_SEND_CACHE | wire.FLAG_SEND_FAST_ZERO)

def offered_flags(upstream_flags: int) -> int:
    if not upstream_flags & wire.FLAG_HAS_FLAGS:
        return wire.FLAG_HAS_FLAGS
    return wire.FLAG_HAS_FLAGS | (upstream_flags & PASSED_FLAGS)


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
        self.upstream_name = (f"[{config.conn_addr}]:{config.conn_port}" if ":" in
                              config.conn_addr else f"{config.conn_addr}:{config.conn_port}")
        self._stopping = threading.Event()
        # Its stop_fd also ends the relay.
        self.listener = Listener(config.handshake_timeout, self._late)
        self._upstream: socket.socket | None = None
        self.upstream_info: ServerInfo | None = None
        # TLS: for the clients, and to upstream (loaded now: bad credentials stop the start)
        self._tls = credentials.server_policy(config.tls)
        self._conn_tls = credentials.client_context(config.conn_tls, read_ahead=True)
        self.relay: _proxy.Relay | None = None
        # How the proxy asks its process to stop (set by flexnbd.lifecycle.run).
        self.request_stop: Callable[[str], None] = lambda reason: None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect upstream, then listen. FlexnbdError if either fails."""
        cfg = self.config
        self._upstream, info = self._connect_upstream()
        self.upstream_info = info
        self.relay = _proxy.Relay(self._upstream.fileno(), info.size, info.flags,
                                  self.listener.stop_fd, cfg.cache_bytes, cfg.upstream_timeout,
                                  info.tls, cfg.send_timeout)
        try:
            # (TCP, a Unix socket path or systemd's sockets: the CLI lets only one through)
            self.listener.bind(cfg.addr, cfg.port, cfg.unix, cfg.inherited, backlog=8)
        except BaseException:
            _close(self._upstream)
            raise
        self.listener.start(self._session, "session")
        _log.info("serving %s (%s handshake%s) for upstream %s: %d bytes, flags %#x, %s%s; "
                  "read-ahead %s", self.listener.where, "oldstyle" if cfg.oldstyle else "newstyle",
                  _tls_text(cfg.tls.mode if cfg.tls else None), self.upstream_name, info.size,
                  info.flags, info.style, _version(info.tls),
                  f"{cfg.cache_bytes} bytes" if cfg.cache_bytes else "off")

    def stop(self) -> None:
        """Stop: end the session (requests in flight get no answer), close both sides."""
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
            sock = sockets.connect(cfg.conn_addr, cfg.conn_port, cfg.bind, cfg.connect_timeout)
        except OSError as e:
            raise FlexnbdError(f"cannot connect to upstream {self.upstream_name}: "
                               f"{e.strerror or e}") from None
        if _connected_to_itself(sock):
            # With nothing listening on a local port in the ephemeral range, a connect can
            # pick that very port as its source and succeed, connected to itself.
            _close(sock)
            raise FlexnbdError(f"cannot connect to upstream {self.upstream_name}: "
                               "Connection refused")
        try:
            info = client_handshake(sock, tls=self._conn_tls, server_hostname=cfg.conn_addr,
                                    timeout=cfg.handshake_timeout)
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
                    self._upstream = sock
                    resent = self.relay.set_upstream(sock.fileno(), info.flags, info.tls)
                    _log.info("reconnected to upstream %s (%s%s) after %.2f s and %d "
                              "attempt(s); re-sending %d request(s)", self.upstream_name,
                              info.style, _version(info.tls),
                              time.monotonic() - started, attempts, resent)
                    return True
            self._stopping.wait(delay)
            delay = min(delay * 2, cfg.reconnect_most)
        return False

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
        return f"answered a request that was not waiting (cookie {state.bad_value:#x})"

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
        assert self.upstream_info is not None
        return ExportInfo(self.upstream_info.size, block_status=False, structured_replies=False,
                          flags=offered_flags(self.upstream_info.flags))

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
        self.relay.attach(sock.fileno(), agreed.tls)
        _log.info("client %s connected (%s%s)", name, agreed.style, _version(agreed.tls))
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

"""One client's session: the handshake in Python, then the transmission phase in C
(``_core.Connection.serve()``, without the GIL), and one log line on how it ended.

A session's failure (a bad handshake, a client gone, an unexpected error) is logged and ends
that session only; it never reaches the other clients.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Protocol

from flexnbd import _allocmap, _core, log, sockets
from flexnbd._tls import TlsSession
from flexnbd.admission import STOPPING, Admission, Client
from flexnbd.errors import HandshakeError, PeerClosed, TlsError, errno_text
from flexnbd.handshake import ExportInfo, TlsPolicy, serve_handshake

_log = log.get("server")
_milestones = log.milestones()

Reason = _core.Reason


class CoverageKeeper(Protocol):
    """Listen mode: the coverage maps of migrations (``flexnbd.migration.listen.Coverage``)."""

    def take(self, migration_id: str | None) -> _allocmap.CoverageMap:
        """The session takes the sender's slot: the map it writes into."""
        ...

    def ended(self, coverage: _allocmap.CoverageMap, writes: int) -> None:
        """The session that took ``coverage`` ended after ``writes`` write-type requests."""
        ...


@dataclass
class Served:
    """A session that reached the transmission phase."""

    result: _core.ServeResult
    connection: _core.Connection
    tls: TlsSession | None = None
    coverage: _allocmap.CoverageMap | None = None   # listen mode: the map it wrote into


def serve(client: Client, admission: Admission, export: _core.Export, info: ExportInfo,
          oldstyle: bool, handshake_timeout: float, send_timeout: float,
          coverage: CoverageKeeper | None = None,
          tls: TlsPolicy | None = None) -> Served | None:
    """Run the session; how the transmission phase ended, or None if it never began.
    ``coverage``: listen mode, what senders wrote, per migration. ``tls``: the server's TLS
    (STARTTLS offered or required)."""
    written: list[_allocmap.CoverageMap] = []
    try:
        return _serve(client, admission, export, info, oldstyle, handshake_timeout,
                      send_timeout, coverage, tls, written)
    finally:
        if coverage is not None and written:
            connection = client.connection
            # (no connection: it never ran, so it wrote nothing)
            coverage.ended(written[0], connection.writes if connection is not None else 0)


def _serve(client: Client, admission: Admission, export: _core.Export, info: ExportInfo,
           oldstyle: bool, handshake_timeout: float, send_timeout: float,
           coverage: CoverageKeeper | None, tls: TlsPolicy | None,
           written: list[_allocmap.CoverageMap]) -> Served | None:
    sock = client.sock
    try:
        sockets.set_client_options(sock)
        sock.settimeout(handshake_timeout)
        agreed = serve_handshake(sock, info, oldstyle, tls)
        if agreed is None:
            _log.info("%s left during the handshake", client.name)
            return None
        sock.settimeout(None)
        # A reply that makes no progress this long ends the client (send() and sendfile() in
        # the hot path then fail with EAGAIN).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, sockets.timeval(send_timeout))
        newstyle = agreed.style == "newstyle"
        contexts = (_core.CONTEXT_ALLOCATION if agreed.meta_context else 0) | \
            (_core.CONTEXT_COVERAGE if agreed.migration_id is not None else 0)
        def connection() -> _core.Connection:
            # (under the admission lock, as the client takes its slot)
            if coverage is not None:
                written.append(coverage.take(agreed.migration_id))
            return _core.Connection(
                sock.fileno(), export, stop_fd=admission.stop_fd,
                structured=agreed.structured, meta_context=contexts,
                fast_zero=newstyle and export.can_punch,
                coverage=written[0] if written else None,
                # a migration sender that has WRITE_ZEROES sends holes that way
                splice_all=coverage is not None and newstyle,
                idle_spin=admission.config.idle_spin, tls=agreed.tls)
        refusal = admission.attach(client, connection)
        if refusal:
            (_log.info if refusal == STOPPING else _log.warning)(
                "%s: %s; disconnected", client.name, refusal)
            return None
        assert client.connection is not None
        if coverage is not None:
            # listen mode: the migration's sender, a milestone
            _milestones.info("sender %s connected (%s, %s%s)", client.name, agreed.style,
                             agreed.tls.version if agreed.tls is not None else "no TLS",
                             f", migration {agreed.migration_id}"
                             if agreed.migration_id is not None else "")
        else:
            _log.info("%s connected (%s%s%s)", client.name, agreed.style,
                      ", structured replies" if agreed.structured else "",
                      f", {agreed.tls.version}" if agreed.tls is not None else "")
        result = client.connection.serve()
        if agreed.tls is not None and result.reason == Reason.REASON_DISC and coverage is None:
            # (Not in listen mode: there the sender reads our close as "taken", which only
            # the migration's outcome may decide.)
            agreed.tls.close_notify()
        report(client.name, result, export.path, send_timeout)
        return Served(result, client.connection, agreed.tls, written[0] if written else None)
    except TlsError as e:
        _log.warning("%s: %s", client.name, e)
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
    return None


def report(name: str, result: _core.ServeResult, path: str, send_timeout: float) -> None:
    """One log line on how a transmission phase ended."""
    what = (f"{result.command} offset {result.offset} length {result.length}"
            if result.requests else "no request")
    err = f": {errno_text(result.errno)}" if result.errno else ""
    reason = result.reason
    if reason == Reason.REASON_DISC:
        _log.info("%s disconnected after %d requests", name, result.requests)
    elif reason == Reason.REASON_CLOSED:
        _log.info("%s closed the connection after %d requests", name, result.requests)
    elif reason == Reason.REASON_STOPPED:
        _log.info("%s disconnected by the server", name)
    elif result.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        _log.warning("%s: no progress sending a reply for %g s (%s); disconnected", name,
                     send_timeout, what)
    elif reason == Reason.REASON_VANISHED:
        _log.warning("%s went away in the middle of a request (%s)%s", name, what, err)
    elif reason == Reason.REASON_BAD_MAGIC:
        _log.warning("%s sent a request with a bad magic; answered EBADMSG and disconnected",
                     name)
    elif reason == Reason.REASON_TOO_BIG:
        _log.warning("%s sent a %d-byte WRITE, too long to drain; disconnected", name,
                     result.length)
    elif reason == Reason.REASON_IO_FATAL:
        _log.error("%s: I/O error on %s while sending %s%s; disconnected", name, path, what,
                   err)
    else:
        _log.warning("%s: socket error%s", name, err)

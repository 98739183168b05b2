"""The NBD server (serve and listen modes): composes the pieces that do the work.

- ``flexnbd.admission``: the ACL and the client limits, the killswitch, and cutting clients;
  its ``flexnbd.listener`` binds, accepts and keeps the handshake deadline;
- ``flexnbd.session``: one client's handshake and transmission phase (in C, without the GIL);
- ``flexnbd.migration.listen``: in listen mode, whether a sender's session completed the
  migration, and taking control;
- ``flexnbd.migration.source``: the mirrors this server sends (start, speed, break, wait);
- ``flexnbd.control.server``: the control socket, for which this class is the
  ``ControlTarget`` (each method a delegation).

The allocation map is built in the background once the server serves.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Sequence

from flexnbd import _allocmap, _core, acl, credentials, log, session, sockets
from flexnbd._tls import TlsContext
from flexnbd.admission import Admission, Client
from flexnbd.config import ServeConfig
from flexnbd.control.server import ControlServer
from flexnbd.errors import FlexnbdError
from flexnbd.handshake import ExportInfo
from flexnbd.migration import listen
from flexnbd.migration.outcome import Result
from flexnbd.migration.settings import MirrorSettings
from flexnbd.migration.source import MirrorControl
from flexnbd.status import Received, Status

_log = log.get("server")


def open_export(path: str, read_only: bool) -> tuple[int, int]:
    """Open FILE; its size rounded down to 512 is the export size (0.5.0 behaviour), and a
    warning says what that leaves out (or that there is nothing to serve)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as e:
        hint = ""
        if e.errno in (errno.EACCES, errno.EROFS) and not read_only and \
                os.access(path, os.R_OK):
            hint = " (it can be read: serve it with --read-only)"
        raise FlexnbdError(f"cannot open {path}: {e.strerror}{hint}") from None
    size = os.fstat(fd).st_size
    exported = size - size % 512
    if size == 0:
        _log.warning("%s is empty: clients will see a disk of 0 bytes (grow it first, e.g. "
                     "truncate -s 1G %s)", path, path)
    elif exported != size:
        _log.warning("%s is %d bytes, not a multiple of 512: %d bytes are served and its last "
                     "%d bytes are not (neither read nor written)", path, size, exported,
                     size - exported)
    return fd, exported


class Server:
    """Serves one file to up to ``config.max_clients`` clients at once."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.file = config.file
        self.fd, self.size = open_export(config.file, config.read_only)
        self.allocmap = _allocmap.AllocationMap(self.size)
        self.export = _core.Export(self.fd, self.size, config.read_only, config.file,
                                   self.allocmap, map_max=config.export_map_max)
        self.export_info = ExportInfo(self.size, config.read_only, self.export.can_punch,
                                      coverage=config.mode == "listen")
        self.tls = credentials.server_policy(config.tls)
        self._tls_client: TlsContext | None = None
        self.admission = Admission(config, self._serve_client)
        self.mirrors = MirrorControl(self, config.mirror_request_limit,
                                     config.mirror_progress_interval)
        # serve mode owns its data; listen mode only once a migration into it completed
        self._has_control = config.mode != "listen"
        # listen mode: what the current (or last) sender wrote, for the status line
        self._coverage = listen.Coverage(self.size)
        self.control = (ControlServer(config.sock, self, config.control_timeout,
                                      mode=config.sock_mode)
                        if config.sock else None)
        # How the server asks its process to stop (set by flexnbd.lifecycle.run).
        self.request_stop: Callable[[str], None] = lambda reason: None

    @property
    def tls_client(self) -> TlsContext | None:
        """The server's TLS credentials as a client, for its mirrors; made on first use, so
        that credentials fit only for serving (no ca-cert.pem) fail the mirror, not the start
        (TlsError)."""
        if self._tls_client is None:
            self._tls_client = credentials.client_context(self.config.tls)
        return self._tls_client

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the listeners and start accepting. When this returns, the server serves."""
        cfg = self.config
        self.admission.bind()
        if self.control is not None:
            try:
                self.control.bind()
            except BaseException:
                self.admission.close_listeners()
                raise
        self.admission.start()
        if self.control is not None:
            self.control.start()
        self._start_allocmap_builder()
        tls = cfg.tls
        if cfg.mode == "listen" and tls is not None and tls.certificates and \
                not tls.verify_peer:
            _log.warning("listen with --tls-certificates but without --tls-verify-peer: the "
                         "listener proves itself to the sender, but any TLS client may send "
                         "it a disk; give --tls-verify-peer (and the source a client "
                         "certificate) to take only your sender")
        _log.info("serving %s (%d bytes%s, %s handshake) on %s", cfg.file, self.size,
                  ", read-only" if cfg.read_only else "",
                  "oldstyle" if cfg.oldstyle else "newstyle", self.admission.listener.where)

    def _start_allocmap_builder(self) -> None:
        """Build the allocation map in the background, after the server serves: on a big file
        it takes a while, and readiness must not wait for it. Until it is complete the map
        answers "allocated" everywhere, and writes mark their blocks meanwhile.

        Test knobs (ServeConfig): allocmap_method forces a method, allocmap_delay_ms slows the
        builder down."""
        method = self.config.allocmap_method
        delay_ms = self.config.allocmap_delay_ms
        fd = os.dup(self.fd)  # the builder may outlive stop(), which closes self.fd

        def build() -> None:
            started = time.monotonic_ns()
            try:
                chosen = self.allocmap.build(fd, method, delay_ms)
            except Exception as e:  # noqa: BLE001 - the map stays "all allocated"
                _log.error("allocation map: build failed: %s", e)
                return
            finally:
                os.close(fd)
            _log.info("allocation map: built with %s in %.0f ms, %d extents, %d of %d bytes "
                      "allocated, %d bytes in memory", chosen,
                      (time.monotonic_ns() - started) / 1e6, self.allocmap.extents_found,
                      self.allocmap.allocated_bytes(), self.size, self.allocmap.memory_bytes)

        _log.info("allocation map: building in the background")
        threading.Thread(target=build, name="allocmap", daemon=True).start()

    @property
    def port(self) -> int | None:
        """The TCP port actually bound (useful with port 0)."""
        return self.admission.port

    def stop(self) -> None:
        """Stop accepting, let clients finish their current request, close everything.

        A running mirror is stopped (its data did not move: exit status 1); a mirror in its
        endgame is waited for."""
        self.mirrors.shutdown()
        if self.admission.stopping:
            return
        ended = self.admission.stop()
        if self.config.mode == "listen":
            # (after the sender's session ended: its figures are final)
            listen.log_exit(self._has_control, self._coverage.current, self.size)
        if self.control is not None:
            self.control.close()
        if ended:
            os.close(self.fd)
        else:
            # A client thread is still in a pwrite or fdatasync of the file: closing the
            # descriptor under it could let a later open() take its number, and the write
            # land in another file. The export stays open until the process exits (SPEC
            # §11: a connection holds its resources until its thread has ended).
            _log.warning("a client is still writing to %s after the stop grace; the file "
                         "stays open until the process exits", self.file)

    def exit_status(self) -> int:
        """The process exit status after stop(): 0, but 1 if a migration was running or its
        outcome is unknown or, in listen mode, if no migration completed."""
        if self.config.mode == "listen":
            return 0 if self._has_control else 1
        return self.mirrors.exit_status()

    # -- one client ------------------------------------------------------------------------

    def _serve_client(self, client: Client) -> None:
        listening = self.config.mode == "listen"
        took_control = False
        served = None
        try:
            if listening:
                # Should this process die before it took control, the kernel must end the
                # sender's connection with a reset, never the FIN it reads as "taken"
                # (SPEC §6.7): linger 0 from the start, undone only for the normal close.
                sockets.reset_on_close(client.sock)
            served = session.serve(client, self.admission, self.export, self.export_info,
                                   self.config.oldstyle, self.config.handshake_timeout,
                                   self.config.send_timeout,
                                   self._coverage if listening else None, self.tls)
            if served is not None and served.coverage is not None:
                outcome = listen.take_control(client.name, served.result, served.coverage,
                                              served.connection, self.export,
                                              self.admission.forbid)
                if outcome is not None:
                    took_control = outcome
                    self._has_control = outcome
                    self.request_stop("migration completed" if outcome else "I/O error")
        finally:
            if took_control:
                # The one normal close a sender may see: it reads it as "the destination took
                # control" (SPEC §6.7). Every other listen-mode session ends with a reset.
                # Under TLS the close is authenticated: a close_notify, which no one on the
                # path can forge (a sender requires it).
                if served is not None and served.tls is not None:
                    served.tls.close_notify()
                sockets.close_normally(client.sock)

    # -- what a mirror needs (flexnbd.migration.source.SourceHost) ---------------------------

    @property
    def has_control(self) -> bool:
        return self._has_control

    def forbid_clients(self) -> None:
        """Refuse new clients; end the connected ones after their current request and wait
        until they are gone (a client stuck mid-request is cut after the stop grace)."""
        self.admission.forbid()
        self.admission.cut_clients("migration endgame")

    def allow_clients(self) -> None:
        self.admission.allow()

    def close_listeners(self) -> None:
        self.admission.close_listeners()

    # -- the control socket's interface (flexnbd.control.server.ControlTarget) -------------

    def status(self) -> Status:
        m = self.mirrors
        return Status(pid=os.getpid(), size=self.size, is_mirroring=m.is_mirroring,
                      clients_allowed=self.admission.clients_allowed,
                      num_clients=self.admission.num_clients, has_control=self._has_control,
                      migration=m.figures(), allocation_map_method=self.allocmap.method,
                      handshake="oldstyle" if self.config.oldstyle else "newstyle",
                      migration_outcome=m.outcome_key(), io_error=self.export.io_error,
                      received=self._received())

    def _received(self) -> Received | None:
        if self.config.mode != "listen":
            return None
        sender = self._coverage.current
        if sender is None:
            return Received()
        return Received(sender.received_bytes, sender.zeroed_bytes, sender.covered_bytes(),
                        self._coverage.migration_id if sender is self._coverage.kept else None)

    def set_acl(self, entries: Sequence[acl.Network]) -> None:
        self.admission.set_acl(entries)

    def start_mirror(self, settings: MirrorSettings) -> Result:
        return self.mirrors.start(settings)

    def set_mirror_max_bps(self, max_bps: int | None) -> bool:
        return self.mirrors.set_max_bps(max_bps)

    def break_mirror(self) -> Result:
        return self.mirrors.break_()

    def wait_mirror(self) -> Result | Callable[[], Result]:
        return self.mirrors.wait()

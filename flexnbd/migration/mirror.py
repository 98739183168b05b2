"""The mirror: the source side of a migration (SPEC §6.2).

A supervisor thread runs attempts until one completes or ``stop()`` (the control ``break``) ends
it. An attempt:

1. connects to the destination (15 s), reads its greeting (5 s) and finishes the handshake (15 s
   in all), checks the size; the outcome of the FIRST attempt is the control reply, and a first
   attempt that fails ends the mirror;
2. waits for the allocation map (not connected: a first attempt that finds it incomplete lets
   the destination go and connects again once it is complete, so that the destination's one
   slot is never held by a sender that sends nothing), then turns on dirty tracking (the hot
   path marks every completed write, trim and zero in a dirty bitmap);
3. first pass: the whole export, in batches that each hold at most 8 MiB of data; data as
   WRITE (sendfile, at most 8 MiB each), holes as WRITE_ZEROES when the destination offers it
   (one per 4 GiB of hole, so the pass costs what the extents need, not what the size says),
   else as WRITE of zeroes;
4. dirty passes: drains the dirty bitmap and resends what it names, until nothing is left, the
   estimated time left is under 5 s, or MAX_DIRTY_PASSES passes did not converge;
5. endgame, holding the host's migration lock: new clients are forbidden, connected ones are
   disconnected after their current request, the rest is sent; then the handoff
   (``flexnbd.migration.handoff``): FLUSH answered, connection still open, DISC, and the
   destination's orderly close. Only then is the migration completed: for exit/unlink FILE is
   unlinked (unlink) and the host exits 0; for ``nothing`` clients are allowed again.

Any failure before DISC (no reply within the request limit, a bad or error reply, FLUSH
refused, a dropped connection) fails the attempt: clients are allowed again, the requests it
left unanswered are marked dirty, and after 1 s the next attempt starts. It resumes
(``flexnbd.migration.resume``) when the destination is a flexnbd listener that kept this
migration's coverage (the meta context flexnbd:coverage:<migration id>; the id is random,
one per `mirror`): its first pass sends only what the destination does not hold, and the
dirty map, never reset between attempts, adds what clients wrote since. Any doubt (a
listener that does not offer the context, one restarted since: it reports nothing covered;
0.5.0; oldstyle) and the next attempt starts over from offset 0 with the dirty map emptied.
A failure after DISC leaves the outcome UNKNOWN: the
destination may own the disk now, so the mirror ends without retrying, FILE stays, clients
stay out (except for ``nothing``) and the host exits 1. A destination whose greeting is not
NBD at all ends the mirror too (rejected): retrying would not change it.

Outcomes are ``flexnbd.migration.outcome`` values; the control socket words them.

The operator sees, at the default level (``log.milestones()``): each attempt's start (size,
data to send), a progress line at most every ``settings.progress_interval`` seconds, every
failed attempt with its reason, and the end (outcome, bytes of data and on the wire over all
attempts, duration, average rate).

Why a dirty bitmap and not a log: one bit per 4 KiB block has a bounded size (sparse: 64 KiB
per TiB, plus 512 bytes per 128 MiB and 64 bytes per 2 MiB region written to, about 32 MiB per
TiB at most), marking is one
atomic OR without a lock or the GIL, and it cannot overflow, so a client that
never stops writing can neither stall the mirror nor make it lose track; repeated writes to the
same blocks cost nothing extra. What 0.5.0 did when its log filled (send regardless of the
speed limit) we do when a dirty pass did not shrink the dirty set: clients write faster than
the limit lets us send, and waiting would never end. The endgame, which must be short, always
sends at full speed; after MAX_DIRTY_PASSES passes it comes whatever is left.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from flexnbd import _core, _mirror, hosts, log, sockets, wire
from flexnbd._allocmap import AllocationMap, DirtyMap
from flexnbd._tls import TlsContext, TlsSession
from flexnbd.errors import FlexnbdError, HandshakeError, NoGreeting, NotNbd, PeerClosed, TlsError
from flexnbd.handshake import client_handshake
from flexnbd.migration import handoff, outcome, progress, resume
from flexnbd.migration.handoff import OutcomeUnknown
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import MirrorSettings

_log = log.get("mirror")
_milestones = log.milestones()

CHUNK = 8 * 1024 * 1024
CONNECT_TIMEOUT = 15.0
GREETING_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 15.0    # the whole handshake, TLS included, one deadline
RETRY_DELAY = 1.0
ENDGAME_SECONDS = 5.0
MAX_DIRTY_PASSES = 20
# A mirror's outcome until it decides one (and if it crashes).
_ABANDONED = Result(Outcome.ABANDONED)


class MirrorHost(Protocol):
    """What the mirror needs from the server it runs in."""

    export: _core.Export
    allocmap: AllocationMap
    size: int
    file: str

    @property
    def tls_client(self) -> TlsContext | None:
        """The server's TLS credentials, for its mirrors too (TlsError if unusable)."""
        ...

    def forbid_clients(self) -> None:
        """Refuse new clients and disconnect the connected ones after their current request;
        return once none is left."""
        ...

    def allow_clients(self) -> None:
        ...

    def close_listeners(self) -> None:
        """Stop serving NBD (the migration is about to complete)."""
        ...


class AttemptFailed(FlexnbdError):
    """An attempt failed connecting; ``result`` says how (the outcome of a first attempt)."""

    def __init__(self, result: Result, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.result = result
        self.final = final           # retrying cannot help (the peer does not speak NBD)


class Abandoned(FlexnbdError):
    """``break`` (or the server stopping) ended the mirror."""


class Mirror:
    """One migration. ``start()`` returns the outcome of the first attempt.

    ``settings`` are replaced whole when the speed limit changes (``set_max_bps``): the
    running mirror reads the limit there and nowhere else.
    ``lock`` is held around the endgame (a stop or `break` waiting for it sees it finished);
    ``on_finished(mirror)`` is called once when the supervisor ends."""

    def __init__(self, host: MirrorHost, settings: MirrorSettings, lock: threading.Lock,
                 on_finished: Callable[[Mirror], None]) -> None:
        self.host = host
        self.settings = settings
        self.lock = lock
        self.on_finished = on_finished
        self._break = threading.Event()
        self._first_result: Result | None = None
        self._first_decided = threading.Event()
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()    # start() and join() (a SIGTERM may come between)
        self.completed = False
        self.outcome_unknown = False     # DISC was sent and not confirmed
        self.running = False
        self.finished = threading.Event()
        self.result = _ABANDONED         # once finished: completed, unknown, stopped, a failure
        self._stop_reason = Outcome.STOPPED
        # figures for the status line, for the current attempt
        self.attempt_started = time.monotonic()
        self.bytes_sent = 0          # payload bytes sent in this attempt (holes cost none)
        self.wire_bytes = 0          # bytes that crossed the wire in this attempt
        self.first_pass_left = host.size     # payload bytes the first pass still has to send
        self.dirty: DirtyMap | None = None
        # the destination's addresses and the --bind's, looked up once
        self._addresses: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        # The migration's name at the destination (its coverage across our reconnects), and
        # the id the destination gave that context this attempt (None: no resume there).
        self.migration_id = secrets.token_hex(16)
        self.coverage_context: int | None = None
        self.query_wire_bytes = 0    # this attempt's coverage query, on the wire
        self.session: TlsSession | None = None   # the current attempt's TLS, if any
        self.stream: _mirror.MirrorStream | None = None
        # figures for the log, over the whole mirror
        self.began = time.monotonic()
        self.attempts = 0            # connections tried (the current one included)
        self.announced = False       # an attempt began sending: the end gets a line too
        self.data_total = 0          # payload bytes sent, all attempts
        self.wire_total = 0          # bytes on the wire, all attempts
        self.phase = "first pass"
        self._how = ""               # the destination's handshake, for the start line
        self._pacer = progress.Pacer(settings.progress_interval)

    # -- control ---------------------------------------------------------------------------

    def start(self) -> Result:
        """Start the supervisor; wait for the first attempt's connection outcome. A mirror
        stopped before it started (the server stopping at that moment) does not start."""
        with self._starting:
            if self._break.is_set():
                self._end(Result(self._stop_reason), completed=False)
            else:
                self.running = True
                self._thread = threading.Thread(target=self._supervise, name="mirror",
                                                daemon=True)
                self._thread.start()
        self._first_decided.wait()
        assert self._first_result is not None
        return self._first_result

    def stop(self, shutting_down: bool = False) -> None:
        """``break`` (or the server stopping): stop at once."""
        if shutting_down:
            self._stop_reason = Outcome.SHUTTING_DOWN
        self._break.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the supervisor; at once if it never started (``stop()`` comes first, so a
        mirror not started by now never will: see start)."""
        with self._starting:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def set_max_bps(self, max_bps: int | None) -> None:
        self.settings = self.settings.with_max_bps(max_bps)

    # -- status figures --------------------------------------------------------------------

    def bytes_left(self) -> int:
        dirty = self.dirty.count_bytes() if self.dirty is not None else 0
        return self.first_pass_left + dirty

    def speed(self) -> int:
        elapsed = time.monotonic() - self.attempt_started
        return int(self.bytes_sent / elapsed) if elapsed > 0 else 0

    def duration(self) -> int:
        return int(time.monotonic() - self.attempt_started)

    def seconds_left(self) -> int:
        speed = self.speed()
        left = self.bytes_left()
        if left == 0:
            return 0
        return int(left / speed) + 1 if speed else -1

    # -- the supervisor --------------------------------------------------------------------

    def _decide_first(self, result: Result) -> None:
        if self._first_result is None:
            self._first_result = result
            self._first_decided.set()

    def _supervise(self) -> None:
        completed = False
        result = _ABANDONED
        try:
            while not self._break.is_set():
                self.attempts += 1
                try:
                    sock, zeroes = self._connect()
                except AttemptFailed as e:
                    if self._first_result is None:
                        _log.warning("mirror to %s port %d: %s", self.settings.addr,
                                     self.settings.port, e)
                        self._decide_first(e.result)
                        result = e.result
                        return
                    if e.final:
                        _log.error("mirror to %s port %d: %s; not retrying", self.settings.addr,
                                   self.settings.port, e)
                        result = Result(Outcome.REJECTED, e.result.detail)
                        return
                    _log.warning("mirror attempt failed: %s; retrying in %.0f s (attempt %d to "
                                 "%s port %d)", e, RETRY_DELAY, self.attempts,
                                 self.settings.addr, self.settings.port)
                    self._break.wait(RETRY_DELAY)
                    continue
                self._decide_first(Result(Outcome.STARTED))
                if not self.host.allocmap.complete:
                    # The destination was checked (the `mirror` reply); do not hold its one
                    # slot idle while the map is built (a listener cuts a sender that sends
                    # nothing): let go, and connect again once the map is complete.
                    sock.close()
                    self.attempts -= 1          # (it sent nothing: not an attempt)
                    if not self._wait_for_allocmap():
                        return
                    continue
                try:
                    completed = self._attempt(sock, zeroes)
                    return
                except Abandoned:
                    _log.warning("mirror abandoned")
                    return
                except OutcomeUnknown as e:
                    self._unknown(e)
                    result = Result(Outcome.UNKNOWN)
                    return
                except (FlexnbdError, OSError) as e:
                    self._mark_unanswered()
                    _log.warning("mirror attempt failed: %s; retrying in %.0f s (attempt %d to "
                                 "%s port %d, %s, %d bytes of data sent)",
                                 _describe(e), RETRY_DELAY, self.attempts, self.settings.addr,
                                 self.settings.port, self.phase, self.bytes_sent)
                    self.host.allow_clients()
                    self._break.wait(RETRY_DELAY)
                finally:
                    sock.close()
                    self._tally()
        except Exception:  # noqa: BLE001 - never report success for a mirror that crashed
            _log.exception("mirror failed")
        finally:
            self.host.export.track_dirty(False)
            if completed:
                result = Result(Outcome.COMPLETED)
            elif self._break.is_set() and result.outcome is not Outcome.UNKNOWN:
                result = Result(self._stop_reason)
            if self.announced:
                self._log_end(result.outcome, completed)
            self._end(result, completed)

    def _mark_unanswered(self) -> None:
        """An attempt failed: what it sent without a successful answer may be torn or
        missing at the destination (even where it held an older copy): dirty, so a resumed
        attempt sends it again."""
        if self.stream is not None and self.dirty is not None:
            for offset, length in self.stream.unanswered():
                self.dirty.mark(offset, length)

    def _tally(self) -> None:
        """An attempt ended: add its figures to the mirror's."""
        self.data_total += self.bytes_sent
        self.wire_total += self.query_wire_bytes
        if self.completed:
            self.wire_total += self.wire_bytes
        elif self.stream is not None:
            self.wire_total += self.stream.wire_bytes

    def _log_end(self, outcome: Outcome, completed: bool) -> None:
        took = time.monotonic() - self.began
        average = progress.rate(self.data_total / took if took > 0 else 0)
        if completed:
            # (benchmarks/migration.py and the chaos checker read this line)
            _milestones.info("migration completed: %d bytes of data sent, %d bytes on the "
                             "wire, in %.2f s (%s on average, %d attempt%s; dirty map: %d "
                             "bytes in memory)", self.data_total, self.wire_total, took,
                             average, self.attempts, "" if self.attempts == 1 else "s",
                             self.dirty.memory_bytes if self.dirty is not None else 0)
            return
        _milestones.info("migration to %s port %d %s after %d attempt%s: %d bytes of data "
                         "sent, %d bytes on the wire, in %.2f s (%s on average)",
                         self.settings.addr, self.settings.port,
                         progress.ENDED.get(outcome, f"failed ({outcome.name.lower()})"),
                         self.attempts, "" if self.attempts == 1 else "s", self.data_total,
                         self.wire_total, took, average)

    def _end(self, result: Result, completed: bool) -> None:
        self.result = result
        self.running = False
        self.completed = completed
        self._decide_first(_ABANDONED)
        self.finished.set()
        self.on_finished(self)

    def _connect(self) -> tuple[socket.socket, bool]:
        """Connect and check the greeting. (socket, destination takes WRITE_ZEROES)."""
        p = self.settings
        addresses, sources = self._resolve()
        try:
            sock = sockets.connect(addresses, p.port, sources, timeout=CONNECT_TIMEOUT)
        except ConnectionResetError as e:
            # Connected, then reset before we looked (the pending error surfaces in
            # connect()): the peer took the connection and threw it away.
            raise AttemptFailed(Result(Outcome.REJECTED,
                                       outcome.connect_failed(e, CONNECT_TIMEOUT)),
                                "the destination reset the connection") from None
        except OSError as e:
            raise AttemptFailed(Result(Outcome.FAILED_TO_CONNECT,
                                       outcome.connect_failed(e, CONNECT_TIMEOUT)),
                                f"cannot connect: {_describe(e)}") from None
        try:
            try:
                info = client_handshake(sock, tls=self.host.tls_client, server_hostname=p.addr,
                                        timeout=HANDSHAKE_TIMEOUT,
                                        greeting_timeout=GREETING_TIMEOUT,
                                        migration_id=self.migration_id)
            except NoGreeting as e:
                raise AttemptFailed(Result(Outcome.NO_RESPONSE,
                                           outcome.no_greeting(timeout=GREETING_TIMEOUT)),
                                    str(e)) from None
            except TimeoutError as e:
                raise AttemptFailed(Result(Outcome.NO_RESPONSE, str(e)), str(e)) from None
            except TlsError as e:
                # A wrong key or certificate stays wrong: final, never a retry loop.
                raise AttemptFailed(Result(Outcome.REJECTED,
                                           outcome.tls_failed(str(e), self._tls_kind(), p.addr)),
                                    str(e), final=True) from None
            except NotNbd as e:
                raise AttemptFailed(Result(Outcome.REJECTED,
                                           outcome.no_greeting(why=outcome.NOT_NBD)),
                                    f"the destination is not an NBD server: {e}",
                                    final=True) from None
            except (HandshakeError, PeerClosed, OSError) as e:
                why = outcome.connect_failed(e, CONNECT_TIMEOUT) \
                    if isinstance(e, OSError) else str(e)
                raise AttemptFailed(Result(Outcome.REJECTED, why),
                                    f"the destination rejected us: {e}") from None
            if info.size != self.host.size:
                raise AttemptFailed(Result(Outcome.SIZE_MISMATCH,
                                           outcome.size_mismatch(info.size, self.host.size)),
                                    f"the destination exports {info.size} bytes, "
                                    f"we have {self.host.size}")
            zeroes = info.style == "newstyle" and info.has(wire.FLAG_SEND_WRITE_ZEROES)
            self.session = info.tls
            self.coverage_context = info.coverage_context
            self._how = ", ".join([info.style, info.tls.version if info.tls else "no TLS",
                                   "holes as WRITE_ZEROES" if zeroes else "holes as zeroes"])
            _log.info("mirror connected to %s port %d (%s%s%s)",
                      hosts.described(p.addr, (sockets.peer_address(sock),)), p.port, info.style,
                      ", WRITE_ZEROES" if zeroes else "",
                      f", {info.tls.version}" if info.tls is not None else "")
            return sock, zeroes
        except BaseException:
            sock.close()
            raise

    def _resolve(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The destination's addresses and the bind address's, looked up once per mirror
        (every attempt tries them in order); AttemptFailed if a name has none."""
        if self._addresses is None:
            p = self.settings
            try:
                self._addresses = (hosts.resolve(p.addr), sockets.local_addresses(p.bind))
            except FlexnbdError as e:
                raise AttemptFailed(Result(Outcome.FAILED_TO_CONNECT, str(e)),
                                    str(e)) from None
            if self._addresses[0] != (p.addr,):
                _log.info("mirror destination %s", hosts.described(p.addr, self._addresses[0]))
        return self._addresses

    def _tls_kind(self) -> str | None:
        """"psk" or "x509": which hint a TLS failure gets (None: no usable credentials)."""
        try:
            context = self.host.tls_client
        except FlexnbdError:
            return None
        return context.kind if context is not None else None

    def _attempt(self, sock: socket.socket, zeroes: bool) -> bool:
        """One attempt: from offset 0, or resumed. True when the migration completed."""
        self.attempt_started = time.monotonic()
        self.bytes_sent = self.wire_bytes = self.query_wire_bytes = 0
        self.stream = None
        self.phase = "first pass"
        self.first_pass_left = self.host.size
        if not self._wait_for_allocmap():
            raise Abandoned("break")
        gaps = self._missing(sock)
        whole = [(0, self.host.size)]
        resumed = gaps is not None and gaps != whole
        if gaps is None or not resumed:
            # From offset 0: tracking starts (or starts over) before the first pass reads.
            gaps = whole
            self.dirty = self.host.export.track_dirty(True)
        assert self.dirty is not None
        self.first_pass_left = sum(self.host.allocmap.span(offset, length, not zeroes,
                                                           end=offset + length)[1]
                                   for offset, length in gaps)
        self._log_start(gaps, resumed)
        # (each reply within the request limit, one deadline however it trickles in)
        self.stream = _mirror.MirrorStream(sock.fileno(), self.host.export, zeroes,
                                         tls=self.session,
                                         timeout=self.settings.request_limit)
        self._first_pass(gaps, holes_are_payload=not zeroes)
        passes = 0
        throttle = True
        previous = None
        while True:
            left = self.dirty.count_bytes()
            speed = self.speed()
            if left == 0 or (speed and left / speed < ENDGAME_SECONDS) or \
                    passes >= MAX_DIRTY_PASSES:
                break
            if throttle and previous is not None and left >= previous:
                # Clients dirty data faster than the limit lets us send it: like 0.5.0 when
                # its dirty log filled, send regardless of the limit so the mirror converges.
                _log.info("mirror: %d bytes dirty and not shrinking; ignoring the speed limit "
                          "for the rest of the migration", left)
                throttle = False
            previous = left
            self.phase = f"dirty pass {passes + 1}"
            self._drain(throttle=throttle)
            passes += 1
        return self._endgame(sock)

    def _missing(self, sock: socket.socket) -> list[tuple[int, int]] | None:
        """A resumed attempt: the ranges the destination does not hold (what clients wrote
        since, and what was unanswered, are in the dirty map). None: start from offset 0
        (the first attempt, or a destination that kept no coverage of this migration)."""
        if self.dirty is None or self.coverage_context is None:
            return None
        channel = sock if self.session is None else self.session
        try:
            gaps, self.query_wire_bytes = resume.missing(channel, self.host.size,
                                                         self.coverage_context,
                                                         self.settings.request_limit,
                                                         self._break.is_set)
        except resume.Stopped:
            raise Abandoned("break") from None
        return gaps

    def _first_pass(self, ranges: list[tuple[int, int]], holes_are_payload: bool) -> None:
        """Send the ranges (the whole export, or what a resumed attempt lacks) once, a batch
        of up to a chunk of payload at a time (the holes between cost nothing when they go as
        WRITE_ZEROES). What it sends is clean from then on: its dirty bits are cleared
        first (like ``take_run``: a write that lands later marks them again)."""
        allocmap = self.host.allocmap
        assert self.dirty is not None
        for start, length in ranges:
            offset, end = start, start + length
            while offset < end:
                self._check_break()
                n, payload = allocmap.span(offset, self._chunk(), holes_are_payload, end=end)
                self.dirty.clear(offset, n)
                self._send(offset, n, throttle=True, payload=payload)
                self.first_pass_left = max(0, self.first_pass_left - payload)
                offset += n

    def _wait_for_allocmap(self) -> bool:
        """Wait until the allocation map is complete; False if `break` came first."""
        while not self.host.allocmap.complete:
            if self._break.wait(0.05):
                return False
        return True

    def _endgame(self, sock: socket.socket) -> bool:
        assert self.stream is not None
        channel = sock if self.session is None else self.session   # (TLS: through it)
        with self.lock:
            self._check_break()
            self.phase = "endgame"
            _log.info("mirror endgame: %d bytes dirty; disconnecting clients",
                      self.dirty.count_bytes() if self.dirty else 0)
            self.host.forbid_clients()
            self._drain(throttle=False, until_empty=True)
            self.stream.flush()                 # every request answered, without error
            self._check_break()
            handoff.flush(channel, self.settings.request_limit)   # durable at the destination
            handoff.check_open(channel)
            try:
                handoff.send_disc(channel)   # (an OSError here: it never left; retry)
            except OutcomeUnknown:
                self.outcome_unknown = True
                raise
            # From here on the destination may own the disk: no retry, whatever happens.
            finishing = self.settings.action in ("exit", "unlink")
            try:
                if finishing:
                    self.host.close_listeners()
                handoff.await_close(channel, self.settings.request_limit)
            except Exception as e:  # noqa: BLE001 - after DISC every failure is "unknown"
                # (decided under the lock, where `break` and stop signals look)
                self.outcome_unknown = True
                if isinstance(e, OutcomeUnknown):
                    raise
                raise OutcomeUnknown(_describe(e)) from e
            if self.settings.action == "unlink":
                try:
                    os.unlink(self.host.file)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    _log.error("migration completed, but %s could not be unlinked: %s",
                               self.host.file, e.strerror)
            # plus FLUSH, its reply, and DISC
            self.wire_bytes = self.stream.wire_bytes + 2 * wire.REQUEST_SIZE + \
                wire.SIMPLE_REPLY_SIZE
            # Still under the lock: a `break` or a stop signal waiting for it must see the
            # migration as completed, never as one they could stop.
            self.completed = True
            if not finishing:
                self.host.allow_clients()
            return True

    def _unknown(self, e: OutcomeUnknown) -> None:
        """DISC went out but the destination did not confirm: it may own the disk now, or
        not. Keep FILE, keep clients out (unless the operator asked for two copies with
        ``nothing``), never retry; the host exits 1."""
        p = self.settings
        _log.critical("migration outcome unknown: %s. The destination %s port %d may or may "
                      "not have taken control: check its status (has_control) and log before "
                      "using either copy; %s is kept%s", e, p.addr, p.port, self.host.file,
                      "" if p.action == "nothing" else " and this server serves no one")
        if p.action == "nothing":
            self.host.allow_clients()

    def _drain(self, throttle: bool, until_empty: bool = False) -> None:
        """Send what the dirty map names: one sweep over the export, or (``until_empty``, in
        the endgame when no client writes any more) sweeps until nothing is dirty."""
        assert self.dirty is not None
        while True:
            offset = 0
            while True:
                self._check_break()
                run = self.dirty.take_run(offset, self._chunk() if throttle else CHUNK)
                if run is None:
                    break
                start, length = run
                self._send(start, length, throttle)
                offset = start + length
            if not until_empty or self.dirty.count_bytes() == 0:
                return

    def _chunk(self) -> int:
        """Request size: 8 MiB, or under a speed limit about a tenth of a second's worth, so
        the limit holds from the first request on."""
        max_bps = self.settings.max_bps
        if not max_bps:
            return CHUNK
        return max(64 * 1024, min(CHUNK, max_bps // 10 // 4096 * 4096))

    def _send(self, offset: int, length: int, throttle: bool, payload: int | None = None) -> None:
        """Send a range whose payload (data, and holes unless they go as WRITE_ZEROES) is
        about ``payload`` bytes (default: all of it)."""
        max_bps = self.settings.max_bps
        if throttle and max_bps:
            # Keep the average since the attempt began at or under the limit, counting this
            # request before it goes.
            ahead = (self.bytes_sent + (length if payload is None else payload)) / max_bps - \
                (time.monotonic() - self.attempt_started)
            if ahead > 0 and self._break.wait(ahead):
                raise Abandoned("break")
        assert self.stream is not None
        self.bytes_sent += self.stream.send(offset, length)
        if self._pacer.due():
            self._log_progress()

    def _log_start(self, gaps: list[tuple[int, int]], resumed: bool) -> None:
        p = self.settings
        missing = sum(length for _, length in gaps)
        if self.attempts == 1:
            _milestones.info("migration to %s port %d started: %d bytes, %d bytes of data to "
                             "send (%s)", p.addr, p.port, self.host.size, self.first_pass_left,
                             self._how)
        elif resumed:
            _milestones.info("migration to %s port %d: attempt %d resumes: the destination "
                             "holds %d of %d bytes, skipped; %d bytes of data to send and %d "
                             "dirty (%s)", p.addr, p.port, self.attempts,
                             self.host.size - missing, self.host.size, self.first_pass_left,
                             self.dirty.count_bytes() if self.dirty is not None else 0,
                             self._how)
        else:
            _milestones.info("migration to %s port %d: attempt %d starts over from offset 0%s: "
                             "%d bytes of data to send (%s)", p.addr, p.port, self.attempts,
                             " (the destination holds none of this migration: restarted?)"
                             if self.coverage_context is not None else
                             " (the destination keeps no coverage to resume from)",
                             self.first_pass_left, self._how)
        self.announced = True
        self._pacer.restart()

    def _log_progress(self) -> None:
        left = self.bytes_left()
        _milestones.info("migration to %s port %d: %.1f%% (%d bytes of data sent, %d left), "
                         "%s, %s left, attempt %d, %s", self.settings.addr, self.settings.port,
                         progress.percent(self.bytes_sent, left), self.bytes_sent, left,
                         progress.rate(self.speed()), progress.eta(self.seconds_left()),
                         self.attempts, self.phase)

    def _check_break(self) -> None:
        if self._break.is_set():
            raise Abandoned("break")


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__

"""Scripted fake NBD destinations for migration tests.

``FakeDest`` listens on 127.0.0.1 (an ephemeral port) and runs one ``Script`` per accepted
connection: ``FakeDest(size, path, scripts=[s0, s1, ...], default=s)`` runs ``s0`` for the first
connection, ``s1`` for the second, and ``default`` for the rest. A script says

- the greeting: ``oldstyle`` (the 152-byte greeting, flags 13 as 0.5.0 sends), ``newstyle``
  (fixed newstyle; GO/INFO/EXPORT_NAME answered, anything else ERR_UNSUP), ``none`` (accept and
  say nothing: the peer times out), ``close`` (accept and close at once) or ``badmagic`` (an
  oldstyle greeting whose first magic is wrong); ``size`` overrides the advertised export size,
  ``write_zeroes`` whether a newstyle greeting offers WRITE_ZEROES, ``close_after_greeting``
  closes right after the greeting (newstyle: after the client's flags);
- a fault at the request with index ``fail_at`` (0-based, on this connection): ``error`` (reply
  with ``error``), ``badcookie``, ``badmagic`` (reply with a corrupted cookie/magic), ``hang``
  (never reply again, keep reading and discarding) or ``close`` (close without replying);
- ``only_cmds``: accept only these commands (0.5.0's listener knew READ, WRITE and DISC, and
  answered FLUSH); any other is answered EINVAL and recorded in ``unexpected``;
- the handoff (SPEC §6.7): ``on_flush`` says how a FLUSH is met: ``ok`` (answered, error 0),
  ``error`` (answered with ``error``), ``hang`` (never answered), ``close`` (the connection is
  closed without a reply) or ``ok_close`` (answered, and the FIN goes out in the same segment
  as the reply: the sender finds the connection closed as soon as it has the reply);
  ``after_last_reply``: right after replying to the WRITE (or
  WRITE_ZEROES) that completed the coverage of the export on this connection, ``close`` (FIN
  in the same segment as that reply) or ``reset`` (SO_LINGER 0, then close); ``on_disc``: what
  follows a DISC: ``close`` (an orderly close, FIN), ``reset`` (SO_LINGER 0, then close: the
  sender sees a reset), ``hold`` (the socket stays open, whatever comes is discarded, until
  the peer closes or ``FakeDest.close()``) or ``junk`` (16 bytes nobody asked for, then as
  ``hold``).

After ``on_flush="hang"``, ``on_flush="ok_close"`` and ``after_last_reply="close"`` the requests
that still come are recorded (never answered) until the peer closes, so a test can tell whether
a DISC came after all.

Without a fault every request is served: WRITE payloads land in ``path`` (a zero payload is not
written where the file already reads zeroes, so a fresh sparse file stays sparse, as 0.5.0's
receiver kept it), WRITE_ZEROES zero the range the same way, READ answers from the file, DISC
ends the connection. Replies are simple and echo the request's cookie.

Resume (issue 25): a newstyle script with ``coverage=True`` plays a flexnbd listener that
keeps a migration's coverage: STRUCTURED_REPLY is ACKed, and LIST_META_CONTEXT and
SET_META_CONTEXT list ``flexnbd:coverage:<the id the client asks for>`` (the first valid one;
SET gives it the id ``coverage_context``, and records the id in ``ConnRecord.migration_id``).
``block_status`` says how a BLOCK_STATUS is answered: ``""`` as any other command (a simple
reply, as before), ``honest`` (what this FakeDest's connections of that migration wrote with
acknowledged WRITE/WRITE_ZEROES, 1024 extents at most), or a lie: ``all`` (everything covered),
``none`` (nothing covered), ``tiny`` (one covered extent of 1 byte, 1 ms after the request:
a query of one round trip per byte), ``badcookie``,
``badmagic``, ``zero_extent`` (an extent of length 0), ``beyond`` (extents adding up to more
than asked), ``other_context`` (the reply names another context id), ``oversized`` (a valid
chunk of more than 64 KiB), ``no_done`` (a chunk without REPLY_FLAG_DONE), ``error_chunk``,
``simple_error``, ``simple_ok`` (simple replies), ``hang`` (never answered; the rest is read and
discarded) or ``close``. ``ConnRecord.block_status`` counts the BLOCK_STATUS requests answered
(or not) that way.

Structured replies (the proxy's upstream, issue 26): a newstyle script with
``structured=True`` ACKs STRUCTURED_REPLY, lists and selects ``base:allocation`` (SET gives it
the id ``allocation_context``, on purpose not flexnbd's 1) and answers READ in chunks (4 KiB
blocks of zeroes as OFFSET_HOLE, the rest as OFFSET_DATA, ascending; NONE for no data) and
BLOCK_STATUS from the file (zero 4 KiB blocks: HOLE|ZERO; all data for ``allocation="data"``).
``chunks`` makes every READ and BLOCK_STATUS reply of the connection a lie instead (see
``_lie``): ``long`` (an OFFSET_DATA longer than the request), ``bad_hole`` (an OFFSET_HOLE
with a payload of 16 bytes), ``badcookie``, ``badmagic``, ``outside`` (a hole past the end of
the request), ``overlap`` (the same data twice), ``incomplete`` (half of it, then DONE),
``status_to_read`` (a BLOCK_STATUS chunk answering a READ), ``context`` (BLOCK_STATUS for
another context id), ``empty_extent``, ``endless`` (ERROR chunks without DONE, as fast as the
socket takes them), ``trickle`` (the same, one every 0.2 s), ``cut`` (half of the honest
reply's bytes, then close: a reconnect in the middle of a reply); ``ConnRecord.lies`` counts
them.

``FakeDest.old050(size, path)`` is a 0.5.0-like oldstyle listener: READ/WRITE/DISC/FLUSH only.

Everything is recorded per connection in ``conns`` (``ConnRecord``): the requests, the payload
bytes received, all bytes read from the socket, whether DISC came (and when), whether the writes
acknowledged on that connection covered the whole export, and how the connection ended
(``how_ended``). ``FakeDest(..., on_request=f)`` calls
``f(conn_record, req)`` for every request as soon as it has been read (payload included), before
it is answered, on the connection's thread: a test can look at the sender's state at that
moment (the sender is then waiting for this reply). Every socket and thread ends in
``close()`` (also the context manager's exit).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flexnbd import wire
from tests.fakes.accepting import accept_until, close_all
from tests.support.rawclient import ServerClosed, recv_exact

ZERO_4K = bytes(4096)


@dataclass
class Script:
    greeting: str = "oldstyle"       # oldstyle | newstyle | none | close | badmagic
    size: int | None = None          # advertised size (None: the FakeDest's size)
    write_zeroes: bool = True        # newstyle: offer SEND_WRITE_ZEROES
    close_after_greeting: bool = False
    fail_at: int | None = None
    fault: str = ""                  # error | badcookie | badmagic | hang | close
    error: int = wire.NBD_EIO
    only_cmds: frozenset[int] | None = None
    on_flush: str = "ok"             # ok | error | hang | close | ok_close
    after_last_reply: str = ""       # "" | close | reset (after the reply completing coverage)
    on_disc: str = "close"           # close | reset | hold | junk
    # Resume (issue 25): offer flexnbd:coverage:<id> (newstyle), and how to answer BLOCK_STATUS
    coverage: bool = False
    coverage_context: int = wire.COVERAGE_ID     # the context id SET gives it
    block_status: str = ""           # "" (as any command) | honest | all | none | a lie (above)
    # Structured replies and base:allocation (the proxy's upstream)
    structured: bool = False
    allocation_context: int = 7      # the id SET gives base:allocation
    allocation: str = "file"         # file (zero blocks are holes) | data (all data)
    chunks: str = ""                 # "" honest | a lie (above)


@dataclass
class Req:
    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    error: int = 0                   # what we answered (0 ok); -1: not answered


@dataclass
class ConnRecord:
    index: int
    script: Script
    requests: list[Req] = field(default_factory=list)
    bytes_read: int = 0              # every byte read from the socket, handshake included
    payload_bytes: int = 0           # WRITE payload bytes
    disc: bool = False
    unexpected: list[Req] = field(default_factory=list)
    fault_fired: bool = False
    handshake_done: bool = False
    ended: bool = False
    covered: bool = False            # acknowledged writes covered the whole export
    start_time: float = 0.0          # time.monotonic() when the connection was accepted
    disc_time: float | None = None   # ... when the DISC was read
    flush_time: float | None = None  # ... when the first FLUSH was read
    end_time: float | None = None    # ... when this connection's thread ended
    how_ended: str = ""              # what closed it: peer | fin | reset | hold | stop | fault
    handoff_fired: str = ""          # on_flush / after_last_reply fault that fired
    peer_reset: bool = False         # a read failed with a reset (the peer closed with unread
                                     # data, or with SO_LINGER 0)
    options: list[int] = field(default_factory=list)    # the handshake's options, in order
    migration_id: str | None = None  # coverage script: the id SET selected
    block_status: int = 0            # BLOCK_STATUS requests answered by ``script.block_status``
    structured: bool = False         # structured replies agreed
    allocation: bool = False         # base:allocation selected
    lies: int = 0                    # replies answered with ``script.chunks``

    @property
    def types(self) -> list[int]:
        """The command of every request, in arrival order (DISC included)."""
        return [r.type for r in self.requests]

    def count(self, cmd: int) -> int:
        return sum(1 for r in self.requests if r.type == cmd)


class _Closed(Exception):
    pass


class FakeDest:
    def __init__(self, size: int, path: str | os.PathLike | None = None,
                 scripts: list[Script] | None = None, default: Script | None = None,
                 on_request: Callable[[ConnRecord, Req], None] | None = None) -> None:
        self.size = size
        self.on_request = on_request
        self.path = os.fspath(path) if path is not None else None
        self.scripts = list(scripts or [])
        self.default = default or Script()
        self.conns: list[ConnRecord] = []
        # migration id: [(start, end)] its connections wrote (acknowledged WRITE/WRITE_ZEROES)
        self.coverage: dict[str, list[tuple[int, int]]] = {}
        self._fd = os.open(self.path, os.O_RDWR) if self.path else -1
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._accept = threading.Thread(target=self._accept_loop, name="fakedest", daemon=True)
        self._accept.start()

    @classmethod
    def old050(cls, size: int, path: str | os.PathLike) -> FakeDest:
        """A 0.5.0-like oldstyle listener: READ, WRITE, DISC and FLUSH only (0.5.0 answered
        FLUSH), simple replies."""
        script = Script(greeting="oldstyle",
                        only_cmds=frozenset({wire.CMD_READ, wire.CMD_WRITE, wire.CMD_DISC,
                                             wire.CMD_FLUSH}))
        return cls(size, path, default=script)

    def __enter__(self) -> FakeDest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def completed(self) -> bool:
        """Some connection covered the whole export with acknowledged writes, then sent DISC
        (0.5.0's listener took any DISC as completion; we are stricter)."""
        return any(c.disc and c.covered for c in self.conns)

    def wait(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    def close(self) -> None:
        self._stop.set()
        self._accept.join(5)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        close_all(socks, threads, 5)
        try:
            self._listener.close()
        except OSError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- accepting -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._stop, self._accepted)

    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            index = len(self.conns)
            script = self.scripts[index] if index < len(self.scripts) else self.default
            rec = ConnRecord(index, script, start_time=time.monotonic())
            self.conns.append(rec)
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, rec),
                                 name=f"fakedest-{index}", daemon=True)
            self._threads.append(t)
        t.start()

    # -- one connection ------------------------------------------------------------------

    def _recv(self, sock: socket.socket, rec: ConnRecord, n: int) -> bytes:
        def count(k: int) -> None:
            rec.bytes_read += k

        try:
            return recv_exact(sock, n, count)
        except ServerClosed as e:
            rec.peer_reset = rec.peer_reset or e.reset
            raise _Closed() from e
        except OSError as e:
            raise _Closed() from e

    def _serve(self, sock: socket.socket, rec: ConnRecord) -> None:
        s = rec.script
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if s.greeting == "close":
                return
            if s.greeting == "none":
                self._discard_until_closed(sock, rec)
                return
            size = self.size if s.size is None else s.size
            if s.greeting in ("oldstyle", "badmagic"):
                greeting = wire.pack_oldstyle_greeting(size, wire.OLDSTYLE_FLAGS)
                if s.greeting == "badmagic":
                    greeting = b"NBDMAGIX" + greeting[8:]
                sock.sendall(greeting)
                if s.close_after_greeting:
                    return
            elif s.greeting == "newstyle":
                if not self._newstyle(sock, rec, size):
                    return
            else:
                raise ValueError(f"unknown greeting {s.greeting!r}")
            rec.handshake_done = True
            self._transmission(sock, rec)
        except _Closed:
            rec.how_ended = rec.how_ended or "peer"
        finally:
            rec.how_ended = rec.how_ended or ("stop" if self._stop.is_set() else "fin")
            rec.end_time = time.monotonic()
            rec.ended = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _newstyle(self, sock: socket.socket, rec: ConnRecord, size: int) -> bool:
        s = rec.script
        sock.sendall(wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self._recv(sock, rec, 4))
        if s.close_after_greeting:
            return False
        tflags = (wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
                  | wire.FLAG_SEND_TRIM)
        if s.write_zeroes:
            tflags |= wire.FLAG_SEND_WRITE_ZEROES
        while True:
            magic, option, length = wire.unpack_option_header(
                self._recv(sock, rec, wire.OPTION_HEADER_SIZE))
            if magic != wire.IHAVEOPT or length > 65536:
                return False
            data = self._recv(sock, rec, length)
            rec.options.append(option)
            if (s.coverage or s.structured) and option == wire.OPT_STRUCTURED_REPLY:
                rec.structured = True
                sock.sendall(wire.pack_option_reply(option, wire.REP_ACK))
                continue
            if s.structured and option in (wire.OPT_LIST_META_CONTEXT,
                                           wire.OPT_SET_META_CONTEXT):
                self._allocation_context(sock, rec, option, data)
                continue
            if s.coverage and option in (wire.OPT_LIST_META_CONTEXT, wire.OPT_SET_META_CONTEXT):
                self._meta_context(sock, rec, option, data)
                continue
            if option == wire.OPT_EXPORT_NAME:
                tail = b"" if cflags & wire.FLAG_C_NO_ZEROES else bytes(124)
                sock.sendall(struct.pack(">QH", size, tflags) + tail)
                return True
            if s.structured and rec.structured:
                tflags |= wire.FLAG_SEND_DF
            if option in (wire.OPT_GO, wire.OPT_INFO):
                info = struct.pack(">HQH", wire.INFO_EXPORT, size, tflags)
                sock.sendall(wire.pack_option_reply(option, wire.REP_INFO, info)
                             + wire.pack_option_reply(option, wire.REP_ACK))
                if option == wire.OPT_GO:
                    return True
                continue
            if option == wire.OPT_ABORT:
                sock.sendall(wire.pack_option_reply(option, wire.REP_ACK))
                return False
            sock.sendall(wire.pack_option_reply(option, wire.REP_ERR_UNSUP))

    def _meta_context(self, sock: socket.socket, rec: ConnRecord, option: int,
                      data: bytes) -> None:
        """LIST/SET_META_CONTEXT: the first valid flexnbd:coverage:<id> asked for."""
        queries = []
        try:
            (name_len,) = struct.unpack_from(">I", data, 0)
            pos = 4 + name_len
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            for _ in range(count):
                (n,) = struct.unpack_from(">I", data, pos)
                queries.append(data[pos + 4:pos + 4 + n])
                pos += 4 + n
        except struct.error:
            sock.sendall(wire.pack_option_reply(option, wire.REP_ERR_INVALID))
            return
        setting = option == wire.OPT_SET_META_CONTEXT
        ident = next((m for m in map(wire.migration_id_of, queries) if m), None)
        if ident is not None:
            context = rec.script.coverage_context if setting else 0
            sock.sendall(wire.pack_option_reply(
                option, wire.REP_META_CONTEXT,
                struct.pack(">I", context) + wire.COVERAGE_PREFIX + ident.encode()))
        if setting:
            rec.migration_id = ident
        sock.sendall(wire.pack_option_reply(option, wire.REP_ACK))

    def _allocation_context(self, sock: socket.socket, rec: ConnRecord, option: int,
                            data: bytes) -> None:
        """LIST/SET_META_CONTEXT: base:allocation when it is asked for."""
        if wire.BASE_ALLOCATION in data:
            setting = option == wire.OPT_SET_META_CONTEXT
            context = rec.script.allocation_context if setting else 0
            sock.sendall(wire.pack_option_reply(option, wire.REP_META_CONTEXT,
                                                struct.pack(">I", context)
                                                + wire.BASE_ALLOCATION))
            rec.allocation = rec.allocation or setting
        sock.sendall(wire.pack_option_reply(option, wire.REP_ACK))

    def _read_file(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset) if self._fd >= 0 else bytes(length)
        return data + bytes(length - len(data))

    def _runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """[(offset, length, zero)] of [offset, offset+length), cut at 4 KiB blocks, runs of
        zero blocks and of the others merged."""
        runs: list[list] = []
        at, end = offset, offset + length
        while at < end:
            n = min(end, (at // 4096 + 1) * 4096) - at
            zero = self._read_file(at, n).count(0) == n
            if runs and runs[-1][2] == zero:
                runs[-1][1] += n
            else:
                runs.append([at, n, zero])
            at += n
        return [(o, n, z) for o, n, z in runs]

    def _structured_reply(self, rec: ConnRecord, req: Req) -> bytes:
        """The honest structured reply to a READ or BLOCK_STATUS."""
        chunk = wire.pack_chunk_header
        in_range = req.offset <= self.size and req.length <= self.size - req.offset
        if not in_range or (req.type == wire.CMD_BLOCK_STATUS and req.length == 0):
            req.error = wire.NBD_EINVAL
            return (chunk(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_ERROR, req.cookie, 6)
                    + struct.pack(">IH", wire.NBD_EINVAL, 0))
        runs = self._runs(req.offset, req.length)
        if req.type == wire.CMD_BLOCK_STATUS:
            if rec.script.allocation == "data":
                runs = [(req.offset, req.length, False)]
            if req.flags & wire.CMD_FLAG_REQ_ONE:
                runs = runs[:1]
            payload = struct.pack(">I", rec.script.allocation_context) + b"".join(
                struct.pack(">II", n, wire.STATE_HOLE | wire.STATE_ZERO if z else 0)
                for _, n, z in runs)
            return (chunk(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_BLOCK_STATUS, req.cookie,
                          len(payload)) + payload)
        if req.length == 0:
            return chunk(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_NONE, req.cookie, 0)
        if req.flags & wire.CMD_FLAG_DF:
            runs = [(req.offset, req.length, False)]
        out = []
        for i, (o, n, zero) in enumerate(runs):
            done = wire.REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            if zero:
                out.append(chunk(done, wire.REPLY_TYPE_OFFSET_HOLE, req.cookie, 12)
                           + struct.pack(">QI", o, n))
            else:
                out.append(chunk(done, wire.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + n)
                           + struct.pack(">Q", o) + self._read_file(o, n))
        return b"".join(out)

    def _lie(self, sock: socket.socket, rec: ConnRecord, req: Req) -> bool:
        """Answer a READ or BLOCK_STATUS with ``script.chunks``; False: the connection ends."""
        how = rec.script.chunks
        rec.lies += 1
        req.error = -1
        chunk = wire.pack_chunk_header
        done = wire.REPLY_FLAG_DONE
        cookie, off, n = req.cookie, req.offset, max(req.length, 1)
        data = self._read_file(off, n)
        error = chunk(0, wire.REPLY_TYPE_ERROR, cookie, 6) + struct.pack(">IH", wire.NBD_EIO, 0)
        if how == "long":
            lie = chunk(done, wire.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n + 4096) \
                + struct.pack(">Q", off) + data
        elif how == "bad_hole":
            lie = chunk(done, wire.REPLY_TYPE_OFFSET_HOLE, cookie, 16) \
                + struct.pack(">QIi", off, n, 0)
        elif how in ("badcookie", "badmagic"):
            lie = self._structured_reply(rec, req)
            if how == "badcookie":
                lie = lie[:8] + struct.pack(">Q", cookie ^ 0x5555) + lie[16:]
            else:
                lie = struct.pack(">I", wire.STRUCTURED_REPLY_MAGIC ^ 0x0100) + lie[4:]
        elif how == "outside":
            lie = chunk(done, wire.REPLY_TYPE_OFFSET_HOLE, cookie, 12) \
                + struct.pack(">QI", off + n, 4096)
        elif how == "overlap":
            part = chunk(0, wire.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n) + struct.pack(">Q", off)
            lie = part + data + chunk(done, wire.REPLY_TYPE_OFFSET_DATA, cookie, 8 + n) \
                + struct.pack(">Q", off) + data
        elif how == "incomplete":
            half = max(n // 2, 1)
            lie = chunk(done, wire.REPLY_TYPE_OFFSET_DATA, cookie, 8 + half) \
                + struct.pack(">Q", off) + data[:half]
        elif how == "status_to_read":
            lie = chunk(done, wire.REPLY_TYPE_BLOCK_STATUS, cookie, 12) \
                + struct.pack(">III", rec.script.allocation_context, n, 0)
        elif how == "context":
            lie = chunk(done, wire.REPLY_TYPE_BLOCK_STATUS, cookie, 12) \
                + struct.pack(">III", rec.script.allocation_context + 1, n, 0)
        elif how == "empty_extent":
            lie = chunk(done, wire.REPLY_TYPE_BLOCK_STATUS, cookie, 20) \
                + struct.pack(">IIIII", rec.script.allocation_context, 0, 0, n, 0)
        elif how in ("endless", "trickle"):
            rec.how_ended = "fault"
            while not self._stop.is_set():
                sock.sendall(error * (1 if how == "trickle" else 64))
                if how == "trickle":
                    time.sleep(0.2)
            return False
        elif how == "cut":
            honest = self._structured_reply(rec, req)
            sock.sendall(honest[:len(honest) // 2])
            rec.how_ended = "fault"
            return False
        else:
            raise ValueError(f"unknown chunks {how!r}")
        sock.sendall(lie)
        return True

    def _covered_by(self, rec: ConnRecord, offset: int, length: int) -> None:
        if rec.migration_id is not None:
            with self._lock:
                self.coverage.setdefault(rec.migration_id, []).append((offset, offset + length))

    def _extents(self, rec: ConnRecord, offset: int, length: int) -> list[tuple[int, int]]:
        """Honest coverage extents of [offset, offset+length): at most 1024."""
        with self._lock:
            ranges = sorted(self.coverage.get(rec.migration_id or "", []))
        merged: list[list[int]] = []
        for start, end in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        extents: list[tuple[int, int]] = []
        at, end = offset, offset + length
        while at < end and len(extents) < 1024:
            state, until = 0, end
            for s, e in merged:
                if s <= at < e:
                    state, until = wire.STATE_COVERED, min(e, end)
                    break
                if s > at:
                    until = min(s, end)
                    break
            extents.append((until - at, state))
            at = until
        return extents

    def _block_status(self, sock: socket.socket, rec: ConnRecord, req: Req) -> bool:
        """Answer a BLOCK_STATUS the script's way; False when the connection must end."""
        how = rec.script.block_status
        rec.block_status += 1
        context = rec.script.coverage_context
        cookie, length = req.cookie, req.length
        extents = [(length, wire.STATE_COVERED)]
        flags, kind = wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_BLOCK_STATUS
        if how == "honest":
            extents = self._extents(rec, req.offset, length)
        elif how == "none":
            extents = [(length, 0)]
        elif how == "tiny":
            time.sleep(0.001)      # (at once for the sender; it spares the CPU of the test)
            extents = [(1, wire.STATE_COVERED)]
        elif how == "badcookie":
            cookie ^= 1
        elif how == "zero_extent":
            extents = [(0, wire.STATE_COVERED)]
        elif how == "beyond":
            extents = [(length, 0), (4096, wire.STATE_COVERED)]
        elif how == "other_context":
            context += 1
        elif how == "oversized":
            extents = [(1, wire.STATE_COVERED)] * 8192     # 4 + 64 KiB of payload
        elif how == "no_done":
            flags = 0
        elif how in ("simple_error", "simple_ok", "badmagic"):
            error = wire.NBD_EIO if how == "simple_error" else 0
            magic = wire.SIMPLE_REPLY_MAGIC ^ 0x0100 if how == "badmagic" \
                else wire.SIMPLE_REPLY_MAGIC
            req.error = error
            sock.sendall(wire.pack_simple_reply(error, cookie, magic))
            return True
        elif how == "error_chunk":
            req.error = wire.NBD_EPERM
            sock.sendall(wire.pack_chunk_header(wire.REPLY_FLAG_DONE, wire.REPLY_TYPE_ERROR,
                                                cookie, 6)
                         + struct.pack(">IH", wire.NBD_EPERM, 0))
            return True
        elif how == "hang":
            req.error = -1
            rec.how_ended = "fault"
            self._discard_until_closed(sock, rec)
            return False
        elif how == "close":
            req.error = -1
            rec.how_ended = "fault"
            return False
        elif how != "all":
            raise ValueError(f"unknown block_status {how!r}")
        payload = struct.pack(">I", context) + b"".join(struct.pack(">II", n, f)
                                                        for n, f in extents)
        sock.sendall(wire.pack_chunk_header(flags, kind, cookie, len(payload)) + payload)
        return True

    def _discard_until_closed(self, sock: socket.socket, rec: ConnRecord) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    rec.bytes_read += len(chunk)
            except ConnectionResetError:
                rec.peer_reset = True
                return
            except (OSError, ValueError):
                return

    def _transmission(self, sock: socket.socket, rec: ConnRecord) -> None:
        s = rec.script
        covered: list[tuple[int, int]] = []
        # Coverage is followed request by request only when a script needs to know the moment
        # it completes (it costs a sort per write); else it is computed at DISC.
        follow = bool(s.after_last_reply)
        index = 0
        mute = False          # our sending side is shut: record what comes, answer nothing
        while True:
            head = self._recv(sock, rec, wire.REQUEST_SIZE)
            magic, flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", head)
            if magic != wire.REQUEST_MAGIC:
                return
            req = Req(cmd, flags, cookie, offset, length)
            rec.requests.append(req)
            payload = b""
            if cmd == wire.CMD_WRITE:
                payload = self._recv(sock, rec, length)
                rec.payload_bytes += length
            if cmd == wire.CMD_FLUSH and rec.flush_time is None:
                rec.flush_time = time.monotonic()
            if self.on_request is not None:
                self.on_request(rec, req)
            if mute:
                req.error = -1
                if cmd == wire.CMD_DISC:
                    rec.disc = True
                    rec.disc_time = time.monotonic()
                continue
            if cmd == wire.CMD_DISC:
                rec.disc = True
                rec.disc_time = time.monotonic()
                rec.covered = _covers(covered, self.size)
                self._after_disc(sock, rec)
                return
            fault = s.fault if s.fail_at is not None and index == s.fail_at else ""
            index += 1
            if s.structured and rec.structured and cmd in (wire.CMD_READ,
                                                           wire.CMD_BLOCK_STATUS) and not fault:
                try:
                    if s.chunks:
                        if not self._lie(sock, rec, req):
                            return
                    else:
                        sock.sendall(self._structured_reply(rec, req))
                except OSError:
                    raise _Closed() from None      # (the proxy dropped us: it saw the lie)
                continue
            if cmd == wire.CMD_BLOCK_STATUS and s.block_status and not fault:
                try:
                    answered = self._block_status(sock, rec, req)
                except OSError:
                    raise _Closed() from None      # the sender hung up on the answer
                if not answered:
                    return
                continue
            if fault:
                rec.fault_fired = True
                if fault == "close":
                    req.error = -1
                    rec.how_ended = "fault"
                    return
                if fault == "hang":
                    req.error = -1
                    rec.how_ended = "fault"
                    self._discard_until_closed(sock, rec)
                    return
            allowed = s.only_cmds is None or cmd in s.only_cmds
            flush_fault = s.on_flush if cmd == wire.CMD_FLUSH and allowed and not fault \
                and s.on_flush != "ok" else ""
            if flush_fault:
                rec.handoff_fired = f"on_flush={flush_fault}"
                if flush_fault == "hang":
                    req.error = -1
                    rec.how_ended = "hold"
                    mute = True
                    continue
                if flush_fault == "close":
                    req.error = -1
                    rec.how_ended = "fin"
                    return
                if flush_fault not in ("error", "ok_close"):
                    raise ValueError(f"unknown on_flush {flush_fault!r}")
            error = 0
            data = b""
            completes = False
            in_range = offset <= self.size and length <= self.size - offset
            if not allowed:
                rec.unexpected.append(req)
                error = wire.NBD_EINVAL
            elif fault == "error" or flush_fault == "error":
                error = s.error
            elif not in_range:
                error = wire.NBD_ENOSPC if cmd in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES) \
                    else wire.NBD_EINVAL
            elif cmd == wire.CMD_WRITE:
                self._write(offset, payload)
                covered.append((offset, offset + length))
            elif cmd == wire.CMD_WRITE_ZEROES:
                self._zero(offset, length)
                covered.append((offset, offset + length))
            elif cmd == wire.CMD_READ:
                data = os.pread(self._fd, length, offset) if self._fd >= 0 else bytes(length)
                data += bytes(length - len(data))
            if error == 0 and cmd in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES) and \
                    fault != "badcookie" and fault != "badmagic":
                self._covered_by(rec, offset, length)
            if follow and error == 0 and not rec.covered and \
                    cmd in (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES) and _covers(covered, self.size):
                rec.covered = completes = True
            req.error = error
            reply_cookie = cookie ^ 1 if fault == "badcookie" else cookie
            reply_magic = wire.SIMPLE_REPLY_MAGIC ^ 0x0100 if fault == "badmagic" \
                else wire.SIMPLE_REPLY_MAGIC
            reply = wire.pack_simple_reply(error, reply_cookie, reply_magic) \
                + (data if error == 0 else b"")
            last = s.after_last_reply if completes else ""
            if last == "reset":
                sock.sendall(reply)
                rec.handoff_fired = "after_last_reply=reset"
                rec.how_ended = "reset"
                _reset(sock)
                return
            if last == "close" or (flush_fault == "ok_close" and error == 0):
                rec.handoff_fired = "after_last_reply=close" if last else "on_flush=ok_close"
                rec.how_ended = "fin"
                _send_with_fin(sock, reply)
                mute = True
                continue
            if last:
                raise ValueError(f"unknown after_last_reply {last!r}")
            sock.sendall(reply)

    def _after_disc(self, sock: socket.socket, rec: ConnRecord) -> None:
        how = rec.script.on_disc
        if how == "close":
            rec.how_ended = "fin"          # (the caller's shutdown sends the FIN)
        elif how == "reset":
            rec.how_ended = "reset"
            _reset(sock)
        elif how in ("hold", "junk"):
            rec.how_ended = how
            if how == "junk":
                sock.sendall(b"\xde\xad\xbe\xef" * 4)
            self._discard_until_closed(sock, rec)
        else:
            raise ValueError(f"unknown on_disc {how!r}")

    def _write(self, offset: int, payload: bytes) -> None:
        if self._fd < 0:
            return
        pos = 0
        while pos < len(payload):
            piece = payload[pos:pos + 4096]
            if piece.count(0) != len(piece) or \
                    os.pread(self._fd, len(piece), offset + pos).count(0) != len(piece):
                os.pwrite(self._fd, piece, offset + pos)
            pos += len(piece)

    def _zero(self, offset: int, length: int) -> None:
        if self._fd < 0:
            return
        pos = 0
        while pos < length:
            n = min(1 << 20, length - pos)
            if os.pread(self._fd, n, offset + pos).count(0) != n:
                os.pwrite(self._fd, bytes(n), offset + pos)
            pos += n


def _reset(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer's next read or write fails ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _send_with_fin(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` and shut our sending side so that the FIN rides in the same segment
    (TCP_CORK holds the data back until the shutdown, which appends the FIN to it): the peer
    cannot read the data without finding the end of the stream right behind it."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _covers(ranges: list[tuple[int, int]], size: int) -> bool:
    at = 0
    for start, end in sorted(ranges):
        if start > at:
            return False
        at = max(at, end)
    return at >= size

"""A scripted impostor NBD server for the TLS client sides (mirror, proxy upstream, read,
write): ``Impostor(size, Script(...), certificate=..., psk_file=...)`` listens on 127.0.0.1 (an
ephemeral port, ``.port``), greets each connection and meets NBD_OPT_STARTTLS as its script
says. Whatever it gets past, it then serves like a server would (GO and INFO answered, WRITEs
taken, FLUSH answered, READ answered with forged bytes, DISC met with a TLS close_notify and a
close), so that a client which should have refused it is seen handing it the disk.

``Script.starttls``, how STARTTLS is met:

- ``tls``: ACK, then a TLS handshake as a server with the impostor's credentials: with
  ``certificate=(cert.pem, key.pem)``, Python's ssl with that certificate and no PSK at all
  (a PSK client that completes this handshake authenticated nobody); with ``psk_file``,
  flexnbd's own ``TlsContext`` (the right key, for the trickle tests, or another one);
- ``unsup``: NBD_REP_ERR_UNSUP (no TLS here), then the option haggling goes on in plaintext;
- ``skip``: answered as if it were GO (INFO, then ACK, both for NBD_OPT_GO), then plaintext
  transmission;
- ``garbage``: 64 random bytes instead of a reply, then silence;
- ``plaintext``: ACK, then plaintext GO replies (INFO, ACK) where the TLS ServerHello should
  be, then plaintext transmission.

``Script.greeting="oldstyle"`` sends the 152-byte oldstyle greeting instead (no options, so no
STARTTLS) and goes straight to plaintext transmission.

``Script.trickle``: from the start (``greeting``), or from the moment the FLUSH request
(``flush``) or the DISC (``close``) is read, what the impostor sends (everything; the FLUSH
reply's record; the close_notify) leaves one byte every ``Script.gap`` seconds. For that
byte-level control each connection's NBD and TLS run on one end of a socketpair, and a pump
thread moves the bytes between its other end and the TCP socket.

Recorded per connection (``conns``, ``Conn``): whether a TLS handshake completed, every byte
received after STARTTLS was answered (decrypted under TLS: a client that refuses after the
handshake leaves it at 0), the options and requests received then, the WRITE payload bytes,
the times of FLUSH, DISC and of the client's end. ``close()`` (also the context manager's
exit) ends every thread and socket.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flexnbd import wire
from flexnbd._tls import TlsContext, TlsSession
from tests.fakes.accepting import accept_until, close_all
from tests.support.rawclient import recv_exact

TRICKLE_GAP = 0.3       # seconds between two trickled bytes, by default
FORGED = 0xAA           # what a READ gets
TIMEOUT = 30.0          # any one receive of the impostor
CHUNK = 1 << 16


@dataclass
class Script:
    greeting: str = "newstyle"       # newstyle | oldstyle
    starttls: str = "tls"            # tls | unsup | skip | garbage | plaintext
    trickle: str = ""                # "" | greeting | flush | close
    gap: float = TRICKLE_GAP         # seconds between two trickled bytes


@dataclass
class Conn:
    index: int
    start_time: float
    tls: bool = False                # a TLS handshake completed
    error: str = ""                  # what ended the impostor's side (a failed TLS
                                     # handshake, the client's close...)
    received: int = 0                # bytes received after STARTTLS was answered
    options: list[int] = field(default_factory=list)    # ... options received then
    requests: list[int] = field(default_factory=list)   # transmission commands received
    payload: int = 0                 # WRITE payload bytes received
    flush_time: float | None = None  # time.monotonic() when FLUSH was read
    disc_time: float | None = None   # ... when DISC was read
    client_gone: float | None = None  # ... when the client's end (EOF or reset) was seen
    ended: bool = False              # the impostor's side of this connection has ended
    trickle: threading.Event = field(default_factory=threading.Event)
    counting: bool = False           # (STARTTLS has been answered)


class Impostor:
    def __init__(self, size: int, script: Script | None = None, *,
                 certificate: tuple[Path, Path] | None = None,
                 psk_file: Path | None = None) -> None:
        self.size = size
        self.script = script or Script()
        self.conns: list[Conn] = []
        self._ssl: ssl.SSLContext | None = None
        self._psk: TlsContext | None = None
        if certificate is not None:
            self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_3
            self._ssl.load_cert_chain(str(certificate[0]), str(certificate[1]))
        if psk_file is not None:
            self._psk = TlsContext(server=True, psk_file=psk_file)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=accept_until, name="impostor-accept",
                                          args=(self._listener, self._stop, self._accepted),
                                          daemon=True)
        self._acceptor.start()

    def __enter__(self) -> Impostor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        close_all(socks, threads, 5)
        self._listener.close()

    def wait(self, predicate, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # -- one connection: a pump between the client and the impostor's end of a pair ----------

    def _accepted(self, outer: socket.socket) -> None:
        inner, end = socket.socketpair()
        with self._lock:
            conn = Conn(len(self.conns), time.monotonic())
            self.conns.append(conn)
            self._socks += [outer, inner, end]
            threads = [threading.Thread(target=self._pump, args=(conn, outer, end),
                                        name=f"impostor-pump-{conn.index}", daemon=True),
                       threading.Thread(target=self._serve, args=(conn, inner),
                                        name=f"impostor-{conn.index}", daemon=True)]
            self._threads += threads
        for t in threads:
            t.start()

    def _pump(self, conn: Conn, outer: socket.socket, end: socket.socket) -> None:
        """Client bytes to the impostor as they come; the impostor's to the client at once,
        or one per ``Script.gap`` seconds once ``conn.trickle`` is set."""
        outer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        outer.setblocking(False)
        end.setblocking(False)
        up = bytearray()             # from the client, for the impostor
        down = bytearray()           # from the impostor, for the client
        client_in = impostor_in = True
        next_byte = 0.0
        try:
            while not self._stop.is_set():
                if not impostor_in and not down:
                    return                      # the impostor closed: so do we (FIN)
                trickling = conn.trickle.is_set()
                wait = 0.05
                send_down = bool(down)
                if down and trickling:
                    wait = max(0.0, min(wait, next_byte - time.monotonic()))
                    send_down = time.monotonic() >= next_byte
                readers = ([outer] if client_in and len(up) < 4 * CHUNK else []) + \
                          ([end] if impostor_in and len(down) < 4 * CHUNK else [])
                writers = ([end] if up else []) + ([outer] if send_down else [])
                readable, writable, _ = select.select(readers, writers, [], wait)
                if outer in readable:
                    data = _recv_some(outer)
                    if data == b"":
                        client_in = False
                        conn.client_gone = conn.client_gone or time.monotonic()
                    elif data:
                        up += data
                if end in readable:
                    data = _recv_some(end)
                    if data == b"":
                        impostor_in = False
                    elif data:
                        down += data
                if end in writable:
                    try:
                        del up[:end.send(up)]
                    except BlockingIOError:
                        pass
                    except OSError:
                        up.clear()
                if not client_in and not up:
                    try:
                        end.shutdown(socket.SHUT_WR)     # the impostor reads the end
                    except OSError:
                        pass
                if outer in writable:
                    try:
                        del down[:outer.send(down[:1] if trickling else down)]
                        next_byte = time.monotonic() + self.script.gap
                    except BlockingIOError:
                        pass
                    except OSError:
                        conn.client_gone = conn.client_gone or time.monotonic()
                        return
                if not client_in and not impostor_in:
                    return
        finally:
            for s in (outer, end):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- the impostor itself --------------------------------------------------------------------

    def _recv(self, chan, conn: Conn, n: int) -> bytes:
        def count(k: int) -> None:
            if conn.counting:
                conn.received += k

        return recv_exact(chan, n, count)

    def _serve(self, conn: Conn, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        if self.script.trickle == "greeting":
            conn.trickle.set()
        try:
            chan = self._handshake(conn, sock)
            if chan is not None:
                self._transmission(conn, chan)
        except Exception as e:  # noqa: BLE001 - the client's doing: recorded, not raised
            conn.error = conn.error or str(e) or type(e).__name__
        finally:
            conn.ended = True
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _export(self, option: int) -> bytes:
        flags = (wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
                 | wire.FLAG_SEND_WRITE_ZEROES)
        return (wire.pack_option_reply(option, wire.REP_INFO,
                                       struct.pack(">HQH", wire.INFO_EXPORT, self.size, flags))
                + wire.pack_option_reply(option, wire.REP_ACK))

    def _handshake(self, conn: Conn, sock: socket.socket):
        """The channel transmission runs on (the socket or a TLS session), or None."""
        s = self.script
        if s.greeting == "oldstyle":
            sock.sendall(wire.pack_oldstyle_greeting(self.size, wire.OLDSTYLE_FLAGS))
            conn.counting = True
            return sock
        sock.sendall(wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE
                                                 | wire.FLAG_NO_ZEROES))
        self._recv(sock, conn, 4)                # the client's flags
        chan = sock
        while True:
            magic, option, length = wire.unpack_option_header(
                self._recv(chan, conn, wire.OPTION_HEADER_SIZE))
            if magic != wire.IHAVEOPT or length > 65536:
                self._hold(chan, conn)
                return None
            self._recv(chan, conn, length)
            if conn.counting:
                conn.options.append(option)
            if option == wire.OPT_STARTTLS and not conn.counting:
                conn.counting = True
                chan = self._starttls(conn, sock)
                if chan is None or s.starttls in ("skip", "plaintext"):
                    return chan
            elif option in (wire.OPT_GO, wire.OPT_INFO):
                chan.sendall(self._export(option))
                if option == wire.OPT_GO:
                    return chan
            elif option == wire.OPT_EXPORT_NAME:
                chan.sendall(struct.pack(">QH", self.size, wire.FLAG_HAS_FLAGS
                                         | wire.FLAG_SEND_FLUSH))
                return chan
            elif option == wire.OPT_ABORT:
                chan.sendall(wire.pack_option_reply(option, wire.REP_ACK))
                return None
            else:
                chan.sendall(wire.pack_option_reply(option, wire.REP_ERR_UNSUP))

    def _starttls(self, conn: Conn, sock: socket.socket):
        how = self.script.starttls
        if how == "unsup":
            sock.sendall(wire.pack_option_reply(wire.OPT_STARTTLS, wire.REP_ERR_UNSUP))
            return sock
        if how == "skip":
            sock.sendall(self._export(wire.OPT_GO))
            return sock
        if how == "garbage":
            sock.sendall(os.urandom(64))
            self._hold(sock, conn)
            return None
        sock.sendall(wire.pack_option_reply(wire.OPT_STARTTLS, wire.REP_ACK))
        if how == "plaintext":
            sock.sendall(self._export(wire.OPT_GO))
            return sock
        if how != "tls":
            raise ValueError(f"unknown starttls {how!r}")
        try:
            if self._ssl is not None:
                chan = self._ssl.wrap_socket(sock, server_side=True)
            else:
                assert self._psk is not None, "tls needs a certificate or a PSK file"
                chan = self._psk.session(sock)
                chan.handshake()
        except Exception as e:  # noqa: BLE001 - whatever failed, it is the record
            conn.error = f"TLS handshake: {e or type(e).__name__}"
            return None
        conn.tls = True
        return chan

    def _transmission(self, conn: Conn, chan) -> None:
        s = self.script
        while True:
            magic, _, cmd, cookie, offset, length = struct.unpack(
                ">IHHQQI", self._recv(chan, conn, wire.REQUEST_SIZE))
            if magic != wire.REQUEST_MAGIC:     # (a ClientHello, in plaintext mode)
                self._hold(chan, conn)
                return
            conn.requests.append(cmd)
            data = b""
            if cmd == wire.CMD_WRITE:
                self._recv(chan, conn, length)
                conn.payload += length
            elif cmd == wire.CMD_READ:
                data = bytes([FORGED]) * min(length, 32 << 20)
            elif cmd == wire.CMD_FLUSH:
                conn.flush_time = time.monotonic()
                if s.trickle == "flush":
                    conn.trickle.set()
            elif cmd == wire.CMD_DISC:
                conn.disc_time = time.monotonic()
                if s.trickle == "close":
                    conn.trickle.set()
                _close_notify(chan)
                return
            chan.sendall(wire.pack_simple_reply(0, cookie) + data)


    def _hold(self, chan, conn: Conn) -> None:
        """Keep the connection open, reading and dropping what comes, until the client closes
        it: a liar does not hang up for the client."""
        while data := chan.recv(CHUNK):
            conn.received += len(data)


def _close_notify(chan) -> None:
    """End a TLS session with a close_notify (nothing to do in plaintext)."""
    if isinstance(chan, TlsSession):
        chan.close_notify()
    elif isinstance(chan, ssl.SSLSocket):
        try:
            chan.settimeout(0.2)
            chan.unwrap()       # (sends close_notify, then waits briefly for the peer's)
        except (OSError, ssl.SSLError):
            pass


def _recv_some(sock: socket.socket) -> bytes | None:
    """What a readable non-blocking socket holds: b"" at its end (or on an error), None when
    nothing after all."""
    try:
        return sock.recv(CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""

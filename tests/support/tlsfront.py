"""A TLS front for plaintext test clients: ``TlsFront(port, client_dir)`` listens on 127.0.0.1
(an ephemeral port, ``front.port``); for each plaintext NBD client it accepts, it connects to
the server on ``port``, passes the greeting and the client's 4 flag bytes through, sends
NBD_OPT_STARTTLS itself, shakes hands (X.509: it trusts ``client_dir``/ca-cert.pem; the
server's certificate must name 127.0.0.1), and from then on relays: the client's bytes go
encrypted to the server, the server's come back decrypted. The client sees an ordinary
newstyle server and does its option haggling (GO) inside the TLS session without knowing it.

Why: tests/support/pipeline.py drives one socket from two threads (a sender and a receiver),
which Python's ``ssl.SSLSocket`` cannot take (one OpenSSL session must not be used by two
threads at once, and ``select()`` does not see bytes OpenSSL has already decrypted). Here one
thread per connection owns its TLS session (``ssl.SSLObject`` over memory BIOs) and both of
its sockets, non-blocking, with at most ``LIMIT`` bytes waiting in each direction: it never
blocks on a send (the server may be waiting for us to read its replies before it reads more).

Ends are passed on: a client that closes has what it sent delivered, then a close_notify and
a FIN go to the server; a client that resets makes the front reset the server connection at
once; a server that closes (or breaks its TLS) has what it sent delivered, then the client's
connection is closed. Whatever is left after the other side ended gets ``DRAIN`` seconds.

What went wrong before the relay started (the server refused STARTTLS, a failed handshake)
is recorded in ``errors``, and the client's connection is closed. ``close()`` (also the
context manager's exit) stops every thread and closes every socket.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from pathlib import Path

from flexnbd import wire
from tests.fakes.accepting import accept_until, close_all, reset
from tests.support.rawclient import ServerClosed, recv_exact

HOST = "127.0.0.1"
LIMIT = 1 << 20          # bytes waiting in one direction, plaintext or encrypted, at most
CHUNK = 256 << 10
TIMEOUT = 15.0           # for the greeting, STARTTLS and the TLS handshake
DRAIN = 10.0             # for what is left once the other side has ended
POLL_MS = 100            # how often a relay looks at the stop flag


class TlsFront:
    def __init__(self, port: int, client_dir: Path) -> None:
        self.behind = port
        self.context = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
        self.errors: list[str] = []
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.bind((HOST, 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=accept_until, name="tlsfront-accept",
                                          args=(self._listener, self._stop, self._accepted),
                                          daemon=True)
        self._acceptor.start()

    def __enter__(self) -> TlsFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(10)
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        close_all(socks, threads, 10)   # (wakes a thread still in a blocking handshake)
        self._listener.close()

    # -- one connection ----------------------------------------------------------------------

    def _accepted(self, client: socket.socket) -> None:
        with self._lock:
            self.connections += 1
            self._socks.append(client)
            thread = threading.Thread(target=self._serve, args=(client, self.connections),
                                      name=f"tlsfront-{self.connections}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _serve(self, client: socket.socket, n: int) -> None:
        server = socket.socket()
        with self._lock:
            self._socks.append(server)
        try:
            client.settimeout(TIMEOUT)
            server.settimeout(TIMEOUT)
            server.connect((HOST, self.behind))
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls, incoming, outgoing = self._starttls(client, server)
        except (OSError, ssl.SSLError, ValueError, ServerClosed) as e:
            if not self._stop.is_set():
                self.errors.append(f"connection {n}: {e!r}")
            client.close()
            server.close()
            return
        self._relay(client, server, tls, incoming, outgoing)

    def _starttls(self, client: socket.socket, server: socket.socket) \
            -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        greeting = recv_exact(server, 18)
        magic, opt_magic, _ = struct.unpack(">QQH", greeting)
        if (magic, opt_magic) != (wire.NBDMAGIC, wire.IHAVEOPT):
            raise ValueError(f"not a newstyle greeting: {greeting.hex()}")
        client.sendall(greeting)
        flags = recv_exact(client, 4)
        server.sendall(flags + struct.pack(">QII", wire.IHAVEOPT, wire.OPT_STARTTLS, 0))
        magic, option, reply, length = wire.unpack_option_reply_header(
            recv_exact(server, wire.OPTION_REPLY_HEADER_SIZE))
        if length > 4096:
            raise ValueError(f"an option reply of {length} bytes")
        recv_exact(server, length)
        if (magic, option, reply) != (wire.OPTION_REPLY_MAGIC, wire.OPT_STARTTLS, wire.REP_ACK):
            raise ValueError(f"STARTTLS refused: option {option}, reply {reply:#x}")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_hostname=HOST)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                server.sendall(outgoing.read())
                data = server.recv(CHUNK)
                if not data:
                    raise ConnectionError("closed during the TLS handshake") from None
                incoming.write(data)
        server.sendall(outgoing.read())
        return tls, incoming, outgoing

    def _relay(self, client: socket.socket, server: socket.socket, tls: ssl.SSLObject,
               incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        up = bytearray()            # from the client, not yet encrypted
        wire_up = bytearray()       # encrypted, not yet sent to the server
        down = bytearray()          # decrypted, not yet sent to the client
        client_in = True            # the client may still send
        server_in = True            # the server's TLS stream has not ended
        server_eof = False          # the server's TCP stream has ended
        server_out = True           # the server may still take bytes
        bye = False                 # close_notify sent (after the client closed)
        until = None                # once a side has ended: the drain's deadline
        client.setblocking(False)
        server.setblocking(False)
        try:
            while not self._stop.is_set():
                if server_out and up and len(wire_up) + outgoing.pending < LIMIT:
                    try:
                        del up[:tls.write(bytes(up[:CHUNK]))]
                    except ssl.SSLError:
                        server_in = False
                if not client_in and not up and not bye and server_in:
                    try:
                        tls.unwrap()                # sends close_notify; the answer may wait
                    except ssl.SSLError:
                        pass
                    bye = True
                while server_in and len(down) < LIMIT:
                    try:
                        data = tls.read(CHUNK)
                    except ssl.SSLWantReadError:
                        break
                    except ssl.SSLError:            # close_notify, a cut or a broken record
                        data = b""
                    if not data:
                        server_in = False
                        break
                    down += data
                if len(wire_up) < LIMIT:
                    wire_up += outgoing.read()
                if not client_in:
                    down.clear()                    # nobody to give it to
                if not (server_in and server_out):
                    up.clear()
                    wire_up.clear()
                # Done: the client gone and everything it sent delivered, or the server gone
                # and everything it sent delivered.
                if not client_in and (not (server_in and server_out) or (bye and not wire_up)):
                    return
                if not server_in and not down:
                    return
                if not (client_in and server_in and server_out):
                    until = until or time.monotonic() + DRAIN
                    if time.monotonic() > until:
                        return
                poller = select.poll()
                c_events = ((select.POLLIN if client_in and len(up) < LIMIT else 0)
                            | (select.POLLOUT if down else 0))
                s_events = ((select.POLLIN if not server_eof and incoming.pending < LIMIT
                             else 0)
                            | (select.POLLOUT if wire_up and not server_eof else 0))
                if c_events:
                    poller.register(client, c_events)
                if s_events:
                    poller.register(server, s_events)
                ready = dict(poller.poll(POLL_MS))
                if ready.get(client.fileno(), 0) & ~select.POLLOUT:
                    try:
                        data = client.recv(CHUNK)
                    except BlockingIOError:
                        data = None
                    except OSError:                 # a reset: pass it on at once
                        reset(server)
                        return
                    if data == b"":
                        client_in = False
                    elif data:
                        up += data
                if down and ready.get(client.fileno(), 0) & select.POLLOUT:
                    try:
                        del down[:client.send(down[:CHUNK])]
                    except BlockingIOError:
                        pass
                    except OSError:
                        reset(server)
                        return
                if ready.get(server.fileno(), 0) & ~select.POLLOUT and not server_eof:
                    try:
                        data = server.recv(CHUNK)
                    except BlockingIOError:
                        data = None
                    except OSError:
                        data = b""
                    if data == b"":
                        server_eof = True
                        incoming.write_eof()        # tls.read says what ended it
                    elif data:
                        incoming.write(data)
                if wire_up and ready.get(server.fileno(), 0) & select.POLLOUT:
                    try:
                        del wire_up[:server.send(wire_up[:CHUNK])]
                    except BlockingIOError:
                        pass
                    except OSError:                 # (what it sent may still be read)
                        server_out = False
        finally:
            client.close()
            server.close()

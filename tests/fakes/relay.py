"""A fault-injecting TCP relay for tests: it listens on 127.0.0.1 (an ephemeral port) and, for
each accepted connection, connects to an upstream address and forwards bytes both ways, counting
them, while injecting the faults planned for that connection.

"up" is the direction from the connecting client to the upstream server (for a mirror: the
source's requests and payloads); "down" is from upstream back to the client (greeting, replies).

Faults (``Fault``), all optional, planned per connection: ``Relay(port, faults=[f0, f1, ...])``
applies ``f0`` to the first connection, ``f1`` to the second and so on; connections past the
list get ``default`` (pass through unless set). ``relay.clear()`` drops every planned fault.

- ``refuse``: accept and reset the connection at once (the peer sees a reset, no byte);
- ``hang``: accept, never connect upstream, never send anything (until the relay stops);
- ``close_after_up`` / ``close_after_down``: forward exactly N bytes in that direction, then
  close both sides (FIN); ``reset_after_up`` / ``reset_after_down``: the same with a reset;
- ``stall_after_up`` / ``stall_after_down``: forward exactly N bytes in that direction, then
  stop forwarding it: what follows is read and dropped (counted in ``swallowed_*``), the
  sockets stay open; when the stalled side closes, the relay closes the other side too (so a
  destination is not left with a half-dead session holding its only client slot);
- ``corrupt_up_at`` / ``corrupt_down_at``: flip all bits of the byte at that position (0-based,
  counted from the start of the connection) of that direction's stream.

Every socket and thread is closed by ``close()`` (also the context manager's exit), even when a
connection is stalled or hung.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.fakes.accepting import accept_until, reset


@dataclass
class Fault:
    refuse: bool = False
    hang: bool = False
    close_after_up: int | None = None
    close_after_down: int | None = None
    reset_after_up: int | None = None
    reset_after_down: int | None = None
    stall_after_up: int | None = None
    stall_after_down: int | None = None
    corrupt_up_at: int | None = None
    corrupt_down_at: int | None = None


@dataclass
class ConnStats:
    """What one relayed connection carried, and how it ended."""

    index: int
    up: int = 0                  # bytes forwarded client -> upstream
    down: int = 0                # bytes forwarded upstream -> client
    fault: Fault | None = None
    swallowed_up: int = 0        # bytes dropped after a stall
    swallowed_down: int = 0
    triggered: list[str] = field(default_factory=list)   # faults that fired
    closed: bool = False

    def wait_settled(self, timeout: float = 10.0) -> bool:
        """Wait until the byte counts stop moving (checked every 0.1 s): a proxy logs that
        it is serving only after its upstream handshake, and the counts lag the bytes."""
        counts = [(-1, -1)]

        def settled() -> bool:
            counts.append((self.up, self.down))
            return counts[-1] == counts[-2]
        deadline = time.monotonic() + timeout
        while not settled():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


class _Conn:
    def __init__(self, relay: Relay, client: socket.socket, stats: ConnStats) -> None:
        self.relay = relay
        self.client = client
        self.upstream: socket.socket | None = None
        self.stats = stats
        self.fault = stats.fault or Fault()
        self.done = threading.Event()
        self.stalled = {"up": False, "down": False}
        self.eof = {"up": False, "down": False}
        self.lock = threading.Lock()

    # -- limits --------------------------------------------------------------------------

    def _limit(self, direction: str) -> tuple[int | None, str]:
        """The nearest byte count in ``direction`` at which something happens, and what."""
        f = self.fault
        best: tuple[int | None, str] = (None, "")
        for name in ("close_after", "reset_after", "stall_after"):
            n = getattr(f, f"{name}_{direction}")
            if n is not None and (best[0] is None or n < best[0]):
                best = (n, name)
        return best

    def run(self) -> None:
        try:
            f = self.fault
            if f.refuse:
                self.stats.triggered.append("refuse")
                reset(self.client)
                return
            if f.hang:
                self.stats.triggered.append("hang")
                self.relay._stopping.wait()
                return
            try:
                self.upstream = socket.create_connection(self.relay.upstream, timeout=15)
            except OSError:
                self.stats.triggered.append("upstream unreachable")
                reset(self.client)
                return
            self.upstream.settimeout(None)
            for s in (self.client, self.upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pump()
        finally:
            self._close_all()
            self.stats.closed = True
            self.done.set()

    def _close_all(self) -> None:
        with self.lock:
            for s in (self.client, self.upstream):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    try:
                        s.close()
                    except OSError:
                        pass

    def _pump(self) -> None:
        assert self.upstream is not None
        src_of = {"up": self.client, "down": self.upstream}
        dst_of = {"up": self.upstream, "down": self.client}
        while not self.relay._stopping.is_set():
            readers = [src_of[d] for d in ("up", "down") if not self.eof[d]]
            if not readers:
                return
            try:
                ready, _, _ = select.select(readers, [], [], 0.1)
            except (OSError, ValueError):
                return
            for sock in ready:
                direction = "up" if sock is self.client else "down"
                if not self._forward(direction, src_of[direction], dst_of[direction]):
                    return

    def _forward(self, direction: str, src: socket.socket, dst: socket.socket) -> bool:
        """Move what is there; False when the connection ends."""
        if self.stalled[direction]:
            try:
                data = src.recv(65536)
            except OSError:
                return False
            if not data:
                return False
            if direction == "up":
                self.stats.swallowed_up += len(data)
            else:
                self.stats.swallowed_down += len(data)
            return True
        count = self.stats.up if direction == "up" else self.stats.down
        limit, what = self._limit(direction)
        want = 65536
        if limit is not None:
            want = min(want, limit - count)
            if want <= 0:
                return self._trigger(direction, what)
        try:
            data = src.recv(want)
        except OSError:
            return False
        if not data:
            # Pass the end of the stream on (half-close), keep forwarding the other way.
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            other = "down" if direction == "up" else "up"
            if self.eof[other] or self.stalled[other]:
                return False
            self.eof[direction] = True
            return True
        corrupt = self.fault.corrupt_up_at if direction == "up" else self.fault.corrupt_down_at
        if corrupt is not None and count <= corrupt < count + len(data):
            buf = bytearray(data)
            buf[corrupt - count] ^= 0xFF
            data = bytes(buf)
            self.stats.triggered.append(f"corrupt_{direction}")
        try:
            dst.sendall(data)
        except OSError:
            return False
        if direction == "up":
            self.stats.up += len(data)
        else:
            self.stats.down += len(data)
        self.relay._count(direction, len(data))
        if limit is not None and count + len(data) >= limit:
            return self._trigger(direction, what)
        return True

    def _trigger(self, direction: str, what: str) -> bool:
        self.stats.triggered.append(f"{what}_{direction}")
        if what == "stall_after":
            self.stalled[direction] = True
            return True
        if what == "reset_after":
            with self.lock:
                for s in (self.client, self.upstream):
                    if s is not None:
                        reset(s)
        return False


class Relay:
    """Forward 127.0.0.1:``port`` to ``upstream`` with planned faults (see the module doc)."""

    def __init__(self, upstream_port: int, faults: list[Fault | None] | None = None,
                 upstream_host: str = "127.0.0.1", default: Fault | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = list(faults or [])
        self.default = default
        self.connections: list[ConnStats] = []
        self._conns: list[_Conn] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.up_total = 0
        self.down_total = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="relay-accept",
                                               daemon=True)
        self._accept_thread.start()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clear(self) -> None:
        """Pass everything through from the next connection on."""
        with self._lock:
            self.faults = []
            self.default = None

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.up_total += n
            else:
                self.down_total += n

    def _accept_loop(self) -> None:
        accept_until(self._listener, self._stopping, self._accepted)

    def _accepted(self, client: socket.socket) -> None:
        with self._lock:
            index = len(self.connections)
            fault = self.faults[index] if index < len(self.faults) else self.default
            stats = ConnStats(index, fault=fault)
            self.connections.append(stats)
            conn = _Conn(self, client, stats)
            self._conns.append(conn)
            t = threading.Thread(target=conn.run, name=f"relay-{index}", daemon=True)
            self._threads.append(t)
        t.start()

    def wait_connections(self, n: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.connections) >= n:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stopping.set()
        self._accept_thread.join(5)
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            conn._close_all()
        for t in threads:
            t.join(5)

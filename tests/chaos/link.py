"""The link between two hosts, as the chaos campaign breaks it: a TCP relay on 127.0.0.1 that
forwards each connection to ``target`` and, on command, cuts every connection (a reset or a
FIN), stalls (forwards nothing, reads nothing, for a while), or slows to a byte rate. The
same relay is the service address the proxy dials; ``target`` moves to the destination once it
owns the disk, as a floating IP would.

One thread accepts, one thread per connection pumps both ways. Every socket is closed by
``close()``; no loop runs past it.
"""

from __future__ import annotations

import select
import socket
import threading
import time

from tests.fakes.accepting import reset

CHUNK = 64 * 1024


class _Conn:
    def __init__(self, near: socket.socket, far: socket.socket) -> None:
        self.near = near
        self.far = far
        self.cut: str | None = None       # "rst" or "fin" once cut


class Link:
    def __init__(self, target: tuple[str, int] | None = None) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._closed = False
        self._stall_until = 0.0
        self._slow_until = 0.0
        self._rate = 0
        self.connections = 0
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    # -- faults ------------------------------------------------------------------------------

    def cut(self, reset: bool) -> int:
        """Cut every open connection; how many."""
        with self._lock:
            conns = list(self._conns)
            for c in conns:
                c.cut = "rst" if reset else "fin"
        for c in conns:
            for s in (c.near, c.far):
                try:
                    s.shutdown(socket.SHUT_RD if reset else socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(conns)

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def slow(self, rate: int, seconds: float) -> None:
        self._rate = rate
        self._slow_until = time.monotonic() + seconds

    # -- the relay ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            if not select.select([self._listener], [], [], 0.2)[0]:
                continue
            try:
                near, _ = self._listener.accept()
            except OSError:
                continue
            target = self.target
            try:
                if target is None:
                    raise OSError("no target")
                far = socket.create_connection(target, timeout=5)
            except OSError:
                reset(near)
                continue
            conn = _Conn(near, far)
            with self._lock:
                if self._closed:
                    reset(near)
                    reset(far)
                    return
                self._conns.add(conn)
                self.connections += 1
            t = threading.Thread(target=self._pump, args=(conn,), daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _pump(self, c: _Conn) -> None:
        """Forward both ways until both directions ended, the link is cut or closed."""
        pairs = {c.near: c.far, c.far: c.near}
        open_from = {c.near, c.far}            # sides still sending
        try:
            for s in pairs:
                s.setblocking(True)
                s.settimeout(None)
            while open_from and not self._closed and c.cut is None:
                if time.monotonic() < self._stall_until:
                    time.sleep(0.02)
                    continue
                ready = select.select(list(open_from), [], [], 0.1)[0]
                for s in ready:
                    if c.cut is not None:
                        break
                    slow = time.monotonic() < self._slow_until
                    data = s.recv(min(CHUNK, max(512, self._rate // 20)) if slow else CHUNK)
                    if not data:
                        open_from.discard(s)
                        pairs[s].shutdown(socket.SHUT_WR)
                        continue
                    pairs[s].sendall(data)
                    if slow:
                        time.sleep(len(data) / self._rate)
        except OSError:
            c.cut = c.cut or "rst"
        finally:
            with self._lock:
                self._conns.discard(c)
            for s in (c.near, c.far):
                if c.cut == "rst" or self._closed:
                    reset(s)
                else:
                    s.close()

    def close(self) -> None:
        self._closed = True
        self.cut(reset=True)
        for t in self._threads:
            t.join(5)
        self._listener.close()


"""A pipelined raw NBD client for fault tests.

``Pipeline(client, model, ops, depth)`` drives one connection (a ``RawClient`` after its
handshake): a sender thread sends the requests of ``ops`` (an iterator of ``Op``), keeping at most
``depth`` of them unanswered, and a receiver thread matches replies to requests by cookie (in any
order), checks every READ against ``model`` (a ``DiskModel``) and applies every acknowledged WRITE
to it. Two requests in flight never overlap when one of them writes, so the model does not depend
on the order in which the server carries them out.

Anything wrong (an error reply, a READ that disagrees with the model, a reply nobody asked for,
a closed connection) is recorded in ``failures``; tests assert it stays empty.

For placing faults exactly:
- ``mark``: a number the test sets (say 1 after a kill, 2 once the server is back); every op
  records the mark when it was sent (``sent_mark``) and when it completed (``done_mark``);
- ``hook(pipeline, op, sent)``: called by the sender thread between the pieces (``PIECE`` bytes)
  of a request, ``sent`` being the bytes of its payload already sent; whatever the hook does
  (kill a server) happens while exactly that much of the payload is out.

Every thread ends and the socket is closed in ``close()`` (also the context manager's exit).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flexnbd import wire
from tests.support.nbdmodel import DiskModel
from tests.support.rawclient import RawClient

PIECE = 1 << 20
WRITE_TYPES = (wire.CMD_WRITE, wire.CMD_WRITE_ZEROES, wire.CMD_TRIM)


@dataclass(eq=False)
class Op:
    type: int
    offset: int = 0
    length: int = 0
    payload: bytes = b""
    flags: int = 0
    index: int = -1               # position in the order of sending
    cookie: int = 0
    sent_mark: int | None = None
    done_mark: int | None = None
    sent: int = 0                 # payload bytes sent so far
    error: int | None = None      # the reply's error (None: not answered)

    def __repr__(self) -> str:
        name = {0: "READ", 1: "WRITE", 3: "FLUSH", 4: "TRIM", 6: "WRITE_ZEROES"}.get(
            self.type, str(self.type))
        return (f"Op#{self.index}({name} {self.offset}+{self.length} cookie={self.cookie} "
                f"sent_mark={self.sent_mark} done_mark={self.done_mark} error={self.error})")

    def overlaps(self, other: Op) -> bool:
        if self.type not in WRITE_TYPES and other.type not in WRITE_TYPES:
            return False
        return self.offset < other.offset + other.length and \
            other.offset < self.offset + self.length


class Pipeline:
    def __init__(self, client: RawClient, model: DiskModel, ops: Iterable[Op], depth: int = 8,
                 hook: Callable[[Pipeline, Op, int], None] | None = None,
                 timeout: float = 60.0) -> None:
        self.client = client
        self.sock = client.sock
        self.sock.settimeout(timeout)
        self.model = model
        self.ops = iter(ops)
        self.depth = depth
        self.hook = hook
        self.mark = 0
        self.sent: list[Op] = []
        self.done: list[Op] = []
        self.failures: list[str] = []
        self.last_done = time.monotonic()
        self._inflight: dict[int, Op] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._sender_done = False
        self._closed = False
        self._next_cookie = 1
        self._sender = threading.Thread(target=self._send_loop, name="pipeline-send",
                                        daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="pipeline-recv",
                                          daemon=True)
        self._sender.start()
        self._receiver.start()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for the test ------------------------------------------------------------------------

    def outstanding(self) -> list[Op]:
        with self._cond:
            return sorted(self._inflight.values(), key=lambda op: op.index)

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.failures:
                return False
            time.sleep(0.005)
        return bool(predicate())

    def wait_done(self, n: int, timeout: float = 30.0) -> bool:
        """Wait until ``n`` requests have completed in all."""
        return self.wait(lambda: len(self.done) >= n, timeout)

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 30.0) -> bool:
        """Wait until no request has completed for ``quiet`` seconds."""
        return self.wait(lambda: time.monotonic() - self.last_done >= quiet, timeout)

    def finish(self, timeout: float = 60.0, all_ops: bool = False) -> bool:
        """Send nothing more (with ``all_ops``: once every op of ``ops`` has been sent); wait
        until every request sent has been answered. True if so, with no failure."""
        if all_ops:
            self.wait(lambda: self._sender_done, timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        ok = self.wait(lambda: self._sender_done and not self.outstanding(), timeout)
        if not ok and not self.failures:
            self.failures.append(f"not answered after {timeout} s: {self.outstanding()}")
        return ok and not self.failures

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._closed = True
            self._cond.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sender.join(10)
        self._receiver.join(10)
        self.client.close()

    # -- threads -----------------------------------------------------------------------------

    def _fail(self, text: str) -> None:
        if not self._closed:
            self.failures.append(text)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _send_loop(self) -> None:
        try:
            for op in self.ops:
                with self._cond:
                    while not self._stopping and (
                            len(self._inflight) >= self.depth
                            or any(op.overlaps(o) for o in self._inflight.values())):
                        self._cond.wait(0.1)
                    if self._stopping:
                        return
                    op.index = len(self.sent)
                    op.cookie = self._next_cookie
                    self._next_cookie += 1
                    op.sent_mark = self.mark
                    self._inflight[op.cookie] = op
                    self.sent.append(op)
                head = wire.pack_request(op.type, op.offset, op.length, op.cookie, op.flags)
                try:
                    if not op.payload:
                        self.sock.sendall(head)
                        continue
                    self.sock.sendall(head + op.payload[:PIECE])
                    op.sent = min(PIECE, len(op.payload))
                    while op.sent < len(op.payload):
                        if self.hook is not None:
                            self.hook(self, op, op.sent)
                        self.sock.sendall(op.payload[op.sent:op.sent + PIECE])
                        op.sent = min(op.sent + PIECE, len(op.payload))
                except OSError as e:
                    self._fail(f"sending {op}: {e!r}")
                    return
        except Exception as e:        # a bug in the ops generator or the hook
            self._fail(f"sender: {e!r}")
        finally:
            self._sender_done = True

    def _recv_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._closed or (self._stopping and self._sender_done
                                        and not self._inflight):
                        return
                try:
                    ready, _, _ = select.select([self.sock], [], [], 0.1)
                    if not ready:
                        continue
                    first = self.sock.recv(1)
                except (OSError, ValueError) as e:
                    self._fail(f"receiving: {e!r}; unanswered: {self.outstanding()}")
                    return
                if not first:
                    self._fail(f"the server closed the connection; unanswered: "
                               f"{self.outstanding()}")
                    return
                self._one_reply(first)
        except Exception as e:
            self._fail(f"receiver: {e!r}")

    def _one_reply(self, first: bytes) -> None:
        head = first + self.client.recv_exact(wire.SIMPLE_REPLY_SIZE - 1)
        reply = wire.unpack_simple_reply(head)
        if reply.magic != wire.SIMPLE_REPLY_MAGIC:
            raise AssertionError(f"bad reply magic {reply.magic:#x}")
        with self._cond:
            op = self._inflight.get(reply.cookie)
        if op is None:
            raise AssertionError(f"a reply for cookie {reply.cookie}, which is not in flight")
        data = b""
        if op.type == wire.CMD_READ and reply.error == 0:
            data = self.client.recv_exact(op.length)
        op.error = reply.error
        if reply.error:
            self._fail(f"{op} answered with error {reply.error}")
        elif op.type == wire.CMD_READ:
            bad = self.model.mismatch(op.offset, data)
            if bad:
                self._fail(f"{op}: {bad}")
        elif op.type == wire.CMD_WRITE:
            self.model.write(op.offset, op.payload)
        elif op.type == wire.CMD_WRITE_ZEROES:
            self.model.zero(op.offset, op.length)
        elif op.type == wire.CMD_TRIM:
            self.model.trim(op.offset, op.length)
        with self._cond:
            op.done_mark = self.mark
            del self._inflight[reply.cookie]
            self.done.append(op)
            self.last_done = time.monotonic()
            self._cond.notify_all()

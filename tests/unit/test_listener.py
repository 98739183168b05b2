"""flexnbd.listener: the one accept loop and handshake deadline of serve, listen and the proxy.
Real sockets on 127.0.0.1 and in a temporary directory, in this process."""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from flexnbd.listener import Accepted, Listener

DEADLINE = 0.4


class Owner:
    """What a server or the proxy does with the Listener: keeps what it is handed, and what it
    is told was late."""

    def __init__(self, handshake_done: bool = False) -> None:
        self.handshake_done = handshake_done
        self.accepted: list[Accepted] = []
        self.late: list[Accepted] = []
        self.arrived = threading.Semaphore(0)

    def on_connection(self, accepted: Accepted) -> None:
        if self.handshake_done:
            accepted.handshake_done()
        self.accepted.append(accepted)
        self.arrived.release()

    def next(self) -> Accepted:
        assert self.arrived.acquire(timeout=10), "no connection was handed over"
        return self.accepted[-1]


@pytest.fixture
def started() -> Iterator:
    """started(owner, unix=None, inherited=()) -> Listener on 127.0.0.1, an ephemeral port;
    closed (and its connections) at the end."""
    made: list[tuple[Listener, Owner]] = []

    def start(owner: Owner, unix: str | None = None,
              inherited: tuple[socket.socket, ...] = ()) -> Listener:
        listener = Listener(DEADLINE, owner.late.append)
        listener.bind("127.0.0.1", 0, unix, inherited)
        listener.start(owner.on_connection, "accept")
        made.append((listener, owner))
        return listener
    yield start
    for listener, owner in made:
        listener.close()
        for accepted in owner.accepted:
            accepted.close()


def connect(listener: Listener) -> socket.socket:
    assert listener.port is not None
    return socket.create_connection(("127.0.0.1", listener.port), timeout=10)


def closed_by_the_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False


def test_a_silent_connection_is_cut_at_its_handshake_deadline(started):
    owner = Owner()
    listener = started(owner)
    with connect(listener) as client:
        began = time.monotonic()
        accepted = owner.next()
        assert closed_by_the_server(client, 10 * DEADLINE)
        took = time.monotonic() - began
    assert DEADLINE * 0.8 < took < DEADLINE + 1.0, took
    assert accepted.is_cut
    deadline = time.monotonic() + 5        # (told just after the cut)
    while not owner.late and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(DEADLINE)
    assert owner.late == [accepted]        # told once, with the connection it cut


def test_a_finished_handshake_is_not_cut(started):
    owner = Owner(handshake_done=True)
    listener = started(owner)
    with connect(listener) as client:
        accepted = owner.next()
        assert not closed_by_the_server(client, 3 * DEADLINE)
    assert not accepted.is_cut and owner.late == []


def test_a_connection_cut_by_its_owner_is_not_reported_late(started):
    owner = Owner()
    listener = started(owner)
    with connect(listener) as client:
        accepted = owner.next()
        accepted.cut()
        assert closed_by_the_server(client, DEADLINE)
        time.sleep(2 * DEADLINE)
    assert owner.late == []


def test_a_closed_connection_is_never_shut_down(started):
    """Its descriptor number may belong to another socket by then."""
    owner = Owner()
    listener = started(owner)
    with connect(listener):
        accepted = owner.next()
        accepted.close()
        accepted.cut()
        time.sleep(2 * DEADLINE)
    assert not accepted.is_cut and owner.late == []


def test_one_loop_accepts_on_every_socket_and_close_cleans_up(started, tmp_path):
    """TCP, a Unix socket it binds and one it is handed (socket activation): each connection
    reaches the owner; close() cuts those still in their handshake, closes the sockets and
    removes the socket file it made, not the one it was handed."""
    own, passed = str(tmp_path / "own.sock"), str(tmp_path / "passed.sock")
    inherited = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    inherited.bind(passed)
    inherited.listen()
    owner = Owner()
    listener = started(owner, unix=own, inherited=(inherited,))
    assert listener.where == f"127.0.0.1 port 0 and {own} and inherited socket {passed} " \
        "(systemd)"
    clients = [connect(listener)]
    for path in (own, passed):
        clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        clients[-1].connect(path)
    handed = [owner.next() for _ in clients]
    try:
        listener.close()
        assert all(a.is_cut for a in handed)
        assert all(closed_by_the_server(c, 5) for c in clients)
        assert not os.path.exists(own) and os.path.exists(passed)
        assert inherited.fileno() == -1
        assert owner.late == []
    finally:
        for c in clients:
            c.close()


def test_accept_pauses_when_descriptors_run_out(started, caplog):
    """accept() failing with EMFILE: the loop pauses (50 ms doubling to 1 s) instead of
    spinning, says so once, and serves the waiting connection once descriptors are free."""
    owner = Owner(handshake_done=True)
    listener = started(owner)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    caplog.set_level(logging.WARNING, logger="flexnbd.listener")
    try:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            client.connect(("127.0.0.1", listener.port))   # (waits in the backlog)
            time.sleep(1.0)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        owner.next()
    finally:
        client.close()
    said = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("accept failed: Too many open files; pausing new connections")
    failures = int(said[1].split("after ")[1].split()[0])
    assert 2 <= failures <= 6, said        # about 50+100+200+400 ms of pauses in 1 s

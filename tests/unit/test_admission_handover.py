"""flexnbd.admission, listen mode: the migration's one slot passes to a new sender when the
holders in its way have hung up, even when, while the sender waited for one of them to go, the
slot was taken by another client that had hung up too (a readiness probe whose handshake ended
just before the sender's). Real socket pairs in this process; the clients' threads are played
by timers, so that the order of events is the one that matters here."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

from flexnbd import admission
from flexnbd.config import ServeConfig


class FakeAccepted:
    """An accepted connection whose peer has hung up (its other end is closed)."""

    def __init__(self, name: str, hung_up: bool = True) -> None:
        self.sock, self._peer = socket.socketpair()
        if hung_up:
            self._peer.close()
        self.name = name
        self.is_cut = False
        self.accepted_ns = time.monotonic_ns()
        self.on_cut = lambda: None

    def cut(self) -> None:
        self.is_cut = True
        self.on_cut()

    def handshake_done(self) -> None:
        pass

    def close(self) -> None:
        self.sock.close()
        if self._peer.fileno() >= 0:
            self._peer.close()


def connection() -> SimpleNamespace:
    return SimpleNamespace(local=False, copy_reads=False, requests=0, request_age_ns=0)


@pytest.fixture
def listen(tmp_path):
    adm = admission.Admission(
        ServeConfig(file=str(tmp_path / "disk"), mode="listen", max_clients=1,
                    max_handshakes=4), serve=lambda client: None)
    made: list[FakeAccepted] = []

    def client(name: str, hung_up: bool = True, holds: bool = True) -> admission.Client:
        """A client (hung up or not), past its handshake or (holds=False) at its end."""
        accepted = FakeAccepted(name, hung_up)
        made.append(accepted)
        new = admission.Client(accepted, None)
        if holds:
            new.connection = connection()
        return new

    yield adm, client
    for accepted in made:
        accepted.close()
    adm.listener.close()


def leaves_later(adm: admission.Admission, client: admission.Client, then=None) -> None:
    """When cut, the client's thread ends a moment later (and ``then`` runs as it ends)."""
    def end() -> None:
        with adm._lock:
            adm._clients.discard(client)
        if then is not None:
            then()
    client.accepted.on_cut = lambda: threading.Timer(0.05, end).start()


def test_a_probe_that_took_the_slot_while_the_sender_waited_is_cut_too(listen):
    adm, holder = listen
    previous, probe = holder("previous sender"), holder("probe")
    sender = holder("sender", hung_up=False, holds=False)

    def probe_takes_the_slot() -> None:
        with adm._lock:
            adm._clients.add(probe)
    leaves_later(adm, previous, then=probe_takes_the_slot)
    leaves_later(adm, probe)
    with adm._lock:
        adm._clients.update({previous, sender})

    assert adm.attach(sender, connection) == ""
    assert previous.killed and probe.killed
    assert sender.connection is not None


def test_a_sender_still_connected_keeps_the_slot(listen):
    adm, client = listen
    first = client("first sender", hung_up=False)
    second = client("second sender", hung_up=False, holds=False)
    with adm._lock:
        adm._clients.update({first, second})
    assert adm.attach(second, connection) == "a sender already holds the migration's slot"
    assert not first.killed


def test_holders_that_keep_hanging_up_cannot_hold_the_sender_forever(listen):
    # Each cut holder is replaced by another hung-up one: the sender gives up after
    # HANDOVER_ROUNDS looks, in bounded time, and says why.
    adm, holder = listen
    cut = []

    def replace(client: admission.Client) -> None:
        def then() -> None:
            successor = holder(f"probe {len(cut)}")
            replace(successor)
            with adm._lock:
                adm._clients.add(successor)
        cut.append(client)
        leaves_later(adm, client, then=then)

    first = holder("probe")
    replace(first)
    sender = holder("sender", hung_up=False, holds=False)
    with adm._lock:
        adm._clients.update({first, sender})
    assert adm.attach(sender, connection) == "a sender already holds the migration's slot"
    assert len([c for c in cut if c.killed]) == admission.HANDOVER_ROUNDS - 1

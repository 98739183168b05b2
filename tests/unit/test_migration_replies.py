"""Migration outcomes as control replies (flexnbd.control.protocol words them): every outcome
has a reply, and each reply is, byte for byte, the one the mirror requests gave before the
migration package spoke in outcomes (SPEC §5)."""

from __future__ import annotations

import pytest

from flexnbd.control import protocol as p
from flexnbd.control.server import execute
from flexnbd.migration.outcome import Outcome, Result
from flexnbd.migration.settings import MirrorSettings
from flexnbd.status import Status

# `mirror`: the first attempt's outcome, or why no mirror started.
MIRROR = {
    Outcome.STARTED: b"0: Mirror started\n",
    Outcome.FAILED_TO_CONNECT: b"1: Mirror failed to connect\n",
    Outcome.REJECTED: b"1: Mirror was rejected\n",
    Outcome.NO_RESPONSE: b"1: Remote server failed to respond\n",
    Outcome.SIZE_MISMATCH: b"1: Remote size does not match local size\n",
    Outcome.ABANDONED: b"1: Mirroring abandoned\n",
    Outcome.BUSY: b"1: mirror already running\n",
    Outcome.SHUTTING_DOWN: b"1: shutting down\n",
}
# `break`
BREAK = {
    Outcome.STOPPED: b"0: mirror stopped\n",
    Outcome.COMPLETED: b"1: mirror completed\n",
    Outcome.UNKNOWN: b"1: migration outcome unknown\n",
    Outcome.NOT_MIRRORING: b"1: not mirroring\n",
}
# `mirror_wait`: how the mirror ended (it was 0 only when completed, with the outcome's text).
WAIT = {
    Outcome.COMPLETED: b"0: migration completed\n",
    Outcome.UNKNOWN: b"1: migration outcome unknown\n",
    Outcome.STOPPED: b"1: mirror stopped\n",
    Outcome.SHUTTING_DOWN: b"1: shutting down\n",
    Outcome.ABANDONED: b"1: Mirroring abandoned\n",
    Outcome.REJECTED: b"1: Mirror was rejected\n",
    Outcome.FAILED_TO_CONNECT: b"1: Mirror failed to connect\n",
    Outcome.NO_RESPONSE: b"1: Remote server failed to respond\n",
    Outcome.SIZE_MISMATCH: b"1: Remote size does not match local size\n",
    Outcome.NOT_MIRRORING: b"1: not mirroring\n",
}


def test_every_outcome_has_a_reply():
    assert set(MIRROR) | set(BREAK) | set(WAIT) == set(Outcome)


@pytest.mark.parametrize("outcome", MIRROR)
def test_mirror_replies(outcome):
    assert p.mirror_reply(Result(outcome)).encode() == MIRROR[outcome]


@pytest.mark.parametrize("outcome", BREAK)
def test_break_replies(outcome):
    assert p.break_reply(Result(outcome)).encode() == BREAK[outcome]


# What a finished mirror may report: everything but "started" and "busy" (they answer only
# the `mirror` request).
@pytest.mark.parametrize("outcome", [o for o in Outcome
                                     if o not in (Outcome.STARTED, Outcome.BUSY)])
def test_wait_replies(outcome):
    assert p.wait_reply(Result(outcome)).encode() == WAIT[outcome]


def test_max_bps_replies():
    assert p.max_bps_reply(True).encode() == b"0: updated\n"
    assert p.max_bps_reply(False).encode() == b"1: Not currently mirroring\n"


def test_a_detail_follows_on_its_own_line():
    # The why comes on the next line, for `mirror`, `mirror_wait` and `break` alike: the first
    # line is 0.5.0's, byte for byte. An empty why adds no line.
    tls = Result(Outcome.REJECTED, "TLS handshake failed: bad certificate")
    assert p.mirror_reply(tls).encode() == \
        b"1: Mirror was rejected\nTLS handshake failed: bad certificate\n"
    assert p.wait_reply(tls).encode() == \
        b"1: Mirror was rejected\nTLS handshake failed: bad certificate\n"
    assert p.mirror_reply(Result(Outcome.REJECTED, "")).encode() == b"1: Mirror was rejected\n"
    stopped = Result(Outcome.STOPPED, "to ::1 port 9, attempt 1: 5 of 10 bytes sent")
    assert p.break_reply(stopped).encode() == \
        b"0: mirror stopped\nto ::1 port 9, attempt 1: 5 of 10 bytes sent\n"


def test_the_details_say_why():
    import errno

    from flexnbd.migration import outcome as o

    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert o.connect_failed(refused, 15) == "ECONNREFUSED: Connection refused"
    assert o.connect_failed(TimeoutError("timed out"), 15) == \
        "ETIMEDOUT: no connection within 15 s"
    assert o.size_mismatch(2048, 1024) == "the destination exports 2048 bytes, this server 1024"
    assert o.no_greeting(timeout=5) == "no NBD greeting within 5 s"
    assert o.no_greeting(why=o.NOT_NBD).startswith("no NBD greeting: ")
    failed = "TLS handshake failed: the server did not use the pre-shared key"
    assert o.tls_failed(failed, "psk", "::1") == f"{failed} (TLS: wrong key or identity?)"
    assert "made for ::1?" in o.tls_failed("TLS handshake failed: x", "x509", "::1")
    # a message with a hint of its own, or not about the handshake, is left as it is
    hinted = "TLS handshake failed: the peer closed the connection (wrong key or certificate?)"
    assert o.tls_failed(hinted, "psk", "::1") == hinted
    assert o.tls_failed("the server does not offer TLS", "psk", "::1") == \
        "the server does not offer TLS"
    assert o.stopped("10.0.0.2", 10809, 2, 5, 10) == \
        "to 10.0.0.2 port 10809, attempt 2: 5 of 10 bytes sent"
    assert o.stopped("10.0.0.2", 10809, 0, 0, 10) == \
        "to 10.0.0.2 port 10809: stopped before its first attempt sent anything"


class Target:
    """A ControlTarget whose mirror answers with the given outcomes."""

    def __init__(self, start: Result, wait: Result | None) -> None:
        self.start, self.wait = start, wait
        self.started: list[MirrorSettings] = []

    def status(self) -> Status:
        return Status(pid=1, size=0)

    def set_acl(self, entries) -> None:
        pass

    def start_mirror(self, settings: MirrorSettings) -> Result:
        self.started.append(settings)
        return self.start

    def set_mirror_max_bps(self, max_bps: int | None) -> bool:
        return max_bps == 5

    def break_mirror(self) -> Result:
        return Result(Outcome.UNKNOWN)

    def wait_mirror(self):
        if self.wait is None:
            return Result(Outcome.NOT_MIRRORING)
        return lambda: self.wait


def test_execute_words_the_outcomes():
    t = Target(Result(Outcome.SIZE_MISMATCH), Result(Outcome.COMPLETED))
    assert execute(["mirror", "::1", "9", "nothing"], t) == p.REMOTE_SIZE_MISMATCH
    assert t.started == [MirrorSettings("::1", 9, "nothing")]
    assert execute(["mirror_max_bps", "5"], t) == p.UPDATED
    assert execute(["mirror_max_bps", "6"], t) == p.NOT_CURRENTLY_MIRRORING
    assert execute(["break"], t) == p.MIGRATION_OUTCOME_UNKNOWN
    later = execute(["mirror_wait"], t)
    assert callable(later) and later() == p.MIGRATION_COMPLETED
    assert execute(["mirror_wait"], Target(Result(Outcome.STARTED), None)) == p.NOT_MIRRORING

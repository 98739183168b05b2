"""The idle spin: a client that sends one request at a time, each soon after the last reply,
is waited for with a spin instead of a sleep (FLEXNBD_IDLE_SPIN_US, 40 µs by default); after
a FLUSH or FUA request the server sleeps again for a while, and 0 turns the spin off.

Seen from outside as the serving thread's voluntary context switches (one per sleep). The
spin is set to a whole second here, so that a Python client always counts as quick. The
client pauses GAP after each reply: a server that does not spin is then surely asleep when
the next request comes, even on a loaded machine where it could be preempted between its
reply and its next wait (then it finds the request there and need not sleep).
"""

from __future__ import annotations

import time

import pytest

from flexnbd import wire
from tests.support.procstat import thread_status
from tests.support.serving import MiB, client

REQUESTS = 200
GAP = 0.002


def sleeps(pid: int) -> int:
    """Voluntary context switches of all the server's threads so far."""
    return sum(int(v) for v in thread_status(pid, "voluntary_ctxt_switches"))


def sleeps_during_reads(server, c, flags: int = 0) -> int:
    for i in range(8):                         # the server sees the pattern first
        c.read(i * 4096, 4096)
    before = sleeps(server.pid)
    for i in range(REQUESTS):
        c.read(i * 4096, 4096, flags=flags)
        time.sleep(GAP)
    return sleeps(server.pid) - before


def test_one_request_at_a_time_is_waited_for_with_a_spin(serve, make_file):
    server = serve(make_file(MiB), env={"FLEXNBD_IDLE_SPIN_US": "1000000"})
    with client(server) as c:
        assert sleeps_during_reads(server, c) < REQUESTS // 2


def test_no_spin_when_turned_off(serve, make_file):
    server = serve(make_file(MiB), env={"FLEXNBD_IDLE_SPIN_US": "0"})
    with client(server) as c:
        assert sleeps_during_reads(server, c) >= REQUESTS * 3 // 4


def test_no_spin_while_the_client_syncs(serve, make_file):
    server = serve(make_file(MiB), env={"FLEXNBD_IDLE_SPIN_US": "1000000"})
    with client(server) as c:
        assert sleeps_during_reads(server, c, flags=wire.CMD_FLAG_FUA) >= REQUESTS * 3 // 4


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "2000000"])
def test_a_bad_value_is_a_usage_error(run_flexnbd, make_file, value):
    from tests.conftest import free_port

    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(make_file(MiB)), env={"FLEXNBD_IDLE_SPIN_US": value}, timeout=30)
    assert res.returncode == 1
    assert b"Traceback" not in res.stderr
    assert b"FLEXNBD_IDLE_SPIN_US" in res.stderr

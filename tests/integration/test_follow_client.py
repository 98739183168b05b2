"""Following the client: a client that sends one request at a time and syncs (FLUSH or FUA)
gets its serving thread held on the CPU that takes its packets (on loopback: the client's
own CPU), and the thread gets its own CPUs back once the client stops syncing or leaves.

Seen from outside as the serving thread's Cpus_allowed_list. The spin limit is set to a whole
second, so that a Python client always counts as quick.
"""

from __future__ import annotations

import os

import pytest

from tests.support.procstat import thread_status
from tests.support.serving import FLUSH, MiB, client
from tests.support.waiting import wait_until

QUICK = {"FLEXNBD_IDLE_SPIN_US": "1000000"}

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="following a client needs two CPUs to choose from")


def thread_cpus(pid: int) -> list[str]:
    """Cpus_allowed_list of each of the server's threads."""
    return thread_status(pid, "Cpus_allowed_list")


def held(pid: int) -> list[str]:
    """The threads held on one CPU (a list without ',' or '-')."""
    return [cpus for cpus in thread_cpus(pid) if cpus.isdigit()]


def write_and_flush(c, times: int) -> None:
    for i in range(times):
        c.write(i * 4096, b"x" * 4096)
        assert c.request(FLUSH).error == 0


def test_a_syncing_one_at_a_time_client_is_followed_then_let_go(serve, make_file):
    server = serve(make_file(MiB), env=QUICK)
    own = set(thread_cpus(server.pid))
    assert not held(server.pid)
    with client(server) as c:
        write_and_flush(c, 20)
        on = held(server.pid)
        assert len(on) == 1                  # the serving thread, on one of its own CPUs
        assert int(on[0]) in os.sched_getaffinity(server.pid)
        # No sync for more than 64 requests: the client gets a spin again, not a CPU.
        for i in range(100):
            c.read(i * 4096, 4096)
        assert held(server.pid) == []
        write_and_flush(c, 20)
        assert len(held(server.pid)) == 1
    # The client left: the thread has its own CPUs back (or is gone).
    assert wait_until(lambda: held(server.pid) == [], timeout=10)
    assert set(thread_cpus(server.pid)) <= own


def test_a_client_that_does_not_sync_is_not_followed(serve, make_file):
    server = serve(make_file(MiB), env=QUICK)
    with client(server) as c:
        for i in range(100):
            c.write(i * 4096, b"y" * 4096)
        assert held(server.pid) == []


def test_not_followed_when_the_spin_is_off(serve, make_file):
    server = serve(make_file(MiB), env={"FLEXNBD_IDLE_SPIN_US": "0"})
    with client(server) as c:
        write_and_flush(c, 40)
        assert held(server.pid) == []

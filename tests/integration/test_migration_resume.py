"""Resumed migrations (issue 25 part 1, SPEC §6.2): an attempt cut before DISC is followed by
one that sends only what the destination lacks.

A fault-injecting relay between the source and a real `flexnbd listen` cuts the first
connection after a share of the data went up; the relay counts every byte that went up over
all connections. The bytes of all attempts together must stay within the disk's data plus what
clients rewrote plus one in-flight window (32 MiB) and the files must end identical. A listener
restarted between attempts (it knows nothing of the migration) gets everything again.
"""

from __future__ import annotations

import pytest

from tests.fakes.relay import Fault, Relay
from tests.support import control as cu
from tests.support.migration import (
    KiB,
    MiB,
    assert_completed,
    logs,
    mirror_cli,
    out,
    sparse_file,
)
from tests.support.waiting import wait_until

SHORT_LIMIT = {"FLEXNBD_MS_REQUEST_LIMIT_SECS": "2"}
IN_FLIGHT = 32 * MiB          # the mirror's window of unanswered bytes
SLACK = 2 * MiB               # requests, replies, handshakes and the coverage query


def up_bytes(relay: Relay) -> int:
    return sum(c.up for c in relay.connections)


def map_built(p) -> None:
    """(A mirror started before the map is built connects once, lets go, and connects again:
    the relay's first connection must be the one that sends.)"""
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")


def resumed_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "resumes: the destination holds" in line]


@pytest.mark.parametrize("share", [0.1, 0.5, 0.95])
def test_a_cut_dense_migration_resumes(pair, make_file, share):
    size = 512 * MiB
    p = pair(make_file(size), src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=int(size * share))]) as relay:
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert_completed(p, timeout=120)
        sent = up_bytes(relay)
        assert relay.connections[0].triggered, relay.connections
    assert resumed_lines(p.src.log()), logs(p.src, p.dst)
    assert sent <= size + IN_FLIGHT + SLACK, f"{sent} bytes went up for {size}"


def test_a_cut_sparse_migration_resumes(pair, tmp_path):
    src_file = tmp_path / "src.img"
    data = sparse_file(src_file, 4096 * MiB, pieces=256, piece=512 * KiB)
    p = pair(src_file, src_env=SHORT_LIMIT)
    map_built(p)
    with Relay(p.dst.port, faults=[Fault(close_after_up=data // 2)]) as relay:
        res = mirror_cli(p.src, relay.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert_completed(p, timeout=120)
        sent = up_bytes(relay)
    assert resumed_lines(p.src.log()), logs(p.src, p.dst)
    assert sent <= data + IN_FLIGHT + SLACK, f"{sent} bytes went up for {data} of data"

"""Defects the chaos campaign (tests/chaos, ``make chaos``) found, each replayed here
deterministically: the scenario's seed, what went wrong, and what must hold now."""

from __future__ import annotations

import os

from tests.chaos import eio
from tests.conftest import require_tool
from tests.support import control as cu
from tests.support.migration import (
    Pair,
    assert_completed,
    logs,
    mirror_request,
    same_files,
    wait_exit,
)
from tests.support.waiting import wait_until

MiB = 1024 * 1024


def test_a_listener_whose_write_failed_exits_and_a_fresh_one_completes(
        start_server, pair, tmp_path):
    """Seed 309: one pwrite of the destination's file failed with EIO. The error is sticky
    (acknowledged data may be lost, so no FLUSH succeeds again), yet the listener waited for the
    next sender: every later attempt got to its FLUSH, was refused, and the mirror retried for
    ever. Now the listener ends after that session with exit status 1 and says why; a fresh
    listener on the same file receives the migration."""
    require_tool("gcc")
    lib = eio.build(tmp_path)
    src_file = tmp_path / "disk.img"
    src_file.write_bytes(os.urandom(8 * MiB))
    copy = tmp_path / "copy.img"
    copy.write_bytes(src_file.read_bytes())
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(8 * MiB)
    switch = eio.Switch(tmp_path / "dst.eio")
    switch.fail("write", always=False)          # the first write of the file fails, once
    p = pair(src_file, dst_file, dst_env=eio.environment(lib, dst_file, switch.control,
                                                          tmp_path / "dst.eio.log"))
    assert mirror_request(p.src, p.dst.port) == "0: Mirror started\n"
    assert wait_exit(p.dst, 30) == 1, logs(p.src, p.dst)
    assert "cannot vouch for the file" in p.dst.log()
    assert (tmp_path / "dst.eio.log").read_text().count("EIO") == 1
    # The source keeps its file and retries; the operator stops this mirror and starts a
    # fresh listener on the same file (its disk works again: the shim disarmed).
    switch.clear()
    assert wait_until(lambda: "retrying" in p.src.log(), 10)
    assert cu.stopped(cu.control(p.src.sock, "break"))
    fresh = start_server(dst_file, mode="listen")
    assert mirror_request(p.src, fresh.port) == "0: Mirror started\n"
    assert_completed(Pair(p.src, fresh, src_file, dst_file))
    assert same_files(copy, dst_file)

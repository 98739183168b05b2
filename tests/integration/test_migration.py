"""Live migration end to end (SPEC §6): real `flexnbd serve` sources mirroring into real
`flexnbd listen` destinations (and into fakes), driven through the control socket and the CLI.

Happy paths (dense, sparse, --unlink, tiny files, action `nothing`, status while mirroring),
client writes racing the migration (the destination must equal the source byte for byte), the
speed limit, and wire interop with flexnbd 0.5.0 (an oldstyle listener that only knows
READ/WRITE/DISC, and a 0.5.0-like sender into `listen --oldstyle`).

The helpers shared with the other migration tests are in tests/support/migration.py.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import require_python_nbd, require_tool
from tests.fakes.fakedest import FakeDest
from tests.fakes.oldsender import send_disk
from tests.fakes.relay import Relay
from tests.support import control as cu
from tests.support.layout import seek_scan
from tests.support.migration import (
    KiB,
    MiB,
    Pair,
    allocated,
    assert_completed,
    logs,
    mirror_cli,
    mirror_request,
    out,
    raw_client,
    running,
    same_files,
    sparse_file,
    status_or_none,
    wait_exit,
)
from tests.support.waiting import wait_until

BS = 4096
STATUS_KEYS = ["pid", "size", "is_mirroring", "clients_allowed", "num_clients", "has_control"]
MIGRATION_KEYS = ["migration_speed", "migration_duration", "migration_seconds_left",
                  "migration_bytes_left"]


# --------------------------------------------------------------------------------------------
# helpers (shared with the other migration test files)


# --------------------------------------------------------------------------------------------
# happy paths

def test_dense_file(pair, make_file):
    p = pair(make_file(64 * MiB))
    res = mirror_cli(p.src, p.dst.port)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"Mirror started\n", b""), out(res)
    assert_completed(p)
    assert "migration completed" in p.src.log()
    assert "migration completed" in p.dst.log()
    assert not p.src.sock.exists() and not p.dst.sock.exists()


def test_sparse_file_stays_sparse_and_only_data_crosses_the_wire(pair, tmp_path):
    size = 256 * MiB
    src_file = tmp_path / "sparse.img"
    data = sparse_file(src_file, size, pieces=48, piece=64 * KiB)   # 3 MiB of data
    p = pair(src_file)
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")
    with Relay(p.dst.port) as relay:
        res = mirror_cli(p.src, relay.port)
        assert res.returncode == 0, out(res)
        assert_completed(p)
        assert relay.wait_connections(1)
        wire_up = relay.up_total
    # Requests for the holes cost 28 bytes each, a few per 8 MiB chunk.
    assert data <= wire_up < data * 1.1 + 64 * KiB, (wire_up, data)
    assert allocated(p.dst_file) <= data + MiB, (allocated(p.dst_file), data)
    assert allocated(p.dst_file) >= data // 2


def test_holes_longer_than_4_gib_cross_as_a_few_requests(pair, tmp_path):
    """Issue 24: a hole costs one WRITE_ZEROES per 4 GiB (the 32-bit length field), not one per
    8 MiB, and a hole longer than that is split, not cut short (the listener would see it
    uncovered and never complete). 20 GiB, three blocks of data."""
    size = 20 << 30
    src_file = tmp_path / "big.img"
    places = [0, (5 << 30) + 123 * BS, size - BS]
    with open(src_file, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(places):
            f.seek(off)
            f.write(bytes([i + 1]) * BS)
    p = pair(src_file)
    with Relay(p.dst.port) as relay:
        res = mirror_cli(p.src, relay.port)
        assert res.returncode == 0, out(res)
        assert (wait_exit(p.src, 60), wait_exit(p.dst, 60)) == (0, 0), logs(p.src, p.dst)
        wire_up = relay.up_total
    # the data, and 28-byte requests: 3 WRITEs, 6 WRITE_ZEROES (2 for the 5 GiB hole, 4 for
    # the 15 GiB one), FLUSH, DISC; and the handshake (8 MiB chunks would be 2560 requests)
    assert 3 * BS < wire_up < 3 * BS + 14 * 28 + 1024, wire_up
    with open(src_file, "rb") as a, open(p.dst_file, "rb") as b:
        assert seek_scan(a.fileno(), size) == seek_scan(b.fileno(), size)
        for off in places:
            assert os.pread(a.fileno(), BS, off) == os.pread(b.fileno(), BS, off)
    assert os.path.getsize(p.dst_file) == size


def _shape(path: Path, shape: str) -> int:
    """Source files with awkward edges; their size."""
    if shape == "tail-not-4k":
        size = 4 * MiB + 1536                   # the last map block is partial
        path.write_bytes(os.urandom(size))
    elif shape == "sparse-tail-not-4k":
        size = 8 * MiB + 3584
        sparse_file(path, size - 3584, pieces=20, piece=12 * KiB, seed=4)
        with open(path, "r+b") as f:
            f.truncate(size)
            f.seek(size - 1000)
            f.write(os.urandom(1000))           # data ends at the last byte
    else:
        size = 16 * MiB + 512
        sparse_file(path, size - 512, pieces=30, piece=4 * KiB, seed=6)
        with open(path, "r+b") as f:
            f.truncate(size)                     # ...and the end is a hole
    return size


@pytest.mark.parametrize("dst_style", ["newstyle", "oldstyle"])
@pytest.mark.parametrize("shape", ["tail-not-4k", "sparse-tail-not-4k", "sparse-hole-tail"])
def test_destination_full_of_garbage(pair, tmp_path, shape, dst_style):
    """The destination file is not zero to start with: holes of the source must overwrite it
    (WRITE_ZEROES to a newstyle listener, zero-filled WRITEs to an oldstyle one)."""
    src_file = tmp_path / "src.img"
    size = _shape(src_file, shape)
    dst_file = tmp_path / "dst.img"
    dst_file.write_bytes(os.urandom(size))
    p = pair(src_file, dst_file, dst_args=("--oldstyle",) if dst_style == "oldstyle" else ())
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)


def test_unlink(pair, make_file, tmp_path):
    src_file = make_file(8 * MiB)
    copy = tmp_path / "copy.img"
    shutil.copyfile(src_file, copy)
    p = pair(src_file)
    res = mirror_cli(p.src, p.dst.port, "--unlink")
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert (wait_exit(p.src), wait_exit(p.dst)) == (0, 0), logs(p.src, p.dst)
    assert not src_file.exists()
    assert same_files(copy, p.dst_file)


def test_unlink_action_over_the_socket(pair, make_file, tmp_path):
    src_file = make_file(2 * MiB)
    copy = tmp_path / "copy.img"
    shutil.copyfile(src_file, copy)
    p = pair(src_file)
    assert mirror_request(p.src, p.dst.port, "unlink") == "0: Mirror started\n"
    assert (wait_exit(p.src), wait_exit(p.dst)) == (0, 0), logs(p.src, p.dst)
    assert not src_file.exists()
    assert same_files(copy, p.dst_file)


def test_empty_file(pair, make_file):
    p = pair(make_file(0, data=b""))
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)
    assert os.path.getsize(p.dst_file) == 0


def test_file_of_1000_bytes_exports_512(pair, make_file, tmp_path):
    src_file = make_file(data=os.urandom(1000))
    dst_file = tmp_path / "dst1000.img"
    tail = os.urandom(1000)
    dst_file.write_bytes(tail)          # the destination's last 488 bytes are not exported
    p = pair(src_file, dst_file)
    assert cu.status(p.src.sock)["size"] == "512"
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p, length=512)
    got = dst_file.read_bytes()
    assert got[:512] == src_file.read_bytes()[:512]
    assert got[512:] == tail[512:]


def test_action_nothing_keeps_serving(pair, make_file, tmp_path, start_server):
    p = pair(make_file(8 * MiB))
    assert mirror_request(p.src, p.dst.port, "nothing") == "0: Mirror started\n"
    assert wait_exit(p.dst) == 0, p.dst.log()
    assert wait_until(lambda: cu.status(p.src.sock)["is_mirroring"] == "false"), p.src.log()
    assert running(p.src)
    st = cu.status(p.src.sock)
    assert st["clients_allowed"] == "true" and st["has_control"] == "true", st
    assert "migration_speed" not in st
    assert same_files(p.src_file, p.dst_file)
    # Clients can connect again, and read what is there.
    with cu.connect("127.0.0.1", p.src.port) as s:
        assert cu.greets(s)
    nbdinfo = require_tool("nbdinfo")
    res = subprocess.run([nbdinfo, "--size", f"nbd://127.0.0.1:{p.src.port}"],
                         capture_output=True, timeout=30)
    assert res.stdout.strip() == str(8 * MiB).encode(), res
    # The finished mirror: `break` says so; a new mirror to another destination works.
    assert cu.control(p.src.sock, "break") == "1: mirror completed\n"
    dst2_file = tmp_path / "second.img"
    with open(dst2_file, "wb") as f:
        f.truncate(8 * MiB)
    p2 = Pair(p.src, start_server(dst2_file, mode="listen"), p.src_file, dst2_file)
    res = mirror_cli(p.src, p2.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p2)


def test_status_while_mirroring(pair, make_file):
    size = 16 * MiB
    p = pair(make_file(size))
    limit = 4 * MiB
    assert mirror_request(p.src, p.dst.port, max_bps=limit) == "0: Mirror started\n"
    seen = []
    deadline = time.monotonic() + 30
    while running(p.src) and time.monotonic() < deadline:
        st = status_or_none(p.src)
        if st is None:
            break
        if st["is_mirroring"] == "true":
            seen.append(st)
        time.sleep(0.2)
    assert seen, p.src.log()
    for st in seen:
        keys = list(st)
        assert keys[:6] == STATUS_KEYS
        assert keys[6:11] == MIGRATION_KEYS + ["migration_speed_limit"], keys
        assert st["migration_speed_limit"] == str(limit)
        assert 0 <= int(st["migration_bytes_left"]) <= size
        assert int(st["migration_seconds_left"]) >= 0
        assert int(st["migration_duration"]) >= 0
    assert any(int(st["migration_bytes_left"]) > 0 for st in seen)
    # the bytes left go down
    lefts = [int(st["migration_bytes_left"]) for st in seen]
    assert lefts[-1] < lefts[0] or len(lefts) == 1
    assert_completed(p)


# --------------------------------------------------------------------------------------------
# writes during the migration

WRITER = r'''
import random, struct, sys, time
import nbd

uri, cid, first, nblocks, seconds, logpath, seed = sys.argv[1:8]
cid, first, nblocks, seconds, seed = int(cid), int(first), int(nblocks), float(seconds), int(seed)
rng = random.Random(seed)
log = open(logpath, "w", buffering=1)
h = nbd.NBD()
try:
    h.connect_uri(uri)
except nbd.Error as e:
    log.write(f"E connect {e}\n")
    sys.exit(0)
log.write("C\n")
versions = {}
deadline = time.monotonic() + seconds
try:
    while time.monotonic() < deadline:
        b = first + rng.randrange(nblocks)
        v = versions.get(b, 0) + 1
        versions[b] = v
        log.write(f"S {b} {v}\n")
        h.pwrite(struct.pack(">IIQ", cid, b, v) * 256, b * 4096)
        log.write(f"A {b} {v}\n")
except nbd.Error as e:
    log.write(f"E {e}\n")
log.write("D\n")
'''


def block_data(cid: int, block: int, version: int) -> bytes:
    return struct.pack(">IIQ", cid, block, version) * 256


class Writers:
    """Writer processes (python3-libnbd), each writing versioned 4 KiB blocks into its own
    region and logging what it sent (S) and what was acknowledged (A)."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        self.python = require_python_nbd()
        self.script = tmp_path / "writer.py"
        self.script.write_text(WRITER)
        self.tmp_path = tmp_path
        self.port = port
        self.procs: list[subprocess.Popen] = []
        self.regions: list[tuple[int, int, Path]] = []    # (first block, blocks, log)

    def start(self, first: int, nblocks: int, seconds: float) -> None:
        cid = len(self.procs)
        log = self.tmp_path / f"writer{cid}.log"
        self.regions.append((first, nblocks, log))
        self.procs.append(subprocess.Popen(
            [self.python, str(self.script), f"nbd://127.0.0.1:{self.port}", str(cid),
             str(first), str(nblocks), str(seconds), str(log), str(1000 + cid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))

    def lines(self, cid: int) -> list[str]:
        path = self.regions[cid][2]
        return path.read_text().splitlines() if path.exists() else []

    def acked(self, cid: int) -> int:
        return sum(1 for line in self.lines(cid) if line.startswith("A "))

    def wait(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail("a writer did not end")

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()

    def check_model(self, original: bytes, final: Path) -> int:
        """Every block of every region holds its last acknowledged version or a later one that
        was sent without an acknowledgement; untouched blocks keep the original data. The
        number of acknowledged writes."""
        total = 0
        with open(final, "rb") as f:
            for cid, (first, nblocks, _log) in enumerate(self.regions):
                acked: dict[int, int] = {}
                sent: dict[int, int] = {}
                lines = self.lines(cid)
                assert lines and lines[0] == "C", (cid, lines[:3])
                assert lines[-1] == "D", (cid, lines[-3:])
                for line in lines:
                    if line[:2] in ("S ", "A "):
                        _, b, v = line.split()
                        (acked if line[0] == "A" else sent)[int(b)] = int(v)
                total += len(acked)
                for b in range(first, first + nblocks):
                    got = os.pread(f.fileno(), BS, b * BS)
                    ok = {block_data(cid, b, acked[b])} if b in acked else \
                        {original[b * BS:(b + 1) * BS]}
                    if sent.get(b, 0) > acked.get(b, 0):
                        ok.add(block_data(cid, b, sent[b]))
                    assert got in ok, (cid, b, acked.get(b), sent.get(b), got[:16])
        return total


def test_writers_racing_the_migration(pair, make_file, tmp_path):
    """8 clients write random blocks of their own regions from before the mirror starts until
    the endgame disconnects them; the first pass is slowed down so they race it."""
    size = 32 * MiB
    src_file = make_file(0, data=b"")
    sparse_file(src_file, size, pieces=256, piece=64 * KiB, seed=8)   # half data, half holes
    original = src_file.read_bytes()
    p = pair(src_file)
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")
    writers = Writers(tmp_path, p.src.port)
    try:
        region = size // BS // 8
        for i in range(8):
            # half a region each, spread over the whole export
            writers.start(i * region, region // 2, seconds=90)
        assert wait_until(lambda: all(writers.acked(i) >= 20 for i in range(8)), 60), \
            [writers.lines(i)[-2:] for i in range(8)]
        assert mirror_request(p.src, p.dst.port, max_bps=16 * MiB) == "0: Mirror started\n"
        assert_completed(p, timeout=120)
        writers.wait(60)
        for i in range(8):
            assert writers.lines(i)[-2].startswith("E "), (i, writers.lines(i)[-3:])
        acked = writers.check_model(original, p.src_file)
        assert acked > 100
    finally:
        writers.kill()


def test_writer_that_never_stops(pair, make_file, tmp_path):
    """A client writing as fast as it can all over the export does not keep the migration from
    converging: the endgame disconnects it."""
    size = 32 * MiB
    src_file = make_file(size)
    original = src_file.read_bytes()
    p = pair(src_file)
    writers = Writers(tmp_path, p.src.port)
    try:
        writers.start(0, size // BS, seconds=600)
        assert wait_until(lambda: writers.acked(0) >= 50, 60)
        started = time.monotonic()
        assert mirror_request(p.src, p.dst.port) == "0: Mirror started\n"
        assert_completed(p, timeout=120)
        assert time.monotonic() - started < 120
        writers.wait(60)
        assert writers.lines(0)[-2].startswith("E ")
        writers.check_model(original, p.src_file)
    finally:
        writers.kill()


def test_writer_that_never_stops_with_a_speed_limit(pair, make_file, tmp_path):
    """The same under a speed limit the writer outpaces: the dirty data never shrinks below
    5 s worth at the limit, so the mirror must stop waiting for it (0.5.0 sent at full speed
    once its dirty log filled). 8 MiB at 1 MB/s: one pass takes about 8 s; converging must not
    take more than a few passes (45 s here, five of them)."""
    size = 8 * MiB
    src_file = make_file(size)
    original = src_file.read_bytes()
    p = pair(src_file)
    writers = Writers(tmp_path, p.src.port)
    try:
        writers.start(0, size // BS, seconds=600)
        assert wait_until(lambda: writers.acked(0) >= 50, 60)
        assert mirror_request(p.src, p.dst.port, max_bps=1_000_000) == "0: Mirror started\n"
        assert_completed(p, timeout=45)
        writers.wait(60)
        writers.check_model(original, p.src_file)
    finally:
        writers.kill()


def test_qemu_io_writes_during_a_slow_first_pass(pair, make_file):
    """Writes that land behind and ahead of the first pass (qemu-io, acknowledged before the
    endgame) all reach the destination."""
    qemu_io = require_tool("qemu-io")
    size = 16 * MiB
    p = pair(make_file(size))
    assert mirror_request(p.src, p.dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    rng = random.Random(7)
    done = 0
    for _ in range(6):
        cmds = []
        for _ in range(8):
            off = rng.randrange(size // BS) * BS
            cmds += ["-c", f"write -P {rng.randrange(1, 255)} {off} 4k"]
        res = subprocess.run([qemu_io, "-f", "raw", *cmds, f"nbd://127.0.0.1:{p.src.port}"],
                             capture_output=True, timeout=60)
        if res.returncode != 0 or b"error" in res.stdout.lower() + res.stderr.lower():
            break                    # the endgame came: clients are refused now
        done += 1
        time.sleep(0.3)
    assert done >= 2, p.src.log()
    assert_completed(p)


def test_client_vanishing_mid_payload_during_the_migration(pair, make_file):
    """A client sends a 4 MiB WRITE into a range the first pass already sent, but only 2.5 MiB
    of its payload, and goes away. What of it landed in the source file must reach the
    destination too (SPEC 6.3: the destination equals the source's final content)."""
    size = 16 * MiB
    p = pair(make_file(size))
    assert mirror_request(p.src, p.dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    time.sleep(1.0)           # the first 4 MB at least are on the destination by now
    with raw_client(p.src.port) as s:
        s.sendall(wire.pack_request(wire.CMD_WRITE, 0, 4 * MiB, cookie=1)
                  + b"\xab" * (5 * MiB // 2))
        time.sleep(0.3)
    assert wait_until(lambda: "went away in the middle of a request" in p.src.log(), 10), \
        p.src.log()
    assert_completed(p)


def test_trims_and_zeroes_during_the_first_pass(pair, make_file):
    """TRIM and WRITE_ZEROES (qemu-io discard, write -z) on data the first pass already sent
    or has yet to send, mixed with writes into holes and data: all of it reaches the
    destination."""
    qemu_io = require_tool("qemu-io")
    size = 16 * MiB
    src_file = make_file(0, data=b"")
    sparse_file(src_file, size, pieces=128, piece=64 * KiB, seed=12)    # half data, half holes
    p = pair(src_file)
    assert wait_until(lambda: cu.status(p.src.sock)["allocation_map_method"] != "pending")
    assert mirror_request(p.src, p.dst.port, max_bps=4 * MiB) == "0: Mirror started\n"
    rng = random.Random(11)
    done = 0
    for _ in range(8):
        cmds = []
        for _ in range(6):
            off = rng.randrange(size // BS - 16) * BS
            length = rng.choice([4096, 65536])
            op = rng.choice(["write -P 170", "write -z", "discard", "write -z -u"])
            cmds += ["-c", f"{op} {off} {length}"]
        res = subprocess.run([qemu_io, "-f", "raw", *cmds, f"nbd://127.0.0.1:{p.src.port}"],
                             capture_output=True, timeout=60)
        if res.returncode != 0 or b"error" in res.stdout.lower() + res.stderr.lower():
            break
        done += 1
        time.sleep(0.25)
    assert done >= 2, p.src.log()
    assert_completed(p)


def test_idle_and_handshaking_clients_do_not_hold_up_the_endgame(pair, make_file):
    """A client that sends no request and one still in the handshake are disconnected at the
    endgame at once, not after the 10 s stop grace."""
    p = pair(make_file(4 * MiB))
    idle = cu.connect("127.0.0.1", p.src.port)
    shy = cu.connect("127.0.0.1", p.src.port)
    try:
        from flexnbd.handshake import client_handshake

        client_handshake(idle)
        assert cu.greets(shy)
        assert wait_until(lambda: cu.status(p.src.sock)["num_clients"] == "2", 10)
        started = time.monotonic()
        res = mirror_cli(p.src, p.dst.port)
        assert res.returncode == 0, out(res)
        assert_completed(p, timeout=30)
        assert time.monotonic() - started < 8, p.src.log()
        assert cu.closed_without_a_byte(idle, 5)
    finally:
        idle.close()
        shy.close()


def test_mirror_while_the_allocation_map_is_built(pair, tmp_path):
    """The mirror waits for the map; writes into holes while it is being built arrive too."""
    qemu_io = require_tool("qemu-io")
    size = 64 * MiB
    src_file = tmp_path / "src.img"
    sparse_file(src_file, size, pieces=400, piece=16 * KiB, seed=3)
    slow = {"FLEXNBD_ALLOCMAP_METHOD": "seek", "FLEXNBD_ALLOCMAP_DELAY_MS": "5"}
    p = pair(src_file, src_env=slow)
    assert cu.status(p.src.sock)["allocation_map_method"] == "pending"
    cmds = []
    for i in range(20):
        cmds += ["-c", f"write -P {i + 1} {(i * 3 + 1) * MiB + 4096} 8192"]
    res = subprocess.run([qemu_io, "-f", "raw", *cmds, f"nbd://127.0.0.1:{p.src.port}"],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)


def test_bind_address_and_the_listeners_acl(pair, make_file):
    """The listener allows only 127.0.0.2: the mirror is rejected from 127.0.0.1 and completes
    with --bind 127.0.0.2."""
    p = pair(make_file(4 * MiB), dst_args=("127.0.0.2",))
    res = mirror_cli(p.src, p.dst.port)
    assert (res.returncode, res.stderr) == \
        (1, b"Mirror was rejected\nthe peer closed the connection during the handshake\n"), \
        out(res)
    res = mirror_cli(p.src, p.dst.port, "--bind", "127.0.0.2")
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert_completed(p)
    assert "127.0.0.2:" in p.dst.log()


def test_ipv6(start_server, make_file, tmp_path):
    if not cu.ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    size = 4 * MiB
    src_file = make_file(size)
    dst_file = tmp_path / "dst6.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    dst = start_server(dst_file, mode="listen", host="::1")
    src = start_server(src_file, host="::1")
    res = mirror_cli(src, dst.port, host="::1")
    assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
    assert_completed(Pair(src, dst, src_file, dst_file))


def test_a_listener_has_nothing_to_mirror(start_server, make_file):
    dst = start_server(make_file(MiB, random=False), mode="listen")
    other = start_server(make_file(MiB, random=False), mode="listen")
    assert mirror_request(dst, other.port) == "1: Mirroring abandoned\n"
    assert cu.status(dst.sock)["is_mirroring"] == "false"
    assert "connected" not in other.log().split("serving", 1)[-1]


# --------------------------------------------------------------------------------------------
# speed limit

def test_speed_limit(pair, make_file, run_flexnbd):
    size = 64 * MiB
    limit = 20_000_000
    p = pair(make_file(size))
    started = time.monotonic()
    assert mirror_request(p.src, p.dst.port, max_bps=limit) == "0: Mirror started\n"
    speeds = []
    deadline = started + 60
    updated = None
    while running(p.src) and time.monotonic() < deadline:
        st = status_or_none(p.src)
        if st is None or st["is_mirroring"] != "true":
            break
        if int(st["migration_duration"]) >= 1:
            speeds.append(int(st["migration_speed"]))
        if updated is None:
            res = run_flexnbd("mirror-speed", "--sock", str(p.src.sock), "--max-speed",
                              str(limit))
            updated = (res.returncode, res.stdout, res.stderr)
        time.sleep(0.2)
    assert_completed(p)
    elapsed = time.monotonic() - started
    assert updated == (0, b"updated\n", b""), updated
    assert speeds, p.src.log()
    assert max(speeds) < 2 * limit, speeds
    assert elapsed >= size / limit / 2, elapsed


def test_speed_limit_applies_from_the_start(pair, make_file):
    """The limit holds from the first second on: a whole 8 MiB chunk sent at once, with the
    pause only after it, is 4x a 2 MB/s limit in the first second (measured on the wire)."""
    size = 8 * MiB
    limit = 2_000_000
    p = pair(make_file(size))
    with Relay(p.dst.port) as relay:
        started = time.monotonic()
        assert mirror_request(p.src, relay.port, max_bps=limit) == "0: Mirror started\n"
        samples = []
        while time.monotonic() - started < 1.5 and running(p.src):
            samples.append((round(time.monotonic() - started, 2), relay.up_total))
            time.sleep(0.05)
        assert_completed(p)
    # Allow twice the limit plus the handshake, request headers and 256 KiB of slack.
    late = [(t, n) for t, n in samples if n > 2 * limit * max(t, 0.5) + 256 * KiB]
    assert not late, samples


def test_mirror_speed_raises_and_lowers_the_limit(pair, make_file, run_flexnbd):
    """`mirror-speed` changes the limit of the running migration, and a raised limit takes
    effect promptly (not only after a pause computed at the old limit has run out)."""
    size = 16 * MiB
    p = pair(make_file(size))
    res = run_flexnbd("mirror-speed", "--sock", str(p.src.sock), "--max-speed", "1000")
    assert (res.returncode, res.stderr) == (1, b"Not currently mirroring\n"), out(res)
    assert mirror_request(p.src, p.dst.port, max_bps=500_000) == "0: Mirror started\n"
    time.sleep(1.0)
    st = cu.status(p.src.sock)
    assert st["is_mirroring"] == "true" and st["migration_speed_limit"] == "500000", st
    res = run_flexnbd("mirror-speed", "-s", str(p.src.sock), "-m", "400000")
    assert (res.returncode, res.stdout) == (0, b"updated\n"), out(res)
    assert cu.status(p.src.sock)["migration_speed_limit"] == "400000"
    started = time.monotonic()
    res = run_flexnbd("mirror-speed", "-s", str(p.src.sock), "-m", "0")     # no limit
    assert (res.returncode, res.stdout) == (0, b"updated\n"), out(res)
    assert "migration_speed_limit" not in (status_or_none(p.src) or {})
    # At 400 kB/s the rest would take about 40 s; unlimited, well under a second.
    assert_completed(p, timeout=60)
    assert time.monotonic() - started < 5, time.monotonic() - started


# --------------------------------------------------------------------------------------------
# interop with flexnbd 0.5.0

def test_mirror_into_a_050_oldstyle_listener(start_server, tmp_path):
    """Our mirror into a listener that knows only READ/WRITE/DISC and the oldstyle greeting:
    holes go as zero-filled WRITEs, never WRITE_ZEROES; the data arrives whole."""
    size = 32 * MiB
    src_file = tmp_path / "src.img"
    data = sparse_file(src_file, size, pieces=16, piece=128 * KiB, seed=5)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    src = start_server(src_file)
    with FakeDest.old050(size, dst_file) as dest:
        res = mirror_cli(src, dest.port)
        assert (res.returncode, res.stdout) == (0, b"Mirror started\n"), out(res)
        assert wait_exit(src) == 0, src.log()
        assert dest.wait(lambda: dest.completed), dest.conns
        conn = dest.conns[-1]
        assert conn.unexpected == []
        assert conn.count(wire.CMD_WRITE_ZEROES) == 0
        assert all(r.cookie == int.from_bytes(b".MIRROR.", "big") for r in conn.requests)
        assert all(r.length <= 8 * MiB for r in conn.requests)
        assert conn.payload_bytes == size       # the whole disk, holes as zeroes
        assert conn.disc
    assert same_files(src_file, dst_file)
    assert allocated(dst_file) <= data + MiB


def test_050_sender_into_listen_oldstyle(start_server, tmp_path):
    """A 0.5.0-like sender (oldstyle greeting, the whole disk as WRITEs with cookie .MIRROR.,
    zeroes included, then DISC) completes a migration into `listen --oldstyle`."""
    size = 16 * MiB
    src_file = tmp_path / "src.img"
    data = sparse_file(src_file, size, pieces=8, piece=256 * KiB, seed=9)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    dst = start_server(dst_file, "--oldstyle", mode="listen")
    assert cu.status(dst.sock)["handshake"] == "oldstyle"
    stats = send_disk("127.0.0.1", dst.port, src_file)
    assert stats.zero_requests > 0 and stats.bytes_sent > size
    assert wait_exit(dst) == 0, dst.log()
    assert same_files(src_file, dst_file)
    # The zeroes that were sent did not allocate anything.
    assert allocated(dst_file) <= data + MiB, (allocated(dst_file), data)


def test_050_sender_with_small_chunks(start_server, tmp_path):
    """The same with 4 KiB requests and a file that is not a multiple of 4 KiB."""
    size = 1 * MiB + 1536
    src_file = tmp_path / "src.img"
    src_file.write_bytes(os.urandom(size))
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    dst = start_server(dst_file, "--oldstyle", mode="listen")
    send_disk("127.0.0.1", dst.port, src_file, chunk=4096)
    assert wait_exit(dst) == 0, dst.log()
    assert same_files(src_file, dst_file)


def test_mirror_into_listen_oldstyle(pair, make_file):
    """Our own mirror into our oldstyle listener (no WRITE_ZEROES offered)."""
    p = pair(make_file(8 * MiB), dst_args=("--oldstyle",))
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)
    assert "oldstyle" in p.src.log()

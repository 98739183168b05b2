"""Sparse files end to end against real `flexnbd serve` processes and real clients: the
allocation map as clients see it (BLOCK_STATUS through nbdinfo, qemu-img, python-nbd and raw
sockets), holes that stay holes (sparse writes, TRIM, WRITE_ZEROES), OFFSET_HOLE reads, and a
map built in the background (readiness not delayed, writes during the build end up marked).

The reference layout is always a fresh SEEK_DATA/SEEK_HOLE scan of the served file, at the
server's 4 KiB granularity.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import require_python_nbd, require_tool
from tests.support import layout
from tests.support.rawclient import recv_exact

BS = 4096
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SCRIPT = Path(__file__).with_name("scripts") / "sparse_nbd.py"
BUILT = re.compile(r"allocation map: built with (\w+) in (\d+) ms")

_spec = importlib.util.spec_from_file_location("sparse_nbd", SCRIPT)
assert _spec is not None and _spec.loader is not None
sparse_nbd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sparse_nbd)
pattern = sparse_nbd.pattern

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


# -- the reference and the file ----------------------------------------------------------------

def seek_scan(path: Path, size: int) -> list[tuple[int, int]]:
    """[(start, end)] data extents below ``size``, from SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return layout.seek_scan(fd, size)
    finally:
        os.close(fd)


def block_runs(data, size: int, start: int = 0, end: int | None = None):
    return merge(layout.block_runs(data, size, start, end))


def merge(runs):
    out: list[tuple[int, int, bool]] = []
    for off, n, state in runs:
        if n == 0:
            continue
        if out and out[-1][2] == state and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, state)
        else:
            out.append((off, n, state))
    return out


def state_at(runs, offset: int) -> bool:
    """Whether the runs say the byte at offset is allocated."""
    for off, n, state in runs:
        if off <= offset < off + n:
            return state
    raise AssertionError(f"{offset} is not described")


def expected_map(path: Path, export_size: int):
    return block_runs(seek_scan(path, export_size), export_size)


def fiemap_method(path: Path) -> str:
    """The method the server picks by itself: fiemap where the file system answers
    FS_IOC_FIEMAP, else seek."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, 0xC020660B, bytearray(struct.pack("=QQIIII", 0, 1 << 63, 0, 0, 0, 0)))
    except OSError:
        return "seek"
    finally:
        os.close(fd)
    return "fiemap"


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def make_sparse(path: Path, size: int, places: list[tuple[int, int]], seed: int = 1) -> Path:
    """A sparse file of ``size`` bytes with random data at the given (offset, length) places."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, n) in enumerate(places):
            f.seek(off)
            f.write(pattern(seed * 1000 + i, n))
    return path


def punch(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        layout.punch_fd(fd, offset, length)
    finally:
        os.close(fd)


def file_bytes(path: Path, offset: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


# A 48 MiB + 2.5 KiB file (the last block is partial; the size is a multiple of 512 so the whole
# file is exported): data aligned and not, runs of blocks, a block-sized write straddling two
# blocks, data in the last partial block.
LAYOUT_SIZE = 48 * MiB + 2560
LAYOUT = [(0, 100), (3 * BS, 5 * BS), (1 * MiB + 1000, 3000), (2 * MiB - 10, 20),
          (7 * MiB, 1 * MiB), (20 * MiB + 4095, BS), (33 * MiB, 300 * KiB + 7),
          (LAYOUT_SIZE - 1000, 1000)]


@pytest.fixture
def layout_file(tmp_path) -> Path:
    return make_sparse(tmp_path / "layout.img", LAYOUT_SIZE, LAYOUT)


def wait_built(server, timeout: float = 60.0) -> str:
    """Poll the server's log until the map is built; the method it names."""
    deadline = time.monotonic() + timeout
    while True:
        found = BUILT.search(server.log())
        if found:
            return found.group(1)
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}:\n{server.log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"allocation map not built after {timeout} s:\n{server.log()}")
        time.sleep(0.05)


def is_built(server) -> bool:
    return BUILT.search(server.log()) is not None


# -- real clients -------------------------------------------------------------------------------

def run(args: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stderr}"
    return result


def nbdinfo_map(uri: str) -> list[tuple[int, int, bool]]:
    out = run([require_tool("nbdinfo"), "--map", "--json", uri]).stdout
    entries = json.loads(out)
    for e in entries:
        assert e["type"] in (0, 3), e
    return merge([(e["offset"], e["length"], e["type"] == 0) for e in entries])


def nbdinfo_map_text(uri: str) -> list[tuple[int, int, bool]]:
    out = run([require_tool("nbdinfo"), "--map", uri]).stdout
    runs = []
    for line in out.splitlines():
        off, n, typ, *desc = line.split()
        assert (int(typ), " ".join(desc)) in ((0, "data"), (3, "hole,zero")), line
        runs.append((int(off), int(n), int(typ) == 0))
    return merge(runs)


def qemu_map(uri: str) -> list[tuple[int, int, bool]]:
    out = run([require_tool("qemu-img"), "map", "--output=json", "-f", "raw", uri]).stdout
    entries = json.loads(out)
    for e in entries:
        assert e["zero"] == (not e["data"]), e
    return merge([(e["start"], e["length"], e["data"]) for e in entries])


def qemu_io(uri: str, *commands: str) -> str:
    args = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(args + [uri]).stdout
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def nbd_program(prog: dict, timeout: float = 60) -> dict:
    python = require_python_nbd()
    result = subprocess.run([python, str(SCRIPT)], input=json.dumps(prog), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def nbd_ops(uri: str, ops: list, **settings) -> tuple[dict, list]:
    out = nbd_program({"mode": "ops", "uri": uri, "ops": ops, **settings})
    return out["info"], out["results"]


def bs_runs(extents: list, offset: int) -> list[tuple[int, int, bool]]:
    runs = []
    for n, flags in extents:
        assert flags in (0, wire.STATE_HOLE | wire.STATE_ZERO), extents
        runs.append((offset, n, flags == 0))
        offset += n
    return merge(runs)


# -- a raw client (flexnbd.wire), for what libraries do not let one do -------------------------

class Raw:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.cookie = 0
        self.size = 0
        self.flags = 0
        magic, second, hs = struct.unpack(">QQH", self.recv(18))
        assert (magic, second) == (wire.NBDMAGIC, wire.IHAVEOPT)
        cflags = wire.FLAG_C_FIXED_NEWSTYLE | (hs & wire.FLAG_NO_ZEROES and wire.FLAG_C_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(wire.pack_option(opt, data))
        replies = []
        while True:
            magic, o, typ, n = wire.unpack_option_reply_header(
                self.recv(wire.OPTION_REPLY_HEADER_SIZE))
            assert magic == wire.OPTION_REPLY_MAGIC and o == opt
            replies.append((typ, self.recv(n)))
            if typ == wire.REP_ACK or wire.is_error_reply(typ):
                return replies

    @staticmethod
    def meta_request(*queries: bytes) -> bytes:
        return (struct.pack(">II", 0, len(queries))
                + b"".join(struct.pack(">I", len(q)) + q for q in queries))

    def go(self) -> None:
        replies = self.option(wire.OPT_GO, struct.pack(">IH", 0, 0))
        assert replies[-1][0] == wire.REP_ACK, replies
        for typ, data in replies:
            if typ == wire.REP_INFO and struct.unpack_from(">H", data)[0] == wire.INFO_EXPORT:
                self.size, self.flags = struct.unpack_from(">QH", data, 2)

    def request(self, cmd: int, offset: int, length: int, flags: int = 0,
                payload: bytes = b"") -> int:
        self.cookie += 1
        self.sock.sendall(wire.pack_request(cmd, offset, length, self.cookie, flags) + payload)
        return self.cookie

    def reply(self, read_length: int = 0):
        """("simple", error, data) or ("structured", [(flags, type, payload)])."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == wire.SIMPLE_REPLY_MAGIC:
            _, error, cookie = wire.unpack_simple_reply(struct.pack(">I", magic) + self.recv(12))
            assert cookie == self.cookie
            return "simple", error, self.recv(read_length) if not error else b""
        chunks = []
        while True:
            assert magic == wire.STRUCTURED_REPLY_MAGIC, hex(magic)
            head = wire.unpack_chunk_header(struct.pack(">I", magic) + self.recv(16))
            assert head.cookie == self.cookie
            chunks.append((head.flags, head.type, self.recv(head.length)))
            if head.flags & wire.REPLY_FLAG_DONE:
                return "structured", chunks
            (magic,) = struct.unpack(">I", self.recv(4))


def reply_error(reply) -> int:
    """The NBD error of a reply without data (0 for success)."""
    if reply[0] == "simple":
        return reply[1]
    for _, typ, payload in reply[1]:
        if typ in (wire.REPLY_TYPE_ERROR, wire.REPLY_TYPE_ERROR_OFFSET):
            return struct.unpack_from(">I", payload)[0]
    return 0


# -- the map as clients see it ------------------------------------------------------------------

def test_nbdinfo_map_equals_the_file_layout(serve, layout_file):
    server = serve(layout_file)
    assert wait_built(server) == fiemap_method(layout_file)
    want = expected_map(layout_file, LAYOUT_SIZE)
    assert any(not a for _, _, a in want) and any(a for _, _, a in want)
    # the layout itself, independently of the scan: every place written is data
    for off, n in LAYOUT:
        for o, m, a in want:
            if o < off + n and off < o + m:
                assert a, (off, n)
    assert nbdinfo_map(server.uri) == want
    assert nbdinfo_map_text(server.uri) == want
    # the -v log reports the method and what the map found
    data_bytes = sum(n for _, n, a in want if a)
    assert f"{data_bytes} of {LAYOUT_SIZE} bytes allocated" in server.log()


def test_qemu_img_map_agrees(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    assert qemu_map(server.uri) == expected_map(layout_file, LAYOUT_SIZE)


def test_convert_and_nbdcopy_make_sparse_identical_copies(serve, layout_file, tmp_path):
    server = serve(layout_file)
    wait_built(server)
    source = file_bytes(layout_file)
    data_bytes = sum(n for _, n, a in expected_map(layout_file, LAYOUT_SIZE) if a)
    assert data_bytes < LAYOUT_SIZE // 8
    converted = tmp_path / "converted.raw"
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", server.uri,
         str(converted)])
    copied = tmp_path / "copied.raw"
    run([require_tool("nbdcopy"), server.uri, str(copied)])
    for out in (converted, copied):
        assert file_bytes(out) == source, out.name
        # about the data size, not the file size (the file system may add metadata blocks)
        assert allocated(out) <= data_bytes + 256 * KiB, (out.name, allocated(out), data_bytes)
        assert allocated(out) >= sum(n for _, n in LAYOUT) // 2


def test_discard_shrinks_the_served_file(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    before = allocated(layout_file)
    qemu_io(server.uri, f"discard {7 * MiB} {1 * MiB}")
    assert allocated(layout_file) <= before - 1 * MiB + 64 * KiB
    assert file_bytes(layout_file, 7 * MiB, MiB) == bytes(MiB)
    want = expected_map(layout_file, LAYOUT_SIZE)
    assert (7 * MiB, 1 * MiB, True) not in want
    assert nbdinfo_map(server.uri) == want
    qemu_io(server.uri, f"read -P 0 {7 * MiB} {1 * MiB}")


def test_zero_pattern_write_onto_hole_allocates_nothing(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    before_blocks = allocated(layout_file)
    before_map = expected_map(layout_file, LAYOUT_SIZE)
    # onto a hole: nothing is written
    qemu_io(server.uri, f"write -P 0 {10 * MiB} {2 * MiB}", f"write -P 0 {12 * MiB + BS} {BS}")
    assert allocated(layout_file) == before_blocks
    assert expected_map(layout_file, LAYOUT_SIZE) == before_map
    assert nbdinfo_map(server.uri) == before_map
    qemu_io(server.uri, f"read -P 0 {10 * MiB} {2 * MiB}")
    # onto data: zeroes are written (and the blocks stay allocated)
    assert file_bytes(layout_file, 7 * MiB, 64 * KiB) != bytes(64 * KiB)
    qemu_io(server.uri, f"write -P 0 {7 * MiB} {64 * KiB}")
    assert file_bytes(layout_file, 7 * MiB, 64 * KiB) == bytes(64 * KiB)
    assert file_bytes(layout_file, 7 * MiB + 64 * KiB, 16) != bytes(16)
    qemu_io(server.uri, f"read -P 0 {7 * MiB} {64 * KiB}")
    assert nbdinfo_map(server.uri) == expected_map(layout_file, LAYOUT_SIZE)


def test_partly_zero_write_onto_hole_allocates_only_nonzero_blocks(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    base = 40 * MiB
    assert block_runs(seek_scan(layout_file, LAYOUT_SIZE), LAYOUT_SIZE, base,
                      base + 2 * MiB) == [(base, 2 * MiB, False)]
    payload = sparse_nbd.partly_zero(77, 64)
    nonzero = [i for i in range(64) if payload[i * BS:(i + 1) * BS] != bytes(BS)]
    assert 0 < len(nonzero) < 64
    # and an unaligned one: non-zero partial edge blocks, two zero blocks, one data block
    unaligned_off = base + 1 * MiB + 100
    unaligned = pattern(6, BS - 100) + bytes(2 * BS) + pattern(5, BS) + pattern(7, 50)
    before = allocated(layout_file)
    assert nbd_ops(server.uri, [["write_mixed", base, 77, 64]])[1] == ["ok"]
    raw = Raw(server.port)
    try:
        raw.go()
        raw.request(wire.CMD_WRITE, unaligned_off, len(unaligned), payload=unaligned)
        assert raw.reply()[1] == 0
    finally:
        raw.close()
    assert file_bytes(layout_file, base, len(payload)) == payload
    assert file_bytes(layout_file, unaligned_off, len(unaligned)) == unaligned
    data = seek_scan(layout_file, LAYOUT_SIZE)
    got = block_runs(data, LAYOUT_SIZE, base, base + 2 * MiB)
    first = unaligned_off // BS * BS
    want_blocks = ([(base + i * BS, base + (i + 1) * BS) for i in nonzero]
                   + [(first, first + BS), (first + 3 * BS, first + 5 * BS)])
    assert got == block_runs(want_blocks, LAYOUT_SIZE, base, base + 2 * MiB)
    grown = allocated(layout_file) - before
    assert (len(nonzero) + 3) * BS <= grown <= (len(nonzero) + 3) * BS + 8 * KiB, grown
    assert nbdinfo_map(server.uri) == expected_map(layout_file, LAYOUT_SIZE)


def test_write_zeroes_with_unmap_leaves_a_hole(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    before = allocated(layout_file)
    qemu_io(server.uri, f"write -z -u {7 * MiB} {512 * KiB}")       # onto data: punched
    assert allocated(layout_file) <= before - 512 * KiB + 16 * KiB
    qemu_io(server.uri, f"write -z -u {12 * MiB} {512 * KiB}")      # onto a hole: still one
    qemu_io(server.uri, f"read -P 0 {7 * MiB} {512 * KiB}", f"read -P 0 {12 * MiB} {512 * KiB}")
    assert file_bytes(layout_file, 7 * MiB, 512 * KiB) == bytes(512 * KiB)
    want = expected_map(layout_file, LAYOUT_SIZE)
    assert block_runs(seek_scan(layout_file, LAYOUT_SIZE), LAYOUT_SIZE, 7 * MiB,
                      7 * MiB + 512 * KiB) == [(7 * MiB, 512 * KiB, False)]
    assert nbdinfo_map(server.uri) == want


def test_write_zeroes_without_unmap_reads_zeroes_and_keeps_blocks(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    before = allocated(layout_file)
    qemu_io(server.uri, f"write -z {7 * MiB} {512 * KiB}")          # NO_HOLE onto data
    qemu_io(server.uri, f"read -P 0 {7 * MiB} {512 * KiB}")
    assert file_bytes(layout_file, 7 * MiB, 512 * KiB) == bytes(512 * KiB)
    assert allocated(layout_file) >= before, "NO_HOLE zeroes must not punch"
    # still described as data (the blocks were not punched)
    bs = nbd_ops(server.uri, [["bs", 7 * MiB, 512 * KiB, False]])[1][0]
    assert bs["extents"] == [[512 * KiB, 0]]
    # onto a hole it reads back zeroes too
    qemu_io(server.uri, f"write -z {12 * MiB + 100} {10000}", f"read -P 0 {12 * MiB} {MiB}")


# -- BLOCK_STATUS with python-nbd ---------------------------------------------------------------

def test_block_status_python_nbd(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    want = expected_map(layout_file, LAYOUT_SIZE)
    rng = random.Random(3)
    ranges = [(0, LAYOUT_SIZE), (0, 1), (100, 5000), (3 * BS + 1, 5 * BS), (LAYOUT_SIZE - 1, 1),
              (LAYOUT_SIZE - 5000, 5000), (7 * MiB - 1, MiB + 2), (20 * MiB, 2 * BS)]
    ranges += [(o, rng.randint(1, LAYOUT_SIZE - o))
               for o in (rng.randrange(LAYOUT_SIZE) for _ in range(20))]
    ops = []
    for off, n in ranges:
        ops += [["bs", off, n, False], ["bs", off, n, True]]
    ops += [["bs", LAYOUT_SIZE, BS, False], ["bs", LAYOUT_SIZE - BS, 2 * BS, False],
            ["bs", LAYOUT_SIZE + 10 * MiB, 1, True], ["sha", 0, LAYOUT_SIZE],
            ["map", 0, LAYOUT_SIZE]]
    info, results = nbd_ops(server.uri, ops, strict_bounds=False)
    assert info == {"size": LAYOUT_SIZE, "structured": True, "can_meta": True}
    for i, (off, n) in enumerate(ranges):
        full, one = results[2 * i], results[2 * i + 1]
        exp = block_runs(seek_scan(layout_file, LAYOUT_SIZE), LAYOUT_SIZE, off, off + n)
        # never beyond the request, and the whole request described (few extents here)
        assert sum(e[0] for e in full["extents"]) == n, (off, n, full)
        assert bs_runs(full["extents"], off) == exp, (off, n)
        assert len(full["calls"]) == 1 and full["calls"][0][0] == off
        assert len(one["extents"]) == 1, (off, n, one)
        length, flags = one["extents"][0]
        assert 0 < length <= n
        assert (off, length, flags == 0) == (off, exp[0][1], exp[0][2]), (off, n, one)
    past = results[2 * len(ranges):2 * len(ranges) + 3]
    assert past == [{"error": "EINVAL"}] * 3
    # still usable after the errors
    assert results[-2] == hashlib.sha256(file_bytes(layout_file)).hexdigest()
    assert [tuple(r) for r in merge((o, n, f == 0) for o, n, f in results[-1])] == want


def test_block_status_needs_structured_replies_and_a_context(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    # libnbd itself refuses without structured replies / without the context
    for settings in ({"structured": False}, {"meta": False}):
        info, results = nbd_ops(server.uri, [["bs", 0, BS, False], ["read", 0, 100, None]],
                                **settings)
        assert info["can_meta"] is False
        assert "error" in results[0]
    # on the wire: a BLOCK_STATUS after a plain GO is EINVAL, and the session stays in sync
    raw = Raw(server.port)
    try:
        raw.go()
        assert raw.size == LAYOUT_SIZE
        raw.request(wire.CMD_BLOCK_STATUS, 0, BS)
        reply = raw.reply()
        assert reply[0] == "simple" and reply[1] == wire.NBD_EINVAL
        raw.request(wire.CMD_READ, 0, 100)
        assert raw.reply(100) == ("simple", 0, file_bytes(layout_file, 0, 100))
    finally:
        raw.close()
    # structured replies but no context selected: EINVAL too
    raw = Raw(server.port)
    try:
        assert raw.option(wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
        raw.go()
        raw.request(wire.CMD_BLOCK_STATUS, 0, BS)
        assert reply_error(raw.reply()) == wire.NBD_EINVAL
    finally:
        raw.close()


def test_meta_context_negotiation(serve, layout_file):
    server = serve(layout_file)
    raw = Raw(server.port)
    try:
        # SET before STRUCTURED_REPLY: ERR_INVALID, and the session goes on
        replies = raw.option(wire.OPT_SET_META_CONTEXT, Raw.meta_request(wire.BASE_ALLOCATION))
        assert [t for t, _ in replies] == [wire.REP_ERR_INVALID]
        for queries in ((wire.BASE_ALLOCATION,), (), (b"base:",)):
            replies = raw.option(wire.OPT_LIST_META_CONTEXT, Raw.meta_request(*queries))
            assert [t for t, _ in replies] == [wire.REP_META_CONTEXT, wire.REP_ACK], queries
            assert replies[0][1][4:] == wire.BASE_ALLOCATION
        replies = raw.option(wire.OPT_LIST_META_CONTEXT, Raw.meta_request(b"qemu:dirty-bitmap:x"))
        assert [t for t, _ in replies] == [wire.REP_ACK]
        assert raw.option(wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
        replies = raw.option(wire.OPT_SET_META_CONTEXT, Raw.meta_request(wire.BASE_ALLOCATION))
        assert [t for t, _ in replies] == [wire.REP_META_CONTEXT, wire.REP_ACK]
        (context_id,) = struct.unpack_from(">I", replies[0][1])
        assert replies[0][1][4:] == wire.BASE_ALLOCATION
        raw.go()
        wait_built(server)
        raw.request(wire.CMD_BLOCK_STATUS, 0, 8 * BS)
        kind, chunks = raw.reply()
        assert kind == "structured" and len(chunks) == 1
        flags, typ, payload = chunks[0]
        assert typ == wire.REPLY_TYPE_BLOCK_STATUS and flags & wire.REPLY_FLAG_DONE
        assert struct.unpack_from(">I", payload)[0] == context_id
        extents = list(struct.iter_unpack(">II", payload[4:]))
        assert bs_runs(extents, 0) == block_runs(seek_scan(layout_file, LAYOUT_SIZE),
                                                 LAYOUT_SIZE, 0, 8 * BS)
    finally:
        raw.close()


def test_set_meta_context_replaces_the_selection(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    raw = Raw(server.port)
    try:
        assert raw.option(wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
        replies = raw.option(wire.OPT_SET_META_CONTEXT, Raw.meta_request(wire.BASE_ALLOCATION))
        assert [t for t, _ in replies] == [wire.REP_META_CONTEXT, wire.REP_ACK]
        # a second SET naming only an unknown context selects nothing
        replies = raw.option(wire.OPT_SET_META_CONTEXT, Raw.meta_request(b"base:nothing"))
        assert [t for t, _ in replies] == [wire.REP_ACK]
        raw.go()
        raw.request(wire.CMD_BLOCK_STATUS, 0, BS)
        assert reply_error(raw.reply()) == wire.NBD_EINVAL
    finally:
        raw.close()


def test_hole_in_the_last_partial_block(serve, tmp_path):
    size = 3 * MiB + 1536
    path = make_sparse(tmp_path / "tail.img", size, [(0, 10 * BS), (2 * MiB, 100)])
    server = serve(path)
    wait_built(server)
    want = [(0, 10 * BS, True), (10 * BS, 2 * MiB - 10 * BS, False), (2 * MiB, BS, True),
            (2 * MiB + BS, size - 2 * MiB - BS, False)]
    assert expected_map(path, size) == want
    assert nbdinfo_map(server.uri) == want
    assert qemu_map(server.uri) == want
    info, results = nbd_ops(server.uri, [["bs", size - 1536, 1536, True],
                                         ["bs", size - 10, 10, False],
                                         ["read", size - 3000, 3000, None]])
    assert results == [{"calls": [[size - 1536, [[1536, 3]]]], "extents": [[1536, 3]]},
                       {"calls": [[size - 10, [[10, 3]]]], "extents": [[10, 3]]}, True]
    raw = Raw(server.port)
    try:
        assert raw.option(wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
        raw.go()
        raw.request(wire.CMD_READ, size - 2 * BS, 2 * BS)
        kind, chunks = raw.reply()
        assert [(c[1], struct.unpack_from(">QI", c[2])) for c in chunks] == [
            (wire.REPLY_TYPE_OFFSET_HOLE, (size - 2 * BS, 2 * BS))]
        # all-zero writes onto holes write nothing: a whole block, and the partial last block
        # of the export (which the map counts as whole when a range reaches the end)
        before = allocated(path)
        raw.request(wire.CMD_WRITE, size - BS - 1536, BS, payload=bytes(BS))
        assert raw.reply()[1] == 0
        raw.request(wire.CMD_WRITE, size - 1536, 1536, payload=bytes(1536))
        assert raw.reply()[1] == 0
        assert file_bytes(path, size - 3 * BS) == bytes(3 * BS)
    finally:
        raw.close()
    map_after = nbdinfo_map(server.uri)
    assert map_after == expected_map(path, size)
    assert allocated(path) == before, "zero writes onto the hole at the end allocated blocks"
    assert map_after == want


def test_structured_read_answers_holes_with_offset_hole_chunks(serve, layout_file):
    server = serve(layout_file)
    wait_built(server)
    raw = Raw(server.port)
    try:
        assert raw.option(wire.OPT_STRUCTURED_REPLY)[-1][0] == wire.REP_ACK
        raw.go()
        for off, n in [(0, 64 * KiB), (1 * MiB - 5000, 12000), (6 * MiB + 3, 3 * MiB),
                       (LAYOUT_SIZE - 9000, 9000), (12 * MiB, 16 * KiB)]:
            raw.request(wire.CMD_READ, off, n)
            kind, chunks = raw.reply()
            assert kind == "structured"
            buf = bytearray(n)
            seen = []
            pos = off
            for i, (flags, typ, payload) in enumerate(chunks):
                assert bool(flags & wire.REPLY_FLAG_DONE) == (i == len(chunks) - 1)
                (at,) = struct.unpack_from(">Q", payload)
                assert at == pos, "chunks in order, back to back"
                if typ == wire.REPLY_TYPE_OFFSET_HOLE:
                    (length,) = struct.unpack_from(">I", payload, 8)
                    assert len(payload) == 12
                    seen.append((at, length, False))
                else:
                    assert typ == wire.REPLY_TYPE_OFFSET_DATA, typ
                    length = len(payload) - 8
                    buf[at - off:at - off + length] = payload[8:]
                    seen.append((at, length, True))
                pos += length
            assert pos == off + n
            assert bytes(buf) == file_bytes(layout_file, off, n)
            exp = block_runs(seek_scan(layout_file, LAYOUT_SIZE), LAYOUT_SIZE, off, off + n)
            # holes as OFFSET_HOLE chunks exactly where the map has holes
            assert merge(seen) == exp, (off, n)
        # DF: one OFFSET_DATA chunk even across holes
        raw.request(wire.CMD_READ, 6 * MiB, 3 * MiB, wire.CMD_FLAG_DF)
        kind, chunks = raw.reply()
        assert [c[1] for c in chunks] == [wire.REPLY_TYPE_OFFSET_DATA]
        assert chunks[0][2][8:] == file_bytes(layout_file, 6 * MiB, 3 * MiB)
    finally:
        raw.close()


# -- the map built in the background ------------------------------------------------------------

BIG_SIZE = 80 * GiB
BIG_EXTENTS = 8000          # with seek and 1 ms per extent: a build of about 9 s
BIG_STRIDE = BIG_SIZE // BIG_EXTENTS // BS * BS
SLOW = {"FLEXNBD_ALLOCMAP_METHOD": "seek", "FLEXNBD_ALLOCMAP_DELAY_MS": "1"}


def make_big(path: Path) -> Path:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.ftruncate(fd, BIG_SIZE)
        except OSError as e:
            pytest.skip(f"the file system here cannot hold an 80 GiB sparse file: {e}")
        block = pattern(4242, BS)
        for i in range(BIG_EXTENTS):
            os.pwrite(fd, block, i * BIG_STRIDE + (i % 7) * BS)
    finally:
        os.close(fd)
    return path


def test_readiness_is_not_delayed_by_the_map(serve, tmp_path):
    big = make_big(tmp_path / "big.img")
    started = time.monotonic()
    server = serve(big, env=SLOW)
    ready_after = time.monotonic() - started
    assert not is_built(server), "the slowed build should take seconds"
    # served at once: reads of data and of holes, writes into holes
    raw = Raw(server.port)
    try:
        raw.go()
        assert raw.size == BIG_SIZE
        raw.request(wire.CMD_READ, 5 * BIG_STRIDE + 5 * BS, BS)
        assert raw.reply(BS) == ("simple", 0, pattern(4242, BS))
        raw.request(wire.CMD_READ, 5 * BIG_STRIDE + MiB, 2 * BS)
        assert raw.reply(2 * BS) == ("simple", 0, bytes(2 * BS))
        during = [(3 * BIG_STRIDE + 2 * MiB, pattern(1, BS)),              # aligned, in a hole
                  (6000 * BIG_STRIDE + 3 * MiB + 123, pattern(2, 10000)),  # unaligned
                  (7990 * BIG_STRIDE + 5 * MiB, bytes(2 * BS)),            # zero blocks
                  (100 * BIG_STRIDE + 1 * MiB, sparse_nbd.partly_zero(9, 8))]
        for off, data in during:
            raw.request(wire.CMD_WRITE, off, len(data), payload=data)
            assert raw.reply()[1] == 0
        for off, data in during:
            raw.request(wire.CMD_READ, off, len(data))
            assert raw.reply(len(data)) == ("simple", 0, data)
    finally:
        raw.close()
    # BLOCK_STATUS while building: everything "allocated", conservatively
    info, results = nbd_ops(server.uri, [["bs", 2 * BIG_STRIDE, BIG_STRIDE, False],
                                         ["bs", 0, 64 * MiB, True]])
    assert not is_built(server), "the build finished too early to see BLOCK_STATUS during it"
    assert results[0]["extents"] == [[BIG_STRIDE, 0]]
    assert results[1]["extents"] == [[64 * MiB, 0]]
    # a TRIM while building
    trimmed = 4000 * BIG_STRIDE + (4000 % 7) * BS
    assert nbd_ops(server.uri, [["trim", trimmed, BS]])[1] == ["ok"]
    method = wait_built(server, timeout=90)
    build_ms = int(BUILT.search(server.log()).group(2))
    assert method == "seek"
    assert ready_after < build_ms / 1000 / 2, (ready_after, build_ms)
    want = expected_map(big, BIG_SIZE)
    got = nbdinfo_map(server.uri)
    assert got == want
    # the writes made during the build are marked (behind and ahead of the builder)
    for off, data in during:
        for b in range(off // BS * BS, off + len(data), BS):
            lo, hi = max(b, off), min(b + BS, off + len(data))
            if data[lo - off:hi - off] != bytes(hi - lo):
                assert state_at(got, b), (off, b)
    assert not state_at(got, trimmed)
    assert file_bytes(big, trimmed, BS) == bytes(BS)


def test_concurrent_writers_while_the_map_builds(serve, tmp_path):
    big = make_big(tmp_path / "big.img")
    clients = 4
    window = 16 * MiB
    windows = [(k * (BIG_SIZE // clients) + 3 * GiB + k * 5 * MiB, window)
               for k in range(clients)]
    initial = [file_bytes(big, off, n) for off, n in windows]
    server = serve(big, env=SLOW)
    python = require_python_nbd()
    stop = tmp_path / "stop"
    procs = []
    for k, (off, n) in enumerate(windows):
        prog = {"mode": "churn", "uri": server.uri, "seed": 11 + k, "window": [off, n],
                "stop_file": str(stop), "max_rounds": 400}
        prog_file = tmp_path / f"churn{k}.json"
        prog_file.write_text(json.dumps(prog))
        with open(prog_file) as stdin:
            procs.append(subprocess.Popen([python, str(SCRIPT)], stdin=stdin,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    try:
        wait_built(server, timeout=90)
    finally:
        stop.touch()
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
            outs.append(json.loads(stdout))
    for k, out in enumerate(outs):
        assert out["errors"] == [] and out["mismatches"] == 0, out
        assert out["rounds"] >= 2, "the writers should have run during the build"
        model = bytearray(initial[k])
        base = windows[k][0]
        for rnd in range(out["rounds"]):
            for op in sparse_nbd.churn_ops(11 + k, rnd, windows[k]):
                off, data = sparse_nbd.op_content(op)
                model[off - base:off - base + len(data)] = data
        digest = hashlib.sha256(model).hexdigest()
        assert out["sha256"] == out["model_sha256"] == digest
        assert file_bytes(big, *windows[k]) == bytes(model)
    # the final map equals a fresh scan, over the whole file
    want = expected_map(big, BIG_SIZE)
    assert nbdinfo_map(server.uri) == want
    for off, n in windows:
        info, results = nbd_ops(server.uri, [["map", off, n]])
        assert merge((o, m, f == 0) for o, m, f in results[0]) == block_runs(
            seek_scan(big, BIG_SIZE), BIG_SIZE, off, off + n)


# -- forced methods -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fiemap", "seek", "none"])
def test_forced_methods(serve, layout_file, tmp_path, method):
    server = serve(layout_file, env={"FLEXNBD_ALLOCMAP_METHOD": method})
    assert wait_built(server) == (fiemap_method(layout_file) if method == "fiemap" else method)
    want = expected_map(layout_file, LAYOUT_SIZE)
    if method == "none":
        want = [(0, LAYOUT_SIZE, True)]
    assert nbdinfo_map(server.uri) == want
    assert qemu_map(server.uri) == want
    out = tmp_path / "copy.raw"
    run([require_tool("nbdcopy"), server.uri, str(out)])
    assert file_bytes(out) == file_bytes(layout_file)
    info, results = nbd_ops(server.uri, [["sha", 0, LAYOUT_SIZE],
                                         ["bs", 6 * MiB, 3 * MiB, False]])
    assert results[0] == hashlib.sha256(file_bytes(layout_file)).hexdigest()
    exp = block_runs(seek_scan(layout_file, LAYOUT_SIZE), LAYOUT_SIZE, 6 * MiB, 9 * MiB)
    if method == "none":
        exp = [(6 * MiB, 3 * MiB, True)]
    assert bs_runs(results[1]["extents"], 6 * MiB) == exp

"""How READ data leaves the server: sendfile, or (for a client on this host with more than
one connection) a copy through the reply batch for reads up to 256 KiB, and (for a client on
this host, while that is the faster way) a send from a mapping of the file for longer ones;
remote clients always get sendfile. Either way the client gets the file's bytes, simple or
structured, holes or not.

Which path a READ took is seen in /proc/PID/io: sendfile counts a write system call
(syscw), a copy followed by send counts none. (A log line counts one too: the server logs a
client's arrival just after it is attached, so a few are allowed for.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.layout import punch_fd
from tests.support.rawclient import ServerClosed
from tests.support.serving import MiB, alive, client, content
from tests.support.waiting import wait_until

KiB = 1024
# Sizes around the limits: batched as small reads, copied with copy_reads, always sendfile.
SIZES = (4 * KiB, 16 * KiB + 1, 64 * KiB, 256 * KiB, 256 * KiB + 4 * KiB, MiB)


def io_count(pid: int, field: str) -> int:
    """A counter of /proc/PID/io (syscw: write system calls, sendfile among them; syscr:
    read system calls, pread among them, where a copy from the mapping counts none)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/PID/io")


def write_calls(pid: int) -> int:
    return io_count(pid, "syscw")


FEW = 3       # write calls that are not READs (log lines) in one sendfiles_for()


def sendfiles_for(server, c, reads: int = 20, length: int = 64 * KiB) -> int:
    """Write system calls the server made while answering READS reads of LENGTH bytes."""
    before = write_calls(server.pid)
    for i in range(reads):
        c.read(i * length, length)
    return write_calls(server.pid) - before


def sparse_file(make_file) -> Path:
    """4 MiB: data, a 1 MiB hole at 1 MiB, data, a 64 KiB hole inside the last MiB."""
    path = make_file(4 * MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_fd(fd, MiB, MiB)
        punch_fd(fd, 3 * MiB + 128 * KiB, 64 * KiB)
    finally:
        os.close(fd)
    return path


def read_everything(c, path: Path) -> None:
    """Every size at offsets that start in data, cross into a hole and end in one."""
    want = content(path)
    for length in SIZES:
        for offset in (0, MiB - 4 * KiB, MiB + 8 * KiB, 3 * MiB, 4 * MiB - length):
            assert c.read(offset, length) == want[offset:offset + length], (offset, length)


def test_one_connection_reads_with_sendfile(serve, make_file):
    server = serve(make_file(4 * MiB))
    with client(server) as c:
        assert sendfiles_for(server, c) >= 20


def test_a_second_local_connection_switches_to_copies_and_back(serve, make_file):
    server = serve(make_file(4 * MiB))
    with client(server) as first:
        with client(server) as second:
            # (the server attaches the second one just after its handshake reply)
            assert wait_until(lambda: sendfiles_for(server, first, reads=1) == 0)
            assert sendfiles_for(server, first) <= FEW
            assert sendfiles_for(server, second) <= FEW
            # beyond 256 KiB, still sendfile
            assert sendfiles_for(server, first, reads=3, length=MiB) >= 3
        # the second one's thread ends a moment after it closed
        assert wait_until(lambda: sendfiles_for(server, first, reads=5) >= 5)
        assert sendfiles_for(server, first) >= 20


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_both_paths_return_the_files_bytes(serve, make_file, structured):
    path = sparse_file(make_file)
    server = serve(path)
    with client(server, structured=structured) as c:
        read_everything(c, path)                 # sendfile
        with client(server) as other:
            assert wait_until(lambda: sendfiles_for(server, c, reads=1) == 0)
            read_everything(c, path)             # copies
            read_everything(other, path)
        assert c.request(3).error == 0           # (FLUSH: still in step after it all)


def pipelined_reads(server, c, want: bytes, batches: int, depth: int = 8,
                    length: int = MiB) -> int:
    """BATCHES times: DEPTH READs of LENGTH sent at once, then their replies, checked against
    ``want``. Write system calls the server made meanwhile."""
    from flexnbd import wire

    before = write_calls(server.pid)
    for b in range(batches):
        sent = []
        for i in range(depth):
            offset = ((b * depth + i) * length) % (len(want) - length + 1)
            sent.append((c.send_request(wire.CMD_READ, offset, length), offset))
        for cookie, offset in sent:              # (this server answers in order)
            reply = c.recv_reply(read_length=length, read_offset=offset)
            assert (reply.cookie, reply.error, reply.data == want[offset:offset + length]) == \
                (cookie, 0, True)
    return write_calls(server.pid) - before


TRY = 32 + 64        # READs each way while the server measures which is faster (_core)
LONG = 256 * KiB + 4 * KiB       # a long READ: past the copies of copy_reads


@pytest.mark.parametrize("depth", [1, 8], ids=["one-at-a-time", "pipelined"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_a_local_clients_long_reads_are_tried_both_ways(serve, make_file, structured, depth):
    """Beyond 256 KiB, a client on this host is served TRY READs with sendfile, then TRY
    with copies from a mapping of the file (with sendfile its own thread would read the cold
    page-cache pages), then the faster of the two. The bytes are the file's either way, one
    READ at a time or several in flight."""
    path = make_file(8 * MiB)
    want = content(path)
    server = serve(path)

    def reads(n: int) -> int:
        return pipelined_reads(server, c, want, n // depth, depth=depth, length=LONG)

    with client(server, structured=structured) as c:
        assert reads(TRY) >= TRY - FEW                   # sendfile
        assert reads(TRY) <= FEW                         # copies
        used = reads(256)
        assert used <= FEW or used >= 256, used          # the faster: one way, every time
        assert c.request(3).error == 0                   # (FLUSH: still in step after it all)


# The copies' mapping: the export's own (the file is at most FLEXNBD_EXPORT_MAP_MIB), or a
# window of the connection's (a larger file; here, the bound set to 0).
WHOLE, WINDOWS = None, {"FLEXNBD_EXPORT_MAP_MIB": "0"}


@pytest.mark.parametrize("env", [WHOLE, WINDOWS], ids=["export-map", "windows"])
def test_a_file_shrunk_under_the_mapped_copies_ends_that_connection_only(serve, make_file,
                                                                         env):
    """The copies read a mapping of the file; a page past the end of a file shrunk under us
    fails the server's send (EFAULT inside the kernel, no SIGBUS): that client is cut, the
    server goes on."""
    path = make_file(8 * MiB)
    want = content(path)
    server = serve(path, env=env)
    with client(server) as c:
        for _ in range(TRY):                             # (sendfile)
            c.read(0, LONG)
        assert pipelined_reads(server, c, want, 1, depth=1, length=LONG) <= FEW  # copies
        os.truncate(path, MiB)
        c.send_request(0, 4 * MiB, LONG)                 # (CMD_READ) now past the end
        with pytest.raises(ServerClosed):
            c.recv_reply(read_length=LONG, read_offset=4 * MiB)
    assert wait_until(lambda: "EIO" in server.log() or "Input/output" in server.log())
    alive(server)
    with client(server) as other:
        assert other.read(0, 4096) == want[:4096]


def test_far_apart_long_reads_map_the_file_at_most_once_per_4_mib(serve, make_file):
    """An export larger than FLEXNBD_EXPORT_MAP_MIB: in the copies' turn, sequential long
    READs are sent from a window mapped on the file (no pread). READs that alternate between
    two places 16 MiB apart (random long READs, or a hostile client) get a new window only
    once the last one has served 4 MiB: the READs outside the current window go through
    pread meanwhile, not an mmap and a munmap each. The bytes are the file's either way."""
    path = make_file(32 * MiB)
    want = content(path)
    server = serve(path, env=WINDOWS)
    half = TRY // 2

    def preaded(offsets) -> list[bool]:
        """For each READ: whether the server read it with pread (else from a mapping)."""
        ways = []
        for offset in offsets:
            before = io_count(server.pid, "syscr")
            assert c.read(offset, LONG) == want[offset:offset + LONG], offset
            ways.append(io_count(server.pid, "syscr") > before)
        return ways

    with client(server) as c:
        assert pipelined_reads(server, c, want, TRY, depth=1, length=LONG) >= TRY - FEW
        assert sum(preaded([i * LONG for i in range(half)])) <= FEW
        offsets = [(i % 2) * 16 * MiB + (i // 2) * LONG for i in range(half)]
        ways = preaded(offsets)
    # A mapped READ in the other place than the last mapped one needed a new window.
    places = [offset // (16 * MiB)
              for offset, pread in zip(offsets, ways, strict=True) if not pread]
    windows = sum(1 for i, place in enumerate(places) if i == 0 or place != places[i - 1])
    # 48 READs of 260 KiB are 12 MiB: 3 or 4 windows (one for each place without the bound).
    assert 2 <= windows <= 4, (windows, ways)


def mappings_of(pid: int, path: Path) -> int:
    """How many mappings of the file the process holds (/proc/PID/maps)."""
    return sum(1 for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
               if line.endswith(" " + str(path)))


def test_an_export_up_to_the_bound_is_mapped_once_for_every_client(serve, make_file):
    """An export of at most FLEXNBD_EXPORT_MAP_MIB is mapped whole, once, and every local
    client's copied READs are sent from that one mapping: READs that jump about take no pread
    and make no mapping of their own, from two clients at once, and each gets the file's
    bytes. With the bound below the file's size there is no such mapping."""
    path = make_file(32 * MiB)
    want = content(path)
    server = serve(path)
    assert mappings_of(server.pid, path) == 1
    half = TRY // 2
    with client(server) as c, client(server) as other:
        for each in (c, other):
            assert pipelined_reads(server, each, want, TRY, depth=1, length=LONG) >= TRY - FEW
        before = io_count(server.pid, "syscr")
        for i in range(half):
            offset = (i % 2) * 16 * MiB + (i // 2) * LONG
            for each in (c, other):
                assert each.read(offset, LONG) == want[offset:offset + LONG], offset
            assert mappings_of(server.pid, path) == 1
        assert io_count(server.pid, "syscr") - before <= FEW
    smaller = serve(path, env={"FLEXNBD_EXPORT_MAP_MIB": "31"})
    assert mappings_of(smaller.pid, path) == 0


@pytest.mark.parametrize("env", [WHOLE, WINDOWS], ids=["export-map", "windows"])
def test_the_mapped_copies_see_every_write_and_trim(serve, make_file, env):
    """A client that reads through the copies' mapping (the export's, or its own window) gets
    what another client wrote, trimmed or zeroed a moment before, never the bytes it read
    there earlier: the mapping is the page cache that the writes go to."""
    from flexnbd import wire

    path = make_file(16 * MiB)
    want = bytearray(content(path))
    server = serve(path, env=env)
    with client(server) as reader, client(server) as writer:
        assert pipelined_reads(server, reader, bytes(want), TRY, depth=1, length=LONG) \
            >= TRY - FEW
        assert pipelined_reads(server, reader, bytes(want), 4, depth=1, length=LONG) <= FEW
        new = os.urandom(LONG)
        assert writer.write(MiB, new) == 0
        want[MiB:MiB + LONG] = new
        assert writer.request(wire.CMD_TRIM, 4 * MiB, LONG).error == 0
        assert writer.request(wire.CMD_WRITE_ZEROES, 8 * MiB, LONG).error == 0
        for offset in (4 * MiB, 8 * MiB):
            want[offset:offset + LONG] = bytes(LONG)
        before = write_calls(server.pid)
        for offset in (MiB, 4 * MiB, 8 * MiB, 0):
            assert reader.read(offset, LONG) == bytes(want[offset:offset + LONG]), offset
        assert write_calls(server.pid) - before <= FEW           # (copies, not sendfile)


REMOTE_READER = r'''
import sys
from tests.support.rawclient import RawClient
host, port, length, reads, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
want = open(path, "rb").read()
c = RawClient.connect(port, host=host)
c.handshake()
for i in range(reads):
    offset = (i * length) % (len(want) - length + 1)
    assert c.read(offset, length) == want[offset:offset + length], offset
c.close()
print("read", reads)
'''


@pytest.fixture
def remote_link():
    """A veth pair to a network namespace of the test's own: (our address, its name). A
    client in it is on another host as the server sees it."""
    from tests.conftest import require_tool

    require_tool("ip")
    tag = f"fxr{os.getpid() % 100000}"
    ns, here, there = f"{tag}-ns", "10.79.0.1", "10.79.0.2"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", tag], capture_output=True, timeout=30)
    ip("netns", "add", ns)
    try:
        ip("link", "add", tag, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{here}/30", "dev", tag)
        ip("link", "set", tag, "up")
        ip("-n", ns, "addr", "add", f"{there}/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield here, ns
    finally:
        subprocess.run(["ip", "link", "del", tag], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_a_remote_clients_long_reads_always_go_with_sendfile(serve, make_file, remote_link):
    """A client on another host is never given copies: its data leaves through a NIC, where
    sendfile's zero copy is all gain."""
    here, ns = remote_link
    path = make_file(8 * MiB)
    server = serve(path, "--addr", here)
    reads = 2 * TRY + 32
    before = write_calls(server.pid)
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", REMOTE_READER,
                           here, str(server.port), str(LONG), str(reads), str(path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert write_calls(server.pid) - before >= reads


def test_a_choice_the_tries_confirm_holds_twice_as_long(serve, make_file):
    """After its first 4096 READs the faster way, the server tries both ways again; if the
    tries pick the same way, it holds for 8192 READs, else for 4096 again."""
    path = make_file(8 * MiB)
    want = content(path)
    server = serve(path)

    def ways(n: int, block: int = 32) -> list[bool]:
        """For each BLOCK of N READs: whether it went with sendfile."""
        return [pipelined_reads(server, c, want, block, depth=1, length=LONG) >= block - FEW
                for _ in range(n // block)]

    with client(server) as c:
        assert ways(TRY) == [True] * 3 and ways(TRY) == [False] * 3
        first = ways(4096)
        assert len(set(first)) == 1, first               # the first choice, all along
        assert ways(TRY) == [True] * 3 and ways(TRY) == [False] * 3
        held = ways(4096) + ways(4096)
        if held[0] == first[0]:                          # confirmed: 8192 READs
            assert len(set(held)) == 1, held
        else:                                            # changed: 4096, then tries again
            assert held[:128] == [held[0]] * 128 and held[128:131] == [True] * 3, held

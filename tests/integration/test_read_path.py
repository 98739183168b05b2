"""How READ data leaves the server: sendfile, or (for a client on this host with more than
one connection) a copy through the reply batch for reads up to 256 KiB, and (for a client on
this host that keeps several READs in flight) a copy through the connection's buffer for
longer ones. Either way the client gets the file's bytes, simple or structured, holes or not.

Which path a READ took is seen in /proc/PID/io: sendfile counts a write system call
(syscw), pread followed by send counts none. (A log line counts one too: the server logs a
client's arrival just after it is attached, so a few are allowed for.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.layout import punch_fd
from tests.support.serving import MiB, client, content
from tests.support.waiting import wait_until

KiB = 1024
# Sizes around the limits: batched as small reads, copied with copy_reads, always sendfile.
SIZES = (4 * KiB, 16 * KiB + 1, 64 * KiB, 256 * KiB, 256 * KiB + 4 * KiB, MiB)


def write_calls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/PID/io")


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


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_a_local_client_that_pipelines_big_reads_is_tried_with_copies(serve, make_file,
                                                                      structured):
    """Beyond 256 KiB, a local client that keeps several READs in flight is served TRY READs
    with sendfile, then TRY with copies (its own thread would otherwise read the cold
    page-cache pages), then the faster of the two; one that waits for each reply gets
    sendfile. The bytes are the file's either way."""
    path = make_file(8 * MiB)
    want = content(path)
    server = serve(path)
    with client(server, structured=structured) as c:
        assert sendfiles_for(server, c, reads=4, length=MiB) >= 4            # one at a time
        pipelined_reads(server, c, want, batches=1)      # (seen pipelining from here on)
        assert pipelined_reads(server, c, want, batches=TRY // 8) >= TRY - 8  # sendfile
        assert pipelined_reads(server, c, want, batches=TRY // 8) <= 8 + FEW  # copies
        pipelined_reads(server, c, want, batches=8)      # the faster of the two
        for i in range(300):                             # one at a time for a while
            c.read((i % 8) * 4 * KiB, 4 * KiB)
        assert sendfiles_for(server, c, reads=4, length=MiB) >= 4

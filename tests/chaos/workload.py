"""The chaos campaign's client: one libnbd connection through flexnbd-proxy that writes
versioned blocks, FLUSHes at random and reads blocks back, keeping a journal the checker reads.

Run by the system Python (python3-libnbd): ``workload.py PORT BASE JOURNAL STOP SEED``. Not a
flexnbd module: it knows the disk only through NBD, and the original image (BASE) only to judge
a block that was never written.

A block is 4 KiB: ``CHAOSBLK``, its offset, its version, then a fill made of both, so a block
is recognised whole or not at all. Versions of a block count 1, 2, 3, ... and the connection is
synchronous (one request at a time), so "acknowledged before the FLUSH was sent" is "every
acknowledged version so far". Journal lines (one per event, line-buffered, times in
CLOCK_MONOTONIC milliseconds, the clock the harness reads):

    w B V        write of version V to block B sent     a B V T   acknowledged
    e B V        answered with an error                 f         FLUSH sent
    F T          FLUSH acknowledged                     x         FLUSH answered with an error
    c T          (re)connected                          V TEXT    a read broke read-your-writes

Every read checks read-your-writes: the block holds a version at least as new as the newest
acknowledged one (so at least the newest FLUSHed one), written by us, whole; a block never
acknowledged holds either the original or a version we sent.
"""

import os
import random
import struct
import sys
import time

BLOCK = 4096
MAGIC = b"CHAOSBLK"
WORKING_SET = 2048


def block(offset: int, version: int) -> bytes:
    head = MAGIC + struct.pack("<QQ", offset, version) + bytes(8)
    return head + struct.pack("<QQ", offset, version) * ((BLOCK - len(head)) // 16)


def parse(data: bytes) -> tuple[int, int] | None:
    """(offset, version) of a whole block of ours, else None."""
    if data[:8] != MAGIC:
        return None
    offset, version = struct.unpack_from("<QQ", data, 8)
    return (offset, version) if data == block(offset, version) else None


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def working_set(seed: int, blocks: int) -> list[int]:
    return random.Random(seed).sample(range(blocks), WORKING_SET)


def main() -> None:
    import nbd  # (the system Python's python3-libnbd; the checker imports this module)

    port, base_path, journal_path, stop_path, seed = sys.argv[1:6]
    rng = random.Random(int(seed) * 7 + 1)
    base = open(base_path, "rb")
    size = os.fstat(base.fileno()).st_size
    chosen = working_set(int(seed), size // BLOCK)
    issued = dict.fromkeys(chosen, 0)      # newest version sent
    acked = dict.fromkeys(chosen, 0)       # newest version acknowledged
    journal = open(journal_path, "a", buffering=1)
    handle = None
    since_flush = 0
    while not os.path.exists(stop_path):
        if handle is None:
            try:
                handle = nbd.NBD()
                handle.connect_tcp("127.0.0.1", port)
                journal.write(f"c {now_ms()}\n")
            except nbd.Error:
                handle = None
                time.sleep(0.1)
                continue
        time.sleep(0.0003)      # (about 2,000 requests a second: a busy disk, not a spin)
        b = rng.choice(chosen)
        what = rng.random()
        try:
            if what < 0.6:
                v = issued[b] + 1
                issued[b] = v
                journal.write(f"w {b} {v}\n")
                try:
                    handle.pwrite(block(b * BLOCK, v), b * BLOCK)
                except nbd.Error:
                    if handle.aio_is_dead() or handle.aio_is_closed():
                        raise
                    journal.write(f"e {b} {v}\n")
                    continue
                acked[b] = v
                journal.write(f"a {b} {v} {now_ms()}\n")
                since_flush += 1
            elif what < 0.65 or since_flush > 50:
                journal.write("f\n")
                try:
                    handle.flush()
                except nbd.Error:
                    if handle.aio_is_dead() or handle.aio_is_closed():
                        raise
                    journal.write("x\n")
                    continue
                journal.write(f"F {now_ms()}\n")
                since_flush = 0
            else:
                least = acked[b]
                data = handle.pread(BLOCK, b * BLOCK)
                seen = parse(data)
                if seen is None:
                    if least or data != os.pread(base.fileno(), BLOCK, b * BLOCK):
                        journal.write(f"V read of block {b}: not a block of ours nor the "
                                      f"original; newest acknowledged version {least}\n")
                elif seen[0] != b * BLOCK or not least <= seen[1] <= issued[b]:
                    journal.write(f"V read of block {b}: version {seen[1]} at offset "
                                  f"{seen[0]}; acknowledged {least}, newest sent {issued[b]}\n")
        except nbd.Error:
            try:
                handle.close()
            except nbd.Error:
                pass
            handle = None


if __name__ == "__main__":
    main()

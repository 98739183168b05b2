"""A pipelined NBD client (libnbd's Python binding, run by /usr/bin/python3) that keeps several
requests in flight and logs what the server acknowledged, so a test can check the export
against a model of everything that was written.

    /usr/bin/python3 pipelined_client.py '{"uri": U, "cid": C, "original": PATH, "log": PATH,
                                          "stop": PATH, "seed": S, "depth": D,
                                          "write_blocks": N}'

Until the file ``stop`` exists it issues random requests, at most ``depth`` at a time and never
two at once that touch the same 4 KiB block (so the order of the acknowledgements is the order
of the effects): WRITEs of 1-8 blocks (each block is ``block_data(cid, block, version)``, one
new version per request; some with FUA) and WRITE_ZEROES into the first ``write_blocks`` blocks
(default: all), READs anywhere (half of them of the one block after the previous READ, for a
read-ahead cache), and FLUSHes. Then it lets the requests in flight finish,
flushes, disconnects and exits 0 (1 after any error).

The log, one line per completed request, in completion order:
  C <size> <can_fua> <can_zero> <can_flush>    connected
  W <first block> <blocks> <version>           a WRITE was acknowledged
  Z <first block> <blocks> <version>           a WRITE_ZEROES was acknowledged
  R <first block> <blocks> <tokens>            a READ came back; one comma-separated token per
                                               block: the version of block_data it holds, "o"
                                               for the original content, "z" for zeroes,
                                               "?<hex of 16 bytes>" for anything else
  F                                            a FLUSH was acknowledged
  E <what>                                     an error (connect, a request, the shutdown)
  D                                            done (last line)

The venv imports this file too (``block_data``), so ``nbd`` is only imported inside ``main``.
"""

from __future__ import annotations

import json
import os
import random
import struct
import sys
import time

BS = 4096
MAX_BLOCKS = 8


def block_data(cid: int, block: int, version: int) -> bytes:
    return struct.pack(">IIQ", cid, block, version) * (BS // 16)


def token(cid: int, block: int, data: bytes, original: bytes) -> str:
    c, b, v = struct.unpack_from(">IIQ", data)
    if c == cid and b == block and data == block_data(cid, block, v):
        return str(v)
    if data == original:
        return "o"
    if data == bytes(BS):
        return "z"
    return "?" + data[:16].hex()


def main() -> int:
    import nbd

    cfg = json.loads(sys.argv[1])
    cid, stop = cfg["cid"], cfg["stop"]
    rng = random.Random(cfg["seed"])
    with open(cfg["original"], "rb") as f:
        original = f.read()
    log = open(cfg["log"], "w")
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)     # (a tls-psk-file=... in the URI)
    try:
        h.connect_uri(cfg["uri"])
        size = h.get_size()
        fua, zero, flush = h.can_fua(), h.can_zero(), h.can_flush()
    except nbd.Error as e:
        log.write(f"E connect {e}\nD\n")
        return 1
    log.write(f"C {size} {int(fua)} {int(zero)} {int(flush)}\n")
    log.flush()
    blocks = size // BS
    writable = min(blocks, cfg.get("write_blocks") or blocks)
    busy: set[int] = set()
    inflight: dict[int, tuple] = {}
    version = 0
    errors = 0
    stopping = False
    checked = 0.0
    sequential = [0]

    def issue() -> bool:
        nonlocal version
        r = rng.random()
        if r < 0.02 and flush:
            inflight[h.aio_flush()] = ("F",)
            return True
        n = rng.choice((1, 1, 1, 2, 4, MAX_BLOCKS))
        reading = r < 0.30
        if reading and r < 0.15 and sequential[0] < blocks:
            first, n = sequential[0], 1       # the next block after the last READ
        else:
            first = rng.randrange((blocks if reading else writable) - n + 1)
        span = range(first, first + n)
        if any(b in busy for b in span):
            return False
        if reading:
            buf = nbd.Buffer(n * BS)
            cookie = h.aio_pread(buf, first * BS)
            sequential[0] = first + n
            op = ("R", first, n, buf)
        elif r < 0.35 and zero:
            version += 1
            cookie = h.aio_zero(n * BS, first * BS)
            op = ("Z", first, n, version)
        else:
            version += 1
            data = b"".join(block_data(cid, b, version) for b in span)
            buf = nbd.Buffer.from_bytearray(data)
            flags = nbd.CMD_FLAG_FUA if fua and rng.random() < 0.1 else 0
            cookie = h.aio_pwrite(buf, first * BS, flags=flags)
            op = ("W", first, n, version, buf)
        busy.update(span)
        inflight[cookie] = op
        return True

    while True:
        now = time.monotonic()
        if not stopping and now - checked > 0.05:
            checked = now
            stopping = os.path.exists(stop)
        if not stopping:
            tries = 0
            while len(inflight) < cfg["depth"] and tries < 16:
                tries += 1
                try:
                    issue()
                except nbd.Error as e:
                    log.write(f"E issue {e}\n")
                    errors += 1
                    stopping = True
                    break
        if not inflight:
            break
        try:
            h.poll(1000)
        except nbd.Error as e:
            log.write(f"E poll {e}\n")
            errors += 1
            break
        for cookie in list(inflight):
            op = inflight[cookie]
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as e:
                del inflight[cookie]
                log.write(f"E {op[0]} {op[1:3]} {e}\n")
                errors += 1
                stopping = True
                if op[0] != "F":
                    busy.difference_update(range(op[1], op[1] + op[2]))
                continue
            del inflight[cookie]
            kind = op[0]
            if kind == "F":
                log.write("F\n")
                continue
            first, n = op[1], op[2]
            busy.difference_update(range(first, first + n))
            if kind == "R":
                data = op[3].to_bytearray()
                tokens = ",".join(
                    token(cid, b, bytes(data[(b - first) * BS:(b - first + 1) * BS]),
                          original[b * BS:(b + 1) * BS])
                    for b in range(first, first + n))
                log.write(f"R {first} {n} {tokens}\n")
            else:
                log.write(f"{kind} {first} {n} {op[3]}\n")
        log.flush()
    if not errors:
        try:
            if flush:
                h.flush()
            h.shutdown()
        except nbd.Error as e:
            log.write(f"E shutdown {e}\n")
            errors += 1
    log.write("D\n")
    log.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Drive a flexnbd server with libnbd's Python binding (python3-libnbd, module ``nbd``).

Run by the SYSTEM python (/usr/bin/python3), which has the binding; the tests run this script in
a subprocess and check the one JSON object it prints on stdout (and the served file directly).

usage: libnbd_check.py MODE URI
  info      the export's size and capability flags
  ops       writes (FUA), reads, trim, zero (plain, NO_HOLE, FAST_ZERO), cache, flush
  errors    requests past the end (client-side bounds checks off): errno names
  readonly  write-type requests on a read-only export (client-side checks off): errno names
  aio       many pipelined aio_pwrite / aio_pread in flight at once, data verified
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import nbd
from patterns import pattern

FLAG_NAMES = ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_multi_conn",
              "can_fast_zero", "can_df", "is_read_only")


def attempt(fn) -> str:
    """Run fn; "ok", or the errno name of the nbd.Error it raised."""
    try:
        fn()
    except nbd.Error as e:
        return e.errno or f"errnum {e.errnum}: {e.string}"
    return "ok"


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def info(h: nbd.NBD) -> dict:
    out = {"size": h.get_size(), "protocol": h.get_protocol(),
           "structured": bool(h.get_structured_replies_negotiated())}
    for name in FLAG_NAMES:
        out[name] = bool(getattr(h, name)())
    return out


def ops(h: nbd.NBD) -> dict:
    out = info(h)
    steps = []
    fua = pattern(1, 5000)
    h.pwrite(fua, 1000, nbd.CMD_FLAG_FUA)
    out["fua_readback"] = h.pread(5000, 1000) == fua
    steps.append("pwrite-fua")
    plain = pattern(2, 70001)
    h.pwrite(plain, 123457)
    out["plain_readback"] = h.pread(70001, 123457) == plain
    steps.append("pwrite")
    if out["can_trim"]:
        h.trim(65536, 262144)
        steps.append("trim")
    if out["can_zero"]:
        h.zero(131072, 393216)
        out["zero_readback"] = h.pread(131072, 393216) == bytes(131072)
        h.zero(10000, 600001, nbd.CMD_FLAG_NO_HOLE)
        out["zero_no_hole_readback"] = h.pread(10000, 600001) == bytes(10000)
        steps.append("zero")
    if out["can_fast_zero"]:
        out["fast_zero"] = attempt(lambda: h.zero(65536, 720896, nbd.CMD_FLAG_FAST_ZERO))
        steps.append("fast-zero")
    if out["can_cache"]:
        h.cache(65536, 0)
        steps.append("cache")
    h.flush()
    steps.append("flush")
    out["steps"] = steps
    out["sha256"] = hashlib.sha256(h.pread(out["size"], 0)).hexdigest()
    h.shutdown()
    return out


def errors(h: nbd.NBD) -> dict:
    out = info(h)
    size = out["size"]
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    res = {
        "pread_past_end": attempt(lambda: h.pread(512, size)),
        "pread_crossing_end": attempt(lambda: h.pread(1024, size - 512)),
        "pread_huge_offset": attempt(lambda: h.pread(512, (1 << 63) - 256)),
        "pwrite_past_end": attempt(lambda: h.pwrite(b"x" * 512, size)),
        "pwrite_crossing_end": attempt(lambda: h.pwrite(b"y" * 1024, size - 512)),
        "pwrite_huge_offset": attempt(lambda: h.pwrite(b"z" * 512, (1 << 63) - 256)),
    }
    if out["can_trim"]:
        res["trim_past_end"] = attempt(lambda: h.trim(4096, size))
    if out["can_zero"]:
        res["zero_past_end"] = attempt(lambda: h.zero(4096, size))
    if out["can_cache"]:
        res["cache_past_end"] = attempt(lambda: h.cache(4096, size))
    # The connection is still in sync and usable after all those errors.
    res["read_after_errors"] = attempt(lambda: h.pread(512, size - 512))
    res["write_after_errors"] = attempt(lambda: h.pwrite(b"w" * 512, 0))
    out["results"] = res
    h.shutdown()
    return out


def readonly(h: nbd.NBD) -> dict:
    out = info(h)
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
    res = {
        "pread": attempt(lambda: h.pread(4096, 0)),
        "pwrite": attempt(lambda: h.pwrite(b"x" * 4096, 0)),
        "pwrite_fua": attempt(lambda: h.pwrite(b"x" * 512, 512, nbd.CMD_FLAG_FUA)),
        "trim": attempt(lambda: h.trim(4096, 0)),
        "zero": attempt(lambda: h.zero(4096, 0)),
        "zero_no_hole": attempt(lambda: h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)),
        "pread_after": attempt(lambda: h.pread(4096, 4096)),
    }
    out["results"] = res
    h.shutdown()
    return out


def wait_all(h: nbd.NBD, cookies: list[int], deadline: float) -> list[str]:
    """Poll until every command has completed; the outcome of each, in order."""
    outcome: dict[int, str] = {}
    while len(outcome) < len(cookies):
        for c in cookies:
            if c not in outcome:
                try:
                    if h.aio_command_completed(c):
                        outcome[c] = "ok"
                except nbd.Error as e:
                    outcome[c] = e.errno or str(e)
        if len(outcome) < len(cookies):
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for aio commands")
            h.poll(1000)
    return [outcome[c] for c in cookies]


def aio(h: nbd.NBD) -> dict:
    out = info(h)
    deadline = time.monotonic() + 60
    count, chunk = 64, 12288 + 7   # unaligned chunk size, adjacent regions
    base = 4096 + 3
    data = [pattern(100 + i, chunk) for i in range(count)]
    # Keep the buffers alive until their commands complete.
    wbufs = [nbd.Buffer.from_bytearray(bytearray(d)) for d in data]
    cookies = [h.aio_pwrite(wbufs[i], base + i * chunk) for i in range(count)]
    out["max_in_flight"] = h.aio_in_flight()
    out["writes"] = wait_all(h, cookies, deadline)
    rbufs = [nbd.Buffer(chunk) for _ in range(count)]
    cookies = [h.aio_pread(rbufs[i], base + i * chunk) for i in range(count)]
    out["reads"] = wait_all(h, cookies, deadline)
    out["read_matches"] = [bytes(rbufs[i].to_bytearray()) == data[i] for i in range(count)]
    # Reads and writes mixed in one pipeline, on disjoint regions.
    far = base + count * chunk + 65536
    mixed_data = [pattern(500 + i, 4096) for i in range(32)]
    mw = [nbd.Buffer.from_bytearray(bytearray(d)) for d in mixed_data]
    mr = [nbd.Buffer(chunk) for _ in range(32)]
    cookies = []
    for i in range(32):
        cookies.append(h.aio_pwrite(mw[i], far + i * 4096))
        cookies.append(h.aio_pread(mr[i], base + i * chunk))
    out["mixed"] = wait_all(h, cookies, deadline)
    out["mixed_read_matches"] = [bytes(mr[i].to_bytearray()) == data[i] for i in range(32)]
    cookies = [h.aio_flush()]
    out["flush"] = wait_all(h, cookies, deadline)
    out["layout"] = {"count": count, "chunk": chunk, "base": base, "far": far, "mixed": 32}
    h.shutdown()
    return out


MODES = {"info": info, "ops": ops, "errors": errors, "readonly": readonly, "aio": aio}


def main() -> None:
    mode, uri = sys.argv[1], sys.argv[2]
    h = connect(uri)
    print(json.dumps(MODES[mode](h)))


if __name__ == "__main__":
    main()

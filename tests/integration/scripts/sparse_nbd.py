"""Drive flexnbd's sparse-file features with libnbd's Python binding (python3-libnbd).

Run by the SYSTEM python (/usr/bin/python3), which has the binding: the tests feed one JSON
program on stdin and read one JSON object from stdout. The venv imports this file too (for
``pattern`` and ``churn_ops``), so ``nbd`` is only imported inside ``main``.

Programs:
  {"mode": "ops", "uri": U, "meta": true, "structured": true, "strict_bounds": true,
   "ops": [...]}
    each op gives one result, in order:
      ["bs", offset, count, req_one]  -> {"extents": [[length, flags], ...]} or {"error": E}
      ["map", offset, length]         -> [[offset, length, flags], ...] (block_status in a loop)
      ["write", offset, seed, length] -> "ok" or errno (seed null: zeroes)
      ["read", offset, length, seed]  -> true when the data equals pattern(seed) (null: zeroes)
      ["sha", offset, length]         -> sha256 hex of the data read
      ["zero", offset, length, no_hole] / ["trim", offset, length] / ["flush"] -> "ok" or errno
    plus "info": can_meta_context, structured replies negotiated, size.
  {"mode": "churn", "uri": U, "seed": S, "window": [offset, length], "stop_file": P,
   "max_rounds": N}
    rounds of churn_ops(S, round, window) (writes of data, of zero blocks, of partly zero
    blocks; WRITE_ZEROES that punch; TRIM) until stop_file exists (at least one round); after
    every round the whole window is read back and checked against a model. Result: rounds done,
    mismatches, sha256 of the window at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

BS = 4096


def pattern(seed: int, length: int) -> bytes:
    """Deterministic bytes that look random: never an all-zero 4 KiB block in practice."""
    return random.Random(seed).randbytes(length)


def partly_zero(seed: int, blocks: int) -> bytes:
    """``blocks`` 4 KiB blocks, some all zero and some not (at least one of each when
    blocks > 1)."""
    rng = random.Random(seed)
    out = bytearray()
    for i in range(blocks):
        zero = (i % 2 == 0) if blocks <= 2 else rng.random() < 0.5
        out += bytes(BS) if zero else pattern(seed * 1000 + i, BS)
    return bytes(out)


def churn_ops(seed: int, rnd: int, window: tuple[int, int]) -> list[list]:
    """The operations of one round, all inside the window. Every op sets its range to a fixed
    content, so the final content depends only on the rounds done, not on the timing."""
    base, size = window
    rng = random.Random(seed * 100003 + rnd)
    ops = []
    for i in range(24):
        kind = rng.choice(["data", "data", "data_aligned", "zeros", "mixed", "punch", "trim"])
        if kind in ("data_aligned", "zeros", "mixed", "punch"):
            blocks = rng.randint(1, 32)
            off = base + rng.randrange(0, size // BS - blocks) * BS
            length = blocks * BS
        else:
            length = rng.randint(1, 200_000)
            off = base + rng.randrange(0, size - length)
        if kind in ("data", "data_aligned"):
            ops.append(["write", off, seed * 1_000_000 + rnd * 1000 + i, length])
        elif kind == "zeros":
            ops.append(["write", off, None, length])
        elif kind == "mixed":
            ops.append(["write_mixed", off, seed * 1_000_000 + rnd * 1000 + i, length // BS])
        elif kind == "punch":
            ops.append(["zero", off, length, False])
        else:
            ops.append(["trim", off, length])
    return ops


def op_content(op: list) -> tuple[int, bytes]:
    """(offset, the bytes the range holds after the op)."""
    if op[0] == "write":
        _, off, seed, length = op
        return off, bytes(length) if seed is None else pattern(seed, length)
    if op[0] == "write_mixed":
        _, off, seed, blocks = op
        return off, partly_zero(seed, blocks)
    _, off, length = op[:3]
    return off, bytes(length)


def run_op(h, nbd, op: list):
    try:
        kind = op[0]
        if kind in ("write", "write_mixed"):
            off, data = op_content(op)
            h.pwrite(data, off)
            return "ok"
        if kind == "zero":
            h.zero(op[2], op[1], nbd.CMD_FLAG_NO_HOLE if op[3] else 0)
            return "ok"
        if kind == "trim":
            h.trim(op[2], op[1])
            return "ok"
        if kind == "flush":
            h.flush()
            return "ok"
        if kind == "read":
            _, off, length, seed = op
            want = bytes(length) if seed is None else pattern(seed, length)
            return h.pread(length, off) == want
        if kind == "sha":
            return hashlib.sha256(read_big(h, op[1], op[2])).hexdigest()
        if kind == "bs":
            _, off, count, req_one = op
            got: list = []

            def cb(metacontext, offset, entries, err):
                if metacontext == "base:allocation":
                    got.append([offset, [[entries[i], entries[i + 1]]
                                         for i in range(0, len(entries), 2)]])
                return 0
            h.block_status(count, off, cb, nbd.CMD_FLAG_REQ_ONE if req_one else 0)
            return {"calls": got, "extents": [e for _, ex in got for e in ex]}
        if kind == "map":
            return block_map(h, op[1], op[2])
        raise ValueError(f"unknown op {op!r}")
    except Exception as e:  # noqa: BLE001 - reported to the test
        errno = getattr(e, "errno", None)
        return {"error": errno or f"{type(e).__name__}: {e}"}


def read_big(h, off: int, length: int) -> bytes:
    out = bytearray()
    while length:
        n = min(length, 16 << 20)
        out += h.pread(n, off)
        off += n
        length -= n
    return bytes(out)


def block_map(h, off: int, length: int) -> list[list[int]]:
    out: list[list[int]] = []
    end = off + length
    while off < end:
        got: list[list[int]] = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == "base:allocation":
                for i in range(0, len(entries), 2):
                    got.append([entries[i], entries[i + 1]])
            return 0
        h.block_status(min(end - off, 1 << 31), off, cb)
        if not got:
            raise RuntimeError(f"no extents at {off}")
        for n, flags in got:
            n = min(n, end - off)
            if n <= 0:
                break
            out.append([off, n, flags])
            off += n
    return out


def connect(nbd, prog: dict):
    h = nbd.NBD()
    if prog.get("meta", True):
        h.add_meta_context("base:allocation")
    if not prog.get("structured", True):
        h.set_request_structured_replies(False)
    h.connect_uri(prog["uri"])
    if not prog.get("strict_bounds", True):
        h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    return h


def mode_ops(nbd, prog: dict) -> dict:
    h = connect(nbd, prog)
    info = {"size": h.get_size(),
            "structured": bool(h.get_structured_replies_negotiated()),
            "can_meta": bool(h.can_meta_context("base:allocation"))}
    results = [run_op(h, nbd, op) for op in prog["ops"]]
    h.shutdown()
    return {"info": info, "results": results}


def mode_churn(nbd, prog: dict) -> dict:
    h = connect(nbd, prog)
    base, size = prog["window"]
    model = bytearray(read_big(h, base, size))
    rounds = 0
    errors: list = []
    mismatches = 0
    while True:
        for op in churn_ops(prog["seed"], rounds, (base, size)):
            result = run_op(h, nbd, op)
            if result != "ok":
                errors.append([op, result])
            off, data = op_content(op)
            model[off - base:off - base + len(data)] = data
        rounds += 1
        if read_big(h, base, size) != model:
            mismatches += 1
        if rounds >= prog.get("max_rounds", 1000) or os.path.exists(prog["stop_file"]):
            break
    h.flush()
    sha = hashlib.sha256(read_big(h, base, size)).hexdigest()
    h.shutdown()
    return {"rounds": rounds, "mismatches": mismatches, "errors": errors[:5], "sha256": sha,
            "model_sha256": hashlib.sha256(model).hexdigest()}


def main() -> None:
    import nbd

    prog = json.load(sys.stdin)
    modes = {"ops": mode_ops, "churn": mode_churn}
    print(json.dumps(modes[prog["mode"]](nbd, prog)))


if __name__ == "__main__":
    main()

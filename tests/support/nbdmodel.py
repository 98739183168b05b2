"""Python models of what an NBD server must do, written from SPEC section 3 (not from the code):
the error a request gets, and the content of the export as requests change it."""

from __future__ import annotations

from flexnbd import wire

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = (
    wire.CMD_READ, wire.CMD_WRITE, wire.CMD_DISC, wire.CMD_FLUSH, wire.CMD_TRIM, wire.CMD_CACHE,
    wire.CMD_WRITE_ZEROES, wire.CMD_BLOCK_STATUS)
COMMANDS = (READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS)


def expected_error(magic: int, flags: int, type: int, offset: int, length: int, size: int,
                   read_only: bool = False, structured: bool = False,
                   meta_context: bool = False, fast_zero: bool = False) -> int:
    """The NBD error a request must be answered with (0 for none).

    When several rules are broken, the checks apply in this order: magic, command, flags,
    read-only, the 32 MiB cap of READ/WRITE, BLOCK_STATUS without a meta context or of length
    0, then the range.
    """
    if magic != wire.REQUEST_MAGIC:
        return wire.NBD_EBADMSG
    if type not in COMMANDS:
        return wire.NBD_EINVAL
    allowed = wire.CMD_FLAG_FUA                       # FUA is valid on every command
    if type == READ and structured:
        allowed |= wire.CMD_FLAG_DF
    if type == WZ:
        allowed |= wire.CMD_FLAG_NO_HOLE
        if fast_zero:
            allowed |= wire.CMD_FLAG_FAST_ZERO
    if type == BS:
        allowed |= wire.CMD_FLAG_REQ_ONE
    if flags & ~allowed:
        return wire.NBD_EINVAL
    if type in (DISC, FLUSH):
        return 0
    if read_only and type in (WRITE, TRIM, WZ):
        return wire.NBD_EPERM
    if type in (READ, WRITE) and length > wire.MAX_PAYLOAD:
        return wire.NBD_EINVAL
    if type == BS and (not meta_context or length == 0):   # BLOCK_STATUS of nothing: invalid
        return wire.NBD_EINVAL
    if offset + length > size:                        # Python ints: no overflow
        return wire.NBD_ENOSPC if type in (WRITE, WZ) else wire.NBD_EINVAL
    return 0


class DiskModel:
    """The export's content as the client should see it. Trimmed ranges are unknown (TRIM may
    or may not zero them) until written again."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.unknown: list[tuple[int, int]] = []   # [start, end) ranges

    @property
    def size(self) -> int:
        return len(self.data)

    def _forget(self, start: int, end: int) -> None:
        """Mark [start, end) as known again."""
        kept = []
        for a, b in self.unknown:
            if b <= start or a >= end:
                kept.append((a, b))
                continue
            if a < start:
                kept.append((a, start))
            if b > end:
                kept.append((end, b))
        self.unknown = kept

    def write(self, offset: int, payload: bytes) -> None:
        self.data[offset:offset + len(payload)] = payload
        self._forget(offset, offset + len(payload))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def trim(self, offset: int, length: int) -> None:
        if length:
            self.unknown.append((offset, offset + length))

    def known_segments(self, offset: int, length: int,
                       also_unknown: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, int]]:
        """The parts of [offset, offset+length) whose content is known (``also_unknown``:
        more [start, end) ranges to leave out)."""
        segments = [(offset, offset + length)]
        for a, b in [*self.unknown, *also_unknown]:
            nxt = []
            for s, e in segments:
                if b <= s or a >= e:
                    nxt.append((s, e))
                    continue
                if s < a:
                    nxt.append((s, a))
                if e > b:
                    nxt.append((b, e))
            segments = nxt
        return segments

    def mismatch(self, offset: int, got: bytes,
                 also_unknown: tuple[tuple[int, int], ...] = ()) -> str | None:
        """None if ``got`` (read at ``offset``) agrees with the model, else a description."""
        if len(got) == 0:
            return None
        for s, e in self.known_segments(offset, len(got), also_unknown):
            want = bytes(self.data[s:e])
            have = got[s - offset:e - offset]
            if want != have:
                first = next(i for i in range(len(want)) if want[i] != have[i])
                return (f"READ {offset}+{len(got)}: byte {s + first} is {have[first]:#x}, "
                        f"the model says {want[first]:#x}")
        return None

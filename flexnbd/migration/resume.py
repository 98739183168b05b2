"""Resuming a migration (issue 25): what the destination holds already.

A flexnbd listener keeps what one migration's sender wrote across the sender's reconnects
(``flexnbd.migration.listen.Coverage``) and offers it as the meta context
flexnbd:coverage:<migration id>. A sender that reconnects reads it with BLOCK_STATUS: the
ranges not covered are what it must send again. Two more things are resent with them, from
the source's dirty map: what clients wrote since it was sent (tracking never stops between
attempts), and the requests that were in flight when the last attempt failed (the mirror
marks them dirty: the destination may hold them torn).

A destination that breaks the rules fails the attempt (ProtocolError): a reply of the wrong
shape, an extent of length 0 or beyond what was asked, a reply longer than MAX_REPLY. Each
reply must come within the request limit. At most MAX_GAPS gaps are kept: past that the rest
of the export counts as missing (a full resend of it, never a skipped block).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from flexnbd import wire
from flexnbd._tls import TlsSession
from flexnbd.errors import PeerClosed, ProtocolError, RemoteError

# The destination's connection: the socket, or the TLS session on it.
Channel = socket.socket | TlsSession

# The longest BLOCK_STATUS request (its length field has 32 bits; block-aligned).
MAX_REQUEST = 0xFFFFF000
# A reply chunk longer than this is not a flexnbd listener's (it sends 1024 extents at most).
MAX_REPLY = 64 * 1024
# A structured reply chunk's type with this bit set is an error (its 16 bits, not an option's).
REPLY_TYPE_ERROR_BIT = 0x8000
# Gaps kept at most (a Python tuple each, ~100 bytes); past that, the rest of the export
# counts as missing.
MAX_GAPS = 1_000_000


class Stopped(Exception):
    """``stopped()`` said so between two requests (the mirror's `break`)."""


def missing(channel: Channel, size: int, context_id: int, limit: float,
            stopped: Callable[[], bool] = lambda: False) -> tuple[list[tuple[int, int]], int]:
    """[(offset, length)] of the export the destination does not hold, sorted and merged;
    and the bytes the query moved on the wire. Looks at ``stopped()`` before each request
    (Stopped): a destination that answers a byte at a time must not hold `break` up."""
    gaps: list[tuple[int, int]] = []
    wire_bytes = 0
    offset = 0
    while offset < size:
        if stopped():
            raise Stopped()
        if len(gaps) >= MAX_GAPS:
            _add(gaps, offset, size - offset)
            break
        extents = _block_status(channel, offset, min(size - offset, MAX_REQUEST), context_id,
                                limit)
        wire_bytes += wire.REQUEST_SIZE + wire.CHUNK_HEADER_SIZE + 4 + 8 * len(extents)
        for length, flags in extents:
            if not flags & wire.STATE_COVERED:
                _add(gaps, offset, length)
            offset += length
    return gaps, wire_bytes


def _add(gaps: list[tuple[int, int]], offset: int, length: int) -> None:
    if gaps and gaps[-1][0] + gaps[-1][1] == offset:
        start, before = gaps.pop()
        gaps.append((start, before + length))
    else:
        gaps.append((offset, length))


def _block_status(channel: Channel, offset: int, length: int, context_id: int,
                  limit: float) -> list[tuple[int, int]]:
    """One BLOCK_STATUS request: the extents (length, flags) from ``offset``, at least one,
    adding up to at most ``length``."""
    deadline = time.monotonic() + limit      # one deadline, however the reply trickles in
    channel.settimeout(limit)
    channel.sendall(wire.pack_request(wire.CMD_BLOCK_STATUS, offset, length,
                                      cookie=wire.MIRROR_COOKIE))
    head = _recv(channel, 4, deadline)
    (magic,) = struct.unpack(">I", head)
    if magic == wire.SIMPLE_REPLY_MAGIC:
        reply = wire.unpack_simple_reply(head + _recv(channel, wire.SIMPLE_REPLY_SIZE - 4,
                                                      deadline))
        _check_cookie(reply.cookie)
        name = wire.ERROR_NAMES.get(reply.error, f"error {reply.error}")
        if reply.error:
            raise RemoteError(reply.error, name,
                              f"the destination answered BLOCK_STATUS with {name}")
        raise ProtocolError("the destination answered BLOCK_STATUS without extents")
    if magic != wire.STRUCTURED_REPLY_MAGIC:
        raise ProtocolError("the destination answered BLOCK_STATUS with a bad magic")
    chunk = wire.unpack_chunk_header(head + _recv(channel, wire.CHUNK_HEADER_SIZE - 4,
                                                  deadline))
    _check_cookie(chunk.cookie)
    if chunk.length > MAX_REPLY:
        raise ProtocolError(f"the destination's BLOCK_STATUS reply has {chunk.length} bytes")
    payload = _recv(channel, chunk.length, deadline)
    if chunk.type & REPLY_TYPE_ERROR_BIT:
        error = struct.unpack_from(">I", payload)[0] if len(payload) >= 4 else 0
        name = wire.ERROR_NAMES.get(error, f"error {error}")
        raise RemoteError(error, name, f"the destination answered BLOCK_STATUS with {name}")
    if chunk.type != wire.REPLY_TYPE_BLOCK_STATUS or not chunk.flags & wire.REPLY_FLAG_DONE:
        # (one context selected: exactly one chunk, the last)
        raise ProtocolError("the destination answered BLOCK_STATUS with an unexpected chunk")
    if chunk.length < 12 or (chunk.length - 4) % 8:
        raise ProtocolError("the destination's BLOCK_STATUS reply is malformed")
    if struct.unpack_from(">I", payload)[0] != context_id:
        raise ProtocolError("the destination's BLOCK_STATUS reply names another context")
    extents = list(struct.iter_unpack(">II", payload[4:]))
    if any(n == 0 for n, _ in extents) or sum(n for n, _ in extents) > length:
        raise ProtocolError("the destination's BLOCK_STATUS extents do not fit the request")
    return extents


def _check_cookie(cookie: int) -> None:
    if cookie != wire.MIRROR_COOKIE:
        raise ProtocolError("the destination answered BLOCK_STATUS with a bad cookie")


def _recv(channel: Channel, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the destination did not answer BLOCK_STATUS in time")
        channel.settimeout(left)
        chunk = channel.recv(n - len(data))
        if not chunk:
            raise PeerClosed("the destination closed the connection")
        data += chunk
    return bytes(data)

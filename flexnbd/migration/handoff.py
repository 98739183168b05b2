"""The handoff at the source (SPEC §6.7): the last step of a migration, confirmed by the
destination before anyone is told it completed.

NBD has no acknowledgement for DISC, so the source builds one from what it has:

1. ``flush()``: FLUSH, and its reply with error 0: every byte the destination acknowledged is
   durable there. A destination that rejects FLUSH fails the attempt.
2. ``check_open()``: a destination that already closed (or sent something unasked) fails the
   attempt here, while retrying is still safe.
3. ``send_disc()``: from the moment DISC may have left, the destination may own the disk.
4. ``await_close()``: a listener closes the sender's socket normally (FIN) only after it
   synced the file and took control, and with a reset when it could not. So EOF means
   COMPLETED; a reset, bytes instead of EOF, or no close within the request limit leave the
   outcome UNKNOWN (``OutcomeUnknown``), and the source must then neither retry, nor unlink,
   nor serve again.

Failures in steps 1-2 (and a DISC the kernel refused to send) raise the ordinary errors
(PeerClosed, RemoteError, ProtocolError, TimeoutError, OSError): the attempt failed, retry.
"""

from __future__ import annotations

import select
import socket
import time

from flexnbd import wire
from flexnbd._tls import TlsSession
from flexnbd.errors import FlexnbdError, PeerClosed, ProtocolError, RemoteError

# The destination's connection: the socket, or the TLS session on it (which gives the same
# calls, decrypting; an orderly close is then a close_notify or a FIN, as the peer sends it).
Channel = socket.socket | TlsSession

_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class OutcomeUnknown(FlexnbdError):
    """DISC was sent but the destination did not confirm with an orderly close."""


def flush(sock: Channel, limit: float) -> None:
    """FLUSH and wait (up to ``limit`` seconds) for its reply with error 0."""
    deadline = time.monotonic() + limit       # one deadline, however the reply trickles in
    sock.settimeout(limit)
    sock.sendall(wire.pack_request(wire.CMD_FLUSH, cookie=wire.MIRROR_COOKIE))
    data = bytearray()
    while len(data) < wire.SIMPLE_REPLY_SIZE:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the destination did not answer FLUSH in time")
        sock.settimeout(left)
        chunk = sock.recv(wire.SIMPLE_REPLY_SIZE - len(data))
        if not chunk:
            raise PeerClosed("the destination closed the connection")
        data += chunk
    reply = wire.unpack_simple_reply(bytes(data))
    if reply.magic != wire.SIMPLE_REPLY_MAGIC:
        raise ProtocolError("the destination answered FLUSH with a bad magic")
    if reply.cookie != wire.MIRROR_COOKIE:
        raise ProtocolError("the destination answered FLUSH with a bad cookie")
    if reply.error:
        name = wire.ERROR_NAMES.get(reply.error, f"error {reply.error}")
        raise RemoteError(reply.error, name, f"the destination answered FLUSH with {name}")


def check_open(sock: Channel) -> None:
    """Fail unless the connection is still open with nothing unasked waiting on it."""
    if isinstance(sock, TlsSession):
        # Readable may be a TLS record without data (a session ticket): decrypt to know.
        data = sock.recv_nowait(1)
        if data == b"":
            raise PeerClosed("the destination closed the connection before DISC")
        if data:
            raise ProtocolError("the destination sent bytes nobody asked for before DISC")
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    for _, events in poller.poll(0):
        if events & _GONE:
            raise PeerClosed("the destination closed the connection before DISC")
        if events & select.POLLIN:
            raise ProtocolError("the destination sent bytes nobody asked for before DISC")


def send_disc(sock: Channel) -> None:
    """Send DISC. An error here means it never left (the attempt failed); a partial send
    means it may have: unknown."""
    request = wire.pack_request(wire.CMD_DISC, cookie=wire.MIRROR_COOKIE)
    sent = sock.send(request)
    if sent != len(request):
        raise OutcomeUnknown(f"only {sent} of the {len(request)} bytes of DISC were sent")


def await_close(sock: Channel, limit: float) -> None:
    """Wait up to ``limit`` seconds for the destination's orderly close; OutcomeUnknown
    unless it came."""
    sock.settimeout(limit)
    try:
        data = sock.recv(1)
    except TimeoutError:
        raise OutcomeUnknown(f"the destination did not close the connection within "
                             f"{limit:g} s of DISC") from None
    except OSError as e:
        raise OutcomeUnknown(f"the connection failed after DISC: "
                             f"{e.strerror or e}") from None
    if data:
        raise OutcomeUnknown("the destination sent bytes after DISC instead of closing")

"""What became of a mirror, or of a request about one, in the migration's own words.

The migration package reports outcomes; it never words them. ``flexnbd.control.protocol``
turns them into the control socket's replies (one outcome may read differently per request: a
stopped mirror is a success for ``break`` and a failure for ``mirror_wait``). What it does word
is an outcome's detail, the why that follows the reply on a line of its own (the functions at
the end of this module: one place for those texts).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from flexnbd.errors import errno_name


class Outcome(enum.Enum):
    # the first attempt of a mirror (a failure of it ends the mirror too)
    STARTED = enum.auto()                    # connected and checked: the mirror runs
    FAILED_TO_CONNECT = enum.auto()          # no TCP connection
    REJECTED = enum.auto()                   # not NBD, refused the handshake, or TLS failed
    NO_RESPONSE = enum.auto()                # the handshake did not finish in time
    SIZE_MISMATCH = enum.auto()              # the destination exports another size
    # how a mirror ended
    COMPLETED = enum.auto()                  # the destination confirmed (SPEC §6.7)
    UNKNOWN = enum.auto()                    # DISC went out and was not confirmed
    STOPPED = enum.auto()                    # `break`
    SHUTTING_DOWN = enum.auto()              # the server stops
    ABANDONED = enum.auto()                  # ended for no cause of its own, or nothing to send
    # requests that found no mirror to act on, or one too many
    BUSY = enum.auto()                       # one runs already, or one has migrated the disk
    NOT_MIRRORING = enum.auto()


@dataclass(frozen=True)
class Result:
    """An outcome and why, where that is worth saying (None otherwise)."""

    outcome: Outcome
    detail: str | None = None


# -- why a first attempt failed: the detail of its Result, one line for the operator -------

def connect_failed(e: OSError, timeout: float) -> str:
    """``ECONNREFUSED: Connection refused``; a timeout without an errno says how long."""
    if e.errno:
        return f"{errno_name(e.errno)}: {e.strerror or os.strerror(e.errno)}"
    if isinstance(e, TimeoutError):
        return f"ETIMEDOUT: no connection within {timeout:g} s"
    return str(e) or type(e).__name__


def size_mismatch(theirs: int, ours: int) -> str:
    return f"the destination exports {theirs} bytes, this server {ours}"


def stopped(addr: str, port: int, attempt: int, sent: int, total: int) -> str:
    """What ``break`` stopped: where it went, which attempt, how far it got (payload bytes of
    that attempt: holes sent as WRITE_ZEROES count for nothing)."""
    where = f"to {addr} port {port}"
    if attempt == 0:
        return f"{where}: stopped before its first attempt sent anything"
    return f"{where}, attempt {attempt}: {sent} of {total} bytes sent"


NOT_NBD = "its first bytes are not NBD's magic (is it an NBD server?)"


def no_greeting(timeout: float | None = None, why: str | None = None) -> str:
    """A peer that did not greet as NBD: not in time (``timeout``), or not NBD (``why``)."""
    within = f" within {timeout:g} s" if timeout is not None else ""
    return f"no NBD greeting{within}" + (f": {why}" if why else "")


def tls_failed(message: str, kind: str | None, addr: str) -> str:
    """A TLS failure, with a hint at the usual cause when the message has none: the key
    (PSK) or the certificate's signer and name (X.509)."""
    if not message.startswith("TLS handshake failed") or message.endswith("?)"):
        return message
    if kind == "psk":
        hint = "wrong key or identity?"
    else:
        hint = f"is its certificate signed by our ca-cert.pem, and made for {addr}?"
    return f"{message} (TLS: {hint})"

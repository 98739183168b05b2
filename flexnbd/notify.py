"""systemd readiness notification (sd_notify), without libsystemd.

When the environment has NOTIFY_SOCKET (set by systemd for ``Type=notify`` units), a datagram
with the state is sent to that Unix socket: ``READY=1`` once the NBD listener(s) and the control
socket are up and serving, ``STOPPING=1`` when shutdown begins. A name starting with ``@`` is an
abstract socket. Without NOTIFY_SOCKET nothing happens. A failure to notify is returned as a
message for the caller to log; it is never fatal.
"""

from __future__ import annotations

import os
import socket


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock: and other schemes are not supported


def notify(state: str) -> str | None:
    """Send ``state`` (e.g. ``READY=1``) to NOTIFY_SOCKET. None when it was sent or there is
    no NOTIFY_SOCKET; else why it could not be sent."""
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return None
    addr = _address(name)
    if addr is None:
        return f"NOTIFY_SOCKET {name!r} is not supported"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(5)
            sock.sendto(state.encode(), addr)
    except OSError as e:
        return f"cannot notify {name}: {e.strerror or e}"
    return None


def ready() -> str | None:
    return notify("READY=1")


def stopping() -> str | None:
    return notify("STOPPING=1")

"""The exceptions of flexnbd, raised from both the Python layers and the compiled core, and
the one way an errno is shown to a user."""

from __future__ import annotations

import errno
import os


def errno_name(e: int) -> str:
    """EIO for 5 (the number as text when it has no name)."""
    return errno.errorcode.get(e, str(e))


def errno_text(e: int) -> str:
    """"Input/output error (EIO)" for 5."""
    return f"{os.strerror(e)} ({errno_name(e)})"


class FlexnbdError(Exception):
    """Base of every flexnbd error; its message is fit to show a user as one line."""


class UsageError(FlexnbdError):
    """Bad command-line input."""


class ProtocolError(FlexnbdError):
    """The peer broke the NBD protocol (bad magic, bad length, unexpected reply)."""


class HandshakeError(ProtocolError):
    """The NBD handshake failed."""


class TlsError(HandshakeError):
    """TLS failed: bad credentials (ours), or a handshake the peer failed (a wrong key, an
    untrusted certificate, not TLS at all). Final: retrying with the same keys cannot help."""


class NotNbd(HandshakeError):
    """The peer's greeting is not NBD at all (an unknown magic): retrying will not help."""


class NoGreeting(TimeoutError):
    """The server sent no (complete) NBD greeting in time."""


class PeerClosed(FlexnbdError):
    """The peer closed the connection."""


class RemoteError(FlexnbdError):
    """The server answered a request with an NBD error; ``errno_name`` says which."""

    def __init__(self, error: int, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.errno_name = errno_name

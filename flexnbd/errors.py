"""The exceptions of flexnbd, raised from both the Python layers and the compiled core."""


class FlexnbdError(Exception):
    """Base of every flexnbd error; its message is fit to show a user as one line."""


class UsageError(FlexnbdError):
    """Bad command-line input."""


class ProtocolError(FlexnbdError):
    """The peer broke the NBD protocol (bad magic, bad length, unexpected reply)."""


class HandshakeError(ProtocolError):
    """The NBD handshake failed."""


class NotNbd(HandshakeError):
    """The peer's greeting is not NBD at all (an unknown magic): retrying will not help."""


class PeerClosed(FlexnbdError):
    """The peer closed the connection."""


class RemoteError(FlexnbdError):
    """The server answered a request with an NBD error; ``errno_name`` says which."""

    def __init__(self, error: int, errno_name: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.errno_name = errno_name

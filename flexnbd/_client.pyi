from flexnbd._tls import TlsSession

def client_copy(sock: int, fd: int, offset: int, size: int, writing: bool,
                tls: TlsSession | None = ..., timeout: float = ...) -> None: ...

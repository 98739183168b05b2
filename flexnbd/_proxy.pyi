"""Type stubs for the proxy's compiled relay (flexnbd/_proxy.pyx)."""

import enum
from typing import NamedTuple

from flexnbd._tls import TlsSession

class End(enum.IntEnum):
    END_DISC = 0
    END_CLIENT_GONE = 1
    END_BAD_MAGIC = 2
    END_TOO_BIG = 3
    END_NO_MEMORY = 4
    END_UPSTREAM_LOST = 5
    END_UPSTREAM_TIMEOUT = 6
    END_STOPPED = 7

class Problem(enum.IntEnum):
    UP_OK = 0
    UP_EOF = 1
    UP_ERRNO = 2
    UP_BAD_MAGIC = 3
    UP_BAD_COOKIE = 4
    UP_UNEXPECTED_CHUNK = 5
    UP_BAD_CHUNK_LENGTH = 6
    UP_CHUNK_OUTSIDE = 7
    UP_BAD_CONTEXT = 8
    UP_BAD_EXTENTS = 9
    UP_INCOMPLETE = 10
    UP_TOO_MANY_CHUNKS = 11
    UP_BAD_SIMPLE = 12

class RelayState(NamedTuple):
    in_flight: int
    requests: int
    problem: Problem
    err: int
    bad_value: int
    client_err: int

class Relay:
    def __init__(self, upstream: int, size: int, upstream_flags: int, stop_fd: int,
                 cache_bytes: int, timeout: float,
                 upstream_tls: TlsSession | None = ...,
                 send_timeout: float = ..., structured: bool = ...,
                 meta_id: int | None = ...) -> None: ...
    def attach(self, client: int, tls: TlsSession | None = ..., structured: bool = ...,
               meta: bool = ...) -> None: ...
    def set_upstream(self, upstream: int, upstream_flags: int,
                     tls: TlsSession | None = ..., structured: bool = ...,
                     meta_id: int | None = ...) -> int: ...
    def run(self) -> End: ...
    def state(self) -> RelayState: ...

"""Type stubs for the compiled hot path (flexnbd/_core.pyx)."""

import enum
from typing import NamedTuple

from flexnbd._allocmap import AllocationMap, CoverageMap, DirtyMap
from flexnbd._tls import TlsSession
from flexnbd.wire import Request

class Reason(enum.IntEnum):
    REASON_DISC = 0
    REASON_CLOSED = 1
    REASON_VANISHED = 2
    REASON_BAD_MAGIC = 3
    REASON_IO_FATAL = 4
    REASON_TOO_BIG = 5
    REASON_STOPPED = 6
    REASON_SOCKET_ERROR = 7

CONTEXT_ALLOCATION: int
CONTEXT_COVERAGE: int

class ServeResult(NamedTuple):
    reason: Reason
    errno: int
    command: str | int
    offset: int
    length: int
    requests: int

def decode_request(data: bytes, size: int, read_only: bool = ..., structured: bool = ...,
                   meta_context: bool = ..., fast_zero: bool = ...) -> tuple[int, Request]: ...
class Export:
    path: str
    allocmap: AllocationMap | None
    def __init__(self, fd: int, size: int, read_only: bool, path: str,
                 allocmap: AllocationMap | None = ..., *, map_max: int = ...) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def mapped(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def can_punch(self) -> bool: ...
    @property
    def io_error(self) -> bool: ...
    def sync(self) -> None: ...
    def track_dirty(self, on: bool) -> DirtyMap: ...

class Connection:
    def __init__(self, sock: int, export: Export, *, stop_fd: int = ..., structured: bool = ...,
                 meta_context: int = ..., fast_zero: bool = ...,
                 coverage: CoverageMap | None = ...,
                 splice_all: bool = ..., idle_spin: float = ...,
                 tls: TlsSession | None = ...) -> None: ...
    @property
    def errors(self) -> int: ...
    @property
    def writes(self) -> int: ...
    def serve(self) -> ServeResult: ...
    def kick(self) -> None: ...
    copy_reads: bool
    local: bool
    @property
    def request_age_ns(self) -> int: ...
    @property
    def requests(self) -> int: ...

"""The read and write modes: copy a range between an NBD server and stdout/stdin."""

from __future__ import annotations

import sys

from flexnbd import _core, sockets, wire
from flexnbd.config import TransferConfig
from flexnbd.handshake import client_handshake


def transfer(cfg: TransferConfig, writing: bool) -> None:
    """READ [offset, offset+size) to stdout, or WRITE it from stdin. Raises flexnbd errors
    (RemoteError carries the server's errno name) or OSError."""
    sock = sockets.connect(cfg.addr, cfg.port, cfg.bind)
    try:
        sock.settimeout(15.0)
        client_handshake(sock)
        sock.settimeout(None)
        if writing:
            _core.client_copy(sock.fileno(), sys.stdin.fileno(), cfg.offset, cfg.size, True)
        else:
            sys.stdout.flush()
            _core.client_copy(sock.fileno(), sys.stdout.fileno(), cfg.offset, cfg.size, False)
        _disconnect(sock)
    finally:
        sock.close()


def _disconnect(sock) -> None:
    try:
        sock.sendall(wire.pack_request(wire.CMD_DISC))
    except OSError:
        pass

"""The read and write modes: copy a range between an NBD server and stdout/stdin."""

from __future__ import annotations

import socket
import sys

from flexnbd import _client, credentials, hosts, log, sockets, wire
from flexnbd._tls import TlsSession
from flexnbd.config import TransferConfig
from flexnbd.errors import FlexnbdError
from flexnbd.handshake import client_handshake

# The whole handshake, and then each request, reply and payload (one deadline each, however
# the server trickles its bytes): a server that stops answering cannot hold us for ever.
HANDSHAKE_TIMEOUT = 15.0
REQUEST_TIMEOUT = 60.0

_log = log.get("client")


def transfer(cfg: TransferConfig, writing: bool) -> None:
    """READ [offset, offset+size) to stdout, or WRITE it from stdin. Raises flexnbd errors
    (RemoteError carries the server's errno name), TimeoutError or OSError."""
    tls = credentials.client_context(cfg.tls)
    sock = sockets.connect(cfg.addr, cfg.port, cfg.bind)
    _log.info("connected to %s port %d", hosts.described(cfg.addr, (sockets.peer_address(sock),)),
              cfg.port)
    try:
        info = client_handshake(sock, tls=tls, server_hostname=cfg.addr,
                                timeout=HANDSHAKE_TIMEOUT)
        if writing:
            _client.client_copy(sock.fileno(), sys.stdin.fileno(), cfg.offset, cfg.size, True,
                              tls=info.tls, timeout=REQUEST_TIMEOUT)
        else:
            sys.stdout.flush()
            _client.client_copy(sock.fileno(), sys.stdout.fileno(), cfg.offset, cfg.size, False,
                              tls=info.tls, timeout=REQUEST_TIMEOUT)
        _disconnect(sock if info.tls is None else info.tls)
    finally:
        sock.close()


def _disconnect(channel: socket.socket | TlsSession) -> None:
    try:
        channel.settimeout(5.0)
        channel.sendall(wire.pack_request(wire.CMD_DISC))
        if isinstance(channel, TlsSession):
            channel.close_notify()
    except (OSError, FlexnbdError):
        pass

"""TLS contexts made from the command line's TlsSettings, for every mode that speaks TLS."""

from __future__ import annotations

from flexnbd._tls import TlsContext
from flexnbd.config import TlsSettings
from flexnbd.handshake import TlsPolicy


def server_policy(settings: TlsSettings | None) -> TlsPolicy | None:
    """What a server offers its clients (None: no TLS). The credentials are loaded now, so
    that bad ones stop the start (TlsError)."""
    if settings is None:
        return None
    context = TlsContext(server=True, certificates=settings.certificates,
                         psk_file=settings.psk, verify_peer=settings.verify_peer)
    return TlsPolicy(context, require=settings.mode == "require")


def client_context(settings: TlsSettings | None, read_ahead: bool = False) -> TlsContext | None:
    """The same credentials as a client's (None: no TLS); TlsError if they cannot be.
    ``read_ahead``: sessions read many records at once (the proxy's non-blocking relay)."""
    if settings is None:
        return None
    return TlsContext(server=False, certificates=settings.certificates, psk_file=settings.psk,
                      read_ahead=read_ahead)

"""Configuration objects built by the CLI and handed to the running programs."""

from __future__ import annotations

from dataclasses import dataclass

MAX_CLIENTS_SERVE = 16
MAX_CLIENTS_LISTEN = 1


@dataclass
class ServeConfig:
    file: str
    addr: str | None = None          # TCP address (normalised literal), None for no TCP
    port: int | None = None
    unix: str | None = None          # NBD on a Unix socket
    read_only: bool = False
    oldstyle: bool = False
    max_clients: int = MAX_CLIENTS_SERVE
    # How long a client may take to finish the handshake before it is dropped.
    handshake_timeout: float = 30.0
    # On stop, how long connected clients get to finish their current request.
    stop_grace: float = 10.0


@dataclass
class TransferConfig:
    """The read and write client modes."""

    addr: str
    port: int
    offset: int
    size: int
    bind: str | None = None

"""Configuration objects built by the CLI and handed to the running programs."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Union

MAX_CLIENTS_SERVE = 16
MAX_CLIENTS_LISTEN = 1
# A request taking longer than this disconnects its client when --killswitch is on
# (FLEXNBD_KILLSWITCH_SECS overrides it, for tests).
KILLSWITCH_SECS = 120.0

AclEntry = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass
class ServeConfig:
    """serve and listen modes."""

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
    mode: str = "serve"              # serve | listen
    sock: str | None = None          # the control socket
    acl: list[AclEntry] = field(default_factory=list)
    default_deny: bool = False       # an empty ACL refuses everyone (survives replacement)
    killswitch: float | None = None  # seconds a request may take; None: no killswitch
    control_timeout: float = 10.0    # seconds a control client gets to send its request


@dataclass
class TransferConfig:
    """The read and write client modes."""

    addr: str
    port: int
    offset: int
    size: int
    bind: str | None = None

"""Configuration objects built by the CLI and handed to the running programs."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Union

from flexnbd.migration.settings import PROGRESS_SECS, REQUEST_LIMIT_SECS

MAX_CLIENTS_SERVE = 16
# The most `serve --max-clients` accepts: a busy client costs ~1.6 MiB of buffers (requests,
# payload, replies) plus its 1 MiB pipe in the kernel, so 1024 of them stay within ~2.6 GiB.
MAX_CLIENTS_BOUND = 1024
MAX_CLIENTS_LISTEN = 1
# Listen mode: connections still in their handshake, which do not hold the migration's slot.
MAX_HANDSHAKES_LISTEN = 16
# Listen mode: a sender that has sent no request this long after its handshake is cut, and
# one that has sent none for this long gives the slot up to a new sender (FLEXNBD_LISTEN_IDLE).
LISTEN_IDLE_SECS = 10.0
# A request taking longer than this disconnects its client when --killswitch is on
# (FLEXNBD_KILLSWITCH_SECS overrides it, for tests).
KILLSWITCH_SECS = 120.0
# How long a client that works one request at a time may take to send its next one and still
# be waited for with a spin (FLEXNBD_IDLE_SPIN_US overrides it; 0 turns the spin off).
IDLE_SPIN_SECS = 40e-6
# An export up to this size is mapped whole, once, for the long READs copied to local clients
# (FLEXNBD_EXPORT_MAP_MIB overrides it; 0: never): its page tables cost at most 2 MiB per GiB
# that such clients read, so at most 16 MiB here. A larger export is mapped 8 MiB at a time.
EXPORT_MAP_MAX = 8 << 30
# The whole handshake, and a reply that makes no progress (FLEXNBD_HANDSHAKE_TIMEOUT and
# FLEXNBD_SEND_TIMEOUT override them).
HANDSHAKE_SECS = 30.0
SEND_TIMEOUT_SECS = 30.0
# Seconds a control-socket client gets to send its request (FLEXNBD_CONTROL_TIMEOUT_SECS).
CONTROL_TIMEOUT_SECS = 10.0
# The proxy reconnects when a request stays unanswered this long (FLEXNBD_UPSTREAM_TIMEOUT).
UPSTREAM_TIMEOUT_SECS = 30.0
# `--cache` without a size.
CACHE_BYTES_DEFAULT = 4096

AclEntry = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass
class TlsSettings:
    """NBD over TLS (STARTTLS), as nbdkit's options have it: ``mode`` "on" offers TLS,
    "require" refuses every client that does not use it. Credentials: an X.509 directory
    (``certificates``) or a psktool file (``psk``); ``verify_peer``: ask for and check client
    certificates (X.509)."""

    mode: str = "on"                 # on | require
    certificates: str | None = None
    psk: str | None = None
    verify_peer: bool = False


@dataclass
class ServeConfig:
    """serve and listen modes."""

    file: str
    addr: str | None = None          # TCP address (normalised literal), None for no TCP
    port: int | None = None
    unix: str | None = None          # NBD on a Unix socket
    read_only: bool = False
    oldstyle: bool = False
    tls: TlsSettings | None = None   # None: no TLS (--tls=off)
    max_clients: int = MAX_CLIENTS_SERVE
    # Connections one address may hold at once (half the slots by default: one misbehaving
    # host cannot lock the others out).
    max_clients_per_address: int = MAX_CLIENTS_SERVE // 2
    # Connections in their handshake, counted apart from max_clients (listen mode: a client
    # takes the migration's slot only once its handshake is done); None: they count in it.
    max_handshakes: int | None = None
    # Listen mode: see LISTEN_IDLE_SECS; None: no idle limit (serve mode).
    listen_idle: float | None = None
    # How long a client may take to finish the whole handshake before it is dropped
    # (FLEXNBD_HANDSHAKE_TIMEOUT).
    handshake_timeout: float = HANDSHAKE_SECS
    # A reply that makes no progress this long drops its client (FLEXNBD_SEND_TIMEOUT).
    send_timeout: float = SEND_TIMEOUT_SECS
    # A client that sends its next request within this many seconds of a reply, one request
    # at a time, is waited for with a spin, not a sleep (FLEXNBD_IDLE_SPIN_US; 0: never).
    idle_spin: float = IDLE_SPIN_SECS
    # An export of up to this many bytes is mapped whole for copied READs (FLEXNBD_EXPORT_MAP_MIB).
    export_map_max: int = EXPORT_MAP_MAX
    # On stop, how long connected clients get to finish their current request.
    stop_grace: float = 10.0
    mode: str = "serve"              # serve | listen
    sock: str | None = None          # the control socket
    acl: list[AclEntry] = field(default_factory=list)
    default_deny: bool = False       # an empty ACL refuses everyone (survives replacement)
    killswitch: float | None = None  # seconds a request may take; None: no killswitch
    # seconds a control client gets to send its request (FLEXNBD_CONTROL_TIMEOUT_SECS)
    control_timeout: float = CONTROL_TIMEOUT_SECS
    # seconds a mirror waits for a reply, and for the destination's close after DISC
    # (FLEXNBD_MS_REQUEST_LIMIT_SECS)
    mirror_request_limit: float = REQUEST_LIMIT_SECS
    # seconds between a running mirror's progress lines (FLEXNBD_MIRROR_PROGRESS_SECS)
    mirror_progress_interval: float = PROGRESS_SECS
    # test knobs: force an allocation map method, fiemap | seek | none
    # (FLEXNBD_ALLOCMAP_METHOD), and slow its builder down (FLEXNBD_ALLOCMAP_DELAY_MS)
    allocmap_method: str | None = None
    allocmap_delay_ms: int = 0
    sock_mode: int = 0o600           # file mode of the control socket
    unix_mode: int = 0o660           # file mode of the NBD --unix socket
    # Listening sockets passed by systemd (socket activation, flexnbd.activation), served
    # instead of addr/port/unix: TCP ones like --addr's (the ACL applies), Unix ones like
    # --unix's (never unlinked: systemd owns them).
    inherited: list[socket.socket] = field(default_factory=list)


@dataclass
class TransferConfig:
    """The read and write client modes."""

    addr: str
    port: int
    offset: int
    size: int
    bind: str | None = None
    tls: TlsSettings | None = None   # STARTTLS with these credentials (mode "require")


@dataclass
class ProxyConfig:
    """flexnbd-proxy."""

    conn_addr: str                   # upstream
    conn_port: int
    addr: str | None = None          # listen on TCP ...
    port: int | None = None
    unix: str | None = None          # ... or on a Unix socket
    # ... or on the listening sockets systemd passed (socket activation)
    inherited: list[socket.socket] = field(default_factory=list)
    bind: str | None = None          # connect upstream from this address
    cache_bytes: int = 0             # read-ahead cache: 0 is off
    oldstyle: bool = False           # offer the client the oldstyle handshake
    upstream_timeout: float = UPSTREAM_TIMEOUT_SECS
    handshake_timeout: float = HANDSHAKE_SECS  # the client's handshake, and upstream's greeting
    send_timeout: float = SEND_TIMEOUT_SECS    # a client that reads no reply for this long goes
    connect_timeout: float = 15.0
    reconnect_first: float = 0.1     # reconnect delays: doubling from first to most
    reconnect_most: float = 2.0
    tls: TlsSettings | None = None        # TLS for the proxy's clients
    conn_tls: TlsSettings | None = None   # TLS to upstream (always required when given)

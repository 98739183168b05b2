"""Socket plumbing shared by the servers and clients: addresses, listeners, socket options."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import struct

from flexnbd.errors import FlexnbdError

ANY_ADDRESSES = {"0": "0.0.0.0", "0.0.0.0": "0.0.0.0", "::": "::"}


def parse_ip(text: str) -> str:
    """An IPv4 or IPv6 literal (or 0 for any), normalised. ValueError if it is neither."""
    if text in ANY_ADDRESSES:
        return ANY_ADDRESSES[text]
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    return str(ipaddress.ip_address(host))


def parse_port(text: str) -> int:
    """A TCP port 1..65535. ValueError otherwise."""
    if not text.isdigit():
        raise ValueError(text)
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp_listener(addr: str, port: int, backlog: int = 64) -> socket.socket:
    sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6 and addr == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise FlexnbdError(f"cannot listen on {addr} port {port}: {e.strerror}") from None
    return sock


def unix_listener(path: str, backlog: int = 64) -> socket.socket:
    """Listen on a Unix socket at ``path``. A stale socket file (nobody answers behind it) is
    replaced; a live one is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise FlexnbdError(f"{path} exists and is not a socket")
        if _unix_socket_is_live(path):
            raise FlexnbdError(f"{path} is already in use by a running server")
        os.unlink(path)
    # Bind and listen under a temporary name, then link it into place: the socket file appears
    # only once connections to it are accepted (between bind() and listen() they are refused).
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock.bind(tmp)
        sock.listen(backlog)
        try:
            os.link(tmp, path)       # fails if another server took the name meanwhile
        finally:
            os.unlink(tmp)
    except FileExistsError:
        sock.close()
        raise FlexnbdError(f"{path} is already in use by a running server") from None
    except OSError as e:
        sock.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise FlexnbdError(f"cannot listen on {path}: {e.strerror}") from None
    return sock


def _unix_socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()


def set_client_options(sock: socket.socket) -> None:
    """TCP_NODELAY and keepalive 30/10/3 on an accepted TCP client, each set separately."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def reset_on_close(sock: socket.socket) -> None:
    """Make close() end a TCP connection with a reset (SO_LINGER 0) instead of a FIN, so the
    peer can tell it from an orderly close. (A Unix socket has no reset: nothing changes.)"""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass   # already gone: there is nothing left to tell the peer


def connect(addr: str, port: int, bind: str | None = None, timeout: float = 15.0) -> socket.socket:
    """Connect to an NBD server, optionally from ``bind``; the socket is left blocking."""
    sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
    try:
        if bind:
            sock.bind((bind, 0))
        sock.settimeout(timeout)
        sock.connect((addr, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return peer or "unix"

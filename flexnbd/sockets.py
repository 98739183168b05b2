"""Socket plumbing shared by the servers and clients: addresses, listeners, socket options."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import stat
import struct
from collections.abc import Callable

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


def host_port(host: str, port: int) -> str:
    """``10.0.0.2:10809``, ``[::1]:10809``: an address and port as one token."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def unix_listener(path: str, backlog: int = 64, mode: int = 0o600) -> socket.socket:
    """Listen on a Unix socket at ``path`` with file mode ``mode`` (exactly: the umask does not
    apply). A stale socket file (nobody answers behind it) is replaced; a live one is an error.

    Under an exclusive flock on ``PATH.lock`` (left in place: removing it would let a third
    server lock another file): two servers starting at once cannot both find the file stale
    and remove each other's live socket."""
    try:
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise FlexnbdError(f"cannot lock {path}.lock: {e.strerror}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return _unix_listener_locked(path, backlog, mode)
    finally:
        os.close(lock_fd)


def _unix_listener_locked(path: str, backlog: int, mode: int) -> socket.socket:
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
    # Bind under a temporary name, set the mode (before listen(), so nobody can connect
    # through looser permissions), listen, then link it into place: the socket file appears
    # only once connections to it are accepted, with its final mode.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock.bind(tmp)
        try:
            os.chmod(tmp, mode)
            sock.listen(backlog)
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


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of a Unix-socket peer (SO_PEERCRED); None if it cannot be told."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class AcceptBackoff:
    """What an accept loop does when accept() fails for want of descriptors or memory
    (EMFILE, ENFILE, ENOBUFS, ENOMEM): wait before trying again, doubling from 50 ms to 1 s,
    and log once per burst instead of once per failure."""

    SCARCE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
    FIRST = 0.05
    MOST = 1.0

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._delay = 0.0
        self._failures = 0

    def failed(self, e: OSError) -> float:
        """Seconds to wait before the next accept (0: go on at once)."""
        if e.errno not in self.SCARCE:
            self._log(f"accept failed: {e.strerror or e}")
            return 0.0
        if self._failures == 0:
            self._log(f"accept failed: {e.strerror}; pausing new connections until "
                      "descriptors are free")
        self._failures += 1
        self._delay = min(self.MOST, self._delay * 2 if self._delay else self.FIRST)
        return self._delay

    def succeeded(self) -> None:
        if self._failures:
            self._log(f"accepting again after {self._failures} failed accept(s)")
        self._failures = 0
        self._delay = 0.0


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


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_SNDTIMEO / SO_RCVTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


def reset_on_close(sock: socket.socket) -> None:
    """Make close() end a TCP connection with a reset (SO_LINGER 0) instead of a FIN, so the
    peer can tell it from an orderly close. (A Unix socket has no reset: nothing changes.)"""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass   # already gone: there is nothing left to tell the peer


def shutdown(sock: socket.socket) -> None:
    """Shut both directions down: a thread blocked on the socket returns at once, and the peer
    sees the connection end. (The descriptor stays open until close().)"""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass   # already gone


def close_normally(sock: socket.socket) -> None:
    """Undo reset_on_close: close() then ends the connection with a FIN."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
    except OSError:
        pass


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
        return host_port(peer[0], peer[1])
    return peer or "unix"

"""Socket plumbing shared by the servers and clients: addresses, listeners, socket options."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
from collections.abc import Callable

from flexnbd import hosts
from flexnbd.errors import FlexnbdError


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


def tcp_listeners(host: str, port: int,
                  backlog: int = 64) -> tuple[list[tuple[socket.socket, str]], list[str]]:
    """Listen on every address of ``host`` (``flexnbd.hosts``): ([(socket, "ADDR port
    PORT")], [why each address that could not be bound was not]). ``0`` is one socket for both
    families, or IPv4 alone where the system has no IPv6. FlexnbdError if no address can be
    bound (saying why for each)."""
    if host in (hosts.ANY, "::"):
        try:
            return [(tcp_listener("::", port, backlog), f":: (IPv6 and IPv4) port {port}")], []
        except FlexnbdError as e:
            if not isinstance(e.__cause__, OSError) or e.__cause__.errno not in _NO_IPV6:
                raise
        return [(tcp_listener("0.0.0.0", port, backlog), f"0.0.0.0 port {port}")], []
    bound: list[tuple[socket.socket, str]] = []
    failures: list[str] = []
    for addr in hosts.resolve(host):
        try:
            bound.append((tcp_listener(addr, port, backlog), f"{addr} port {port}"))
        except FlexnbdError as e:
            failures.append(str(e))
    if not bound:
        raise FlexnbdError("; ".join(failures))
    return bound, failures


# What says "this system has no IPv6" when binding ::.
_NO_IPV6 = (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT)


def tcp_listener(addr: str, port: int, backlog: int = 64) -> socket.socket:
    """Listen on one address literal (``::`` takes IPv4 too)."""
    try:
        sock = socket.socket(family_of(addr), socket.SOCK_STREAM)
    except OSError as e:
        raise FlexnbdError(f"cannot listen on {addr} port {port}: {e.strerror}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sock.family == socket.AF_INET6 and addr == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((addr, port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise FlexnbdError(f"cannot listen on {addr} port {port}: {e.strerror}") from e
    return sock


class OwnedPath:
    """A Unix socket file this process made, with the lock on ``PATH.lock`` that it holds for
    as long as it serves there: another server finds the lock taken and stops at once; the
    lock of a process that was killed is free again, and its files are reclaimed. ``remove()``
    (on a clean exit) removes both files, each only if it is still the one we made."""

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd
        st = os.stat(path)
        self._ino = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        if self._lock_fd < 0:
            return
        _unlink_if(self.path, self._ino)
        lock = os.fstat(self._lock_fd)
        # (removed while still locked: a server waiting to lock it re-checks the name, below)
        _unlink_if(f"{self.path}.lock", (lock.st_dev, lock.st_ino))
        os.close(self._lock_fd)
        self._lock_fd = -1


def _unlink_if(path: str, ino: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ino:
            os.unlink(path)
    except OSError:
        pass


def unix_listener(path: str, backlog: int = 64,
                  mode: int = 0o600) -> tuple[socket.socket, OwnedPath]:
    """Listen on a Unix socket at ``path`` with file mode ``mode`` (exactly: the umask does not
    apply). A stale socket file (nobody answers behind it, and nobody holds its lock) is
    replaced; a live one is an error."""
    lock_fd = _lock(path)
    try:
        sock = _unix_listener_locked(path, backlog, mode)
        return sock, OwnedPath(path, lock_fd)
    except BaseException:
        os.close(lock_fd)
        raise


def _lock(path: str) -> int:
    """An exclusive flock on ``PATH.lock``, held until the descriptor is closed."""
    lock_path = f"{path}.lock"
    for _ in range(100):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise FlexnbdError(f"cannot lock {lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FlexnbdError(f"{path} is already in use by a running server") from None
        except OSError as e:
            os.close(fd)
            raise FlexnbdError(f"cannot lock {lock_path}: {e.strerror}") from None
        # Its owner may have removed the file (a clean exit) between our open and our flock:
        # then we hold the lock of a file nobody else will open; take the new name's.
        held = os.fstat(fd)
        try:
            st = os.stat(lock_path)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise FlexnbdError(f"cannot lock {lock_path}: it keeps being replaced")


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


def connect(host: str | tuple[str, ...], port: int, bind: str | tuple[str, ...] | None = None,
            timeout: float = 15.0) -> socket.socket:
    """Connect to an NBD server, optionally from ``bind``; the socket is left blocking.
    ``host``: a name or literal (resolved here), or the addresses a name resolved to once; each
    is tried in order until one connects (the error of the last one tried is raised). ``bind``
    likewise; its address of each destination's family is used. A wildcard ``bind`` (0.0.0.0,
    ::) binds nothing in particular: it is ignored."""
    addresses = hosts.resolve(host) if isinstance(host, str) else host
    sources = local_addresses(bind) if isinstance(bind, str) else bind or ()
    error: OSError | None = None
    for addr in addresses:
        source = next((a for a in sources if family_of(a) == family_of(addr)), None)
        if sources and source is None:
            error = OSError(errno.EAFNOSUPPORT, f"--bind {bind} has no address of the family "
                                                f"of {addr}")
            continue
        try:
            return _connect_one(addr, port, source, timeout)
        except OSError as e:
            error = e
    assert error is not None
    raise error


def local_addresses(bind: str | None) -> tuple[str, ...]:
    """The addresses of a ``--bind``: none for a wildcard (it binds nothing in particular)."""
    if not bind or bind in ("0.0.0.0", "::", hosts.ANY):
        return ()
    return hosts.resolve(bind)


def _connect_one(addr: str, port: int, bind: str | None, timeout: float) -> socket.socket:
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


def peer_address(sock: socket.socket) -> str:
    """The address a connected TCP socket reached ("?" if it cannot be told)."""
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


def peer_name(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(peer, tuple):
        host = str(peer[0])
        # an IPv4 client of a dual-stack socket: named as IPv4, as a v4 socket would
        return host_port(host.removeprefix("::ffff:") if host.startswith("::ffff:") and
                         "." in host else host, peer[1])
    return peer or "unix"

"""systemd socket activation (sd_listen_fds(3)), without libsystemd.

A socket unit (``contrib/flexnbd.socket``) makes systemd create the listening sockets and hand
them to the service it starts: descriptors 3 .. 3+LISTEN_FDS-1, announced in the environment
as ``LISTEN_PID`` (the process they are for) and ``LISTEN_FDS`` (how many), with
``LISTEN_FDNAMES`` beside them. The servers then accept on those sockets instead of binding
their own, so the port or path stays open (connections wait in its backlog) while the service
restarts.

The rules are sd_listen_fds(3)'s:

- The variables count only when LISTEN_PID is this process's id: a process that inherited
  them from its parent ignores them. LISTEN_FDS missing or 0 means no sockets.
- All three variables are removed from the environment once read (whether or not they were
  for this process, and whether or not the sockets turn out usable), so that no child
  inherits them; each passed descriptor gets FD_CLOEXEC.
- A LISTEN_PID or LISTEN_FDS that is not a number is an error.

And flexnbd's: each descriptor must be a listening (SO_ACCEPTCONN) stream socket of family
AF_INET, AF_INET6 or AF_UNIX; anything else (a file, a datagram socket, the single connection
of an ``Accept=yes`` unit) is an error that says which descriptor and why. The sockets replace
``--addr``/``--port``/``--unix``; giving those as well is a usage error.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping, Sequence

from flexnbd.errors import FlexnbdError, UsageError

SD_LISTEN_FDS_START = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
# For `help MODE`.
HELP = ("Socket activation: started by systemd with listening sockets (LISTEN_PID and "
        "LISTEN_FDS for this process; see contrib/flexnbd.socket), it serves on those "
        "instead: leave out {options} then.")


def listen_fds(environ: MutableMapping[str, str] | None = None, pid: int | None = None,
               first: int = SD_LISTEN_FDS_START) -> list[int]:
    """The descriptors systemd passed to this process ([] when none were), marked FD_CLOEXEC;
    LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from ``environ`` (os.environ by
    default) in every case. FlexnbdError for variables that are not numbers or a descriptor
    that is not open."""
    env = os.environ if environ is None else environ
    try:
        return _listen_fds(env, os.getpid() if pid is None else pid, first)
    finally:
        for name in VARIABLES:
            env.pop(name, None)


def _listen_fds(env: MutableMapping[str, str], pid: int, first: int) -> list[int]:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return []
    if not _is_number(pid_text) or int(pid_text) == 0:
        raise FlexnbdError(f"socket activation: LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != pid:
        return []                        # meant for another process (our parent, say)
    count_text = env.get("LISTEN_FDS")
    if count_text is None:
        return []
    if not _is_number(count_text):
        raise FlexnbdError(f"socket activation: LISTEN_FDS={count_text!r} is not a number of "
                           "descriptors")
    fds = range(first, first + int(count_text))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            raise FlexnbdError(f"socket activation: descriptor {fd} is not open "
                               f"(LISTEN_FDS={count_text} passes {first}..{fds[-1]})") from None
    return list(fds)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9


def listening_sockets(fds: Sequence[int]) -> list[socket.socket]:
    """Each descriptor as a socket object (which then owns it). FlexnbdError, saying which
    descriptor and why, unless every one is a listening stream socket of family AF_INET,
    AF_INET6 or AF_UNIX; the descriptors are then left as they were."""
    found: list[socket.socket] = []
    try:
        for fd in fds:
            found.append(_listening_socket(fd))
    except BaseException:
        for sock in found:
            sock.detach()
        raise
    return found


def _listening_socket(fd: int) -> socket.socket:
    what = f"socket activation: descriptor {fd}"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise FlexnbdError(f"{what}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise FlexnbdError(f"{what} is not a socket (flexnbd needs listening stream sockets: "
                           "ListenStream= in the .socket unit)")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family not in FAMILIES:
            family = getattr(sock.family, "name", str(sock.family))
            raise FlexnbdError(f"{what} is an {family} socket; flexnbd serves AF_INET, AF_INET6 "
                               "or AF_UNIX")
        if sock.type != socket.SOCK_STREAM:
            kind = "datagram" if sock.type == socket.SOCK_DGRAM else \
                getattr(sock.type, "name", str(sock.type))
            raise FlexnbdError(f"{what} is a {kind} socket, not a stream socket (ListenStream= "
                               "in the .socket unit)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise FlexnbdError(f"{what} ({describe(sock)}) is not listening: flexnbd needs "
                               "Accept=no in the .socket unit (Accept=yes passes one "
                               "connection)")
    except BaseException:
        sock.detach()
        raise
    return sock


def inherited_sockets(given: Sequence[str] = (), environ: MutableMapping[str, str] | None = None,
                      pid: int | None = None,
                      first: int = SD_LISTEN_FDS_START) -> list[socket.socket]:
    """The listening sockets systemd passed to this process, checked (see the module's
    rules); [] when there are none. ``given`` names the options that say where to listen
    (e.g. ``["--addr", "--port"]``) that the command line has: with sockets passed, that is
    a UsageError naming them."""
    fds = listen_fds(environ, pid, first)
    if fds and given:
        options = "/".join(given)
        raise UsageError(f"{options} and socket activation exclude each other (systemd passed "
                         f"LISTEN_FDS={len(fds)}): drop {options} to serve on the passed "
                         "socket(s)")
    return listening_sockets(fds)


def is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def describe(sock: socket.socket) -> str:
    """Where a listening socket listens: ``127.0.0.1:10809``, ``[::]:10809``, a path, or
    ``@name`` for an abstract Unix socket."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"descriptor {sock.fileno()}"
    if isinstance(name, tuple):
        host, port = name[0], name[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(name, bytes):              # abstract: a leading NUL
        text = name.decode(errors="replace")
        return "@" + text[1:] if text.startswith("\0") else text or "an unnamed Unix socket"
    if name.startswith("\0"):
        return "@" + name[1:]
    return name or "an unnamed Unix socket"


def served(sock: socket.socket) -> str:
    """How the start-up log names an inherited socket."""
    return f"inherited socket {describe(sock)} (systemd)"

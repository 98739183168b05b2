"""An LD_PRELOAD shim that widens a race window: every connect() on a Unix-domain socket is made
at once, but returns to its caller only ``SLOWPROBE_MS`` milliseconds later (with its real
result). A server that probes a socket file ("is anyone listening?") and then acts on the
answer acts on a stale answer, as it would on a loaded host: two servers starting together
with the same ``--sock`` then both see a stale file, unless something (a lock) orders them.

``build(directory)`` compiles it with gcc into ``directory/slowprobe.so``;
``environment(lib, ms)`` is the environment to run a process under it.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.shim import build_shim

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    static int (*real)(int, const struct sockaddr *, socklen_t);
    int rc, saved;
    const char *ms_text = getenv("SLOWPROBE_MS");
    if (real == NULL)
        real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    rc = real(fd, addr, len);
    saved = errno;
    if (ms_text != NULL && addr != NULL && addr->sa_family == AF_UNIX) {
        long ms = atol(ms_text);
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    errno = saved;
    return rc;
}
"""


def build(directory: Path) -> Path:
    """Compile the shim into ``directory``; its path."""
    return build_shim(directory, "slowprobe", SOURCE)


def environment(lib: Path, ms: int) -> dict[str, str]:
    preload = os.environ.get("LD_PRELOAD")
    return {"LD_PRELOAD": f"{lib} {preload}" if preload else str(lib), "SLOWPROBE_MS": str(ms)}

"""An LD_PRELOAD shim that watches (and can disturb) how a process makes one file durable:
fdatasync, fsync, sync_file_range and pwritev2, for the tests of SPEC §11 ("an I/O error is
never forgotten", "a FUA request's range is durable before its reply") and of the listener's
final sync (§6.7).

``build(directory)`` compiles the C source below with gcc into ``directory/syncspy.so`` (once
per directory) and returns its path; ``environment(lib, path, ...)`` is the environment to run
a process under it. Only calls on a descriptor of the file ``SYNCSPY_PATH`` (same device and
inode) are watched; every other descriptor passes straight through.

- ``SYNCSPY_LOG=FILE``: one line per watched call, appended with a single write once the call
  returned: ``FUNCTION flags=0xF rc=R`` (flags: pwritev2's RWF_* or sync_file_range's; 0 for
  the syncs). ``calls(log)`` parses it; ``durable(call)`` tells a call that made data durable
  (fdatasync, fsync, or pwritev2 with RWF_DSYNC or RWF_SYNC) and succeeded.
- ``SYNCSPY_FAIL_ONCE_FLAG=FILE``: the first fdatasync or fsync after FILE exists fails with
  EIO without syncing anything; every other call passes (exactly one failure per process).
- ``SYNCSPY_SLEEP_FLAG=FILE`` with ``SYNCSPY_SLEEP_MS=N``: while FILE exists, every fdatasync
  and fsync sleeps N ms before it syncs (a slow disk at a moment the test chooses); the log
  gets a ``sleep flags=N rc=0`` line when the sleep begins.

Python's ``os.fdatasync`` and the compiled hot path (``_core``'s extern functions) both call the
libc symbols through the dynamic linker, so both are caught.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.support.shim import build_shim

RWF_DSYNC = 0x2
RWF_SYNC = 0x4

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static int failed_once;

/* 1 when fd is the file SYNCSPY_PATH names. */
static int is_target(int fd)
{
    const char *path = getenv("SYNCSPY_PATH");
    struct stat a, b;
    int saved = errno, yes;
    if (path == NULL || fstat(fd, &a) < 0 || stat(path, &b) < 0) {
        errno = saved;
        return 0;
    }
    yes = a.st_dev == b.st_dev && a.st_ino == b.st_ino;
    errno = saved;
    return yes;
}

static int flag_exists(const char *name)
{
    const char *flag = getenv(name);
    int saved = errno, yes;
    if (flag == NULL)
        return 0;
    yes = access(flag, F_OK) == 0;
    errno = saved;
    return yes;
}

static void record(const char *function, long flags, long rc)
{
    const char *log = getenv("SYNCSPY_LOG");
    int saved = errno;
    if (log != NULL) {
        int lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (lfd >= 0) {
            char line[160];
            int len = snprintf(line, sizeof line, "%s flags=0x%lx rc=%ld\n", function, flags,
                               rc);
            if (len > 0 && write(lfd, line, (size_t)len) < 0) {
                /* nothing to do: the log is only for the test */
            }
            close(lfd);
        }
    }
    errno = saved;
}

/* Before a watched fdatasync/fsync: sleep if asked; 1 when this call must fail. */
static int before_sync(void)
{
    if (flag_exists("SYNCSPY_SLEEP_FLAG")) {
        const char *ms_text = getenv("SYNCSPY_SLEEP_MS");
        long ms = ms_text ? atol(ms_text) : 0;
        struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
        record("sleep", ms, 0);
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    if (flag_exists("SYNCSPY_FAIL_ONCE_FLAG")) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&failed_once, &expected, 1, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    int rc;
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (!is_target(fd))
        return real(fd);
    if (before_sync()) {
        record("fdatasync", 0, -EIO);
        errno = EIO;
        return -1;
    }
    rc = real(fd);
    record("fdatasync", 0, rc < 0 ? -errno : rc);
    return rc;
}

int fsync(int fd)
{
    static int (*real)(int);
    int rc;
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (!is_target(fd))
        return real(fd);
    if (before_sync()) {
        record("fsync", 0, -EIO);
        errno = EIO;
        return -1;
    }
    rc = real(fd);
    record("fsync", 0, rc < 0 ? -errno : rc);
    return rc;
}

int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)
{
    static int (*real)(int, off_t, off_t, unsigned int);
    int rc;
    if (real == NULL)
        real = (int (*)(int, off_t, off_t, unsigned int))dlsym(RTLD_NEXT, "sync_file_range");
    rc = real(fd, offset, nbytes, flags);
    if (is_target(fd))
        record("sync_file_range", (long)flags, rc < 0 ? -errno : rc);
    return rc;
}

static ssize_t spy_pwritev2(const char *name, int fd, const struct iovec *iov, int iovcnt,
                            off_t offset, int flags)
{
    static ssize_t (*real)(int, const struct iovec *, int, off_t, int);
    ssize_t rc;
    if (real == NULL)
        real = (ssize_t (*)(int, const struct iovec *, int, off_t, int))dlsym(RTLD_NEXT,
                                                                               "pwritev2");
    rc = real(fd, iov, iovcnt, offset, flags);
    if (is_target(fd))
        record(name, (long)flags, rc < 0 ? -errno : (long)rc);
    return rc;
}

ssize_t pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    return spy_pwritev2("pwritev2", fd, iov, iovcnt, offset, flags);
}

ssize_t pwritev64v2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags)
{
    return spy_pwritev2("pwritev2", fd, iov, iovcnt, offset, flags);
}
"""


@dataclass(frozen=True)
class Call:
    function: str
    flags: int
    rc: int


def build(directory: Path) -> Path:
    """Compile the shim into ``directory``; its path."""
    return build_shim(directory, "syncspy", SOURCE)


def environment(lib: Path, path: Path, log: Path | None = None,
                fail_once_flag: Path | None = None, sleep_flag: Path | None = None,
                sleep_ms: int = 0) -> dict[str, str]:
    """The environment for a process whose calls on ``path`` are watched (see the module)."""
    preload = os.environ.get("LD_PRELOAD")
    env = {"LD_PRELOAD": f"{lib} {preload}" if preload else str(lib),
           "SYNCSPY_PATH": str(path)}
    if log is not None:
        env["SYNCSPY_LOG"] = str(log)
    if fail_once_flag is not None:
        env["SYNCSPY_FAIL_ONCE_FLAG"] = str(fail_once_flag)
    if sleep_flag is not None:
        env["SYNCSPY_SLEEP_FLAG"] = str(sleep_flag)
        env["SYNCSPY_SLEEP_MS"] = str(sleep_ms)
    return env


def calls(log: Path) -> list[Call]:
    """The watched calls so far, in order."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        function, flags, rc = line.split()
        out.append(Call(function, int(flags.split("=")[1], 16), int(rc.split("=")[1])))
    return out


def durable(call: Call) -> bool:
    """The call made data durable (and succeeded)."""
    if call.rc < 0:
        return False
    if call.function in ("fdatasync", "fsync"):
        return True
    if call.function == "sleep":
        return False
    return call.function == "pwritev2" and bool(call.flags & (RWF_DSYNC | RWF_SYNC))

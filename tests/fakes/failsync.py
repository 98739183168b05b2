"""An LD_PRELOAD shim that makes fdatasync() and fsync() fail with EIO, for tests of what a
`flexnbd listen` does when it cannot make a received migration durable (SPEC §6.7).

``build(directory)`` compiles the C source below with gcc into ``directory/failsync.so`` (once
per directory) and returns its path; ``environment(lib, path, skip=..., log=...)`` is the
environment to run a process under it. The shim only touches calls on a descriptor of the
file ``FLEXNBD_TEST_FAILSYNC_PATH`` (same device and inode; every other descriptor passes
through), and counts them, 1, 2, 3, ... across fdatasync and fsync and across threads:

- ``FLEXNBD_TEST_FAILSYNC_SKIP=N``: the first N calls pass (to the real function); every later
  call fails with EIO without syncing anything;
- ``FLEXNBD_TEST_FAILSYNC_FLAG=FILE`` (optional): a call past the first N fails only while FILE
  exists (so a test can choose the moment);
- ``FLEXNBD_TEST_FAILSYNC_LOG=FILE`` (optional): one line per counted call, ``N FUNCTION fd=FD
  ok|EIO``, appended with a single write, so a test can say which call failed.

Python's ``os.fdatasync`` and the compiled hot path (``_core``'s extern fdatasync) both call the
libc symbol through the dynamic linker, so both are caught.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.shim import build_shim

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static long calls;

/* 1 when fd is the file FLEXNBD_TEST_FAILSYNC_PATH names. */
static int is_target(int fd)
{
    const char *path = getenv("FLEXNBD_TEST_FAILSYNC_PATH");
    struct stat a, b;
    if (path == NULL || fstat(fd, &a) < 0 || stat(path, &b) < 0)
        return 0;
    return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

/* 1 when this call must fail. */
static int must_fail(int fd, const char *function)
{
    int saved = errno;
    if (!is_target(fd)) {
        errno = saved;
        return 0;
    }
    long n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    const char *skip_text = getenv("FLEXNBD_TEST_FAILSYNC_SKIP");
    const char *flag = getenv("FLEXNBD_TEST_FAILSYNC_FLAG");
    const char *log = getenv("FLEXNBD_TEST_FAILSYNC_LOG");
    long skip = skip_text ? atol(skip_text) : 0;
    int fail = n > skip && (flag == NULL || access(flag, F_OK) == 0);
    if (log != NULL) {
        int lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (lfd >= 0) {
            char line[160];
            int len = snprintf(line, sizeof line, "%ld %s fd=%d %s\n", n, function, fd,
                               fail ? "EIO" : "ok");
            if (len > 0 && write(lfd, line, (size_t)len) < 0) {
                /* nothing to do: the log is only for the test's messages */
            }
            close(lfd);
        }
    }
    errno = saved;
    return fail;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (must_fail(fd, "fdatasync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}

int fsync(int fd)
{
    static int (*real)(int);
    if (real == NULL)
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (must_fail(fd, "fsync")) {
        errno = EIO;
        return -1;
    }
    return real(fd);
}
"""


def build(directory: Path) -> Path:
    """Compile the shim into ``directory``; its path."""
    return build_shim(directory, "failsync", SOURCE)


def environment(lib: Path, path: Path, skip: int = 0, log: Path | None = None,
                flag: Path | None = None) -> dict[str, str]:
    """The environment for a process whose syncs of ``path`` fail after the first ``skip``."""
    preload = os.environ.get("LD_PRELOAD")
    env = {"LD_PRELOAD": f"{lib} {preload}" if preload else str(lib),
           "FLEXNBD_TEST_FAILSYNC_PATH": str(path),
           "FLEXNBD_TEST_FAILSYNC_SKIP": str(skip)}
    if log is not None:
        env["FLEXNBD_TEST_FAILSYNC_LOG"] = str(log)
    if flag is not None:
        env["FLEXNBD_TEST_FAILSYNC_FLAG"] = str(flag)
    return env


def calls(log: Path) -> list[tuple[int, str, str]]:
    """The calls the shim counted: (number, function, ok|EIO)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        n, function, _fd, result = line.split()
        out.append((int(n), function, result))
    return out

"""The EIO shim: an LD_PRELOAD library that makes the writes or the syncs of one file fail with
EIO, once or until told to stop, switched at run time by a control file.

The process to fault runs with ``environment(lib, target, control, log)``. Calls on the
target file (same device and inode as ``target`` when the process first touched it) look at
the control file (one stat per call, re-read when its mtime changes): ``write once N``,
``write always N``, ``sync once N``, ``sync always N``, or absent/empty: pass. ``once`` fails
one call per generation N (a new N arms it again). "write" covers pwrite, pwrite64, pwritev2,
the splice into the file and fallocate; "sync" covers fdatasync, fsync and sync_file_range.
Each injected failure appends one line to the log file: ``FUNCTION fd=FD EIO``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { PASS, ONCE, ALWAYS };
enum { OP_WRITE, OP_SYNC };

static dev_t target_dev;
static ino_t target_ino;
static int target_known;
static struct timespec seen_mtime;
static ino_t seen_ino;
static int mode[2];
static long generation[2];
static long spent[2];        /* generation whose "once" was used */

static int is_target(int fd) {
    struct stat st;
    if (!target_known) {
        const char *path = getenv("CHAOS_EIO_TARGET");
        if (path == NULL || stat(path, &st) != 0)
            return 0;
        target_dev = st.st_dev;
        target_ino = st.st_ino;
        target_known = 1;
    }
    return fstat(fd, &st) == 0 && st.st_dev == target_dev && st.st_ino == target_ino;
}

static void reload(void) {
    const char *path = getenv("CHAOS_EIO_CONTROL");
    struct stat st;
    if (path == NULL || stat(path, &st) != 0) {
        mode[0] = mode[1] = PASS;
        seen_ino = 0;
        return;
    }
    /* (the switch replaces the file: a new inode each time) */
    if (st.st_ino == seen_ino && st.st_mtim.tv_sec == seen_mtime.tv_sec &&
        st.st_mtim.tv_nsec == seen_mtime.tv_nsec)
        return;
    char buf[64] = {0};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0)
        return;
    seen_mtime = st.st_mtim;
    seen_ino = st.st_ino;
    mode[0] = mode[1] = PASS;
    char op[16], how[16];
    long gen;
    if (sscanf(buf, "%15s %15s %ld", op, how, &gen) == 3) {
        int i = strcmp(op, "sync") == 0 ? OP_SYNC : OP_WRITE;
        mode[i] = strcmp(how, "always") == 0 ? ALWAYS : ONCE;
        generation[i] = gen;
    }
}

/* 1 when this call must fail (and then it is logged). */
static int inject(int op, int fd, const char *function) {
    if (!is_target(fd))
        return 0;
    reload();
    if (mode[op] == PASS)
        return 0;
    if (mode[op] == ONCE) {
        long gen = generation[op];
        long before = __atomic_load_n(&spent[op], __ATOMIC_SEQ_CST);
        if (before == gen ||
            !__atomic_compare_exchange_n(&spent[op], &before, gen, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST))
            return 0;
    }
    const char *log = getenv("CHAOS_EIO_LOG");
    if (log != NULL) {
        char line[96];
        int len = snprintf(line, sizeof line, "%s fd=%d EIO\n", function, fd);
        int lfd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (lfd >= 0) {
            if (write(lfd, line, (size_t)len) < 0) { /* nothing to do */ }
            close(lfd);
        }
    }
    errno = EIO;
    return 1;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite);
    return inject(OP_WRITE, fd, "pwrite") ? -1 : real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite64);
    return inject(OP_WRITE, fd, "pwrite64") ? -1 : real(fd, buf, n, off);
}

ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags) {
    REAL(pwritev2);
    return inject(OP_WRITE, fd, "pwritev2") ? -1 : real(fd, iov, cnt, off, flags);
}

ssize_t splice(int in, loff_t *in_off, int out, loff_t *out_off, size_t n,
               unsigned int flags) {
    REAL(splice);
    return inject(OP_WRITE, out, "splice") ? -1 : real(in, in_off, out, out_off, n, flags);
}

int fallocate(int fd, int how, off_t off, off_t len) {
    REAL(fallocate);
    return inject(OP_WRITE, fd, "fallocate") ? -1 : real(fd, how, off, len);
}

int fdatasync(int fd) {
    REAL(fdatasync);
    return inject(OP_SYNC, fd, "fdatasync") ? -1 : real(fd);
}

int fsync(int fd) {
    REAL(fsync);
    return inject(OP_SYNC, fd, "fsync") ? -1 : real(fd);
}

int sync_file_range(int fd, off_t off, off_t n, unsigned int flags) {
    REAL(sync_file_range);
    return inject(OP_SYNC, fd, "sync_file_range") ? -1 : real(fd, off, n, flags);
}
"""


def build(directory: Path) -> Path:
    """Compile the shim into ``directory/eio.so`` (once); its path."""
    lib = directory / "eio.so"
    if not lib.exists():
        src = directory / "eio.c"
        src.write_text(SOURCE)
        res = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                              str(lib), str(src), "-ldl"], capture_output=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"building the EIO shim failed:\n{res.stderr.decode()}")
    return lib


def environment(lib: Path, target: Path, control: Path, log: Path) -> dict[str, str]:
    """The variables that put a process under the shim."""
    return {"LD_PRELOAD": str(lib), "CHAOS_EIO_TARGET": str(target),
            "CHAOS_EIO_CONTROL": str(control), "CHAOS_EIO_LOG": str(log)}


class Switch:
    """One process's control file: ``fail(op, always)`` arms it, ``clear()`` disarms."""

    def __init__(self, control: Path) -> None:
        self.control = control
        self.generation = 0

    def fail(self, op: str, always: bool) -> None:
        self.generation += 1
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(f"{op} {'always' if always else 'once'} {self.generation}\n")
        os.replace(tmp, self.control)

    def clear(self) -> None:
        self.control.unlink(missing_ok=True)

"""Shared pieces of the benchmark scripts (run.py, sparse.py, migration.py, proxy.py, tls.py,
ci.py); the scripts import this module and run.py's rows, never each other otherwise.

Constants, the data files, starting and stopping servers with readiness by NBD handshake,
flexnbd and flexnbd-proxy command lines and their timestamped logs, a tiny NBD client, the
loopback yardsticks (a timed sendfile, a counting splice relay), CPU accounting from /proc,
dropping the page cache and disk counters, running clients, machine facts, number formatting,
the ratio marker and where results go.
Standard library only.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

MiB = 1 << 20
GiB = 1 << 30
HOST = "127.0.0.1"  # all traffic stays on loopback
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_WORKDIR = "/var/tmp/flexnbd-bench"  # /var/tmp: real disk, and kept between runs
HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"  # one JSON per benchmark, from the last full run (`make bench`)
OUT_DIR = HERE / "out"  # quick runs and CI (git-ignored)
RATIO_MARK = 0.8  # a ratio against the best peer under this is marked "<< 0.80" (not an error)
IHAVEOPT = b"IHAVEOPT"
SERVER_NAMES = ("flexnbd", "nbdkit", "qemu-nbd", "nbd-server")
# The export every client asks for. nbd-server has no default export (it refuses the empty
# name that `nbd://HOST:PORT/` asks for) and qemu-nbd serves only the name given with -x;
# flexnbd and nbdkit's file plugin serve the file under any name. So one name for all four.
EXPORT = "bench"
PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """'2G', '512M', '1048576' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


# ---------------------------------------------------------------- the data file


def make_data_file(path: Path, size: int) -> None:
    """Create PATH with SIZE random bytes, or reuse it if it already has that size.

    Plain os.urandom: the kernel's ChaCha generator does a few hundred MB/s, so 2 GiB
    takes seconds, and the data neither compresses nor dedupes.
    """
    if path.exists() and path.stat().st_size == size:
        log(f"reusing {path} ({size / GiB:.2f} GiB)")
        return
    log(f"writing {size / GiB:.2f} GiB of random data to {path} ...")
    start = time.monotonic()
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 64 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    log(f"  done in {time.monotonic() - start:.1f} s")


def make_sparse_file(path: Path, size: int, data: int, piece: int = MiB, seed: int = 1) -> None:
    """Create PATH: SIZE bytes of which DATA bytes are random data, in PIECE-sized pieces at
    random PIECE-aligned offsets (fixed seed, so every run gets the same layout), the rest
    holes. Reused if it exists with that size and about that much allocated."""
    if path.exists():
        st = path.stat()
        if st.st_size == size and abs(st.st_blocks * 512 - data) < piece:
            log(f"reusing {path} ({size / GiB:.2f} GiB, {data / MiB:.0f} MiB of data)")
            return
    log(f"writing {path}: {size / GiB:.2f} GiB with {data / MiB:.0f} MiB of scattered data ...")
    slots = sorted(random.Random(seed).sample(range(size // piece), data // piece))
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for slot in slots:
            os.pwrite(fd, os.urandom(piece), slot * piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.rename(path)


def allocated_bytes(path: Path) -> int:
    """Blocks allocated to PATH, in bytes (ext4's extent-tree blocks included)."""
    return path.stat().st_blocks * 512


def data_runs(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of the data in the first SIZE bytes of FD, by SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        pos = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, pos))
    return out


def seek_extents(fd: int, size: int) -> tuple[int, int]:
    """(data extents, data bytes) of the first SIZE bytes of FD, by SEEK_DATA/SEEK_HOLE."""
    runs = data_runs(fd, size)
    return len(runs), sum(end - start for start, end in runs)


def data_bytes(path: Path) -> int:
    """Bytes of PATH in data extents, by SEEK_DATA/SEEK_HOLE (the file's size minus its
    holes, exactly as a server that maps holes sees it; st_blocks also counts metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return seek_extents(fd, path.stat().st_size)[1]
    finally:
        os.close(fd)


def size_text(n: int) -> str:
    """Bytes as '2 GiB', '256 MiB', '1 TiB'."""
    for unit, name in ((1 << 40, "TiB"), (GiB, "GiB"), (MiB, "MiB")):
        if n >= unit:
            return f"{n / unit:g} {name}"
    return f"{n:,} bytes"


def settle(path: Path) -> None:
    """Flush dirty pages from earlier writes, then pull the whole file into the page cache,
    so every row and every server starts from the same state."""
    os.sync()
    buf = bytearray(16 * MiB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def drop_caches() -> bool:
    """sync, then drop the clean page cache, dentries and inodes (root only), so a sample
    starts with no leftovers of the previous one in memory. False if it could not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class DiskStats:
    """The /proc/diskstats counters of the block device holding PATH (None when the file
    system has no block device of its own, e.g. overlay or tmpfs)."""

    def __init__(self, path: Path):
        st = os.stat(path)
        self.name: str | None = None
        try:
            uevent = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/uevent")
            for line in uevent.read_text().splitlines():
                if line.startswith("DEVNAME="):
                    self.name = line.split("=", 1)[1]
        except OSError:
            pass

    def snapshot(self) -> list[int] | None:
        if self.name is None:
            return None
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) > 3 and f[2] == self.name:
                return [int(x) for x in f[3:]]
        return None

    @staticmethod
    def delta(a: list[int] | None, b: list[int] | None) -> dict | None:
        """What the device did between two snapshots: bytes and requests written, ms spent
        writing, ms with I/O in flight (busy), cache flushes (kernel 5.5+)."""
        if a is None or b is None:
            return None
        d = [y - x for x, y in zip(a, b, strict=True)]
        out = {
            "read_bytes": d[2] * 512,
            "write_bytes": d[6] * 512,
            "writes": d[4],
            "write_ms": d[7],
            "busy_ms": d[9],
        }
        if len(d) >= 17:
            out["flushes"], out["flush_ms"] = d[15], d[16]
        return out


# ---------------------------------------------------------------- servers


def free_port() -> int:
    """An ephemeral port that is free right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_exe(name: str) -> str | None:
    """NAME (flexnbd, flexnbd-proxy) from $FLEXNBD_BENCH_BIN if set (a directory: e.g. another
    build, or a wrapper that makes the server fail, to check that the scripts report it),
    else the one next to this interpreter (the project's .venv), else from PATH."""
    override = os.environ.get("FLEXNBD_BENCH_BIN")
    if override:
        path = Path(override) / name
        return str(path) if path.exists() else None
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def find_flexnbd() -> str | None:
    return find_exe("flexnbd")


def find_proxy() -> str | None:
    return find_exe("flexnbd-proxy")


def nbdkit_has_exit_with_parent(nbdkit: str) -> bool:
    out = subprocess.run([nbdkit, "--help"], capture_output=True, text=True).stdout
    return "--exit-with-parent" in out


def nbd_uri(port: int | str) -> str:
    return f"nbd://{HOST}:{port}/{EXPORT}"


def nbd_server_files(path: Path) -> tuple[Path, Path]:
    """nbd-server's config file and PID file: beside the data file, i.e. in the workdir,
    next to the servers' logs."""
    return path.with_name("nbd-server.conf"), path.with_name("nbd-server.pid")


def nbd_server_config(port: int, path: Path) -> str:
    """Serve PATH as EXPORT on HOST:PORT. Defaults (max_threads 4, no splice, no sync, no
    fua, no trim) but for flush = true: without it nbd-server does not offer NBD_CMD_FLUSH,
    and the fsync rows (fio's fsync is a FLUSH) could not run against it; the rows that do
    not flush never see the difference."""
    return (
        f"[generic]\nlistenaddr = {HOST}\nport = {port}\n"
        f"[{EXPORT}]\nexportname = {path.resolve()}\nflush = true\n"
    )


def server_command(name: str, port: int | str, path: Path) -> list[str] | None:
    """The command line that serves PATH on HOST:PORT, or None if NAME is not installed."""
    if name == "flexnbd":
        exe = find_flexnbd()
        if not exe:
            return None
        return [exe, "serve", "--addr", HOST, "--port", str(port), "--file", str(path)]
    if name == "nbdkit":
        exe = shutil.which("nbdkit")
        if not exe:
            return None
        cmd = [exe, "-f", "-i", HOST, "-p", str(port)]
        if nbdkit_has_exit_with_parent(exe):
            cmd.append("--exit-with-parent")  # no orphan if we are killed hard
        return [*cmd, "file", str(path)]
    if name == "qemu-nbd":
        exe = shutil.which("qemu-nbd")
        if not exe:
            return None
        # -t: keep serving after a client leaves (our port probe is a client too); -x: the
        # export's name (see EXPORT). Defaults otherwise: --cache=writeback, --aio=threads,
        # --shared=1.
        return [exe, "-f", "raw", "-b", HOST, "-p", str(port), "-t", "-x", EXPORT, str(path)]
    if name == "nbd-server":
        exe = shutil.which("nbd-server")
        if not exe:
            return None
        # -C: only our config (nbd_server_config; not /etc/nbd-server/config), -p: where the
        # daemon writes its PID (it always forks into the background: see start_daemon).
        config, pidfile = nbd_server_files(path)
        return [exe, "-C", str(config), "-p", str(pidfile)]
    raise ValueError(name)


def server_version(name: str) -> str:
    if name == "flexnbd":
        try:
            from importlib.metadata import version

            return "flexnbd " + version("flexnbd")
        except Exception:
            return "flexnbd (version unknown)"
    exe = shutil.which(name)
    if not exe:
        return "missing"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].strip() if out else name


class Server:
    """One running server process; a context manager that always stops it."""

    def __init__(
        self, name: str, port: int, path: Path, logpath: Path, cmd: list[str] | None = None
    ):
        """CMD overrides the usual command line for NAME (e.g. flexnbd with a control
        socket, or `flexnbd listen`); it must serve NBD on HOST:PORT."""
        cmd = cmd or server_command(name, port, path)
        assert cmd is not None
        self.name, self.port, self.path, self.cmd, self.logpath = name, port, path, cmd, logpath
        self.proc: subprocess.Popen | AdoptedProcess | None = None
        self.rusage: os.struct_rusage | None = None  # set when wait_exit() reaps it

    def __enter__(self) -> Server:
        self.logfile = open(self.logpath, "ab")
        self.logfile.write(f"\n=== {' '.join(self.cmd)}\n".encode())
        self.logfile.flush()
        if self.name == "nbd-server":
            config, pidfile = nbd_server_files(self.path)
            config.write_text(nbd_server_config(self.port, self.path))
            self.proc = start_daemon(self.cmd, pidfile, self.logfile)
        else:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT
            )
        try:
            self.wait_ready()
        except BaseException:  # __exit__ does not run if __enter__ fails (Ctrl-C too)
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the server completes a handshake (greeting, then NBD_OPT_ABORT)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start")
            try:
                nbd_probe(self.port)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {timeout} s: {e}") from e
            time.sleep(0.05)
        # qemu-nbd serves one client at a time (--shared=1): give it a moment to notice
        # that the probe left before the real client connects. The others serve many.
        if self.name == "qemu-nbd":
            time.sleep(0.3)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for 10 s; killing it")
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to TIMEOUT s for the server to exit on its own (e.g. at the end of a
        migration) and reap it with wait4(), which gives its exact CPU use, all threads and
        reaped children included (self.rusage). Returns the exit status, or None if it is
        still running."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.returncode is None:
            try:
                pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (Popen.poll): no rusage then
                self.proc.poll()
                break
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.rusage = rusage
                break
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return self.proc.returncode

    def cpu_seconds(self) -> float:
        """utime+stime of the server, its threads and its children, live or reaped."""
        assert self.proc is not None
        if self.rusage is not None:  # reaped by wait_exit(): the exact figure
            return self.rusage.ru_utime + self.rusage.ru_stime
        return sum(proc_cpu(pid) for pid in process_tree(self.proc.pid))

    def log_tail(self, lines: int = 15) -> str:
        self.logfile.flush()
        text = self.logpath.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(text) if line.startswith("=== ")]
        return "\n".join(text[starts[-1] + 1 if starts else 0 :][-lines:])


class AdoptedProcess:
    """A child of ours that Popen did not start (a daemon adopted by start_daemon), by PID:
    the part of Popen's interface that Server uses."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        while (status := self.poll()) is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.01)
        return status

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_daemon(cmd: list[str], pidfile: Path, logfile: IO[bytes]) -> AdoptedProcess:
    """Run CMD, a server that forks into the background and writes its PID to PIDFILE, and
    adopt the daemon. nbd-server has no foreground mode that serves more than one client
    (-d serves one session, then exits); as a child subreaper this process becomes the
    daemon's parent when the launcher exits, so it can signal the daemon, reap it and read
    its exit status like any child's (and the daemon is not left, a zombie, to an init
    that may not reap it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    pidfile.unlink(missing_ok=True)  # a stale one, from a server that was killed
    launcher = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT
    )
    if launcher.wait(10) != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited with {launcher.returncode} at start")
    deadline = time.monotonic() + 10
    while True:
        text = pidfile.read_text() if pidfile.exists() else ""
        if text.endswith("\n"):  # written in full
            return AdoptedProcess(int(text))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{Path(cmd[0]).name} wrote no PID to {pidfile} in 10 s")
        time.sleep(0.01)


# ---------------------------------------------------------------- flexnbd and its logs


def flexnbd_cmd(mode: str, port: int, path: Path, sock: Path | None = None) -> list[str]:
    """`flexnbd MODE` (serve, listen) of PATH on HOST:PORT, verbose (-v), with a control
    socket at SOCK if given."""
    exe = find_flexnbd()
    assert exe
    cmd = [exe, mode, "--addr", HOST, "--port", str(port), "--file", str(path)]
    return cmd + (["--sock", str(sock)] if sock is not None else []) + ["-v"]


def proxy_cmd(port: int, upstream: int, cache: str | None) -> list[str]:
    """flexnbd-proxy on HOST:PORT in front of HOST:UPSTREAM, verbose, with --cache=CACHE if
    given."""
    exe = find_proxy()
    assert exe
    cmd = [exe, "--addr", HOST, "--port", str(port), "--conn-addr", HOST]
    cmd += ["--conn-port", str(upstream), "-v"]
    return cmd + ([f"--cache={cache}"] if cache is not None else [])


# A log line (SPEC §9): "<monotonic ms>:<D|I|W|E|F>:<pid> <thread> <module:line>: <message>".
# CLOCK_MONOTONIC is system-wide, so the stamps compare with our own time.monotonic().
LOG_LINE_RE = re.compile(r"^(\d+):[DIWEF]:\d+ ")


def log_lines(path: Path) -> list[tuple[float, str]]:
    """(monotonic s, line) of the timestamped lines of PATH's last section (Server appends
    a '=== command' header per start)."""
    text = path.read_text(errors="replace").split("\n=== ")[-1]
    out = []
    for line in text.splitlines():
        m = LOG_LINE_RE.match(line)
        if m:
            out.append((int(m.group(1)) / 1000, line))
    return out


def log_time(path: Path, text: str, since: float = 0.0) -> float | None:
    """When the first line containing TEXT, logged at SINCE or later, was logged."""
    for t, line in log_lines(path):
        if t >= since - 0.001 and text in line:  # the stamps are whole milliseconds
            return t
    return None


class LoggedServer(Server):
    """A flexnbd process (serve or proxy, with -v) that is ready when it logs ' serving '.

    No readiness probe: the proxy serves one client at a time, and a probe's session would
    have to end before fio could connect."""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at start:\n" + self.log_tail()
                )
            self.logfile.flush()
            if log_time(self.logpath, " serving ") is not None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not serving after {timeout} s")
            time.sleep(0.01)


# ---------------------------------------------------------------- a tiny NBD client


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly N bytes from SOCK; ConnectionError if the server closes first. (The benchmarks'
    one receive loop: standard library only, so not flexnbd.handshake's.)"""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection during the probe")
        data += chunk
    return data


def nbd_greet(s: socket.socket) -> None:
    """Read a fixed-newstyle greeting and send our flags (C_FIXED_NEWSTYLE, and NO_ZEROES if
    the server offers it): S is then in the option haggling."""
    greeting = recv_exact(s, 18)
    if greeting[:16] != b"NBDMAGIC" + IHAVEOPT:
        raise ConnectionError(f"unexpected NBD greeting {greeting!r}")
    (server_flags,) = struct.unpack(">H", greeting[16:])
    s.sendall(struct.pack(">I", 1 | (server_flags & 2)))  # C_FIXED_NEWSTYLE [NO_ZEROES]


def nbd_option(s: socket.socket, opt: int, data: bytes = b"") -> int:
    """Send an option, read replies up to the final one; its type."""
    s.sendall(IHAVEOPT + struct.pack(">II", opt, len(data)) + data)
    while True:
        _, _, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, rlen)
        if rtype != 3:  # NBD_REP_INFO comes before the ACK of NBD_OPT_GO
            return rtype


def nbd_probe(port: int) -> None:
    """Fixed-newstyle greeting, then NBD_OPT_ABORT: a polite client that leaves at once,
    so the servers' logs stay free of 'connection reset' noise."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        nbd_greet(s)
        s.sendall(IHAVEOPT + struct.pack(">II", 2, 0))  # NBD_OPT_ABORT, no data
        try:
            recv_exact(s, 20)  # the ACK (magic, option, type, length 0)
        except ConnectionError:  # nbd-server closes without one, as the protocol allows
            pass


NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CHUNK_TYPES = {0: "NONE", 1: "OFFSET_DATA", 2: "OFFSET_HOLE", 5: "BLOCK_STATUS"}


def nbd_read_chunks(port: int, offset: int, length: int) -> list[str]:
    """Negotiate structured replies, READ [OFFSET, OFFSET+LENGTH) and return the reply chunk
    types ('OFFSET_HOLE' for a hole answered without zero bytes, 'OFFSET_DATA' for bytes,
    'simple' for a server without structured replies). Checks what a server answers for a
    hole; a tiny client so the script needs no libnbd bindings."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        nbd_greet(s)
        structured = nbd_option(s, 8) == 1  # NBD_OPT_STRUCTURED_REPLY -> NBD_REP_ACK?
        name = EXPORT.encode()  # NBD_OPT_GO of EXPORT, no information requests
        if nbd_option(s, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0)) != 1:
            raise ConnectionError("NBD_OPT_GO refused")
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 0, 1, offset, length))
        types = []
        while True:
            (magic,) = struct.unpack(">I", recv_exact(s, 4))
            if magic == NBD_SIMPLE_REPLY_MAGIC or not structured:
                recv_exact(s, 12 + length)
                types.append("simple")
                break
            flags, ctype, _, clen = struct.unpack(">HHQI", recv_exact(s, 16))
            recv_exact(s, clen)
            types.append(NBD_CHUNK_TYPES.get(ctype, hex(ctype)))
            if flags & 1:  # NBD_REPLY_FLAG_DONE
                break
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, 2, 2, 0, 0))  # NBD_CMD_DISC
    return types


def nbdinfo_hole_bytes(port: int) -> int | None:
    """Bytes reported as holes by `nbdinfo --map` (i.e. via BLOCK_STATUS), or None."""
    if not shutil.which("nbdinfo"):
        return None
    out = subprocess.run(
        ["nbdinfo", "--map", nbd_uri(port)], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        return None
    holes = 0
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and int(fields[2]) & 1:  # NBD_STATE_HOLE
            holes += int(fields[1])
    return holes


# ---------------------------------------------------------------- loopback yardsticks


def loopback_copy_s(
    path: Path,
    size: int,
    bufsize: int,
    what: str,
    sink: Callable[[memoryview, int], None] | None = None,
) -> float:
    """Seconds to sendfile() SIZE bytes of PATH into a loopback TCP socket whose other end, a
    thread, recv_into()s a BUFSIZE buffer until EOF and hands each piece and its offset to
    SINK (if any). RuntimeError "WHAT moved N of SIZE bytes" if not all arrived. Both calls
    drop the GIL, so the two threads run in parallel at C speed."""
    with socket.create_server((HOST, 0)) as listener:
        got = [0]

        def receive() -> None:
            conn, _ = listener.accept()
            buf = bytearray(bufsize)
            view = memoryview(buf)
            with conn:
                while n := conn.recv_into(buf):
                    if sink is not None:
                        sink(view[:n], got[0])
                    got[0] += n

        thread = threading.Thread(target=receive)
        thread.start()
        start = time.monotonic()
        with socket.create_connection(listener.getsockname()) as s, open(path, "rb") as f:
            s.sendfile(f, 0, size)
        thread.join()
        elapsed = time.monotonic() - start
    if got[0] != size:
        raise RuntimeError(f"{what} moved {got[0]} of {size} bytes")
    return elapsed


class CountingRelay:
    """A TCP relay HOST:port -> HOST:target that counts the bytes in each direction.

    Data moves with splice() through a pipe, never through Python buffers, so the relay
    costs little CPU. Every accepted connection is relayed (a retrying mirror reconnects).

    CLOSE_AFTER_UP (a fault, for the resume benchmark): the FIRST connection is cut, both of
    its sockets shut down, once exactly that many bytes went up (client -> target); later
    connections are relayed cleanly. up_per_connection: the bytes up of each connection, in
    the order they were accepted; cut_at: when the cut happened (monotonic s), else None.
    """

    def __init__(self, target: int, close_after_up: int | None = None):
        self.target = target
        self.close_after_up = close_after_up
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.to_target = self.from_target = self.connections = 0
        self.up_per_connection: list[int] = []
        self.cut_at: float | None = None
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection((HOST, self.target))
            except OSError:
                conn.close()
                continue
            self.connections += 1
            index = len(self.up_per_connection)
            self.up_per_connection.append(0)
            limit = self.close_after_up if index == 0 else None
            for sock in (conn, upstream):  # forward small requests and replies at once
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst, up in ((conn, upstream, True), (upstream, conn, False)):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, up, index, limit), daemon=True
                )
                t.start()
                self.threads.append(t)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        up: bool,
        index: int = 0,
        limit: int | None = None,
    ) -> None:
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
        except OSError:
            pass
        moved = 0
        try:
            while True:
                want = MiB if limit is None or not up else min(MiB, limit - moved)
                if want <= 0:  # the fault: cut this connection, both ways
                    self.cut_at = time.monotonic()
                    for sock in (src, dst):
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    break
                n = os.splice(src.fileno(), w, want)
                if not n:
                    break
                moved += n
                with self.lock:
                    if up:
                        self.to_target += n
                        self.up_per_connection[index] += n
                    else:
                        self.from_target += n
                while n:
                    n -= os.splice(r, dst.fileno(), n)
        except OSError:
            pass
        finally:
            os.close(r)
            os.close(w)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, timeout: float = 10.0) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(timeout)


# ---------------------------------------------------------------- CPU from /proc


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; comm may contain spaces."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """Fields 14-17: utime, stime (all threads) and cutime, cstime (reaped children)."""
    f = read_stat(pid)
    if f is None:
        return 0.0
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def process_tree(root: int) -> list[int]:
    """ROOT and its live descendants (a server might fork helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = read_stat(int(entry))
            if f is not None:
                parents.setdefault(int(f[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


# ---------------------------------------------------------------- clients


class ClientError(Exception):
    pass


def run_client(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a client; ClientError (first line: what failed, then the command and its last
    messages) if it exits non-zero or outlives TIMEOUT."""
    name = Path(cmd[0]).name
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise ClientError(f"{name} still running after {timeout:.0f} s\n{' '.join(cmd)}") from None
    if proc.returncode != 0:
        # Keep the messages, not fio's JSON report (it starts at a line "{").
        out = proc.stdout.split("\n{", 1)[0] if not proc.stdout.startswith("{") else ""
        lines = (proc.stderr + out).strip().splitlines()[-20:]
        raise ClientError(f"{name} exited {proc.returncode}\n{' '.join(cmd)}\n" + "\n".join(lines))
    return proc


# ---------------------------------------------------------------- report


def machine_info() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "cpu_model": model}


def flexnbd_module() -> str | None:
    """Where the flexnbd package the servers run comes from (PYTHONPATH can point elsewhere,
    e.g. at a snapshot of a commit built in place)."""
    out = subprocess.run(
        [sys.executable, "-c", "import flexnbd; print(flexnbd.__file__)"],
        capture_output=True, text=True, cwd="/",  # not the work tree: `-c` puts cwd first
    )  # fmt: skip
    return out.stdout.strip() or None


def git_describe(path: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_head() -> str | None:
    """The flexnbd commit measured: `git describe --always --dirty` of the tree the flexnbd
    package comes from (with PYTHONPATH=SNAPSHOT, the snapshot's), else of this one."""
    module = flexnbd_module()
    if module:
        described = git_describe(Path(module).parent)
        if described:
            return described
    return git_describe(HERE.parent)


def default_json(name: str, quick: bool = False) -> Path:
    """benchmarks/results/NAME.json for a full run (the committed results), or
    benchmarks/out/NAME-quick.json for a quick one (git-ignored)."""
    if quick:
        OUT_DIR.mkdir(exist_ok=True)
        return OUT_DIR / f"{name}-quick.json"
    RESULTS_DIR.mkdir(exist_ok=True)
    return RESULTS_DIR / f"{name}.json"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def ratio_text(ratio: float | None, mark: float = RATIO_MARK) -> str:
    """A ratio against the best peer (above 1: flexnbd wins), with "<< 0.80" appended when
    it is under MARK, so a regression stands out in every log (a mark, not an error: the
    machines are noisy)."""
    if ratio is None:
        return "-"
    if ratio >= mark:
        return f"{ratio:.2f}"
    text = f"{ratio:.2f}"
    if text == f"{mark:.2f}":  # 0.797 is under 0.8: show it, not a "0.80 << 0.80"
        text = f"{ratio:.3f}"
    return f"{text} << {mark:.2f}"


def select(names: str | None, known: list[str], aliases: dict[str, str]) -> list[str]:
    if not names:
        return known
    chosen = []
    for name in (n.strip() for n in names.split(",")):
        name = aliases.get(name, name)
        if name not in known:
            raise SystemExit(f"unknown name {name!r}; choose from {', '.join(known)}")
        chosen.append(name)
    return chosen


def exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds the with-blocks, which stop the servers


def print_errors(errors: list[str]) -> None:
    """Each error: its first line (which cell or case failed, and how) after "ERROR", the
    details indented; then one line that counts them."""
    for err in errors:
        first, _, rest = err.partition("\n")
        print(f"\nERROR {first}")
        for line in rest.splitlines():
            print(f"    {line}")
    if errors:
        print(f"\n{len(errors)} error(s): exit status 1")


def finish_report(report: dict, json_path: Path) -> int:
    """Print the errors, write the JSON results (the printed tables are in it as
    'markdown', if the script keeps them); the script's exit status."""
    print_errors(report["errors"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"results written to {json_path}")
    return 1 if report["errors"] else 0


def run_script(main: Callable[[], int]) -> None:
    """Run a benchmark's main(): SIGTERM and Ctrl-C unwind it, so its servers are stopped."""
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # the Server context managers have already stopped the servers

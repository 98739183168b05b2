"""Running real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy) from the tests."""

from __future__ import annotations

import subprocess

from tests.conftest import require_tool


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def check(cmd: list[str], timeout: float = 60) -> str:
    """Run a client; it must succeed. Its stdout + stderr."""
    res = run(cmd, timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{out}"
    return out


def qemu_io(uri: str, *commands: str) -> str:
    cmd = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    out = check(cmd + [uri])
    assert "failed" not in out.lower(), out  # "Pattern verification failed", "write failed"
    return out


ZEROING_SCRIPT = (
    "write -z 65536 65536",           # WRITE_ZEROES with NO_HOLE (or zeroes written)
    "write -z -u 262144 131072",      # WRITE_ZEROES that may punch a hole
    "write -z 500001 7777",           # unaligned zeroing
    "discard 655360 65536",
    "flush",
    "write -f -P 0x5a 800003 12345",  # FUA
    "read -P 0 65536 65536",
    "read -P 0 262144 131072",
    "read -P 0 500001 7777",
    "read -P 0x5a 800003 12345",
)


def zeroing_done(model: bytearray) -> None:
    """Apply ZEROING_SCRIPT to a model of the disk, all but the discard."""
    for off, length in [(65536, 65536), (262144, 131072), (500001, 7777)]:
        model[off:off + length] = bytes(length)
    model[800003:800003 + 12345] = b"\x5a" * 12345

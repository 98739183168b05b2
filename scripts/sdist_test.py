#!/usr/bin/env python3
"""Build the sdist, check what it holds, build it in a fresh venv and run the unit tests.

The sdist must carry everything needed to build (the .pyx/.pxd sources, setup.py,
pyproject.toml, README, LICENSE), the man pages (man/*.1: generated, but committed, so that a
build needs no generator step) and nothing a build generates (no .c, .so or .html). pip
installs the man pages under <venv>/share/man/man1. The unit tests then run against the
flexnbd that pip built from it, from a directory that holds only the tests (so nothing of a
source tree is importable).

    scripts/sdist_test.py [--python PYTHON]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "flexnbd/_core.pyx",
          "flexnbd/_core.pxd", "flexnbd/_client.pyx", "flexnbd/_client.pxd",
          "flexnbd/_mirror.pyx", "flexnbd/_allocmap.pyx", "flexnbd/_proxy.pyx",
          "flexnbd/_sys.pxd", "flexnbd/_wire.pxd", "flexnbd/_wire.pyx", "flexnbd/_allocmap.pxd",
          "flexnbd/py.typed", "tests/unit/test_decode.py", "man/flexnbd.1",
          "man/flexnbd-proxy.1", "flexnbd/manpage.py"]
GENERATED = (".c", ".so", ".html", ".pyc")
MAN_PAGES = ("flexnbd.1", "flexnbd-proxy.1")
# Unit tests that check the source tree itself (they find it from their own path).
SOURCE_TREE_TESTS = ["test_lint.py", "test_layout.py", "test_helpers_one_home.py",
                     "test_manpages.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexnbd-sdist-") as tmp:
        out = Path(tmp)
        subprocess.run([args.python, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
                       check=True, stdout=subprocess.DEVNULL)
        (sdist,) = out.glob("flexnbd-*.tar.gz")
        with tarfile.open(sdist) as tar:
            names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
            tar.extractall(out / "src", filter="data")
        missing = [n for n in NEEDED if n not in names]
        generated = [n for n in names if n.endswith(GENERATED) and not n.startswith("tests/")]
        if missing or generated:
            print(f"sdist {sdist.name}: missing {missing}, generated files {generated}",
                  file=sys.stderr)
            return 1
        venv = out / "venv"
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        py = str(venv / "bin" / "python")
        subprocess.run([py, "-m", "pip", "install", "-q", f"{sdist}[test]"], check=True)
        pages = [venv / "share" / "man" / "man1" / name for name in MAN_PAGES]
        if not all(page.is_file() for page in pages):
            print(f"sdist {sdist.name}: pip did not install {pages}", file=sys.stderr)
            return 1
        (src,) = (out / "src").iterdir()
        tests = out / "run"
        shutil.copytree(src / "tests", tests / "tests")
        shutil.copy(src / "pyproject.toml", tests / "pyproject.toml")   # pytest settings
        # (these read a source tree: flexnbd/, benchmarks/, the README; not an installed package)
        ignored = [f"--ignore=tests/unit/{name}" for name in SOURCE_TREE_TESTS]
        res = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ignored,
                              "tests/unit"], cwd=tests)
        if res.returncode != 0:
            print(f"sdist {sdist.name}: the unit tests failed", file=sys.stderr)
            return 1
        print(f"sdist {sdist.name}: {len(names)} files, builds, unit tests pass", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

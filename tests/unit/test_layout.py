"""Every module of the package is named where a newcomer looks for it: a row of the README's
"Layout" table, and a layer of the import-linter contract (compiled modules too: the contract
cannot read them, but it says where they stand)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# The source tree (not an installed flexnbd: the README and pyproject.toml are the tree's).
ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "flexnbd"


def _sources() -> list[Path]:
    found = [p for suffix in ("*.py", "*.pyx", "*.pxd") for p in SRC.rglob(suffix)]
    return sorted(p for p in found if p.stem not in ("__init__", "__main__")
                  and "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    return ".".join(("flexnbd", *path.relative_to(SRC).with_suffix("").parts))


def _layout_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("### Layout"):]
    end = table.find("\n#", 1)
    table = table if end < 0 else table[:end]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row)}


def _layered_modules() -> set[str]:
    # (read as text: tomllib is 3.11+, the wheels' tests run on 3.10 too)
    text = (ROOT / "pyproject.toml").read_text()
    layers = re.search(r'^type = "layers"\nlayers = \[\n(.*?)^\]', text, re.M | re.S)
    assert layers, "no layers contract in pyproject.toml"
    names = re.findall(r'"([^"]+)"', layers.group(1))
    return {name.strip(" ()") for layer in names for name in layer.split("|")}


def test_the_sources_are_found():
    names = {p.name for p in _sources()}
    assert {"cli.py", "_core.pyx", "_nbdio.pxd", "outcome.py"} <= names
    assert len(_layout_names()) > 20 and len(_layered_modules()) > 20


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_the_readme_layout_names_it(path):
    relative = path.relative_to(SRC)
    spellings = {path.stem, path.name, str(relative.with_suffix("")), str(relative)}
    assert spellings & _layout_names(), f"README's Layout table does not name {relative}"


@pytest.mark.parametrize("path", [p for p in _sources() if p.suffix != ".pxd"],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_the_import_contract_places_it(path):
    assert _dotted(path) in _layered_modules(), \
        f"{_dotted(path)} is in no layer of the import-linter contract"

"""The tests' and the benchmarks' own helpers have one home each, as the product's shared I/O
does (test_one_home.py): the benchmark scripts import common.py (and run.py's rows), never each
other in a circle; one receive loop in tests/ (tests/support/rawclient.py) and one in
benchmarks/ (common.py, standard library only); the fixtures of tests/support are registered
once (tests/conftest.py's ``pytest_plugins``), never imported or re-exported by a test module.
These read the sources as text and syntax trees; nothing runs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests import conftest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
BENCHMARKS = ROOT / "benchmarks"
# A hand-written "exactly n bytes" loop: recv(n - len(data)) or recv(min(n - len(data), ...)).
RECV_LOOP = re.compile(r"\.recv\(\s*(?:min\(\s*)?\w+\s*-\s*len\(")
RECV_HOMES = {TESTS / "support" / "rawclient.py", BENCHMARKS / "common.py"}


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module PATH imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _fixtures(path: Path) -> set[str]:
    """The names of the functions PATH decorates with pytest.fixture."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    found.add(node.name)
    return found


def test_the_sources_are_found():
    # Guards every check below against scanning nothing.
    assert {"common", "migration", "proxy", "run"} <= {p.stem for p in BENCHMARKS.glob("*.py")}
    for home in RECV_HOMES:
        assert RECV_LOOP.search(home.read_text()), home
    assert {"start_server", "pair", "psk", "creds"} <= set().union(
        *(_fixtures(p) for p in (TESTS / "support").glob("*.py")))


def test_the_benchmark_scripts_import_no_circle():
    scripts = {p.stem: p for p in BENCHMARKS.glob("*.py")}
    graph = {name: _imported_modules(path) & set(scripts) for name, path in scripts.items()}
    assert graph["common"] == set(), "common.py imports another script"

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join((*path, name))
        for dep in graph[name]:
            visit(dep, (*path, name))

    for name in graph:
        visit(name, ())


@pytest.mark.parametrize("root", [TESTS, BENCHMARKS], ids=["tests", "benchmarks"])
def test_one_receive_loop(root):
    loops = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
             for p in _python_files(root) if p not in RECV_HOMES
             for text in [p.read_text()] for m in RECV_LOOP.finditer(text)]
    homes = sorted(str(h.relative_to(ROOT)) for h in RECV_HOMES)
    assert loops == [], f"receive loops outside {homes}: {loops}"


def test_support_fixtures_are_registered_once_and_never_imported():
    fixtures = set()
    modules = []
    for path in sorted((TESTS / "support").glob("*.py")):
        names = _fixtures(path)
        if names:
            fixtures |= names
            modules.append(f"tests.support.{path.stem}")
    assert sorted(conftest.pytest_plugins) == modules
    assert not (TESTS / "integration" / "conftest.py").exists()
    for path in _python_files(TESTS):
        if path.parent.name == "support" or path == TESTS / "conftest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests.support"):
                imported = {alias.name for alias in node.names} & fixtures
                assert not imported, f"{path.relative_to(ROOT)} imports fixtures {imported}"
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                assert node.value.attr not in fixtures, \
                    f"{path.relative_to(ROOT)}:{node.lineno} re-exports {node.value.attr}"

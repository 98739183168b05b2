"""The man pages (man/flexnbd.1, man/flexnbd-proxy.1) are what ``flexnbd.manpage`` renders
now, cover every mode, option, environment variable, status field and control command, and
render without warnings. These read the source tree (its man/ and flexnbd/ directories)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

import pytest

from flexnbd import cli, manpage, status
from flexnbd.control import protocol
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "man"
SRC = ROOT / "flexnbd"
REGENERATE = "make man (python -m flexnbd.manpage man), then commit man/"


def _plain(roff: str) -> str:
    """The page's words as a reader sees them (fonts dropped, escapes undone)."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    return text.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")


def _page(name: str) -> str:
    return _plain((MAN / name).read_text())


def _section(page: str, title: str) -> str:
    start = page.index(f"\n.SH {title}\n")
    end = page.find("\n.SH ", start + 1)
    return page[start:end if end >= 0 else len(page)]


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _parsers() -> list[tuple[str, str, object]]:
    """(page, name, parser) for every parser: the modes, help, flexnbd-proxy."""
    found: list[tuple[str, str, object]] = [
        ("flexnbd.1", name, p) for name, p in manpage.mode_parsers().items()]
    return [*found, ("flexnbd-proxy.1", "flexnbd-proxy", cli.proxy_parser())]


def _env_variables() -> set[str]:
    """Every FLEXNBD_ name in the package's Python and Cython sources (the .pxd files are left
    out: there FLEXNBD_ prefixes C macros, not variables)."""
    names: set[str] = set()
    for pattern in ("*.py", "*.pyx"):
        for path in SRC.rglob(pattern):
            names |= set(re.findall(r"\bFLEXNBD_[A-Z0-9_]+", path.read_text()))
    return names


def _control_commands() -> set[str]:
    """The commands ``protocol.parse_request`` knows, read from its source."""
    tree = ast.parse(Path(protocol.__file__).read_text())
    (func,) = [n for n in ast.walk(tree)
               if isinstance(n, ast.FunctionDef) and n.name == "parse_request"]
    return {node.comparators[0].value for node in ast.walk(func)
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name)
            and node.left.id == "command" and isinstance(node.comparators[0], ast.Constant)}


@pytest.mark.parametrize("name", ["flexnbd.1", "flexnbd-proxy.1"])
def test_the_committed_page_is_current(name):
    rendered = manpage.pages()[name]
    assert (MAN / name).exists(), f"man/{name} is missing: {REGENERATE}"
    assert (MAN / name).read_text() == rendered, f"man/{name} is stale: {REGENERATE}"


def test_the_generator_checks_a_directory(tmp_path):
    assert manpage.main([str(tmp_path), "--check"]) == 1
    assert manpage.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flexnbd-proxy.1", "flexnbd.1"]
    assert manpage.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "flexnbd.1").write_text("stale")
    assert manpage.main([str(tmp_path), "--check"]) == 1


@pytest.mark.parametrize("mode", [*cli.MODES, "help"])
def test_every_mode_has_a_section_and_a_synopsis(mode):
    page = _page("flexnbd.1")
    assert f"\n.SS {mode}\n" in _section(page, "MODES"), mode
    assert f"\n.SY flexnbd\n{mode} " in _section(page, "SYNOPSIS"), mode


@pytest.mark.parametrize("page,name,parser", _parsers(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_every_option_is_in_the_page(page, name, parser):
    text = _page(page)
    flat = " ".join(text.split()).replace("`", "")
    assert parser.description and " ".join(parser.description.split()).replace("`", "") in flat
    if parser.epilog:
        assert " ".join(parser.epilog.split()) in flat, name
    for action in parser._actions:
        for option in action.option_strings:
            assert _mentions(text, option), f"{page}: {name}'s {option}"
        if not action.option_strings:
            assert _mentions(text, action.metavar or action.dest.upper()), (name, action.dest)
        if action.help:
            assert " ".join(action.help.split()) in " ".join(text.split()), (name, action.help)


def test_global_options_are_the_documented_four():
    found = manpage.global_options([*manpage.mode_parsers().values()][:-1] +
                                   [cli.proxy_parser()])
    assert found == {"-h", "--help", "-v", "--verbose", "-q", "--quiet", "-V", "--version"}


def test_every_environment_variable_is_in_the_page():
    found = _env_variables()
    assert len(found) >= 10 and "FLEXNBD_DEBUG" in found     # the grep finds them
    documented = {v.name for v in manpage.ENVIRONMENT if v.name.startswith("FLEXNBD_")}
    assert documented == found, "flexnbd.manpage.ENVIRONMENT differs from the sources"
    # each on the page of the program that reads it
    servers = _section(_page("flexnbd.1"), "ENVIRONMENT")
    proxy = _section(_page("flexnbd-proxy.1"), "ENVIRONMENT")
    for v in manpage.ENVIRONMENT:
        assert _mentions(servers, v.name) == v.servers, v.name
        assert _mentions(proxy, v.name) == v.proxy, v.name
    for name in ("FLEXNBD_UPSTREAM_TIMEOUT", "FLEXNBD_HANDSHAKE_TIMEOUT", "FLEXNBD_SEND_TIMEOUT",
                 "FLEXNBD_DEBUG"):
        assert _mentions(proxy, name), name     # cli.py's _proxy_config, log.py


def test_every_status_field_is_in_the_page():
    fields = _section(_page("flexnbd.1"), "STATUS FIELDS")
    keys = (*status.BASE_KEYS, *status.MIGRATION_KEYS, *status.EXTRA_KEYS, *status.RECEIVED_KEYS)
    assert len(keys) >= 19
    for key in keys:
        assert f"\n.TP\n{key}\n" in fields, key


def test_every_control_command_and_reply_is_in_the_page():
    commands = _control_commands()
    assert {"status", "acl", "mirror", "mirror_max_bps", "break", "mirror_wait"} <= commands
    section = _section(_page("flexnbd.1"), "CONTROL SOCKET")
    tags = re.findall(r"^\.TP\n(\S+?)[, \n]", section, re.M)
    assert commands <= set(tags), commands - set(tags)
    flat = " ".join(section.split())
    replies = [v for v in vars(protocol).values() if isinstance(v, protocol.Reply)]
    assert len(replies) >= 25
    for reply in replies:
        assert f"{reply.code}: {reply.text}" in flat, reply


@pytest.mark.parametrize("name", ["flexnbd.1", "flexnbd-proxy.1"])
def test_man_renders_the_page_without_warnings(name):
    man = require_tool("man")
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    env.pop("MANPATH", None)
    res = subprocess.run([man, "--warnings", "-l", str(MAN / name)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    out = res.stdout
    assert "SYNOPSIS" in out and "ENVIRONMENT" in out and "EXIT STATUS" in out
    assert max(len(line) for line in out.splitlines()) <= 80, "wider than MANWIDTH"
    # options are never hyphenated nor broken across lines
    for parser in ([cli.proxy_parser()] if name == "flexnbd-proxy.1"
                   else manpage.mode_parsers().values()):
        for action in parser._actions:
            for option in action.option_strings:
                assert _mentions(out, option), option

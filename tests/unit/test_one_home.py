"""Each piece of NBD I/O that the server (_core.pyx), the client sides (_client.pyx,
_mirror.pyx) and the proxy (_proxy.pyx) share has one home (_nbdio.pxd, _wire.pxd or
_sys.pxd): a second copy in a .pyx would drift from the first. These scan the compiled
sources, as the import-linter contract does for the Python layers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import flexnbd

SRC = Path(flexnbd.__file__).parent
HOT = ("_core.pyx", "_client.pyx", "_mirror.pyx", "_proxy.pyx", "_allocmap.pyx",
       "_allocmap.pxd")


def _code(name: str) -> str:
    """The file without comments and docstrings (what is compiled)."""
    text = (SRC / name).read_text()
    text = re.sub(r'"""(?:.|\n)*?"""', "", text)
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _defines(name: str, constant: str) -> bool:
    return re.search(rf"^\s*(?:DEF\s+)?{constant}\s*=", _code(name), re.M) is not None


def test_the_sources_are_found():
    # Guards every check below against scanning nothing.
    for name in (*HOT, "_nbdio.pxd", "_wire.pxd", "_sys.pxd"):
        assert (SRC / name).is_file(), name
    assert _defines("_nbdio.pxd", "INBUF_SIZE") and _defines("_nbdio.pxd", "C_OK")
    assert "tp_send_all" in _code("_core.pyx") and "ib_recv" in _code("_proxy.pyx")


@pytest.mark.parametrize("name", HOT)
@pytest.mark.parametrize("constant", ["INBUF_SIZE", "C_OK", "MAX_PAYLOAD"])
def test_shared_constants_are_defined_once(name, constant):
    assert not _defines(name, constant), f"{constant} defined again in {name}"


@pytest.mark.parametrize("name", ("_core.pyx", "_client.pyx", "_mirror.pyx", "_proxy.pyx"))
def test_peer_sockets_are_touched_only_through_the_transport(name):
    # send/recv/sendmsg/sendfile on a peer socket only in _nbdio.pxd's tp_* calls (splice is
    # still used from a pipe to the file, which is not the transport's business).
    calls = re.findall(r"(?<![\w.])(?<!def )(send|recv|sendmsg|sendfile)\s*\(", _code(name))
    assert calls == [], f"{name} calls {calls} directly"
    splices = re.findall(r"(?<![\w.])splice\s*\(\s*(\w+(?:\.\w+)*)", _code(name))
    assert all(src.endswith("pipe_r") for src in splices), splices


@pytest.mark.parametrize("name", HOT)
def test_wire_layouts_and_atomics_have_one_home(name):
    code = _code(name)
    assert ".MIRROR." not in code
    assert "__atomic_" not in code, f"atomics are declared in _sys.pxd, not in {name}"
    for magic in ("SIMPLE_REPLY_MAGIC", "STRUCTURED_REPLY_MAGIC", "REQUEST_MAGIC"):
        assert not re.search(rf"htobe32\(\s*{magic}", code), f"{name} builds a {magic} header"
    assert not re.search(r"be32toh\(\s*u32\s*\)\s*!=\s*SIMPLE_REPLY_MAGIC", code)

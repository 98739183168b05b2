"""`--read-only`: every write-type request (WRITE, FUA WRITE, TRIM, WRITE_ZEROES) gets EPERM
and changes nothing; reads, FLUSH and CACHE work (SPEC §1, §3)."""

from __future__ import annotations

import pytest

from flexnbd import wire
from tests.support.serving import (
    CACHE,
    EPERM,
    FLUSH,
    STYLES,
    TRIM,
    WZ,
    MiB,
    client,
    content,
)


@pytest.mark.parametrize("style", STYLES)
def test_read_only(serve, make_file, style):
    path = make_file(MiB)
    before = content(path)
    server = serve(path, "--read-only", *style)
    with client(server) as c:
        if not style:
            assert c.flags & wire.FLAG_READ_ONLY
        assert c.write(0, b"\xff" * 4096) == EPERM
        assert c.write(0, b"\xff" * 4096, flags=wire.CMD_FLAG_FUA) == EPERM
        assert c.request(TRIM, 0, 4096).error == EPERM
        assert c.request(WZ, 0, 4096).error == EPERM
        assert c.request(WZ, 0, 4096, flags=wire.CMD_FLAG_NO_HOLE).error == EPERM
        assert c.read(0, 8192) == before[:8192]
        assert c.request(FLUSH).error == 0
        assert c.request(CACHE, 0, 4096).error == 0
    assert content(path) == before

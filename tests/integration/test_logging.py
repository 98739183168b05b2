"""The log format (SPEC §9): every line `<ms>:<level>:<pid> <thread> <module:line>: <message>`,
debug lines only with FLEXNBD_DEBUG=1."""

from __future__ import annotations

import pytest

from tests.support.rawclient import RawClient
from tests.support.serving import (
    LOG_LINE,
    READ,
    WRITE,
    MiB,
    client,
    wait_for_problem_line,
)


@pytest.mark.parametrize("debug", [False, True])
def test_log_format(serve, make_file, debug):
    path = make_file(MiB)
    server = serve(path, env={"FLEXNBD_DEBUG": "1"} if debug else {"FLEXNBD_DEBUG": "0"})
    with client(server) as c:                      # a good client
        c.read(0, 4096)
        c.disconnect()
    with client(server) as c:                      # a bad magic
        c.send_request(READ, 0, 512, magic=0)
        c.read_until_closed()
    with RawClient.connect(server.port) as c:      # a bad handshake
        c.read_greeting()
        c.send(b"\xff" * 4)
        c.read_until_closed()
    c = client(server)                             # one that vanishes mid-write
    name = c.local_name
    c.send_request(WRITE, 0, MiB, payload=b"\0" * 1000)
    c.reset()
    wait_for_problem_line(server, name)
    assert server.stop() == 0
    lines = server.log().splitlines()
    assert len(lines) >= 5, lines
    for line in lines:
        assert LOG_LINE.match(line), f"bad log line: {line!r}"
        assert line.split(":")[2].split(" ")[0] == str(server.pid), line
    levels = {line.split(":")[1] for line in lines}
    assert {"I", "W"} <= levels
    if not debug:
        assert "D" not in levels   # -v is info and up; debug only with FLEXNBD_DEBUG=1

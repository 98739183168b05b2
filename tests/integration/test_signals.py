"""Stop signals (SPEC §2): SIGINT, SIGTERM and SIGQUIT stop the server in order, with exit 0,
whatever the clients are doing."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from tests.support.rawclient import RawClient, ServerClosed
from tests.support.serving import (
    MAX,
    READ,
    STYLES,
    MiB,
    big_file,
    client,
    content,
)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_signals_exit_0_with_idle_clients(serve, make_file, style, sig):
    path = make_file(MiB)
    server = serve(path, *style)
    idle = client(server)                      # idle in the transmission phase
    assert idle.read(0, 512) == content(path, 0, 512)
    fresh = RawClient.connect(server.port)     # idle in (or before) the handshake
    fresh.read_greeting()
    try:
        assert server.stop(sig) == 0, server.log()
        assert idle.read_until_closed() == b""
        assert fresh.read_until_closed() == b""
    finally:
        idle.close()
        fresh.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    assert "Traceback" not in server.log()


def test_stop_while_a_client_reads_a_lot(serve, make_file):
    path = big_file(make_file, 40 * MiB)
    server = serve(path)
    with client(server) as c:
        c.send_request(READ, 0, MAX)
        c.recv_exact(16 + 4096)
        server.signal(signal.SIGTERM)
        # The current request is finished (or the client cut), then the server exits 0.
        try:
            c.recv_exact(MAX - 4096)
        except ServerClosed:
            pass
        assert server.proc.wait(30) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_repeated_stop_signals_exit_0(serve, make_file, sig):
    """A supervisor (or an impatient user) that signals again while the server is stopping
    still gets exit status 0, not a death by signal."""
    path = make_file(MiB)
    server = serve(path)
    with client(server) as c:
        assert c.read(0, 4096) == content(path, 0, 4096)
        sent = 0
        while server.proc.poll() is None and sent < 5000:
            server.signal(sig)
            sent += 1
            time.sleep(0.002)
        assert server.proc.wait(30) == 0, server.log()

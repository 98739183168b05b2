"""serve_handshake in a thread on one end of a socketpair, a raw client on the other: the
server side of the handshake tests (tests/unit/test_handshake.py, test_resume.py)."""

from __future__ import annotations

import socket
import threading

from flexnbd.handshake import Agreed, ExportInfo, serve_handshake
from tests.support.rawclient import RawClient

SIZE = 1 << 20          # the export's size when none is given
TIMEOUT = 10.0


class ServerSide:
    """serve_handshake in a thread on one end of a socketpair. After the handshake returns, the
    server end is shut down for writing, so the client can check that nothing more was sent."""

    def __init__(self, export: ExportInfo | None = None, oldstyle: bool = False) -> None:
        self.export = export or ExportInfo(SIZE)
        self.server_sock, client_sock = socket.socketpair()
        self.server_sock.settimeout(TIMEOUT)
        self.client = RawClient(client_sock, timeout=TIMEOUT)
        self.result: Agreed | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(oldstyle,), daemon=True)
        self.thread.start()

    def _run(self, oldstyle: bool) -> None:
        try:
            self.result = serve_handshake(self.server_sock, self.export, oldstyle)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e
        finally:
            try:
                self.server_sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def finish(self) -> Agreed | None:
        """Wait for serve_handshake; its result (re-raising what it raised)."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "serve_handshake did not return"
        if self.error is not None:
            raise self.error
        return self.result

    def close(self) -> None:
        self.client.close()
        self.thread.join(TIMEOUT)
        self.server_sock.close()

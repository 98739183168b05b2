"""The handshake, both sides, over a socketpair: ``serve_handshake`` in a thread against a
hand-written client (tests/support/rawclient.py), and ``client_handshake`` against it."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from flexnbd import wire
from flexnbd.errors import HandshakeError
from flexnbd.handshake import (
    MAX_OPTION_LENGTH,
    Agreed,
    ExportInfo,
    client_handshake,
)
from tests.support.rawclient import RawClient
from tests.support.serverside import ServerSide

SIZE = 1 << 20
TIMEOUT = 10.0


@pytest.fixture
def side():
    sides: list[ServerSide] = []

    def make(export: ExportInfo | None = None, oldstyle: bool = False) -> ServerSide:
        s = ServerSide(export, oldstyle)
        sides.append(s)
        return s
    yield make
    for s in sides:
        s.close()


def newstyle(side, no_zeroes: bool = True, export: ExportInfo | None = None) -> ServerSide:
    """A server side past the greeting, with the client flags sent."""
    s = side(export)
    greeting = s.client.read_greeting()
    assert greeting.style == "newstyle"
    s.client.send_client_flags(wire.FLAG_C_FIXED_NEWSTYLE
                               | (wire.FLAG_C_NO_ZEROES if no_zeroes else 0))
    return s


def expected_flags(structured=False, read_only=False, fast_zero=False) -> int:
    flags = (wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH | wire.FLAG_SEND_FUA
             | wire.FLAG_SEND_TRIM | wire.FLAG_SEND_WRITE_ZEROES | wire.FLAG_SEND_CACHE
             | wire.FLAG_CAN_MULTI_CONN)
    if structured:
        flags |= wire.FLAG_SEND_DF
    if read_only:
        flags |= wire.FLAG_READ_ONLY
    if fast_zero:
        flags |= wire.FLAG_SEND_FAST_ZERO
    return flags


def go_and_enter(s: ServerSide, name: bytes = b"") -> Agreed:
    """GO on the default export; checks it is described and the server enters transmission."""
    replies = s.client.go(name)
    assert replies[-1].type == wire.REP_ACK
    agreed = s.finish()
    assert agreed is not None
    assert s.client.read_until_closed() == b""  # GO: no padding, nothing after the ACK
    return agreed


# -- both sides ------------------------------------------------------------------------------

@pytest.mark.parametrize("oldstyle", [False, True])
@pytest.mark.parametrize("read_only", [False, True])
def test_client_and_server_agree(side, oldstyle, read_only):
    s = side(ExportInfo(SIZE, read_only=read_only), oldstyle)
    info = client_handshake(s.client.sock)
    agreed = s.finish()
    assert agreed is not None
    assert agreed.style == info.style == ("oldstyle" if oldstyle else "newstyle")
    assert info.size == SIZE
    if oldstyle:
        assert info.flags == wire.OLDSTYLE_FLAGS | (wire.FLAG_READ_ONLY if read_only else 0)
    else:
        assert info.flags == expected_flags(read_only=read_only)
        assert agreed.structured is False
    assert info.has(wire.FLAG_READ_ONLY) == read_only
    assert s.client.read_until_closed() == b""


@pytest.mark.parametrize("block_status", [False, True])
@pytest.mark.parametrize("structured", [False, True])
def test_client_asks_for_structured_replies_and_base_allocation(side, block_status,
                                                                 structured):
    """The proxy's upstream handshake: structured replies whenever the server has them, and
    base:allocation when it lists it; the export flags then include DF."""
    s = side(ExportInfo(SIZE, block_status=block_status, structured_replies=structured))
    info = client_handshake(s.client.sock, structured=True,
                            meta_contexts=[wire.BASE_ALLOCATION])
    agreed = s.finish()
    assert agreed is not None
    assert info.structured is agreed.structured is structured
    selected = structured and block_status
    assert agreed.meta_context is selected
    assert info.contexts == ({wire.BASE_ALLOCATION: wire.BASE_ALLOCATION_ID} if selected
                             else {})
    assert info.coverage_context is None
    assert info.has(wire.FLAG_SEND_DF) is structured


def test_exported_flags_lose_df_without_structured_replies():
    flags = wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_DF | wire.FLAG_SEND_FLUSH
    export = ExportInfo(SIZE, flags=flags)
    assert export.transmission_flags(True) == flags
    assert export.transmission_flags(False) == flags & ~wire.FLAG_SEND_DF
    assert export.oldstyle_flags() == flags & ~wire.FLAG_SEND_DF


def test_client_handshake_with_an_export_name(side):
    s = side()
    info = client_handshake(s.client.sock, b"some-export")
    agreed = s.finish()
    assert agreed is not None and agreed.export_name == b"some-export"
    assert info.size == SIZE


def test_fast_zero_is_advertised_when_the_export_can(side):
    s = side(ExportInfo(SIZE, can_fast_zero=True))
    info = client_handshake(s.client.sock)
    assert s.finish() is not None
    assert info.flags == expected_flags(fast_zero=True)


# -- oldstyle --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1024, SIZE, 2**62 + 512])
def test_oldstyle_greeting_is_byte_exact(side, size):
    s = side(ExportInfo(size), oldstyle=True)
    agreed = s.finish()
    assert agreed is not None and agreed.style == "oldstyle"
    data = s.client.read_until_closed()
    expected = (b"NBDMAGIC" + bytes.fromhex("0000420281861253") + size.to_bytes(8, "big")
                + (13).to_bytes(4, "big") + bytes(124))
    assert len(data) == 152
    assert data == expected


# -- newstyle --------------------------------------------------------------------------------

def test_newstyle_greeting(side):
    s = side()
    assert s.client.read_greeting().raw == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_go(side):
    s = newstyle(side)
    replies = s.client.go()
    assert [r.type for r in replies] == [wire.REP_INFO, wire.REP_ACK]
    assert all(r.option == wire.OPT_GO for r in replies)
    assert replies[0].data == struct.pack(">HQH", wire.INFO_EXPORT, SIZE, expected_flags())
    assert replies[1].data == b""
    agreed = s.finish()
    assert agreed is not None and agreed.style == "newstyle" and agreed.export_name == b""
    assert s.client.read_until_closed() == b""


def test_any_export_name_is_accepted(side):
    s = newstyle(side)
    assert go_and_enter(s, b"whatever-name").export_name == b"whatever-name"


def test_info_with_block_size(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_INFO,
                              RawClient.info_request(b"", (wire.INFO_BLOCK_SIZE,)))
    assert replies[-1].type == wire.REP_ACK
    infos = {struct.unpack_from(">H", r.data)[0]: r.data[2:] for r in replies
             if r.type == wire.REP_INFO}
    assert struct.unpack(">QH", infos[wire.INFO_EXPORT]) == (SIZE, expected_flags())
    assert struct.unpack(">III", infos[wire.INFO_BLOCK_SIZE]) == (1, 4096, 32 * 1024 * 1024)
    # INFO does not end the haggling: GO still works afterwards.
    go_and_enter(s)


def test_info_without_block_size_request(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_INFO, RawClient.info_request())
    types = [struct.unpack_from(">H", r.data)[0] for r in replies if r.type == wire.REP_INFO]
    assert wire.INFO_EXPORT in types
    assert wire.INFO_BLOCK_SIZE not in types
    go_and_enter(s)


def test_list(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_LIST)
    assert [r.type for r in replies] == [wire.REP_SERVER, wire.REP_ACK]
    (name_len,) = struct.unpack_from(">I", replies[0].data)
    assert name_len == 0
    assert replies[0].data[4:4 + name_len] == b""
    go_and_enter(s)


def test_list_with_data_is_invalid(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_LIST, b"junk")
    assert [r.type for r in replies] == [wire.REP_ERR_INVALID]
    # Still in sync:
    assert [r.type for r in s.client.option(wire.OPT_LIST)] == [wire.REP_SERVER, wire.REP_ACK]
    go_and_enter(s)


@pytest.mark.parametrize("option,data", [
    (42, b""),
    (42, b"x" * 100),                    # its data must be skipped to stay in sync
    (wire.OPT_STARTTLS, b""),
    (4, b""),                            # unassigned
    (0, b""),
    (0xFFFFFFFF, b"abc"),
    (11, bytes(MAX_OPTION_LENGTH)),      # the longest data the server reads
])
def test_unknown_options_are_unsupported(side, option, data):
    s = newstyle(side)
    replies = s.client.option(option, data)
    assert len(replies) == 1
    assert replies[0].type == wire.REP_ERR_UNSUP
    assert replies[0].option == option
    go_and_enter(s)


@pytest.mark.parametrize("data", [
    b"",                                               # too short
    b"\0\0\0",
    struct.pack(">I", 0),                              # no count
    struct.pack(">IH", 10, 0),                         # name longer than the data
    struct.pack(">I", 3) + b"abc",                     # no count after the name
    struct.pack(">IH", 0, 2) + struct.pack(">H", 3),   # fewer requests than counted
    struct.pack(">IH", 0, 1) + struct.pack(">HH", 3, 3),  # trailing bytes
    struct.pack(">IH", 0xFFFFFFFF, 0),                 # absurd name length
])
@pytest.mark.parametrize("option", [wire.OPT_GO, wire.OPT_INFO])
def test_malformed_go_and_info(side, option, data):
    s = newstyle(side)
    replies = s.client.option(option, data)
    assert [r.type for r in replies] == [wire.REP_ERR_INVALID]
    go_and_enter(s)


def test_structured_reply(side):
    s = newstyle(side)
    assert [r.type for r in s.client.option(wire.OPT_STRUCTURED_REPLY)] == [wire.REP_ACK]
    replies = s.client.go()
    assert struct.unpack(">HQH", replies[0].data) == (
        wire.INFO_EXPORT, SIZE, expected_flags(structured=True))
    agreed = s.finish()
    assert agreed is not None and agreed.structured is True


def test_structured_reply_with_data_is_invalid(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_STRUCTURED_REPLY, b"x")
    assert [r.type for r in replies] == [wire.REP_ERR_INVALID]
    assert go_and_enter(s).structured is False


def test_abort(side):
    s = newstyle(side)
    replies = s.client.option(wire.OPT_ABORT)
    assert [(r.type, r.data) for r in replies] == [(wire.REP_ACK, b"")]
    assert s.finish() is None
    assert s.client.read_until_closed() == b""


def test_abort_when_the_client_closes_first(side):
    s = newstyle(side)
    s.client.send_option(wire.OPT_ABORT)
    s.client.close()
    assert s.finish() is None


def test_client_leaving_after_the_greeting_is_not_an_error(side):
    s = side()
    s.client.read_greeting()
    s.client.sock.shutdown(socket.SHUT_WR)
    assert s.finish() is None


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(side, no_zeroes):
    s = newstyle(side, no_zeroes=no_zeroes)
    s.client.send_option(wire.OPT_EXPORT_NAME, b"")
    agreed = s.finish()
    assert agreed is not None and agreed.style == "newstyle"
    data = s.client.read_until_closed()
    expected = struct.pack(">QH", SIZE, expected_flags())
    if not no_zeroes:
        expected += bytes(124)
    assert data == expected


def test_export_name_after_other_options(side):
    s = newstyle(side, no_zeroes=False)
    s.client.option(wire.OPT_LIST)
    s.client.option(42)
    s.client.option(wire.OPT_STRUCTURED_REPLY)
    s.client.send_option(wire.OPT_EXPORT_NAME, b"disk")
    agreed = s.finish()
    assert agreed is not None and agreed.structured and agreed.export_name == b"disk"
    assert s.client.read_until_closed() == (
        struct.pack(">QH", SIZE, expected_flags(structured=True)) + bytes(124))


@pytest.mark.parametrize("flags", [0x4, 0x8, 0x80000000, 0xFFFFFFFF, 0x7])
def test_unknown_client_flags(side, flags):
    s = side()
    s.client.read_greeting()
    s.client.send_client_flags(flags)
    with pytest.raises(HandshakeError):
        s.finish()


@pytest.mark.parametrize("magic", [0, wire.OPTION_REPLY_MAGIC, wire.NBDMAGIC,
                                   int.from_bytes(b"IHAVEOPS", "big")])
def test_bad_option_magic(side, magic):
    s = newstyle(side)
    s.client.send_option(wire.OPT_GO, RawClient.info_request(), magic=magic)
    with pytest.raises(HandshakeError):
        s.finish()


@pytest.mark.parametrize("length", [MAX_OPTION_LENGTH + 1, 1 << 20, 0xFFFFFFFF])
def test_option_too_long_is_refused_without_reading_it(side, length):
    s = newstyle(side)
    # Only the header: a server that tried to read the data would wait (and time out).
    s.client.send_option(42, b"", length=length)
    with pytest.raises(HandshakeError):
        s.finish()


def test_options_after_errors_keep_working(side):
    s = newstyle(side)
    for _ in range(3):
        assert s.client.option(42)[-1].type == wire.REP_ERR_UNSUP
        assert s.client.option(wire.OPT_LIST, b"x")[-1].type == wire.REP_ERR_INVALID
        assert s.client.option(wire.OPT_GO, b"")[-1].type == wire.REP_ERR_INVALID
    go_and_enter(s)


def test_endless_options_end_the_handshake(side):
    s = newstyle(side)
    with pytest.raises(HandshakeError):
        # A client stuck in a loop: the server gives up at some point (before 100000).
        for _ in range(100000):
            if not s.thread.is_alive():
                break
            try:
                s.client.option(42)
            except Exception:  # noqa: BLE001 - the server closed on us
                break
        s.finish()


# -- the client side against a scripted server -------------------------------------------------

class FakeServer:
    """Runs ``script(sock)`` in a thread on the server end of a socketpair."""

    def __init__(self, script) -> None:
        self.sock, self.client_sock = socket.socketpair()
        self.sock.settimeout(TIMEOUT)
        self.client_sock.settimeout(TIMEOUT)
        self.error: BaseException | None = None

        def run():
            try:
                script(RawServer(self.sock))
            except BaseException as e:  # noqa: BLE001
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self):
        self.client_sock.close()
        self.thread.join(TIMEOUT)
        self.sock.close()
        if self.error is not None:
            raise self.error


class RawServer:
    def __init__(self, sock):
        self.sock = sock
        self.raw = RawClient(sock)

    def recv_option(self):
        magic, option, length = wire.unpack_option_header(self.raw.recv_exact(16))
        assert magic == wire.IHAVEOPT
        return option, self.raw.recv_exact(length)


def test_client_falls_back_to_export_name():
    def script(srv):
        srv.sock.sendall(wire.pack_newstyle_greeting(wire.FLAG_FIXED_NEWSTYLE))
        (cflags,) = struct.unpack(">I", srv.raw.recv_exact(4))
        assert cflags == wire.FLAG_C_FIXED_NEWSTYLE
        option, _ = srv.recv_option()
        assert option == wire.OPT_GO
        srv.sock.sendall(wire.pack_option_reply(option, wire.REP_ERR_UNSUP))
        option, name = srv.recv_option()
        assert (option, name) == (wire.OPT_EXPORT_NAME, b"")
        srv.sock.sendall(struct.pack(">QH", 4096, 1) + bytes(124))

    fake = FakeServer(script)
    try:
        info = client_handshake(fake.client_sock)
        assert (info.style, info.size, info.flags) == ("newstyle", 4096, 1)
    finally:
        fake.close()


@pytest.mark.parametrize("greeting", [
    b"NBDMAGIX" + b"IHAVEOPT" + b"\0\3",
    b"NBDMAGIC" + b"IHAVEOPX" + b"\0\3",
])
def test_client_refuses_a_bad_greeting(greeting):
    fake = FakeServer(lambda srv: srv.sock.sendall(greeting))
    try:
        with pytest.raises(HandshakeError):
            client_handshake(fake.client_sock)
    finally:
        fake.close()


def test_client_reports_a_refused_export():
    def script(srv):
        srv.sock.sendall(wire.pack_newstyle_greeting(3))
        srv.raw.recv_exact(4)
        option, _ = srv.recv_option()
        srv.sock.sendall(wire.pack_option_reply(option, wire.REP_ERR_POLICY, b"no"))

    fake = FakeServer(script)
    try:
        with pytest.raises(HandshakeError):
            client_handshake(fake.client_sock)
    finally:
        fake.close()

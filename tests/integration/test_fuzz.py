"""Random request streams against one real `flexnbd serve` per handshake style.

Valid and invalid commands, flags, offsets and lengths (huge ones too), WRITEs with their
payloads, sent several at a time. Every request must be answered, in order, with its cookie,
with the error tests/support/nbdmodel.py predicts; READ data must equal the model of the file;
the server must never die. Some streams end with a bad magic, a DISC, or a WRITE too long to
drain, after which the connection must close.

Requests sent together are in flight together: a READ is not checked where a later request of
its batch writes, since NBD leaves that order open (and flexnbd's zero-copy sendfile does let
such a write show through). Earlier requests of a batch are checked to have taken effect: this
server handles one connection's requests in order.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from flexnbd import wire
from tests.conftest import Server
from tests.support.nbdmodel import (
    BS,
    CACHE,
    DISC,
    FLUSH,
    READ,
    TRIM,
    WRITE,
    WZ,
    DiskModel,
    expected_error,
)
from tests.support.rawclient import RawClient, connect_and_handshake

EXPORT_SIZE = 256 * 1024
FILE_SIZE = EXPORT_SIZE + 300          # rounded down to EXPORT_SIZE by the server
MAX = wire.MAX_PAYLOAD
U64 = 2**64

# No shrinking: every example talks to a real server, and a failure already shows its stream.
FUZZ_SETTINGS = settings(max_examples=60, deadline=None,
                         phases=[Phase.explicit, Phase.reuse, Phase.generate],
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=["newstyle", "oldstyle"])
def fuzz_server(request, tmp_path_factory):
    """One server (and file) for all the examples of the module, per style."""
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    path = tmp / "disk.img"
    path.write_bytes(os.urandom(FILE_SIZE))
    extra = ["--oldstyle"] if request.param == "oldstyle" else []
    server = Server(path, tmp / "server.log", extra)
    server.style = request.param
    try:
        yield server
    finally:
        server.kill()
    assert "Traceback" not in server.log_path.read_text(errors="replace")


# -- strategies ----------------------------------------------------------------------------------

@dataclass
class Req:
    type: int
    flags: int
    offset: int
    length: int
    payload: bytes = b""
    magic: int = wire.REQUEST_MAGIC


def near(values):
    return st.sampled_from(values).flatmap(
        lambda v: st.integers(max(0, v - 3), min(U64 - 1, v + 3)))


# Wild requests: anything goes (mostly errors).
wild_offsets = st.one_of(
    st.integers(0, EXPORT_SIZE + 8192),
    near([0, EXPORT_SIZE - 512, EXPORT_SIZE]),
    st.sampled_from([0xFFFFFFFFFFFFFF00, U64 - 1, U64 - 512, 2**63, 2**32]),
    st.integers(0, U64 - 1),
)
wild_lengths = st.one_of(
    st.integers(0, 8192),
    st.integers(0, EXPORT_SIZE + 4096),
    near([0, 512, EXPORT_SIZE]),
    st.sampled_from([MAX, MAX + 1, 2**31, 2**32 - 1, 0x200]),
)
wild_flags = st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF))
wild_types = st.one_of(st.integers(0, 7), st.integers(8, 0xFFFF))
write_lengths = st.one_of(st.integers(0, 4096), st.integers(0, 65536), near([512, 4096]))

# Well-formed requests: mostly valid, so that data moves and is checked.
VALID_TYPES = [READ, READ, READ, WRITE, WRITE, WRITE, FLUSH, TRIM, CACHE, WZ, WZ, BS]
USUAL_FLAGS = {
    READ: [0, 0, wire.CMD_FLAG_FUA, wire.CMD_FLAG_DF],
    WRITE: [0, 0, wire.CMD_FLAG_FUA],
    WZ: [0, wire.CMD_FLAG_NO_HOLE, wire.CMD_FLAG_FUA, wire.CMD_FLAG_FAST_ZERO,
         wire.CMD_FLAG_NO_HOLE | wire.CMD_FLAG_FAST_ZERO],
    BS: [0, wire.CMD_FLAG_REQ_ONE],
}


def payload_for(length):
    return st.one_of(st.binary(min_size=length, max_size=length),
                     st.integers(0, 255).map(lambda b: bytes([b]) * length))


@st.composite
def requests(draw):
    if draw(st.integers(0, 3)) == 0:
        type = draw(wild_types)
        flags = draw(wild_flags)
        offset = draw(wild_offsets)
        length = draw(write_lengths if type == WRITE else wild_lengths)
    else:
        type = draw(st.sampled_from(VALID_TYPES))
        flags = draw(st.sampled_from(USUAL_FLAGS.get(type, [0, wire.CMD_FLAG_FUA])))
        # sampled_from spreads offsets over the whole export (integers() favours small ones)
        offset = min(EXPORT_SIZE, draw(st.sampled_from(range(0, EXPORT_SIZE + 1, 512)))
                     + draw(st.sampled_from([0, 0, 0, 1, 100, 511])))
        room = EXPORT_SIZE - offset
        length = draw(st.one_of(st.integers(0, min(room, 8192)),
                                st.integers(0, min(room, 65536)),
                                st.integers(0, room + 1024)))
    payload = draw(payload_for(length)) if type == WRITE else b""
    return Req(type, flags, offset, length, payload)


# How a stream ends (after its last request): the connection stays, or closes after...
ENDINGS = ["stay", "disc", "bad_magic", "huge_write"]
ANY_ENDING = st.sampled_from(ENDINGS)


@st.composite
def streams(draw, endings=ANY_ENDING):
    reqs = draw(st.lists(requests(), min_size=1, max_size=12))
    batch = draw(st.integers(1, 6))
    return reqs, batch, draw(endings), draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


# -- running a stream ----------------------------------------------------------------------------

def send_in_background(c: RawClient, data: bytes) -> threading.Thread:
    """Send while the replies are read, so neither side can block the other."""
    def run():
        try:
            c.send(data)
        except OSError:
            pass  # the test fails on the reply side
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def run_stream(server, reqs, batch, ending, structured, salt):
    assert server.proc.poll() is None, "the server died"
    model = DiskModel(server.file.read_bytes()[:EXPORT_SIZE])
    structured = structured and server.style == "newstyle"
    with connect_and_handshake(server.port, structured=structured) as c:
        assert c.size == EXPORT_SIZE
        fast_zero = bool(c.flags & wire.FLAG_SEND_FAST_ZERO)
        cookies = iter(range(salt << 32, (salt << 32) + 10**6))
        log = []
        for start in range(0, len(reqs), batch):
            group = [(next(cookies), r) for r in reqs[start:start + batch]]
            data = b"".join(c.pack(r.type, r.offset, r.length, cookie, r.flags, r.magic)
                            + r.payload for cookie, r in group)
            sender = send_in_background(c, data)
            for j, (cookie, r) in enumerate(group):
                want = expected_error(r.magic, r.flags, r.type, r.offset, r.length,
                                      EXPORT_SIZE, structured=structured, fast_zero=fast_zero)
                log.append(f"{r.type} flags={r.flags:#x} {r.offset}+{r.length} -> {want}")
                if r.type == DISC and want == 0:
                    # DISC: no reply; the server closes (what was sent after it is ignored).
                    assert c.read_until_closed() == b"", log
                    sender.join(30)
                    assert server.proc.poll() is None, "the server died"
                    return
                reply = c.recv_reply(r.length if r.type == READ else None, r.offset)
                assert reply.cookie == cookie, f"out of order or wrong cookie; {log}"
                if want == 0 and r.type == WZ and r.flags & wire.CMD_FLAG_FAST_ZERO:
                    # FAST_ZERO may fail at once (ENOTSUP) when zeroing would be slow.
                    assert reply.error in (0, wire.NBD_ENOTSUP), (
                        f"answered {reply.error}; {log}")
                else:
                    assert reply.error == want, f"answered {reply.error}; {log}"
                if reply.error:
                    continue
                if r.type == READ:
                    # Requests in flight together may take effect in any order (NBD): bytes
                    # that a later request of the same batch changes may read old or new.
                    racing = tuple((x.offset, x.offset + x.length) for _, x in group[j + 1:]
                                   if x.type in (WRITE, WZ, TRIM))
                    problem = model.mismatch(r.offset, reply.data, racing)
                    assert problem is None, f"{problem}; {log}"
                elif r.type == WRITE:
                    model.write(r.offset, r.payload)
                elif r.type == WZ:
                    model.zero(r.offset, r.length)
                elif r.type == TRIM:
                    model.trim(r.offset, r.length)
            sender.join(30)
            assert not sender.is_alive()
        # The whole export still reads as the model says (in pieces of at most 32 MiB).
        whole = c.read(0, EXPORT_SIZE)
        assert model.mismatch(0, whole) is None
        end(c, ending, next(cookies))
    assert server.proc.poll() is None, "the server died"


def end(c: RawClient, ending: str, cookie: int) -> None:
    if ending == "stay":
        c.send_request(FLUSH, cookie=cookie)
        assert c.recv_reply().cookie == cookie
    elif ending == "disc":
        c.send_request(DISC, cookie=cookie)
        assert c.read_until_closed() == b""
    elif ending == "bad_magic":
        c.send_request(READ, 0, 512, cookie=cookie, magic=0x25609512)
        reply = c.recv_reply()
        assert (reply.error, reply.cookie) == (wire.NBD_EBADMSG, cookie)
        assert c.read_until_closed() == b""
    elif ending == "huge_write":
        # 4 GiB claimed, nothing sent: answered EINVAL and/or disconnected, never waited for.
        c.send_request(WRITE, 0, 0xFFFFFFFF, cookie=cookie)
        data = c.read_until_closed()
        if data:
            assert wire.unpack_simple_reply(data) == (wire.SIMPLE_REPLY_MAGIC,
                                                      wire.NBD_EINVAL, cookie)


@FUZZ_SETTINGS
@given(stream=streams())
def test_random_request_streams(fuzz_server, stream):
    run_stream(fuzz_server, *stream)


@settings(FUZZ_SETTINGS, max_examples=25)
@given(stream=streams(endings=st.just("bad_magic")))
def test_streams_ending_with_a_bad_magic(fuzz_server, stream):
    run_stream(fuzz_server, *stream)


def test_the_server_survived(fuzz_server):
    assert fuzz_server.proc.poll() is None
    with connect_and_handshake(fuzz_server.port) as c:
        assert c.read(0, 4096) == fuzz_server.file.read_bytes()[:4096]

"""PSK files (psktool's ``identity:hexkey`` lines) are parsed as bytes with stated bounds: an
identity of 1 to 128 bytes, a key of 16 to 64 bytes. Anything else is one TlsError naming the
file and the line; nothing a file holds can crash the parser or overflow the C fields the
entries are copied into (an identity of 128 emoji, 512 bytes, once aborted the server)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexnbd._tls import (
    MAX_PSK_ENTRIES,
    PSK_IDENTITY_MAX,
    PSK_KEY_MAX,
    PSK_KEY_MIN,
    TlsContext,
    read_psk_file,
)
from flexnbd.errors import TlsError

KEY = bytes(range(32))


def write(tmp_path, data: bytes):
    path = tmp_path / "keys.psk"
    path.write_bytes(data)
    return path


def line(identity: bytes, key: bytes = KEY) -> bytes:
    return identity + b":" + key.hex().encode() + b"\n"


def test_a_psktool_file(tmp_path):
    path = write(tmp_path, b"# made by psktool\n\n" + line(b"alice") + line(b"bob", bytes(64)))
    assert read_psk_file(str(path)) == [(b"alice", KEY), (b"bob", bytes(64))]


def test_crlf_and_upper_case_hex(tmp_path):
    path = write(tmp_path, b"alice:" + KEY.hex().upper().encode() + b"\r\n")
    assert read_psk_file(str(path)) == [(b"alice", KEY)]


@pytest.mark.parametrize("identity", [b"a" * PSK_IDENTITY_MAX, "\U0001F600".encode() * 32,
                                      "é".encode() * 64])
def test_identities_up_to_128_bytes_load(tmp_path, identity):
    path = write(tmp_path, line(identity))
    assert read_psk_file(str(path)) == [(identity, KEY)]
    # and the C side takes them whole (server and client contexts)
    TlsContext(server=True, psk_file=str(path))
    TlsContext(server=False, psk_file=str(path))


@pytest.mark.parametrize("identity, why", [
    ("\U0001F600" * 128, "too long"),              # 128 characters, 512 bytes
    ("\U0001F600" * 33, "1 to 128 bytes, not 132"),
    ("a" * 129, "1 to 128 bytes, not 129"),
    ("", "1 to 128 bytes, not 0"),
])
def test_identities_are_counted_in_bytes(tmp_path, identity, why):
    path = write(tmp_path, line(identity.encode()))
    with pytest.raises(TlsError, match=f"{path}, line 1: .*{why}"):
        read_psk_file(str(path))
    with pytest.raises(TlsError, match="line 1"):
        TlsContext(server=True, psk_file=str(path))


@pytest.mark.parametrize("data, why", [
    (b"alice\n", "not 'identity:hexkey'"),
    (b"alice:" + b"0" * 63 + b"\n", "even number of hex digits"),
    (b"alice:" + b"zz" * 32 + b"\n", "even number of hex digits"),
    (b"alice:\n", "even number of hex digits"),
    (line(b"alice", bytes(PSK_KEY_MIN - 1)), f"{PSK_KEY_MIN} to {PSK_KEY_MAX} bytes, not 15"),
    (line(b"alice", bytes(PSK_KEY_MAX + 1)), f"{PSK_KEY_MIN} to {PSK_KEY_MAX} bytes, not 65"),
    (line(b"a" * 100, bytes(PSK_KEY_MAX + 20)), "too long"),
    (line(b"al ice"), "space or a control character"),
    (line(b"al\x00ice"), "space or a control character"),
    (line(b"al\x7fice"), "space or a control character"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path, data, why):
    path = write(tmp_path, b"# comment\n" + data)
    with pytest.raises(TlsError, match=f"{path}, line 2: .*{why}"):
        read_psk_file(str(path))


def test_no_entry_too_many_entries_too_big(tmp_path):
    with pytest.raises(TlsError, match="has no 'identity:hexkey' line"):
        read_psk_file(str(write(tmp_path, b"# nothing\n\n")))
    many = b"".join(line(b"u%d" % i) for i in range(MAX_PSK_ENTRIES + 1))
    with pytest.raises(TlsError, match=f"more than {MAX_PSK_ENTRIES} entries"):
        read_psk_file(str(write(tmp_path, many)))
    with pytest.raises(TlsError, match="too big for a PSK file"):
        read_psk_file(str(write(tmp_path, b"#" * (1 << 20))))


def test_unreadable(tmp_path):
    with pytest.raises(TlsError, match="cannot read the PSK file"):
        read_psk_file(str(tmp_path / "missing"))
    with pytest.raises(TlsError, match="cannot read the PSK file"):
        read_psk_file(str(tmp_path))       # a directory


# Lines that look almost right: identities of odd bytes and lengths, keys of odd lengths.
_identity = st.binary(min_size=0, max_size=300) | st.text(max_size=200).map(str.encode)
_key = st.binary(max_size=80).map(lambda b: b.hex().encode()) | st.binary(max_size=200)
_entry = st.tuples(_identity, _key).map(lambda t: t[0] + b":" + t[1])
_lines = st.lists(_entry | st.binary(max_size=400), max_size=8)
# (tmp_path is one file rewritten by every example)
_FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=400, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(lines=_lines, ending=st.sampled_from([b"\n", b"\r\n", b"\n\n", b"\r"]))
def test_fuzzed_files_load_or_fail_with_one_line(tmp_path, lines, ending):
    path = write(tmp_path, ending.join(lines))
    try:
        entries = read_psk_file(str(path))
    except TlsError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    for identity, key in entries:
        assert 1 <= len(identity) <= PSK_IDENTITY_MAX and b":" not in identity
        assert PSK_KEY_MIN <= len(key) <= PSK_KEY_MAX
    # what loads, the C side takes whole
    TlsContext(server=True, psk_file=str(path))
    TlsContext(server=False, psk_file=str(path))


@settings(max_examples=200, deadline=None, suppress_health_check=_FIXTURE_OK)
@given(data=st.binary(max_size=2048))
def test_random_bytes_never_crash(tmp_path, data):
    path = write(tmp_path, data)
    try:
        read_psk_file(str(path))
    except TlsError:
        pass


def test_a_real_session_with_the_longest_identity(tmp_path):
    """A 128-byte identity of multi-byte characters goes through a real TLS handshake."""
    import socket
    import threading

    identity = "\U0001F600".encode() * 32
    path = write(tmp_path, line(identity, os.urandom(32)))
    server_ctx = TlsContext(server=True, psk_file=str(path))
    client_ctx = TlsContext(server=False, psk_file=str(path))
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            s = server_ctx.session(a)
            s.handshake()
            s.sendall(b"hello")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        c = client_ctx.session(b)
        c.handshake()
        assert c.recv(5) == b"hello"
    finally:
        t.join()
        a.close()
        b.close()
    assert not errors, errors

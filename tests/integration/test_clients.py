"""flexnbd serve against the real NBD clients: qemu-img, qemu-io, nbdinfo, nbdcopy, libnbd's
Python binding, nbd-client. Each test runs real processes on 127.0.0.1 and checks what the
clients report and the bytes that land in the served file.

Unless a client needs newstyle, every test runs against both handshakes: the default fixed
newstyle and ``--oldstyle``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import require_tool
from tests.support.clients import (
    LIBNBD_READ_ONLY,
    ZEROING_SCRIPT,
    check,
    check_libnbd_aio,
    libnbd,
    libnbd_ops_done,
    libnbd_past_the_end,
    qemu_io,
    run,
    zeroing_done,
)
from tests.support.serving import alive

MiB = 1 << 20

HANDSHAKES = [pytest.param((), id="newstyle"), pytest.param(("--oldstyle",), id="oldstyle")]
# What each handshake advertises: oldstyle sends 0.5.0's flags (HAS_FLAGS|SEND_FLUSH|SEND_FUA).
NEWSTYLE_FLAGS = {"can_flush": True, "can_fua": True, "can_trim": True, "can_zero": True,
                  "can_cache": True, "can_multi_conn": True}
OLDSTYLE_FLAGS = {"can_flush": True, "can_fua": True, "can_trim": False, "can_zero": False,
                  "can_cache": False, "can_multi_conn": False}


def expected_flags(style: tuple[str, ...]) -> dict[str, bool]:
    return OLDSTYLE_FLAGS if "--oldstyle" in style else NEWSTYLE_FLAGS


def wait_for_log(server, regex: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(regex, server.log()):
        assert time.monotonic() < deadline, f"no {regex!r} in the server log:\n{server.log()}"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# qemu-img

@pytest.mark.parametrize("style", HANDSHAKES)
@pytest.mark.parametrize("size,exported", [(4 * MiB, 4 * MiB), (1535, 1024),
                                           (3 * MiB + 700, 3 * MiB + 512)])
def test_qemu_img_info_reports_the_export_size(serve, make_file, style, size, exported):
    qemu_img = require_tool("qemu-img")
    server = serve(make_file(size), *style)
    info = json.loads(check([qemu_img, "info", "--output=json", server.uri]))
    assert info["virtual-size"] == exported
    alive(server)


# --------------------------------------------------------------------------------------------
# qemu-io

@pytest.mark.parametrize("style", HANDSHAKES)
def test_qemu_io_write_read_patterns(serve, make_file, style):
    path = make_file(2 * MiB)
    model = bytearray(path.read_bytes())
    server = serve(path, *style)
    # (pattern byte, offset, length): aligned, unaligned, crossing 4 KiB blocks, tiny, big,
    # up to the very last byte of the export.
    writes = [(0xAB, 0, 64 * 1024), (0x11, 1000, 3001), (0x5C, 4095, 2), (0x77, 65537, 1),
              (0x3E, 131071, 200003), (0x01, 1 * MiB, 1 * MiB - 4096), (0xF0, 2 * MiB - 513, 513)]
    commands = []
    for byte, off, length in writes:
        commands += [f"write -P {byte:#x} {off} {length}", f"read -P {byte:#x} {off} {length}"]
        model[off:off + length] = bytes([byte]) * length
    out = qemu_io(server.uri, *commands)
    assert out.count("wrote ") == len(writes) and out.count("read ") == len(writes)
    assert path.read_bytes() == bytes(model)
    # A fresh connection reads back the last write and the untouched bytes around it.
    qemu_io(server.uri, f"read -P 0xf0 {2 * MiB - 513} 513", "read -P 0x01 1048576 512")
    alive(server)


# qemu-io: zero three ways, discard 655360..720896, flush, a FUA write; read them back.


@pytest.mark.parametrize("style", HANDSHAKES)
def test_qemu_io_zeroes_discard_flush_fua(serve, make_file, style):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    model = bytearray(original)
    server = serve(path, *style)
    qemu_io(server.uri, *ZEROING_SCRIPT)
    zeroing_done(model)
    data = path.read_bytes()
    # Oldstyle does not offer TRIM, so qemu does not send it: the data stays. In newstyle the
    # server punches a hole (SPEC 3), which reads back as zeroes.
    if "--oldstyle" not in style:
        model[655360:655360 + 65536] = bytes(65536)
    assert data[:655360] == bytes(model[:655360])
    assert data[655360:720896] == bytes(model[655360:720896])
    assert data == bytes(model)
    alive(server)


@pytest.mark.parametrize("style", HANDSHAKES)
def test_concurrent_qemu_io_clients(serve, make_file, style):
    qemu = require_tool("qemu-io")
    path = make_file(4 * MiB)
    model = bytearray(path.read_bytes())
    server = serve(path, *style)
    procs = []
    for i in range(4):
        # Disjoint, unaligned regions that share no 512-byte sector: over oldstyle qemu
        # knows no block size and writes whole sectors (read-modify-write), so two clients'
        # writes into one sector would race in the clients, not in the server.
        region = 512 * 1024 + i * (800_000 + 1024) + i
        byte = 0x21 + i
        cmd = [qemu, "-f", "raw"]
        for k in range(8):
            off = region + k * 99_999
            cmd += ["-c", f"write -P {byte:#x} {off} 99999", "-c", f"read -P {byte:#x} {off} 99999"]
        model[region:region + 8 * 99_999] = bytes([byte]) * (8 * 99_999)
        procs.append(subprocess.Popen(cmd + [server.uri], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        assert "failed" not in out.lower(), out
        assert out.count("wrote 99999/99999") == 8
    assert path.read_bytes() == bytes(model)
    alive(server)


# --------------------------------------------------------------------------------------------
# nbdinfo

@pytest.mark.parametrize("style", HANDSHAKES)
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_nbdinfo_json(serve, make_file, style, read_only):
    nbdinfo = require_tool("nbdinfo")
    extra = (*style, "--read-only") if read_only else style
    server = serve(make_file(3 * MiB + 1000), *extra)
    info = json.loads(check([nbdinfo, "--json", server.uri]))
    assert info["protocol"] == ("oldstyle" if style else "newstyle-fixed")
    [export] = info["exports"]
    assert export["export-size"] == 3 * MiB + 512
    for flag, value in expected_flags(style).items():
        assert export[flag] is value, (flag, export)
    assert export["is_read_only"] is read_only
    if not style:
        # BLOCK_SIZE info as SPEC 3 says: min 1, preferred 4096, max 32 MiB.
        assert export["block_size_minimum"] == 1
        assert export["block_size_preferred"] == 4096
        assert export["block_size_maximum"] == 32 * MiB
        assert info["structured"] is True
        assert export["can_df"] is True
    alive(server)


def test_nbdinfo_list_shows_one_export(serve, make_file):
    nbdinfo = require_tool("nbdinfo")
    server = serve(make_file(2 * MiB))
    info = json.loads(check([nbdinfo, "--list", "--json", server.uri]))
    assert [e["export-name"] for e in info["exports"]] == [""]
    assert info["exports"][0]["export-size"] == 2 * MiB
    text = check([nbdinfo, "--list", server.uri])
    assert text.count("export=") == 1, text
    alive(server)


def test_nbdinfo_any_export_name_connects(serve, make_file):
    nbdinfo = require_tool("nbdinfo")
    server = serve(make_file(1 * MiB))
    info = json.loads(check([nbdinfo, "--json", server.uri + "/some-name"]))
    assert info["exports"][0]["export-size"] == 1 * MiB
    alive(server)


# --------------------------------------------------------------------------------------------
# nbdcopy

@pytest.mark.parametrize("style", HANDSHAKES)
def test_nbdcopy_from_server(serve, make_file, tmp_path, style):
    nbdcopy = require_tool("nbdcopy")
    size = 5 * MiB + 3584
    data = bytearray(os.urandom(size))
    data[MiB:2 * MiB + 4096] = bytes(MiB + 4096)  # a zero run: nbdcopy may skip or zero it
    path = make_file(data=bytes(data))
    server = serve(path, *style)
    out = tmp_path / "out.img"
    check([nbdcopy, server.uri, str(out)])
    assert out.stat().st_size == size
    assert out.read_bytes() == bytes(data)
    alive(server)


@pytest.mark.parametrize("style", HANDSHAKES)
def test_nbdcopy_to_server(serve, make_file, tmp_path, style):
    nbdcopy = require_tool("nbdcopy")
    size = 5 * MiB + 3584
    path = make_file(size)  # random: every byte has to be overwritten
    server = serve(path, *style)
    src = bytearray(os.urandom(size))
    src[2 * MiB:3 * MiB + 512] = bytes(MiB + 512)  # a zero run: sent as zeroes or WRITE_ZEROES
    src[size - 4096:] = bytes(4096)                # zeroes up to the end of the export
    inp = tmp_path / "in.img"
    with open(inp, "wb") as f:
        f.write(bytes(src[:2 * MiB]))
        f.seek(3 * MiB + 512)                      # a real hole in the source too
        f.write(bytes(src[3 * MiB + 512:]))
    assert inp.read_bytes() == bytes(src)
    check([nbdcopy, str(inp), server.uri])
    assert path.read_bytes() == bytes(src)
    # And back out through the server.
    back = tmp_path / "back.img"
    check([nbdcopy, server.uri, str(back)])
    assert back.read_bytes() == bytes(src)
    alive(server)


def test_nbdcopy_over_a_unix_socket(serve, make_file, tmp_path):
    # nbdcopy keeps many requests in flight, and their replies leave in batches: a Unix
    # socket must take them just as TCP does (it was once disconnected by a TCP-only option).
    nbdcopy = require_tool("nbdcopy")
    path = make_file(9 * MiB + 512)
    unix = tmp_path / "nbd.sock"
    server = serve(path, "--unix", str(unix))
    out = tmp_path / "out.img"
    check([nbdcopy, "--requests=64", f"nbd+unix:///?socket={unix}", str(out)])
    assert out.read_bytes() == path.read_bytes()
    check([nbdcopy, str(out), f"nbd+unix:///?socket={unix}"])
    assert "socket error" not in server.log()
    alive(server)


# --------------------------------------------------------------------------------------------
# libnbd's Python binding (module nbd, system python)

@pytest.mark.parametrize("style", HANDSHAKES)
def test_libnbd_flags(serve, make_file, style):
    server = serve(make_file(3 * MiB + 1000), *style)
    info = libnbd("info", server.uri)
    assert info["size"] == 3 * MiB + 512
    for flag, value in expected_flags(style).items():
        assert info[flag] is value, (flag, info)
    assert info["is_read_only"] is False
    if style:
        assert info["protocol"] == "oldstyle"
        assert info["structured"] is False
        assert info["can_fast_zero"] is False
    else:
        assert info["protocol"] == "newstyle-fixed"
        assert info["structured"] is True
        assert info["can_df"] is True
        # The temp file system (ext4, xfs, tmpfs) can punch holes: zeroing is fast.
        assert info["can_fast_zero"] is True


@pytest.mark.parametrize("style", HANDSHAKES)
def test_libnbd_read_write_trim_zero_cache_flush(serve, make_file, style):
    path = make_file(1 * MiB)
    model = bytearray(path.read_bytes())
    server = serve(path, *style)
    res = libnbd("ops", server.uri)
    assert res["fua_readback"] is True
    assert res["plain_readback"] is True
    if style:
        assert res["steps"] == ["pwrite-fua", "pwrite", "flush"]
    else:
        assert res["steps"] == ["pwrite-fua", "pwrite", "trim", "zero", "fast-zero", "cache",
                                "flush"]
        assert res["zero_readback"] is True
        assert res["zero_no_hole_readback"] is True
        assert res["fast_zero"] == "ok"
    libnbd_ops_done(model, zeroed=not style)
    data = path.read_bytes()
    assert data == bytes(model)
    assert res["sha256"] == hashlib.sha256(data).hexdigest()
    if not style:
        # TRIM and WRITE_ZEROES without NO_HOLE punch holes (SPEC 3): the aligned ranges
        # are holes in the file now.
        with open(path, "rb") as f:
            for off in (262144, 393216, 720896):
                assert os.lseek(f.fileno(), off, os.SEEK_HOLE) == off, f"no hole at {off}"
    alive(server)


@pytest.mark.parametrize("style", HANDSHAKES)
def test_libnbd_errors_past_the_end(serve, make_file, style):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    server = serve(path, *style)
    res = libnbd("errors", server.uri)["results"]
    assert res == libnbd_past_the_end(newstyle=not style)
    # Nothing of the refused writes landed; only the last, valid one did.
    assert path.read_bytes() == b"w" * 512 + original[512:]
    alive(server)


@pytest.mark.parametrize("style", HANDSHAKES)
def test_libnbd_read_only_refuses_writes(serve, make_file, style):
    path = make_file(1 * MiB)
    original = path.read_bytes()
    server = serve(path, *style, "--read-only")
    res = libnbd("readonly", server.uri)
    assert res["is_read_only"] is True
    assert res["results"] == LIBNBD_READ_ONLY
    assert path.read_bytes() == original
    alive(server)


@pytest.mark.parametrize("style", HANDSHAKES)
def test_libnbd_pipelined_aio(serve, make_file, style):
    path = make_file(1 * MiB)
    model = bytearray(path.read_bytes())
    server = serve(path, *style)
    res = libnbd("aio", server.uri)
    assert res["max_in_flight"] > 1
    check_libnbd_aio(res, path, model)
    alive(server)


# --------------------------------------------------------------------------------------------
# nbd-client (the kernel client's userspace half; newstyle only)

def _nbd_client(*args: str) -> subprocess.CompletedProcess:
    nbd_client = require_tool("nbd-client")
    if os.path.exists("/dev/nbd0"):
        pytest.skip("a kernel nbd device exists here; this test must not attach it")
    return run([nbd_client, *args], timeout=30)


def test_nbd_client_negotiates_newstyle(serve, make_file):
    server = serve(make_file(4 * MiB))
    res = _nbd_client("127.0.0.1", str(server.port), "/dev/nbd0", "-N", "")
    out = res.stdout + res.stderr
    # The negotiation finished (nbd-client learnt the size) ...
    assert "Negotiation:" in out, out
    assert re.search(r"size = 4MB", out), out
    assert "oldstyle server" not in out, out
    # ... and it failed only at the kernel step: no nbd module / device here.
    assert res.returncode != 0
    assert re.search(r"netlink|nbd module|'nbd' module|/dev/nbd0|Cannot open NBD", out), out
    # The server logs the connection once its handshake thread gets there; nbd-client may
    # have exited before that, so wait for the line (not a timing assertion: 30 s is generous).
    wait_for_log(server, r"connected \(newstyle")
    alive(server)


def test_nbd_client_refuses_oldstyle_and_the_server_carries_on(serve, make_file):
    server = serve(make_file(2 * MiB), "--oldstyle")
    res = _nbd_client("127.0.0.1", str(server.port), "/dev/nbd0", "-N", "")
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "oldstyle" in out, out
    alive(server)
    qemu_img = require_tool("qemu-img")
    info = json.loads(check([qemu_img, "info", "--output=json", server.uri]))
    assert info["virtual-size"] == 2 * MiB
    assert "Traceback" not in server.log()

"""What a user of nbdkit or qemu-nbd reaches for: host names, every address, the NBD port by
default, sizes with suffixes, a word about odd file sizes and read-only files, and no files
left behind by a server that stopped cleanly.

Host names are tested with names of our own: the process that resolves runs in a mount
namespace of its own (``unshare --mount``) where /etc/hosts is a file of the test and
/etc/nsswitch.conf looks in files only, so lookups are instant and say what the test wants.
The network is the machine's: clients outside the namespace reach the same sockets.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import (
    FLEXNBD,
    FLEXNBD_PROXY,
    FlexnbdProcess,
    free_port,
    require_tool,
    wait_for_port,
)
from tests.support import control as cu
from tests.support.migration import Pair, assert_completed, logs, mirror_cli, out
from tests.support.tlscreds import make_ca, sign
from tests.support.waiting import wait_until

MiB = 1 << 20
NBD_PORT = 10809


def resolving(tmp_path: Path, *lines: str) -> list[str]:
    """A command prefix: what follows runs with /etc/hosts made of ``lines`` (and nothing but
    that file consulted for host names)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{line}\n" for line in lines))
    nss = tmp_path / "nsswitch.conf"
    nss.write_text("hosts: files\n")
    require_tool("unshare")
    script = (f"mount --bind {hosts} /etc/hosts && mount --bind {nss} /etc/nsswitch.conf && "
              'exec "$@"')
    return ["unshare", "--mount", "sh", "-c", script, "sh"]


def run(prefix: list[str], *args: str, input: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(prefix + FLEXNBD + list(args), input=input, capture_output=True,
                          timeout=timeout)


def started(proc: FlexnbdProcess, text: str = " serving ", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} line:\n{proc.log()}")
        time.sleep(0.02)


def greets_at(host: str, port: int) -> bool:
    try:
        s = cu.connect(host, port, timeout=5)
    except OSError:
        return False
    with s:
        return cu.greets(s, 5)


@pytest.fixture
def procs():
    """Processes a test starts itself; each is killed at the end."""
    running: list[FlexnbdProcess] = []
    yield running
    for p in running:
        p.kill()


def spawn(procs, tmp_path: Path, args: list[str], command: list[str] = FLEXNBD,
          prefix: list[str] = ()) -> FlexnbdProcess:
    p = FlexnbdProcess(args, tmp_path / f"proc{len(procs)}.log", command=list(prefix) + command)
    procs.append(p)
    return p


# -- host names ------------------------------------------------------------------------------

def test_serve_on_a_host_name_listens_on_each_of_its_addresses(tmp_path, make_file, procs):
    prefix = resolving(tmp_path, "127.0.0.3 db1.test", "127.0.0.4 db1.test")
    port = free_port()
    p = spawn(procs, tmp_path, ["serve", "--addr", "db1.test", "--port", str(port), "--file",
                                str(make_file(MiB)), "-v"], prefix=prefix)
    started(p)
    assert greets_at("127.0.0.3", port) and greets_at("127.0.0.4", port), p.log()
    assert not greets_at("127.0.0.1", port)          # its addresses, not every address
    assert f"on 127.0.0.3 port {port} and 127.0.0.4 port {port}" in p.log(), p.log()


def test_an_address_of_a_name_that_cannot_be_bound_is_skipped_with_a_warning(
        tmp_path, make_file, procs):
    """192.0.2.1 (TEST-NET-1) is no address of this machine: the server says so and listens
    on the other; a name with no address it can bind is an error."""
    prefix = resolving(tmp_path, "192.0.2.1 db1.test", "127.0.0.3 db1.test", "192.0.2.1 far.test")
    port = free_port()
    p = spawn(procs, tmp_path, ["serve", "--addr", "db1.test", "--port", str(port), "--file",
                                str(make_file(MiB)), "-v"], prefix=prefix)
    started(p)
    assert greets_at("127.0.0.3", port), p.log()
    assert f"db1.test: cannot listen on 192.0.2.1 port {port}: Cannot assign requested " \
           "address; listening on its other addresses" in p.log(), p.log()
    res = run(prefix, "serve", "--addr", "far.test", "--port", str(port), "--file",
              str(make_file(MiB)))
    assert (res.returncode, res.stderr.decode()) == \
        (1, f"flexnbd serve: cannot listen on 192.0.2.1 port {port}: Cannot assign requested "
            "address\n")


def test_read_tries_each_address_of_a_name_in_turn(tmp_path, make_file, start_server):
    """The name's first address refuses (nothing listens on ::1 there); the next serves."""
    data = os.urandom(MiB)
    src = start_server(make_file(data=data), host="127.0.0.3")
    prefix = resolving(tmp_path, "::1 db1.test", "127.0.0.3 db1.test")
    res = run(prefix, "read", "--addr", "db1.test", "--port", str(src.port), "--from", "4K",
              "--size", "64K", "-v")
    assert (res.returncode, res.stdout == data[4096:4096 + 65536]) == (0, True), res.stderr
    assert f"connected to db1.test (127.0.0.3) port {src.port}" in res.stderr.decode()
    res = run(prefix, "read", "--addr", "db1.test", "--port", str(free_port()), "--from", "0",
              "--size", "512")
    assert (res.returncode, res.stderr) == (1, b"flexnbd: ECONNREFUSED: Connection refused\n")


@pytest.mark.parametrize("args", [
    ["serve", "--addr", "nowhere.test", "--file", "FILE"],
    ["read", "--addr", "nowhere.test", "--port", "9", "--from", "0", "--size", "512"],
    ["read", "--addr", "127.0.0.1", "--port", "9", "--bind", "nowhere.test", "--from", "0",
     "--size", "512"],
], ids=["serve", "read", "read-bind"])
def test_a_name_without_an_address_is_one_clear_line(tmp_path, make_file, args):
    prefix = resolving(tmp_path)
    args = [str(make_file(MiB)) if a == "FILE" else a for a in args]
    res = run(prefix, *args)
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert "cannot resolve 'nowhere.test'" in lines[0], lines


def test_a_proxy_upstream_without_an_address_is_one_clear_line(tmp_path):
    res = subprocess.run(resolving(tmp_path) + FLEXNBD_PROXY + [
        "--addr", "127.0.0.1", "--port", str(free_port()), "--conn-addr", "nowhere.test",
        "--conn-port", "10809"], capture_output=True, text=True, timeout=60)
    assert (res.returncode, res.stderr) == \
        (1, "flexnbd-proxy: cannot resolve 'nowhere.test': Name or service not known\n"), res


def test_proxy_takes_host_names_on_both_sides(tmp_path, make_file, start_server, procs):
    data = os.urandom(MiB)
    src = start_server(make_file(data=data), host="127.0.0.3")
    prefix = resolving(tmp_path, "127.0.0.3 db1.test", "127.0.0.5 front.test")
    port = free_port()
    p = spawn(procs, tmp_path, ["--addr", "front.test", "--port", str(port), "--conn-addr",
                                "db1.test", "--conn-port", str(src.port), "-v"],
              command=FLEXNBD_PROXY, prefix=prefix)
    started(p)
    res = run([], "read", "--addr", "127.0.0.5", "--port", str(port), "--from", "0",
              "--size", "1M")
    assert (res.returncode, res.stdout == data) == (0, True), (res.stderr, p.log())
    assert "upstream db1.test (127.0.0.3)" in p.log(), p.log()


def _source(procs, tmp_path: Path, disk: Path, prefix: list[str], *extra: str) -> FlexnbdProcess:
    """A serve source with a control socket (``sock``), run under ``prefix``."""
    sock = tmp_path / f"src{len(procs)}.sock"
    src = spawn(procs, tmp_path, ["serve", "--addr", "127.0.0.1", "--port", str(free_port()),
                                  "--file", str(disk), "--sock", str(sock), "-v", *extra],
                prefix=prefix)
    src.sock = sock  # type: ignore[attr-defined]
    started(src)
    return src


def _x509_naming(root: Path, *names: str) -> Path:
    """A server credentials directory whose certificate names ``names`` only."""
    ca = make_ca(root / "ca")
    server = root / "server"
    sign(ca, server, "server", "serverAuth", names)
    (server / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    return server


@pytest.mark.parametrize("names,completes", [(("db1.test",), True), (("127.0.0.3",), False)],
                         ids=["certificate-names-the-host", "certificate-names-its-address"])
def test_mirror_to_a_host_name_checks_the_certificate_against_that_name(
        tmp_path, make_file, start_server, procs, names, completes):
    """The destination's certificate must carry the name the operator typed: its address
    alone is not enough (what was typed is what was meant)."""
    creds = _x509_naming(tmp_path / "x509", *names)
    tls = ["--tls", "require", "--tls-certificates", str(creds)]
    src_file = make_file(4 * MiB)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(4 * MiB)
    dst = start_server(dst_file, *tls, mode="listen", host="127.0.0.3")
    src = _source(procs, tmp_path, src_file, resolving(tmp_path, "127.0.0.3 db1.test"), *tls)
    res = mirror_cli(src, dst.port, host="db1.test")
    if completes:
        assert res.returncode == 0, (res.stderr, src.log())
        assert_completed(Pair(src, dst, src_file, dst_file))
        assert "mirror destination db1.test (127.0.0.3)" in src.log(), src.log()
        assert "mirror connected to db1.test (127.0.0.3)" in src.log(), src.log()
    else:
        assert res.returncode == 1, out(res)
        assert res.stdout == b"" and res.stderr.decode().startswith("Mirror was rejected\n"), \
            out(res)
        assert "TLS" in res.stderr.decode(), out(res)
        assert src.proc.poll() is None and dst.proc.poll() is None, logs(src, dst)


def test_the_control_socket_takes_a_host_name_for_mirror(tmp_path, make_file, procs):
    """0.5.0 answered a name with `bad IP address`; a name is now looked up, and one that has
    no address fails the mirror with the reason. What is no name at all is still refused."""
    src = _source(procs, tmp_path, make_file(MiB), resolving(tmp_path))
    res = mirror_cli(src, 9, host="Nowhere.test.")
    assert res.returncode == 1 and res.stdout == b"", out(res)
    reply, why = res.stderr.decode().splitlines()
    assert reply == "Mirror failed to connect" and "cannot resolve 'nowhere.test'" in why, \
        out(res)
    assert cu.control(src.sock, "mirror", "bad_name!", "4000") == "1: bad IP address\n"
    assert src.proc.poll() is None


# -- every address, and the NBD port ----------------------------------------------------------

@pytest.mark.parametrize("addr", ["0", "::"])
def test_any_address_listens_on_both_families(tmp_path, make_file, procs, addr):
    if not cu.ipv6_loopback():
        pytest.skip("this system has no IPv6 loopback")
    port = free_port()
    p = spawn(procs, tmp_path, ["serve", "--addr", addr, "--port", str(port), "--file",
                                str(make_file(MiB)), "-v", "127.0.0.1"])
    started(p)
    assert greets_at("127.0.0.1", port), p.log()      # the ACL takes it: named as IPv4
    s = cu.connect("::1", port, timeout=5)            # refused by the ACL, but reached
    with s:
        assert cu.closed_without_a_byte(s, 5)
    assert f":: (IPv6 and IPv4) port {port}" in p.log(), p.log()
    # (the IPv4 client's lines come from its own thread, maybe after the refusal's)
    assert wait_until(lambda: "127.0.0.1:" in p.log()), p.log()
    assert "::ffff:" not in p.log(), p.log()


def test_serve_listen_and_proxy_default_to_the_nbd_port(tmp_path, make_file, procs):
    serve = spawn(procs, tmp_path, ["serve", "--addr", "127.0.0.9", "--file",
                                    str(make_file(MiB)), "-v"])
    started(serve)
    wait_for_port(NBD_PORT, serve.proc, host="127.0.0.9")
    proxy = spawn(procs, tmp_path, ["--addr", "127.0.0.10", "--conn-addr", "127.0.0.9",
                                    "--conn-port", str(NBD_PORT), "-v"], command=FLEXNBD_PROXY)
    started(proxy)
    assert greets_at("127.0.0.10", NBD_PORT), proxy.log()
    listen = spawn(procs, tmp_path, ["listen", "--addr", "127.0.0.11", "--file",
                                     str(make_file(MiB, random=False)), "-v"])
    started(listen)
    assert greets_at("127.0.0.11", NBD_PORT), listen.log()


def test_port_without_an_address_is_a_usage_error(make_file, run_flexnbd):
    res = run_flexnbd("serve", "--port", "10809", "--file", str(make_file(MiB)))
    assert res.returncode == 1
    assert res.stderr.decode().splitlines()[0] == "flexnbd serve: --port goes with --addr"


# -- sizes ------------------------------------------------------------------------------------

def test_sizes_and_rates_take_suffixes(tmp_path, make_file, start_server, procs, run_flexnbd):
    data = os.urandom(2 * MiB)
    src = start_server(make_file(data=data))
    res = run_flexnbd("read", "--addr", "127.0.0.1", "--port", str(src.port), "--from", "0.5M",
                      "--size", "1M")
    assert (res.returncode, res.stdout == data[MiB // 2:MiB // 2 + MiB]) == (0, True), \
        res.stderr
    port = free_port()
    p = spawn(procs, tmp_path, ["--addr", "127.0.0.1", "--port", str(port), "--conn-addr",
                                "127.0.0.1", "--conn-port", str(src.port), "--cache=1M", "-v"],
              command=FLEXNBD_PROXY)
    started(p)
    assert "read-ahead 1048576 bytes" in p.log(), p.log()
    res = run_flexnbd("read", "--addr", "127.0.0.1", "--port", str(port), "--from", "0",
                      "--size", "2M")
    assert (res.returncode, res.stdout == data) == (0, True), res.stderr


# -- the file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size,says,exported", [
    (1000, "is 1000 bytes, not a multiple of 512: 512 bytes are served and its last 488 "
           "bytes are not", 512),
    (0, "is empty: clients will see a disk of 0 bytes", 0),
], ids=["1000-bytes", "empty"])
def test_an_odd_file_size_is_explained_at_start(make_file, start_server, size, says, exported):
    nbdinfo = require_tool("nbdinfo")
    srv = start_server(make_file(size, random=False))
    assert says in srv.log() and ":W:" in srv.log(), srv.log()
    res = subprocess.run([nbdinfo, "--size", f"nbd://127.0.0.1:{srv.port}"],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.strip() == str(exported), res


def test_a_multiple_of_512_gets_no_warning(make_file, start_server):
    srv = start_server(make_file(MiB))
    assert ":W:" not in srv.log(), srv.log()


@pytest.fixture
def shared_dir():
    """A directory every user can reach (pytest's own is its owner's alone)."""
    path = Path(tempfile.mkdtemp(prefix="flexnbd-habits-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_read_only_file_hints_at_read_only(shared_dir, procs):
    """As a user who may read the file but not write it (root may write anything)."""
    setpriv = require_tool("setpriv")
    disk = shared_dir / "ro.img"
    disk.write_bytes(os.urandom(MiB))
    disk.chmod(0o444)
    as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    res = subprocess.run(as_nobody + FLEXNBD + ["serve", "--addr", "127.0.0.1", "--port",
                                                str(free_port()), "--file", str(disk)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res
    assert res.stderr == (f"flexnbd serve: cannot open {disk}: Permission denied (it can be "
                          "read: serve it with --read-only)\n"), res.stderr
    port = free_port()
    p = spawn(procs, shared_dir, ["serve", "--addr", "127.0.0.1", "--port", str(port),
                                  "--file", str(disk), "--read-only", "-v"], prefix=as_nobody)
    started(p)
    assert greets_at("127.0.0.1", port)


# -- files left behind ------------------------------------------------------------------------

def _paths(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    sock, unix = tmp_path / "s.ctl", tmp_path / "s.nbd"
    return sock, unix, [sock, unix, Path(f"{sock}.lock"), Path(f"{unix}.lock")]


def _serve_with_sockets(procs, tmp_path: Path, disk: Path) -> FlexnbdProcess:
    sock, unix, _ = _paths(tmp_path)
    p = spawn(procs, tmp_path, ["serve", "--addr", "127.0.0.1", "--port", str(free_port()),
                                "--file", str(disk), "--sock", str(sock), "--unix", str(unix),
                                "-v"])
    started(p)
    return p


def test_a_clean_exit_leaves_no_socket_or_lock_file(tmp_path, make_file, procs, run_flexnbd):
    disk = make_file(MiB)
    sock, unix, files = _paths(tmp_path)
    p = _serve_with_sockets(procs, tmp_path, disk)
    assert all(f.exists() for f in files), files
    # While it runs, its files are its own: a second server is turned away at once.
    res = run_flexnbd("serve", "--addr", "127.0.0.1", "--port", str(free_port()), "--file",
                      str(disk), "--sock", str(sock), timeout=30)
    assert (res.returncode, res.stderr.decode()) == \
        (1, f"flexnbd serve: {sock} is already in use by a running server\n")
    p.signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0, p.log()
    assert [f for f in files if f.exists()] == []


def test_files_of_a_killed_server_are_reclaimed(tmp_path, make_file, procs):
    disk = make_file(MiB)
    _, _, files = _paths(tmp_path)
    p = _serve_with_sockets(procs, tmp_path, disk)
    p.signal(signal.SIGKILL)
    p.proc.wait(15)
    assert all(f.exists() for f in files)              # nobody could remove them
    again = _serve_with_sockets(procs, tmp_path, disk)
    again.signal(signal.SIGTERM)
    assert again.proc.wait(15) == 0, again.log()
    assert [f for f in files if f.exists()] == []


def test_a_listen_server_that_completes_leaves_no_files(tmp_path, pair, make_file):
    """The other clean exit: a migration received."""
    p = pair(make_file(4 * MiB))
    res = mirror_cli(p.src, p.dst.port)
    assert res.returncode == 0, out(res)
    assert_completed(p)
    for server in (p.src, p.dst):
        assert not server.sock.exists() and not Path(f"{server.sock}.lock").exists()


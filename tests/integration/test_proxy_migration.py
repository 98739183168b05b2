"""The whole story (SPEC §6 and §7): a client behind `flexnbd-proxy` keeps writing and reading
while the server it uses migrates to another host, and never notices more than a pause.

A pipelined libnbd client (tests/integration/scripts/pipelined_client.py, several requests in
flight) works through the proxy on a source `flexnbd serve` from before the migration until
well after it. The source mirrors into a `flexnbd listen` destination at a limited speed, so
the client's writes race the first pass; both exit 0 (the source with the default `exit`
action, the listener once the migration completed). The destination file is then served by a
`flexnbd serve` at the SOURCE's address and port; the proxy reconnects and re-sends what was
unanswered, and the client goes on until it has had a few hundred writes acknowledged by the
new server. Then it stops, and:
- the client saw no error and its session was never cut;
- every READ it did returned what the model says (the original content, then the last
  acknowledged write or write-zeroes of each block);
- the destination file equals the model byte for byte: the original content plus every
  acknowledged write, from before, during and after the migration.

Run twice: over loopback, and across network namespaces (source, destination and client each
in their own namespace, bridged in a fourth one), where the service address moves from the
source's namespace to the destination's after the migration, as it would between two hosts;
the proxy of the second run has its read-ahead cache on (`--cache`), which every write and the
reconnect must empty. And a third time over loopback with TLS (PSK) everywhere, as the README's
"Secure migration" has it: the client to the proxy, the proxy to either server, the mirror.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    FLEXNBD,
    FLEXNBD_PROXY,
    FlexnbdProcess,
    free_port,
    require_python_nbd,
    require_tool,
)
from tests.integration.scripts.pipelined_client import BS, block_data
from tests.support import control as cu
from tests.support.migration import logs, sparse_file, wait_exit
from tests.support.tlscreds import PSK_IDENTITY, make_psk

MiB = 1 << 20
SIZE = 32 * MiB
MAX_BPS = 8 * MiB          # a first pass of a few seconds that the client's writes race
CID = 0x464E4244           # "FNBD": the client's id inside every block it writes
DEPTH = 8                  # requests in flight
WRITES_BEFORE = 300        # acknowledged writes before the mirror starts
WRITES_AFTER = 300         # ...and after the proxy reconnected to the destination
# The client writes into the first three quarters of the export and reads all of it: the last
# quarter (data and holes) reaches the destination through the mirror's first pass only.
WRITE_BLOCKS = SIZE // BS * 3 // 4
SCRIPT = Path(__file__).with_name("scripts") / "pipelined_client.py"
NS_PREFIX = "fnbdpm"


# --------------------------------------------------------------------------------------------
# where the processes run

class Loopback:
    """Everything on 127.0.0.1: the destination is restarted at the source's port."""

    name = "loopback"
    tls = False

    def __init__(self) -> None:
        self.service = ("127.0.0.1", port_outside_ephemeral_range())
        self.listen = ("127.0.0.1", free_port())
        self.mirror_bind = "127.0.0.1"
        self.proxy_port = free_port()
        self.proxy_args: list[str] = []

    def prefix(self, role: str) -> list[str]:
        return []

    def move_service(self) -> None:
        pass

    def close(self) -> None:
        pass


class LoopbackTls(Loopback):
    """The same, with TLS (PSK) on every connection."""

    name = "loopback-tls"
    tls = True


def port_outside_ephemeral_range() -> int:
    """A free port below the ephemeral range: the proxy retries connecting to the service
    port while nothing listens there, and a local port picked from the ephemeral range could
    be that very port (a TCP self-connect)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, low) if low > 10100 else free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: rc={res.returncode} {res.stderr.strip()}")
    return res


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_stale_namespaces() -> None:
    """Namespaces of ours left by a run whose process is gone."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(NS_PREFIX + r"(\d+)-\d+-[a-z]+", name)
        if m and not pid_alive(int(m.group(1))):
            ip("netns", "del", name, check=False)


PROBE = r'''
import socket, sys, time
deadline = time.monotonic() + 15
for host in sys.argv[1:]:
    while True:
        try:
            socket.create_connection((host, 9), timeout=1).close()
            break
        except ConnectionRefusedError:
            break                              # a RST came back: the host is reachable
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"{host} unreachable: {e}")
            time.sleep(0.05)
'''


class Netns:
    """Source, destination and client in their own network namespaces, each with one veth into
    a bridge in a hub namespace (one subnet, 10.77.0.0/24). The service address 10.77.0.100
    is on the source's interface, and moves to the destination's after the migration."""

    name = "netns"
    tls = False
    SUBNET = "10.77.0"
    HOSTS = {"src": "10.77.0.1", "dst": "10.77.0.2", "cli": "10.77.0.3"}
    SERVICE = "10.77.0.100"
    _count = 0

    def __init__(self) -> None:
        require_tool("ip")
        delete_stale_namespaces()
        Netns._count += 1
        tag = f"{NS_PREFIX}{os.getpid()}-{Netns._count}"
        self.ns = {role: f"{tag}-{role}" for role in ("hub", "src", "dst", "cli")}
        self.created: list[str] = []
        probe = ip("netns", "add", self.ns["hub"], check=False)
        if probe.returncode != 0:
            # Not root, or no CAP_SYS_ADMIN (a container): namespaces are not for us here.
            pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
        self.created.append(self.ns["hub"])
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self.service = (self.SERVICE, 10809)
        self.listen = (self.HOSTS["dst"], 10809)
        self.mirror_bind = self.HOSTS["src"]
        self.proxy_port = 10809
        self.proxy_args = ["--cache"]      # with the read-ahead cache (4096 bytes)

    def _build(self) -> None:
        hub = self.ns["hub"]
        for role in ("src", "dst", "cli"):
            ip("netns", "add", self.ns[role])
            self.created.append(self.ns[role])
        for ns in self.created:
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "link", "set", "br0", "up")
        for role, addr in self.HOSTS.items():
            ip("-n", hub, "link", "add", f"v{role}", "type", "veth", "peer", "name", "eth0",
               "netns", self.ns[role])
            ip("-n", hub, "link", "set", f"v{role}", "master", "br0", "up")
            ip("-n", self.ns[role], "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", self.ns[role], "link", "set", "eth0", "up")
        ip("-n", self.ns["src"], "addr", "add", f"{self.SERVICE}/24", "dev", "eth0")
        # The paths used: client -> service address, source -> destination.
        for role, hosts in (("cli", [self.SERVICE]), ("src", [self.HOSTS["dst"]])):
            res = subprocess.run(self.prefix(role) + [sys.executable, "-c", PROBE, *hosts],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, f"network in {self.ns[role]}: {res.stderr}"

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role]]

    def move_service(self) -> None:
        """What a cluster manager does when the service moves to another host."""
        ip("-n", self.ns["src"], "addr", "del", f"{self.SERVICE}/24", "dev", "eth0")
        ip("-n", self.ns["dst"], "addr", "add", f"{self.SERVICE}/24", "dev", "eth0")
        # The client's host forgets the old MAC address (a gratuitous ARP would update it).
        ip("-n", self.ns["cli"], "neigh", "flush", "all")

    def close(self) -> None:
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created = []


@pytest.fixture(params=["loopback", "netns", "loopback-tls"])
def network(request):
    # Netns() skips when `ip` is missing (fails under FLEXNBD_REQUIRE_TOOLS=1) or when this
    # process may not create namespaces.
    topo = {"loopback": Loopback, "netns": Netns, "loopback-tls": LoopbackTls}[request.param]()
    try:
        yield topo
    finally:
        topo.close()


class Processes:
    """Every process of a story, killed at the end whatever happens."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.flexnbd: list[FlexnbdProcess] = []
        self.others: list[subprocess.Popen] = []
        self.files: list = []

    def start(self, name: str, prefix: list[str], args: list[str],
              command: list[str] = FLEXNBD, ready: str | None = " serving ") -> FlexnbdProcess:
        proc = FlexnbdProcess(args, self.tmp_path / f"{name}.log", command=prefix + command)
        self.flexnbd.append(proc)
        if ready:
            proc.wait_for_log(ready, timeout=30)
        return proc

    def file(self, path: Path):
        f = open(path, "wb")
        self.files.append(f)
        return f

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self.others.append(proc)
        return proc

    def kill_all(self) -> None:
        for popen in self.others:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
        for proc in self.flexnbd:
            proc.kill()
        for f in self.files:
            f.close()


@pytest.fixture
def processes(tmp_path, network):
    # Depends on `network` so that the processes die before their namespaces go.
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.kill_all()


# --------------------------------------------------------------------------------------------
# the client's log and the model

class ClientLog:
    """The client's log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self.counts = {k: 0 for k in "CWZRFED"}
        self._pos = 0
        self._partial = b""

    def update(self) -> ClientLog:
        if not self.path.exists():
            return self
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode()
            self.lines.append(line)
            kind = line[:1]
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return self

    def writes(self) -> int:
        return self.update().counts["W"] + self.counts["Z"]

    def tail(self, n: int = 8) -> list[str]:
        return self.lines[-n:]


def check_against_model(lines: list[str], original: bytes, final: Path) -> dict[str, int]:
    """Replays the acknowledged writes on the original content: every READ must have returned
    the model's content at that point, and ``final`` must equal the model at the end."""
    state: dict[int, tuple[str, int]] = {}       # block -> ("W", version) or ("Z", version)
    zero = bytes(BS)

    def model(block: int) -> bytes:
        s = state.get(block)
        if s is None:
            return original[block * BS:(block + 1) * BS]
        return block_data(CID, block, s[1]) if s[0] == "W" else zero

    def content(block: int, tok: str) -> bytes | None:
        if tok == "o":
            return original[block * BS:(block + 1) * BS]
        if tok == "z":
            return zero
        if tok.isdigit():
            return block_data(CID, block, int(tok))
        return None

    bad_reads = []
    reads = 0
    for number, line in enumerate(lines):
        kind, *fields = line.split()
        if kind in ("W", "Z"):
            first, n, version = map(int, fields)
            for b in range(first, first + n):
                state[b] = (kind, version)
        elif kind == "R":
            reads += 1
            first, n = int(fields[0]), int(fields[1])
            for b, tok in zip(range(first, first + n), fields[2].split(","), strict=True):
                if content(b, tok) != model(b):
                    s = state.get(b)
                    bad_reads.append(f"line {number + 1}: block {b} read {tok}, model "
                                     f"{'o' if s is None else s}")
    assert not bad_reads, f"{len(bad_reads)} reads disagree with the model: {bad_reads[:10]}"

    wrong = []
    with open(final, "rb") as f:
        data = f.read()
    assert len(data) == len(original), (len(data), len(original))
    for b in range(len(original) // BS):
        got = data[b * BS:(b + 1) * BS]
        if got != model(b):
            want = state.get(b, "o")
            c, blk, v = struct.unpack_from(">IIQ", got)
            got_desc = v if (c, blk) == (CID, b) else got[:16].hex()
            wrong.append(f"block {b}: model {want}, file {got_desc}")
    assert not wrong, f"{len(wrong)} blocks of the destination differ: {wrong[:10]}"
    return {"reads": reads, "blocks written": len(state)}


# --------------------------------------------------------------------------------------------
# the story

def wait_for(predicate, what: str, timeout: float, *context) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s\n" + "\n".join(c() for c in context))
        time.sleep(0.02)


def test_a_client_behind_the_proxy_rides_through_a_migration(network, processes, tmp_path):
    python = require_python_nbd()
    src_file = tmp_path / "src.img"
    sparse_file(src_file, SIZE, pieces=SIZE // (2 * 256 * 1024), piece=256 * 1024, seed=21)
    original = src_file.read_bytes()               # half data, half holes
    original_copy = tmp_path / "original.img"
    original_copy.write_bytes(original)
    dst_file = tmp_path / "dst.img"
    with open(dst_file, "wb") as f:
        f.truncate(SIZE)
    service_addr, service_port = network.service
    listen_addr, listen_port = network.listen
    src_sock, dst_sock = tmp_path / "src.ctl", tmp_path / "dst.ctl"
    tls: list[str] = []                 # the servers' TLS options (and the proxy's, downstream)
    conn_tls: list[str] = []            # the proxy's, upstream
    uri = f"nbd://127.0.0.1:{network.proxy_port}"
    if network.tls:
        keys = make_psk(tmp_path / "tls")
        tls = ["--tls=require", "--tls-psk", str(keys)]
        conn_tls = ["--conn-tls-psk", str(keys)]
        uri = f"nbds://{PSK_IDENTITY}@127.0.0.1:{network.proxy_port}/?tls-psk-file={keys}"

    src = processes.start("source", network.prefix("src"), [
        "serve", "--addr", service_addr, "--port", str(service_port), "--file", str(src_file),
        "--sock", str(src_sock), "-v", *tls])
    dst = processes.start("listener", network.prefix("dst"), [
        "listen", "--addr", listen_addr, "--port", str(listen_port), "--file", str(dst_file),
        "--sock", str(dst_sock), "-v", *tls])
    proxy = processes.start("proxy", network.prefix("cli"), [
        "--addr", "127.0.0.1", "--port", str(network.proxy_port),
        "--conn-addr", service_addr, "--conn-port", str(service_port), "-v",
        *network.proxy_args, *tls, *conn_tls], command=FLEXNBD_PROXY)

    client_log = tmp_path / "client.log"
    stop_file = tmp_path / "client.stop"
    client_stderr = processes.file(tmp_path / "client.stderr")
    cfg = {"uri": uri, "cid": CID,
           "original": str(original_copy), "log": str(client_log), "stop": str(stop_file),
           "seed": 5, "depth": DEPTH, "write_blocks": WRITE_BLOCKS}
    client = processes.popen(network.prefix("cli") + [python, str(SCRIPT), json.dumps(cfg)],
                             stdout=subprocess.DEVNULL, stderr=client_stderr)
    log = ClientLog(client_log)

    def context() -> str:
        client_stderr.flush()
        return (f"--- client (rc {client.poll()}) ---\n" + "\n".join(log.update().tail())
                + "\n" + (tmp_path / "client.stderr").read_text(errors="replace")[-2000:]
                + "\n" + logs(*processes.flexnbd))

    def client_alive() -> bool:
        if client.poll() is not None:
            pytest.fail(f"the client ended (rc {client.returncode}) too early\n{context()}")
        return True

    wait_for(lambda: client_alive() and log.writes() >= WRITES_BEFORE,
             f"{WRITES_BEFORE} writes through the proxy", 60, context)
    wait_for(lambda: cu.status(src_sock)["allocation_map_method"] != "pending",
             "the source's allocation map", 30, context)

    # The migration, at a speed the client's writes outpace.
    reply = cu.control(src_sock, "mirror", listen_addr, str(listen_port), "exit",
                       network.mirror_bind, str(MAX_BPS))
    assert reply == "0: Mirror started\n", reply + context()
    writes_at_start = log.writes()
    proxy_mark = len(proxy.log())
    try:
        reply = cu.control(src_sock, "mirror_wait", timeout=120)
    except TimeoutError:
        pytest.fail(f"the migration did not end within 120 s\n{context()}")
    writes_at_end = log.writes()
    assert reply == "0: migration completed\n", repr(reply) + context()
    assert wait_exit(src, 60) == 0, context()
    assert wait_exit(dst, 60) == 0, context()
    assert "migration completed" in dst.log(), context()
    client_alive()
    # The client's writes raced the migration (else this would test much less).
    assert writes_at_end - writes_at_start >= 50, (writes_at_start, writes_at_end)
    # The source's endgame disconnected the proxy, which noticed.
    assert re.search(r":W:\d+ .*upstream", proxy.log()[proxy_mark:]), context()

    # The destination takes over the service address and port.
    network.move_service()
    proxy_mark = len(proxy.log())
    server = processes.start("destination", network.prefix("dst"), [
        "serve", "--addr", service_addr, "--port", str(service_port), "--file", str(dst_file),
        "--sock", str(tmp_path / "dst2.ctl"), "-v", *tls])
    wait_for(lambda: "reconnected" in proxy.log()[proxy_mark:],
             "the proxy reconnected to the destination", 60, context)
    if network.tls:     # every leg was TLS: the client's, the mirror's, the proxy's reconnect
        assert "connected (newstyle, TLSv1.3" in proxy.log(), context()
        assert re.search(r"reconnected to upstream .*TLSv1\.3", proxy.log()), context()
        assert "TLSv1.3" in dst.log(), context()
    lines_at_reconnect = len(log.update().lines)
    writes_at_reconnect = log.writes()
    wait_for(lambda: client_alive() and log.writes() >= writes_at_reconnect + WRITES_AFTER,
             f"{WRITES_AFTER} writes after the switch", 60, context)

    stop_file.touch()
    try:
        rc = client.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client did not finish\n{context()}")
    lines = log.update().lines
    errors = [line for line in lines if line.startswith("E")]
    assert (rc, errors, lines[-1:]) == (0, [], ["D"]), context()
    assert lines[0].startswith(f"C {SIZE} "), lines[0]
    after = lines[lines_at_reconnect:]
    assert sum(1 for line in after if line[:1] == "R") > 0, context()

    assert proxy.stop(signal.SIGTERM) == 0, context()
    assert server.stop(signal.SIGTERM) == 0, context()
    stats = check_against_model(lines, original, dst_file)
    assert stats["reads"] > 0
    print(f"{network.name}: {log.writes()} writes ({writes_at_start} before the migration, "
          f"{writes_at_end - writes_at_start} during it, {log.writes() - writes_at_reconnect} "
          f"after the switch), {stats}")

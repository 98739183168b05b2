"""The faults of the chaos campaign (issue 22's list), each a kind with an ``inject`` that acts
on a running scenario and, for the faults that last, an ``end``.

``inject`` returns what it did (for the fault log), or None when the fault found nothing to act
on (a destination already gone, no mirror running): such a fault is not counted as injected.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.chaos.procs import control

if TYPE_CHECKING:
    from tests.chaos.scenario import Scenario

MiB = 1024 * 1024


@dataclass
class Kind:
    name: str
    inject: Callable[[Scenario, random.Random], str | None]
    lasts: tuple[float, float] | None = None     # a duration drawn from this range
    end: Callable[[Scenario], None] | None = None


def _signal(role: str, sig: signal.Signals) -> Callable[[Scenario, random.Random], str | None]:
    def inject(sc: Scenario, rng: random.Random) -> str | None:
        proc = sc.server(role)
        if proc is None or not proc.alive():
            return None
        proc.signal(sig)
        return f"{sig.name} {proc.role} (pid {proc.pid})"
    return inject


def _kill_proxy(sc: Scenario, rng: random.Random) -> str | None:
    if not sc.proxy.alive():
        return None
    sc.proxy.signal(signal.SIGKILL)
    return f"SIGKILL proxy (pid {sc.proxy.pid})"


def _fill_disk(sc: Scenario, rng: random.Random) -> str | None:
    stat = os.statvfs(sc.dst_dir)
    free = stat.f_bavail * stat.f_frsize
    slack = rng.randrange(0, 4 * MiB, 4096)
    size = max(0, free - slack)
    with open(sc.dst_dir / "filler", "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError:
            pass
    return f"destination disk filled ({size // MiB} MiB filler, {slack // 1024} KiB left)"


def _free_disk(sc: Scenario) -> None:
    (sc.dst_dir / "filler").unlink(missing_ok=True)


def _eio(op: str, always: bool) -> Callable[[Scenario, random.Random], str | None]:
    def inject(sc: Scenario, rng: random.Random) -> str | None:
        side = rng.choice(["source", "destination"])
        switch = sc.eio_switch(side)
        if switch is None:
            return None
        switch.fail(op, always)
        return f"EIO on {op} of the {side}, {'from now on' if always else 'once'}"
    return inject


def _eio_end(sc: Scenario) -> None:
    for side in ("source", "destination"):
        switch = sc.eio_switch(side)
        if switch is not None:
            switch.clear()


def _cut(reset: bool) -> Callable[[Scenario, random.Random], str | None]:
    def inject(sc: Scenario, rng: random.Random) -> str | None:
        n = sc.link.cut(reset)
        return f"link cut ({'RST' if reset else 'FIN'}, {n} connections)" if n else None
    return inject


def _stall(sc: Scenario, rng: random.Random) -> str | None:
    seconds = rng.uniform(0.3, 8.0)
    sc.link.stall(seconds)
    return f"link stalled for {seconds:.1f} s"


def _slow(sc: Scenario, rng: random.Random) -> str | None:
    rate = rng.randrange(1, 16) * MiB
    seconds = rng.uniform(0.5, 4.0)
    sc.link.slow(rate, seconds)
    return f"link slowed to {rate // MiB} MiB/s for {seconds:.1f} s"


def _tbf(sc: Scenario, rng: random.Random) -> str | None:
    mbit = rng.choice([8, 16, 40, 100, 400])
    subprocess.run(["tc", "qdisc", "replace", "dev", sc.run.veth, "root", "tbf", "rate",
                    f"{mbit}mbit", "burst", "64kb", "latency", "200ms"], check=True,
                   capture_output=True)
    return f"tc tbf {mbit} mbit/s on {sc.run.veth}"


def _tbf_end(sc: Scenario) -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", sc.run.veth, "root"], capture_output=True)


def _break(sc: Scenario, rng: random.Random) -> str | None:
    reply = control(sc.src_sock, "break")
    if not reply.startswith("0:"):
        return None
    sc.broken_at = sc.now()
    return "break"


def _speed(sc: Scenario, rng: random.Random) -> str | None:
    bps = rng.choice([0, 32 * MiB, 64 * MiB, 128 * MiB, 256 * MiB])
    reply = control(sc.src_sock, "mirror_max_bps", str(bps))
    return f"mirror speed {bps // MiB} MiB/s (0: no limit)" if reply.startswith("0:") else None


def _acl(sc: Scenario, rng: random.Random) -> str | None:
    side = rng.choice(["source", "destination"])
    sock, deny = (sc.src_sock, "127.0.0.99") if side == "source" else \
        (sc.dst_sock, "10.201.0.99")
    if not control(sock, "acl", deny).startswith("0:"):
        return None
    sc.acl_changed.add(sock)
    return f"ACL of the {side} set to {deny} only"


def _acl_end(sc: Scenario) -> None:
    for sock in sc.acl_changed:
        control(sock, "acl")
    sc.acl_changed.clear()


KINDS = [
    Kind("kill-source", _signal("source", signal.SIGKILL)),
    Kind("kill-destination", _signal("destination", signal.SIGKILL)),
    Kind("kill-proxy", _kill_proxy),
    Kind("term-source", _signal("source", signal.SIGTERM)),
    Kind("term-destination", _signal("destination", signal.SIGTERM)),
    Kind("disk-full", _fill_disk, (0.5, 4.0), _free_disk),
    Kind("eio-write-once", _eio("write", False), (0.5, 1.0), _eio_end),
    Kind("eio-write-always", _eio("write", True), (0.5, 3.0), _eio_end),
    Kind("eio-sync-once", _eio("sync", False), (0.5, 1.0), _eio_end),
    Kind("eio-sync-always", _eio("sync", True), (0.5, 3.0), _eio_end),
    Kind("link-cut-rst", _cut(True)),
    Kind("link-cut-fin", _cut(False)),
    Kind("link-stall", _stall),
    Kind("link-slow", _slow),
    Kind("tc-tbf", _tbf, (1.0, 4.0), _tbf_end),
    Kind("break", _break),
    Kind("mirror-speed", _speed),
    Kind("acl-change", _acl, (0.5, 3.0), _acl_end),
]
BY_NAME = {k.name: k for k in KINDS}

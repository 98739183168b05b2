#!/usr/bin/env python3
"""Install the built wheels as a user would, and run the console scripts end to end.

For the oldest and the newest CPython that scripts/wheels.py finds: a fresh venv, then
``pip install --no-index --only-binary :all: wheelhouse/flexnbd-*-cpXY-*.whl`` (no compiler and
no source tree involved), then, from a temporary directory with nothing of this tree on
sys.path:

1. ``flexnbd serve --tls=on`` on a random file: ``nbdinfo`` sees its size, in plaintext and
   over TLS (PSK: the OpenSSL the wheel bundles), ``nbdcopy`` reads it back byte for byte and
   writes other data into it;
2. ``flexnbd status --json``: one JSON object with the documented keys;
3. ``flexnbd-proxy`` in front of the server, TLS on both sides: ``nbdcopy`` through it reads
   the same bytes;
4. ``flexnbd listen --tls=require`` + ``flexnbd mirror --wait`` (over TLS): exit 0 on both
   sides, identical files;
5. the man pages: ``<venv>/share/man/man1/flexnbd.1`` and ``flexnbd-proxy.1`` are there, are
   what the installed ``flexnbd.manpage`` renders (so the same on every Python), ``man -l``
   and ``groff -ww`` render them without a warning, and ``man flexnbd`` finds the venv's page
   with only the venv's bin/ on PATH (man-db looks in ../share/man beside each PATH entry;
   MANPATH unset); ``--version`` prints the version.

Exits 1 at the first difference, with what differed. All traffic on 127.0.0.1.

    scripts/wheel_test.py [--wheelhouse wheelhouse]
    scripts/wheel_test.py --installed   # the flexnbd installed beside this Python (cibuildwheel)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wheels import ROOT, interpreters

SIZE = 64 << 20
TIMEOUT = 120


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise Failed(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise Failed(f"{what}: not ready in 30 s")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), cwd=cwd, capture_output=True, timeout=TIMEOUT)
    if res.returncode != 0:
        raise Failed(f"{' '.join(args)} exited {res.returncode}: "
                     f"{res.stderr.decode(errors='replace').strip()}")
    return res


class Procs:
    """Background processes, all stopped at the end."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.cwd / f"{Path(args[0]).name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(list(args), cwd=self.cwd, stdout=log, stderr=log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def exercise(bin_dir: Path, work: Path) -> None:
    flexnbd, proxy = str(bin_dir / "flexnbd"), str(bin_dir / "flexnbd-proxy")
    nbdinfo, nbdcopy = shutil.which("nbdinfo"), shutil.which("nbdcopy")
    check(nbdinfo is not None and nbdcopy is not None, "nbdinfo and nbdcopy must be installed")
    data = os.urandom(SIZE)
    disk = work / "disk.img"
    disk.write_bytes(data)
    keys = work / "keys.psk"                      # TLS: the OpenSSL bundled in the wheel
    keys.write_text(f"alice:{os.urandom(32).hex()}\n")
    procs = Procs(work)
    try:
        # 1. serve, nbdinfo, nbdcopy both ways
        port, ctl = free_port(), work / "serve.ctl"
        server = procs.start(flexnbd, "serve", "--addr", "127.0.0.1", "--port", str(port),
                             "--file", str(disk), "--sock", str(ctl),
                             "--tls=on", "--tls-psk", str(keys))
        wait_for(lambda: ctl.exists() and port_open(port), "flexnbd serve", server)
        uri = f"nbd://127.0.0.1:{port}"
        info = json.loads(run(nbdinfo, "--json", uri, cwd=work).stdout)
        check(info["exports"][0]["export-size"] == SIZE, f"nbdinfo size: {info}")
        tls_uri = f"nbds://alice@127.0.0.1:{port}/?tls-psk-file={keys}"
        info = json.loads(run(nbdinfo, "--json", tls_uri, cwd=work).stdout)
        check(info["exports"][0]["export-size"] == SIZE, f"nbdinfo over TLS: {info}")
        run(nbdcopy, uri, str(work / "copy.img"), cwd=work)
        check((work / "copy.img").read_bytes() == data, "nbdcopy read different bytes")
        data = os.urandom(SIZE)
        (work / "new.img").write_bytes(data)
        run(nbdcopy, str(work / "new.img"), uri, cwd=work)
        # 2. status --json
        status = json.loads(run(flexnbd, "status", "--sock", str(ctl), "--json", cwd=work).stdout)
        check(status["pid"] == server.pid and status["size"] == SIZE and
              status["has_control"] is True, f"status --json: {status}")
        # 3. the proxy in front of a client, TLS on both sides
        pport = free_port()
        relay = procs.start(proxy, "--addr", "127.0.0.1", "--port", str(pport),
                            "--conn-addr", "127.0.0.1", "--conn-port", str(port),
                            "--conn-tls-psk", str(keys), "--tls=require", "--tls-psk", str(keys))
        wait_for(lambda: port_open(pport), "flexnbd-proxy", relay)
        run(nbdcopy, f"nbds://alice@127.0.0.1:{pport}/?tls-psk-file={keys}",
            str(work / "via-proxy.img"), cwd=work)
        check((work / "via-proxy.img").read_bytes() == data, "nbdcopy through the proxy")
        relay.terminate()
        check(relay.wait(10) == 0, "flexnbd-proxy did not exit 0 on SIGTERM")
        # 4. listen + mirror --wait, over TLS
        dest, dport, dctl = work / "dest.img", free_port(), work / "listen.ctl"
        with open(dest, "wb") as f:
            f.truncate(SIZE)
        listener = procs.start(flexnbd, "listen", "--addr", "127.0.0.1", "--port", str(dport),
                               "--file", str(dest), "--sock", str(dctl),
                               "--tls=require", "--tls-psk", str(keys))
        wait_for(lambda: dctl.exists() and port_open(dport), "flexnbd listen", listener)
        res = run(flexnbd, "mirror", "--sock", str(ctl), "--addr", "127.0.0.1", "--port",
                  str(dport), "--wait", cwd=work)
        check(b"migration completed" in res.stdout, f"mirror --wait said {res.stdout!r}")
        check(server.wait(30) == 0, "the source did not exit 0")
        check(listener.wait(30) == 0, "the destination did not exit 0")
        check(dest.read_bytes() == data, "the migrated file differs")
    finally:
        procs.close()


MAN_PAGES = ("flexnbd.1", "flexnbd-proxy.1")


def check_man_pages(prefix: Path, work: Path) -> None:
    """The installed man pages of the flexnbd installed in ``prefix`` (see 5. above)."""
    man, groff = shutil.which("man"), shutil.which("groff")
    check(man is not None and groff is not None, "man and groff must be installed (man-db, "
          "groff-base)")
    python, flexnbd = str(prefix / "bin" / "python"), str(prefix / "bin" / "flexnbd")
    man1 = prefix / "share" / "man" / "man1"
    for name in MAN_PAGES:
        check((man1 / name).is_file(), f"{man1 / name} was not installed")
    res = subprocess.run([python, "-m", "flexnbd.manpage", "--check", str(man1)], cwd=work,
                         capture_output=True, text=True, timeout=TIMEOUT)
    check(res.returncode == 0, f"the installed man pages differ from what flexnbd.manpage "
          f"renders: {res.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if k != "MANPATH"}
    env.update(MANWIDTH="80", LC_ALL="C.UTF-8", PATH=f"{prefix / 'bin'}{os.pathsep}"
               f"{env.get('PATH', '')}")
    for name in MAN_PAGES:
        for args in ([man, "--warnings", "-l", str(man1 / name)],
                     [groff, "-ww", "-z", "-man", str(man1 / name)]):
            res = subprocess.run(args, cwd=work, capture_output=True, text=True, env=env,
                                 timeout=TIMEOUT)
            check(res.returncode == 0 and not res.stderr,
                  f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip()}")
    version = run(flexnbd, "--version", cwd=work).stdout.decode().strip()
    check(re.fullmatch(r"flexnbd \d+\.\d+\.\d+", version) is not None, f"--version: {version}")
    for program in ("flexnbd", "flexnbd-proxy"):
        found = subprocess.run([man, "-w", program], cwd=work, capture_output=True, text=True,
                               env=env, timeout=TIMEOUT).stdout.strip()
        check(found == str(man1 / f"{program}.1"), f"man -w {program} found {found!r}")
        res = subprocess.run([man, program], cwd=work, capture_output=True, text=True, env=env,
                             timeout=TIMEOUT)
        check(res.returncode == 0 and "SYNOPSIS" in res.stdout and
              version.split()[1] in res.stdout, f"man {program}: {res.stderr.strip()}")


def test_one(python: str, wheel: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="flexnbd-wheeltest-") as tmp:
        venv, work = Path(tmp) / "venv", Path(tmp) / "work"
        work.mkdir()
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--no-index", "--only-binary", ":all:", str(wheel)], check=True)
        where = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import flexnbd._core as c; print(c.__file__)"],
                               cwd=work, capture_output=True, text=True, check=True).stdout
        check(where.startswith(str(venv)), f"flexnbd imported from {where.strip()}, not the venv")
        exercise(venv / "bin", work)
        check_man_pages(venv, work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheelhouse", default=str(ROOT / "wheelhouse"))
    ap.add_argument("--installed", action="store_true",
                    help="exercise the flexnbd installed beside this Python instead")
    args = ap.parse_args()
    if args.installed:
        with tempfile.TemporaryDirectory(prefix="flexnbd-wheeltest-") as tmp:
            try:
                exercise(Path(sys.executable).parent, Path(tmp))
                check_man_pages(Path(sys.prefix), Path(tmp))
            except (Failed, subprocess.SubprocessError, OSError) as e:
                print(f"wheel test: FAILED: {e}", file=sys.stderr)
                return 1
        print("wheel test: passed", flush=True)
        return 0
    found = interpreters()
    if not found:
        print("wheel test: no CPython 3.10-3.13 found", file=sys.stderr)
        return 1
    chosen = [found[0]] if len(found) == 1 else [found[0], found[-1]]
    failures = 0
    for (major, minor), python in chosen:
        tag = f"cp{major}{minor}"
        wheels = sorted(Path(args.wheelhouse).glob(f"flexnbd-*-{tag}-{tag}-manylinux*.whl"))
        if not wheels:
            print(f"wheel test {major}.{minor}: FAILED: no {tag} manylinux wheel in "
                  f"{args.wheelhouse} (run make wheels)", file=sys.stderr)
            failures += 1
            continue
        started = time.monotonic()
        try:
            test_one(python, wheels[-1])
        except (Failed, subprocess.SubprocessError, OSError) as e:
            print(f"wheel test {major}.{minor} ({wheels[-1].name}): FAILED: {e}",
                  file=sys.stderr)
            failures += 1
            continue
        print(f"wheel test {major}.{minor} ({wheels[-1].name}): passed in "
              f"{time.monotonic() - started:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

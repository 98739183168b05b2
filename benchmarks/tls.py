#!/usr/bin/env python3
"""NBD over TLS: flexnbd against nbdkit and qemu-nbd, all with TLS required, and against
flexnbd in plaintext; and a migration over TLS against one in plaintext.

Rows (one fresh server per cell, warmed up, servers interleaved, medians of --repeat
samples): fio's nbd engine, seq read 1M qd16, seq write 1M qd16, rand read 4k qd32, with
X.509 credentials (an ECDSA P-256 CA and server certificate made with the openssl command),
because fio cannot load a PSK file (libnbd refuses local files in URIs unless the program
allows them, and fio does not); libnbd finds the client's `ca-cert.pem` in
$HOME/.pki/libnbd, so the clients run with HOME pointing at a directory made here. And
nbdcopy of the whole file to `null:` with a PSK (nbdcopy allows `tls-psk-file`): its
decryption runs in several threads, where fio's runs in one, so this row shows what TLS
costs the server when the client is less of a limit.

The proxy: fio through `flexnbd-proxy` in front of `flexnbd serve`, TLS on both sides of the
proxy (X.509) against plaintext on both sides (seq read 1M qd16, rand read 4k qd32), with the
proxy's CPU per GiB.

Migration: `flexnbd serve` mirrors a dense file into `flexnbd listen`, both with
`--tls=require --tls-psk` (the same PSK file), against both in plaintext; the time from the
mirror command to both servers' exit 0 and identical files.

Standard library only. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from common import (
    DEFAULT_WORKDIR,
    EXPORT,
    HOST,
    ClientError,
    GiB,
    MiB,
    Server,
    default_json,
    find_exe,
    find_flexnbd,
    finish_report,
    fmt,
    free_port,
    git_head,
    log,
    machine_info,
    make_data_file,
    nbdkit_has_exit_with_parent,
    parse_size,
    ratio_text,
    run_client,
    run_script,
    server_version,
)

ROWS = {
    "TLS fio seq read 1M qd16": {"rw": "read", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    "TLS fio seq write 1M qd16": {"rw": "write", "bs": "1M", "iodepth": 16, "unit": "MiB/s"},
    "TLS fio rand read 4k qd32": {"rw": "randread", "bs": "4k", "iodepth": 32, "unit": "IOPS"},
    "TLS (PSK) nbdcopy to null:": {"client": "nbdcopy", "psk": True, "unit": "MiB/s"},
}
# Column -> (server, TLS?). The plaintext flexnbd column is the yardstick of what TLS costs.
COLUMNS = {
    "flexnbd": ("flexnbd", True),
    "nbdkit": ("nbdkit", True),
    "qemu-nbd": ("qemu-nbd", True),
    "flexnbd plaintext": ("flexnbd", False),
}
PEERS = ("nbdkit", "qemu-nbd")
PSK_IDENTITY = "bench"
FULL = {"size": "1G", "runtime": 5, "repeat": 3, "migration_size": "1G"}
QUICK = {"size": "256M", "runtime": 1, "repeat": 1, "migration_size": "128M"}
WARMUP_SHARE = 1 / 8


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_credentials(root: Path) -> dict[str, Path]:
    """An X.509 CA and a server certificate for HOST; a HOME whose .pki/libnbd has the CA
    (libnbd's default client credentials); a PSK file. Made afresh each run."""
    shutil.rmtree(root, ignore_errors=True)
    server, home = root / "server", root / "home"
    server.mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", "/CN=bench CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign", cwd=server)
    openssl("req", "-new", *ec, "-keyout", "server-key.pem", "-out", "server.csr",
            "-subj", f"/CN={HOST}", cwd=server)
    (server / "ext").write_text(f"subjectAltName=IP:{HOST}\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "ext",
            cwd=server)
    client = home / ".pki" / "libnbd"
    client.mkdir(parents=True)
    shutil.copy(server / "ca-cert.pem", client / "ca-cert.pem")
    psk = root / "keys.psk"
    psk.write_text(f"{PSK_IDENTITY}:{os.urandom(32).hex()}\n")
    return {"server": server, "home": home, "client": client, "psk": psk}


def server_cmd(name: str, tls: bool, port: int, path: Path, creds: dict[str, Path],
               psk: bool = False) -> list[str] | None:
    """NAME serving PATH, with TLS required (X.509, or the PSK file) or in plaintext."""
    certs, keys = creds["server"], creds["psk"]
    if name == "flexnbd":
        exe = find_flexnbd()
        if not exe:
            return None
        cmd = [exe, "serve", "--addr", HOST, "--port", str(port), "--file", str(path)]
        if not tls:
            return cmd
        return cmd + ["--tls=require", *(["--tls-psk", str(keys)] if psk else
                                         ["--tls-certificates", str(certs)])]
    if name == "nbdkit":
        exe = shutil.which("nbdkit")
        if not exe:
            return None
        cmd = [exe, "-f", "-i", HOST, "-p", str(port), "--tls=require",
               f"--tls-psk={keys}" if psk else f"--tls-certificates={certs}"]
        if nbdkit_has_exit_with_parent(exe):
            cmd.append("--exit-with-parent")
        return [*cmd, "file", str(path)]
    if name == "qemu-nbd":
        exe = shutil.which("qemu-nbd")
        if not exe:
            return None
        # (qemu reads DIR/keys.psk; verify-peer=off: qemu asks for client certificates by
        # default, the other servers do not)
        creds_obj = (f"tls-creds-psk,id=tls0,endpoint=server,dir={keys.parent}" if psk else
                     f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off")
        return [exe, "-f", "raw", "-b", HOST, "-p", str(port), "-t", "-x", EXPORT,
                "--object", creds_obj, "--tls-creds", "tls0", str(path)]
    raise ValueError(name)


def run_nbdcopy(port: int, tls: bool, keys: Path, size: int, runtime: float) -> dict:
    """Copies of the whole export to null: for about ``runtime`` seconds (at least one);
    MiB/s over all of them."""
    uri = (f"nbds://{PSK_IDENTITY}@{HOST}:{port}/{EXPORT}?tls-psk-file={keys}" if tls else
           f"nbd://{HOST}:{port}/{EXPORT}")
    cmd = ["nbdcopy", uri, "null:"]
    copied, start = 0, time.monotonic()
    while True:
        run_client(cmd, timeout=600)
        copied += size
        elapsed = time.monotonic() - start
        if elapsed >= runtime:
            break
    return {"value": copied / MiB / elapsed, "bytes": copied, "command": " ".join(cmd)}


def run_fio(port: int, tls: bool, row: dict, runtime: float) -> dict:
    scheme = "nbds" if tls else "nbd"
    cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={scheme}://{HOST}:{port}/{EXPORT}",
           f"--rw={row['rw']}", f"--bs={row['bs']}", f"--iodepth={row['iodepth']}",
           "--time_based", f"--runtime={runtime * 1000:.0f}ms", "--norandommap",
           "--randrepeat=0", "--output-format=json"]
    out = run_client(cmd, timeout=runtime + 60).stdout
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise ClientError(f"fio printed no JSON report ({e})\n{' '.join(cmd)}") from None
    side = job["read" if "read" in row["rw"] else "write"]
    if job.get("error") or not side["io_bytes"]:
        raise ClientError(f"fio failed or moved no data\n{' '.join(cmd)}")
    value = side["iops"] if row["unit"] == "IOPS" else side["bw_bytes"] / MiB
    return {"value": value, "bytes": side["io_bytes"], "command": " ".join(cmd)}


def measure(column: str, row: dict, data: Path, workdir: Path, creds: dict[str, Path],
            runtime: int) -> dict:
    name, tls = COLUMNS[column]
    port = free_port()
    cmd = server_cmd(name, tls, port, data, creds, psk=row.get("psk", False))
    assert cmd is not None

    def client(seconds: float) -> dict:
        if row.get("client") == "nbdcopy":
            return run_nbdcopy(port, tls, creds["psk"], data.stat().st_size, seconds)
        return run_fio(port, tls, row, seconds)
    with Server(name, port, data, workdir / f"tls-{name}.log", cmd=cmd) as server:
        client(runtime * WARMUP_SHARE)
        cpu0 = server.cpu_seconds()
        result = client(runtime)
        cpu = server.cpu_seconds() - cpu0
        if not server.alive():
            raise ClientError(f"{column} died during the run\n{server.log_tail()}")
    return {**result, "cpu_s_per_gib": cpu / (result["bytes"] / GiB)}


# The proxy's rows: ROWS' specs, through flexnbd-proxy with TLS on both sides or neither.
PROXY_ROWS = ("TLS fio seq read 1M qd16", "TLS fio rand read 4k qd32")


def measure_proxy(tls: bool, row: dict, data: Path, workdir: Path, creds: dict[str, Path],
                  runtime: int) -> dict:
    """fio through a fresh flexnbd-proxy in front of a fresh flexnbd; the proxy's CPU."""
    exe = find_exe("flexnbd-proxy")
    assert exe is not None
    sport, pport = free_port(), free_port()
    scmd = server_cmd("flexnbd", tls, sport, data, creds)
    assert scmd is not None
    pcmd = [exe, "--addr", HOST, "--port", str(pport), "--conn-addr", HOST,
            "--conn-port", str(sport)]
    if tls:
        pcmd += ["--tls=require", "--tls-certificates", str(creds["server"]),
                 "--conn-tls-certificates", str(creds["client"])]
    log_path = workdir / "tls-proxy.log"
    with Server("flexnbd", sport, data, log_path, cmd=scmd) as server, \
            Server("flexnbd-proxy", pport, data, log_path, cmd=pcmd) as proxy:
        run_fio(pport, tls, row, runtime * WARMUP_SHARE)
        cpu0 = proxy.cpu_seconds()
        result = run_fio(pport, tls, row, runtime)
        cpu = proxy.cpu_seconds() - cpu0
        if not (server.alive() and proxy.alive()):
            raise ClientError(f"the server or the proxy died\n{proxy.log_tail()}")
    return {**result, "proxy_cpu_s_per_gib": cpu / (result["bytes"] / GiB)}


def migrate(src_file: Path, workdir: Path, tls_args: list[str]) -> float:
    """Seconds from `mirror` to both servers' exit 0, the files identical."""
    exe = find_flexnbd()
    assert exe is not None
    dst_file = workdir / "tls-migration-dst.img"
    dst_file.unlink(missing_ok=True)
    with open(dst_file, "wb") as f:
        f.truncate(src_file.stat().st_size)
    sport, dport = free_port(), free_port()
    ctl = workdir / "tls-migration.ctl"
    src_cmd = [exe, "serve", "--addr", HOST, "--port", str(sport), "--file", str(src_file),
               "--sock", str(ctl), *tls_args]
    dst_cmd = [exe, "listen", "--addr", HOST, "--port", str(dport), "--file", str(dst_file),
               *tls_args]
    log_path = workdir / "tls-migration.log"
    with Server("flexnbd", dport, dst_file, log_path, cmd=dst_cmd) as dst, \
            Server("flexnbd", sport, src_file, log_path, cmd=src_cmd) as src:
        while not ctl.exists():
            time.sleep(0.01)
        start = time.monotonic()
        run_client([exe, "mirror", "--sock", str(ctl), "--addr", HOST, "--port", str(dport),
                    "--wait"], timeout=600)
        if src.wait_exit(120) != 0 or dst.wait_exit(120) != 0:
            raise ClientError(f"migration did not end with exit 0 on both sides\n"
                              f"{src.log_tail()}\n{dst.log_tail()}")
        elapsed = time.monotonic() - start
    if subprocess.run(["cmp", "-s", str(src_file), str(dst_file)]).returncode != 0:
        raise ClientError("the migrated file differs")
    return elapsed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small run for CI")
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--size", help="data file size (default 1G)")
    p.add_argument("--migration-size", help="migrated file size (default 1G)")
    p.add_argument("--runtime", type=int, help="seconds per fio cell (default 5)")
    p.add_argument("--repeat", type=int, help="samples per cell (default 3)")
    p.add_argument("--json", help="results file (default benchmarks/results/tls.json)")
    args = p.parse_args(argv)
    unset = {k: v for k, v in (QUICK if args.quick else FULL).items() if getattr(args, k) is None}
    vars(args).update(unset)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    size, msize = parse_size(args.size), parse_size(args.migration_size)
    data = workdir / f"data-{size}.img"
    make_data_file(data, size)
    creds = make_credentials(workdir / "tls-creds")
    os.environ["HOME"] = str(creds["home"])      # libnbd's default client credentials
    columns = [c for c in COLUMNS
               if server_cmd(COLUMNS[c][0], True, 1, data, creds) is not None]
    report: dict = {
        "date": datetime.date.today().isoformat(), "machine": machine_info(),
        "git_head": git_head(), "size": size, "runtime": args.runtime,
        "repeat": args.repeat, "quick": args.quick, "errors": [], "rows": {},
        "servers": {c: server_version(COLUMNS[c][0]) for c in columns},
        "loadavg_start": os.getloadavg(),
    }
    for row_name, row in ROWS.items():
        samples: dict[str, list[dict]] = {c: [] for c in columns}
        for i in range(args.repeat):
            for column in columns:
                log(f"{column}: {row_name} (run {i + 1}/{args.repeat})")
                try:
                    cell = measure(column, row, data, workdir, creds, args.runtime)
                except (ClientError, RuntimeError) as e:
                    report["errors"].append(f"{row_name} / {column}: {e}")
                    continue
                log(f"  {cell['value']:,.0f} {row['unit']}, {cell['cpu_s_per_gib']:.2f} "
                    "CPU s/GiB")
                samples[column].append(cell)
        report["rows"][row_name] = {
            c: {"value": statistics.median(s["value"] for s in cells),
                "cpu_s_per_gib": statistics.median(s["cpu_s_per_gib"] for s in cells),
                "samples": cells}
            for c, cells in samples.items() if cells
        }
    report["proxy"] = {}
    if find_exe("flexnbd-proxy"):
        for row_name in PROXY_ROWS:
            cells: dict[str, list[dict]] = {"TLS": [], "plaintext": []}
            for i in range(args.repeat):
                for kind in cells:
                    log(f"proxy {kind}: {row_name} (run {i + 1}/{args.repeat})")
                    try:
                        cell = measure_proxy(kind == "TLS", ROWS[row_name], data, workdir,
                                             creds, args.runtime)
                    except (ClientError, RuntimeError) as e:
                        report["errors"].append(f"proxy {row_name} / {kind}: {e}")
                        continue
                    log(f"  {cell['value']:,.0f} {ROWS[row_name]['unit']}, "
                        f"{cell['proxy_cpu_s_per_gib']:.2f} proxy CPU s/GiB")
                    cells[kind].append(cell)
            report["proxy"][row_name] = {
                k: {"value": statistics.median(c["value"] for c in v),
                    "proxy_cpu_s_per_gib": statistics.median(c["proxy_cpu_s_per_gib"]
                                                             for c in v),
                    "samples": v}
                for k, v in cells.items() if v}
    mdata = workdir / f"tls-migration-src-{msize}.img"
    make_data_file(mdata, msize)
    runs: dict[str, list[float]] = {"TLS (PSK)": [], "plaintext": []}
    tls_args = ["--tls=require", "--tls-psk", str(creds["psk"])]
    for i in range(args.repeat):
        for kind, extra in (("TLS (PSK)", tls_args), ("plaintext", [])):
            log(f"migration {size_text_short(msize)} {kind} (run {i + 1}/{args.repeat})")
            try:
                runs[kind].append(migrate(mdata, workdir, extra))
                log(f"  {runs[kind][-1]:.2f} s")
            except (ClientError, RuntimeError) as e:
                report["errors"].append(f"migration {kind}: {e}")
    report["migration"] = {k: {"seconds": v, "median_s": statistics.median(v) if v else None}
                           for k, v in runs.items()}
    report["markdown"] = tables(report, columns, msize)
    print(report["markdown"])
    report["loadavg_end"] = os.getloadavg()
    return finish_report(report, Path(args.json) if args.json else default_json("tls",
                                                                               args.quick))


def size_text_short(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def tables(report: dict, columns: list[str], msize: int) -> str:
    head = ["row", "unit", *columns, "flexnbd / best peer", "flexnbd TLS / plaintext",
            *[f"CPU s/GiB {c}" for c in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row_name, cells in report["rows"].items():
        value = {c: cells[c]["value"] for c in cells}
        peers = [value[p] for p in PEERS if p in value]
        ours = value.get("flexnbd")
        best = ratio_text(ours / max(peers)) if ours and peers else "-"
        plain = value.get("flexnbd plaintext")
        own = f"{ours / plain:.2f}" if ours and plain else "-"
        lines.append("| " + " | ".join(
            [row_name, ROWS[row_name]["unit"], *[fmt(value.get(c)) for c in columns], best, own,
             *[fmt(cells[c]["cpu_s_per_gib"]) if c in cells else "-" for c in columns]]) + " |")
    if report.get("proxy"):
        lines += ["", "| through flexnbd-proxy | unit | TLS both sides | plaintext | TLS / "
                  "plaintext | proxy CPU s/GiB TLS | proxy CPU s/GiB plaintext |",
                  "|---|---|---|---|---|---|---|"]
        for row_name, cells in report["proxy"].items():
            tls_v = cells.get("TLS", {}).get("value")
            plain_v = cells.get("plaintext", {}).get("value")
            lines.append("| " + " | ".join([
                row_name.removeprefix("TLS "), ROWS[row_name]["unit"], fmt(tls_v), fmt(plain_v),
                f"{tls_v / plain_v:.2f}" if tls_v and plain_v else "-",
                *[fmt(cells[k]["proxy_cpu_s_per_gib"]) if k in cells else "-"
                  for k in ("TLS", "plaintext")]]) + " |")
    mig = report["migration"]
    tls_s, plain_s = mig["TLS (PSK)"]["median_s"], mig["plaintext"]["median_s"]
    lines.append("")
    lines.append(f"Migration of a dense {size_text_short(msize)} file, mirror to both exits: "
                 f"TLS (PSK) {fmt(tls_s)} s, plaintext {fmt(plain_s)} s"
                 + (f", TLS / plaintext time {tls_s / plain_s:.2f}" if tls_s and plain_s
                    else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(main)

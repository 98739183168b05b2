"""TLS credentials made in a test: a PSK file (psktool's ``identity:hexkey`` format, named
``keys.psk`` as qemu wants it), and X.509 directories in the layout nbdkit, qemu and libnbd
use (``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/
``client-key.pem``), made with the openssl command.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import require_tool

PSK_IDENTITY = "alice"


def make_psk(directory: Path, identity: str = PSK_IDENTITY, key: bytes | None = None) -> Path:
    """DIR/keys.psk with one ``identity:hexkey`` line (a random 32-byte key by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "keys.psk"
    path.write_text(f"{identity}:{(key or os.urandom(32)).hex()}\n")
    path.chmod(0o600)
    return path


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run([require_tool("openssl"), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)}:\n{res.stderr}"


def _key_and_csr(directory: Path, name: str, cn: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
             cwd=directory)


def make_ca(directory: Path) -> Path:
    """A CA in DIR (ca-cert.pem, ca-key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
             "-subj", "/CN=flexnbd test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    return directory


def sign(ca: Path, directory: Path, name: str, usage: str, hosts: tuple[str, ...] = ()) -> None:
    """DIR/NAME-cert.pem and NAME-key.pem, signed by the CA in ``ca``, for ``usage``
    (serverAuth or clientAuth), naming ``hosts`` (IP addresses or DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    _key_and_csr(directory, name, hosts[0] if hosts else name)
    ext = directory / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE",
             "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={usage}"]
    if hosts:
        names = [("IP:" if h.replace(".", "").isdigit() or ":" in h else "DNS:") + h
                 for h in hosts]
        lines.append("subjectAltName=" + ",".join(names))
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca / "ca-cert.pem"),
             "-CAkey", str(ca / "ca-key.pem"), "-CAcreateserial", "-out", f"{name}-cert.pem",
             "-days", "2", "-extfile", str(ext), cwd=directory)


def make_x509(root: Path) -> tuple[Path, Path]:
    """(server directory, client directory) sharing one CA: the server's certificate names
    127.0.0.1 and localhost, the client's is for client authentication."""
    ca = make_ca(root / "ca")
    server, client = root / "server", root / "client"
    sign(ca, server, "server", "serverAuth", ("127.0.0.1", "localhost"))
    sign(ca, client, "client", "clientAuth", ("flexnbd-test-client",))
    for d in (server, client):
        (d / "ca-cert.pem").write_bytes((ca / "ca-cert.pem").read_bytes())
    return server, client

"""TLS credentials made in a test: a PSK file (psktool's ``identity:hexkey`` format, named
``keys.psk`` as qemu wants it), and X.509 directories in the layout nbdkit, qemu and libnbd
use (``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/
``client-key.pem``), made with the openssl command; how a server is given them; and how
clients use them: libnbd URIs, and STARTTLS on a raw client with Python's ssl (X.509 only:
Python has no PSK before 3.13).

Fixtures (registered in tests/conftest.py): ``psk``, ``x509``, ``kind`` (each kind in turn)
and ``creds`` (the credentials of ``kind``), ``nbdkit_tls``.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from pathlib import Path

import pytest

from flexnbd import wire
from tests.conftest import free_port, require_tool, wait_for_port
from tests.support.rawclient import RawClient, connect_to_options

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


def psk_uri(server, keys: Path) -> str:
    """A libnbd URI for ``server`` (anything with a ``port``) with the PSK file ``keys``."""
    # (the URI's user is libnbd's TLS username; 1.14 has no tls-username parameter)
    return f"nbds://{PSK_IDENTITY}@127.0.0.1:{server.port}/?tls-psk-file={keys}"


def x509_uri(server, client_dir: Path) -> str:
    return f"nbds://127.0.0.1:{server.port}/?tls-certificates={client_dir}"


def tls_args(kind: str, creds, mode: str = "require") -> list[str]:
    """A server's options (serve, listen, the proxy towards its clients) for TLS ``mode`` with
    the credentials of ``kind``: the PSK file, or the X.509 (server, client) directories."""
    if kind == "psk":
        return [f"--tls={mode}", "--tls-psk", str(creds)]
    return [f"--tls={mode}", "--tls-certificates", str(creds[0])]


def client_uri(kind: str, creds, server) -> str:
    """The libnbd URI for ``server`` with the credentials of ``kind``."""
    return psk_uri(server, creds) if kind == "psk" else x509_uri(server, creds[1])


def starttls(c: RawClient, client_dir: Path, cert: bool = False) -> None:
    """STARTTLS, then Python's ssl (OpenSSL, as a client) on the raw client's socket."""
    replies = c.option(wire.OPT_STARTTLS)
    assert replies[-1].type == wire.REP_ACK
    context = ssl.create_default_context(cafile=str(client_dir / "ca-cert.pem"))
    if cert:
        context.load_cert_chain(str(client_dir / "client-cert.pem"),
                                str(client_dir / "client-key.pem"))
    c.sock = context.wrap_socket(c.sock, server_hostname="127.0.0.1")


def tls_client(server, client_dir: Path, cert: bool = False) -> RawClient:
    """A raw client in transmission over TLS (X.509) with ``server`` (anything with a
    ``port``); with ``cert``, it shows the client certificate."""
    c = connect_to_options(server.port)
    try:
        starttls(c, client_dir, cert)
        c.go()
    except BaseException:
        c.close()
        raise
    return c


@pytest.fixture
def nbdkit_tls():
    """nbdkit_tls(path, *tls_args) -> port: nbdkit serving PATH with TLS required; every
    nbdkit is killed afterwards."""
    procs = []

    def start(path: Path, *tls_args: str) -> int:
        port = free_port()
        proc = subprocess.Popen([require_tool("nbdkit"), "-f", "-i", "127.0.0.1", "-p",
                                 str(port), "--tls=require", *tls_args, "file", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_for_port(port, proc)
        return port
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def psk(tmp_path) -> Path:
    """A PSK file (identity alice)."""
    return make_psk(tmp_path / "psk")


@pytest.fixture
def x509(tmp_path) -> tuple[Path, Path]:
    """X.509 credentials: (server directory, client directory)."""
    return make_x509(tmp_path / "x509")


@pytest.fixture(params=["psk", "x509"])
def kind(request) -> str:
    """Each credential kind in turn."""
    return request.param


@pytest.fixture
def creds(kind, psk, x509):
    """The credentials of ``kind``: the PSK file, or (server directory, client directory)."""
    return psk if kind == "psk" else x509

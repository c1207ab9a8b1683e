"""NBD over TLS (NBD_OPT_STARTTLS) between our server and our client, in-process.

Certificates are self-signed, made with the openssl tool: the server's (for 127.0.0.1) is the client's
trust anchor and the client's is the server's. The server's reads of a file export go through the
TLS fallback of `SocketWriter` (no ``sendmsg``, no ``sendfile``); several connections with many
requests in flight check that one connection's receiving thread and its sending threads share the TLS
session safely.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from standbylib.blockdev import open_file_device
from standbylib.nbd import NbdClient, NbdConnectionLost, NbdNegotiationError, NbdPool, NbdServer
from standbylib.nbd import protocol as p
from standbylib.nbd.tls import ServerTls

MiB = 1 << 20
SIZE = 16 * MiB
EXPORT = "vol0@s1"

Serve = Callable[[ServerTls | None], tuple[str, int]]


@dataclass(frozen=True)
class Certs:
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _self_signed(d: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.pem", d / f"{name}-key.pem"
    cp = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", "-addext", san],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if cp.returncode:
        pytest.fail(f"openssl failed: {cp.stderr}", pytrace=False)
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: install the Debian package openssl", pytrace=False)
    d = tmp_path_factory.mktemp("certs")
    server = _self_signed(d, "server", "subjectAltName=IP:127.0.0.1,DNS:standby.example")
    client = _self_signed(d, "client", "subjectAltName=DNS:client.example")
    stranger = _self_signed(d, "stranger", "subjectAltName=DNS:stranger.example")
    return Certs(*server, *client, *stranger)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = str(tmp_path_factory.mktemp("img") / "vol.img")
    rng = random.Random(3)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in ((0, 300 << 10), (2 * MiB + 17, 5000), (6 * MiB, 7 * MiB)):
            f.seek(offset)
            f.write(rng.randbytes(length))
    return path, Path(path).read_bytes()


def server_context(c: Certs, *, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(c.server_cert, c.server_key)
    ctx.load_verify_locations(c.client_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(c: Certs, *, cert: bool = True, stranger: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(c.server_cert)
    if stranger:
        ctx.load_cert_chain(c.stranger_cert, c.stranger_key)
    elif cert:
        ctx.load_cert_chain(c.client_cert, c.client_key)
    return ctx


@pytest.fixture
def serve(image: tuple[str, bytes]) -> Iterator[Serve]:
    servers: list[NbdServer] = []
    device = open_file_device(image[0], readonly=True)

    def start(tls: ServerTls | None) -> tuple[str, int]:
        server = NbdServer({EXPORT: device}, tls=tls)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
    device.close()


def test_reads_and_extents_over_tls_match_the_file(
    serve: Serve, certs: Certs, image: tuple[str, bytes]
) -> None:
    host, port = serve(ServerTls(server_context(certs, require_client_cert=True), required=True))
    with NbdClient.connect(host, port, EXPORT, tls=client_context(certs), timeout=10) as client:
        assert client.size == SIZE and client.has_allocation
        assert client.read(0, SIZE) == image[1]
        assert client.read(2 * MiB + 10, 100) == image[1][2 * MiB + 10 : 2 * MiB + 110]
        holes = sum(e.length for e in client.extents(0, SIZE) if e.is_hole)
        assert holes > 0
    # Many requests in flight on several connections at once, the name checked against server_name.
    ranges = [(off, 256 << 10) for off in range(0, SIZE, 256 << 10)] * 3
    with NbdPool.connect(
        host, port, EXPORT, connections=4, tls=client_context(certs), server_name="standby.example"
    ) as pool:
        assert pool.connections == 4
        for offset, data in pool.read_many(ranges, depth=16):
            assert bytes(data) == image[1][offset : offset + len(data)], offset


def test_a_plain_client_is_told_tls_is_required(serve: Serve, certs: Certs) -> None:
    host, port = serve(ServerTls(server_context(certs, require_client_cert=False), required=True))
    with pytest.raises(NbdNegotiationError, match="requires TLS"):
        NbdClient.connect(host, port, EXPORT, timeout=10)
    # NBD_OPT_EXPORT_NAME has no error reply: the connection is closed.
    with socket.create_connection((host, port), timeout=10) as s:
        s.recv(18)
        s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE))
        name = EXPORT.encode()
        s.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_EXPORT_NAME, len(name)) + name)
        assert s.recv(100) == b""


def test_starttls_where_tls_is_not_offered_fails_clearly(serve: Serve, certs: Certs) -> None:
    host, port = serve(None)
    with pytest.raises(NbdNegotiationError, match="does not offer TLS"):
        NbdClient.connect(host, port, EXPORT, tls=client_context(certs), timeout=10)


def test_optional_tls_serves_plain_and_tls_clients(
    serve: Serve, certs: Certs, image: tuple[str, bytes]
) -> None:
    host, port = serve(ServerTls(server_context(certs, require_client_cert=False), required=False))
    with NbdClient.connect(host, port, EXPORT, timeout=10) as plain:
        assert plain.read(0, 4096) == image[1][:4096]
    with NbdClient.connect(host, port, EXPORT, tls=client_context(certs, cert=False), timeout=10) as tls:
        assert tls.read(6 * MiB, MiB) == image[1][6 * MiB : 7 * MiB]


@pytest.mark.parametrize("who", ["no certificate", "unknown certificate"])
def test_client_certificates_are_required(
    serve: Serve, certs: Certs, image: tuple[str, bytes], who: str
) -> None:
    host, port = serve(ServerTls(server_context(certs, require_client_cert=True), required=True))
    ctx = (
        client_context(certs, cert=False) if who == "no certificate" else client_context(certs, stranger=True)
    )
    with pytest.raises((NbdNegotiationError, NbdConnectionLost)) as info:
        NbdClient.connect(host, port, EXPORT, tls=ctx, timeout=10)
    assert "TLS" in str(info.value) or "closed" in str(info.value), info.value
    # The server goes on serving the right client.
    with NbdClient.connect(host, port, EXPORT, tls=client_context(certs), timeout=10) as client:
        assert client.read(0, 4096) == image[1][:4096]


def test_a_wrong_server_name_is_refused(serve: Serve, certs: Certs) -> None:
    host, port = serve(ServerTls(server_context(certs, require_client_cert=False), required=True))
    with pytest.raises(NbdNegotiationError, match="TLS handshake failed"):
        NbdClient.connect(host, port, EXPORT, tls=client_context(certs), server_name="other.example")


def test_tls_files_build_working_contexts(serve: Serve, certs: Certs, image: tuple[str, bytes]) -> None:
    from standbylib.runtime.config import ConfigError
    from standbylib.runtime.tls import TlsFiles, nbd_server_tls

    tls = nbd_server_tls(
        "require",
        None,
        None,
        None,
        True,
        (str(certs.server_cert), str(certs.server_key), str(certs.client_cert)),
    )
    host, port = serve(tls)
    files = TlsFiles(str(certs.client_cert), str(certs.client_key), str(certs.server_cert))
    with NbdClient.connect(host, port, EXPORT, tls=files.client_context(), timeout=10) as client:
        assert client.read(0, 65536) == image[1][:65536]
    with pytest.raises(ConfigError, match="cannot read"):
        TlsFiles(str(certs.client_cert), os.devnull + "-missing", str(certs.server_cert)).client_context()
    with pytest.raises(ConfigError, match="not a certificate and its unencrypted private key"):
        TlsFiles(str(certs.client_cert), str(certs.server_key), str(certs.server_cert)).client_context()
    assert nbd_server_tls("off", None, None, None, False, (None, None, None)) is None

"""NBD client certificates set on their own (``--nbd-require-client-cert yes|no``), apart from gRPC's
mutual TLS (``--require-client-cert``): each daemon and client is the real program; certificates come
from `tls_support.make_pki`.

Clients: nbdinfo and nbdcopy with ``nbds://`` URIs; a client without a certificate uses a directory
holding only the CA (libnbd then presents none).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_support import CTL_CMD, PRIMARY_CMD, STANDBY_CMD, Daemons, _console, assert_one_clear_line, need, run
from tls_support import Pki, make_pki

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ca_only(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libnbd's certificate directory with the CA and no client certificate."""
    d = tmp_path_factory.mktemp("nbd-ca-only")
    shutil.copy(pki.ca, d / "ca-cert.pem")
    return d


def server_files(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca)]


def nbds(address: str, export: str, certs: Path) -> str:
    return f"nbds://{address}/{export}?tls-certificates={certs}"


def ctl(grpc: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*_console(*CTL_CMD), "--standby", grpc, "--timeout", "10", *args, check=check, timeout=60)


def reads(uri: str) -> bool:
    """Whether nbdinfo gets through the handshake (TLS included) and reads the export's size."""
    return run("nbdinfo", "--size", uri, check=False).returncode == 0


def test_nbd_client_certificates_while_grpc_is_plain_tls(
    daemons: Daemons, tmp_path: Path, pki: Pki, ca_only: Path
) -> None:
    need("nbdinfo", "nbdcopy")
    # gRPC: TLS without client certificates. NBD: TLS required, and client certificates.
    standby = daemons.standby(
        None, *server_files(pki), "--nbd-tls", "require", "--nbd-require-client-cert", "yes"
    )
    assert standby.daemon.wait_for("listening", service="grpc").get("tls") == "on"
    # The primary connects with the CA alone (no client certificate), and so does standbyctl.
    vol = tmp_path / "vol0.img"
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, "--tls-ca", str(pki.ca))
    assert primary.metrics().get("standby_replication_connected", volume="vol0") == 1
    ctl(standby.grpc, "--tls-ca", str(pki.ca), "snapshot", "create", "vol0", "s1")

    assert reads(nbds(standby.nbd, "vol0@s1", pki.nbd_dir))
    assert not reads(nbds(standby.nbd, "vol0@s1", ca_only)), "an NBD client without a certificate got in"
    assert not reads(nbds(standby.nbd, "vol0@s1", pki.other_nbd_dir)), "a certificate of another CA got in"
    out = tmp_path / "copy.img"
    run("nbdcopy", nbds(standby.nbd, "vol0@s1", pki.nbd_dir), out)
    assert out.stat().st_size == 32 << 20


def test_grpc_mutual_tls_while_nbd_takes_clients_without_certificates(
    daemons: Daemons, tmp_path: Path, pki: Pki, ca_only: Path
) -> None:
    need("nbdinfo")
    standby = daemons.standby(
        None, *server_files(pki), "--require-client-cert", "--nbd-tls", "require",
        "--nbd-require-client-cert", "no",
    )  # fmt: skip
    assert standby.daemon.wait_for("listening", service="grpc").get("tls") == "mutual"
    client = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    vol = tmp_path / "vol0.img"
    daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, *client)
    ctl(standby.grpc, *client, "snapshot", "create", "vol0", "s1")
    refused = ctl(standby.grpc, "--tls-ca", str(pki.ca), "status", check=False)
    assert refused.returncode == 1 and "client certificate" in refused.stderr, refused.stderr

    assert reads(nbds(standby.nbd, "vol0@s1", ca_only)), "NBD refused a client without a certificate"
    assert reads(nbds(standby.nbd, "vol0@s1", pki.nbd_dir))
    # A certificate that is presented is still checked.
    assert not reads(nbds(standby.nbd, "vol0@s1", pki.other_nbd_dir))
    assert not reads(f"nbd://{standby.nbd}/vol0@s1"), "plain NBD got in although TLS is required"


def test_without_the_nbd_setting_require_client_cert_still_covers_nbd(
    daemons: Daemons, tmp_path: Path, pki: Pki, ca_only: Path
) -> None:
    need("nbdinfo")
    standby = daemons.standby(None, *server_files(pki), "--require-client-cert", "--nbd-tls", "require")
    client = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    daemons.primary(standby, {"vol0": f"{tmp_path / 'vol0.img'},size=32MiB"}, *client)
    ctl(standby.grpc, *client, "snapshot", "create", "vol0", "s1")
    assert reads(nbds(standby.nbd, "vol0@s1", pki.nbd_dir))
    assert not reads(nbds(standby.nbd, "vol0@s1", ca_only))


def test_the_primary_requires_nbd_client_certificates_signed_by_tls_ca(
    daemons: Daemons, tmp_path: Path, pki: Pki, ca_only: Path
) -> None:
    need("nbdinfo", "nbdcopy")
    standby = daemons.standby(None, *server_files(pki))
    vol = tmp_path / "vol0.img"
    # --nbd-tls-cert/--nbd-tls-key without --nbd-tls-ca: client certificates must chain to --tls-ca.
    primary = daemons.primary(
        standby,
        {"vol0": f"{vol},size=32MiB"},
        "--tls-ca", str(pki.ca),
        "--nbd-tls", "require",
        "--nbd-tls-cert", str(pki.server.cert),
        "--nbd-tls-key", str(pki.server.key),
        "--nbd-require-client-cert", "yes",
    )  # fmt: skip
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * (1 << 20))
    run("nbdcopy", src, nbds(primary.nbd, "vol0", pki.nbd_dir))
    assert vol.read_bytes()[: 1 << 20] == src.read_bytes()
    assert not reads(nbds(primary.nbd, "vol0", ca_only))
    assert not reads(nbds(primary.nbd, "vol0", pki.other_nbd_dir))


def test_unusable_nbd_client_certificate_settings_are_configuration_errors(tmp_path: Path, pki: Pki) -> None:
    d = str(tmp_path / "d")
    vol = f"v={tmp_path / 'v.img'},size=1MiB"
    cases = [
        # NBD client certificates without NBD TLS
        [*_console(*STANDBY_CMD), "--data-dir", d, "--nbd-require-client-cert", "yes"],
        [*_console(*PRIMARY_CMD), "--volume", vol, "--standby", "127.0.0.1:1",
         "--nbd-require-client-cert", "yes"],
        # ... without any CA to check them against
        [*_console(*PRIMARY_CMD), "--volume", vol, "--standby", "127.0.0.1:1", "--nbd-tls", "require",
         "--nbd-tls-cert", str(pki.server.cert), "--nbd-tls-key", str(pki.server.key),
         "--nbd-require-client-cert", "yes"],
        # not a yes or a no
        [*_console(*STANDBY_CMD), "--data-dir", d, "--nbd-require-client-cert", "maybe"],
    ]  # fmt: skip
    for argv in cases:
        cp = run(*argv, check=False, timeout=60)
        assert_one_clear_line(cp, 2, f"{argv} (a configuration error)", "--nbd-require-client-cert")

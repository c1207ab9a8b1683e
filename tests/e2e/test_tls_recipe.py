"""The certificate recipe of docs/SECURITY.md, run as it is written, gives a set that works by address:
the standby with mutual TLS and NBD over TLS, a primary connecting to its IP address without
--tls-server-name, an administrator's standbyctl from STANDBY_* variables, and libnbd's nbdinfo reading
a snapshot over nbds:// by IP with the directory the recipe makes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from e2e_support import CTL_CMD, Daemons, _console, need, qemu_io, run

pytestmark = pytest.mark.timeout(180)

DOC = Path(__file__).resolve().parents[2] / "docs" / "SECURITY.md"


def documented_recipe() -> str:
    """The shell block that follows "Making such a set with openssl" in docs/SECURITY.md."""
    section = DOC.read_text().split("Making such a set with openssl", 1)[1]
    return section.split("```\n", 1)[1].split("```", 1)[0]


def test_the_documented_recipe_works_by_ip_address(daemons: Daemons, tmp_path: Path) -> None:
    need("openssl", "nbdinfo", "qemu-io")
    pki = tmp_path / "tls"
    pki.mkdir()
    recipe = documented_recipe()
    assert "IP:$STANDBY_IP" in recipe and "extendedKeyUsage=serverAuth" in recipe
    made = subprocess.run(
        ["bash", "-c", recipe],
        cwd=pki,
        env={"PATH": "/usr/bin:/bin", "STANDBY_IP": "127.0.0.1", "PRIMARY_IP": "127.0.0.1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    for name in ("ca", "standby", "primary", "backup", "admin"):
        assert (pki / f"{name}-cert.pem").exists(), name

    standby = daemons.standby(
        None,
        "--tls-cert", str(pki / "standby-cert.pem"),
        "--tls-key", str(pki / "standby-key.pem"),
        "--tls-ca", str(pki / "ca-cert.pem"),
        "--require-client-cert",
        "--nbd-tls", "require",
    )  # fmt: skip
    assert standby.grpc.startswith("127.0.0.1:")
    # By address, with no --tls-server-name: the IP subjectAltName is what is checked.
    primary = daemons.primary(
        standby,
        {"vol0": f"{tmp_path / 'vol0.img'},size=16MiB"},
        "--tls-ca", str(pki / "ca-cert.pem"),
        "--tls-cert", str(pki / "primary-cert.pem"),
        "--tls-key", str(pki / "primary-key.pem"),
    )  # fmt: skip
    qemu_io(primary.uri("vol0"), "write -P 0x42 0 1M", "flush")
    primary.wait_in_sync()

    admin = {
        "STANDBY_ADDRESS": standby.grpc,
        "STANDBY_TLS_CA": str(pki / "ca-cert.pem"),
        "STANDBY_TLS_CERT": str(pki / "admin-cert.pem"),
        "STANDBY_TLS_KEY": str(pki / "admin-key.pem"),
    }
    name = run(*_console(*CTL_CMD), "snapshot", "create", "vol0", "recipe", env=admin).stdout.strip()
    assert name == "recipe"
    uri = f"nbds://{standby.nbd}/vol0@recipe?tls-certificates={pki / 'nbd'}"
    info = run("nbdinfo", "--json", uri)
    assert '"export-size": 16777216' in info.stdout, info.stdout

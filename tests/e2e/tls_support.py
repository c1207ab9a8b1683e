"""Certificates for the TLS tests, made with the `openssl` command-line tool (Debian package openssl).

`make_pki(dir)` makes a CA with a server certificate (``standby.example``, ``localhost`` and
``127.0.0.1``) and a client certificate, and a second, unrelated CA with a client certificate of its own.
Each client also gets a directory in the layout libnbd's ``tls-certificates=DIR`` expects
(``ca-cert.pem``, ``client-cert.pem``, ``client-key.pem``).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA of the appliance
    server: Pair  # standby.example, localhost, 127.0.0.1; serverAuth
    client: Pair  # signed by `ca`; clientAuth
    other_ca: Path  # an unrelated CA
    other_client: Pair  # signed by `other_ca`
    nbd_dir: Path  # libnbd's layout for `client`
    other_nbd_dir: Path  # libnbd's layout for `other_client` (trusting the right CA)


def _openssl(*args: str | Path) -> None:
    cp = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    if cp.returncode:
        pytest.fail(f"openssl {' '.join(map(str, args))} failed:\n{cp.stderr}", pytrace=False)


def _ca(d: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}-cert.pem", d / f"{name}-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-days", "3", "-subj", f"/CN={name} test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(d: Path, name: str, ca: tuple[Path, Path], cn: str, ext: str) -> Pair:
    cert, key, csr, conf = (d / f"{name}-{s}" for s in ("cert.pem", "key.pem", "csr.pem", "ext.cnf"))
    conf.write_text(ext + "\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={cn}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-out", cert, "-extfile", conf,
    )  # fmt: skip
    return Pair(cert, key)


def _nbd_dir(d: Path, ca: Path, client: Pair) -> Path:
    d.mkdir()
    shutil.copy(ca, d / "ca-cert.pem")
    shutil.copy(client.cert, d / "client-cert.pem")
    shutil.copy(client.key, d / "client-key.pem")
    return d


def make_pki(d: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: install the Debian package openssl", pytrace=False)
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "ca")
    other = _ca(d, "other-ca")
    server = _leaf(
        d,
        "server",
        ca,
        "standby.example",
        "subjectAltName=DNS:standby.example,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )
    client = _leaf(d, "client", ca, "primary.example", "extendedKeyUsage=clientAuth")
    other_client = _leaf(d, "other-client", other, "intruder.example", "extendedKeyUsage=clientAuth")
    return Pki(
        ca=ca[0],
        server=server,
        client=client,
        other_ca=other[0],
        other_client=other_client,
        nbd_dir=_nbd_dir(d / "nbd-client", ca[0], client),
        other_nbd_dir=_nbd_dir(d / "nbd-other-client", ca[0], other_client),
    )

"""Security (docs/SECURITY.md): gRPC over TLS and mutual TLS, NBD over TLS (NBD_OPT_STARTTLS),
and nothing but loopback listening unless asked.

Certificates come from `tls_support.make_pki` (the openssl tool): the appliance's CA with a server
certificate (standby.example, localhost, 127.0.0.1) and a client certificate, and an unrelated CA with a
client certificate of its own. Every daemon and client is the real program.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import (
    BACKUP_CMD,
    CTL_CMD,
    PRIMARY_CMD,
    STANDBY_CMD,
    VOLUME_SIZE,
    Daemons,
    Model,
    _console,
    assert_image,
    assert_one_clear_line,
    backup_argv,
    need,
    rand,
    run,
)
from tls_support import Pki, make_pki

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_files(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca)]


def client_files(pki: Pki) -> list[str]:
    return ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]


def ctl(grpc: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*_console(*CTL_CMD), "--standby", grpc, "--timeout", "10", *args, check=check, timeout=60)


def refused(cp: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one-line error of a refused standbyctl (exit 1), checked to contain `words`."""
    err = cp.stderr.strip()
    assert cp.returncode == 1, f"expected exit 1, got {cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, f"not one clear line:\n{err}"
    assert err.startswith("standbyctl: cannot reach "), err
    for w in words:
        assert w in err, f"the error does not say {w!r}: {err}"
    return err


def nbds(address: str, export: str, certs: Path) -> str:
    return f"nbds://{address}/{export}?tls-certificates={certs}"


# ------------------------------------------------------------------------------------------ gRPC


def test_mutual_tls_admits_the_right_certificate_and_refuses_the_others(
    daemons: Daemons, tmp_path: Path, pki: Pki
) -> None:
    standby = daemons.standby(None, *server_files(pki), "--require-client-cert")
    listening = standby.daemon.wait_for("listening", service="grpc")
    assert listening.get("tls") == "mutual", listening

    vol = tmp_path / "primary" / "vol0.img"
    vol.parent.mkdir()
    primary = daemons.primary(
        standby,
        {"vol0": f"{vol},size=32MiB"},
        *client_files(pki),
        "--tls-server-name",
        "standby.example",
    )
    model = Model(VOLUME_SIZE)
    data = rand(3 << 20, seed=41)
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    need("qemu-io")
    run("qemu-io", "-f", "raw", "-c", f"write -s {src} 65536 {len(data)}", "-c", "flush", primary.uri())
    model.write(65536, data)
    primary.wait_in_sync()
    assert_image(vol, model.freeze(), "the primary's volume")
    assert_image(standby.replica(), model.freeze(), "the replica (mirrored over mutual TLS)")

    good = ctl(standby.grpc, *client_files(pki), "status", "--json")
    assert '"uptodate"' in good.stdout, good.stdout
    # The same from the environment alone, as an administrator's shell profile sets it.
    tls_env = {
        "STANDBY_ADDRESS": standby.grpc,
        "STANDBY_TLS_CA": str(pki.ca),
        "STANDBY_TLS_CERT": str(pki.client.cert),
        "STANDBY_TLS_KEY": str(pki.client.key),
    }
    by_env = run(*_console(*CTL_CMD), "status", "--json", env=tls_env, timeout=60)
    assert '"uptodate"' in by_env.stdout, by_env.stdout
    named = ctl(standby.grpc, *client_files(pki), "--tls-server-name", "standby.example", "snapshot", "list")
    assert named.returncode == 0

    no_cert = ctl(standby.grpc, "--tls-ca", str(pki.ca), "status", check=False)
    refused(no_cert, "client certificate")
    other = [
        "--tls-ca", str(pki.ca),
        "--tls-cert", str(pki.other_client.cert),
        "--tls-key", str(pki.other_client.key),
    ]  # fmt: skip
    refused(ctl(standby.grpc, *other, "status", check=False), "client certificate")
    plain = ctl(standby.grpc, "status", check=False)
    refused(plain, "may require TLS")
    wrong_ca = ctl(standby.grpc, "--tls-ca", str(pki.other_ca), "status", check=False)
    refused(wrong_ca, "not signed by a CA of --tls-ca")
    wrong_name = ctl(
        standby.grpc, *client_files(pki), "--tls-server-name", "elsewhere.example", "status", check=False
    )
    refused(wrong_name, "--tls-server-name")
    # The refused clients changed nothing and the primary is still connected.
    assert_image(standby.replica(), model.freeze(), "the replica after the refused clients")
    assert primary.metrics().get("standby_replication_connected", volume="vol0") == 1


def test_a_primary_with_a_certificate_of_another_ca_is_refused(
    daemons: Daemons, tmp_path: Path, pki: Pki
) -> None:
    standby = daemons.standby(None, *server_files(pki), "--require-client-cert")
    vol = tmp_path / "vol0.img"
    primary = daemons.primary(
        standby,
        {"vol0": f"{vol},size=32MiB"},
        "--tls-ca", str(pki.ca),
        "--tls-cert", str(pki.other_client.cert),
        "--tls-key", str(pki.other_client.key),
        "--connect-timeout", "2",
        in_sync=False,
    )  # fmt: skip
    primary.daemon.wait_for("standby_unreachable")
    assert primary.metrics().get("standby_replication_connected", volume="vol0") == 0
    status = ctl(standby.grpc, *client_files(pki), "status", "--json")
    assert '"volumes": []' in status.stdout, f"the refused primary created a replica:\n{status.stdout}"


def test_unusable_tls_files_are_configuration_errors(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "missing.pem"
    cases = [
        [*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--tls-cert", str(missing),
         "--tls-key", str(pki.server.key)],
        [*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--tls-cert", str(pki.server.cert),
         "--tls-key", str(pki.client.key)],
        [*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--require-client-cert"],
        [*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--nbd-tls", "require"],
        [*_console(*PRIMARY_CMD), "--volume", f"v={tmp_path / 'v.img'},size=1MiB", "--standby",
         "127.0.0.1:1", "--tls-ca", str(missing)],
        [*_console(*CTL_CMD), "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "status"],
        [*_console(*BACKUP_CMD), "run", "vol0", "--output", str(tmp_path / "a.tar"), "--nbd-tls"],
    ]  # fmt: skip
    for argv in cases:
        err = assert_one_clear_line(run(*argv, check=False, timeout=60), 2, f"{argv} (a configuration error)")
        assert "--tls" in err or "--nbd-tls" in err or "--require-client-cert" in err, err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir()), "a refused start left data"
    # A certificate made for the other side is refused at start-up, with what it lacks.
    wrong_side = [
        ([*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--tls-cert", str(pki.client.cert),
          "--tls-key", str(pki.client.key)], "not a certificate for a server", "serverAuth"),
        ([*_console(*PRIMARY_CMD), "--volume", f"v={tmp_path / 'v.img'},size=1MiB", "--standby",
          "127.0.0.1:1", "--tls-ca", str(pki.ca), "--tls-cert", str(pki.server.cert), "--tls-key",
          str(pki.server.key)], "not a certificate for a client", "clientAuth"),
    ]  # fmt: skip
    for argv, what, needed in wrong_side:
        err = assert_one_clear_line(run(*argv, check=False, timeout=60), 2, f"{argv} (the wrong purpose)")
        assert what in err and needed in err and "--tls-cert" in err, err


# ------------------------------------------------------------------------------------------ NBD


def test_nbd_over_tls_with_client_certificates(daemons: Daemons, tmp_path: Path, pki: Pki) -> None:
    need("nbdinfo", "nbdcopy", "qemu-img")
    standby = daemons.standby(None, *server_files(pki), "--require-client-cert", "--nbd-tls", "require")
    vol = tmp_path / "vol0.img"
    primary = daemons.primary(
        standby,
        {"vol0": f"{vol},size=32MiB"},
        *client_files(pki),
        "--nbd-tls", "require",
        "--nbd-tls-cert", str(pki.server.cert),
        "--nbd-tls-key", str(pki.server.key),
        "--nbd-tls-ca", str(pki.ca),
        "--require-client-cert",
    )  # fmt: skip
    # Write through the primary's export over TLS; plain NBD is refused there too.
    model = Model(VOLUME_SIZE)
    src = tmp_path / "src.img"
    model.write(0, rand(1 << 20, seed=1))
    model.write(9 << 20, rand(5 << 20, seed=2))
    model.save(src)
    run("nbdcopy", src, nbds(primary.nbd, "vol0", pki.nbd_dir))
    assert run("nbdinfo", f"nbd://{primary.nbd}/vol0", check=False).returncode != 0
    primary.wait_in_sync()
    assert_image(standby.replica(), model.freeze(), "the replica")

    snap = ctl(standby.grpc, *client_files(pki), "snapshot", "create", "vol0", "s1").stdout.strip()
    assert snap == "s1"
    export = "vol0@s1"
    info = run("nbdinfo", nbds(standby.nbd, export, pki.nbd_dir)).stdout
    assert "with TLS" in info and str(VOLUME_SIZE) in info, info
    plain = run("nbdinfo", f"nbd://{standby.nbd}/{export}", check=False)
    assert plain.returncode != 0, f"plain NBD was served by a TLS-only server:\n{plain.stdout}"
    assert "without TLS" in plain.stdout, plain.stdout
    other = run("nbdinfo", nbds(standby.nbd, export, pki.other_nbd_dir), check=False)
    assert other.returncode != 0, f"a client certificate of another CA was accepted:\n{other.stdout}"
    # the server logs the refused handshake once its side of it ends (it may come after the client's exit)
    deadline = time.monotonic() + 15
    while not any("TLS handshake failed" in line for line in standby.daemon.lines):
        assert time.monotonic() < deadline, standby.daemon.tail()
        time.sleep(0.1)

    out = tmp_path / "copy.img"
    run("nbdcopy", nbds(standby.nbd, export, pki.nbd_dir), out)
    assert_image(out, model.freeze(), "the snapshot copied with nbdcopy over TLS")
    qemu = run(
        "qemu-img", "compare",
        "--object", f"tls-creds-x509,id=tls0,dir={pki.nbd_dir},endpoint=client",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={standby.nbd.rsplit(':', 1)[1]},export={export},tls-creds=tls0",
        f"driver=file,filename={out}",
    )  # fmt: skip
    assert "identical" in qemu.stdout, qemu.stdout

    # Our own client: the backup node over TLS, end to end.
    archive = tmp_path / "b.tar.zst"
    common = ["--standby", standby.grpc, "--metrics-listen", "off", "--log-format", "json"]
    run(*backup_argv("run", "vol0", *common, *client_files(pki), "--nbd-tls", "--output", str(archive)))
    restored = tmp_path / "restored.img"
    run(*backup_argv("restore", str(archive), "--output", str(restored)))
    assert_image(restored, model.freeze(), "the image restored from the backup made over TLS")
    without = run(
        *backup_argv("run", "vol0", *common, *client_files(pki), "--output", str(tmp_path / "x.tar.zst")),
        check=False,
    )
    assert without.returncode == 1 and "requires TLS" in without.stderr, without.stderr
    listed = ctl(standby.grpc, *client_files(pki), "snapshot", "list", "--json").stdout
    assert "backup-" not in listed, f"a backup snapshot was left behind:\n{listed}"


def test_optional_nbd_tls_serves_both(daemons: Daemons, tmp_path: Path, pki: Pki) -> None:
    need("nbdinfo")
    standby = daemons.standby(None, "--nbd-tls", "optional", *server_files(pki))
    vol = tmp_path / "vol0.img"
    daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, *client_files(pki))
    ctl(standby.grpc, *client_files(pki), "snapshot", "create", "vol0", "s1")
    assert "with TLS" in run("nbdinfo", nbds(standby.nbd, "vol0@s1", pki.nbd_dir)).stdout
    assert "without TLS" in run("nbdinfo", f"nbd://{standby.nbd}/vol0@s1").stdout


# ------------------------------------------------------------------------------------------ loopback


def _show_config(argv: list[str]) -> dict[str, str]:
    out = run(*argv, "--show-config").stdout
    values = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            values[key] = value.strip('"')
    return values


def test_every_daemon_listens_on_loopback_only_by_default(tmp_path: Path) -> None:
    roles = {
        "standby-daemon": [*_console(*STANDBY_CMD)],
        "standby-primary": [*_console(*PRIMARY_CMD)],
        "standby-backup run": [*_console(*BACKUP_CMD), "run", "vol0"],
    }
    seen = 0
    for role, argv in roles.items():
        conf = _show_config(argv)
        listeners = {k: v for k, v in conf.items() if k.endswith("listen")}
        assert listeners, f"{role} shows no listening address: {conf}"
        for key, value in listeners.items():
            assert value.startswith("127.0.0.1:"), f"{role}: {key} = {value} by default, not loopback"
            seen += 1
    assert seen == 7, f"expected 4 + 2 + 1 listening settings, saw {seen}"


def test_grpc_core_errors_become_json_events_so_every_log_line_parses(
    daemons: Daemons, tmp_path: Path, pki: Pki
) -> None:
    """gRPC's core writes its own errors to the process's stderr (here the standby's, when a client asks
    by TLS server name indication for a name its certificate does not carry). In a JSON log they come
    out as `native_log` events."""
    standby = daemons.standby(None, *server_files(pki), "--require-client-cert")
    primary = daemons.primary(
        standby,
        {"vol0": f"{tmp_path / 'vol0.img'},size=32MiB"},
        *client_files(pki),
        "--tls-server-name", "elsewhere.example",
        "--connect-timeout", "2",
        in_sync=False,
    )  # fmt: skip
    # The primary's own line says what to do about it.
    refused = primary.daemon.wait_for("mirror_disconnected", timeout=30)
    assert "subjectAltName" in refused["error"] and "--tls-server-name" in refused["error"], refused
    native = standby.daemon.wait_for("native_log", timeout=30)
    assert native["level"] == "error" and "elsewhere.example" in native["text"], native
    assert native["role"] == "standby" and native.get("source"), native
    assert primary.daemon.stop() == 0
    for daemon in (primary.daemon, standby.daemon):
        unparsed = [line for line in daemon.lines if not line.startswith("{")]
        assert not unparsed, f"lines of {daemon.name}'s log that are not JSON: {unparsed[:5]}"

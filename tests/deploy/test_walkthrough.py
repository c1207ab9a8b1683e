"""An administrator's walk-through, from install through backups, failover, fencing, failback,
point-in-time failover, an upgrade, a takeover and the volume's removal, following the documents
literally: three hosts on loopback addresses (B the standby, A the primary, C the backup node), gRPC
over mutual TLS and NBD over TLS from the certificate recipe of docs/SECURITY.md, the example configs of
deploy/config edited only where the documents say to, the services started from the units' ExecStart,
Prometheus scraping with the shipped configuration, and every command taken from the documents' blocks
(walkthrough_support.Site says how paths and host names map to this machine)."""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_support import DEPLOY, Prometheus, need, run
from walkthrough_support import REPO, A, B, C, Site, copy_tree, doc_block, install_file, shown, steps

pytestmark = pytest.mark.timeout(600)

SIZE = 64 << 20


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site")
    try:
        yield s
    finally:
        s.finish()


def wait(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout} s", pytrace=False)
        time.sleep(0.2)


def status(site: Site) -> dict[str, Any]:
    out = site.sh("standbyctl --standby B:7700 status --json").stdout
    vol: dict[str, Any] = json.loads(out)["volumes"][0]
    return vol


def test_the_documents_followed_literally(site: Site, tmp_path: Path) -> None:
    for tool in ("openssl", "qemu-img", "qemu-io", "nbdcopy", "nbdinfo", "prometheus"):
        need(tool)
    root = site.root

    # --- Install (docs/MONITORING.md, Installing the units), from a checkout of the project.
    checkout = tmp_path / "standby-appliance"
    copy_tree(REPO, checkout)
    install = doc_block("MONITORING.md", "## Installing the units")
    venv_line = install.splitlines()[0]
    same = doc_block("OPERATIONS.md", "## Install").replace(" .", " /path/to/standby-appliance")
    assert venv_line == same, "docs/OPERATIONS.md and docs/MONITORING.md install the programs differently"
    site.sh(venv_line.replace("/path/to/standby-appliance", str(checkout)), timeout=300)
    for program in ("standby-daemon", "standby-primary", "standbyctl", "standby-backup"):
        assert (root / "opt/standby/bin" / program).exists(), program

    # --- Certificates (docs/SECURITY.md): the recipe in /etc/standby/tls, for B's and A's addresses.
    tls = root / "etc/standby/tls"
    tls.mkdir(parents=True)
    recipe = doc_block("SECURITY.md", "Making such a set with openssl")
    made = subprocess.run(
        ["bash", "-c", recipe],
        cwd=tls,
        env={"PATH": site.path, "STANDBY_IP": B, "PRIMARY_IP": A},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    layout = doc_block("SECURITY.md", "A layout that fits the systemd units")
    for line in layout.splitlines():
        path = Path(site.literal(line.split()[0]))
        assert path.exists(), f"the recipe did not make {line.split()[0]}, which the layout lists"
    for name in ("admin-cert.pem", "admin-key.pem"):  # the administrator's, in their home (~/)
        (root / "root" / name).write_bytes((tls / name).read_bytes())

    # --- Configure B (the remaining lines of the install block, with standby.toml edited as it says:
    # listen; the other listeners beside it so that A, C and Prometheus reach them; TLS uncommented).
    for line in install.splitlines()[1:]:
        if line.startswith("install -m 0644 deploy/config/"):
            assert "standby.toml" in line
            install_file(
                site,
                DEPLOY / "config/standby.toml",
                "/etc/standby",
                listen=f'"{B}:7700"',
                data_listen=f'"{B}:7701"',
                nbd_listen=f'"{B}:10809"',
                metrics_listen=f'"{B}:9700"',
                tls_cert=None,
                tls_key=None,
                tls_ca=None,
                require_client_cert=None,
                nbd_tls=None,
            )
        elif line.startswith("install -m 0644 deploy/systemd/"):
            site.sh(line, cwd=checkout)
            assert "standby-daemon.service" in line
        elif line.startswith("systemctl"):
            # Before starting it: the documented check of the edited config, on its host.
            check = site.sh("standby-daemon --check-config --config /etc/standby/standby.toml")
            assert "configuration OK" in check.stdout + check.stderr
            site.sh(line)
        else:
            site.sh(line, cwd=checkout)
    assert "standby-daemon" in site.services

    # --- A and C: "likewise primary.toml with standby-primary.service on the primary, backup.toml with
    # standby-backup@.service and standby-backup@.timer on the backup node".
    (root / "srv/standby").mkdir()  # ReadWritePaths= of the primary's unit
    install_file(
        site,
        DEPLOY / "config/primary.toml",
        "/etc/standby",
        volume='["vol0=/srv/standby/vol0.img,size=64MiB"]'.replace("/srv", str(root / "srv")),
        nbd_listen=f'"{A}:10810"',
        metrics_listen=f'"{A}:9701"',
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
    )
    install_file(
        site,
        DEPLOY / "config/backup.toml",
        "/etc/standby",
        metrics_listen=f'"{C}:9702"',
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        nbd_tls=None,
    )
    for unit in ("standby-primary.service", "standby-backup@.service", "standby-backup@.timer"):
        site.sh(f"install -m 0644 deploy/systemd/{unit} /etc/systemd/system/", cwd=checkout)
    check = site.sh("standby-primary --check-config --config /etc/standby/primary.toml")
    assert "configuration OK" in check.stdout + check.stderr
    site.sh("standby-backup run --show-config --config /etc/standby/backup.toml vol0")

    # --- Start and check (docs/OPERATIONS.md), the administrator's shell set up as docs/SECURITY.md says.
    shell = steps(doc_block("SECURITY.md", "for an\nadministrator's shell"))
    export = next(step.command for step in shell if step.command.startswith("export"))
    site.sh(export)
    assert site.exported["STANDBY_ADDRESS"] == f"{B}:7700"
    start = doc_block("OPERATIONS.md", "## Start and check")
    lines = start.splitlines()
    assert lines[0].startswith("systemctl start standby-daemon")  # running already (enable --now)
    site.sh(lines[1])
    on_a = f"nbd://{A}:10810/vol0"  # A's clients
    disk = tmp_path / "disk.img"
    data = bytearray(SIZE)
    rng = random.Random(17)
    for offset in (0, 20 << 20, 60 << 20):
        data[offset : offset + (3 << 20)] = rng.randbytes(3 << 20)
    disk.write_bytes(data)
    # "clients now use nbd://A:10810/vol0": the README's qemu-img line, to that address.
    readme = doc_block("README.md", "## What works today")
    convert = next(line for line in readme.splitlines() if line.startswith("qemu-img convert"))
    convert = convert.replace("127.0.0.1:10810", "A:10810").replace("disk.img", str(disk)).split("#")[0]
    assert "nbd://A:10810/vol0" in lines[1], "the start block no longer names the clients' address"
    site.sh(convert)
    wait(lambda: status(site)["state"] == "uptodate" and status(site)["connected"], "uptodate and connected")
    got = site.sh(lines[2]).stdout  # status
    assert "uptodate" in got and "connected" in got, got
    site.sh(lines[3])  # verify: exit 0 only when the replica equals the primary

    # --- Monitor: Prometheus with the shipped files, the targets put where the roles' metrics listen
    # (docs/MONITORING.md: "put that address below"), scraping every second instead of 15 s.
    prom_dir = root / "etc/prometheus"
    prom_dir.mkdir(parents=True)
    config = (DEPLOY / "prometheus/prometheus.yml").read_text()
    for port, host in (("9700", B), ("9701", A), ("9702", C)):
        config = config.replace(f'"127.0.0.1:{port}"', f'"{host}:{port}"')
    (prom_dir / "prometheus.yml").write_text(config.replace("15s", "1s"))
    (prom_dir / "alerts.yml").write_text((DEPLOY / "prometheus/alerts.yml").read_text())
    prometheus = Prometheus(prom_dir / "prometheus.yml", tmp_path / "prometheus")
    try:

        def value(expr: str) -> float | None:
            result = prometheus.query(expr)
            return float(result[0]["value"][1]) if result else None

        prometheus.wait(lambda: value('up{job="standby-daemon"}') == 1, "scraping the standby")
        prometheus.wait(lambda: value('up{job="standby-primary"}') == 1, "scraping the primary")
        prometheus.wait(
            lambda: value('standby_volume_state{volume="vol0",state="uptodate"}') == 1, "vol0 uptodate"
        )
        assert value('standby_build_info{program="standby-daemon"}') == 1

        # --- Back up (docs/OPERATIONS.md), on the backup node, then verify and restore the archive.
        (root / "backup").mkdir()
        backup = doc_block("OPERATIONS.md", "## Back up")
        site.sh(backup)
        archives = sorted((root / "backup").glob("vol0-*.tar.zst"))
        assert len(archives) == 1, archives
        archive = archives[0]
        assert archive.name == f"vol0-{time.strftime('%Y-%m-%d')}.tar.zst"
        site.sh(f"standby-backup verify {archive}")
        site.sh(f"standby-backup restore {archive} --output {tmp_path / 'restored.img'}")
        assert (tmp_path / "restored.img").read_bytes() == bytes(data), "restore gave another image"
        untar = tmp_path / "untar"
        untar.mkdir()
        site.sh(f"tar --zstd -xSf {archive}", cwd=untar)
        assert (untar / "vol0.img").read_bytes() == bytes(data), "plain tar gave another image"
        # docs/ARCHIVE-FORMAT.md: "gives MANIFEST.json, vol0.img (sparse), TRAILER.json"
        assert sorted(p.name for p in untar.iterdir()) == ["MANIFEST.json", "TRAILER.json", "vol0.img"]
        assert json.loads((untar / "TRAILER.json").read_text())["complete"] is True
        manifest = json.loads((untar / "MANIFEST.json").read_text())
        geometry = (manifest["volume"], manifest["size"], manifest["block_size"])
        assert geometry == ("vol0", SIZE, 4096), manifest
        assert manifest["replica"]["state"] == "uptodate", manifest
        listed = site.sh("standby-backup list /backup/").stdout
        assert re.search(rf"{archive.name} +vol0 +backup-\S+ +full ", listed), listed
        described = site.sh(f"standby-backup list {archive}").stdout
        assert "block size 4096" in described and "replica    uptodate" in described, described

        # --- Incremental archives: a full archive whose snapshot is kept, writes, an incremental on it,
        # the chain restored (the document's archive names stand for those `list` shows).
        incremental = steps(doc_block("OPERATIONS.md", "### Incremental archives"))
        assert len(incremental) == 3 and incremental[2].command.startswith("standby-backup restore")
        (root / "backup/vol0").mkdir()
        site.sh(incremental[0].command)
        run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 40M 1M", "-c", "flush", on_a)
        data[40 << 20 : 41 << 20] = b"\x3c" * (1 << 20)
        site.sh(incremental[1].command)
        chain = site.sh("standby-backup list --json /backup/vol0/").stdout
        names = [a["archive"] for a in json.loads(chain)]  # oldest snapshot first
        assert len(names) == 2, chain
        restore = incremental[2].command
        for placeholder, name in zip(
            re.findall(r"\S*vol0-backup-[AB]\.tar\.zst", restore), names, strict=True
        ):
            restore = restore.replace(placeholder, name)
        site.sh(restore)
        assert (root / "root/vol0.img").read_bytes() == bytes(data), "the restored chain differs"
        kept = [
            s["name"]
            for s in json.loads(site.sh("standbyctl --standby B:7700 snapshot list vol0 --json").stdout)
        ]
        assert len(kept) == 1, f"--release-base leaves the newest snapshot only: {kept}"

        # --- Retention, dry run: both archives kept (the incremental needs its full archive).
        pruned = site.sh(doc_block("OPERATIONS.md", "### Retention")).stdout
        assert all(name.rsplit("/", 1)[-1] in pruned for name in names), pruned
        assert len(list((root / "backup/vol0").glob("*.tar.zst"))) == 2

        # --- Nightly backups: the timer enabled as documented, then its first night.
        (root / "var/lib/node_exporter/textfile").mkdir(parents=True)  # the unit's ReadWritePaths=
        site.sh(doc_block("OPERATIONS.md", "### Nightly backups"))
        site.timer_fires("standby-backup@vol0.timer")
        nightly = list((root / "var/lib/standby-backup/vol0").glob("vol0-*.tar.zst"))
        assert len(nightly) == 1, nightly
        textfile = (root / "var/lib/node_exporter/textfile/standby_backup_vol0.prom").read_text()
        assert 'standby_backup_last_run_success{volume="vol0"} 1.0' in textfile, textfile

        # --- Failover (docs/OPERATIONS.md): A is lost, B takes over.
        site.sh("systemctl stop standby-primary")  # "Make sure A's primary is really gone"
        failover = doc_block("OPERATIONS.md", "## Failover: A is lost, B takes over")
        command, documented = failover.splitlines()[:2]
        out = site.sh(command).stdout
        # B requires TLS on NBD (nbd_tls = "require"), so the URI it gives is nbds:// (the document says so).
        assert shown(out, site.literal(documented).replace("nbd://", "nbds://")), out
        assert status(site)["state"] == "promoted"
        # A client of B over TLS, with qemu's options as docs/SECURITY.md gives them.
        nbd_dir = root / "etc/standby/tls/nbd"
        creds = f"tls-creds-x509,id=tls0,dir={nbd_dir},endpoint=client"
        on_b = f"driver=nbd,host={B},port=10809,export=vol0,tls-creds=tls0"
        assert "dir=/etc/standby/tls/nbd,endpoint=client" in (REPO / "docs/SECURITY.md").read_text()
        run("qemu-io", "--object", creds, "--image-opts", on_b, "-c", "write -P 0x5b 8M 2M", "-c", "flush")
        data[8 << 20 : 10 << 20] = b"\x5b" * (2 << 20)
        prometheus.wait(
            lambda: value('standby_volume_state{volume="vol0",state="promoted"}') == 1,
            "the standby's target showing vol0 promoted (static targets survive the failover)",
        )
        # The shipped rules see it: a volume without a second copy (pending for its 30 minutes).
        prometheus.wait(
            lambda: prometheus.query('ALERTS{alertname="StandbyVolumeWithoutRedundancy",volume="vol0"}'),
            "StandbyVolumeWithoutRedundancy pending",
        )
        # "The promotion is durable: a restart of B's daemon serves vol0 read-write again."
        site.sh("systemctl restart standby-daemon")
        assert status(site)["state"] == "promoted"
        run("qemu-io", "--object", creds, "--image-opts", on_b, "-c", "read -P 0x5b 8M 2M")

        # A comes back: fenced, its clients' writes refused (--fencing refuse-writes, the default).
        site.sh("systemctl start standby-primary")
        primary = site.services["standby-primary"]
        primary.wait_for("mirror_fenced", timeout=60)
        refused = run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 64k", on_a, check=False)
        assert "Input/output error" in refused.stdout + refused.stderr, refused
        prometheus.wait(
            lambda: value('standby_replication_state{volume="vol0",state="outdated"}') == 1,
            "the primary's target showing vol0 outdated",
        )

        # --- Failback (docs/OPERATIONS.md): hand the volume back to A.
        failback = doc_block("OPERATIONS.md", "## Failback: hand the volume back to A")
        command, documented = failback.splitlines()[:2]
        out = site.sh(command).stdout
        assert shown(out, site.literal(documented)), f"{out!r} where the document shows {documented!r}"
        assert "2.0 MiB written while promoted" in out, out
        pulled = primary.wait_for("failback_pulled", timeout=60)
        assert pulled["tracked_bytes"] == 2 << 20, pulled
        wait(lambda: status(site)["state"] == "uptodate" and status(site)["connected"], "back to uptodate")
        assert (root / "srv/standby/vol0.img").read_bytes() == bytes(data), "A's volume after the failback"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", "-c", "flush", on_a)
        data[: 64 << 10] = b"\x77" * (64 << 10)
        site.sh("standbyctl --standby B:7700 verify vol0")
        prometheus.wait(
            lambda: value('standby_volume_state{volume="vol0",state="uptodate"}') == 1, "vol0 uptodate again"
        )

        # --- Upgrade (docs/OPERATIONS.md): the standby first; writes meanwhile are marked by A and
        # resent when it is back.
        assert "Upgrade the standby first" in (REPO / "docs/OPERATIONS.md").read_text()
        site.sh("systemctl stop standby-daemon")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x4e 50M 512k", "-c", "flush", on_a)
        data[50 << 20 : (50 << 20) + (512 << 10)] = b"\x4e" * (512 << 10)
        site.sh("systemctl start standby-daemon")
        wait(
            lambda: status(site)["state"] == "uptodate" and status(site)["connected"],
            "resynced after the upgrade",
        )
        site.sh("standbyctl --standby B:7700 verify vol0")

        # --- Point-in-time failover: damage reached B too; B serves the volume as it was at a snapshot.
        pit = steps(doc_block("OPERATIONS.md", "### Point-in-time failover"))
        at = re.search(r"--at (\S+)", pit[1].command)
        assert at, pit[1].command
        site.sh(f"standbyctl --standby B:7700 snapshot create vol0 {at.group(1)}")
        good = bytes(data)
        run("qemu-io", "-f", "raw", "-c", "write -P 0xdd 30M 1M", "-c", "flush", on_a)  # the damage
        damaged = bytearray(good)
        damaged[30 << 20 : 31 << 20] = b"\xdd" * (1 << 20)
        site.sh("systemctl stop standby-primary")
        for step in pit:
            out = site.sh(step.command).stdout
            for line in step.prints:
                assert shown(out, site.literal(line).replace("nbd://", "nbds://")), f"{out!r}: not {line!r}"
        kept = re.search(r"kept as snapshot (\S+)", out)
        assert kept, out
        # Read with libnbd's nbdcopy as docs/SECURITY.md shows it: the volume, and the kept damage.
        copy = next(
            line
            for line in doc_block("SECURITY.md", "- libnbd tools").splitlines()
            if line.startswith("nbdcopy")
        )
        site.sh(copy.replace("vol0@nightly", "vol0").replace("nightly.img", "now.img"))
        assert (root / "root/now.img").read_bytes() == good, "the promoted volume is not the snapshot's image"
        site.sh(copy.replace("vol0@nightly", f"vol0@{kept.group(1)}").replace("nightly.img", "kept.img"))
        assert (root / "root/kept.img").read_bytes() == bytes(damaged), "the kept snapshot is not the damage"
        # Failback again: demote, then A's primary started as it always runs takes the good state back.
        site.sh(failback.splitlines()[0])
        site.sh("systemctl start standby-primary")
        site.services["standby-primary"].wait_for("failback_pulled", timeout=60)
        wait(lambda: status(site)["state"] == "uptodate" and status(site)["connected"], "uptodate after --at")
        assert (root / "srv/standby/vol0.img").read_bytes() == good, "A's volume after the second failback"

        # --- Takeover: the volume moves to a new primary host (its own state and volume file); the
        # old one stopped, the documented block, and the new one's first start with discard_standby_data.
        site.sh("systemctl stop standby-primary")
        new = bytearray(SIZE)
        new[5 << 20 : 7 << 20] = rng.randbytes(2 << 20)
        (root / "srv/standby/new.img").write_bytes(new)
        install_file(
            site,
            root / "etc/standby/primary.toml",
            "/etc/standby",
            volume=f'["vol0={root}/srv/standby/new.img"]',
            state_dir=f'"{root}/var/lib/standby-primary-new"',
            discard_standby_data="true",
        )
        site.run_block(doc_block("OPERATIONS.md", "### Moving a volume to another primary"))
        site.sh("systemctl start standby-primary")
        wait(lambda: status(site)["state"] == "uptodate" and status(site)["connected"], "the new primary's")
        site.sh("standbyctl --standby B:7700 verify vol0")
        replica = root / "var/lib/standby/replicas/vol0.img"
        assert replica.read_bytes() == bytes(new), "the replica is not the new primary's data"

        # --- Retiring the volume: its primary stopped, the documented block; everything of it goes.
        site.sh("systemctl stop standby-primary")
        snapshots = json.loads(site.sh("standbyctl --standby B:7700 snapshot list vol0 --json").stdout)
        assert snapshots, "the walk-through left snapshots of vol0 to delete"
        (removed,) = site.run_block(doc_block("OPERATIONS.md", "### Retiring a volume"))
        assert f"{len(snapshots)} snapshots deleted" in removed.stdout, removed.stdout
        assert not replica.exists()
        assert json.loads(site.sh("standbyctl --standby B:7700 status --json").stdout)["volumes"] == []
        prometheus.wait(
            lambda: not prometheus.query('standby_volume_state{volume="vol0"}'), "vol0 gone from the metrics"
        )
    finally:
        prometheus.stop()

    # --- Stop: every service ends cleanly, and every line it logged is JSON.
    for name in ("standby-primary", "standby-daemon"):
        site.sh(f"systemctl stop {name}")
    assert site.not_json() == [], "\n".join(site.not_json())

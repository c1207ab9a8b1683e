"""The nightly backup of docs/OPERATIONS.md, as deploy/systemd/standby-backup@.service runs it: the unit's
own ExecStart and ExecStartPost command lines, word for word (the programs pointed at this venv, the
instance vol0, the destination of its drop-in example a real S3 server, the example config with this
test's standby address). A first night makes a full archive and keeps its snapshot with a lease; the
next night an incremental on it, releasing the old snapshot; prune keeps both; the chain restores the
volume."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from deploy_support import BIN, CONFIG_DIR, ctl, daemons, directives, need, qemu_write, run, wait_in_sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the S3 server of the tests

from s3server import S3Server, s3  # noqa: F401  (the fixture)

UNIT = "standby-backup@.service"


def unit_commands(config: Path, dest: str, textfile_dir: Path) -> list[list[str]]:
    """ExecStart, then ExecStartPost, of the unit as systemd would run them for instance vol0."""
    d = directives(UNIT)
    [default_dest] = [e.split("=", 1)[1] for e in d["Environment"] if e.startswith("STANDBY_BACKUP_DEST=")]
    assert default_dest == "/var/lib/standby-backup/%i/", default_dest
    commands = []
    for line in (*d["ExecStart"], *d["ExecStartPost"]):
        line = (
            line.replace("/opt/standby/bin/", f"{BIN}/")
            .replace("/etc/standby/backup.toml", str(config))
            .replace("${STANDBY_BACKUP_DEST}", dest)
            .replace("/var/lib/node_exporter/textfile/", f"{textfile_dir}/")
            .replace("%i", "vol0")
        )
        commands.append(shlex.split(line))
    return commands


def test_the_units_commands_make_a_full_then_an_incremental_and_prune(
    tmp_path: Path,
    s3: S3Server,  # noqa: F811 (the fixture)
) -> None:
    need("qemu-io")
    bucket = s3.make_bucket("nightly-unit")
    dest = f"s3://{bucket}/standby/vol0/"
    with daemons(tmp_path) as ds:
        standby = ds.standby(tmp_path / "standby", "--preservation-capacity", "64MiB")
        grpc = standby.addresses["grpc"]
        primary = ds.primary([f"vol0={tmp_path / 'vol0.img'},size=16MiB"], grpc)
        wait_in_sync(primary.addresses["metrics"], "vol0")
        config = tmp_path / "backup.toml"
        text = (CONFIG_DIR / "backup.toml").read_text()
        assert 'standby = "192.0.2.10:7700"' in text
        config.write_text(
            text.replace('standby = "192.0.2.10:7700"', f'standby = "{grpc}"').replace(
                'metrics_listen = "127.0.0.1:9702"', 'metrics_listen = "off"'
            )
        )
        commands = unit_commands(config, dest, tmp_path)
        assert len(commands) == 2 and commands[1][1] == "prune", commands

        def night() -> list[dict]:
            for argv in commands:
                run(*argv, env=s3.env(), timeout=120)
            return json.loads(run(BIN / "standby-backup", "list", dest, "--json", env=s3.env()).stdout)

        qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x11 0 4M")
        wait_in_sync(primary.addresses["metrics"], "vol0")
        [full] = night()
        assert full["manifest"]["kind"] == "full"
        [kept] = json.loads(ctl(grpc, "snapshot", "list", "vol0", "--json"))
        assert kept["name"] == full["manifest"]["snapshot"]
        status = json.loads(ctl(grpc, "status", "--json"))
        [lease] = [s["lease_remaining_seconds"] for s in status["volumes"][0]["snapshots"]]
        assert 7 * 86400 < lease <= 8 * 86400, f"the kept snapshot's lease is {lease} s, 8 days expected"

        qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x22 1M 1M")
        wait_in_sync(primary.addresses["metrics"], "vol0")
        archives = night()
        assert [a["manifest"]["kind"] for a in archives] == ["full", "incremental"], archives
        inc = archives[1]
        assert inc["manifest"]["base"]["archive_sha256"] == full["archive_sha256"]
        [kept] = json.loads(ctl(grpc, "snapshot", "list", "vol0", "--json"))
        assert kept["name"] == inc["manifest"]["snapshot"], "the unit did not release the previous base"
        prom = (tmp_path / "standby_backup_vol0.prom").read_text()
        assert 'standby_backup_last_success_timestamp_seconds{kind="incremental",volume="vol0"}' in prom
        assert 'standby_backup_last_success_timestamp_seconds{kind="full",volume="vol0"}' in prom

        image = tmp_path / "restored.img"
        run(
            BIN / "standby-backup",
            "restore",
            full["archive"],
            inc["archive"],
            "--output",
            image,
            env=s3.env(),
        )
        assert image.read_bytes() == (tmp_path / "vol0.img").read_bytes()

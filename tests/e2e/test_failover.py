"""Failover and failback with real daemons: the primary dies in the middle of a storm of client writes,
the standby is promoted (as it is, or rolled back to a snapshot) and takes writes; `demote` hands the
volume back, and the old primary, restarted, receives exactly what changed and mirrors again. Fencing:
a primary still connected when the standby is promoted with --force is told, and refuses its clients'
writes or keeps serving them outdated, by its --fencing policy."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import CTL_CMD, VOLUME_SIZE, Daemons, MiB, Primary, Standby, _console, need, qemu_io, run
from faults_support import fio_storm
from fullfs_support import wait_until

pytestmark = pytest.mark.timeout(240)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_export(uri: str, tmp: Path, name: str) -> bytes:
    out = tmp / name
    run("nbdcopy", uri, str(out))
    return out.read_bytes()


def volume_status(standby: Standby) -> dict:
    return standby.status()["volumes"][0]


def die_mid_storm(primary: Primary, standby: Standby, tmp: Path) -> None:
    """Random writes into the first 8 MiB; the primary's host dies (SIGKILL) in the middle of them."""
    storm = fio_storm(primary.uri("vol0"), 20, tmp, size=VOLUME_SIZE // 4)
    time.sleep(2.0)
    primary.daemon.kill()
    storm.kill()
    storm.communicate(timeout=30)
    wait_until(
        lambda: not volume_status(standby)["connected"], 30, "the standby to see the primary gone", 0.1
    )


def fail_back(daemons: Daemons, standby: Standby, vol: Path, *extra: str) -> Primary:
    """The old primary is restarted on its volume: fenced (outdated, writes refused) while the volume is
    promoted; `demote`, then it pulls what changed and mirrors again. Checks what it was sent."""
    primary = daemons.primary(standby, {"vol0": str(vol)}, *extra, in_sync=False)
    primary.daemon.wait_for("mirror_fenced", timeout=30)
    wait_until(
        lambda: primary.metrics().find("standby_replication_state", volume="vol0", state="outdated") == 1,
        30,
        "the primary to report itself outdated",
        0.1,
    )
    refused = qemu_io(primary.uri("vol0"), "write -P 0x99 0 4k", check=False)
    assert "Input/output error" in refused.stdout + refused.stderr, refused

    tracked = volume_status(standby)["tracked_bytes"]
    out = standby.ctl("demote", "vol0").stdout
    assert "demoted" in out, out
    started = primary.daemon.wait_for("failback_started", timeout=30)
    pulled = primary.daemon.wait_for("failback_pulled", timeout=60)
    primary.wait_in_sync()
    assert volume_status(standby)["state"] == "uptodate" and volume_status(standby)["tracked_bytes"] == 0
    # Sent: what the standby tracked, and of the primary's own set regions only the blocks whose
    # checksums differ (a few in flight when it died), not the whole hot set.
    assert pulled["tracked_bytes"] == tracked
    assert pulled["differing_bytes"] <= started["primary_regions_bytes"]
    assert tracked <= pulled["sent_bytes"] <= tracked + pulled["differing_bytes"], (pulled, started)
    assert pulled["sent_bytes"] <= 1.1 * tracked + 4 * MiB, (pulled, started)
    return primary


def test_failback_after_the_primary_died_mid_storm_with_and_without_a_rollback(
    daemons: Daemons, tmp_path: Path
) -> None:
    need("fio", "qemu-io", "nbdcopy")
    standby = daemons.standby(tmp_path / "b")
    vol = tmp_path / "a" / "vol0.img"
    vol.parent.mkdir()
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"})
    qemu_io(primary.uri("vol0"), "write -P 0x11 0 24M", "flush")
    primary.wait_in_sync()

    # 1. Failover as the replica is, writes on the standby, failback.
    die_mid_storm(primary, standby, tmp_path)
    out = standby.ctl("promote", "vol0").stdout
    assert f"read-write at nbd://{standby.nbd}/vol0" in out, out
    qemu_io(standby.uri("vol0"), "write -P 0x6b 12M 1M", "write -P 0x6c 20M 4k", "flush")
    assert volume_status(standby)["tracked_bytes"] == MiB + 4096  # exactly the blocks written
    primary = fail_back(daemons, standby, vol)
    assert sha(vol) == sha(standby.replica("vol0"))
    image = vol.read_bytes()
    assert image[12 * MiB : 13 * MiB] == b"\x6b" * MiB and image[20 * MiB : 20 * MiB + 4096] == b"\x6c" * 4096

    # The primary mirrors again, in the usual direction.
    qemu_io(primary.uri("vol0"), "write -P 0x21 16M 2M", "flush")
    primary.wait_in_sync()
    good = standby.snapshot("vol0", "good")
    good_image = read_export(standby.uri(f"vol0@{good}"), tmp_path, "good.img")
    # 2. Damage mirrored after the snapshot (ransomware, say), then the primary dies mid-storm; the
    # standby is promoted as it was at the snapshot.
    qemu_io(primary.uri("vol0"), "write -P 0xdd 16M 2M", "flush")
    primary.wait_in_sync()
    die_mid_storm(primary, standby, tmp_path)
    out = standby.ctl("promote", "vol0", "--at", good).stdout
    assert f"rolled back to snapshot {good}" in out and "kept as snapshot before-rollback-" in out, out
    kept = out.split("kept as snapshot ")[1].split()[0]
    status = volume_status(standby)
    assert (
        status["state"] == "promoted" and status["rolled_back_to"] == good and status["kept_snapshot"] == kept
    )
    assert read_export(standby.uri("vol0"), tmp_path, "promoted.img") == good_image
    damaged = read_export(standby.uri(f"vol0@{kept}"), tmp_path, "kept.img")
    assert damaged[16 * MiB : 18 * MiB] == b"\xdd" * (2 * MiB)  # the damaged state, kept
    assert read_export(standby.uri(f"vol0@{good}"), tmp_path, "good2.img") == good_image
    qemu_io(standby.uri("vol0"), "write -P 0x6d 24M 64k", "flush")
    primary = fail_back(daemons, standby, vol)
    assert sha(vol) == sha(standby.replica("vol0"))
    image = vol.read_bytes()
    assert image[16 * MiB : 18 * MiB] == good_image[16 * MiB : 18 * MiB]
    assert image[24 * MiB : 24 * MiB + 65536] == b"\x6d" * 65536
    # The kept snapshot stays until the operator deletes it.
    assert kept in {s["name"] for s in standby.snapshots("vol0")}


@pytest.mark.parametrize("fencing", ["refuse-writes", "keep-serving"])
def test_a_connected_primary_is_fenced_when_the_standby_is_promoted_with_force(
    daemons: Daemons, tmp_path: Path, fencing: str
) -> None:
    need("qemu-io")
    standby = daemons.standby(tmp_path / "b")
    vol = tmp_path / "vol0.img"
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, "--fencing", fencing)
    qemu_io(primary.uri("vol0"), "write -P 0x11 0 8M", "flush")
    primary.wait_in_sync()

    cp = standby.ctl("promote", "vol0", check=False)
    assert cp.returncode == 1 and "is connected" in cp.stderr, cp.stderr
    standby.ctl("promote", "vol0", "--force")
    # The primary learns it at its next batch (a heartbeat within a second) and fences itself.
    fenced = primary.daemon.wait_for("mirror_fenced", timeout=30)
    assert fenced["fencing"] == fencing and "promoted" in fenced["error"]
    wait_until(
        lambda: primary.metrics().find("standby_replication_state", volume="vol0", state="outdated") == 1,
        30,
        "the primary to report itself outdated",
        0.1,
    )
    fenced_metric = primary.metrics().get("standby_writes_fenced", volume="vol0")
    assert fenced_metric == (1 if fencing == "refuse-writes" else 0)
    assert standby.metrics().get("standby_volume_state", volume="vol0", state="promoted") == 1
    write = qemu_io(primary.uri("vol0"), "write -P 0x77 1M 64k", check=False)
    if fencing == "refuse-writes":
        assert write.returncode != 0 and "Input/output error" in write.stdout + write.stderr, write
        assert vol.read_bytes()[MiB : MiB + 65536] == b"\x11" * 65536  # nothing changed locally
    else:
        assert write.returncode == 0, write  # served, on this host only
    qemu_io(standby.uri("vol0"), "write -P 0x55 4M 4k", "flush")

    tracked = standby.metrics().get("standby_failback_tracked_bytes", volume="vol0")
    assert tracked == 4096, tracked
    standby.ctl("demote", "vol0")
    primary.daemon.wait_for("failback_pulled", timeout=60)
    primary.wait_in_sync()
    image = vol.read_bytes()
    assert sha(vol) == sha(standby.replica("vol0"))
    # The standby's data won: its write is there, the outdated write is not.
    assert image[4 * MiB : 4 * MiB + 4096] == b"\x55" * 4096
    assert image[MiB : MiB + 65536] == b"\x11" * 65536
    assert primary.metrics().get("standby_writes_fenced", volume="vol0") == 0
    assert standby.metrics().get("standby_volume_state", volume="vol0", state="uptodate") == 1
    # Writes are taken again, and mirrored.
    qemu_io(primary.uri("vol0"), "write -P 0x33 2M 64k", "flush")
    primary.wait_in_sync()
    assert sha(vol) == sha(standby.replica("vol0"))


def test_a_rollback_cut_by_kill_9_is_resumed_when_the_standby_restarts(
    daemons: Daemons, tmp_path: Path
) -> None:
    """The standby dies (SIGKILL) while `promote --at` writes the snapshot's blocks back; restarted, it
    finishes the rollback before it exports the volume, which then reads exactly as the snapshot."""
    need("fio", "qemu-io", "nbdcopy")
    standby = daemons.standby(tmp_path / "b")
    vol = tmp_path / "vol0.img"
    primary = daemons.primary(standby, {"vol0": f"{vol},size=64MiB"})
    qemu_io(primary.uri("vol0"), "write -P 0x11 0 64M", "flush")
    primary.wait_in_sync()
    good = standby.snapshot("vol0", "good")
    good_image = read_export(standby.uri(f"vol0@{good}"), tmp_path, "good.img")
    # Damage: random 4 KiB blocks over the whole volume (the rollback's work is as many scattered blocks).
    run(
        "fio", "--name=damage", "--ioengine=nbd", f"--uri={primary.uri('vol0')}", "--rw=randwrite",
        "--bs=4k", "--size=64M", "--io_size=24M", "--iodepth=16", "--randrepeat=0", "--end_fsync=1",
        timeout=120,
    )  # fmt: skip
    primary.daemon.stop()
    wait_until(
        lambda: not volume_status(standby)["connected"], 30, "the standby to see the primary gone", 0.1
    )
    promote = subprocess.Popen(
        [*_console(*CTL_CMD), "--standby", standby.grpc, "promote", "vol0", "--at", good],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    standby.daemon.wait_for("volume_promoted", timeout=30)
    standby.daemon.kill()
    promote.communicate(timeout=30)
    assert promote.returncode != 0  # the command saw the standby die

    again = daemons.standby(tmp_path / "b")
    status = volume_status(again)
    assert status["state"] == "promoted" and status["rolled_back_to"] == good
    if not any(e.get("event") == "volume_rolled_back" for e in standby.daemon.events):
        again.daemon.wait_for("rollback_resumed", timeout=5)  # cut in the middle: done again at start
    assert read_export(again.uri("vol0"), tmp_path, "promoted.img") == good_image
    assert status["kept_snapshot"] in {s["name"] for s in again.snapshots("vol0")}

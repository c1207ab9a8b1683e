"""Failover and failback with real daemons: the primary dies, the standby is promoted and serves the
volume read-write; the old primary, back, is refused as out of date; its host is reattached as the new
standby and only the blocks that differ are resent."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Daemons, MiB, Model, Writer, need, qemu_io, rand, run

pytestmark = pytest.mark.timeout(240)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_promote_then_reattach_the_old_primary_as_the_new_standby(daemons: Daemons, tmp_path: Path) -> None:
    need("qemu-io")
    site_b = daemons.standby(tmp_path / "b-standby")
    vol_a = tmp_path / "a" / "vol0.img"
    vol_a.parent.mkdir()
    primary_a = daemons.primary(site_b, {"vol0": f"{vol_a},size=32MiB"})
    model = Model(VOLUME_SIZE)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    Writer(primary_a.uri("vol0"), model, scratch).write(0, rand(12 * MiB, seed=31))
    primary_a.wait_in_sync()

    # while the primary mirrors the volume, promoting it is refused
    cp = site_b.ctl("promote", "vol0", check=False)
    assert cp.returncode == 1 and "is connected" in cp.stderr, cp.stderr

    # the primary's host dies; it had written 64 KiB locally that never reached the standby
    primary_a.daemon.kill()
    with open(vol_a, "r+b") as f:
        f.seek(20 * MiB)
        f.write(rand(64 * 1024, seed=32))
    deadline = time.monotonic() + 30
    while site_b.status()["volumes"][0]["connected"] and time.monotonic() < deadline:
        time.sleep(0.1)

    out = site_b.ctl("promote", "vol0").stdout
    assert f"read-write at nbd://{site_b.nbd}/vol0" in out
    assert site_b.status()["volumes"][0]["state"] == "promoted"
    # the promoted volume takes writes over NBD; snapshots of it go on
    qemu_io(site_b.uri("vol0"), "write -P 0x6b 4M 1M", "flush")
    model.write(4 * MiB, b"\x6b" * MiB)
    snap = site_b.snapshot("vol0", "after-failover")
    assert site_b.replica("vol0").read_bytes() == model.freeze()
    cp = site_b.ctl("promote", "vol0", check=False)
    assert cp.returncode == 1 and "promoted already" in cp.stderr

    # the old primary comes back: refused as out of date, with the way out in the message
    again = daemons.primary(site_b, {"vol0": f"{vol_a},size=32MiB"}, in_sync=False)
    deadline = time.monotonic() + 30
    refused = []
    while not refused and time.monotonic() < deadline:
        refused = [e for e in again.daemon.events if "was promoted" in str(e.get("error", ""))]
        time.sleep(0.1)
    assert refused, f"the old primary was not told it is out of date:\n{again.daemon.tail()}"
    assert "failback" in refused[0]["error"]
    assert again.daemon.stop() == 0

    # failback: site A becomes the standby, seeded with its old volume; site B's replica is the primary
    site_b.ctl("snapshot", "delete", "vol0", snap)
    assert site_b.daemon.stop() == 0
    site_a = daemons.standby(tmp_path / "a-standby", "--adopt", f"vol0={vol_a}")
    promoted = site_b.data_dir / "replicas" / "vol0.img"
    primary_b = daemons.primary(site_a, {"vol0": f"{promoted}"}, "--state-dir", str(tmp_path / "b-state"))
    assert sha(site_a.replica("vol0")) == sha(promoted) and promoted.read_bytes() == model.freeze()
    sent = primary_b.daemon.wait_for("resync_sent", timeout=30)
    # only the blocks that differ travel as data: the 1 MiB written after the promotion (the 64 KiB the
    # old primary never mirrored is a hole on B: it travels as a zeroed range)
    assert 0 < sent["resent_after_checksum_bytes"] <= 2 * MiB, sent
    # and the old primary's volume, as the new standby's replica, now takes the mirrored writes
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 8M 64k", "-c", "flush", primary_b.uri("vol0"))
    primary_b.wait_in_sync()
    assert sha(site_a.replica("vol0")) == sha(promoted)

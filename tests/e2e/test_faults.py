"""Replication through faults (issue 4): link cuts, a standby killed and restarted, a primary killed and
restarted, a new standby against a full primary. After each: no client write failed, the replica equals
the primary after a quiet moment, only marked regions were resent, and a snapshot taken before the
fault still reads its frozen image."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Daemons, MiB, mirrored_pair, need, rand, run
from faults_support import (
    assert_in_sync,
    assert_snapshot,
    finish,
    fio_storm,
    resent,
    resync_budget,
    sha,
    start_pair,
    storm_pair,
    wait_for,
    writes_reach,
    writes_tracked,
    written,
)

pytestmark = pytest.mark.timeout(240)


@pytest.mark.both_transports
def test_link_cut_several_times_during_fio_writes(daemons: Daemons, tmp_path: Path) -> None:
    with storm_pair(daemons, tmp_path) as (standby, primary, proxy, name, expected):
        connects = len([e for e in primary.daemon.events if e.get("event") == "mirror_connected"])
        before = resent(primary)
        storm = fio_storm(primary.uri("vol0"), 9, tmp_path)
        for _ in range(3):
            writes_reach(standby, storm)  # each cut hits a stream that carries the storm's writes
            proxy.cut()
            writes_tracked(primary, storm)  # writes go on during the outage, marked for the resync
            proxy.restore()
        finish(storm)
        assert_in_sync(standby, primary)
        sent = resent(primary) - before
        budget = resync_budget(primary, connects)
        assert 0 < sent <= budget * 1.1, f"resent {sent} bytes for {budget} bytes marked"
        assert_snapshot(standby, name, expected, tmp_path)


@pytest.mark.both_transports
def test_standby_killed_mid_storm_and_restarted(daemons: Daemons, tmp_path: Path) -> None:
    with storm_pair(daemons, tmp_path) as (standby, primary, proxy, name, expected):
        storm = fio_storm(primary.uri("vol0"), 7, tmp_path)
        writes_reach(standby, storm)
        standby.daemon.kill()  # kill -9 while writes flow
        writes_tracked(primary, storm)  # and they go on while it is down
        again = daemons.standby(standby.data_dir)
        proxy.restore(again)
        finish(storm)
        assert_in_sync(again, primary)
        assert_snapshot(again, name, expected, tmp_path)


def test_primary_killed_mid_storm_resyncs_marked_regions_on_restart(daemons: Daemons, tmp_path: Path) -> None:
    # A small activity log: regions idle for 2 s are cleared (the default keeps 4 GiB of them marked).
    with storm_pair(daemons, tmp_path, "--activity-log", "1MiB") as (standby, primary, proxy, name, expected):
        vol = primary.volumes["vol0"]
        bitmap = vol.with_name("vol0.img.bitmap")
        # The snapshot's writes leave the activity log: once idle for its linger (2 s), the regions
        # beyond the log's 1 MiB are cleared in the bitmap file.
        wait_for(lambda: marked_bytes(bitmap) <= MiB, "the bitmap cleared down to its activity log")
        # The storm stays in the first quarter: the regions it marks (4 MiB ahead of each newly marked
        # one at most, and the activity log) leave most of the volume unmarked.
        storm = fio_storm(primary.uri("vol0"), 30, tmp_path, size=VOLUME_SIZE // 4)
        before = written(primary)
        wait_for(lambda: written(primary) >= before + 2 * MiB, "the storm writing", clients=storm)
        primary.daemon.kill()  # kill -9: the client's writes in flight fail, that is expected here
        storm.communicate(timeout=60)
        assert bitmap.exists()
        again = daemons.primary(proxy, {"vol0": f"{vol},size=32MiB"})
        dirty = [e for e in again.daemon.events if e.get("event") == "bitmap_dirty"]
        assert dirty, "the restarted primary found no marked regions in its bitmap"
        assert dirty[0]["bytes"] <= VOLUME_SIZE // 4 + 4 * MiB, "a crash must resync only the marked regions"
        assert_in_sync(standby, again)
        assert_snapshot(standby, name, expected, tmp_path)


def test_a_standby_started_empty_against_a_full_primary(daemons: Daemons, tmp_path: Path) -> None:
    need("qemu-io")
    vol = tmp_path / "primary" / "vol0.img"
    vol.parent.mkdir()
    data = rand(6 * MiB, seed=9)
    with open(vol, "wb") as f:
        f.truncate(VOLUME_SIZE)
        f.seek(4 * MiB)
        f.write(data)
    standby = daemons.standby()
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"})  # waits until in sync
    assert sha(standby.replica("vol0")) == sha(vol)
    allocated = standby.replica("vol0").stat().st_blocks * 512
    assert allocated <= 6 * MiB + 2 * 65536, f"the full copy did not skip holes: {allocated} bytes allocated"
    # and writes go on afterwards
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", "-c", "flush", primary.uri("vol0"))
    assert_in_sync(standby, primary)


@pytest.mark.both_transports
def test_writes_are_not_stalled_while_the_link_is_down(daemons: Daemons, tmp_path: Path) -> None:
    need("qemu-io")
    standby, primary, proxy = start_pair(daemons, tmp_path)
    try:
        proxy.cut()
        done = threading.Event()

        def write() -> None:
            run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 4M", "-c", "flush", primary.uri("vol0"))
            done.set()

        t = threading.Thread(target=write)
        t.start()
        assert done.wait(30), "a write through the primary stalled while the standby was unreachable"
        t.join()
        oos = primary.metrics().find("standby_out_of_sync_bytes", volume="vol0")
        assert oos is not None and oos >= 4 * MiB, f"out-of-sync bytes {oos} do not cover the 4 MiB written"
        assert primary.metrics().find("standby_replication_connected", volume="vol0") == 0
        proxy.restore()
        assert_in_sync(standby, primary)
    finally:
        proxy.close()


def test_divergent_histories_are_refused_until_taken_over_and_the_standby_data_discarded(
    daemons: Daemons, tmp_path: Path
) -> None:
    standby, a = mirrored_pair(daemons, tmp_path, folder="a", pattern=0x0A)
    a_vol = a.volumes["vol0"]
    assert a.daemon.stop() == 0
    # Another primary with its own history of vol0 (another file, never mirrored to this standby).
    b_vol = tmp_path / "b" / "vol0.img"
    b_vol.parent.mkdir()
    with open(b_vol, "wb") as f:
        f.truncate(VOLUME_SIZE)
        f.write(rand(MiB, seed=4))
    b = daemons._start(
        "primary-b",
        [
            *daemons_console_primary(), "--volume", f"vol0={b_vol}", "--standby", standby.grpc,
            "--nbd-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--connect-timeout", "2",
        ],
    )  # fmt: skip
    # The volume belongs to primary a: b is refused, naming the operator's act that hands it over.
    refused = b.wait_for("mirror_disconnected", timeout=30)
    assert "standbyctl takeover vol0" in refused["error"], refused
    assert sha(standby.replica("vol0")) == sha(a_vol), "a refused primary changed the standby's data"
    assert b.stop() == 0
    standby.ctl("takeover", "vol0")
    # Released, the volume still holds a's history: b's is another one, a split brain.
    b = daemons.primary(standby, {"vol0": f"{b_vol}"}, in_sync=False)
    refused = b.daemon.wait_for("mirror_disconnected", timeout=30)
    assert "split brain" in refused["error"] and "--discard-standby-data" in refused["error"], refused
    assert sha(standby.replica("vol0")) == sha(a_vol), "a refused primary changed the standby's data"
    assert b.daemon.stop() == 0
    again = daemons.primary(standby, {"vol0": f"{b_vol}"}, "--discard-standby-data")
    assert_in_sync(standby, again)
    assert sha(standby.replica("vol0")) == sha(b_vol)


def marked_bytes(bitmap: Path) -> int:
    """Bytes of the regions set in a primary's write-intent bitmap file (layout: primary/bitmap.py, a
    4 KiB header whose JSON, after 16 bytes, holds the granularity; then one bit per region)."""
    data = bitmap.read_bytes()
    (n,) = struct.unpack_from("<I", data, 12)
    granularity: int = json.loads(data[16 : 16 + n])["granularity"]
    return sum(bin(b).count("1") for b in data[4096:]) * granularity


def daemons_console_primary() -> list[str]:
    from e2e_support import PRIMARY_CMD, _console

    return _console(*PRIMARY_CMD)


def test_defer_policy_keeps_the_snapshot_and_catches_up_when_it_is_deleted(
    daemons: Daemons, tmp_path: Path
) -> None:
    need("nbdcopy")
    standby, primary = mirrored_pair(
        daemons, tmp_path, "--ack-timeout", "3", standby_extra=("--on-full", "defer"), written="4M"
    )
    vol = primary.volumes["vol0"]
    expected = tmp_path / "frozen.img"
    shutil.copyfile(vol, expected)
    standby.snapshot("vol0", "held", "--capacity", "256KiB")  # 64 blocks
    # 2 MiB of overwrites would need 512 preserved blocks: the standby holds them back instead.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 2M", "-c", "flush", primary.uri("vol0"), timeout=60)
    deadline = time.monotonic() + 30
    while standby.status()["volumes"][0]["state"] != "deferred":
        assert time.monotonic() < deadline, f"the volume never showed deferred: {standby.status()}"
        time.sleep(0.2)
    snap = {s["name"]: s for s in standby.snapshots("vol0")}["held"]
    assert snap["valid"], f"the snapshot was invalidated although the policy is defer: {snap}"
    assert_snapshot(standby, "held", expected, tmp_path)
    oos = primary.metrics().find("standby_out_of_sync_bytes", volume="vol0") or 0
    # The batches that fitted in the snapshot's room were applied; the rest is tracked by the primary.
    assert oos > 0, f"the primary does not track the held-back writes: {oos}"
    standby.ctl("snapshot", "delete", "vol0", "held")
    assert_in_sync(standby, primary)


def test_replication_lag_grows_while_the_link_is_down_and_returns_to_zero(
    daemons: Daemons, tmp_path: Path
) -> None:
    need("qemu-io")
    standby, primary, proxy = start_pair(daemons, tmp_path)
    try:
        assert standby.metrics().get("standby_replication_lag_seconds", volume="vol0") == 0
        proxy.cut()
        wait_for(
            lambda: standby.metrics().get("standby_replication_lag_seconds", volume="vol0") >= 2,
            "a lag of 2 s reported",
        )
        lag = standby.metrics().get("standby_replication_lag_seconds", volume="vol0")
        assert 2 <= lag < 60, lag
        proxy.restore()
        assert_in_sync(standby, primary)
        assert standby.metrics().get("standby_replication_lag_seconds", volume="vol0") == 0
    finally:
        proxy.close()

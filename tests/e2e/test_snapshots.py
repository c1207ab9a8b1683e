"""Snapshots as a backup node sees them: frozen images exported as VOLUME@SNAPSHOT, read with qemu-img,
nbdcopy, nbdinfo and fio, while writes go on through the primary."""

from __future__ import annotations

import json
import re

import pytest
from e2e_support import BS, VOLUME_SIZE, Appliance, Daemons, MiB, Model, Writer, need, qemu_io, rand, run

pytestmark = pytest.mark.timeout(180)


def populate(a: Appliance) -> None:
    """Data in the first 2 MiB and at 10 MiB; the rest of the volume never written (holes)."""
    a.writer.write(0, rand(2 * MiB, seed=1))
    a.writer.write(10 * MiB, rand(MiB, seed=2))


def test_snapshot_stays_frozen_while_writes_continue(appliance: Appliance) -> None:
    need("qemu-img", "nbdcopy", "fio")
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "frozen")
    frozen = a.model.freeze()
    expected = a.model.save(a.tmp / "expected.img", frozen)

    # keep writing: overwrites of snapshot data, partial blocks, new regions, zeroes, a whole-image copy-in
    a.writer.write(0, rand(MiB, seed=3))
    a.writer.write(10 * MiB + 100, rand(5000, seed=4))
    a.writer.fill(20 * MiB, 3 * MiB, 0x77)
    qemu_io(a.primary.uri("vol0"), "write -z -u 1M 512k")
    a.model.zero(MiB, 512 * 1024)
    later = a.tmp / "later.img"
    later.write_bytes(rand(VOLUME_SIZE, seed=5))
    run("nbdcopy", later, a.primary.uri("vol0"))
    a.model.write(0, later.read_bytes())

    uri = a.standby.uri(f"vol0@{name}")
    # the backup node's view: every client reads exactly the image of snapshot time
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, uri)
    assert a.read_export(uri, connections=4) == frozen, "nbdcopy (4 connections) of the snapshot differs"
    converted = a.tmp / "converted.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, converted)
    assert converted.read_bytes() == frozen, "qemu-img convert of the snapshot differs"
    # while the origin moved on
    assert a.standby.replica("vol0").read_bytes() == a.model.freeze(), "replica does not hold the new writes"


def test_qemu_img_info_and_map_show_the_size_and_the_holes(appliance: Appliance) -> None:
    need("qemu-img")
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "mapped")
    # after the snapshot: data on the origin; the snapshot reads zeroes there (it may report them as a
    # hole or, served from a preserved copy, as data)
    a.writer.fill(20 * MiB, MiB, 0x33)
    uri = a.standby.uri(f"vol0@{name}")

    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == VOLUME_SIZE, info

    extents = json.loads(run("qemu-img", "map", "-f", "raw", "--output=json", uri).stdout)
    assert sum(e["length"] for e in extents) == VOLUME_SIZE
    data = [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]

    def covered(lo: int, hi: int) -> bool:
        return (
            any(s <= lo and hi <= e for s, e in data)
            or sum(min(e, hi) - max(s, lo) for s, e in data if s < hi and e > lo) == hi - lo
        )

    assert covered(0, 2 * MiB) and covered(10 * MiB, 11 * MiB), f"written data not mapped as data: {extents}"
    holes = sum(e["length"] for e in extents if not e["data"])
    assert holes >= VOLUME_SIZE - 4 * MiB - 64 * 1024, f"the never-written regions are not holes: {extents}"
    for lo, hi in ((4 * MiB, 9 * MiB), (12 * MiB, 19 * MiB), (24 * MiB, VOLUME_SIZE)):
        assert not any(s < hi and e > lo for s, e in data), f"[{lo}, {hi}) should be a hole: {extents}"


def test_nbdinfo_lists_snapshot_exports_maps_holes_and_shows_read_only(appliance: Appliance) -> None:
    need("nbdinfo")
    a = appliance
    populate(a)
    a.standby.snapshot("vol0", "s1")
    a.standby.snapshot("vol0", "s2", "--writable")

    listing = run("nbdinfo", "--list", a.standby.uri()).stdout
    exports = re.findall(r'^export="([^"]*)"', listing, re.M)
    assert {"vol0@s1", "vol0@s2"} <= set(exports), f"nbdinfo --list shows {exports}:\n{listing}"

    s1 = json.loads(run("nbdinfo", "--json", a.standby.uri("vol0@s1")).stdout)["exports"][0]
    s2 = json.loads(run("nbdinfo", "--json", a.standby.uri("vol0@s2")).stdout)["exports"][0]
    assert s1["export-size"] == s2["export-size"] == VOLUME_SIZE
    assert s1["is_read_only"] is True, f"a snapshot export is read-only: {s1}"
    assert s2["is_read_only"] is False, f"a --writable snapshot export is writable: {s2}"
    assert "base:allocation" in s1["contexts"], s1

    out = run("nbdinfo", "--map", a.standby.uri("vol0@s1")).stdout
    rows = [line.split(None, 3) for line in out.splitlines() if line.strip()]
    spans = [(int(o), int(n), d) for o, n, _t, d in rows]
    assert sum(n for _o, n, _d in spans) == VOLUME_SIZE, out
    hole_bytes = sum(n for _o, n, d in spans if "hole" in d)
    assert hole_bytes >= VOLUME_SIZE - 3 * MiB - 64 * 1024, f"nbdinfo --map shows too few holes:\n{out}"
    assert any(o <= 0 and "hole" not in d for o, _n, d in spans), f"offset 0 holds data:\n{out}"


def test_read_only_snapshot_refuses_a_write_and_keeps_its_data(appliance: Appliance) -> None:
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "ro")
    frozen = a.model.freeze()
    uri = a.standby.uri(f"vol0@{name}")

    cp = qemu_io(uri, "write -P 0xee 0 64k", check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0 or "failed" in out, f"a write to a read-only snapshot succeeded:\n{out}"
    assert re.search(r"read.only|not permitted|permission denied|EPERM|EROFS", out, re.I), (
        f"no read-only error shown:\n{out}"
    )
    assert a.read_export(uri) == frozen, "the refused write changed the snapshot"
    assert a.standby.replica("vol0").read_bytes() == frozen, "the refused write changed the replica"


def test_writable_snapshot_accepts_writes_that_do_not_touch_the_origin(appliance: Appliance) -> None:
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "scratch", "--writable")
    origin = a.model.freeze()
    uri = a.standby.uri(f"vol0@{name}")

    snap = Model(VOLUME_SIZE)
    snap.write(0, origin)
    w = Writer(uri, snap, a.tmp / "scratch")
    w.write(4096, rand(3 * BS, seed=9))  # over snapshot data
    w.fill(15 * MiB, 256 * 1024, 0xC3)  # over a hole
    w.write(10 * MiB + 10, rand(100, seed=10))  # partial block
    w.flush()

    assert a.read_export(uri) == snap.freeze(), "the writable snapshot does not read back its writes"
    assert a.standby.replica("vol0").read_bytes() == origin, "a snapshot write reached the origin replica"
    assert a.volume_path.read_bytes() == origin, "a snapshot write reached the primary"
    # replication goes on untouched and the snapshot keeps its own data
    a.writer.fill(4096, BS, 0x01)
    assert a.standby.replica("vol0").read_bytes() == a.model.freeze()
    assert a.read_export(uri) == snap.freeze(), "an origin write after the snapshot's writes leaked into it"


def test_fio_random_reads_at_depth_64_times_4_jobs_on_a_snapshot(appliance: Appliance) -> None:
    need("fio")
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "fio")
    a.writer.fill(0, MiB, 0x42)  # preserved blocks are read too
    out = a.tmp / "fio.json"
    run(
        "fio", "--name=randread", "--ioengine=nbd", f"--uri={a.standby.uri(f'vol0@{name}')}",
        "--rw=randread", "--bs=4k", "--iodepth=64", "--numjobs=4", "--size=32M", "--io_size=4M",
        "--readonly", "--group_reporting=0", "--output-format=json", f"--output={out}",
    )  # fmt: skip
    jobs = json.loads(out.read_text())["jobs"]
    assert len(jobs) == 4
    for job in jobs:
        assert job["error"] == 0, f"fio job {job['jobname']} error {job['error']}"
        assert job["read"]["io_bytes"] == 4 * MiB, f"fio read {job['read']['io_bytes']} bytes"


def test_restart_of_the_standby_keeps_snapshots_and_their_contents(
    appliance: Appliance, daemons: Daemons
) -> None:
    need("qemu-img")
    a = appliance
    populate(a)
    s1 = a.standby.snapshot("vol0", "before")
    frozen1 = a.model.freeze()
    a.writer.write(0, rand(MiB, seed=11))
    s2 = a.standby.snapshot("vol0", "middle", "--writable")
    frozen2 = a.model.freeze()
    a.writer.fill(10 * MiB, 2 * MiB, 0x99)
    listed = {s["name"]: s for s in a.standby.snapshots("vol0")}

    assert a.primary.daemon.stop() == 0, "primary did not exit 0 on SIGTERM"
    assert a.standby.daemon.stop() == 0, "standby did not exit 0 on SIGTERM"
    standby = daemons.standby(a.standby.data_dir)
    assert standby.grpc != "" and standby.nbd != ""

    again = {s["name"]: s for s in standby.snapshots("vol0")}
    assert set(again) == {s1, s2}, f"snapshots after restart: {sorted(again)}"
    for n in (s1, s2):
        for key in ("volume", "name", "valid", "writable", "created", "preserved_bytes", "export"):
            assert again[n][key] == listed[n][key], (
                f"{n}.{key} changed over the restart: {listed[n]} -> {again[n]}"
            )
    assert a.read_export(standby.uri(f"vol0@{s1}")) == frozen1, "snapshot 'before' changed over the restart"
    assert a.read_export(standby.uri(f"vol0@{s2}")) == frozen2, "snapshot 'middle' changed over the restart"
    assert standby.replica("vol0").read_bytes() == a.model.freeze(), "replica changed over the restart"


def test_clean_restart_of_both_daemons_resumes_replication(appliance: Appliance, daemons: Daemons) -> None:
    a = appliance
    populate(a)
    s1 = a.standby.snapshot("vol0", "kept")
    frozen = a.model.freeze()
    a.writer.fill(0, MiB, 0x21)

    assert a.primary.daemon.stop() == 0
    assert a.standby.daemon.stop() == 0
    standby = daemons.standby(a.standby.data_dir)
    primary = daemons.primary(
        standby, {"vol0": f"{a.volume_path},size=32MiB,block-size=4096"}, "--mode", "sync"
    )
    status = standby.status()
    vol = next(v for v in status["volumes"] if v["name"] == "vol0")
    assert vol["connected"] is True and vol["state"] == "uptodate", vol

    w = Writer(primary.uri("vol0"), a.model, a.tmp / "scratch")
    w.write(MiB - 2048, rand(8192, seed=12))
    w.fill(30 * MiB, MiB, 0x5C)
    assert standby.replica("vol0").read_bytes() == a.model.freeze(), "replication did not resume"
    assert a.read_export(standby.uri(f"vol0@{s1}")) == frozen, "the snapshot moved after the restart"

"""Writes through the primary's export reach the primary's file and the standby's replica, in sync mode:
written with qemu-io, nbdcopy and fio's nbd engine; trims and write-zeroes keep the replica sparse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from blockfiles import data_extents
from e2e_support import (
    BS,
    VOLUME_SIZE,
    Appliance,
    Daemons,
    MiB,
    Model,
    Writer,
    assert_image,
    need,
    qemu_io,
    rand,
    run,
)

pytestmark = [pytest.mark.timeout(180), pytest.mark.both_transports]


def test_qemu_io_writes_are_on_the_replica_as_soon_as_they_are_answered(appliance: Appliance) -> None:
    a = appliance
    replica = a.standby.replica("vol0")
    assert replica.exists(), "the replica file is created at the first handshake"
    assert replica.stat().st_size == VOLUME_SIZE, "the replica has the volume's size"

    a.writer.fill(0, MiB, 0x5A)
    # sync mode: the write was answered after the standby applied it, so no waiting and no flush here
    assert replica.read_bytes()[:MiB] == b"\x5a" * MiB, "an answered write is not on the replica"

    a.writer.write(5 * MiB + 512, rand(3 * BS + 100, seed=1))  # unaligned at both ends
    a.writer.write(VOLUME_SIZE - BS, rand(BS, seed=2))  # the last block
    a.writer.many([(off, rand(BS, seed=10 + i)) for i, off in enumerate(range(8 * MiB, 9 * MiB, 64 * 1024))])
    a.writer.fill(8 * MiB + 4096, 2 * BS, 0x11)  # overwrites data written just before: order matters

    assert_image(a.volume_path, a.model.freeze(), "primary volume file")
    assert_image(replica, a.model.freeze(), "replica")
    # and the export itself reads back what was written
    assert a.read_export(a.primary.uri("vol0")) == a.model.freeze()


def test_nbdcopy_copies_an_image_in_and_the_replica_equals_it(appliance: Appliance) -> None:
    need("nbdcopy", "qemu-img")
    a = appliance
    image = a.tmp / "source.img"
    with open(image, "wb") as f:  # data, holes and a zero-filled run
        f.truncate(VOLUME_SIZE)
        for i, off in enumerate((0, 3 * MiB, 3 * MiB + 64 * 1024, 17 * MiB, VOLUME_SIZE - 2 * MiB)):
            f.seek(off)
            f.write(rand(MiB if i != 2 else 12 * 1024, seed=100 + i))
        f.seek(20 * MiB)
        f.write(bytes(MiB))
    want = image.read_bytes()

    run("nbdcopy", "--connections=4", "--flush", image, a.primary.uri("vol0"))

    assert_image(a.volume_path, want, "primary volume file")
    assert_image(a.standby.replica("vol0"), want, "replica")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", image, a.primary.uri("vol0"))


def test_fio_nbd_engine_random_writes_verify_and_reach_the_replica(appliance: Appliance) -> None:
    need("fio")
    engines = run("fio", "--enghelp").stdout
    assert "nbd" in engines.split(), f"fio lacks the nbd engine:\n{engines}"
    a = appliance
    out = a.tmp / "fio.json"
    run(
        "fio", "--name=randwrite", "--ioengine=nbd", f"--uri={a.primary.uri('vol0')}",
        "--rw=randwrite", "--bsrange=4k-64k", "--bs_unaligned=0", "--size=8M", "--offset=4M",
        "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=7",
        "--verify_state_save=0",
        "--output-format=json", f"--output={out}",
    )  # fmt: skip
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0, f"fio reported error {job['error']}"
    assert job["write"]["io_bytes"] >= 8 * MiB, f"fio wrote {job['write']['io_bytes']} bytes"
    # fio chose the data: the primary's file is the reference, the replica must equal it
    primary = a.volume_path.read_bytes()
    assert primary[4 * MiB : 12 * MiB].count(0) < 4 * MiB, "fio's writes are not in the primary's file"
    assert_image(a.standby.replica("vol0"), primary, "replica (vs the primary's file after fio)")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_trim_and_write_zeroes_keep_the_replica_sparse(appliance: Appliance) -> None:
    a = appliance
    replica = a.standby.replica("vol0")
    base = allocated(replica)
    a.writer.write(0, rand(4 * MiB, seed=3))
    a.writer.write(16 * MiB, rand(2 * MiB, seed=4))
    grown = allocated(replica)
    assert grown >= base + 6 * MiB, f"6 MiB of data written, replica allocation went {base} -> {grown}"

    # trim (NBD_CMD_TRIM) of the first 4 MiB; write-zeroes that may unmap (no NBD_CMD_FLAG_NO_HOLE) of the
    # other 2 MiB and of a region never written
    qemu_io(a.primary.uri("vol0"), "discard 0 4M", "write -z -u 16M 2M", "write -z -u 24M 4M", "flush")
    a.model.zero(16 * MiB, 2 * MiB)
    a.model.zero(24 * MiB, 4 * MiB)
    # a trimmed range reads as unspecified data per the NBD spec: the replica must equal the primary there
    primary = a.volume_path.read_bytes()
    a.model.write(0, primary[: 4 * MiB])

    assert_image(a.volume_path, a.model.freeze(), "primary volume file")
    assert_image(replica, primary, "replica (vs the primary's file)")
    after = allocated(replica)
    assert after <= base + 64 * 1024, (
        f"replica not sparse after trim/write-zeroes: {after} bytes allocated "
        f"(before the writes {base}, after them {grown}); data extents {data_extents(replica)}"
    )
    for start, end in data_extents(replica):
        assert not (start < 4 * MiB or 16 * MiB <= start < 18 * MiB or 24 * MiB <= start < 28 * MiB), (
            f"replica has a data extent [{start}, {end}) in a trimmed/zeroed region"
        )


def test_two_volumes_with_their_own_block_sizes_replicate_independently(
    daemons: Daemons, tmp_path: Path
) -> None:
    standby = daemons.standby()
    pdir = tmp_path / "primary"
    pdir.mkdir()
    primary = daemons.primary(
        standby,
        {
            "vol0": f"{pdir / 'vol0.img'},size=32MiB",
            "vol1": f"{pdir / 'vol1.img'},size=16MiB,block-size=64KiB",
        },
    )
    # ready means every volume completed its handshake: both replicas exist with their sizes
    assert standby.replica("vol0").stat().st_size == 32 * MiB
    assert standby.replica("vol1").stat().st_size == 16 * MiB
    vols = {v["name"]: v for v in standby.status()["volumes"]}
    assert (vols["vol0"]["block_size"], vols["vol1"]["block_size"]) == (4096, 64 * 1024), vols
    assert vols["vol0"]["connected"] and vols["vol1"]["connected"], vols

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    m0, m1 = Model(32 * MiB), Model(16 * MiB)
    w0, w1 = Writer(primary.uri("vol0"), m0, scratch), Writer(primary.uri("vol1"), m1, scratch)
    w0.write(0, rand(MiB, seed=1))
    w1.write(4096, rand(MiB, seed=2))
    s1 = standby.snapshot("vol1", "v1snap")
    frozen1 = m1.freeze()
    w1.write(8192, rand(100_000, seed=3))  # partial 64 KiB blocks, preserved whole
    w0.fill(0, MiB, 0x0F)

    assert_image(standby.replica("vol0"), m0.freeze(), "replica of vol0")
    assert_image(standby.replica("vol1"), m1.freeze(), "replica of vol1")
    assert_image(pdir / "vol1.img", m1.freeze(), "primary file of vol1")
    need("nbdcopy")
    out = tmp_path / "v1snap.img"
    run("nbdcopy", standby.uri(f"vol1@{s1}"), out)
    assert out.read_bytes() == frozen1, "the snapshot of vol1 moved"
    assert [s["name"] for s in standby.snapshots("vol0")] == [], "a snapshot of vol1 showed up under vol0"


def test_batches_travel_on_the_transport_asked_for(appliance: Appliance, transport: str | None) -> None:
    """`--transport channel` uses the standby's data channel, `grpc` the Mirror stream; the default
    (auto) takes the data channel this standby offers."""
    connected = appliance.primary.daemon.wait_for("mirror_connected")
    assert connected["transport"] == (transport or "channel"), connected
    opened = [e for e in appliance.standby.daemon.events if e.get("event") == "data_channel_opened"]
    assert bool(opened) == (connected["transport"] == "channel"), opened

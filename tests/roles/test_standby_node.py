"""The standby node in process: handshake, ordered apply and its validation, snapshots, restart."""

from __future__ import annotations

import os

import pytest
from standby_rig import replica_digest

from standby.node import SplitBrain, StandbyNode, parse_capacity
from standbylib.errors import (
    InvalidArgument,
    InvalidBlockSize,
    OutOfRange,
    ReplicaInconsistent,
    SnapshotExists,
    StandbyError,
    UnknownSnapshot,
    UnknownVolume,
    VolumeMismatch,
)

MiB = 1 << 20


def test_first_handshake_creates_a_sparse_replica_and_the_second_finds_it(node):
    replica, created, full = node.handshake("vol0", 16 * MiB, 4096)
    assert created and full
    st = os.stat(node.replica_path("vol0"))
    assert st.st_size == 16 * MiB and st.st_blocks == 0
    again, created, full = node.handshake("vol0", 16 * MiB, 4096)
    assert again is replica and not created and full  # it never completed a sync yet


@pytest.mark.parametrize(
    ("size", "block_size", "error"),
    [(16 * MiB, 8192, VolumeMismatch), (32 * MiB, 4096, VolumeMismatch), (16 * MiB, 1000, InvalidBlockSize)],
)
def test_handshake_refuses_a_different_geometry(node, size, block_size, error):
    node.handshake("vol0", 16 * MiB, 4096)
    with pytest.raises(error):
        node.handshake("vol0", size, block_size)


@pytest.mark.parametrize("name", ["", "a/b", "vol@1", "-x", "x" * 200])
def test_handshake_refuses_bad_volume_names(node, name):
    with pytest.raises(InvalidArgument):
        node.handshake(name, MiB, 4096)
    assert not os.listdir(os.path.join(node.data_dir, "replicas"))


def test_batches_apply_in_order_and_a_duplicate_is_skipped(node):
    replica, _, _ = node.handshake("vol0", MiB, 4096)
    node.open_stream("vol0", "p1", 1)
    assert node.apply(replica, 1, [(0, b"a" * 4096)], False)
    assert node.apply(replica, 2, [(4096, b"b" * 8192), (0, 4096)], True)
    assert not node.apply(replica, 2, [(0, b"z" * 4096)], False)  # already applied on this stream
    assert replica.volume.read(0, 12288) == bytes(4096) + b"b" * 8192
    assert replica.applied_batches == 2 and replica.applied_bytes == 4096 + 8192 + 4096
    # A new stream numbers afresh (whatever the old one lost comes back through the bitmap's resync).
    node.close_stream(replica)
    node.open_stream("vol0", "p1", 900)
    assert node.apply(replica, 900, [(0, b"c" * 4096)], False)


def test_a_gap_in_the_sequence_is_refused(node):
    replica, _, _ = node.handshake("vol0", MiB, 4096)
    node.open_stream("vol0", "p1", 1)
    with pytest.raises(InvalidArgument, match="batch 3 arrived, 1 expected"):
        node.apply(replica, 3, [(0, b"a" * 4096)], False)


@pytest.mark.parametrize(
    ("ops", "error"),
    [
        ([(0, b"a" * 4096), (100, b"b" * 4096)], InvalidArgument),  # misaligned offset
        ([(0, b"a" * 4096), (4096, b"b" * 100)], InvalidArgument),  # partial block
        ([(0, b"a" * 4096), (MiB, b"b" * 4096)], OutOfRange),  # past the end
        ([(0, b"a" * 4096), (MiB - 4096, 8192)], OutOfRange),  # zeroed range past the end
        ([(0, b"a" * 4096), (0, b"")], InvalidArgument),  # empty write
    ],
)
def test_a_bad_write_refuses_the_whole_batch(node, ops, error):
    replica, _, _ = node.handshake("vol0", MiB, 4096)
    node.open_stream("vol0", "p1", 1)
    node.apply(replica, 1, [(0, b"x" * 8192)], True)
    before = replica_digest(node)
    with pytest.raises(error):
        node.apply(replica, 2, ops, False)
    assert replica_digest(node) == before
    assert replica.applied_sequence == 1
    # The next good batch still applies.
    assert node.apply(replica, 2, [(0, b"y" * 4096)], False)


def test_one_stream_per_volume(node):
    node.handshake("vol0", MiB, 4096)
    node.open_stream("vol0", "p1", 1)
    with pytest.raises(StandbyError, match="already being mirrored"):
        node.open_stream("vol0", "p2", 1)


def test_another_primary_cannot_handshake_a_volume_held_by_a_live_primary_whatever_its_flags(node):
    replica, _, _ = node.handshake("vol0", MiB, 4096, primary_id="p1")
    node.open_stream("vol0", "p1", 1, resync=True, generation="g1")
    node.apply(replica, 1, [(0, b"1" * 4096)], False, uptodate=True)
    assert replica.state == "uptodate"
    for flags in ({}, {"discard": True}, {"generation": "g9", "discard": True}):
        with pytest.raises(StandbyError, match="already being mirrored by primary p1"):
            node.handshake("vol0", MiB, 4096, primary_id="p2", **flags)
        assert replica.state == "uptodate" and replica.generation == "g1", flags
    node.create_snapshot("vol0", "still-allowed")  # the live replica was not flipped to inconsistent
    # The holder itself may handshake again (a reconnect before its old stream was seen to end).
    _, _, full = node.handshake("vol0", MiB, 4096, primary_id="p1", generation="g1")
    assert not full


def test_snapshots_freeze_the_replica_and_survive_a_restart(tmp_path):
    data = str(tmp_path / "data")
    node = StandbyNode(data, capacity="64MiB")
    replica, _, _ = node.handshake("vol0", MiB, 4096)
    node.open_stream("vol0", "p1", 1, resync=True, generation="g1")
    with pytest.raises(ReplicaInconsistent):  # the initial sync has not completed
        node.create_snapshot("vol0", "s0")
    node.apply(replica, 1, [(0, b"1" * 65536)], False, uptodate=True)
    info = node.create_snapshot("vol0", "s1")
    assert (info.name, info.valid, info.preserved_bytes) == ("s1", True, 0)
    auto = node.create_snapshot("vol0", None)
    assert auto.name.startswith("snap-")
    node.apply(replica, 2, [(0, b"2" * 8192), (65536, b"3" * 4096)], False)
    assert node.export("vol0@s1").read(0, 65536) == b"1" * 65536
    # Two data blocks copied; the block at 64 KiB was a hole: a hole entry, no data, no space.
    assert [i.preserved_bytes for i in node.snapshots("vol0")] == [2 * 4096, 2 * 4096]
    assert [i.hole_blocks for i in node.snapshots("vol0")] == [1, 1]
    with pytest.raises(SnapshotExists):
        node.create_snapshot("vol0", "s1")
    with pytest.raises(UnknownVolume):
        node.create_snapshot("nope", "s1")
    node.close_stream(replica)
    node.close()

    node = StandbyNode(data, capacity="64MiB")
    try:
        assert node.export_names() == ["vol0@s1", f"vol0@{auto.name}"] or sorted(
            node.export_names()
        ) == sorted(["vol0@s1", f"vol0@{auto.name}"])
        assert node.export("vol0@s1").read(0, 65536) == b"1" * 65536
        assert node.replica("vol0").volume.read(0, 8192) == b"2" * 8192
        node.delete_snapshot("vol0", "s1")
        assert node.export("vol0@s1") is None
        with pytest.raises(UnknownSnapshot):
            node.delete_snapshot("vol0", "s1")
    finally:
        node.close()


def test_a_missing_replica_is_a_clear_error(tmp_path):
    data = str(tmp_path / "data")
    node = StandbyNode(data, capacity="64MiB")
    node.handshake("vol0", MiB, 4096)
    node.close()
    os.unlink(os.path.join(data, "replicas", "vol0.img"))
    with pytest.raises(StandbyError, match=r"replica .* is missing"):
        StandbyNode(data, capacity="64MiB")


def test_capacity_percentages_are_of_the_data_filesystem(tmp_path):
    st = os.statvfs(tmp_path)
    assert parse_capacity("10%", str(tmp_path)) == max(MiB, int(st.f_blocks * st.f_frsize * 0.1))
    assert parse_capacity("2GiB", str(tmp_path)) == 2 << 30
    for bad in ("0%", "150%", "x%", "0", "lots"):
        with pytest.raises(InvalidArgument):
            parse_capacity(bad, str(tmp_path))


def complete_sync(node, generation):
    replica = node.replica("vol0")
    node.open_stream("vol0", "p1", 1, resync=True, generation=generation)
    node.apply(replica, 1, [(0, b"g" * 4096)], False, uptodate=True)
    node.close_stream(replica)
    return replica


def test_a_replica_holding_the_primarys_previous_generation_is_older_not_diverged(node):
    """The standby completed a resync (generation g2) but the link broke before the primary read the
    acknowledgement: the primary, which moved on to g3 with g2 as its previous generation and g1 as its
    base, must be taken back with a bitmap resync, not refused as a split brain."""
    node.handshake("vol0", MiB, 4096, generation="g1")
    complete_sync(node, "g1")
    node.handshake("vol0", MiB, 4096, generation="g2", base_generation="g1")
    replica = complete_sync(node, "g2")
    assert replica.generation == "g2"
    with pytest.raises(SplitBrain):  # what an older primary, which does not send it, ran into
        node.handshake("vol0", MiB, 4096, generation="g3", base_generation="g1")
    accepted = node.handshake(
        "vol0", MiB, 4096, generation="g3", base_generation="g1", previous_generation="g2"
    )
    assert accepted[2] is False and replica.generation == "g2"
    with pytest.raises(SplitBrain):  # a previous generation the replica does not hold proves nothing
        node.handshake("vol0", MiB, 4096, generation="x3", base_generation="x1", previous_generation="x2")


def test_generations_tell_older_from_diverged(node):
    node.handshake("vol0", MiB, 4096, generation="g1")
    replica = complete_sync(node, "g1")
    assert (replica.generation, replica.status) == ("g1", "uptodate")
    # In sync, or older (the standby holds the primary's base): accepted, no full sync.
    assert node.handshake("vol0", MiB, 4096, generation="g1")[2] is False
    assert node.handshake("vol0", MiB, 4096, generation="g2", base_generation="g1")[2] is False
    # A history the primary does not know: split brain, refused with the way out.
    with pytest.raises(SplitBrain, match="--discard-standby-data") as err:
        node.handshake("vol0", MiB, 4096, generation="x2", base_generation="x1")
    assert "g1" in str(err.value)
    assert replica.generation == "g1"  # nothing changed
    # Discarding: a full sync, the replica inconsistent and of no generation until it completes.
    assert node.handshake("vol0", MiB, 4096, generation="x2", base_generation="x1", discard=True)[2] is True
    assert (replica.generation, replica.status) == ("", "inconsistent")
    complete_sync(node, "x2")
    assert (replica.generation, replica.status) == ("x2", "uptodate")


def test_the_generation_survives_a_restart(tmp_path):
    data = str(tmp_path / "data")
    node = StandbyNode(data, capacity="64MiB")
    node.handshake("vol0", MiB, 4096, generation="g1")
    complete_sync(node, "g1")
    node.close()
    node = StandbyNode(data, capacity="64MiB")
    try:
        assert node.replica("vol0").generation == "g1"
        with pytest.raises(SplitBrain):
            node.handshake("vol0", MiB, 4096, generation="other")
    finally:
        node.close()


def test_a_save_while_starting_keeps_the_state_of_the_volumes_not_opened_yet(tmp_path):
    """At start a replica changed outside the daemon is saved inconsistent at once; the volumes the node
    has not opened yet keep what state.json said of them (here: inconsistent), through the next start."""
    data = str(tmp_path / "data")
    node = StandbyNode(data, capacity="64MiB")
    node.handshake("a", MiB, 4096, generation="g1")
    complete_sync_of(node, "a", "g1")
    node.handshake("b", MiB, 4096, generation="g1")
    node.open_stream("b", "p1", 1, resync=True, generation="g2")  # b is resyncing: inconsistent
    node.close_stream(node.replica("b"))
    assert node.replica("b").state == "inconsistent"
    node.close()
    with open(os.path.join(data, "replicas", "a.img"), "r+b") as f:  # changed while the daemon is down
        f.write(b"x" * 4096)
    for _ in range(2):  # the start that notices, and the one after it
        node = StandbyNode(data, capacity="64MiB")
        try:
            assert node.replica("a").state == "inconsistent"
            assert node.replica("b").state == "inconsistent", "b's state was lost by a's save"
        finally:
            node.close()


def complete_sync_of(node, volume, generation):
    replica = node.replica(volume)
    node.open_stream(volume, "p1", 1, resync=True, generation=generation)
    node.apply(replica, 1, [(0, b"g" * 4096)], False, uptodate=True)
    node.close_stream(replica)
    return replica

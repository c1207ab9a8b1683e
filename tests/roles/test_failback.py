"""Point-in-time promotion (rollback), demotion and the failback's tracked blocks, on the standby node."""

from __future__ import annotations

import random

import pytest
from standby_rig import synced

from standby.failover import TakeoverRefused
from standby.node import (
    DemoteRefused,
    FailbackRefused,
    PromoteRefused,
    SplitBrain,
    StandbyNode,
    TakeoverRequired,
)
from standby.tracker import ChangeTracker
from standbylib.checksums import block_digests
from standbylib.errors import NotFound, ReadOnly

MiB = 1 << 20
BS = 4096


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def apply(node: StandbyNode, writes: list[tuple[int, bytes]], sequence: int = 1) -> None:
    """A primary's stream at generation g1 applying `writes` (the replica stays up to date)."""
    replica = node.replica("vol0")
    node.handshake("vol0", 4 * MiB, BS, generation="g1")
    node.open_stream("vol0", "p1", sequence)
    try:
        node.apply(replica, sequence, writes, True)
    finally:
        node.close_stream(replica)


def pulled(node: StandbyNode, generation: str, regions=()) -> dict[int, bytes]:
    """What the failback sends, block by block (zeros as zero bytes)."""
    out: dict[int, bytes] = {}
    for offset, length, data in node.failback_blocks("vol0", generation, list(regions)):
        data = data if data is not None else bytes(length)
        for i in range(0, length, BS):
            out[offset + i] = data[i : i + BS]
    return out


def test_promote_at_rolls_back_keeps_the_damage_and_other_snapshots_and_survives_a_restart(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    good = pattern(64 * BS, 1)
    synced(node, good)
    node.create_snapshot("vol0", "before")
    damage = [(i * BS, pattern(BS, 100 + i)) for i in range(0, 64, 4)]  # 16 blocks overwritten
    apply(node, damage)
    node.create_snapshot("vol0", "after")
    apply(node, [(70 * BS, pattern(BS, 7))], sequence=2)  # written after "after", before the promotion
    damaged = node.replica("vol0").volume.read(0, 128 * BS)

    replica = node.promote("vol0", at="before")
    assert replica.status == "promoted" and replica.rolled_back_to == "before"
    kept = replica.kept_snapshot
    assert kept.startswith("before-rollback-")
    export = node.export("vol0")
    assert export.read(0, 128 * BS) == good + bytes(64 * BS)  # as at "before"
    assert node.snapshot("vol0", kept).read(0, 128 * BS) == damaged  # the damage, kept
    assert node.snapshot("vol0", "after").read(0, 64 * BS) != good  # the other snapshots unchanged
    assert node.snapshot("vol0", "before").read(0, 64 * BS) == good
    # Tracked: exactly the blocks the rollback rewrote.
    assert replica.tracker.extents() == [(i * BS, BS) for i in range(0, 64, 4)] + [(70 * BS, BS)]
    with pytest.raises(PromoteRefused, match="promoted already"):
        node.promote("vol0", at="before")
    node.close()

    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        assert node.export("vol0").read(0, 128 * BS) == good + bytes(64 * BS)
        assert node.replica("vol0").tracker.tracked_bytes() == 17 * BS
    finally:
        node.close()


def test_a_rollback_cut_short_is_resumed_at_start(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    good = pattern(32 * BS, 2)
    synced(node, good)
    node.create_snapshot("vol0", "s")
    apply(node, [(i * BS, pattern(BS, 50 + i)) for i in range(32)])
    # Simulate a crash in the middle: the rollback's state saved, half the blocks written back.
    failover = node._failover
    real = failover._rollback
    failover._rollback = lambda replica: None  # the crash comes before any write back
    try:
        replica = node.promote("vol0", at="s")
    finally:
        failover._rollback = real
    assert replica.rollback_pending
    replica.volume.write(0, good[: 16 * BS])  # half of it written back
    with pytest.raises(DemoteRefused, match="rollback has not completed"):
        node.demote("vol0")
    node.close()

    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        replica = node.replica("vol0")
        assert not replica.rollback_pending
        assert node.export("vol0").read(0, 32 * BS) == good
    finally:
        node.close()


def test_promote_at_refuses_unknown_writable_and_invalid_snapshots_changing_nothing(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        synced(node, pattern(8 * BS, 3))
        node.create_snapshot("vol0", "w", writable=True)
        with pytest.raises(NotFound):
            node.promote("vol0", at="nope")
        with pytest.raises(PromoteRefused, match="writable"):
            node.promote("vol0", at="w")
        replica = node.replica("vol0")
        assert replica.status == "uptodate" and node.export("vol0") is None
        assert [s.name for s in node.snapshots("vol0")] == ["w"]
    finally:
        node.close()


def test_demote_ends_the_export_and_the_old_primary_gets_exactly_the_tracked_blocks(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        synced(node, pattern(16 * BS, 4))
        replica = node.promote("vol0")
        promoted = replica.generation
        export = node.export("vol0")
        export.write(3 * BS, pattern(2 * BS, 9))
        export.zero(10 * BS, BS)
        export.write(3 * BS, pattern(BS, 10))  # the same block again: tracked once
        with pytest.raises(FailbackRefused):
            list(node.failback_blocks("vol0", promoted, []))  # not demoted yet

        node.demote("vol0")
        assert replica.status == "failback"
        assert node.export("vol0") is None
        with pytest.raises(ReadOnly, match="demoted"):
            export.write(0, bytes(BS))  # a client still connected
        # Another primary with unknown history: split brain; a stream before the pull: refused.
        with pytest.raises(SplitBrain):
            node.handshake("vol0", 4 * MiB, BS, generation="x", base_generation="y")
        _, _, full = node.handshake("vol0", 4 * MiB, BS, generation="g2", base_generation="g1")
        assert not full and replica.failback
        with pytest.raises(FailbackRefused, match="handshake first"):
            node.open_stream("vol0", "p1", 1)

        # A restart keeps the failback waiting, with what it tracked.
        node.close()
        node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
        replica = node.replica("vol0")
        assert replica.status == "failback" and node.export("vol0") is None
        assert replica.tracker.extents() == [(3 * BS, 2 * BS), (10 * BS, BS)]

        blocks = pulled(node, promoted, regions=[(12 * BS, BS)])  # + the primary's own region
        assert sorted(blocks) == [3 * BS, 4 * BS, 10 * BS, 12 * BS]
        assert blocks[3 * BS] == pattern(BS, 10) and blocks[10 * BS] == bytes(BS)
        with pytest.raises(FailbackRefused, match="not g9"):
            list(node.failback_blocks("vol0", "g9", []))
        with pytest.raises(Exception, match="not aligned"):
            list(node.failback_blocks("vol0", promoted, [(1, BS)]))

        # The old primary holds the promoted generation now: the failback is complete.
        _, _, full = node.handshake("vol0", 4 * MiB, BS, generation=promoted, base_generation=promoted)
        assert not full and replica.status == "uptodate" and replica.tracker is None
        node.open_stream("vol0", "p1", 1, generation=promoted)
        node.close_stream(replica)
    finally:
        node.close()


def test_the_failback_checksums_cover_only_the_untracked_blocks_of_the_primary_regions(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        data = pattern(16 * BS, 6)
        synced(node, data)
        node.promote("vol0")
        node.export("vol0").write(2 * BS, pattern(BS, 7))
        node.demote("vol0")
        generation = node.replica("vol0").generation
        pieces = list(node.failback_digests("vol0", generation, [(0, 4 * BS), (8 * BS, BS)]))
        assert [(o, n) for o, n, _ in pieces] == [(0, 2 * BS), (3 * BS, BS), (8 * BS, BS)]
        assert pieces[0][2] == block_digests(data[: 2 * BS], BS)
        assert pieces[2][2] == block_digests(data[8 * BS : 9 * BS], BS)
    finally:
        node.close()


def test_demote_refuses_a_volume_that_is_not_promoted(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        synced(node, pattern(4 * BS, 5))
        with pytest.raises(DemoteRefused, match="not promoted"):
            node.demote("vol0")
    finally:
        node.close()


def test_the_tracker_marks_durably_and_merges_extents(tmp_path):
    path = str(tmp_path / "t.bitmap")
    tracker = ChangeTracker.create(path, 100 * BS, BS)
    tracker.mark(0, 1)
    tracker.mark(BS, 2 * BS)
    tracker.mark(50 * BS, BS)
    tracker.mark(99 * BS + 10, 20)
    tracker.close()
    again = ChangeTracker.open(path, 100 * BS)
    assert again.extents() == [(0, 3 * BS), (50 * BS, BS), (99 * BS, BS)]
    assert again.tracked_bytes() == 5 * BS
    again.remove()
    with pytest.raises(Exception, match="cannot open"):
        ChangeTracker.open(path, 100 * BS)


def test_an_idle_volume_belongs_to_its_primary_until_an_operator_releases_it(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        replica = synced(node, pattern(4 * BS, 8), primary_id="p1")
        assert replica.owner == "p1"
        # Another primary: refused whatever it asks, unless its data is the replica's history.
        for flags in ({}, {"discard": True}, {"generation": "g1", "discard": True}):
            with pytest.raises(TakeoverRequired, match="standbyctl takeover vol0"):
                node.handshake("vol0", 4 * MiB, BS, primary_id="p2", **flags)
        assert replica.status == "uptodate" and replica.generation == "g1"
        node.handshake("vol0", 4 * MiB, BS, primary_id="p2", generation="g2", base_generation="g1")
        # Released by an operator (refused while a primary mirrors it), the next primary claims it.
        node.open_stream("vol0", "p1", 1)
        with pytest.raises(TakeoverRefused, match="connected"):
            node.takeover("vol0")
        node.close_stream(replica)
        assert node.takeover("vol0") == "p1" and replica.owner == ""
        _, _, full = node.handshake("vol0", 4 * MiB, BS, primary_id="p2", discard=True)
        assert full
        node.open_stream("vol0", "p2", 1, resync=True, generation="h1")
        node.close_stream(replica)
        assert replica.owner == "p2"
    finally:
        node.close()

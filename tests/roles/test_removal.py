"""Removing a volume from the standby (`standbyctl remove`): its snapshots, store space, replica file,
failback bitmap and state go, other volumes stay; refusals change nothing; a removal cut short by a
crash is finished at the next start."""

from __future__ import annotations

import json
import os
import random

import pytest
from standby_rig import synced

from standby.node import RemoveRefused, StandbyNode
from standby.replicas import Replicas
from standbylib.errors import NotFound, StandbyError
from standbylib.snapshot import PreservationStore

MiB = 1 << 20
BS = 4096


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def with_copies(node: StandbyNode) -> None:
    """vol0 synced, two snapshots, then writes that preserve 16 blocks; vol1 synced, one snapshot and a
    copy of its own."""
    synced(node, pattern(64 * BS, 1))
    node.create_snapshot("vol0", "a")
    node.create_snapshot("vol0", "b")
    replica = node.replica("vol0")
    node.open_stream("vol0", "p1", 2)
    node.apply(replica, 2, [(i * BS, pattern(BS, 10 + i)) for i in range(16)], True)
    node.close_stream(replica)
    other, _, _ = node.handshake("vol1", 4 * MiB, BS)
    node.open_stream("vol1", "p2", 1, resync=True, generation="h1")
    node.apply(other, 1, [(0, pattern(8 * BS, 2))], False, uptodate=True)
    node.close_stream(other)
    node.create_snapshot("vol1", "keep")
    node.open_stream("vol1", "p2", 2)
    node.apply(other, 2, [(0, pattern(BS, 3))], True)
    node.close_stream(other)


def saved_volumes(data_dir) -> set[str]:
    with open(os.path.join(data_dir, "state.json")) as f:
        return set(json.load(f)["volumes"])


def test_remove_deletes_its_snapshots_store_space_file_and_state_and_nothing_else(tmp_path):
    data_dir = str(tmp_path / "d")
    node = StandbyNode(data_dir, capacity="16MiB")
    with_copies(node)
    path = node.replica_path("vol0")
    other_image = node.replica("vol1").volume.read(0, 8 * BS)
    assert node.store.stats().used_bytes == 17 * BS
    node.remove("vol0")
    assert not os.path.exists(path)
    with pytest.raises(NotFound):
        node.replica("vol0")
    assert node.export("vol0@a") is None and node.export("vol1@keep") is not None
    assert node.store.volume_names() == ["vol1"]
    assert node.store.stats().used_bytes == BS  # vol1's copy only
    assert saved_volumes(data_dir) == {"vol1"}
    node.close()

    node = StandbyNode(data_dir, capacity="16MiB")
    try:
        assert [r.name for r in node.replicas()] == ["vol1"]
        assert node.replica("vol1").volume.read(0, 8 * BS) == other_image
        assert node.snapshot("vol1", "keep").read(0, BS) == pattern(8 * BS, 2)[:BS]
        # The name is free: a primary connecting for vol0 gets a new replica (a full copy).
        _, created, full_sync = node.handshake("vol0", 4 * MiB, BS)
        assert created and full_sync
    finally:
        node.close()


def test_remove_reports_what_it_deleted(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        with_copies(node)
        held = os.stat(node.replica_path("vol0")).st_blocks * 512
        assert held >= 64 * BS
        assert node.remove("vol0") == (2, held)
    finally:
        node.close()


def test_refusals_change_nothing(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        with_copies(node)
        with pytest.raises(NotFound):
            node.remove("nope")
        replica = node.replica("vol0")
        node.open_stream("vol0", "p1", 3)
        with pytest.raises(RemoveRefused, match="primary p1 is connected"):
            node.remove("vol0", force=True)
        node.close_stream(replica)
        node.promote("vol0")
        with pytest.raises(RemoveRefused, match="promoted"):
            node.remove("vol0")
        node.demote("vol0")
        with pytest.raises(RemoveRefused, match="take back"):
            node.remove("vol0")
        assert [s.name for s in node.snapshots("vol0")] == ["a", "b"]
        assert os.path.exists(node.replica_path("vol0")) and not replica.removing
        assert saved_volumes(node.data_dir) == {"vol0", "vol1"}
    finally:
        node.close()


def test_force_removes_a_promoted_volume_its_export_and_its_failback_bitmap(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        with_copies(node)
        node.promote("vol0")
        export = node.export("vol0")
        export.write(0, b"\x05" * BS)
        bitmap = os.path.join(node.data_dir, "failback", "vol0.bitmap")
        assert os.path.exists(bitmap)
        node.remove("vol0", force=True)
        assert node.export("vol0") is None and not os.path.exists(bitmap)
        with pytest.raises(StandbyError):
            export.write(0, b"\x06" * BS)  # a client still connected gets an error
    finally:
        node.close()


def test_a_removal_cut_short_after_its_mark_is_finished_at_start(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "d")
    node = StandbyNode(data_dir, capacity="16MiB")
    with_copies(node)
    path = node.replica_path("vol0")

    def crash(self, name):
        raise StandbyError(detail="power cut")

    monkeypatch.setattr(PreservationStore, "forget", crash)
    with pytest.raises(StandbyError, match="power cut"):
        node.remove("vol0")
    monkeypatch.undo()
    node.close()
    assert os.path.exists(path) and saved_volumes(data_dir) == {"vol0", "vol1"}

    node = StandbyNode(data_dir, capacity="16MiB")
    try:
        assert [r.name for r in node.replicas()] == ["vol1"]
        assert not os.path.exists(path) and saved_volumes(data_dir) == {"vol1"}
        assert node.store.stats().used_bytes == BS
    finally:
        node.close()


def test_a_removal_cut_short_after_the_store_forgot_the_volume_is_finished_at_start(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "d")
    node = StandbyNode(data_dir, capacity="16MiB")
    with_copies(node)
    path = node.replica_path("vol0")

    def crash(self, name, paths):
        raise StandbyError(detail="power cut")

    monkeypatch.setattr(Replicas, "_forget_files", crash)
    with pytest.raises(StandbyError, match="power cut"):
        node.remove("vol0")
    monkeypatch.undo()
    node.close()
    assert os.path.exists(path) and "vol0" in saved_volumes(data_dir)

    node = StandbyNode(data_dir, capacity="16MiB")
    try:
        assert [r.name for r in node.replicas()] == ["vol1"]
        assert not os.path.exists(path) and saved_volumes(data_dir) == {"vol1"}
    finally:
        node.close()

"""Promotion of a replica (failover) on the standby node, and adoption of an old volume (failback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from standby_rig import synced

from standby.node import Promoted, PromoteRefused, StandbyNode

MiB = 1 << 20


def test_a_promoted_replica_is_exported_read_write_and_refuses_mirrored_writes_after_a_restart(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    synced(node, b"a" * 8192)
    replica = node.promote("vol0")
    assert replica.status == "promoted" and replica.generation not in ("", "g1")
    export = node.export("vol0")
    assert export is not None and not export.readonly
    export.write(4096, b"b" * 4096)  # a client's write, through the engine
    node.create_snapshot("vol0", "s")  # snapshots go on
    node.close()

    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        assert node.replica("vol0").status == "promoted"
        assert node.export("vol0").read(0, 8192) == b"a" * 4096 + b"b" * 4096
        with pytest.raises(Promoted, match="failback"):
            node.handshake("vol0", 4 * MiB, 4096, generation="g1", base_generation="g1")
        with pytest.raises(PromoteRefused, match="promoted already"):
            node.promote("vol0")
    finally:
        node.close()


def test_promote_refuses_a_replica_in_the_middle_of_a_resync_unless_forced(tmp_path):
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        replica, _, _ = node.handshake("vol0", 4 * MiB, 4096)  # never synced: inconsistent
        node.open_stream("vol0", "p1", 1, resync=True, generation="g1")
        with pytest.raises(PromoteRefused, match="is connected"):
            node.promote("vol0")
        node.close_stream(replica)
        with pytest.raises(PromoteRefused, match="resync is under way"):
            node.promote("vol0")
        assert node.export("vol0") is None
        node.promote("vol0", force=True)
        with pytest.raises(Promoted):
            node.apply(replica, 1, [(0, b"x" * 4096)], False)
    finally:
        node.close()


def test_adopt_seeds_a_new_replica_sparsely_and_leaves_an_existing_one(tmp_path):
    old = tmp_path / "old.img"
    with open(old, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"z" * 65536)
    node = StandbyNode(str(tmp_path / "d"), capacity="16MiB")
    try:
        assert node.adopt("vol0", str(old))
        path = node.replica_path("vol0")
        assert Path(path).read_bytes() == old.read_bytes()
        assert os.stat(path).st_blocks * 512 <= 256 * 1024, "the copy is not sparse"
        assert not node.adopt("vol0", str(old))
        _, created, full = node.handshake("vol0", 8 * MiB, 4096, generation="g9")
        assert not created and full  # unknown history: a full sync, checksummed since data exists
    finally:
        node.close()

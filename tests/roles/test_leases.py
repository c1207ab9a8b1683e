"""Snapshot leases on the standby node: a snapshot whose backup stopped renewing it is deleted, also
across a restart of the standby; snapshots without a lease stay."""

from __future__ import annotations

import time

import pytest
from standby_rig import synced

from standby.node import StandbyNode
from standbylib.errors import InvalidArgument, UnknownSnapshot

MiB = 1 << 20


def open_node(path) -> StandbyNode:
    return StandbyNode(str(path), capacity="64MiB")


def new_volume(node: StandbyNode) -> None:
    """vol0, synced once (a snapshot needs an up-to-date replica)."""
    synced(node, b"x" * 4096, primary_id="primary-1")


def test_an_expired_lease_deletes_only_its_snapshot_and_a_renewal_keeps_it(tmp_path):
    node = open_node(tmp_path / "data")
    try:
        new_volume(node)
        node.create_snapshot("vol0", "leased", lease=60)
        node.create_snapshot("vol0", "renewed", lease=60)
        node.create_snapshot("vol0", "kept")
        now = time.time()
        assert node.expire_leases(now + 30) == []
        node.leases.grant("vol0", "renewed", 60, now=now + 30)  # what RenewSnapshotLease does at +30 s
        assert node.expire_leases(now + 61) == ["vol0@leased"]
        assert sorted(s.name for s in node.snapshots("vol0")) == ["kept", "renewed"]
        assert node.export("vol0@leased") is None
        assert node.leases.remaining("vol0", "kept") is None
    finally:
        node.close()


def test_leases_survive_a_restart_of_the_standby(tmp_path):
    node = open_node(tmp_path / "data")
    new_volume(node)
    node.create_snapshot("vol0", "backup-1", lease=30)
    node.close()
    node = open_node(tmp_path / "data")
    try:
        remaining = node.leases.remaining("vol0", "backup-1")
        assert remaining is not None and 0 < remaining <= 30
        assert node.expire_leases(time.time() + 31) == ["vol0@backup-1"]
        assert node.snapshots("vol0") == []
    finally:
        node.close()


def test_bad_leases_are_refused_and_change_nothing(tmp_path):
    node = open_node(tmp_path / "data")
    try:
        new_volume(node)
        for bad in (-1.0, 1e9):
            with pytest.raises(InvalidArgument, match="lease"):
                node.create_snapshot("vol0", "s", lease=bad)
        assert node.snapshots("vol0") == []
        with pytest.raises(UnknownSnapshot):
            node.renew_lease("vol0", "missing", 10)
        node.create_snapshot("vol0", "s")
        node.delete_snapshot("vol0", "s")
        assert node.expire_leases(time.time() + 1e6) == []
    finally:
        node.close()

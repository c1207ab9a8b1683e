"""Snapshots of the replicas and their leases: what the Control API and the backup node ask for (create,
list, renew a lease, delete) and the expiry of leases that ran out (`standby.leases` keeps the deadlines).

Each snapshot is exported over NBD as ``VOLUME@SNAPSHOT`` from its creation to its deletion. A snapshot
and its lease are taken together or not at all, so that a dead backup node never pins preserved blocks.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from standby.leases import Leases, check_lease
from standby.replica import INCONSISTENT, Replica
from standby.replicas import Replicas
from standby.statefiles import StateFiles
from standbylib.errors import NotFound, ReplicaInconsistent, StandbyError
from standbylib.runtime import logs
from standbylib.snapshot.volume import Snapshot, SnapshotInfo

log = logs.get(__name__)


def snapshot_invalidated(volume: str, snapshot: str, reason: str) -> None:
    """The engine's notice that a snapshot lost its frozen image (called with the store's lock held)."""
    log.error("snapshot_invalidated", volume=volume, snapshot=snapshot, reason=reason)


def replica_labels(replica: Replica) -> dict[str, Any]:
    """What a snapshot records of its replica when it is taken: a snapshot of a replica that was behind
    its primary (disconnected, deferred) is allowed, and its archives say so (docs/MONITORING.md)."""
    in_sync_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(replica.in_sync_at))
    return {
        "replica_state": replica.status,
        "replica_connected": replica.connected,
        "replica_in_sync_at": in_sync_at,
        "replica_lag_seconds": round(replica.lag_seconds(), 3),
    }


class Snapshots:
    """The snapshots of the replicas in `replicas`; their leases in `leases`, saved through `files`."""

    def __init__(self, replicas: Replicas, leases: Leases, files: StateFiles) -> None:
        self._replicas = replicas
        self._leases = leases
        self._files = files

    def create(
        self,
        volume: str,
        name: str | None,
        *,
        writable: bool = False,
        capacity: int | None = None,
        lease: float | None = None,
    ) -> SnapshotInfo:
        """Freeze `volume`'s image; with a `lease` (seconds) the snapshot is deleted unless renewed."""
        replica = self._replicas.replica(volume)
        if replica.state == INCONSISTENT:
            raise ReplicaInconsistent(volume=volume)
        if lease is not None:
            check_lease(lease)
        snap = replica.volume.create_snapshot(
            name or None, writable=writable, capacity=capacity, labels=replica_labels(replica)
        )
        if lease is not None:
            # The lease is taken with the snapshot or not at all: a snapshot left without the lease its
            # backup asked for would pin preserved blocks forever once that backup is gone.
            try:
                self._files.write(self._leases.path, lambda: self._leases.grant(volume, snap.name, lease))
            except BaseException:
                replica.volume.delete_snapshot(snap.name)
                log.warning("snapshot_deleted", volume=volume, snapshot=snap.name, reason="lease not saved")
                raise
        self._replicas.add_export(f"{volume}@{snap.name}", snap)
        info = snap.info()
        log.info(
            "snapshot_created",
            volume=volume,
            snapshot=snap.name,
            writable=writable,
            capacity=capacity,
            lease=lease,
        )
        return info

    def renew_lease(self, volume: str, name: str, seconds: float, *, release: bool = False) -> SnapshotInfo:
        """Extend (or give) the lease of an existing snapshot to `seconds` from now; with `release`,
        drop its lease (it stays until deleted)."""
        snap = self.get(volume, name)
        if release:
            self._files.write(self._leases.path, lambda: self._leases.drop(volume, name))
        else:
            self._files.write(self._leases.path, lambda: self._leases.grant(volume, name, seconds))
        return snap.info()

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Delete the snapshots whose lease ran out; their export names."""
        gone: list[str] = []
        for volume, name in self._leases.expired(now):
            try:
                self.delete(volume, name)
            except NotFound:
                self._leases.drop(volume, name)  # deleted already, or its volume is gone
                continue
            log.warning("snapshot_lease_expired", volume=volume, snapshot=name)
            gone.append(f"{volume}@{name}")
        return gone

    def delete(self, volume: str, name: str) -> None:
        replica = self._replicas.replica(volume)
        replica.volume.delete_snapshot(name)
        self._replicas.drop_export(f"{volume}@{name}")
        log.info("snapshot_deleted", volume=volume, snapshot=name)
        # The snapshot is gone whatever happens to its lease entry: one left in leases.json (the file
        # could not be saved) names no snapshot, and is dropped when it runs out.
        with contextlib.suppress(StandbyError):
            self._files.write(self._leases.path, lambda: self._leases.drop(volume, name))

    def infos(self, volume: str | None = None) -> list[SnapshotInfo]:
        """The snapshots of `volume`, or of every volume when None."""
        replicas = [self._replicas.replica(volume)] if volume else self._replicas.all()
        return [s.info() for r in replicas for s in r.volume.snapshots()]

    def get(self, volume: str, name: str) -> Snapshot:
        return self._replicas.replica(volume).volume.snapshot(name)

    def changes(self, volume: str, base: str, name: str) -> list[tuple[int, int]]:
        """The byte extents written between snapshot `base` and the later snapshot `name`
        (`standbylib.snapshot.volume.Volume.changes`)."""
        return self._replicas.replica(volume).volume.changes(base, name)

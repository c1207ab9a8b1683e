"""Removing a volume from the standby (`standbyctl remove VOLUME`): the end of its protection here, as
`lvremove` ends a logical volume. Its snapshots are deleted (their preserved blocks freed), the store
forgets it, its replica file and failback bitmap are deleted, ``state.json`` and ``leases.json`` drop it.

The removal is marked in ``state.json`` first (`Replica.removing`), then each step is durable on its
own, so a crash in the middle leaves the mark and the next start finishes the work (`resume`). A primary
that connects later for the volume is a new primary for a new replica: it gets a full copy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from standby.leases import Leases
from standby.replica import Replica
from standby.replicas import Replicas
from standby.statefiles import StateFiles
from standbylib.errors import RequestError, StandbyError
from standbylib.runtime import logs

log = logs.get(__name__)


class RemoveRefused(RequestError):
    template = "cannot remove volume {volume!r}: {detail}"


class Removal:
    """Removes replicas of `replicas`; `extra_files(volume)` are the other files a volume has in the data
    directory (its failback bitmap)."""

    def __init__(
        self,
        replicas: Replicas,
        leases: Leases,
        files: StateFiles,
        extra_files: Callable[[str], tuple[str, ...]],
    ) -> None:
        self._replicas = replicas
        self._leases = leases
        self._files = files
        self._extra_files = extra_files

    def remove(self, volume: str, *, force: bool = False) -> tuple[int, int]:
        """Remove the replica of `volume`: (its snapshots deleted, the bytes of its replica file on disk).
        Refused while a primary mirrors it; refused while it is the primary copy (promoted) or its old
        primary has yet to take back what changed (failback), unless `force`."""
        replica = self._replicas.replica(volume)
        self._check(replica, force)
        # As promote: no batch half applied meanwhile; the replica's apply lock, then the table's lock.
        with replica.apply_lock, self._replicas.lock:
            self._check(replica, force)
            snapshots = len(replica.volume.snapshots())
            allocated = _allocated(replica.path)
            self._replicas.change(replica, removing=True)
            log.warning("volume_removing", volume=volume, snapshots=snapshots, force=force)
            self._finish(replica)
        log.warning("volume_removed", volume=volume, snapshots=snapshots, replica_bytes=allocated)
        return snapshots, allocated

    def resume(self, replica: Replica) -> None:
        """At start: finish the removal of `replica`, marked but cut short."""
        log.warning("volume_removal_resumed", volume=replica.name)
        self._finish(replica)
        log.warning("volume_removed", volume=replica.name, snapshots=None, replica_bytes=None)

    def sweep(self) -> None:
        """At start: the files of volumes whose removal was cut short after the store forgot them."""
        for name in self._replicas.sweep_removed(self._extra_files):
            log.warning("volume_removal_resumed", volume=name)
            log.warning("volume_removed", volume=name, snapshots=None, replica_bytes=None)

    def _check(self, replica: Replica, force: bool) -> None:
        volume = replica.name
        if replica.connected:
            raise RemoveRefused(
                volume=volume,
                detail=f"primary {replica.primary_id or 'unknown'} is connected and mirroring it; stop that "
                "primary (or remove the volume from its --volume list) first, else it would create the "
                "replica again",
            )
        if force:
            return
        if replica.promoted_at:
            raise RemoveRefused(
                volume=volume,
                detail="it is promoted: this replica is the volume's primary copy; demote it and let its "
                "old primary take it back first (or give --force to remove it all the same)",
            )
        if replica.failback:
            raise RemoveRefused(
                volume=volume,
                detail="its old primary has yet to take back what changed while it was promoted (give "
                "--force to remove it all the same)",
            )

    def _finish(self, replica: Replica) -> None:
        names = [snap.name for snap in replica.volume.snapshots()]

        def drop_leases() -> None:
            for name in names:
                self._leases.drop(replica.name, name)

        # A lease left in leases.json names no snapshot, and is dropped when it runs out.
        with contextlib.suppress(StandbyError):
            self._files.write(self._leases.path, drop_leases)
        self._replicas.remove(replica, self._extra_files(replica.name))


def _allocated(path: str) -> int:
    """The bytes a (sparse) file holds on disk."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0

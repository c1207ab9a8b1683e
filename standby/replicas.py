"""The replica table: the replicas of the data directory by volume name, their files
(``replicas/NAME.img``, registered with the preservation store), the NBD exports the node serves, and the
durable changes of a replica's state (saved in ``state.json``, undone in memory when that fails).

One re-entrant lock, `Replicas.lock`, guards the table, the exports and every save of ``state.json``:
a save writes the state of every replica, so changes and saves must not interleave. Callers holding it
may call back in (a state save under a caller's change).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable

from standby.replica import DURABLE, INCONSISTENT, Replica
from standby.statefiles import StateFiles
from standby.tracker import TrackedExport
from standbylib.blockdev import open_file_device
from standbylib.errors import DeviceError, InvalidArgument, StandbyError, UnknownVolume
from standbylib.runtime import logs
from standbylib.snapshot import PreservationStore
from standbylib.snapshot.volume import Snapshot

log = logs.get(__name__)

REPLICA_DIR = "replicas"


class Replicas:
    """The replicas of `data_dir`, attached to `store`; their state saved through `files`."""

    def __init__(self, data_dir: str, store: PreservationStore, files: StateFiles) -> None:
        self.lock = threading.RLock()  # re-entered: state saves take it under callers that hold it
        self._data_dir = data_dir
        self._store = store
        self._files = files
        self._replicas: dict[str, Replica] = {}
        self._exports: dict[str, Snapshot | TrackedExport] = {}  # NBD exports: snapshots, promoted volumes

    def path(self, volume: str) -> str:
        """Where the replica file of `volume` is."""
        return os.path.join(self._data_dir, REPLICA_DIR, f"{volume}.img")

    # -- the table ---------------------------------------------------------------------------------------

    def get(self, volume: str) -> Replica | None:
        with self.lock:
            return self._replicas.get(volume)

    def replica(self, volume: str) -> Replica:
        """The replica of `volume`; `UnknownVolume` when there is none."""
        replica = self.get(volume)
        if replica is None:
            raise UnknownVolume(volume=volume)
        return replica

    def all(self) -> list[Replica]:
        """Every replica, by volume name."""
        with self.lock:
            return sorted(self._replicas.values(), key=lambda r: r.name)

    # -- NBD exports -------------------------------------------------------------------------------------

    def export(self, name: str) -> Snapshot | TrackedExport | None:
        """The NBD export `name`: a snapshot (VOLUME@SNAPSHOT), or a promoted volume (VOLUME, read-write)."""
        return self._exports.get(name)

    def add_export(self, name: str, target: Snapshot | TrackedExport) -> None:
        with self.lock:
            self._exports[name] = target

    def drop_export(self, name: str) -> None:
        with self.lock:
            self._exports.pop(name, None)

    def export_names(self) -> list[str]:
        return sorted(self._exports)

    # -- replica files -----------------------------------------------------------------------------------

    def open_existing(self, name: str) -> Replica:
        """Open the replica of `name`, a volume the store knows, at start: its state as ``state.json``
        saved it, its snapshots exported (a promoted volume's export is `Failover.resume`'s). A replica
        changed while the daemon was down holds no generation any more (and is inconsistent until a full
        sync)."""
        path = self.path(name)
        if not os.path.exists(path):
            raise StandbyError(
                detail=f"the preservation store knows volume {name!r} but its replica {path} is missing"
            )
        device = open_file_device(path, exclusive=True)
        try:
            block_size = self._store.volume_block_size(name)
            volume = self._store.attach(name, device, block_size=block_size)
        except BaseException:
            device.close()  # (its exclusive lock with it: the file is free again)
            raise
        replica = Replica(name=name, path=path, device=device, volume=volume)
        self._files.restore(replica)
        with self.lock:
            self._replicas[name] = replica
        if volume.changed_outside:
            # Its data is no longer what the primary sent: no generation describes it. The next
            # primary's handshake gets a full sync, which compares checksums and resends what differs.
            log.warning("replica_changed_outside", volume=name, reason=volume.changed_outside)
            self.set_state(replica, INCONSISTENT, generation="")
        for snap in volume.snapshots():
            self.add_export(f"{name}@{snap.name}", snap)
        log.info("replica_opened", volume=name, size=volume.size, block_size=block_size)
        return replica

    def find_or_create(self, volume: str, size: int, block_size: int) -> tuple[Replica, bool]:
        """The replica of `volume`, and whether it was created now: a sparse file of `size` bytes,
        registered with the store in blocks of `block_size`. (The caller checks the geometry of one that
        exists already.)"""
        with self.lock:
            replica = self._replicas.get(volume)
            if replica is not None:
                return replica, False
            path = self.path(volume)
            if os.path.exists(path):
                # A replica file the store does not know (a crash between creating it and registering it).
                os.unlink(path)
            _create_sparse(volume, path, size)
            replica = self._attach(volume, path, block_size, size)
            self._replicas[volume] = replica
            log.info("replica_created", volume=volume, size=size, block_size=block_size, path=path)
            return replica, True

    def add_file(self, volume: str, block_size: int) -> Replica:
        """Register the file already at `path(volume)` as the replica of the new `volume` (its state is
        saved); on a failure to register it, the file is removed."""
        replica = self._attach(volume, self.path(volume), block_size)
        with self.lock:
            self._replicas[volume] = replica
            self.save()
        return replica

    def _attach(self, volume: str, path: str, block_size: int, size: int | None = None) -> Replica:
        """Open the replica file at `path` and register it with the store; removed if that fails."""
        device = open_file_device(path, size, exclusive=True)
        try:
            vol = self._store.attach(volume, device, block_size=block_size)
        except BaseException:
            device.close()
            os.unlink(path)
            raise
        return Replica(name=volume, path=path, device=device, volume=vol)

    def close(self) -> None:
        """Flush and close every replica; the table and the exports are empty after."""
        with self.lock:
            for replica in self._replicas.values():
                try:
                    replica.volume.flush()
                    replica.volume.close()
                finally:
                    replica.device.close()
            self._replicas.clear()
            self._exports.clear()

    def remove(self, replica: Replica, files: tuple[str, ...] = ()) -> None:
        """Remove the replica of a volume marked `removing`: its NBD exports (clients of a promoted
        volume's get errors), its snapshots (their space freed), its registration with the store, its
        file and `files`, its entry in ``state.json``. Each step is durable; a removal cut short leaves
        the mark, and the next start finishes it (`open_existing` then `remove`, or `sweep_removed`)."""
        name = replica.name
        assert replica.removing, name
        with self.lock:
            for export in [n for n in self._exports if n == name or n.startswith(f"{name}@")]:
                target = self._exports.pop(export)
                if isinstance(target, TrackedExport):
                    target.retire()
            for snap in list(replica.volume.snapshots()):
                replica.volume.delete_snapshot(snap.name)
            self._replicas.pop(name, None)
            try:
                replica.volume.close()
            finally:
                replica.device.close()
                if replica.tracker is not None:
                    replica.tracker.close()
            self._store.forget(name)
            self._forget_files(name, (replica.path, *files))

    def sweep_removed(self, files_of: Callable[[str], tuple[str, ...]]) -> list[str]:
        """At start: the volumes ``state.json`` marks as being removed that the store no longer knows
        (a removal cut short after it unregistered them) lose their files (`files_of`) and their entry;
        their names."""
        known = set(self._store.volume_names())
        swept = [name for name in self._files.removing() if name not in known]
        for name in swept:
            self._forget_files(name, (self.path(name), *files_of(name)))
        return swept

    def _forget_files(self, name: str, paths: tuple[str, ...]) -> None:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with self.lock:
            self._files.save_states(self._replicas.values(), forget=[name])

    # -- durable state -----------------------------------------------------------------------------------

    def save(self) -> None:
        """Save the state of every replica in ``state.json`` (`StateFiles.write`: a failure is raised)."""
        with self.lock:
            self._files.save_states(self._replicas.values())

    def change(self, replica: Replica, **fields: object) -> None:
        """Set the durable fields given (names of `standby.replica.DURABLE`) and save them; on a failure to
        save, nothing changes (in memory either) and the error is raised."""
        unknown = set(fields) - set(DURABLE)
        if unknown:
            raise TypeError(f"not durable fields of a replica: {sorted(unknown)}")
        with self.lock:
            before = {name: getattr(replica, name) for name in fields}
            for name, value in fields.items():
                setattr(replica, name, value)
            try:
                self.save()
            except StandbyError:
                for name, value in before.items():
                    setattr(replica, name, value)
                raise

    def set_state(self, replica: Replica, state: str, generation: str | None = None) -> None:
        """Change the replica's state (and generation) durably; on a failure to save it, nothing changes
        (in memory either) and the error is raised."""
        if replica.state == state and (generation is None or generation == replica.generation):
            return
        with self.lock:
            old = replica.state
            if generation is None:
                self.change(replica, state=state)
            else:
                self.change(replica, state=state, generation=generation)
        log.info("replica_state", volume=replica.name, old=old, new=state, generation=replica.generation)


def _create_sparse(volume: str, path: str, size: int) -> None:
    """Create the replica file of `volume`: `size` bytes, sparse. A size the filesystem cannot hold
    (EFBIG, or beyond what a file offset can express) is the primary's bad argument, not the standby's
    failure; on any error nothing is left behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as e:
        os.close(fd)
        os.unlink(path)
        if isinstance(e, OverflowError) or e.errno in (errno.EFBIG, errno.EINVAL):
            raise InvalidArgument(
                detail=f"volume {volume!r}: size {size} is more than the standby's filesystem can hold"
            ) from e
        raise DeviceError(path=path, detail=f"resize to {size}: {e.strerror}") from e
    os.close(fd)

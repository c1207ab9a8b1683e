"""The preservation store: the table of volumes and snapshots, and what volumes ask of the store.

A store is one file (or RAM) shared by any number of volumes (claim 18), each
with any number of snapshots (claim 19). It owns:

* the table of volumes and snapshots, written alternately to two checksummed
  copies so an update is atomic; epochs, snapshot ids and volume ids are never
  reused, not even those of an operation that failed;
* the areas of slots that hold preserved blocks, each described by a 32-byte
  entry (what block, which generation or snapshot, commit number, data checksum),
  and the entry areas of hole entries (blocks preserved as zeros: an entry, no
  data): `standbylib.snapshot.slots`;
* one `ChainIndex` per volume and one per writable snapshot, rebuilt on open
  (`standbylib.snapshot.recovery`);
* the commit protocol: every write since the last commit becomes durable with
  a single ``sync`` of the store file, and slots freed meanwhile are reused only
  after that sync; group commit (`flush`): callers that want their writes
  durable share commits (`standbylib.snapshot.commit`).

Crash safety: each commit records, just before its sync, that the commit
before it completed. On open, only the entries of commits after the recorded
one can be incomplete; their data is checked against their checksum and
dropped when it does not match, which is safe because the origin blocks they
preserve were not overwritten before that commit's sync.

Volumes (`standbylib.snapshot.volume`) change the store only through the methods of `Store`: they
take snapshot ids and epochs, register and remove snapshot records, allocate slots, write copies and
entries, invalidate snapshots and commit, each within a `transaction`. `Store` is generic in what it
hands out for an attached volume (`_bind`), so that it does not depend on `Volume`;
`PreservationStore` (`standbylib.snapshot.engine`) is the store whose volumes are `Volume` objects.

Threading: the store's `lock` is a reader-writer lock (`RWLock`). Everything that changes the
store, an index or an origin takes its exclusive side (``with store.lock:``); snapshot reads and
queries that only look take its shared side (``with store.lock.shared():``), so they run in parallel
with each other but never see a change half made. Volumes and snapshots use the same lock. The
`on_invalidated` listener is called with the exclusive side held. Only the sync of a group commit
runs without the lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

import numpy as np

from standbylib.blockdev import BlockDevice, check_block_size
from standbylib.errors import (
    InvalidArgument,
    StandbyError,
    StoreError,
    UnknownVolume,
    VolumeMismatch,
)
from standbylib.rawfile import RawFile
from standbylib.snapshot import layout, stamp
from standbylib.snapshot.commit import Committer, InvalidationListener
from standbylib.snapshot.index import ChainIndex, referenced
from standbylib.snapshot.inspection import StoreInspection
from standbylib.snapshot.records import INVALID, SnapshotRecord, VolumeRecord, check_name, live_snapshots
from standbylib.snapshot.recovery import recover

ON_FULL_POLICIES = ("invalidate", "defer")


@dataclass(frozen=True)
class StoreStats:
    """Counters of a store; bytes are slot bytes (block size x preserved blocks).

    `preserved_blocks` and `cow_copies` count blocks preserved with their data; `hole_entries` and
    `cow_holes` blocks preserved as hole entries (they read as zeros: no data, no slot, 0 bytes).
    """

    capacity_bytes: int
    used_bytes: int
    preserved_blocks: int
    cow_copies: int
    snapshots: int
    invalid_snapshots: int
    syncs: int
    bytes_written: int
    hole_entries: int = 0  # hole entries held (in use or waiting for a commit to be freed)
    cow_holes: int = 0  # blocks preserved as hole entries since the store was opened

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def fill_ratio(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


class AttachedVolume(Protocol):
    """What the store needs of a volume it attached: its record and its origin device (for stamps)."""

    @property
    def record(self) -> VolumeRecord: ...

    @property
    def device(self) -> BlockDevice: ...


V = TypeVar("V", bound=AttachedVolume)


class Store(Committer, StoreInspection, Generic[V]):
    """Copy-on-write preservation store, handing out a `V` for each attached volume (`_bind`).

    `PreservationStore` (`standbylib.snapshot.engine`) is the one callers open; `raw` is its file,
    `new` says whether to create a store in it (else it is recovered).
    """

    def __init__(
        self,
        raw: RawFile,
        *,
        capacity: int | None,
        on_full: str,
        new: bool,
        on_invalidated: InvalidationListener | None = None,
    ) -> None:
        check_arguments(capacity, on_full)
        super().__init__(raw, on_invalidated)
        self._on_full = on_full
        self._next_epoch = 1
        self._next_snapshot_id = 1
        self._next_volume_id = 1
        self._capacity = 0
        self._volume_records: dict[str, VolumeRecord] = {}
        self._snapshots: dict[int, SnapshotRecord] = {}
        self._chains: dict[int, ChainIndex] = {}
        self._attached: dict[int, V] = {}
        self._cow_copies = 0
        self._cow_holes = 0
        self._found_version = layout.VERSION  # the format the file had when opened
        if new:
            if capacity is None:
                raise InvalidArgument(detail="a new preservation store needs a capacity")
            self._capacity = capacity
            # The superblock goes last: until it is durable the file is recognisably
            # an interrupted creation (see `PreservationStore.open_raw`), never a store with a lost table.
            self._raw.truncate(0)
            self.write_table()
            self.commit()
            self._raw.pwrite(layout.pack_superblock(), 0)
            self._raw.sync()
        else:
            self._recover()
            if capacity is not None and capacity != self._capacity:
                self._capacity = capacity
                self.write_table()
                self.commit()

    def _recover(self) -> None:
        """Take over what `recovery.recover` read back from the file, then commit: the commit record
        now covers every commit recovery checked (see `standbylib.snapshot.recovery`)."""
        found = recover(self._raw, self._path, self._slots)
        self._table_seq = found.table_seq
        self._capacity = found.capacity
        self._next_epoch = found.next_epoch
        self._next_snapshot_id = found.next_snapshot_id
        self._next_volume_id = found.next_volume_id
        self._volume_records = found.volume_records
        self._snapshots = found.snapshots
        self._chains = found.chains
        self._found_version = found.found_version
        self._commit_seq = found.commit_seq
        self._durable_seq = self._commit_seq - 1
        self._record_parity = self._commit_seq % 2
        self._journal.dirty = True
        self.commit()

    def close(self) -> None:
        """Stamp the attached volumes' origins clean, commit what is pending and close the file.

        Volumes and snapshots become unusable. The file is closed even when the last commit fails
        (that error is raised): writes to writable snapshots not flushed before may then be lost.
        """
        with self.lock:
            if self._closed:
                return
            try:
                self._settle()  # a group commit's sync in progress ends before the file closes
                for vol in list(self._attached.values()):
                    self._stamp_clean(vol, commit=False)
                if self.needs_commit():
                    self.commit()
            finally:
                self._closed = True
                self._raw.close()
                self._wake_flushers()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        """The store file's path (``<ram>`` in RAM)."""
        return self._path

    @property
    def raw(self) -> RawFile:
        """The store file: snapshots read preserved blocks from it; its I/O counters."""
        return self._raw

    @property
    def on_full(self) -> str:
        """What a write that needs a copy that does not fit does: ``invalidate`` or ``defer``."""
        return self._on_full

    # ------------------------------------------------------------------ volumes

    def attach(self, name: str, device: BlockDevice, *, block_size: int = 4096) -> V:
        """Attach the origin `device` as volume `name`, registering it on first use.

        The volume's block size is fixed at registration; attaching again with
        another block size, or a smaller device, raises `VolumeMismatch`. The
        caller keeps ownership of `device`.
        """
        check_name("volume", name)
        check_block_size(block_size)
        size = device.size
        if size % block_size:
            raise InvalidArgument(
                detail=f"volume {name!r}: size {size} is not a multiple of the block size {block_size}"
            )
        with self.lock:
            self.check_open()
            rec = self._volume_records.get(name)
            if rec is not None:
                if rec.block_size != block_size:
                    raise VolumeMismatch(
                        volume=name, detail=f"registered with block size {rec.block_size}, not {block_size}"
                    )
                if size < rec.size:
                    raise VolumeMismatch(
                        volume=name,
                        detail=f"device has {size} bytes, the volume had {rec.size}; it cannot shrink",
                    )
                if rec.id in self._attached:
                    raise VolumeMismatch(volume=name, detail="already attached")
            # Taken before anything is written through the engine; durable before attach returns, so
            # that a clean stamp of a previous close never outlives the first write of this attach.
            in_use = stamp.take(device, clean=False)
            changed = ""
            with self.transaction():
                if rec is None:
                    rec = VolumeRecord(self._next_volume_id, name, block_size, size, in_use)
                    self._next_volume_id += 1  # ids are never reused, even after a failure
                    self._register(rec)
                    self.write_table()
                else:
                    changed = self._check_stamp(rec, device)
                    if size > rec.size:
                        self._set_volume(rec, size=size)
                    if in_use != rec.stamp:
                        self._set_volume(rec, stamp=in_use)
                if self._table_pending:
                    self.commit()
            vol = self._bind(rec, device, changed)
            self._attached[rec.id] = vol
            return vol

    def _bind(self, record: VolumeRecord, device: BlockDevice, changed_outside: str) -> V:
        """The object `attach` hands out for volume `record` on `device`; `changed_outside` says why
        its origin changed since the store last stamped it ("" when it did not)."""
        raise NotImplementedError

    def _register(self, rec: VolumeRecord) -> None:
        self._volume_records[rec.name] = rec
        self._chains[rec.id] = ChainIndex()

        def undo() -> None:
            del self._volume_records[rec.name]
            del self._chains[rec.id]

        self.on_abort(undo)

    def _set_volume(self, rec: VolumeRecord, **changes: Any) -> None:
        """Change fields of a volume record (in the next commit's table; undone if the operation fails)."""
        old = {k: getattr(rec, k) for k in changes}
        for k, v in changes.items():
            setattr(rec, k, v)

        def undo() -> None:
            for k, v in old.items():
                setattr(rec, k, v)

        self.on_abort(undo)
        self.write_table()

    def _check_stamp(self, rec: VolumeRecord, device: BlockDevice) -> str:
        """Invalidate every valid snapshot of `rec` if its origin changed since it was last stamped;
        why it changed, or "" when it did not."""
        if rec.stamp is None:
            return ""
        found = stamp.differences(rec.stamp, device)
        if not found:
            return ""
        reason = stamp.mismatch_reason(getattr(device, "path", rec.name), found)
        for snap in self.live_snapshots(rec.id):
            self.invalidate(snap, reason)
        return reason

    def _stamp_clean(self, vol: AttachedVolume, *, commit: bool = True) -> None:
        """Record that `vol`'s origin is closed cleanly, as it is now (see `stamp`). Best effort:
        when the stamp cannot be taken or made durable, the in-use stamp stays, and the next attach
        checks only the origin's identity and size."""
        try:
            with self.transaction():
                clean = stamp.take(vol.device, clean=True)
                if clean is None or clean == vol.record.stamp:
                    return
                self._set_volume(vol.record, stamp=clean)
                if commit:
                    self.commit()
        except StandbyError:
            pass

    def detach(self, vol: AttachedVolume) -> None:
        """Forget the attached volume `vol` (closing) and stamp its origin clean, unless the store is
        closed already. With the exclusive lock held."""
        self._attached.pop(vol.record.id, None)
        if not self._closed:
            self._stamp_clean(vol)

    def forget(self, name: str) -> None:
        """Unregister volume `name` from the store, durably. It must be detached and have no snapshot
        left (`Volume.delete_snapshot` frees what each held), so that no preserved copy refers to it.
        Its id is never given to another volume."""
        with self.lock:
            self.check_open()
            rec = self._volume_records.get(name)
            if rec is None:
                raise UnknownVolume(volume=name)
            if rec.id in self._attached:
                raise VolumeMismatch(volume=name, detail="it is attached; detach it before forgetting it")
            if self.snapshots_of(rec.id) or len(self._chains[rec.id].arrays()[0]):
                raise VolumeMismatch(volume=name, detail="it has snapshots; delete them first")
            chain = self._chains[rec.id]
            with self.transaction():
                del self._volume_records[name]
                del self._chains[rec.id]

                def undo() -> None:
                    self._volume_records[name] = rec
                    self._chains[rec.id] = chain

                self.on_abort(undo)
                self.write_table()
                self.commit()

    def volume(self, name: str) -> V:
        """The attached volume `name`."""
        with self.lock.shared():
            rec = self._volume_records.get(name)
            if rec is None or rec.id not in self._attached:
                raise UnknownVolume(volume=name)
            return self._attached[rec.id]

    def volume_names(self) -> list[str]:
        """Names of every volume registered in the store, attached or not."""
        with self.lock.shared():
            return sorted(self._volume_records)

    def volume_block_size(self, name: str) -> int:
        """The block size volume `name` was registered with, attached or not."""
        with self.lock.shared():
            rec = self._volume_records.get(name)
            if rec is None:
                raise UnknownVolume(volume=name)
            return rec.block_size

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        with self.lock.shared():
            return StoreStats(
                capacity_bytes=self._capacity,
                used_bytes=self._slots.used_bytes,
                preserved_blocks=self._slots.live_slots,
                cow_copies=self._cow_copies,
                snapshots=len(self._snapshots),
                invalid_snapshots=sum(1 for s in self._snapshots.values() if not s.valid),
                syncs=self._raw.counters.syncs,
                bytes_written=self._raw.counters.bytes_written,
                hole_entries=self._slots.live_holes,
                cow_holes=self._cow_holes,
            )

    def index_bytes(self) -> int:
        """RAM held by the association indexes (arrays, overlays merged)."""
        with self.lock:
            total = 0
            for chain in self._chains.values():
                chain.merge()
                total += chain.nbytes
            for snap in self._snapshots.values():
                snap.private.merge()
                total += snap.private.nbytes
            return total

    def capacity_bytes(self) -> int:
        """How many bytes of preserved blocks the store may hold."""
        return self._capacity

    def free_bytes(self) -> int:
        """Capacity not used by preserved blocks (negative when a lowered capacity is exceeded)."""
        return self._capacity - self._slots.used_bytes

    # ------------------------------------------------------------------ snapshots' records

    def upcoming_snapshot_id(self) -> int:
        """The id the next snapshot will get (default snapshot names are made from it)."""
        return self._next_snapshot_id

    def new_snapshot_id(self) -> int:
        """Take the next snapshot id. Ids are never reused, not even those of a creation that failed."""
        taken = self._next_snapshot_id
        self._next_snapshot_id += 1
        return taken

    def new_epoch(self) -> int:
        """Take the next epoch: it orders snapshots and tags the copies made for them; never reused."""
        taken = self._next_epoch
        self._next_epoch += 1
        return taken

    def register_snapshot(self, snap: SnapshotRecord) -> None:
        """Add `snap` to the table (durable with the next commit; undone if the operation fails)."""
        self._snapshots[snap.id] = snap

        def undo() -> None:
            del self._snapshots[snap.id]

        self.on_abort(undo)
        self.write_table()

    def remove_snapshot(self, snap: SnapshotRecord) -> None:
        """Take `snap` out of the table (durable with the next commit; undone if the operation fails).
        Its slots stay in use: the caller frees them once that commit synced."""
        del self._snapshots[snap.id]
        self.on_abort(lambda: self._snapshots.__setitem__(snap.id, snap))
        self.write_table()

    def has_snapshot(self, snap: SnapshotRecord) -> bool:
        """Whether `snap` is in the table (it is not once deleted)."""
        return self._snapshots.get(snap.id) is snap

    def snapshots_of(self, vol_id: int) -> list[SnapshotRecord]:
        """Every snapshot of a volume, valid or not, in table order."""
        return [s for s in self._snapshots.values() if s.volume == vol_id]

    def live_snapshots(self, vol_id: int) -> list[SnapshotRecord]:
        """Valid snapshots of a volume, oldest first."""
        return live_snapshots(self._snapshots.values(), vol_id)

    def invalidate(self, snap: SnapshotRecord, reason: str) -> None:
        """Mark `snap` invalid and free, at the next commit, what only it used.

        Durable with the next commit, which tells `on_invalidated`; undone if the operation
        fails before that commit.
        """
        chain = self._chains[snap.volume]
        slots = self._slots
        old = (snap.state, snap.reason, snap.preserved_blocks, snap.hole_blocks, snap.private)
        saved = chain.arrays()
        pending = len(slots.pending)
        notice = (self._volume_name(snap.volume), snap.name, reason)
        snap.state = INVALID
        snap.reason = reason
        snap.preserved_blocks = 0
        snap.hole_blocks = 0
        slots.pending.extend(snap.private.arrays()[2].tolist())
        snap.private = ChainIndex()
        slots.pending.extend(self.collect_garbage(snap.volume))
        self._notices.append(notice)

        def undo() -> None:
            snap.state, snap.reason, snap.preserved_blocks, snap.hole_blocks, snap.private = old
            chain.restore(saved)
            del slots.pending[pending:]
            self._notices.remove(notice)

        self.on_abort(undo)
        self.write_table()

    def _volume_name(self, vol_id: int) -> str:
        for rec in self._volume_records.values():
            if rec.id == vol_id:
                return rec.name
        return str(vol_id)

    def _pack_table(self, seq: int) -> bytes:
        table: dict[str, Any] = {
            "capacity": self._capacity,
            "next_epoch": self._next_epoch,
            "next_snapshot_id": self._next_snapshot_id,
            "next_volume_id": self._next_volume_id,
            "volumes": [v.to_json() for v in self._volume_records.values()],
            "snapshots": [s.to_json() for s in self._snapshots.values()],
        }
        try:
            return layout.pack_table(seq, table)
        except ValueError:
            raise StoreError(path=self._path, detail="too many snapshots and volumes for the table") from None

    # ------------------------------------------------------------------ preserved copies and slots

    def chain(self, vol_id: int) -> ChainIndex:
        """The association index of a volume's preserved copies."""
        return self._chains[vol_id]

    def collect_garbage(self, vol_id: int) -> list[int]:
        """Drop the copies of a volume no valid snapshot reads any more; return their slots."""
        chain = self._chains[vol_id]
        blocks, gens, slots = chain.arrays()
        if not len(blocks):
            return []
        epochs = np.array(sorted(s.epoch for s in self.live_snapshots(vol_id)), np.int64)
        keep = referenced(blocks, gens, epochs)
        if keep.all():
            return []
        freed: list[int] = slots[~keep].tolist()
        chain.keep(keep)
        return freed

    def count_cow_copies(self, n: int, holes: int = 0) -> None:
        """Count `n` more blocks copied before being overwritten (`StoreStats.cow_copies`) and `holes`
        more preserved as hole entries (`StoreStats.cow_holes`)."""
        self._cow_copies += n
        self._cow_holes += holes


def check_arguments(capacity: int | None, on_full: str) -> None:
    """Refuse an unknown `on_full` policy or a negative capacity (`InvalidArgument`)."""
    if on_full not in ON_FULL_POLICIES:
        raise InvalidArgument(detail=f"on_full must be one of {', '.join(ON_FULL_POLICIES)}, not {on_full!r}")
    if capacity is not None and capacity < 0:
        raise InvalidArgument(detail=f"capacity {capacity} is negative")

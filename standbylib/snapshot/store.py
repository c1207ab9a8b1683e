"""The preservation store: slots, entries, the table, group commit and recovery.

A store is one file (or RAM) shared by any number of volumes (claim 18), each
with any number of snapshots (claim 19). It owns:

* the table of volumes and snapshots, written alternately to two checksummed
  copies so an update is atomic;
* the areas of slots that hold preserved blocks, each described by a 32-byte
  entry (what block, which generation or snapshot, commit number, data CRC);
* one `ChainIndex` per volume and one per writable snapshot, rebuilt on open;
* the commit protocol: every write since the last commit becomes durable with
  a single ``sync`` of the store file, and slots freed meanwhile are reused only
  after that sync;
* group commit (`flush`): callers that want their writes durable share commits.
  One of them (the leader) commits for all, running the sync without the lock so
  that writes go on meanwhile; those wait for the next commit, which covers them
  all. A caller returns only once a commit prepared after its call began has
  synced; when that commit fails, every caller it covered gets the error.

Crash safety: each commit records, just before its sync, that the commit
before it completed. On open, only the entries of commits after the recorded
one can be incomplete; their data is checked against their checksum and
dropped when it does not match, which is safe because the origin blocks they
preserve were not overwritten before that commit's sync.

Failures: an operation that fails before its commit completes (no space, an I/O error) is undone
in RAM (`transaction`): the slots it took are given back, and the entries it may have written are
zeroed before any later commit could declare them complete (or, when even that fails, the slots are
kept aside, `quarantine`, and every commit refuses to run until they are zeroed). A failed sync may
have lost any write since the previous sync even if a later sync succeeds (the kernel may drop the
pages it failed to write), so the writes that RAM still relies on are written again before the next
commit's sync.

Threading: the store's `lock` is a reader-writer lock (`RWLock`). Everything that changes the
store, an index or an origin takes its exclusive side (``with store.lock:``); snapshot reads and
queries that only look take its shared side (``with store.lock.shared():``), so they run in parallel
with each other but never see a change half made. Volumes and snapshots use the same lock. The
`on_invalidated` listener is called with the exclusive side held. Only the sync of a group commit
runs without the lock; at most one commit is between its preparation and its end at any time
(`_syncing`), and a commit made under the lock (`commit`) first waits for that one to end.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from standbylib.blockdev import BlockDevice, check_block_size
from standbylib.errors import (
    Closed,
    DeviceError,
    InvalidArgument,
    StandbyError,
    StoreCorrupt,
    StoreError,
    StoreNotWritable,
    UnknownVolume,
    VolumeMismatch,
)
from standbylib.rawfile import MemFile, OsFile, RawFile, fsync_directory, io_error, is_zero
from standbylib.snapshot import layout, stamp
from standbylib.snapshot.index import ChainIndex, sort_run
from standbylib.snapshot.records import INVALID, SnapshotRecord, VolumeRecord, check_name
from standbylib.snapshot.rwlock import RWLock

if TYPE_CHECKING:
    from standbylib.snapshot.volume import Volume

ON_FULL_POLICIES = ("invalidate", "defer")
#: Longest a group commit's leader waits for the callers of the previous commit (`PreservationStore.flush`).
_GATHER_MAX = 0.005
_PER_AREA = layout.ENTRIES_PER_AREA

#: ``on_invalidated(volume, snapshot, reason)``: a snapshot became invalid, durably.
InvalidationListener = Callable[[str, str, str], None]


@dataclass(frozen=True)
class StoreStats:
    """Counters of a store; bytes are slot bytes (block size x preserved blocks)."""

    capacity_bytes: int
    used_bytes: int
    preserved_blocks: int
    cow_copies: int
    snapshots: int
    invalid_snapshots: int
    syncs: int
    bytes_written: int

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def fill_ratio(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


@dataclass(eq=False)
class _Commit:
    """One commit from its preparation (`PreservationStore._prepare`) to its end (`_finish`).

    What it took from the store when it was prepared goes back if its sync fails: the write ranges
    its sync covers (`covered`), the slots freed before it (`freed`, reused only once it synced), the
    invalidations to tell (`notices`), whether an operation had failed before it (`unsettled`).
    """

    seq: int  # its commit number: the entries written before its preparation carry it (or less)
    synced: bool  # it syncs (something was written since the previous commit)
    table_at: int | None  # the table copy it wrote
    covered: list[list[int]]
    freed: list[int]
    notices: list[tuple[str, str, str]]
    unsettled: bool
    flushers: int = 0  # `flush` callers waiting when it was prepared (it covers them)
    done: bool = False  # its sync returned (set under `_commit_cv`)
    error: BaseException | None = None  # what its sync (or preparation) raised
    finished: bool = False  # `_finish` ran


class PreservationStore:
    """Copy-on-write preservation store. Create with `open` (file) or `in_memory` (RAM)."""

    def __init__(
        self,
        raw: RawFile,
        *,
        capacity: int | None,
        on_full: str,
        new: bool,
        on_invalidated: InvalidationListener | None = None,
    ) -> None:
        _check_arguments(capacity, on_full)
        self.raw = raw
        self.path = raw.path
        self.on_full = on_full
        self.on_invalidated = on_invalidated
        self.lock = RWLock()
        self.closed = False
        self.table_seq = 0
        self.next_epoch = 1
        self.next_snapshot_id = 1
        self.next_volume_id = 1
        self.capacity = 0
        self.volume_records: dict[str, VolumeRecord] = {}
        self.snapshots: dict[int, SnapshotRecord] = {}
        self.chains: dict[int, ChainIndex] = {}
        self.attached: dict[int, Volume] = {}
        # Slot space.
        self.area_offsets: list[int] = []
        self.area_slot_sizes: list[int] = []
        self._area_arrays: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] = (
            np.empty(0, np.int64),
            np.empty(0, np.int64),
        )
        self.end = layout.AREAS_OFFSET
        self.free: dict[int, list[int]] = {}  # slot size -> free slots, sorted descending
        self.pending_free: list[int] = []
        # Slots freed because a writable snapshot rewrote their block are not deallocated (`free_rewritten`).
        self.rewritten: set[int] = set()  # such slots, waiting in `pending_free` (or a commit's `freed`)
        self.allocated_free: set[int] = set()  # free slots whose data was not deallocated
        self.used_bytes = 0
        self.live_slots = 0
        # Commit state. `commit_seq` numbers the open commit, the one new writes join;
        # `_durable_seq` is the last one whose sync succeeded (what the next commit record names).
        self.commit_seq = 1
        self._durable_seq = 0
        self._record_parity = 1  # which commit record the next commit writes; flips when one syncs
        # Group commit (`flush`): the commit between its preparation and its end, the leader elected
        # among `flush` callers, and the failures they may have to report, under `_commit_cv`.
        commit_lock = threading.Lock()
        self._commit_cv = threading.Condition(commit_lock)
        self._gather_cv = threading.Condition(commit_lock)  # a caller arrived (for the leader)
        self._syncing: _Commit | None = None
        self._leader = False
        self._flushers: dict[int, int] = {}  # target commit -> `flush` callers waiting for it
        self._last_batch = 0  # callers the last group commit covered
        self._last_sync = 0.0  # seconds the last sync took
        self._failures = 0
        self._failed: tuple[int, BaseException] | None = None  # (commit number, error) of the last
        self.private_ver = 0
        self.dirty = False
        self.table_pending = False
        self.cow_copies = 0
        # Failure handling (see the module docstring).
        self._undo: list[Callable[[], None]] | None = None  # of the operation in progress
        self.quarantine: list[int] = []  # slots whose entries could not be zeroed yet
        self._unsynced: list[list[int]] = []  # [offset, end) written since the last sync
        self._sync_failed = False
        self._unsettled = False  # an operation failed since the last commit
        self._notices: list[tuple[str, str, str]] = []  # invalidations, told once durable
        if new:
            if capacity is None:
                raise InvalidArgument(detail="a new preservation store needs a capacity")
            self.capacity = capacity
            # The superblock goes last: until it is durable the file is recognisably
            # an interrupted creation (see `open_raw`), never a store with a lost table.
            self.raw.truncate(0)
            self.write_table()
            self.commit()
            self.raw.pwrite(layout.pack_superblock(), 0)
            self.raw.sync()
        else:
            self._recover()
            if capacity is not None and capacity != self.capacity:
                self.capacity = capacity
                self.write_table()
                self.commit()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str,
        capacity: int | None = None,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """Open the store file at `path`, creating it when missing (then `capacity` is required).

        `capacity` (bytes) limits the preserved data; given for an existing store it
        replaces the stored capacity. `on_full` is ``invalidate`` (default: the
        affected snapshots become invalid, origin writes go on) or ``defer``
        (`Volume.write_batch` raises `PreservationDeferred` and applies nothing).

        `on_invalidated(volume, snapshot, reason)` is called once per snapshot that becomes
        invalid, whatever the cause (overflow, capacity, an origin changed behind the engine's
        back), as soon as that is durable. It is called with the store's lock held, from the
        thread whose operation caused it: it must be quick and must not call back into the store
        (queue the event instead). What it raises is suppressed: it cannot fail a write.
        """
        _check_arguments(capacity, on_full)
        exists = os.path.exists(path)
        if not exists:
            if capacity is None:
                raise InvalidArgument(detail=f"{path} does not exist; give a capacity to create a store")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.access(parent, os.W_OK):
                raise StoreNotWritable(path=path, detail=f"directory {parent} is not writable")
        elif not os.access(path, os.R_OK | os.W_OK):
            raise StoreNotWritable(path=path, detail="permission denied")
        # A new store is built under a temporary name and renamed into place once
        # complete, so a crash never leaves a half-made store at `path`.
        work = f"{path}.creating" if not exists else path
        try:
            if not exists and os.path.exists(work):
                os.unlink(work)
            raw = OsFile(work, create=not exists)
        except (DeviceError, OSError) as e:
            detail = e.fields["detail"] if isinstance(e, DeviceError) else (e.strerror or str(e))
            raise StoreNotWritable(path=path, detail=detail) from e
        try:
            store = cls(
                raw, capacity=capacity, on_full=on_full, new=not exists, on_invalidated=on_invalidated
            )
            if not exists:
                try:
                    os.rename(work, path)
                    raw.path = store.path = path
                    fsync_directory(path)
                except OSError as e:
                    raise io_error(path, "create", e) from e
            return store
        except BaseException:
            raw.close()
            if not exists:
                with contextlib.suppress(OSError):
                    os.unlink(work)
            raise

    @classmethod
    def in_memory(
        cls,
        capacity: int,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """A store held in RAM (claim 4): fast, lost when the process ends."""
        return cls(
            MemFile(path="<ram>"), capacity=capacity, on_full=on_full, new=True, on_invalidated=on_invalidated
        )

    @classmethod
    def open_raw(
        cls,
        raw: RawFile,
        capacity: int | None = None,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """Open a store on any `RawFile` (used by tests to inject faults).

        An empty file, or one whose creation was interrupted before its superblock
        became durable (nothing can have been preserved in it yet), is made a new store.
        """
        return cls(
            raw, capacity=capacity, on_full=on_full, new=_unformatted(raw), on_invalidated=on_invalidated
        )

    def close(self) -> None:
        """Stamp the attached volumes' origins clean, commit what is pending and close the file.

        Volumes and snapshots become unusable. The file is closed even when the last commit fails
        (that error is raised): writes to writable snapshots not flushed before may then be lost.
        """
        with self.lock:
            if self.closed:
                return
            try:
                self._settle()  # a group commit's sync in progress ends before the file closes
                for vol in list(self.attached.values()):
                    self.stamp_clean(vol, commit=False)
                if self.needs_commit():
                    self.commit()
            finally:
                self.closed = True
                self.raw.close()
                with self._commit_cv:
                    self._commit_cv.notify_all()  # `flush` callers waiting get `Closed`
                    self._gather_cv.notify_all()

    def __enter__(self) -> PreservationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ volumes

    def attach(self, name: str, device: BlockDevice, *, block_size: int = 4096) -> Volume:
        """Attach the origin `device` as volume `name`, registering it on first use.

        The volume's block size is fixed at registration; attaching again with
        another block size, or a smaller device, raises `VolumeMismatch`. The
        caller keeps ownership of `device`.
        """
        from standbylib.snapshot.volume import Volume

        check_name("volume", name)
        check_block_size(block_size)
        size = device.size
        if size % block_size:
            raise InvalidArgument(
                detail=f"volume {name!r}: size {size} is not a multiple of the block size {block_size}"
            )
        with self.lock:
            self.check_open()
            rec = self.volume_records.get(name)
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
                if rec.id in self.attached:
                    raise VolumeMismatch(volume=name, detail="already attached")
            # Taken before anything is written through the engine; durable before attach returns, so
            # that a clean stamp of a previous close never outlives the first write of this attach.
            in_use = stamp.take(device, clean=False)
            changed = ""
            with self.transaction():
                if rec is None:
                    rec = VolumeRecord(self.next_volume_id, name, block_size, size, in_use)
                    self.next_volume_id += 1  # ids are never reused, even after a failure
                    self._register(rec)
                    self.write_table()
                else:
                    changed = self._check_stamp(rec, device)
                    if size > rec.size:
                        self._set_volume(rec, size=size)
                    if in_use != rec.stamp:
                        self._set_volume(rec, stamp=in_use)
                if self.table_pending:
                    self.commit()
            vol = Volume(self, rec, device)
            vol.changed_outside = changed
            self.attached[rec.id] = vol
            return vol

    def _register(self, rec: VolumeRecord) -> None:
        self.volume_records[rec.name] = rec
        self.chains[rec.id] = ChainIndex()

        def undo() -> None:
            del self.volume_records[rec.name]
            del self.chains[rec.id]

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

    def stamp_clean(self, vol: Volume, *, commit: bool = True) -> None:
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

    def volume(self, name: str) -> Volume:
        """The attached volume `name`."""
        with self.lock.shared():
            rec = self.volume_records.get(name)
            if rec is None or rec.id not in self.attached:
                raise UnknownVolume(volume=name)
            return self.attached[rec.id]

    def volume_names(self) -> list[str]:
        """Names of every volume registered in the store, attached or not."""
        with self.lock.shared():
            return sorted(self.volume_records)

    # ------------------------------------------------------------------ stats

    def stats(self) -> StoreStats:
        with self.lock.shared():
            return StoreStats(
                capacity_bytes=self.capacity,
                used_bytes=self.used_bytes,
                preserved_blocks=self.live_slots,
                cow_copies=self.cow_copies,
                snapshots=len(self.snapshots),
                invalid_snapshots=sum(1 for s in self.snapshots.values() if not s.valid),
                syncs=self.raw.counters.syncs,
                bytes_written=self.raw.counters.bytes_written,
            )

    def index_bytes(self) -> int:
        """RAM held by the association indexes (arrays, overlays merged)."""
        with self.lock:
            total = 0
            for chain in self.chains.values():
                chain.merge()
                total += chain.nbytes
            for snap in self.snapshots.values():
                snap.private.merge()
                total += snap.private.nbytes
            return total

    # ------------------------------------------------------------------ internals used by volumes

    def check_open(self) -> None:
        if self.closed:
            raise Closed(what=f"preservation store {self.path}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo the RAM changes of the operation in the block if it fails before its commit.

        Changes register their undo with `on_abort`; a successful `commit` makes everything
        before it durable, so it forgets the undos registered so far. On an exception the undos
        run newest first, then the exception goes on. A transaction inside another joins it.
        Call with the exclusive lock held.
        """
        if self._undo is not None:
            yield
            return
        self._undo = []
        try:
            yield
        except BaseException:
            undo, self._undo = self._undo, None
            self._unsettled = True
            for fn in reversed(undo):
                fn()
            raise
        self._undo = None

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run `fn` if the operation in progress fails before its next commit (see `transaction`)."""
        if self._undo is not None:
            self._undo.append(fn)

    def needs_commit(self) -> bool:
        """Whether something written (or a failure's clean-up) still waits for a commit."""
        return self.dirty or self.table_pending or bool(self.quarantine)

    def unsettled(self) -> bool:
        """Whether an operation failed since the last commit. Its undo left RAM as before, but the
        file may hold what it wrote (a table naming a snapshot whose creation failed): commit before
        changing an origin without preserving, so that no power loss can bring that back."""
        return self._unsettled or self.table_pending or bool(self.quarantine)

    def invalidate(self, snap: SnapshotRecord, reason: str) -> None:
        """Mark `snap` invalid and free, at the next commit, what only it used.

        Durable with the next commit, which tells `on_invalidated`; undone if the operation
        fails before that commit.
        """
        chain = self.chains[snap.volume]
        old = (snap.state, snap.reason, snap.preserved_blocks, snap.private)
        saved = chain.arrays()
        pending = len(self.pending_free)
        notice = (self._volume_name(snap.volume), snap.name, reason)
        snap.state = INVALID
        snap.reason = reason
        snap.preserved_blocks = 0
        self.pending_free.extend(snap.private.arrays()[2].tolist())
        snap.private = ChainIndex()
        self.pending_free.extend(self.collect_garbage(snap.volume))
        self._notices.append(notice)

        def undo() -> None:
            snap.state, snap.reason, snap.preserved_blocks, snap.private = old
            chain.restore(saved)
            del self.pending_free[pending:]
            self._notices.remove(notice)

        self.on_abort(undo)
        self.write_table()

    def _volume_name(self, vol_id: int) -> str:
        for rec in self.volume_records.values():
            if rec.id == vol_id:
                return rec.name
        return str(vol_id)

    def live_snapshots(self, vol_id: int) -> list[SnapshotRecord]:
        """Valid snapshots of a volume, oldest first."""
        live = [s for s in self.snapshots.values() if s.volume == vol_id and s.valid]
        live.sort(key=lambda s: s.epoch)
        return live

    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    def write_table(self) -> None:
        """Schedule the table for the next commit.

        The table is written once per commit, to the copy that does not hold the
        last durable table, just before the sync: two table writes in one commit
        would overwrite that copy before the new one is durable.
        """
        self._pack_table(self.table_seq + 1)  # refuse an oversized table now, not at commit
        self.table_pending = True
        self.dirty = True

    def _pack_table(self, seq: int) -> bytes:
        table: dict[str, Any] = {
            "capacity": self.capacity,
            "next_epoch": self.next_epoch,
            "next_snapshot_id": self.next_snapshot_id,
            "next_volume_id": self.next_volume_id,
            "volumes": [v.to_json() for v in self.volume_records.values()],
            "snapshots": [s.to_json() for s in self.snapshots.values()],
        }
        try:
            return layout.pack_table(seq, table)
        except ValueError:
            raise StoreError(path=self.path, detail="too many snapshots and volumes for the table") from None

    def commit(self) -> None:
        """Make every write since the last commit durable with one sync; then reuse freed slots.

        Call with the exclusive lock held: the sync runs under it. A group commit in progress
        (`flush`) ends first. Refuses (raising the write's error) while entries of a failed operation
        cannot be zeroed. When it fails, nothing is declared durable: the table stays pending, the
        table copy it may have written is made unreadable (it could describe changes the failed
        operation undoes), and after a failed sync the writes RAM relies on are written again by the
        next commit.
        """
        self._settle()
        c = self._prepare()
        self._sync(c)
        self._finish(c)
        if c.error is not None:
            raise c.error
        if self._undo is not None:
            self._undo.clear()  # durable now: a later failure of the operation keeps it

    def flush(self) -> None:
        """Make every write made so far to the store durable, sharing the commit with other callers.

        Group commit: while a commit's sync is in progress, callers wait for it to end, then one of
        them (the leader) commits for all of them, with its sync outside the lock so that writes go
        on meanwhile. A caller returns once a commit prepared after its call began has synced. When
        that commit fails, every caller it covered raises the error, and nothing is reported durable
        (the next commit writes again what the failed sync may have lost). Called with the exclusive
        lock held, it commits under it (`commit`). Raises `Closed` once the store is closed.

        Before preparing, the leader waits a little (`_GATHER_MAX` at most, and half the duration of
        the last sync) for as many callers as the previous group commit covered: callers that it
        released come back with their next request within a millisecond or so, and would otherwise
        just miss the next commit and wait for two syncs instead of one. The next leader is elected
        as soon as a sync returns; it ends that commit itself (`_settle`) if its leader has not yet.
        """
        if self.lock.owned():
            with self.lock:
                self.check_open()
                self.commit()
            return
        cv = self._commit_cv
        with cv:
            # Everything written so far carries at most `commit_seq`, which only `_prepare` moves on
            # (under this condition's lock): the commits after the one syncing cover it.
            target = self.commit_seq
            failures = self._failures
            self._flushers[target] = self._flushers.get(target, 0) + 1
            self._gather_cv.notify()
        try:
            while True:
                with cv:
                    while True:
                        if self._durable_seq >= target:
                            return
                        failed = self._failed
                        if self._failures != failures and failed is not None and failed[0] >= target:
                            raise _copy_error(failed[1], self.path)
                        if self.closed:
                            raise Closed(what=f"preservation store {self.path}")
                        syncing = self._syncing
                        if not self._leader and (syncing is None or syncing.done):
                            self._leader = True
                            break
                        cv.wait()
                    self._gather()
                self._lead(target)
        finally:
            with cv:
                left = self._flushers[target] - 1
                if left:
                    self._flushers[target] = left
                else:
                    del self._flushers[target]

    def _waiting_flushers(self) -> int:
        """`flush` callers not covered by a synced commit yet (under `_commit_cv`)."""
        return sum(n for t, n in self._flushers.items() if t > self._durable_seq)

    def _gather(self) -> None:
        """The elected leader, under `_commit_cv`: wait a little for the previous batch to come back."""
        if self._last_batch <= 1:
            return
        deadline = time.monotonic() + min(self._last_sync / 2, _GATHER_MAX)
        while self._waiting_flushers() < self._last_batch and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._gather_cv.wait(left)

    def _lead(self, target: int) -> None:
        """Commit for every `flush` caller: prepare under the lock, sync without it, finish under it.
        The leadership ends once the sync returned (or nothing was to be synced)."""
        try:
            with self.lock:
                self.check_open()
                self._settle()
                if self._durable_seq >= target:
                    c = None  # a commit made meanwhile under the lock covered it
                else:
                    try:
                        c = self._prepare()
                    except BaseException as e:
                        self._fail(self.commit_seq, e)
                        raise
        except BaseException:
            self._resign()
            raise
        if c is None:
            self._resign()
            return
        self._sync(c, leader=True)
        with self.lock:
            self._finish(c)  # unless the next leader (`_settle`) or `close` finished it already
        if c.error is not None:
            raise c.error

    def _resign(self) -> None:
        with self._commit_cv:
            self._leader = False
            self._commit_cv.notify_all()

    def _settle(self) -> None:
        """With the exclusive lock held: wait for the sync of a group commit in progress, and end it."""
        c = self._syncing
        if c is None:
            return
        with self._commit_cv:
            while not c.done:
                self._commit_cv.wait()
        self._finish(c)

    def _prepare(self) -> _Commit:
        """First half of a commit, with the exclusive lock held and no commit in progress.

        Writes what the next sync must make durable (writes lost by a failed sync, the table, the
        commit record naming the last commit known synced) and takes the lists that wait for that
        sync; from here on new writes carry the next commit number. Raises, with nothing taken,
        when a write fails.
        """
        if self.quarantine:
            self._clear_entries(self.quarantine)
            self._give_back(self.quarantine)
            self.quarantine = []
        if self._sync_failed:
            self._rewrite_unsynced()
        table_at: int | None = None
        try:
            if self.table_pending:
                # Update n goes to copy n % 2: never the copy holding the last durable table (n - 1),
                # however many times a failed commit is retried.
                seq = self.table_seq + 1
                table_at = layout.TABLE_OFFSETS[seq % 2]
                self.raw.pwrite(self._pack_table(seq), table_at)
                self.dirty = True
            if self.dirty:
                # Say which commit is known to have ended with a sync, so that recovery checks only
                # the entries of commits that may not have completed. Two records, alternately (the
                # alternation moves on only when a commit syncs): a torn record never hides the
                # previous one (recovery would otherwise check, and drop, entries of long-complete
                # commits).
                record_at = layout.COMMIT_RECORD_OFFSETS[self._record_parity]
                self.raw.pwrite(layout.pack_commit_record(self._durable_seq), record_at)
        except BaseException:
            if table_at is not None:
                with contextlib.suppress(StandbyError):
                    self._zero_range(table_at, layout.TABLE_HEADER_SIZE)
            raise
        c = _Commit(
            seq=self.commit_seq,
            synced=self.dirty,
            table_at=table_at,
            covered=self._unsynced,
            freed=self.pending_free,
            notices=self._notices,
            unsettled=self._unsettled,
        )
        self._unsynced, self.pending_free, self._notices = [], [], []
        self.table_pending = False
        self._unsettled = False
        self.dirty = False
        with self._commit_cv:
            c.flushers = self._waiting_flushers()
            self.commit_seq += 1  # writes made from now on (during the sync) belong to the next commit
        self._syncing = c
        return c

    def _sync(self, c: _Commit, *, leader: bool = False) -> None:
        """The sync of commit `c` (with or without the lock); its outcome is published at once, so
        that `flush` callers it covers return without waiting for `_finish` (and, from a group
        commit's `leader`, the next leader may be elected)."""
        error: BaseException | None = None
        if c.synced:
            start = time.monotonic()
            try:
                self.raw.sync()
            except BaseException as e:
                error = e
            self._last_sync = time.monotonic() - start
        with self._commit_cv:
            c.error = error
            c.done = True
            if leader:
                self._leader = False
                self._last_batch = c.flushers
            if error is None:
                self._durable_seq = c.seq  # every write before its preparation is durable
            else:
                self._failures += 1
                self._failed = (c.seq, error)
            self._commit_cv.notify_all()

    def _fail(self, seq: int, error: BaseException) -> None:
        """A commit covering the writes up to commit `seq` failed before its sync: tell `flush` callers."""
        with self._commit_cv:
            self._failures += 1
            self._failed = (seq, error)
            self._commit_cv.notify_all()

    def _finish(self, c: _Commit) -> None:
        """End commit `c`, with the exclusive lock held: reuse the slots freed before it and tell the
        invalidations once it synced; otherwise give back what it took, so that the next commit
        writes again what the failed sync may have lost and the slots wait for that one."""
        if c.finished:
            return
        c.finished = True
        self._syncing = None
        if c.error is None:
            if c.table_at is not None:
                self.table_seq += 1
            if c.synced:
                self._record_parity ^= 1
            if c.freed:
                self.release(c.freed)
            if c.notices and self.on_invalidated is not None:
                for volume, snapshot, reason in c.notices:
                    with contextlib.suppress(Exception):
                        self.on_invalidated(volume, snapshot, reason)
        else:
            self._sync_failed = True
            self.dirty = True
            if c.table_at is not None:
                self.table_pending = True
                with contextlib.suppress(StandbyError):
                    self._zero_range(c.table_at, layout.TABLE_HEADER_SIZE)
            self._unsynced[:0] = c.covered
            self.pending_free[:0] = c.freed
            self._notices[:0] = c.notices
            self._unsettled = self._unsettled or c.unsettled
        # No one to wake: `_sync` published the outcome (`flush` callers and `_settle` wait for that).

    def note_written(self, offset: int, length: int) -> None:
        """Remember a write that RAM will rely on once committed (see `_rewrite_unsynced`)."""
        self.dirty = True
        if self._unsynced and self._unsynced[-1][1] == offset:
            self._unsynced[-1][1] = offset + length
        else:
            self._unsynced.append([offset, offset + length])

    def _rewrite_unsynced(self) -> None:
        """After a failed sync: write again everything written since the last good sync.

        A failed fdatasync may have dropped those pages from the cache after failing to write them,
        and a later fdatasync would then report success without them. Rewriting them as they read
        now (RAM still has them, or they are on disk) makes them dirty again. Ranges that read as
        zeros are zeroed with `_zero_range`, which needs no space where they are holes.
        """
        for start, end in list(self._unsynced):
            for offset in range(start, end, 1 << 20):
                n = min(1 << 20, end - offset)
                data = self.raw.pread(n, offset)
                if is_zero(data):
                    self._zero_range(offset, n, note=False)  # already noted
                else:
                    self.raw.pwrite(data, offset)
        self._sync_failed = False

    def _zero_range(self, offset: int, length: int, *, note: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros, allocating no space where possible.

        Punching allocates nothing (a hole already reads as zeros; a range inside an allocated
        block is zeroed in place), but some filesystems leave a sub-block range that starts on a
        block boundary untouched: read back, and write zeros over what is still not zero (an
        allocated block, so the write needs no new space). Raises what the write or read raised.
        """
        with contextlib.suppress(StandbyError):
            self.raw.punch(offset, length)
        if not is_zero(self.raw.pread(length, offset)):
            self.raw.pwrite(bytes(length), offset)
        if note:
            self.note_written(offset, length)

    def _clear_entries(self, slots: list[int]) -> None:
        """Zero the entries of `slots` (one range per contiguous run). Raises when one cannot be."""
        ordered = sorted(slots)
        for i, j in self.slot_runs(ordered):
            self._zero_range(self.entry_offset(ordered[i]), (j - i) * layout.ENTRY_SIZE)

    def _abort_slots(self, slots: list[int]) -> None:
        """Give back `slots`, taken by an operation that failed before its commit.

        Their entries may be on disk, whole or torn, describing data that will never be
        committed: they are zeroed first, so no later commit can declare them complete. When that
        fails too, the slots wait in `quarantine` (out of the free lists: not reused, not counted)
        and every commit first zeroes them. Never raises.
        """
        by_size: dict[int, int] = {}
        for slot in slots:
            size = self.area_slot_sizes[slot // _PER_AREA]
            by_size[size] = by_size.get(size, 0) + 1
        for size, n in by_size.items():
            self.used_bytes -= n * size
            self.live_slots -= n
        try:
            self._clear_entries(slots)
        except StandbyError:
            self.quarantine.extend(slots)
            return
        self._give_back(slots)

    def _give_back(self, slots: list[int]) -> None:
        """Put slots no longer counted as used back on their free lists, deallocating their data
        (except slots of rewritten blocks, see `free_rewritten`)."""
        by_size: dict[int, list[int]] = {}
        for slot in slots:
            by_size.setdefault(self.area_slot_sizes[slot // _PER_AREA], []).append(slot)
        rewritten = self.rewritten
        for size, group in by_size.items():
            punch = group
            if rewritten:
                kept = rewritten.intersection(group)
                if kept:
                    rewritten.difference_update(kept)
                    self.allocated_free.update(kept)
                    punch = [s for s in group if s not in kept]
            if punch:
                self._deallocate(sorted(punch), size)
            free = self.free.setdefault(size, [])
            free.extend(group)
            free.sort(reverse=True)

    def slot_offset(self, slot: int) -> int:
        area, i = divmod(slot, _PER_AREA)
        return self.area_offsets[area] + layout.ENTRY_BLOCK + i * self.area_slot_sizes[area]

    def slot_offsets(self, slots: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """`slot_offset` of each of `slots`, vectorised."""
        starts, sizes = self._area_arrays
        if len(starts) != len(self.area_offsets):
            # Areas are only ever added: rebuild when one was (racing readers build the same arrays).
            starts = np.array(self.area_offsets, np.int64) + layout.ENTRY_BLOCK
            sizes = np.array(self.area_slot_sizes, np.int64)
            self._area_arrays = (starts, sizes)
        slot = slots.astype(np.int64)
        area = slot // _PER_AREA
        offsets: npt.NDArray[np.int64] = starts[area] + (slot - area * _PER_AREA) * sizes[area]
        return offsets

    def entry_offset(self, slot: int) -> int:
        area, i = divmod(slot, _PER_AREA)
        return self.area_offsets[area] + layout.AREA_HEADER + i * layout.ENTRY_SIZE

    def allocate(self, slot_size: int, n: int) -> list[int]:
        """Take `n` free slots of `slot_size`, lowest first, adding areas as needed.

        If the operation in progress fails before its commit, the slots are given back
        (`_abort_slots`): a failed write never keeps space.
        """
        free = self.free.setdefault(slot_size, [])
        while len(free) < n:
            self._add_area(slot_size)
        taken = free[-n:]
        del free[-n:]
        taken.reverse()
        if self.allocated_free:
            self.allocated_free.difference_update(taken)
        self.used_bytes += n * slot_size
        self.live_slots += n
        self.on_abort(lambda: self._abort_slots(taken))
        return taken

    def release(self, slots: Iterable[int]) -> None:
        """Return slots to the free lists and deallocate their data (punch holes, best effort)."""
        by_size: dict[int, list[int]] = {}
        for slot in slots:
            by_size.setdefault(self.area_slot_sizes[slot // _PER_AREA], []).append(slot)
        for size, group in by_size.items():
            group.sort()
            self.used_bytes -= len(group) * size
            self.live_slots -= len(group)
        self._give_back([s for group in by_size.values() for s in group])

    def free_rewritten(self, slots: list[int]) -> None:
        """Free `slots`, whose blocks a writable snapshot rewrote, once the next commit synced, without
        deallocating their data: writes reuse such slots soon, and punching a hole that the next
        write allocates again costs more than the write (a fallocate, then block allocation that
        the next sync must commit). `deallocate_free` punches them when space matters."""
        self.pending_free.extend(slots)
        self.rewritten.update(slots)

    def deallocate_free(self) -> None:
        """Punch holes in the free slots `free_rewritten` left allocated (when a snapshot is deleted)."""
        if not self.allocated_free:
            return
        by_size: dict[int, list[int]] = {}
        for slot in self.allocated_free:
            by_size.setdefault(self.area_slot_sizes[slot // _PER_AREA], []).append(slot)
        self.allocated_free.clear()
        for size, group in by_size.items():
            self._deallocate(sorted(group), size)

    def _deallocate(self, group: list[int], size: int) -> None:
        """Punch holes in the data of the sorted slots `group`. Best effort: it only gives space back
        to the filesystem (free slots are never read), so a failure is ignored."""
        start = prev = group[0]
        for slot in [*group[1:], -1]:
            if slot == prev + 1 and slot // _PER_AREA == start // _PER_AREA:
                prev = slot
                continue
            with contextlib.suppress(StandbyError):
                self.raw.punch(self.slot_offset(start), (prev - start + 1) * size)
            start = prev = slot

    def write_slots(self, slots: list[int], data: memoryview, slot_size: int) -> None:
        """Write consecutive `slot_size` pieces of `data` to `slots`, one pwrite per contiguous run."""
        for i, j in self.slot_runs(slots):
            self.raw.pwrite(data[i * slot_size : j * slot_size], self.slot_offset(slots[i]))
            self.note_written(self.slot_offset(slots[i]), (j - i) * slot_size)

    def write_entries(
        self,
        slots: list[int],
        kind: int,
        vol: int,
        tags: Iterable[int],
        blocks: Iterable[int],
        sums: list[int],
        segments: list[tuple[int, int]] | None,
    ) -> None:
        """Write the entries describing `slots` (one pwrite per contiguous run within an area).

        For copies, `segments` (from `slot_runs`) group slots whose data shares one
        checksum: each entry records its index in its segment and the segment length.
        """
        n = len(slots)
        entries = np.zeros(n, layout.ENTRY_DTYPE)
        entries["kind"] = kind
        entries["vol"] = vol
        entries["tag"] = np.fromiter(tags, np.uint32, n)
        entries["block"] = np.fromiter(blocks, np.uint64, n)
        entries["seq"] = self.commit_seq
        entries["dsum"] = sums
        if kind == layout.PRIVATE:
            entries["reserved"] = np.arange(self.private_ver + 1, self.private_ver + 1 + n, dtype=np.uint32)
            self.private_ver += n
        elif segments is not None:
            for start, end in segments:
                entries["pad"][start:end] = np.arange(end - start, dtype=np.uint8)
                entries["reserved"][start:end] = end - start
        raw = entries.tobytes()
        for i, j in self.slot_runs(slots):
            self.raw.pwrite(raw[i * layout.ENTRY_SIZE : j * layout.ENTRY_SIZE], self.entry_offset(slots[i]))
            self.note_written(self.entry_offset(slots[i]), (j - i) * layout.ENTRY_SIZE)

    @staticmethod
    def slot_runs(slots: list[int]) -> list[tuple[int, int]]:
        """Split positions [0, n) of `slots` into runs of consecutive slots within one area
        (each run is contiguous in the store file)."""
        runs = []
        n = len(slots)
        i = 0
        while i < n:
            j = i + 1
            area = slots[i] // _PER_AREA
            while j < n and slots[j] == slots[j - 1] + 1 and slots[j] // _PER_AREA == area:
                j += 1
            runs.append((i, j))
            i = j
        return runs

    @staticmethod
    def copy_pieces(runs: list[tuple[int, int]], blocks: list[int]) -> list[tuple[int, int]]:
        """Split slot `runs` further where `blocks` are not consecutive: each piece is
        contiguous both in the origin and in the store."""
        pieces = []
        for start, end in runs:
            i = start
            for j in range(start + 1, end):
                if blocks[j] != blocks[j - 1] + 1:
                    pieces.append((i, j))
                    i = j
            pieces.append((i, end))
        return pieces

    def collect_garbage(self, vol_id: int) -> list[int]:
        """Drop the copies of a volume no valid snapshot reads any more; return their slots."""
        chain = self.chains[vol_id]
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

    # ------------------------------------------------------------------ recovery

    def _add_area(self, slot_size: int) -> None:
        area_no = len(self.area_offsets)
        offset = self.end
        # Only the header: the rest of the entry block is a hole (free entries), since
        # nothing is ever left past the last area (recovery truncates what a crash left there).
        # An area added by an operation that fails later stays (empty, its header valid).
        self.raw.pwrite(layout.pack_area_header(area_no, slot_size), offset)
        self.note_written(offset, layout.AREA_HEADER)
        self.area_offsets.append(offset)
        self.area_slot_sizes.append(slot_size)
        self.end = offset + layout.area_size(slot_size)
        first = area_no * _PER_AREA
        free = self.free.setdefault(slot_size, [])
        free[:0] = range(first + _PER_AREA - 1, first - 1, -1)

    def _recover(self) -> None:
        raw = self.raw
        superblock = raw.pread(layout.SUPERBLOCK_SIZE, 0)
        problem = layout.check_superblock(superblock)
        if problem:
            raise StoreCorrupt(path=self.path, detail=problem)
        completed = max(layout.unpack_commit_record(superblock[off:]) for off in layout.COMMIT_RECORD_OFFSETS)
        best: tuple[int, dict[str, Any]] | None = None
        for off in layout.TABLE_OFFSETS:
            found = layout.unpack_table(raw.pread(layout.TABLE_SIZE, off))
            if found and (best is None or found[0] > best[0]):
                best = found
        if best is None:
            raise StoreCorrupt(path=self.path, detail="no intact volume and snapshot table")
        self.table_seq, table = best
        self.capacity = int(table["capacity"])
        self.next_epoch = int(table["next_epoch"])
        self.next_snapshot_id = int(table["next_snapshot_id"])
        self.next_volume_id = int(table["next_volume_id"])
        for v in table["volumes"]:
            rec = VolumeRecord.from_json(v)
            self.volume_records[rec.name] = rec
            self.chains[rec.id] = ChainIndex()
        for s in table["snapshots"]:
            snap = SnapshotRecord.from_json(s)
            self.snapshots[snap.id] = snap

        # Walk the areas, reading their entry blocks back to back into one buffer.
        size = raw.size()
        heads = bytearray(layout.ENTRY_BLOCK * 64)
        off = layout.AREAS_OFFSET
        n_areas = 0
        while off + layout.AREA_HEADER <= size:
            if len(heads) < (n_areas + 1) * layout.ENTRY_BLOCK:
                heads.extend(bytes(len(heads)))
            view = memoryview(heads)[n_areas * layout.ENTRY_BLOCK : (n_areas + 1) * layout.ENTRY_BLOCK]
            raw.preadinto(view, off)
            slot_size = layout.unpack_area_header(view, n_areas)
            view.release()  # the buffer may grow on the next turn
            if slot_size is None:
                break
            self.area_offsets.append(off)
            self.area_slot_sizes.append(slot_size)
            off += layout.area_size(slot_size)
            n_areas += 1
        self.end = off
        if size > off:
            # Only an unfinished commit can have written past the last intact area.
            raw.truncate(off)
        # Each 4 KiB entry block is 128 records of 32 bytes: the area header, then 127 entries.
        per_block = layout.ENTRY_BLOCK // layout.ENTRY_SIZE
        records = np.frombuffer(heads, layout.ENTRY_DTYPE, n_areas * per_block).reshape(n_areas, per_block)
        entries = records[:, per_block - _PER_AREA :].reshape(-1).copy()
        del heads, records
        kinds = entries["kind"].copy()
        nslots = len(entries)

        # Entries of a commit not known to be complete may be torn: check their data.
        used = kinds != layout.FREE
        dropped: list[int] = []
        self.commit_seq = completed + 1
        if used.any():
            self.commit_seq = max(self.commit_seq, int(entries["seq"][used].max()) + 1)
            checked: set[int] = set()
            for slot in np.nonzero(used & (entries["seq"] > completed))[0].tolist():
                if slot in checked:
                    continue
                if kinds[slot] == layout.COPY:  # a segment of copies shares one checksum
                    start = slot - int(entries["pad"][slot])
                    count = max(1, int(entries["reserved"][slot]))
                else:
                    start, count = slot, 1
                group = range(start, start + count)
                checked.update(group)
                data = raw.pread(count * self.area_slot_sizes[slot // _PER_AREA], self.slot_offset(start))
                if start // _PER_AREA != (start + count - 1) // _PER_AREA or layout.data_checksum(
                    data
                ) != int(entries["dsum"][slot]):
                    for s in group:
                        if kinds[s] != layout.FREE and entries["seq"][s] > completed:
                            kinds[s] = layout.FREE
                            dropped.append(s)
            self.private_ver = int(entries["reserved"][kinds == layout.PRIVATE].max(initial=0))

        live = np.zeros(nslots, bool)
        vols = entries["vol"]
        known_vols = {r.id for r in self.volume_records.values()}
        for vol_id in known_vols:
            sel = np.nonzero((kinds == layout.COPY) & (vols == vol_id))[0]
            if not len(sel):
                continue
            blocks, gens, slots = sort_run(
                entries["block"][sel].astype(np.uint64),
                entries["tag"][sel].astype(np.uint32),
                sel.astype(np.uint32),
            )
            epochs = np.array(sorted(s.epoch for s in self.live_snapshots(vol_id)), np.int64)
            keep = referenced(blocks, gens, epochs)
            slots, blocks, gens = slots[keep], blocks[keep], gens[keep]
            live[slots] = True
            self.chains[vol_id] = ChainIndex(blocks, gens, slots)
        for snap in self.snapshots.values():
            if not (snap.valid and snap.writable):
                continue
            sel = np.nonzero((kinds == layout.PRIVATE) & (entries["tag"] == snap.id))[0]
            if not len(sel):
                continue
            blocks = entries["block"][sel]
            # A block rewritten in a writable snapshot has several entries: the newest wins.
            order = np.lexsort((entries["reserved"][sel], entries["seq"][sel], blocks))
            sel, blocks = sel[order], blocks[order]
            last_of_block = np.ones(len(sel), bool)
            last_of_block[:-1] = blocks[1:] != blocks[:-1]
            sel, blocks = sel[last_of_block], blocks[last_of_block]
            live[sel] = True
            snap.private = ChainIndex(
                blocks.astype(np.uint64), np.zeros(len(sel), np.uint32), sel.astype(np.uint32)
            )

        # Free lists and usage.
        slot_sizes = np.repeat(np.array(self.area_slot_sizes, np.int64), _PER_AREA)
        for slot_size in set(self.area_slot_sizes):
            of_size = slot_sizes == slot_size
            self.free[slot_size] = np.nonzero(of_size & ~live)[0][::-1].tolist()
            n = int((of_size & live).sum())
            self.live_slots += n
            self.used_bytes += n * slot_size
        self._recount()

        # Forget torn entries for good and make what we read durable; only then may the
        # commit record declare those commits complete.
        for slot in dropped:
            raw.pwrite(bytes(layout.ENTRY_SIZE), self.entry_offset(slot))
        raw.sync()
        self._durable_seq = self.commit_seq - 1
        self._record_parity = self.commit_seq % 2
        self.dirty = True
        self.commit()

    def _recount(self) -> None:
        """Rebuild each snapshot's preserved-block count from the indexes."""
        for vol_id, chain in self.chains.items():
            blocks, gens, _slots = chain.arrays()
            last = np.ones(len(blocks), bool)
            last[:-1] = blocks[1:] != blocks[:-1]
            max_gens = np.sort(gens[last])
            for snap in self.live_snapshots(vol_id):
                # Blocks whose newest copy is at least as new as the snapshot are read from the store...
                covered = len(max_gens) - int(np.searchsorted(max_gens, snap.epoch, "left"))
                # ...and so are blocks written to the snapshot itself that no copy serves.
                pblocks = snap.private.arrays()[0]
                extra = int((chain.max_gens(pblocks) < snap.epoch).sum()) if len(pblocks) else 0
                snap.preserved_blocks = covered + extra


def _copy_error(error: BaseException, path: str) -> BaseException:
    """The error of a failed commit, for one more `flush` caller it covered (each raises its own)."""
    if isinstance(error, StandbyError):
        with contextlib.suppress(Exception):
            return type(error)(**error.fields)
    return StoreError(path=path, detail=f"a commit failed: {error}")


def _unformatted(raw: RawFile) -> bool:
    """Empty, or an interrupted creation: no superblock magic yet and no room for an area."""
    size = raw.size()
    if size == 0:
        return True
    head = raw.pread(512, 0)
    return size <= layout.AREAS_OFFSET and not head.startswith(layout.MAGIC) and not any(head)


def _check_arguments(capacity: int | None, on_full: str) -> None:
    if on_full not in ON_FULL_POLICIES:
        raise InvalidArgument(detail=f"on_full must be one of {', '.join(ON_FULL_POLICIES)}, not {on_full!r}")
    if capacity is not None and capacity < 0:
        raise InvalidArgument(detail=f"capacity {capacity} is negative")


def referenced(
    blocks: npt.NDArray[Any], gens: npt.NDArray[Any], epochs: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """Which copies some snapshot still reads.

    `blocks`/`gens` are sorted by (block, gen). A copy of generation g whose
    previous copy of the same block has generation p serves the snapshots with
    epoch in (p, g]; it is referenced when one of `epochs` (sorted) falls there.
    """
    g = gens.astype(np.int64)
    prev = np.zeros(len(g), np.int64)
    if len(g) > 1:
        same = blocks[1:] == blocks[:-1]
        prev[1:] = np.where(same, g[:-1], 0)
    hits = np.searchsorted(epochs, g, "right") - np.searchsorted(epochs, prev, "right")
    result: npt.NDArray[np.bool_] = hits > 0
    return result

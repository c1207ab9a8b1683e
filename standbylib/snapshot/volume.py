"""Volumes: the origins of claim 1, attached to a preservation store, and their snapshots' lifecycle.

`Volume.write_batch` is the origin write of claim 1 (C), with group commit:

1. find the blocks of the batch that a valid snapshot has not preserved yet
   (the newest copy of the block is older than the newest snapshot), and read
   their current data: a block that reads as zeros (a hole, a trimmed block)
   is preserved as a *hole entry*, an entry without data that takes no slot
   and no space;
2. check the space the other blocks need; on overflow invalidate the affected
   snapshots or, under the ``defer`` policy, raise `PreservationDeferred` with
   nothing applied;
3. copy those blocks' data into store slots, and write the entries of copies
   and hole entries;
4. one sync of the store makes copies, entries and any table change durable;
5. only then write the origin.

A copy (or hole entry) is tagged with the epoch of the newest snapshot at copy
time, and serves every snapshot created since the previous copy of that block:
N snapshots cost one copy per first write, not N.

When steps 3-4 fail (no space on the filesystem, an I/O error), the batch is refused
with that error (`DiskFull`, `DeviceError`) and nothing of it stays: the slots it
took are given back and no snapshot is invalidated for it (only the store's
capacity, or a snapshot's, invalidates or defers); the same batch can be retried.
Only an invalidation made durable before the failure stays. When step 5 fails, the
copies stay (they hold the blocks as they were, which is what the snapshots need)
and the origin may be partly written, as after any failed device write: retry.

`Volume` creates, lists and deletes the volume's snapshots (`Snapshot`, the patent's virtual devices,
live in `standbylib.snapshot.snapshot`; they are re-exported here). It changes the store only through
the store's methods (`standbylib.snapshot.store.Store`), and the store does not depend on it: the store
that hands out `Volume` objects is `standbylib.snapshot.engine.PreservationStore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from standbylib.blockdev import BlockDevice, Device, check_range
from standbylib.errors import (
    Closed,
    InvalidArgument,
    PreservationDeferred,
    SnapshotExists,
    SnapshotInvalid,
    UnknownSnapshot,
)
from standbylib.rawfile import Buffer
from standbylib.snapshot import layout
from standbylib.snapshot.layout import data_checksum as checksum
from standbylib.snapshot.records import SnapshotRecord, VolumeRecord, check_name
from standbylib.snapshot.snapshot import ServedRuns, Snapshot, SnapshotInfo
from standbylib.snapshot.store import Store

__all__ = ["Snapshot", "SnapshotInfo", "Volume", "WriteOp"]

#: Average copy run below which writing our buffer beats copy_file_range (one syscall per run).
_CFR_MIN = 64 << 10
#: Batches of at most this many blocks are checked for zeros block by block, without numpy's overhead.
_FEW_BLOCKS = 64
#: A block of zeros per block size, to compare blocks with.
_ZEROS: dict[int, bytes] = {}

#: One request of a batch: ``(offset, data)`` writes `data`; ``(offset, n)`` with an int zeroes `n` bytes.
WriteOp = tuple[int, Buffer | int]


class Volume:
    """An origin device attached to a store. Thread-safe; all writes go through COW.

    Reads (claim 9) go straight to the origin, without the store's lock. Writes
    take the store's lock exclusively, so they wait for snapshot reads in progress
    (which hold it shared) and snapshot reads never see half of one. They become
    visible in order; they are durable after `flush`, but a write never overwrites
    an origin block before its preserved copy is durable.
    """

    def __init__(self, store: Store[Volume], record: VolumeRecord, device: BlockDevice) -> None:
        self.store = store
        self.record = record
        self.device = device
        self.block_size = record.block_size
        self.shift = record.block_size.bit_length() - 1
        self.cow_copies = 0  # blocks copied into the store before being overwritten
        self.cow_holes = 0  # blocks preserved as hole entries instead (they read as zeros)
        self.closed = False
        #: Set by `PreservationStore.attach` when the origin changed since the store last stamped it
        #: (why, as a sentence): its data is not what the engine wrote, so a replica needs a full sync.
        self.changed_outside = ""
        self._buffer = bytearray()
        # Per snapshot id: the runs it reads from the store, for the whole volume (see `Snapshot._served`).
        self.served_cache: dict[int, ServedRuns] = {}
        self.stale_lookups: dict[int, int] = {}

    # -- BlockDevice ----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def readonly(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        """Origin read (claim 9): the current data, whatever the snapshots."""
        self.check_open()
        check_range(offset, length, self.size)
        return self.device.read(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        self.write_batch([(offset, data)])

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs of the origin, as its device reports them (all data otherwise)."""
        check_range(offset, length, self.size)
        device_extents = getattr(self.device, "extents", None)
        if device_extents is None:
            return [(length, False)]
        runs: list[tuple[int, bool]] = device_extents(offset, length)
        return runs

    def zero(self, offset: int, length: int) -> None:
        self.write_batch([(offset, length)])

    def flush(self) -> None:
        """Make the origin durable (the store is durable after every batch already)."""
        self.check_open()
        self.device.flush()

    def close(self) -> None:
        """Detach from the store; the device stays open (the caller owns it).

        The origin is fsynced and stamped clean in the store (see `standbylib.snapshot.stamp`), so
        that the next attach notices any change made to it meanwhile. Best effort: if that cannot
        be done (a full disk), the next attach checks only the origin's identity and size.
        """
        store = self.store
        with store.lock:
            if not self.closed:
                self.closed = True
                store.detach(self)

    # -- origin writes -----------------------------------------------------------------

    def write_batch(self, ops: Sequence[WriteOp]) -> None:
        """Apply `ops` in order as one group commit (at most one store sync).

        Every request is validated first: on a bad one nothing is applied.
        Raises `PreservationDeferred` under the ``defer`` policy when a snapshot
        would overflow; nothing is applied then either.
        """
        spans = []
        for offset, data in ops:
            length = data if isinstance(data, int) else len(data)
            check_range(offset, length, self.size)
            spans.append((offset, length))
        if not spans:
            return
        store = self.store
        with store.lock:
            self.check_open()
            if store.live_snapshots(self.record.id):
                with store.transaction():
                    self._preserve(self._blocks_of(spans))
            elif store.unsettled():
                # A failed operation may have left writes (a table naming a snapshot that its undo
                # removed) that must not survive a crash once the origin changes unpreserved.
                store.commit()
            for offset, data in ops:
                if isinstance(data, int):
                    self.device.zero(offset, data)
                else:
                    self.device.write(offset, data)

    def _blocks_of(self, spans: list[tuple[int, int]]) -> np.ndarray:
        """Sorted distinct block numbers touched by `spans` of (offset, length)."""
        shift = np.uint64(self.shift)
        arr = np.array(spans, np.uint64)
        firsts = arr[:, 0] >> shift
        lasts = (arr[:, 0] + arr[:, 1] - np.uint64(1)) >> shift
        counts = (lasts - firsts + np.uint64(1)).astype(np.int64)
        if len(spans) == 1:
            return np.arange(int(firsts[0]), int(lasts[0]) + 1, dtype=np.uint64)
        total = int(counts.sum())
        if total == len(spans):
            blocks = firsts
        else:
            starts = np.repeat(firsts, counts)
            steps = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
            blocks = starts + steps.astype(np.uint64)
        blocks = np.sort(blocks)
        if len(blocks) > 1 and not (blocks[1:] > blocks[:-1]).all():
            blocks = np.unique(blocks)
        return blocks

    def _preserve(self, blocks: np.ndarray) -> None:
        """Preserve every block of `blocks` that a valid snapshot still needs: a copy of its data in a
        store slot or, when it reads as zeros, a hole entry (no data, no slot, no space)."""
        store = self.store
        chain = store.chain(self.record.id)
        bs = self.block_size
        # The blocks whose old data is in `view` (also as a list), and which of them read as zeros (None:
        # none does, the common case, which then costs no more than the zero check).
        read: np.ndarray | None = None
        read_list: list[int] = []
        read_zero: np.ndarray | None = None
        view = memoryview(b"")
        while True:
            live = store.live_snapshots(self.record.id)
            if not live:
                store.commit()  # an invalidation must be durable before the origin changes
                return
            newest = live[-1].epoch
            max_gens = chain.max_gens(blocks)
            need = max_gens < newest
            if not need.any():
                # Nothing to copy: a good moment to fold the index into one sorted run.
                chain.merge()
                store.commit()
                return
            cand = blocks[need]
            mine, gains, needed = self._needs(live, cand, max_gens[need])
            if not needed.all():
                cand = cand[needed]  # (`gains` stay: blocks no snapshot needs are nobody's gain)
                mine = {k: m[needed] for k, m in mine.items()}
                if not len(cand):
                    store.commit()
                    return
            # The old data is read once: after an invalidation the candidates are some of those read
            # (`rows`: where they are in `view`; None when they are all of them).
            rows = None
            if read is not None and not np.array_equal(read, cand):
                rows = _positions(read, cand)
                if rows is None:
                    read = None
            if read is None:
                view = self._copy_buffer(len(cand) * bs)
                read_list = cand.tolist()
                self._read_blocks(read_list, view)
                read, read_zero = cand, zero_blocks(view, bs)
            zero = read_zero if rows is None or read_zero is None else read_zero[rows]
            if zero is not None and rows is not None and not zero.any():
                zero = None
            n_data = len(cand)
            if zero is not None:
                gains = {k: int((m & ~zero).sum()) for k, m in mine.items()}  # data blocks only
                n_data -= int(zero.sum())
            over = self._overflowing(live, gains, n_data * bs)
            if not over:
                break
            if store.on_full == "defer":
                raise PreservationDeferred(
                    volume=self.name,
                    snapshots=", ".join(s.name for s in over),
                    needed=n_data * bs,
                    free=store.free_bytes(),
                )
            for snap in over:
                reason = (
                    f"its capacity of {snap.capacity} bytes is exhausted"
                    if snap.capacity is not None
                    and (snap.preserved_blocks + gains[snap.id]) * bs > snap.capacity
                    else "the preservation store is full"
                )
                self._invalidate(snap, reason)
            # Make the invalidation durable now, so the space it frees can take this batch's copies.
            store.commit()
        # Copy, then one sync, then (in the caller) the origin write.
        holes: list[int] = []
        if zero is None and rows is None:
            data = read_list  # every block read, all data: `view` holds them in order
        else:
            is_data = np.ones(len(cand), bool) if zero is None else ~zero
            data_rows = np.flatnonzero(is_data) if rows is None else rows[is_data]
            data = cand[is_data].tolist()
            if zero is not None:
                holes = cand[zero].tolist()
            if data and data_rows[-1] != len(data) - 1:
                # Some blocks read are not copied (holes, or blocks no snapshot needs any more): pack
                # the data of the others at the start of the buffer, in order.
                packed = np.frombuffer(view, np.uint8).reshape(-1, bs)
                packed[: len(data)] = packed[data_rows]
        n = len(data)
        slots = self._copy(data, view[: n * bs], newest) if n else []
        hole_slots: list[int] = []
        if holes:
            hole_slots = store.allocate(layout.ENTRY_AREA, len(holes))
            tags = [newest] * len(holes)
            store.write_entries(hole_slots, layout.HOLE, self.record.id, tags, holes, None, None)
        store.commit()
        chain.add_many(data + holes if holes else data, newest, slots + hole_slots if holes else slots)
        for snap in live:
            snap.preserved_blocks += gains[snap.id]
            if zero is not None:
                snap.hole_blocks += int((mine[snap.id] & zero).sum())
        store.count_cow_copies(n, len(holes))
        self.cow_copies += n
        self.cow_holes += len(holes)

    def _read_blocks(self, blocks: list[int], view: memoryview) -> None:
        """Read the sorted `blocks` of the origin into consecutive blocks of `view`, one read per run."""
        bs = self.block_size
        n = len(blocks)
        i = 0
        while i < n:
            j = i + 1
            while j < n and blocks[j] == blocks[j - 1] + 1:
                j += 1
            self.device_readinto(blocks[i] * bs, view[i * bs : j * bs])
            i = j

    def _copy(self, blocks: list[int], view: memoryview, tag: int) -> list[int]:
        """Copy the sorted `blocks`, whose data is in `view`, to new slots with entries tagged `tag`;
        return the slots (written in the open commit)."""
        store = self.store
        bs = self.block_size
        n = len(blocks)
        slots = store.allocate(bs, n)
        # One checksum per run of consecutive slots (contiguous in the store file).
        segments = store.slot_runs(slots)
        sums = [0] * n
        for start, end in segments:
            sums[start:end] = [checksum(view[start * bs : end * bs])] * (end - start)
        pieces = store.copy_pieces(segments, blocks)
        src = self.device.raw if isinstance(self.device, Device) else None
        # A store file offering copy_from (`OsFile.copy_from`) copies from a file of its own kind.
        copy_from = getattr(store.raw, "copy_from", None)
        if copy_from is not None and type(src) is type(store.raw) and n * bs >= len(pieces) * _CFR_MIN:
            # Long runs: copy inside the kernel rather than writing our buffer back.
            for start, end in pieces:
                at = store.slot_offset(slots[start])
                copy_from(src, blocks[start] * bs, (end - start) * bs, at)
                store.note_written(at, (end - start) * bs)
        else:
            store.write_slots(slots, view, bs)
        store.write_entries(slots, layout.COPY, self.record.id, [tag] * n, blocks, sums, segments)
        return slots

    def _copy_buffer(self, size: int) -> memoryview:
        """A reused buffer for preserved copies (fresh buffers cost page faults on every batch)."""
        if size > 64 << 20:
            return memoryview(bytearray(size))
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]

    def device_readinto(self, offset: int, view: memoryview) -> None:
        readinto = getattr(self.device, "readinto", None)
        if readinto is not None:
            readinto(offset, view)
        else:
            view[:] = self.device.read(offset, len(view))

    def _needs(
        self, live: list[SnapshotRecord], cand: np.ndarray, prev: np.ndarray
    ) -> tuple[dict[int, np.ndarray], dict[int, int], np.ndarray]:
        """Which of `cand` (whose newest copies are `prev`) each live snapshot gains a copy of, and how
        many, by snapshot id; and which of `cand` some snapshot needs at all: a writable snapshot that
        wrote a block itself does not."""
        mine: dict[int, np.ndarray] = {}
        gains: dict[int, int] = {}
        needed = np.zeros(len(cand), bool)
        for snap in live:
            wanted = prev < snap.epoch
            if len(snap.private):
                wanted &= ~snap.private.contains(cand)
            mine[snap.id] = wanted
            gains[snap.id] = int(wanted.sum())
            needed |= wanted
        return mine, gains, needed

    def _overflowing(
        self, live: list[SnapshotRecord], gains: dict[int, int], needed: int
    ) -> list[SnapshotRecord]:
        bs = self.block_size
        over = [
            s
            for s in live
            if s.capacity is not None and gains[s.id] and (s.preserved_blocks + gains[s.id]) * bs > s.capacity
        ]
        if not over and needed > self.store.free_bytes():
            over = [s for s in live if gains[s.id]]
        return over

    def _invalidate(self, snap: SnapshotRecord, reason: str) -> None:
        """Mark `snap` invalid (durable with the next commit) and free what only it used."""
        self.served_cache.pop(snap.id, None)
        self.store.invalidate(snap, reason)

    # -- snapshots -----------------------------------------------------------------------

    def create_snapshot(
        self,
        name: str | None = None,
        *,
        writable: bool = False,
        capacity: int | None = None,
        labels: dict[str, Any] | None = None,
    ) -> Snapshot:
        """Take a snapshot now (claim 1 A-B): O(1), nothing is copied.

        The origin is flushed first so that the frozen image is durable. `capacity`
        (bytes) caps the preserved data of this snapshot; by default only the
        store's capacity applies. `labels` (JSON values) are kept with it, as given.
        """
        if name is not None:
            check_name("snapshot", name)
        if capacity is not None and capacity <= 0:
            raise InvalidArgument(detail=f"snapshot capacity {capacity} must be greater than 0")
        store = self.store
        with store.lock:
            self.check_open()
            if name is None:
                name = f"snap-{store.upcoming_snapshot_id()}"
                n = 1
                while self._find(name) is not None:  # a user took that name already
                    n += 1
                    name = f"snap-{store.upcoming_snapshot_id()}-{n}"
            if self._find(name) is not None:
                raise SnapshotExists(volume=self.name, snapshot=name)
            self.device.flush()
            # Ids and epochs are never reused, not even those of a creation that failed.
            snap = SnapshotRecord(
                id=store.new_snapshot_id(),
                volume=self.record.id,
                name=name,
                epoch=store.new_epoch(),
                writable=writable,
                capacity=capacity,
                created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                labels=dict(labels or {}),
            )
            with store.transaction():
                store.register_snapshot(snap)
                store.commit()
            return Snapshot(self, snap)

    def snapshot(self, name: str) -> Snapshot:
        """The snapshot `name` of this volume (valid or not)."""
        with self.store.lock.shared():
            return Snapshot(self, self._findable(name))

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot of this volume, oldest first."""
        with self.store.lock.shared():
            recs = sorted(self.store.snapshots_of(self.record.id), key=lambda s: s.epoch)
            return [Snapshot(self, s) for s in recs]

    def changes(self, base: str, newer: str) -> list[tuple[int, int]]:
        """The byte extents (offset, length; ordered, disjoint, merged) that differ between snapshot
        `base` and the later snapshot `newer`, from the preservation index alone (no data is read).

        A block written after `base` was taken got, at its first write, a copy tagged with the epoch of
        the newest valid snapshot then, which is at least `base`'s epoch and, if that write came before
        `newer` was taken, below `newer`'s. Blocks written only later have copies tagged `newer`'s epoch
        or above. So the blocks with a copy tagged in [base's epoch, newer's epoch) are exactly the
        blocks written in between (trims and zeroes included; a hole entry is a copy here: a block
        that was a hole when first overwritten is a change too), for as long as `base` is valid (its
        copies are then complete). Both must be valid read-only snapshots of this volume, `base` the
        older."""
        with self.store.lock.shared():
            self.check_open()
            old, new = self._findable(base), self._findable(newer)
            for snap in (old, new):
                if snap.writable:
                    raise InvalidArgument(
                        detail=f"snapshot {self.name}@{snap.name} is writable: its changes are its own, "
                        "take the changes between read-only snapshots"
                    )
                if not snap.valid:
                    raise SnapshotInvalid(volume=self.name, snapshot=snap.name, reason=snap.reason)
            if old.epoch >= new.epoch:
                raise InvalidArgument(
                    detail=f"snapshot {self.name}@{base} is not older than {self.name}@{newer}: "
                    "give the older snapshot as the base"
                )
            blocks = self.store.chain(self.record.id).blocks_of_gens(old.epoch, new.epoch)
        return block_extents(blocks, self.block_size, self.size)

    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot and free the store space only it used (no merge, no copy).

        Holes are punched in its slots, and in the free slots that rewrites left allocated for reuse
        (`PreservationStore.free_rewritten`), so the filesystem gets that space back."""
        store = self.store
        with store.lock:
            self.check_open()
            snap = self._findable(name)
            with store.transaction():
                store.remove_snapshot(snap)
                store.commit()
            self.served_cache.pop(snap.id, None)
            self.stale_lookups.pop(snap.id, None)
            freed = snap.private.arrays()[2].tolist() + store.collect_garbage(self.record.id)
            if freed:
                store.release(freed)
            store.deallocate_free()  # and the slots freed by rewrites, left allocated for reuse

    def _findable(self, name: str) -> SnapshotRecord:
        snap = self._find(name)
        if snap is None:
            raise UnknownSnapshot(volume=self.name, snapshot=name)
        return snap

    def _find(self, name: str) -> SnapshotRecord | None:
        for s in self.store.snapshots_of(self.record.id):
            if s.name == name:
                return s
        return None

    def check_open(self) -> None:
        """Raise `Closed` once the store or this volume is closed."""
        self.store.check_open()
        if self.closed:
            raise Closed(what=f"volume {self.name}")


def block_extents(blocks: np.ndarray, block_size: int, size: int) -> list[tuple[int, int]]:
    """Sorted distinct block numbers as byte extents (offset, length), consecutive blocks merged, the
    last clipped to the volume's `size`."""
    if not len(blocks):
        return []
    b = blocks.astype(np.int64)
    breaks = np.nonzero(b[1:] != b[:-1] + 1)[0] + 1
    firsts = b[np.concatenate(([0], breaks))]
    lasts = b[np.concatenate((breaks - 1, [len(b) - 1]))]
    return [
        (first * block_size, min((last + 1) * block_size, size) - first * block_size)
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True)
    ]


def zero_blocks(view: memoryview, block_size: int) -> np.ndarray | None:
    """Which of the consecutive blocks of `view` read as zeros (a bool array), or None when none does.

    A block of data almost never starts and ends with zeros, so only blocks whose first and last
    bytes (words, vectorised, for larger batches) are zero are compared in full: the check costs a
    data block next to nothing, and an all-zero one a read of its bytes.
    """
    n = len(view) // block_size
    if n <= _FEW_BLOCKS:
        found: np.ndarray | None = None
        for i in range(n):
            start = i * block_size
            if not view[start] and not view[start + block_size - 1]:
                zeros = _ZEROS.get(block_size) or _ZEROS.setdefault(block_size, bytes(block_size))
                if view[start : start + block_size].tobytes() == zeros:
                    if found is None:
                        found = np.zeros(n, bool)
                    found[i] = True
        return found
    words = np.frombuffer(view, np.uint64).reshape(n, block_size // 8)
    maybe: np.ndarray = (words[:, 0] == 0) & (words[:, -1] == 0)
    if not maybe.any():
        return None
    rows = np.flatnonzero(maybe)
    maybe[rows] = np.bitwise_or.reduce(words[rows], axis=1) == 0
    return maybe if maybe.any() else None


def _positions(known: np.ndarray, blocks: np.ndarray) -> np.ndarray | None:
    """The positions of the sorted `blocks` in the sorted `known`, or None when one is not there."""
    at = np.searchsorted(known, blocks)
    if len(at) and (at[-1] >= len(known) or not (known[np.minimum(at, len(known) - 1)] == blocks).all()):
        return None
    return at

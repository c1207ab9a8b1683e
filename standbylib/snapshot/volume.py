"""Volumes (origins) and snapshots (the patent's virtual devices).

`Volume.write_batch` is the origin write of claim 1 (C), with group commit:

1. find the blocks of the batch that a valid snapshot has not preserved yet
   (the newest copy of the block is older than the newest snapshot);
2. check the space; on overflow invalidate the affected snapshots or, under
   the ``defer`` policy, raise `PreservationDeferred` with nothing applied;
3. copy those blocks' current data into store slots and write their entries;
4. one sync of the store makes copies, entries and any table change durable;
5. only then write the origin.

A copy is tagged with the epoch of the newest snapshot at copy time, and serves
every snapshot created since the previous copy of that block: N snapshots cost
one copy per first write, not N.

When steps 3-4 fail (no space on the filesystem, an I/O error), the batch is refused
with that error (`DiskFull`, `DeviceError`) and nothing of it stays: the slots it
took are given back and no snapshot is invalidated for it (only the store's
capacity, or a snapshot's, invalidates or defers); the same batch can be retried.
Only an invalidation made durable before the failure stays. When step 5 fails, the
copies stay (they hold the blocks as they were, which is what the snapshots need)
and the origin may be partly written, as after any failed device write: retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from standbylib.blockdev import BlockDevice, Device, check_range
from standbylib.errors import (
    Closed,
    InvalidArgument,
    PreservationDeferred,
    PreservationFull,
    ReadOnly,
    SnapshotExists,
    SnapshotInvalid,
    UnknownSnapshot,
)
from standbylib.rawfile import Buffer, OsFile
from standbylib.readplan import Bytes, FileRange, Hole, Piece, ReadPlan
from standbylib.snapshot import layout
from standbylib.snapshot.layout import data_checksum as checksum
from standbylib.snapshot.records import SnapshotRecord, VolumeRecord, check_name
from standbylib.snapshot.store import PreservationStore

#: Average copy run below which writing our buffer beats copy_file_range (one syscall per run).
_CFR_MIN = 64 << 10

#: One request of a batch: ``(offset, data)`` writes `data`; ``(offset, n)`` with an int zeroes `n` bytes.
WriteOp = tuple[int, Buffer | int]


#: Index entries one uncached `Snapshot._served` lookup is worth, for deciding when to rebuild its cache.
_LOOKUP_COST = 256
#: Larger indexes are not cached (the cache takes up to 24 bytes per entry).
_MAX_CACHED_ENTRIES = 1 << 20


@dataclass(frozen=True)
class _ServedRuns:
    """The runs a snapshot reads from the store (`Snapshot._served`), for the whole volume."""

    versions: tuple[int, int]  # of the volume's index and the snapshot's own index when built
    firsts: np.ndarray  # first block of each run, ascending
    ends: np.ndarray  # block after each run
    offsets: np.ndarray  # store offset of each run's first block


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's state and counters at one moment."""

    volume: str
    name: str
    valid: bool
    writable: bool
    created: str
    reason: str
    preserved_blocks: int
    preserved_bytes: int
    capacity_bytes: int

    @property
    def fill_ratio(self) -> float:
        return self.preserved_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


class Volume:
    """An origin device attached to a store. Thread-safe; all writes go through COW.

    Reads (claim 9) go straight to the origin, without the store's lock. Writes
    take the store's lock exclusively, so they wait for snapshot reads in progress
    (which hold it shared) and snapshot reads never see half of one. They become
    visible in order; they are durable after `flush`, but a write never overwrites
    an origin block before its preserved copy is durable.
    """

    def __init__(self, store: PreservationStore, record: VolumeRecord, device: BlockDevice) -> None:
        self.store = store
        self.record = record
        self.device = device
        self.block_size = record.block_size
        self.shift = record.block_size.bit_length() - 1
        self.cow_copies = 0
        self.closed = False
        #: Set by `PreservationStore.attach` when the origin changed since the store last stamped it
        #: (why, as a sentence): its data is not what the engine wrote, so a replica needs a full sync.
        self.changed_outside = ""
        self._buffer = bytearray()
        # Per snapshot id: the runs it reads from the store, for the whole volume (see `Snapshot._served`).
        self.served_cache: dict[int, _ServedRuns] = {}
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
        self._check_open()
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
        self._check_open()
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
                store.attached.pop(self.record.id, None)
                if not store.closed:
                    store.stamp_clean(self)

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
            self._check_open()
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
        """Copy to the store every block of `blocks` that a valid snapshot still needs."""
        store = self.store
        chain = store.chains[self.record.id]
        bs = self.block_size
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
            prev = max_gens[need]
            gains, needed = self._gains(live, cand, prev)
            if not needed.all():
                cand, prev = cand[needed], prev[needed]
                if not len(cand):
                    store.commit()
                    return
            over = self._overflowing(live, gains, len(cand) * bs)
            if not over:
                break
            if store.on_full == "defer":
                raise PreservationDeferred(
                    volume=self.name,
                    snapshots=", ".join(s.name for s in over),
                    needed=len(cand) * bs,
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
        n = len(cand)
        slots = store.allocate(bs, n)
        cand_list = cand.tolist()
        view = self._copy_buffer(n * bs)
        i = 0
        while i < n:
            j = i + 1
            while j < n and cand_list[j] == cand_list[j - 1] + 1:
                j += 1
            self.device_readinto(cand_list[i] * bs, view[i * bs : j * bs])
            i = j
        # One checksum per run of consecutive slots (contiguous in the store file).
        segments = store.slot_runs(slots)
        sums = [0] * n
        for start, end in segments:
            sums[start:end] = [checksum(view[start * bs : end * bs])] * (end - start)
        pieces = store.copy_pieces(segments, cand_list)
        src = self.device.raw if isinstance(self.device, Device) else None
        # A store file offering copy_from (`OsFile.copy_from`) copies from a file of its own kind.
        copy_from = getattr(store.raw, "copy_from", None)
        if copy_from is not None and type(src) is type(store.raw) and n * bs >= len(pieces) * _CFR_MIN:
            # Long runs: copy inside the kernel rather than writing our buffer back.
            for start, end in pieces:
                at = store.slot_offset(slots[start])
                copy_from(src, cand_list[start] * bs, (end - start) * bs, at)
                store.note_written(at, (end - start) * bs)
        else:
            store.write_slots(slots, view, bs)
        store.write_entries(slots, layout.COPY, self.record.id, [newest] * n, cand_list, sums, segments)
        store.commit()
        chain.add_many(cand_list, newest, slots)
        for snap in live:
            snap.preserved_blocks += gains[snap.id]
        store.cow_copies += n
        self.cow_copies += n

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

    def _gains(
        self, live: list[SnapshotRecord], cand: np.ndarray, prev: np.ndarray
    ) -> tuple[dict[int, int], np.ndarray]:
        """What copying `cand` (whose newest copies are `prev`) gives each live snapshot.

        Returns the blocks each snapshot gains, and which of `cand` some snapshot
        needs at all: a writable snapshot that wrote a block itself does not.
        """
        gains: dict[int, int] = {}
        needed = np.zeros(len(cand), bool)
        for snap in live:
            mine = prev < snap.epoch
            if len(snap.private):
                mine &= ~snap.private.contains(cand)
            gains[snap.id] = int(mine.sum())
            needed |= mine
        return gains, needed

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
        self, name: str | None = None, *, writable: bool = False, capacity: int | None = None
    ) -> Snapshot:
        """Take a snapshot now (claim 1 A-B): O(1), nothing is copied.

        The origin is flushed first so that the frozen image is durable. `capacity`
        (bytes) caps the preserved data of this snapshot; by default only the
        store's capacity applies.
        """
        if name is not None:
            check_name("snapshot", name)
        if capacity is not None and capacity <= 0:
            raise InvalidArgument(detail=f"snapshot capacity {capacity} must be greater than 0")
        store = self.store
        with store.lock:
            self._check_open()
            if name is None:
                name = f"snap-{store.next_snapshot_id}"
                n = 1
                while self._find(name) is not None:  # a user took that name already
                    n += 1
                    name = f"snap-{store.next_snapshot_id}-{n}"
            if self._find(name) is not None:
                raise SnapshotExists(volume=self.name, snapshot=name)
            self.device.flush()
            snap = SnapshotRecord(
                id=store.next_snapshot_id,
                volume=self.record.id,
                name=name,
                epoch=store.next_epoch,
                writable=writable,
                capacity=capacity,
                created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            )
            # Ids and epochs are never reused, not even those of a creation that failed.
            store.next_snapshot_id += 1
            store.next_epoch += 1
            with store.transaction():
                store.snapshots[snap.id] = snap

                def undo() -> None:
                    del store.snapshots[snap.id]

                store.on_abort(undo)
                store.write_table()
                store.commit()
            return Snapshot(self, snap)

    def snapshot(self, name: str) -> Snapshot:
        """The snapshot `name` of this volume (valid or not)."""
        with self.store.lock.shared():
            snap = self._find(name)
            if snap is None:
                raise UnknownSnapshot(volume=self.name, snapshot=name)
            return Snapshot(self, snap)

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot of this volume, oldest first."""
        with self.store.lock.shared():
            recs = sorted(
                (s for s in self.store.snapshots.values() if s.volume == self.record.id),
                key=lambda s: s.epoch,
            )
            return [Snapshot(self, s) for s in recs]

    def delete_snapshot(self, name: str) -> None:
        """Delete a snapshot and free the store space only it used (no merge, no copy).

        Holes are punched in its slots, and in the free slots that rewrites left allocated for reuse
        (`PreservationStore.free_rewritten`), so the filesystem gets that space back."""
        store = self.store
        with store.lock:
            self._check_open()
            snap = self._find(name)
            if snap is None:
                raise UnknownSnapshot(volume=self.name, snapshot=name)
            with store.transaction():
                del store.snapshots[snap.id]
                store.on_abort(lambda: store.snapshots.__setitem__(snap.id, snap))
                store.write_table()
                store.commit()
            self.served_cache.pop(snap.id, None)
            self.stale_lookups.pop(snap.id, None)
            freed = snap.private.arrays()[2].tolist() + store.collect_garbage(self.record.id)
            if freed:
                store.release(freed)
            store.deallocate_free()  # and the slots freed by rewrites, left allocated for reuse

    def _find(self, name: str) -> SnapshotRecord | None:
        for s in self.store.snapshots.values():
            if s.volume == self.record.id and s.name == name:
                return s
        return None

    def _check_open(self) -> None:
        self.store.check_open()
        if self.closed:
            raise Closed(what=f"volume {self.name}")


class Snapshot:
    """A snapshot seen as a block device (the patent's virtual device).

    Reads return the image frozen at creation, plus, for a writable snapshot,
    what was written to it. Thread-safe: reads, extents and read plans hold the
    store's lock shared (reads of any number of threads run in parallel, origin
    writes wait for them), writes hold it exclusively.
    """

    def __init__(self, volume: Volume, record: SnapshotRecord) -> None:
        self.volume = volume
        self.record = record

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def readonly(self) -> bool:
        return not self.record.writable

    @property
    def valid(self) -> bool:
        return self.record.valid

    def info(self) -> SnapshotInfo:
        rec = self.record
        store = self.volume.store
        with store.lock.shared():
            bs = self.volume.block_size
            return SnapshotInfo(
                volume=self.volume.name,
                name=rec.name,
                valid=rec.valid,
                writable=rec.writable,
                created=rec.created,
                reason=rec.reason,
                preserved_blocks=rec.preserved_blocks,
                preserved_bytes=rec.preserved_blocks * bs,
                capacity_bytes=rec.capacity if rec.capacity is not None else store.capacity,
            )

    def read(self, offset: int, length: int) -> bytes:
        """Claim 1 (D): the preserved copy where there is one, else the origin block."""
        with self.read_plan(offset, length) as plan:
            buf = bytearray(length)
            plan.readinto(memoryview(buf))
        return bytes(buf)

    def read_plan(self, offset: int, length: int) -> ReadPlan:
        """Where the frozen image of ``[offset, offset+length)`` is (`standbylib.readplan`).

        Pieces: the store's slots for preserved (or, writable snapshot, written) blocks, the origin
        for the others, holes where the origin has a hole that no copy serves; file ranges when the
        origin or store is a file, else the bytes themselves. The plan holds the store's lock shared
        until it is closed, so no origin write, snapshot write or deletion changes those bytes while
        it is open; close it as soon as its bytes are copied. ``zero_copy`` is never set: the origin
        is overwritten as soon as the plan is closed, so its pages must not be sent by reference.
        """
        check_range(offset, length, self.size)
        lock = self.volume.store.lock
        lock.acquire_shared()
        try:
            self._check_usable()
            pieces = self._plan(offset, length)
        except BaseException:
            lock.release_shared()
            raise
        return ReadPlan(pieces, release=lock.release_shared)

    def _plan(self, offset: int, length: int) -> list[Piece]:
        vol = self.volume
        store = vol.store
        shift = vol.shift
        end = offset + length
        # Byte ranges served by the store: (start, stop, offset in the store).
        from_store: list[tuple[int, int, int]] = []
        covered = 0
        for b, n, at in zip(*self._served(offset >> shift, ((end - 1) >> shift) + 1), strict=True):
            start = max(b << shift, offset)
            stop = min((b + n) << shift, end)
            from_store.append((start, stop, at + start - (b << shift)))
            covered += stop - start
        origin = vol.device.raw if isinstance(vol.device, Device) else None
        origin_fd = origin.fd if isinstance(origin, OsFile) else None
        store_fd = store.raw.fd if isinstance(store.raw, OsFile) else None
        # The origin's holes as (start, stop, is_hole), looked up once for the whole range.
        runs: list[tuple[int, int, bool]] = []
        if covered < length:
            pos = offset
            for n, hole in vol.extents(offset, length):
                runs.append((pos, pos + n, hole))
                pos += n
            if pos < end:  # a device reporting less than asked: the rest is data
                runs.append((pos, end, False))
        pieces: list[Piece] = []
        if (
            store_fd is not None
            and origin_fd is not None
            and (not runs or (len(runs) == 1 and not runs[0][2]))
        ):
            # The common case, files without holes here: the origin fills the gaps between copies.
            pos = offset
            for start, stop, at in from_store:
                if start > pos:
                    pieces.append(FileRange(origin_fd, pos, start - pos))
                pieces.append(FileRange(store_fd, at, stop - start))
                pos = stop
            if pos < end:
                pieces.append(FileRange(origin_fd, pos, end - pos))
            return pieces
        k = 0

        def from_origin(a: int, b: int) -> None:
            nonlocal k
            while a < b:
                while runs[k][1] <= a:
                    k += 1
                stop = min(b, runs[k][1])
                if runs[k][2]:
                    pieces.append(Hole(stop - a))
                elif origin_fd is not None:
                    pieces.append(FileRange(origin_fd, a, stop - a))
                else:
                    pieces.append(Bytes(vol.device.read(a, stop - a)))
                a = stop

        pos = offset
        for start, stop, at in from_store:
            from_origin(pos, start)
            if store_fd is not None:
                pieces.append(FileRange(store_fd, at, stop - start))
            else:
                pieces.append(Bytes(store.raw.pread(stop - start, at)))
            pos = stop
        from_origin(pos, end)
        return pieces

    def _served(self, first: int, end: int) -> tuple[list[int], list[int], list[int]]:
        """Runs of the blocks in [first, end) that this snapshot reads from the store, each contiguous
        in the volume and in the store file: first blocks, block counts, store offsets (a run may
        reach outside [first, end); callers clip).

        Per block: its own written block (writable snapshot), else the oldest copy made since the
        snapshot was created. The runs of the whole volume are cached per snapshot while the indexes
        do not change (a lookup is then two binary searches); after a change the lookups go to the
        indexes until they have cost about what rebuilding the cache does, so that a steady stream of
        origin writes never pays for more than twice the uncached lookups. Runs hold the store's
        lock (shared or exclusive); racing readers may both rebuild, to the same result.
        """
        vol = self.volume
        rec = self.record
        chain = vol.store.chains[vol.record.id]
        cached = vol.served_cache.get(rec.id)
        if cached is not None and cached.versions == (chain.version, rec.private.version):
            i = int(cached.ends.searchsorted(np.uint64(first), "right"))
            j = int(cached.firsts.searchsorted(np.uint64(end), "left"))
            firsts = cached.firsts[i:j]
            return firsts.tolist(), (cached.ends[i:j] - firsts).tolist(), cached.offsets[i:j].tolist()
        stale = vol.stale_lookups.get(rec.id, 0) + 1
        entries = len(chain) + len(rec.private)
        if stale * _LOOKUP_COST >= entries and entries <= _MAX_CACHED_ENTRIES:
            versions = (chain.version, rec.private.version)
            firsts, counts, offsets = self._run_arrays(0, 1 << 63)
            vol.served_cache[rec.id] = _ServedRuns(versions, firsts, firsts + counts, offsets)
            vol.stale_lookups[rec.id] = 0
            return self._served(first, end)
        vol.stale_lookups[rec.id] = stale
        firsts, counts, offsets = self._run_arrays(first, end)
        return firsts.tolist(), counts.tolist(), offsets.tolist()

    def _run_arrays(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_served` looked up in the indexes (vectorised), as arrays: first blocks (uint64), block
        counts (uint64), store offsets (int64)."""
        vol = self.volume
        store = vol.store
        blocks, slots = store.chains[vol.record.id].oldest_from(first, end, self.record.epoch)
        private = self.record.private
        if len(private):
            own_blocks, own_slots = private.oldest_from(first, end, 0)
            if len(own_blocks):
                merged = dict(zip(blocks.tolist(), slots.tolist(), strict=True))
                merged.update(zip(own_blocks.tolist(), own_slots.tolist(), strict=True))
                keys = sorted(merged)
                blocks = np.array(keys, np.uint64)
                slots = np.array([merged[k] for k in keys], np.uint32)
        offsets = store.slot_offsets(slots)
        if len(blocks) <= 1:
            return blocks, np.ones(len(blocks), np.uint64), offsets
        # A run ends where the next block or the next slot is not adjacent.
        starts = np.empty(1, np.intp)
        starts[0] = 0
        breaks = np.flatnonzero(
            (blocks[1:] != blocks[:-1] + 1) | (offsets[1:] != offsets[:-1] + vol.block_size)
        )
        starts = np.concatenate((starts, breaks + 1))
        counts = np.diff(starts, append=len(blocks)).astype(np.uint64)
        return blocks[starts], counts, offsets[starts]

    def _read_blocks(self, first: int, end: int) -> bytearray:
        """Blocks [first, end) as this snapshot reads them (under the store's lock): where `_served`
        says, from the store, else from the origin."""
        vol = self.volume
        bs = vol.block_size
        buf = bytearray((end - first) * bs)
        view = memoryview(buf)
        raw = vol.store.raw
        pos = first
        for b, n, at in zip(*self._served(first, end), strict=True):
            start, stop = max(b, first), min(b + n, end)  # (a run may reach outside [first, end))
            if start >= stop:
                continue
            if pos < start:
                vol.device_readinto(pos * bs, view[(pos - first) * bs : (start - first) * bs])
            raw.preadinto(view[(start - first) * bs : (stop - first) * bs], at + (start - b) * bs)
            pos = stop
        if pos < end:
            vol.device_readinto(pos * bs, view[(pos - first) * bs :])
        return buf

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs: a block is a hole when no preserved or written copy serves it
        and the origin block is a hole (it reads as zeros and was never written)."""
        check_range(offset, length, self.size)
        vol = self.volume
        shift = vol.shift
        end = offset + length
        with vol.store.lock.shared():
            self._check_usable()
            origin = vol.extents(offset, length)
            first_blocks, counts, _at = self._served(offset >> shift, ((end - 1) >> shift) + 1)
        served = [(b << shift, (b + n) << shift) for b, n in zip(first_blocks, counts, strict=True)]
        runs: list[tuple[int, bool]] = []

        def add(n: int, hole: bool) -> None:
            if runs and runs[-1][1] == hole:
                runs[-1] = (runs[-1][0] + n, hole)
            elif n:
                runs.append((n, hole))

        pos = offset
        i = 0
        for n, hole in origin:
            stop = pos + n
            if hole:
                # The store serves some blocks of this hole: those read as preserved data.
                while i < len(served) and served[i][1] <= pos:
                    i += 1
                p = pos
                j = i
                while j < len(served) and served[j][0] < stop:
                    start = max(p, served[j][0])
                    data_end = min(stop, served[j][1])
                    add(start - p, True)
                    add(data_end - start, False)
                    p = data_end
                    j += 1
                add(stop - p, True)
            else:
                add(n, False)
            pos = stop
        return runs

    def write(self, offset: int, data: Buffer) -> None:
        """Claim 8 (E): store or replace the written blocks in the preservation store.

        Read-only snapshots raise `ReadOnly`. Writes are durable after `flush`.
        Raises `PreservationFull` when the store or the snapshot's capacity has no room.
        """
        check_range(offset, len(data), self.size)
        vol = self.volume
        store = vol.store
        bs = vol.block_size
        first = offset >> vol.shift
        end = ((offset + len(data) - 1) >> vol.shift) + 1
        n = end - first
        start = offset - first * bs
        whole = not start and len(data) == n * bs
        sums: list[int] = []
        if whole:
            # Whole blocks: their checksums need no lock (the store's lock is what FUA writes queue on).
            view = memoryview(data).cast("B")
            sums = [checksum(view[k * bs : (k + 1) * bs]) for k in range(n)]
        with store.lock:
            self._check_usable()
            if not self.record.writable:
                raise ReadOnly(what=f"snapshot {vol.name}@{self.name}")
            rec = self.record
            if not whole:
                buf = self._read_blocks(first, end)
                buf[start : start + len(data)] = data
                view = memoryview(buf)
            blocks = list(range(first, end))
            block_arr = np.arange(first, end, dtype=np.uint64)
            new_private = block_arr[~rec.private.contains(block_arr)]
            chain = store.chains[vol.record.id]
            # Blocks newly written here that no copy serves yet are new preserved blocks of the snapshot.
            gain = int((chain.max_gens(new_private) < rec.epoch).sum()) if len(new_private) else 0
            if n * bs > store.free_bytes() and store.pending_free:
                store.commit()  # blocks replaced earlier become free once their replacements are durable
            if n * bs > store.free_bytes():
                raise PreservationFull(needed=n * bs, free=store.free_bytes(), capacity=store.capacity)
            if rec.capacity is not None and (rec.preserved_blocks + gain) * bs > rec.capacity:
                free = rec.capacity - rec.preserved_blocks * bs
                raise PreservationFull(needed=gain * bs, free=max(0, free), capacity=rec.capacity)
            if not whole:
                sums = [checksum(view[k * bs : (k + 1) * bs]) for k in range(n)]
            with store.transaction():  # a failed write gives its slots back (see `PreservationStore`)
                slots = store.allocate(bs, n)
                store.write_slots(slots, view, bs)
                store.write_entries(slots, layout.PRIVATE, vol.record.id, [rec.id] * n, blocks, sums, None)
            # Durable with the next commit (a flush, or the next origin batch); the blocks they replace
            # are freed once that commit synced.
            store.free_rewritten(rec.private.replace_many(block_arr, 0, slots))
            rec.preserved_blocks += gain

    def zero(self, offset: int, length: int) -> None:
        check_range(offset, length, self.size)
        if not self.record.writable:
            raise ReadOnly(what=f"snapshot {self.volume.name}@{self.name}")
        self.write(offset, bytes(length))

    def flush(self) -> None:
        """Make writes to this snapshot durable (and every other write made so far to the store).

        Concurrent flushes share commits (`PreservationStore.flush`, group commit): a FUA write is a
        `write` then a `flush`, and the FUA writes of several NBD requests in flight cost one sync."""
        self.volume.store.flush()

    def close(self) -> None:
        pass

    def _check_usable(self) -> None:
        self.volume._check_open()
        rec = self.record
        if self.volume.store.snapshots.get(rec.id) is not rec:
            raise UnknownSnapshot(volume=self.volume.name, snapshot=rec.name)
        if not rec.valid:
            raise SnapshotInvalid(volume=self.volume.name, snapshot=rec.name, reason=rec.reason)

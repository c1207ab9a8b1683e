"""Snapshots seen as block devices (the patent's virtual devices): reads, read plans, writes.

A `Snapshot` reads, for each block, the preserved copy that serves it where there is one (claim 1 D:
the copy with the smallest tag not below the snapshot's epoch, or, for a writable snapshot, the block
written to it), else the origin block. A copy that is a hole entry (the block read as zeros when it
was preserved) has no data: the snapshot reads zeros there, and reports a hole.

Reads, extents and read plans hold the store's lock shared, so no origin write, snapshot write or
deletion changes their bytes meanwhile; a plan holds it until it is closed. Where a snapshot reads
from the store is cached per snapshot while the indexes do not change (`ServedRuns`, kept by its
volume).

A writable snapshot (claim 8) keeps the blocks written to it in store slots of its own, durable with
the next commit (`flush`, a group commit, or the next origin batch).

A snapshot needs of its volume only what `Origin` lists (`standbylib.snapshot.volume.Volume` is one),
so this module does not depend on the volume's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from standbylib.blockdev import BlockDevice, Device, check_range
from standbylib.errors import PreservationFull, ReadOnly, SnapshotInvalid, UnknownSnapshot
from standbylib.rawfile import Buffer, OsFile
from standbylib.readplan import Bytes, FileRange, Hole, Piece, ReadPlan
from standbylib.snapshot import layout
from standbylib.snapshot.layout import data_checksum as checksum
from standbylib.snapshot.records import SnapshotRecord, VolumeRecord
from standbylib.snapshot.store import Store

#: Index entries one uncached `Snapshot._served` lookup is worth, for deciding when to rebuild its cache.
_LOOKUP_COST = 256
#: Larger indexes are not cached (the cache takes up to 24 bytes per entry).
_MAX_CACHED_ENTRIES = 1 << 20


@dataclass(frozen=True)
class ServedRuns:
    """The runs a snapshot reads from the store (`Snapshot._served`), for the whole volume."""

    versions: tuple[int, int]  # of the volume's index and the snapshot's own index when built
    firsts: np.ndarray  # first block of each run, ascending
    ends: np.ndarray  # block after each run
    offsets: np.ndarray  # store offset of each run's first block; -1 for a run of hole entries


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's state and counters at one moment."""

    volume: str
    name: str
    valid: bool
    writable: bool
    created: str
    reason: str
    preserved_blocks: int  # distinct blocks it reads from data slots of the store
    preserved_bytes: int  # preserved_blocks x block size: the store space it holds
    capacity_bytes: int
    epoch: int = 0  # its place in the volume's history: a later snapshot has a larger epoch
    hole_blocks: int = 0  # distinct blocks it reads as hole entries (zeros preserved without data)
    labels: dict[str, Any] = field(default_factory=dict)  # noted by its creator (`create_snapshot`)

    @property
    def fill_ratio(self) -> float:
        return self.preserved_bytes / self.capacity_bytes if self.capacity_bytes else 0.0


class Origin(Protocol):
    """What a snapshot needs of its volume: the store, the origin, and the volume's cache of the runs
    each of its snapshots reads from the store (`served_cache`, `stale_lookups`, by snapshot id)."""

    @property
    def store(self) -> Store[Any]: ...

    @property
    def record(self) -> VolumeRecord: ...

    @property
    def device(self) -> BlockDevice: ...

    @property
    def block_size(self) -> int: ...

    @property
    def shift(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def served_cache(self) -> dict[int, ServedRuns]: ...

    @property
    def stale_lookups(self) -> dict[int, int]: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...

    def device_readinto(self, offset: int, view: memoryview) -> None: ...

    def check_open(self) -> None: ...


class Snapshot:
    """A snapshot seen as a block device (the patent's virtual device).

    Reads return the image frozen at creation, plus, for a writable snapshot,
    what was written to it. Thread-safe: reads, extents and read plans hold the
    store's lock shared (reads of any number of threads run in parallel, origin
    writes wait for them), writes hold it exclusively.
    """

    def __init__(self, volume: Origin, record: SnapshotRecord) -> None:
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
                capacity_bytes=rec.capacity if rec.capacity is not None else store.capacity_bytes(),
                epoch=rec.epoch,
                hole_blocks=rec.hole_blocks,
                labels=dict(rec.labels),
            )

    def read(self, offset: int, length: int) -> bytes:
        """Claim 1 (D): the preserved copy where there is one, else the origin block."""
        with self.read_plan(offset, length) as plan:
            buf = bytearray(length)
            plan.readinto(memoryview(buf))
        return bytes(buf)

    def read_plan(self, offset: int, length: int) -> ReadPlan:
        """Where the frozen image of ``[offset, offset+length)`` is (`standbylib.readplan`).

        Pieces: the store's slots for preserved (or, writable snapshot, written) blocks, holes for
        blocks preserved as hole entries and where the origin has a hole that no copy serves, the
        origin for the others; file ranges when the origin or store is a file, else the bytes
        themselves. The plan holds the store's lock shared until it is closed, so no origin write,
        snapshot write or deletion changes those bytes while it is open; close it as soon as its
        bytes are copied. ``zero_copy`` is never set: the origin is overwritten as soon as the plan is
        closed, so its pages must not be sent by reference.
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
        # Byte ranges served by the store: (start, stop, offset in the store, or -1 for hole entries).
        from_store: list[tuple[int, int, int]] = []
        covered = 0
        for b, n, at in zip(*self._served(offset >> shift, ((end - 1) >> shift) + 1), strict=True):
            start = max(b << shift, offset)
            stop = min((b + n) << shift, end)
            from_store.append((start, stop, at + start - (b << shift) if at >= 0 else -1))
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
                pieces.append(FileRange(store_fd, at, stop - start) if at >= 0 else Hole(stop - start))
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
            if at < 0:
                pieces.append(Hole(stop - start))
            elif store_fd is not None:
                pieces.append(FileRange(store_fd, at, stop - start))
            else:
                pieces.append(Bytes(store.raw.pread(stop - start, at)))
            pos = stop
        from_origin(pos, end)
        return pieces

    def _served(self, first: int, end: int) -> tuple[list[int], list[int], list[int]]:
        """Runs of the blocks in [first, end) that this snapshot reads from the store, each contiguous
        in the volume and in the store file: first blocks, block counts, store offsets (-1 for a run
        of hole entries, which read as zeros; a run may reach outside [first, end); callers clip).

        Per block: its own written block (writable snapshot), else the oldest copy made since the
        snapshot was created. The runs of the whole volume are cached per snapshot while the indexes
        do not change (a lookup is then two binary searches); after a change the lookups go to the
        indexes until they have cost about what rebuilding the cache does, so that a steady stream of
        origin writes never pays for more than twice the uncached lookups. Runs hold the store's
        lock (shared or exclusive); racing readers may both rebuild, to the same result.
        """
        vol = self.volume
        rec = self.record
        chain = vol.store.chain(vol.record.id)
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
            vol.served_cache[rec.id] = ServedRuns(versions, firsts, firsts + counts, offsets)
            vol.stale_lookups[rec.id] = 0
            return self._served(first, end)
        vol.stale_lookups[rec.id] = stale
        firsts, counts, offsets = self._run_arrays(first, end)
        return firsts.tolist(), counts.tolist(), offsets.tolist()

    def _run_arrays(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_served` looked up in the indexes (vectorised), as arrays: first blocks (uint64), block
        counts (uint64), store offsets (int64, -1 for runs of hole entries)."""
        vol = self.volume
        store = vol.store
        blocks, slots = store.chain(vol.record.id).oldest_from(first, end, self.record.epoch)
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
        # A run ends where the next block or the next slot is not adjacent; hole entries (offset -1)
        # of consecutive blocks make one run.
        starts = np.empty(1, np.intp)
        starts[0] = 0
        holes = offsets < 0
        breaks = np.flatnonzero(
            (blocks[1:] != blocks[:-1] + 1)
            | ((offsets[1:] != offsets[:-1] + vol.block_size) & ~(holes[1:] & holes[:-1]))
        )
        starts = np.concatenate((starts, breaks + 1))
        counts = np.diff(starts, append=len(blocks)).astype(np.uint64)
        return blocks[starts], counts, offsets[starts]

    def _read_blocks(self, first: int, end: int) -> bytearray:
        """Blocks [first, end) as this snapshot reads them (under the store's lock): where `_served`
        says, from the store (zeros for hole entries), else from the origin."""
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
            if at >= 0:  # (hole entries read as zeros: the buffer is)
                raw.preadinto(view[(start - first) * bs : (stop - first) * bs], at + (start - b) * bs)
            pos = stop
        if pos < end:
            vol.device_readinto(pos * bs, view[(pos - first) * bs :])
        return buf

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs: a block is a hole when it is preserved as a hole entry (it read
        as zeros when it was preserved), or when no preserved or written copy serves it and the origin
        block is a hole (it reads as zeros and was never written)."""
        check_range(offset, length, self.size)
        vol = self.volume
        shift = vol.shift
        end = offset + length
        with vol.store.lock.shared():
            self._check_usable()
            origin = vol.extents(offset, length)
            first_blocks, counts, at = self._served(offset >> shift, ((end - 1) >> shift) + 1)
        # Only the store's runs that differ from the origin under them change what is reported: data
        # over the origin's holes, hole entries over its data.
        over_holes: list[tuple[int, int, bool]] = []
        over_data: list[tuple[int, int, bool]] = []
        for b, n, where in zip(first_blocks, counts, at, strict=True):
            hole = where < 0
            (over_data if hole else over_holes).append((b << shift, (b + n) << shift, hole))
        runs: list[tuple[int, bool]] = []

        def add(n: int, hole: bool) -> None:
            if runs and runs[-1][1] == hole:
                runs[-1] = (runs[-1][0] + n, hole)
            elif n:
                runs.append((n, hole))

        pos = offset
        index = {True: 0, False: 0}  # per kind of origin run: the first served run not behind it
        for n, hole in origin:
            stop = pos + n
            served = over_holes if hole else over_data
            i = index[hole]
            while i < len(served) and served[i][1] <= pos:
                i += 1
            index[hole] = i
            p = pos
            while i < len(served) and served[i][0] < stop:
                start = max(p, served[i][0])
                served_end = min(stop, served[i][1])
                add(start - p, hole)
                add(served_end - start, served[i][2])
                p = served_end
                i += 1
            add(stop - p, hole)
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
            chain = store.chain(vol.record.id)
            # Blocks newly written here that no copy serves yet, or only a hole entry, are new preserved
            # blocks of the snapshot (read from its own slots from now on).
            gain = holes_left = 0
            if len(new_private):
                served = chain.max_gens(new_private) >= rec.epoch
                gain = len(new_private) - int(served.sum())
                if served.any():
                    served_blocks, served_slots = chain.oldest_from(first, end, rec.epoch)
                    hole_blocks = served_blocks[store.is_hole(served_slots)]
                    if len(hole_blocks):
                        holes_left = int(np.isin(hole_blocks, new_private).sum())
                        gain += holes_left
            if n * bs > store.free_bytes() and store.has_pending_frees():
                store.commit()  # blocks replaced earlier become free once their replacements are durable
            if n * bs > store.free_bytes():
                raise PreservationFull(
                    needed=n * bs, free=store.free_bytes(), capacity=store.capacity_bytes()
                )
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
            rec.hole_blocks -= holes_left

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
        self.volume.check_open()
        rec = self.record
        if not self.volume.store.has_snapshot(rec):
            raise UnknownSnapshot(volume=self.volume.name, snapshot=rec.name)
        if not rec.valid:
            raise SnapshotInvalid(volume=self.volume.name, snapshot=rec.name, reason=rec.reason)

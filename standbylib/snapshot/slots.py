"""The slot space of the store file: areas, slots and entries, and the journal of writes since a sync.

Past the superblock and the two table copies, the store file is a run of areas (docs/STORE-FORMAT.md,
"Areas"): each an entry block (a header, then one 32-byte entry per slot) and 127 slots of one slot
size. An *entry area* (slot size 0) has no slots: its entries are hole entries, preserved blocks that
read as zeros and have no data; its "slots" are numbered like the others but take no space and no
bytes of `used_bytes`. `SlotSpace` owns that space: where each slot and each entry is, which slots are
free, in use, freed but waiting for the next commit's sync (`pending`: they are reused only after it),
or set aside after a failure whose entries could not be zeroed yet (`quarantine`), and how many bytes
are in use.
It writes the slots and their entries; the store (`standbylib.snapshot.store`) decides when, under its
exclusive lock and within its transactions.

`Journal` remembers the ranges of the file written since the last sync that RAM relies on. A failed
sync may have lost any of them even if a later sync succeeds (the kernel may drop the pages it failed
to write), so the commit after a failed sync writes them again first (`Journal.rewrite`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np
import numpy.typing as npt

from standbylib.errors import StandbyError
from standbylib.rawfile import RawFile, is_zero
from standbylib.snapshot import layout

_PER_AREA = layout.ENTRIES_PER_AREA


class Journal:
    """The writes to the store file since the last commit and since the last good sync.

    `dirty`: something was written since the last commit (it needs a sync). `sync_failed`: the last
    sync failed, so the ranges noted since the last good one must be written again before the next.
    """

    def __init__(self, raw: RawFile) -> None:
        self._raw = raw
        self.dirty = False
        self.sync_failed = False
        self._unsynced: list[list[int]] = []  # [offset, end) written since the last sync

    def note(self, offset: int, length: int) -> None:
        """Remember a write that RAM will rely on once committed (see `rewrite`)."""
        self.dirty = True
        if self._unsynced and self._unsynced[-1][1] == offset:
            self._unsynced[-1][1] = offset + length
        else:
            self._unsynced.append([offset, offset + length])

    def take(self) -> list[list[int]]:
        """The ranges noted so far, which the commit being prepared covers; the journal starts afresh."""
        covered, self._unsynced = self._unsynced, []
        return covered

    def put_back(self, covered: list[list[int]]) -> None:
        """Ranges a commit took (`take`) and did not make durable: noted again, before the newer ones."""
        self._unsynced[:0] = covered

    def rewrite(self) -> None:
        """After a failed sync: write again everything written since the last good sync.

        A failed fdatasync may have dropped those pages from the cache after failing to write them,
        and a later fdatasync would then report success without them. Rewriting them as they read
        now (RAM still has them, or they are on disk) makes them dirty again. Ranges that read as
        zeros are zeroed with `zero`, which needs no space where they are holes.
        """
        for start, end in list(self._unsynced):
            for offset in range(start, end, 1 << 20):
                n = min(1 << 20, end - offset)
                data = self._raw.pread(n, offset)
                if is_zero(data):
                    self.zero(offset, n, note=False)  # already noted
                else:
                    self._raw.pwrite(data, offset)
        self.sync_failed = False

    def zero(self, offset: int, length: int, *, note: bool = True) -> None:
        """Make ``[offset, offset+length)`` read as zeros, allocating no space where possible.

        Punching allocates nothing (a hole already reads as zeros; a range inside an allocated
        block is zeroed in place), but some filesystems leave a sub-block range that starts on a
        block boundary untouched: read back, and write zeros over what is still not zero (an
        allocated block, so the write needs no new space). Raises what the write or read raised.
        """
        with contextlib.suppress(StandbyError):
            self._raw.punch(offset, length)
        if not is_zero(self._raw.pread(length, offset)):
            self._raw.pwrite(bytes(length), offset)
        if note:
            self.note(offset, length)


class SlotSpace:
    """The areas of one store file and the state of each slot; owned by the store, under its lock.

    State (read by the store, and filled by recovery): `area_offsets` and `area_slot_sizes` per area,
    `end` (where the next area goes), `free` (slot size -> free slots, sorted descending), `pending`
    (freed, reused once the next commit synced), `rewritten` (such slots whose block a writable
    snapshot rewrote: not deallocated, see `free_rewritten`), `allocated_free` (free slots whose data
    was not deallocated), `quarantine`, `used_bytes` and `live_slots` (data slots in use or pending),
    `live_holes` (hole entries in use or pending: slots of entry areas, `layout.ENTRY_AREA`), and
    `private_ver` (the write counter of the last entry of a block written to a writable snapshot).

    `on_abort` registers what to undo if the operation in progress fails before its commit (the
    store's `transaction`): `allocate` gives its slots back that way.
    """

    def __init__(
        self, raw: RawFile, journal: Journal, on_abort: Callable[[Callable[[], None]], None]
    ) -> None:
        self._raw = raw
        self._journal = journal
        self._on_abort = on_abort
        self.area_offsets: list[int] = []
        self.area_slot_sizes: list[int] = []
        self._area_arrays: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] = (
            np.empty(0, np.int64),
            np.empty(0, np.int64),
        )
        self.end = layout.AREAS_OFFSET
        self.free: dict[int, list[int]] = {}
        self.pending: list[int] = []
        self.rewritten: set[int] = set()
        self.allocated_free: set[int] = set()
        self.used_bytes = 0
        self.live_slots = 0
        self.live_holes = 0
        self.quarantine: list[int] = []  # slots whose entries could not be zeroed yet
        self.private_ver = 0

    # -- where things are ---------------------------------------------------------------------------

    def slot_offset(self, slot: int) -> int:
        """Where the data of `slot` is in the store file."""
        area, i = divmod(slot, _PER_AREA)
        return self.area_offsets[area] + layout.ENTRY_BLOCK + i * self.area_slot_sizes[area]

    def _areas(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per area: where its first slot is (-1 for an entry area, which has none) and its slot size."""
        starts, sizes = self._area_arrays
        if len(starts) != len(self.area_offsets):
            # Areas are only ever added: rebuild when one was (racing readers build the same arrays).
            starts = np.array(self.area_offsets, np.int64) + layout.ENTRY_BLOCK
            sizes = np.array(self.area_slot_sizes, np.int64)
            starts[sizes == layout.ENTRY_AREA] = -1
            self._area_arrays = (starts, sizes)
        return starts, sizes

    def slot_offsets(self, slots: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """`slot_offset` of each of `slots`, vectorised; -1 for a hole entry (it has no data)."""
        starts, sizes = self._areas()
        slot = slots.astype(np.int64)
        area = slot // _PER_AREA
        offsets: npt.NDArray[np.int64] = starts[area] + (slot - area * _PER_AREA) * sizes[area]
        return offsets

    def is_hole(self, slots: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
        """For each of `slots`, whether it is a hole entry (a slot of an entry area)."""
        _starts, sizes = self._areas()
        found: npt.NDArray[np.bool_] = sizes[slots.astype(np.int64) // _PER_AREA] == layout.ENTRY_AREA
        return found

    def entry_offset(self, slot: int) -> int:
        """Where the entry describing `slot` is in the store file."""
        area, i = divmod(slot, _PER_AREA)
        return self.area_offsets[area] + layout.AREA_HEADER + i * layout.ENTRY_SIZE

    def slot_size(self, slot: int) -> int:
        """The slot size of the area holding `slot`."""
        return self.area_slot_sizes[slot // _PER_AREA]

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

    # -- taking and freeing slots ------------------------------------------------------------------

    def add_area(self, slot_size: int) -> None:
        """Append an area of `slot_size` slots to the file; its slots become free."""
        area_no = len(self.area_offsets)
        offset = self.end
        # Only the header: the rest of the entry block is a hole (free entries), since
        # nothing is ever left past the last area (recovery truncates what a crash left there).
        # An area added by an operation that fails later stays (empty, its header valid).
        self._raw.pwrite(layout.pack_area_header(area_no, slot_size), offset)
        self._journal.note(offset, layout.AREA_HEADER)
        self.area_offsets.append(offset)
        self.area_slot_sizes.append(slot_size)
        self.end = offset + layout.area_size(slot_size)
        first = area_no * _PER_AREA
        free = self.free.setdefault(slot_size, [])
        free[:0] = range(first + _PER_AREA - 1, first - 1, -1)

    def allocate(self, slot_size: int, n: int) -> list[int]:
        """Take `n` free slots of `slot_size`, lowest first, adding areas as needed.

        If the operation in progress fails before its commit, the slots are given back
        (`abort`): a failed write never keeps space.
        """
        free = self.free.setdefault(slot_size, [])
        while len(free) < n:
            self.add_area(slot_size)
        taken = free[-n:]
        del free[-n:]
        taken.reverse()
        if self.allocated_free:
            self.allocated_free.difference_update(taken)
        if slot_size == layout.ENTRY_AREA:  # (`count_used`, inline: every batch of copies comes here)
            self.live_holes += n
        else:
            self.used_bytes += n * slot_size
            self.live_slots += n
        self._on_abort(lambda: self.abort(taken))
        return taken

    def count_used(self, slot_size: int, n: int) -> None:
        """`n` more (or, negative, fewer) slots of `slot_size` in use."""
        if slot_size == layout.ENTRY_AREA:
            self.live_holes += n
        else:
            self.used_bytes += n * slot_size
            self.live_slots += n

    def abort(self, slots: list[int]) -> None:
        """Give back `slots`, taken by an operation that failed before its commit.

        Their entries may be on disk, whole or torn, describing data that will never be
        committed: they are zeroed first, so no later commit can declare them complete. When that
        fails too, the slots wait in `quarantine` (out of the free lists: not reused, not counted)
        and every commit first zeroes them (`settle_quarantine`). Never raises.
        """
        by_size: dict[int, int] = {}
        for slot in slots:
            size = self.area_slot_sizes[slot // _PER_AREA]
            by_size[size] = by_size.get(size, 0) + 1
        for size, n in by_size.items():
            self.count_used(size, -n)
        try:
            self.clear_entries(slots)
        except StandbyError:
            self.quarantine.extend(slots)
            return
        self.give_back(slots)

    def settle_quarantine(self) -> None:
        """Zero the entries of the slots set aside and free them. Raises, keeping them aside, when
        an entry cannot be zeroed (a commit must not run then)."""
        if self.quarantine:
            self.clear_entries(self.quarantine)
            self.give_back(self.quarantine)
            self.quarantine = []

    def clear_entries(self, slots: list[int]) -> None:
        """Zero the entries of `slots` (one range per contiguous run). Raises when one cannot be."""
        ordered = sorted(slots)
        for i, j in self.slot_runs(ordered):
            self._journal.zero(self.entry_offset(ordered[i]), (j - i) * layout.ENTRY_SIZE)

    def give_back(self, slots: list[int]) -> None:
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
            if punch and size != layout.ENTRY_AREA:  # an entry area has no data to deallocate
                self._deallocate(sorted(punch), size)
            free = self.free.setdefault(size, [])
            free.extend(group)
            free.sort(reverse=True)

    def release(self, slots: Iterable[int]) -> None:
        """Return slots to the free lists and deallocate their data (punch holes, best effort)."""
        by_size: dict[int, list[int]] = {}
        for slot in slots:
            by_size.setdefault(self.area_slot_sizes[slot // _PER_AREA], []).append(slot)
        for size, group in by_size.items():
            group.sort()
            self.count_used(size, -len(group))
        self.give_back([s for group in by_size.values() for s in group])

    def free_rewritten(self, slots: list[int]) -> None:
        """Free `slots`, whose blocks a writable snapshot rewrote, once the next commit synced, without
        deallocating their data: writes reuse such slots soon, and punching a hole that the next
        write allocates again costs more than the write (a fallocate, then block allocation that
        the next sync must commit). `deallocate_free` punches them when space matters."""
        self.pending.extend(slots)
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
                self._raw.punch(self.slot_offset(start), (prev - start + 1) * size)
            start = prev = slot

    # -- writing slots and entries -----------------------------------------------------------------

    def write_slots(self, slots: list[int], data: memoryview, slot_size: int) -> None:
        """Write consecutive `slot_size` pieces of `data` to `slots`, one pwrite per contiguous run."""
        for i, j in self.slot_runs(slots):
            self._raw.pwrite(data[i * slot_size : j * slot_size], self.slot_offset(slots[i]))
            self._journal.note(self.slot_offset(slots[i]), (j - i) * slot_size)

    def write_entries(
        self,
        slots: list[int],
        kind: int,
        vol: int,
        tags: Iterable[int],
        blocks: Iterable[int],
        sums: list[int] | None,
        segments: list[tuple[int, int]] | None,
        seq: int,
    ) -> None:
        """Write the entries describing `slots` (one pwrite per contiguous run within an area), with
        the commit number `seq`.

        For copies, `segments` (from `slot_runs`) group slots whose data shares one
        checksum: each entry records its index in its segment and the segment length.
        Hole entries (`layout.HOLE`, slots of an entry area) have no data: `sums` is None and
        each entry gets the checksum of its own fields (`layout.entry_checksums`).
        """
        n = len(slots)
        entries = np.zeros(n, layout.ENTRY_DTYPE)
        entries["kind"] = kind
        entries["vol"] = vol
        entries["tag"] = np.fromiter(tags, np.uint32, n)
        entries["block"] = np.fromiter(blocks, np.uint64, n)
        entries["seq"] = seq
        if kind == layout.HOLE:
            entries["dsum"] = layout.entry_checksums(entries)
        else:
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
            self._raw.pwrite(raw[i * layout.ENTRY_SIZE : j * layout.ENTRY_SIZE], self.entry_offset(slots[i]))
            self._journal.note(self.entry_offset(slots[i]), (j - i) * layout.ENTRY_SIZE)

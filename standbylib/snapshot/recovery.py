"""Opening an existing store file: recovery (docs/STORE-FORMAT.md, "Commits and recovery").

`recover` reads what the last commits left and rebuilds the store's RAM from it:

1. check the superblock (format 1 or 2); load the newest intact table (two copies, the larger update
   number wins);
2. walk the areas from 4 MiB until a header does not check out (an area whose header was never made
   durable holds nothing durable); anything past the last intact area is cut off;
3. the entries of commits after the one the commit record names are the only ones that may be
   incomplete (every commit up to it ended with a sync; a later one may not have): read their
   segments (or slots) and drop each whose checksum does not match (a hole entry, which has no
   data, carries the checksum of its own fields). This is safe because the origin blocks they
   preserve were not overwritten before that commit's sync;
4. keep the copies and hole entries that a valid snapshot still reads and, per writable snapshot and
   block, the newest written block; every other slot is free; rebuild the association indexes and
   the snapshots' counts of preserved blocks and holes;
5. zero the dropped entries, upgrade a format-1 superblock to format 2 (a format-1 store is a
   format-2 store without entry areas), and sync, so that what was read is durable. Only then may
   the store write a commit record covering those commits, or an entry area (`Store._recover`
   commits at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from standbylib.errors import StoreCorrupt
from standbylib.rawfile import RawFile
from standbylib.snapshot import layout
from standbylib.snapshot.index import ChainIndex, referenced, sort_run
from standbylib.snapshot.records import SnapshotRecord, VolumeRecord, live_snapshots
from standbylib.snapshot.slots import SlotSpace

_PER_AREA = layout.ENTRIES_PER_AREA


@dataclass
class Recovered:
    """The table and indexes read back by `recover`, for the store to take over."""

    table_seq: int  # update number of the table loaded
    capacity: int
    next_epoch: int
    next_snapshot_id: int
    next_volume_id: int
    volume_records: dict[str, VolumeRecord]  # by name
    snapshots: dict[int, SnapshotRecord]  # by id
    chains: dict[int, ChainIndex]  # by volume id
    commit_seq: int  # the next commit's number: every commit before it is now complete
    found_version: int  # the store format the file had (it has `layout.VERSION` now)


def recover(raw: RawFile, path: str, slots: SlotSpace) -> Recovered:
    """Read the store file `raw` (named `path` in errors), fill the empty `slots` with its areas and
    the state of every slot, drop and zero the torn entries, and sync. Raises `StoreCorrupt` when the
    superblock or every table copy is damaged."""
    superblock = raw.pread(layout.SUPERBLOCK_SIZE, 0)
    problem = layout.check_superblock(superblock)
    if problem:
        raise StoreCorrupt(path=path, detail=problem)
    version = layout.superblock_version(superblock)
    completed = max(layout.unpack_commit_record(superblock[off:]) for off in layout.COMMIT_RECORD_OFFSETS)
    best: tuple[int, dict[str, Any]] | None = None
    for off in layout.TABLE_OFFSETS:
        found = layout.unpack_table(raw.pread(layout.TABLE_SIZE, off))
        if found and (best is None or found[0] > best[0]):
            best = found
    if best is None:
        raise StoreCorrupt(path=path, detail="no intact volume and snapshot table")
    table_seq, table = best
    volume_records: dict[str, VolumeRecord] = {}
    chains: dict[int, ChainIndex] = {}
    snapshots: dict[int, SnapshotRecord] = {}
    for v in table["volumes"]:
        rec = VolumeRecord.from_json(v)
        volume_records[rec.name] = rec
        chains[rec.id] = ChainIndex()
    for s in table["snapshots"]:
        snap = SnapshotRecord.from_json(s)
        snapshots[snap.id] = snap
    result = Recovered(
        table_seq=table_seq,
        capacity=int(table["capacity"]),
        next_epoch=int(table["next_epoch"]),
        next_snapshot_id=int(table["next_snapshot_id"]),
        next_volume_id=int(table["next_volume_id"]),
        volume_records=volume_records,
        snapshots=snapshots,
        chains=chains,
        commit_seq=completed + 1,
        found_version=version,
    )
    entries = _walk_areas(raw, slots)
    slot_sizes = np.repeat(np.array(slots.area_slot_sizes, np.int64), _PER_AREA)
    kinds = entries["kind"].copy()
    # A hole entry belongs in an entry area and nothing else does: anything else there was never
    # written by a commit (this software writes each kind only where it belongs).
    in_entry_area = slot_sizes == layout.ENTRY_AREA
    kinds[in_entry_area != (kinds == layout.HOLE)] = layout.FREE
    dropped = _check_unfinished(raw, slots, entries, kinds, completed, result)
    live = _rebuild_indexes(entries, kinds, result)

    # Free lists and usage (`SlotSpace.count_used`: hole entries take no bytes).
    for slot_size in set(slots.area_slot_sizes):
        of_size = slot_sizes == slot_size
        slots.free[slot_size] = np.nonzero(of_size & ~live)[0][::-1].tolist()
        slots.count_used(slot_size, int((of_size & live).sum()))
    _recount(result, slots)

    # Forget torn entries for good and make what we read durable; only then may the
    # commit record declare those commits complete.
    for slot in dropped:
        raw.pwrite(bytes(layout.ENTRY_SIZE), slots.entry_offset(slot))
    if version != layout.VERSION:
        # Format 1 is format 2 without entry areas: naming the new version is the whole upgrade. The
        # superblock's first sector only (the commit records follow it), made durable by this sync
        # before the store can write an entry area that format-1 software would cut off.
        raw.pwrite(layout.pack_superblock()[: layout.SUPERBLOCK_SECTOR], 0)
    raw.sync()
    return result


def _walk_areas(raw: RawFile, slots: SlotSpace) -> np.ndarray:
    """Add the intact areas to `slots`, cut off what follows them, and return their entries."""
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
        slots.area_offsets.append(off)
        slots.area_slot_sizes.append(slot_size)
        off += layout.area_size(slot_size)
        n_areas += 1
    slots.end = off
    if size > off:
        # Only an unfinished commit can have written past the last intact area.
        raw.truncate(off)
    # Each 4 KiB entry block is 128 records of 32 bytes: the area header, then 127 entries.
    per_block = layout.ENTRY_BLOCK // layout.ENTRY_SIZE
    records = np.frombuffer(heads, layout.ENTRY_DTYPE, n_areas * per_block).reshape(n_areas, per_block)
    entries = records[:, per_block - _PER_AREA :].reshape(-1).copy()
    return entries


def _check_unfinished(
    raw: RawFile, slots: SlotSpace, entries: np.ndarray, kinds: np.ndarray, completed: int, result: Recovered
) -> list[int]:
    """Check the data of the entries newer than commit `completed`; mark those that fail free in
    `kinds` and return their slots. Sets the next commit number and the snapshot write counter."""
    # Entries of a commit not known to be complete may be torn: check their data.
    used = kinds != layout.FREE
    dropped: list[int] = []
    if used.any():
        result.commit_seq = max(result.commit_seq, int(entries["seq"][used].max()) + 1)
        unfinished = used & (entries["seq"] > completed)
        # A hole entry has no data: it carries the checksum of its own fields.
        holes = np.nonzero(unfinished & (kinds == layout.HOLE))[0]
        if len(holes):
            sums = np.array(layout.entry_checksums(entries[holes]), np.uint32)
            torn = holes[sums != entries["dsum"][holes]]
            kinds[torn] = layout.FREE
            dropped.extend(torn.tolist())
            unfinished[holes] = False
        checked: set[int] = set()
        for slot in np.nonzero(unfinished)[0].tolist():
            if slot in checked:
                continue
            if kinds[slot] == layout.COPY:  # a segment of copies shares one checksum
                start = slot - int(entries["pad"][slot])
                count = max(1, int(entries["reserved"][slot]))
            else:
                start, count = slot, 1
            group = range(start, start + count)
            checked.update(group)
            data = raw.pread(count * slots.area_slot_sizes[slot // _PER_AREA], slots.slot_offset(start))
            if start // _PER_AREA != (start + count - 1) // _PER_AREA or layout.data_checksum(data) != int(
                entries["dsum"][slot]
            ):
                for s in group:
                    if kinds[s] != layout.FREE and entries["seq"][s] > completed:
                        kinds[s] = layout.FREE
                        dropped.append(s)
        slots.private_ver = int(entries["reserved"][kinds == layout.PRIVATE].max(initial=0))
    return dropped


def _rebuild_indexes(entries: np.ndarray, kinds: np.ndarray, result: Recovered) -> np.ndarray:
    """Rebuild the indexes of `result` from the entries kept; which slots they use."""
    nslots = len(entries)
    live = np.zeros(nslots, bool)
    vols = entries["vol"]
    known_vols = {r.id for r in result.volume_records.values()}
    preserved = (kinds == layout.COPY) | (kinds == layout.HOLE)  # a hole entry is a copy without data
    for vol_id in known_vols:
        sel = np.nonzero(preserved & (vols == vol_id))[0]
        if not len(sel):
            continue
        blocks, gens, slots = sort_run(
            entries["block"][sel].astype(np.uint64),
            entries["tag"][sel].astype(np.uint32),
            sel.astype(np.uint32),
        )
        epochs = np.array(
            sorted(s.epoch for s in live_snapshots(result.snapshots.values(), vol_id)), np.int64
        )
        keep = referenced(blocks, gens, epochs)
        slots, blocks, gens = slots[keep], blocks[keep], gens[keep]
        live[slots] = True
        result.chains[vol_id] = ChainIndex(blocks, gens, slots)
    for snap in result.snapshots.values():
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
    return live


def _recount(result: Recovered, slots: SlotSpace) -> None:
    """Rebuild each snapshot's counts of preserved blocks (read from data slots of the store) and
    holes (read as hole entries) from the indexes."""
    for vol_id, chain in result.chains.items():
        blocks, gens, chain_slots = chain.arrays()
        hole = slots.is_hole(chain_slots)
        # Sorted by (block, gen): an entry serves the snapshots with an epoch in (prev, gen], prev being
        # the generation of the block's previous entry (0 for its first). So the number of entries
        # serving epoch e is #{prev < e} - #{gen < e} (gen < e implies prev < e), per kind.
        g = gens.astype(np.int64)
        prev = np.zeros(len(g), np.int64)
        if len(g) > 1:
            prev[1:] = np.where(blocks[1:] == blocks[:-1], g[:-1], 0)
        bounds = [(np.sort(prev[m]), np.sort(g[m])) for m in (~hole, hole)]
        for snap in live_snapshots(result.snapshots.values(), vol_id):
            e = snap.epoch
            data, holes = (
                int(np.searchsorted(p, e, "left")) - int(np.searchsorted(q, e, "left")) for p, q in bounds
            )
            pblocks = snap.private.arrays()[0]
            if len(pblocks):
                # Blocks written to the snapshot itself are read from its own slots, whatever serves
                # them in the volume's index.
                served, served_slots = chain.oldest_from(0, 1 << 63, e)
                mine = np.isin(served, pblocks)
                mine_hole = slots.is_hole(served_slots[mine])
                holes -= int(mine_hole.sum())
                data += len(pblocks) - int((~mine_hole).sum())
            snap.preserved_blocks = data
            snap.hole_blocks = holes

"""The in-RAM association index (the patent's "block association memory").

`ChainIndex` maps a block number to the preserved copies of that block, each
tagged with a generation, sorted by generation. It is a small log-structured
merge tree of sorted numpy runs (16 bytes per entry: block u64, generation u32,
slot u32): a batch of copies is appended as one sorted run, runs are merged in
bulk, and every lookup is a vectorised binary search per run. RAM grows with
preserved blocks and never with volume size. `referenced` says which copies of
an index the valid snapshots still read (the others can be freed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
Run = tuple[U64, U32, U32]

_MAX_RUNS = 8


def sort_run(blocks: U64, gens: U32, slots: U32) -> Run:
    """Sort three parallel arrays by (block, gen)."""
    if len(blocks) > 1:
        if int(blocks.max()) < (1 << 32):
            order = np.argsort((blocks << np.uint64(32)) | gens.astype(np.uint64), kind="stable")
        else:
            order = np.lexsort((gens, blocks))
        return blocks[order], gens[order], slots[order]
    return blocks, gens, slots


def _merge_runs(runs: Sequence[Run]) -> Run:
    if len(runs) == 1:
        return runs[0]
    return sort_run(
        np.concatenate([r[0] for r in runs]),
        np.concatenate([r[1] for r in runs]),
        np.concatenate([r[2] for r in runs]),
    )


def _empty() -> Run:
    return np.empty(0, np.uint64), np.empty(0, np.uint32), np.empty(0, np.uint32)


class ChainIndex:
    """block -> [(gen, slot), ...] sorted by gen. Not thread-safe; the store's lock guards it."""

    def __init__(self, blocks: U64 | None = None, gens: U32 | None = None, slots: U32 | None = None) -> None:
        """Build from arrays already sorted by (block, gen), or empty."""
        if blocks is None or gens is None or slots is None:
            self._base = _empty()
        else:
            self._base = (blocks, gens, slots)
        self._runs: list[Run] = []  # newer, smaller sorted runs
        self._len = len(self._base[0])
        self.version = 0  # bumped by every change of the entries (not by `merge`)

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(int(a.nbytes) for run in (self._base, *self._runs) for a in run)

    def _levels(self) -> list[Run]:
        return [self._base, *self._runs] if self._runs else [self._base]

    def max_gens(self, blocks: U64) -> U64:
        """For each of the sorted, distinct `blocks`, its largest generation (0 when none)."""
        out = np.zeros(len(blocks), np.uint64)
        for lb, lg, _ls in self._levels():
            if not len(lb):
                continue
            pos = np.searchsorted(lb, blocks, "right") - 1
            valid = pos >= 0
            posv = np.where(valid, pos, 0)
            hit = valid & (lb[posv] == blocks)
            np.maximum(out, np.where(hit, lg[posv], 0).astype(np.uint64), out=out)
        return out

    def contains(self, blocks: U64) -> npt.NDArray[np.bool_]:
        """For each of `blocks`, whether it has any entry."""
        out = np.zeros(len(blocks), bool)
        for lb, _lg, _ls in self._levels():
            if len(lb):
                pos = np.minimum(lb.searchsorted(blocks, "left"), len(lb) - 1)
                out |= lb[pos] == blocks
        return out

    def range(self, first: int, end: int) -> dict[int, list[tuple[int, int]]]:
        """Entries of blocks in [first, end): block -> [(gen, slot), ...] sorted by gen."""
        found: dict[int, list[tuple[int, int]]] = {}
        # numpy scalars of the arrays' dtype: with a Python int, searchsorted casts the whole array
        # to float64 first (uint64 and int64 promote to float64), which made every lookup O(n).
        lo_key, hi_key = np.uint64(first), np.uint64(end)
        for blocks, gens, slots in self._levels():
            lo = int(blocks.searchsorted(lo_key))
            hi = int(blocks.searchsorted(hi_key))
            if hi > lo:
                for b, g, s in zip(
                    blocks[lo:hi].tolist(), gens[lo:hi].tolist(), slots[lo:hi].tolist(), strict=True
                ):
                    found.setdefault(b, []).append((g, s))
        if self._runs:
            for lst in found.values():
                if len(lst) > 1:
                    lst.sort()
        return found

    def oldest_from(self, first: int, end: int, gen: int) -> tuple[U64, U32]:
        """For each block in [first, end) with an entry of generation >= `gen`: the block (ascending)
        and the slot of its oldest such entry."""
        lo_key, hi_key = np.uint64(first), np.uint64(end)  # see `range`
        found: list[Run] = []
        for blocks, gens, slots in self._levels():
            lo = blocks.searchsorted(lo_key)
            hi = blocks.searchsorted(hi_key)
            if hi > lo:
                found.append((blocks[lo:hi], gens[lo:hi], slots[lo:hi]))
        if not found:
            return _empty()[0], _empty()[2]
        b, g, s = found[0] if len(found) == 1 else _merge_runs(found)
        if gen:
            keep = g >= np.uint32(gen)
            b, s = b[keep], s[keep]
        if len(b) > 1:
            # Sorted by (block, gen): the first entry of each block is its oldest.
            first_of_block = np.empty(len(b), bool)
            first_of_block[0] = True
            np.not_equal(b[1:], b[:-1], out=first_of_block[1:])
            b, s = b[first_of_block], s[first_of_block]
        return b, s

    def blocks_of_gens(self, lo: int, hi: int) -> U64:
        """The distinct blocks, ascending, with an entry of generation `lo` <= gen < `hi`. Reads the
        levels without merging them (safe under the store's shared lock); the cost follows the
        entries, not the volume's size."""
        low, high = np.uint32(lo), np.uint32(hi)
        found = [lb[(lg >= low) & (lg < high)] for lb, lg, _ls in self._levels() if len(lb)]
        if not found:
            return np.empty(0, np.uint64)
        return np.unique(np.concatenate(found))

    def add_many(self, blocks: Sequence[int], gen: int, slots: Sequence[int]) -> None:
        """Add (block, gen, slot) for each of the distinct `blocks`; none may be present yet."""
        n = len(blocks)
        if not n:
            return
        run = sort_run(np.array(blocks, np.uint64), np.full(n, gen, np.uint32), np.array(slots, np.uint32))
        self._runs.append(run)
        self._len += n
        self.version += 1
        if len(self._runs) > _MAX_RUNS:
            young = _merge_runs(self._runs)
            if len(young[0]) * 8 > len(self._base[0]):
                self._base = _merge_runs([self._base, young])
                self._runs = []
            else:
                self._runs = [young]

    def replace(self, block: int, gen: int, slot: int) -> int | None:
        """Point (block, gen) at `slot`, adding it if absent; return the slot it had, if any."""
        key = np.uint64(block)  # see `range`
        for blocks, gens, slots in self._levels():
            lo = int(np.searchsorted(blocks, key, "left"))
            hi = int(np.searchsorted(blocks, key, "right"))
            for i in range(lo, hi):
                if int(gens[i]) == gen:
                    old = int(slots[i])
                    slots[i] = slot
                    self.version += 1
                    return old
        self.add_many([block], gen, [slot])
        return None

    def replace_many(self, blocks: U64, gen: int, slots: Sequence[int]) -> list[int]:
        """`replace` for each of the sorted, distinct `blocks`, pointing it at the slot of `slots` at
        the same position; return the slots they had (for those that had one), in block order per
        level. One vectorised lookup per level instead of one per block (a 1 MiB write to a writable
        snapshot is 256 blocks)."""
        n = len(blocks)
        if not n:
            return []
        new_slots = np.asarray(slots, np.uint32)
        found = np.zeros(n, bool)
        old: list[int] = []
        g = np.uint32(gen)
        for lb, lg, ls in self._levels():
            if not len(lb):
                continue
            lo = lb.searchsorted(blocks, "left")
            hi = lb.searchsorted(blocks, "right")
            present = (hi > lo) & ~found
            if not present.any():
                continue
            # One entry for the block in this level (always, in a writable snapshot's own index).
            single = np.nonzero(present & (hi - lo == 1))[0]
            at = lo[single]
            hit = lg[at] == g
            single, at = single[hit], at[hit]
            old.extend(ls[at].tolist())
            ls[at] = new_slots[single]
            found[single] = True
            # Several generations of the block: look for `gen` among them.
            for i in np.nonzero(present & (hi - lo > 1))[0].tolist():
                for j in range(int(lo[i]), int(hi[i])):
                    if int(lg[j]) == gen:
                        old.append(int(ls[j]))
                        ls[j] = new_slots[i]
                        found[i] = True
                        break
        if found.any():
            self.version += 1
        missing = ~found
        if missing.any():
            self.add_many(blocks[missing].tolist(), gen, new_slots[missing].tolist())
        return old

    def merge(self) -> None:
        """Fold every run into one sorted base."""
        if self._runs:
            self._base = _merge_runs([self._base, *self._runs])
            self._runs = []

    def arrays(self) -> Run:
        """(blocks, gens, slots) sorted by (block, gen), runs merged."""
        self.merge()
        return self._base

    def restore(self, run: Run) -> None:
        """Make the entries exactly `run` again, as returned by `arrays()` earlier (undo of `keep`)."""
        self._base = run
        self._runs = []
        self._len = len(run[0])
        self.version += 1

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Drop the entries whose `mask` element (over `arrays()`) is False."""
        self.merge()
        blocks, gens, slots = self._base
        self._base = (blocks[mask], gens[mask], slots[mask])
        self._len = len(self._base[0])
        self.version += 1


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

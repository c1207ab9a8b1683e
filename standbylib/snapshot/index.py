"""The in-RAM association index (the patent's "block association memory").

`ChainIndex` maps a block number to the preserved copies of that block, each
tagged with a generation, sorted by generation. It is stored as three sorted
numpy arrays (16 bytes per entry) plus a small dict of recent additions that is
merged into the arrays in bulk, so RAM grows with preserved blocks and never
with volume size, and lookups stay O(log n).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]

_MERGE_MIN = 8192


class ChainIndex:
    """block -> [(gen, slot), ...] sorted by gen. Not thread-safe; the store's lock guards it."""

    def __init__(
        self,
        blocks: U64 | None = None,
        gens: U32 | None = None,
        slots: U32 | None = None,
    ) -> None:
        """Build from arrays already sorted by (block, gen), or empty."""
        self._blocks: U64 = blocks if blocks is not None else np.empty(0, np.uint64)
        self._gens: U32 = gens if gens is not None else np.empty(0, np.uint32)
        self._slots: U32 = slots if slots is not None else np.empty(0, np.uint32)
        self._overlay: dict[int, list[tuple[int, int]]] = {}
        self._overlay_len = 0

    def __len__(self) -> int:
        return len(self._blocks) + self._overlay_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the overlay is bounded and merged away)."""
        return int(self._blocks.nbytes + self._gens.nbytes + self._slots.nbytes)

    def entries(self, block: int) -> list[tuple[int, int]]:
        """All (gen, slot) of `block`, sorted by gen."""
        lo = int(np.searchsorted(self._blocks, block, "left"))
        hi = int(np.searchsorted(self._blocks, block, "right"))
        found = list(zip(self._gens[lo:hi].tolist(), self._slots[lo:hi].tolist(), strict=True))
        extra = self._overlay.get(block)
        if extra:
            found = sorted(found + extra)
        return found

    def find(self, block: int, gen: int) -> int | None:
        """Slot of the entry of `block` with the smallest generation >= `gen`, or None."""
        for g, slot in self.entries(block):
            if g >= gen:
                return slot
        return None

    def max_gens(self, blocks: U64) -> U64:
        """For each of the sorted, distinct `blocks`, its largest generation (0 when none)."""
        out = np.zeros(len(blocks), np.uint64)
        if len(self._blocks):
            pos = np.searchsorted(self._blocks, blocks, "right") - 1
            valid = pos >= 0
            posv = np.where(valid, pos, 0)
            hit = valid & (self._blocks[posv] == blocks)
            out[hit] = self._gens[posv[hit]]
        if self._overlay:
            overlay = self._overlay
            for i, b in enumerate(blocks.tolist()):
                extra = overlay.get(b)
                if extra:
                    g = extra[-1][0]
                    if g > out[i]:
                        out[i] = g
        return out

    def range(self, first: int, end: int) -> dict[int, list[tuple[int, int]]]:
        """Entries of blocks in [first, end): block -> [(gen, slot), ...] sorted by gen."""
        found: dict[int, list[tuple[int, int]]] = {}
        lo = int(np.searchsorted(self._blocks, first, "left"))
        hi = int(np.searchsorted(self._blocks, end, "left"))
        if hi > lo:
            for b, g, s in zip(
                self._blocks[lo:hi].tolist(),
                self._gens[lo:hi].tolist(),
                self._slots[lo:hi].tolist(),
                strict=True,
            ):
                found.setdefault(b, []).append((g, s))
        if self._overlay:
            if end - first <= len(self._overlay):
                keys = [b for b in range(first, end) if b in self._overlay]
            else:
                keys = [b for b in self._overlay if first <= b < end]
            for b in keys:
                found[b] = sorted(found.get(b, []) + self._overlay[b])
        return found

    def add(self, block: int, gen: int, slot: int) -> None:
        """Add an entry; (block, gen) must not be present yet."""
        lst = self._overlay.setdefault(block, [])
        lst.append((gen, slot))
        if len(lst) > 1:
            lst.sort()
        self._overlay_len += 1
        if self._overlay_len > max(_MERGE_MIN, len(self._blocks) >> 4):
            self.merge()

    def add_many(self, blocks: list[int], gen: int, slots: list[int]) -> None:
        """Add (block, gen, slot) for each block; none of the (block, gen) may be present yet."""
        overlay = self._overlay
        for b, slot in zip(blocks, slots, strict=True):
            lst = overlay.get(b)
            if lst is None:
                overlay[b] = [(gen, slot)]
            else:
                lst.append((gen, slot))
                lst.sort()
        self._overlay_len += len(blocks)
        if self._overlay_len > max(_MERGE_MIN, len(self._blocks) >> 4):
            self.merge()

    def replace(self, block: int, gen: int, slot: int) -> int | None:
        """Point (block, gen) at `slot`, adding it if absent; return the slot it had, if any."""
        extra = self._overlay.get(block)
        if extra:
            for i, (g, old) in enumerate(extra):
                if g == gen:
                    extra[i] = (gen, slot)
                    return old
        lo = int(np.searchsorted(self._blocks, block, "left"))
        hi = int(np.searchsorted(self._blocks, block, "right"))
        for i in range(lo, hi):
            if int(self._gens[i]) == gen:
                old = int(self._slots[i])
                self._slots[i] = slot
                return old
        self.add(block, gen, slot)
        return None

    def merge(self) -> None:
        """Fold the overlay into the sorted arrays."""
        if not self._overlay:
            return
        n = self._overlay_len
        ob = np.empty(n, np.uint64)
        og = np.empty(n, np.uint32)
        osl = np.empty(n, np.uint32)
        i = 0
        for b, lst in self._overlay.items():
            for g, s in lst:
                ob[i] = b
                og[i] = g
                osl[i] = s
                i += 1
        blocks = np.concatenate([self._blocks, ob])
        gens = np.concatenate([self._gens, og])
        slots = np.concatenate([self._slots, osl])
        order = np.lexsort((gens, blocks))
        self._blocks, self._gens, self._slots = blocks[order], gens[order], slots[order]
        self._overlay = {}
        self._overlay_len = 0

    def arrays(self) -> tuple[U64, U32, U32]:
        """(blocks, gens, slots) sorted by (block, gen), overlay merged."""
        self.merge()
        return self._blocks, self._gens, self._slots

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Drop the entries whose `mask` element (over `arrays()`) is False."""
        self.merge()
        self._blocks = self._blocks[mask]
        self._gens = self._gens[mask]
        self._slots = self._slots[mask]

"""Read-only views of a preservation store's internal state, for the tests that inspect it.

The store's state is private (`standbylib.snapshot.store`). Tests that check the slot accounting (each
slot free, referenced, waiting for a commit or set aside, and counted once) or the on-disk layout (where
the areas are) read it through `StoreInspection`: copies, or read-only mappings, so nothing can change
the store through them. The engine does not use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from standbylib.snapshot.index import ChainIndex
from standbylib.snapshot.records import SnapshotRecord, VolumeRecord
from standbylib.snapshot.slots import SlotSpace


class StoreInspection:
    """Views of the state of the store this is mixed into (`Store`)."""

    _slots: SlotSpace
    _volume_records: dict[str, VolumeRecord]
    _snapshots: dict[int, SnapshotRecord]
    _chains: dict[int, ChainIndex]
    _cow_copies: int
    _found_version: int

    @property
    def volume_records(self) -> Mapping[str, VolumeRecord]:
        """Read-only: the registered volumes' records by name."""
        return MappingProxyType(self._volume_records)

    @property
    def snapshots(self) -> Mapping[int, SnapshotRecord]:
        """Read-only: every snapshot record by id."""
        return MappingProxyType(self._snapshots)

    @property
    def chains(self) -> Mapping[int, ChainIndex]:
        """Read-only: the association index of each volume, by volume id."""
        return MappingProxyType(self._chains)

    @property
    def cow_copies(self) -> int:
        """Blocks copied before being overwritten since the store was opened."""
        return self._cow_copies

    @property
    def found_version(self) -> int:
        """The store format the file had when it was opened (an older one was upgraded then)."""
        return self._found_version

    @property
    def area_offsets(self) -> tuple[int, ...]:
        """Where each area of the store file starts."""
        return tuple(self._slots.area_offsets)

    @property
    def area_slot_sizes(self) -> tuple[int, ...]:
        """The slot size of each area."""
        return tuple(self._slots.area_slot_sizes)

    @property
    def end(self) -> int:
        """Where the next area would start (the end of the last one)."""
        return self._slots.end

    @property
    def free(self) -> Mapping[int, tuple[int, ...]]:
        """Read-only: the free slots of each slot size."""
        return {size: tuple(slots) for size, slots in self._slots.free.items()}

    @property
    def pending_free(self) -> tuple[int, ...]:
        """Slots freed since the last commit, reused once the next one synced."""
        return tuple(self._slots.pending)

    @property
    def allocated_free(self) -> frozenset[int]:
        """Free slots whose data was left allocated (freed by rewrites in writable snapshots)."""
        return frozenset(self._slots.allocated_free)

    @property
    def quarantine(self) -> tuple[int, ...]:
        """Slots set aside after a failure whose entries could not be zeroed yet."""
        return tuple(self._slots.quarantine)

"""Checks shared by the failure tests (imported by module name, like faultfile).

`assert_accounting` is the store's space invariant: every slot is exactly one of free, referenced by
an index (a copy or a hole entry serving a valid snapshot, a block written to a writable snapshot),
freed but waiting for the next commit, or set aside after a failure whose entries could not be zeroed
yet; and ``used_bytes`` counts exactly the referenced and waiting ones with data (hole entries, the
"slots" of entry areas, take none). A failed write that kept space (the leak that filled stores with
nothing) breaks it.

`observe` is what a user sees of a store: its snapshots (name, validity, reason, preserved blocks,
what each valid one reads), its usage, and the origin. `reopened` opens a copy of the files as they
are now, as a restart would (without closing the store first).

`file_size_limit` makes the real kernel refuse writes past a size (EFBIG), as a full disk would.
"""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator
from typing import Any

from standbylib.blockdev import Device
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Volume
from standbylib.snapshot.layout import ENTRIES_PER_AREA, ENTRY_AREA


def assert_accounting(store: PreservationStore, where: str = "") -> None:
    referenced: list[int] = []
    for chain in store.chains.values():
        referenced += chain.arrays()[2].tolist()
    for snap in store.snapshots.values():
        referenced += snap.private.arrays()[2].tolist()
    groups = {
        "referenced": referenced,
        "waiting for a commit": list(store.pending_free),
        "set aside": list(store.quarantine),
        "free": [s for free in store.free.values() for s in free],
    }
    seen: dict[int, str] = {}
    for name, slots in groups.items():
        for slot in slots:
            assert slot not in seen, f"{where}: slot {slot} is both {seen[slot]} and {name}"
            seen[slot] = name
    total = len(store.area_offsets) * ENTRIES_PER_AREA
    missing = sorted(set(range(total)) - set(seen))
    assert not missing, f"{where}: slots {missing[:10]} are neither free nor used (leaked)"

    def size(slot: int) -> int:
        return store.area_slot_sizes[slot // ENTRIES_PER_AREA]

    counted = [*referenced, *store.pending_free]
    expected = sum(size(s) for s in counted)
    stats = store.stats()
    assert stats.used_bytes == expected, (
        f"{where}: used_bytes {stats.used_bytes}, but the indexes reference {len(referenced)} slots and "
        f"{len(store.pending_free)} wait for a commit ({expected} bytes)"
    )
    holes = sum(1 for s in counted if size(s) == ENTRY_AREA)
    assert stats.preserved_blocks == len(counted) - holes, (
        f"{where}: preserved_blocks {stats.preserved_blocks}"
    )
    assert stats.hole_entries == holes, f"{where}: hole_entries {stats.hole_entries}, {holes} held"


def referenced_bytes(store: PreservationStore) -> int:
    """Bytes of the slots the indexes reference (what a reopened store counts as used): hole entries
    take none."""
    sizes = store.area_slot_sizes
    total = 0
    for chain in store.chains.values():
        total += sum(sizes[slot // ENTRIES_PER_AREA] for slot in chain.arrays()[2].tolist())
    for snap in store.snapshots.values():
        total += sum(sizes[slot // ENTRIES_PER_AREA] for slot in snap.private.arrays()[2].tolist())
    return total


def observe(vol: Volume, *, usage: bool = True) -> dict[str, Any]:
    """What a user sees of `vol` and its store."""
    snaps = {}
    for snap in vol.snapshots():
        info = snap.info()
        image = snap.read(0, vol.size) if snap.valid else None
        snaps[snap.name] = (info.valid, info.reason, (info.preserved_blocks, info.hole_blocks), image)
    seen: dict[str, Any] = {"snapshots": snaps, "origin": vol.read(0, vol.size)}
    if usage:
        seen["used_bytes"] = referenced_bytes(vol.store)
    return seen


def reopened(store_bytes: bytes, origin_bytes: bytes, volume: str, block_size: int) -> Volume:
    """A store and volume opened on copies of the given file contents (a restart)."""
    store = PreservationStore.open_raw(MemFile(store_bytes))
    return store.attach(volume, Device(MemFile(origin_bytes), len(origin_bytes)), block_size=block_size)


def observe_reopened(store_bytes: bytes, origin_bytes: bytes, volume: str, block_size: int) -> dict[str, Any]:
    vol = reopened(store_bytes, origin_bytes, volume, block_size)
    try:
        seen = observe(vol)
        seen["used_bytes"] = vol.store.stats().used_bytes
        return seen
    finally:
        vol.store.close()


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Readable differences between two `observe` results."""
    out = []
    if a["origin"] != b["origin"]:
        out.append("the origin differs")
    if a.get("used_bytes") != b.get("used_bytes"):
        out.append(f"used bytes {a.get('used_bytes')} != {b.get('used_bytes')}")
    for name in sorted(set(a["snapshots"]) | set(b["snapshots"])):
        x, y = a["snapshots"].get(name), b["snapshots"].get(name)
        if x is None or y is None:
            out.append(f"snapshot {name} is {'missing' if x is None else 'extra'} on one side")
        elif x != y:
            what = ["valid", "reason", "preserved blocks and holes", "image"]
            diff = [w for w, p, q in zip(what, x, y, strict=True) if p != q]
            out.append(f"snapshot {name}: {', '.join(diff)} differ ({x[:3]} vs {y[:3]})")
    return out


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Make writes past `limit` bytes of any file fail with EFBIG in this process (not SIGXFSZ)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)

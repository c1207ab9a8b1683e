"""A write that fails (no space on the filesystem, an I/O error) is refused whole and keeps nothing.

Each test injects one kind of failure (`faultfile.Fault`) at one point of an operation and checks
what a user would notice: the error's class (`DiskFull` for no space, so that the gRPC edge answers
RESOURCE_EXHAUSTED and the primary retries), the store's usage (a failed copy must not keep its
slots: that leak filled stores with nothing and invalidated snapshots as "the preservation store
is full"), snapshots still valid and reading their frozen images, a restart reading the same as
the running store, and the same request succeeding once the fault is gone, without a restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from faultfile import SECTOR, SYNC, WRITE, Disk, Fault, Replay
from storecheck import assert_accounting, differences, observe, observe_reopened

import standbylib.snapshot.volume as volume_module
from standbylib.blockdev import Device
from standbylib.errors import DeviceError, DiskFull, StandbyError
from standbylib.snapshot import PreservationStore, Snapshot
from standbylib.snapshot.layout import (
    AREAS_OFFSET,
    COMMIT_RECORD_OFFSETS,
    ENTRY_BLOCK,
    TABLE_OFFSETS,
    TABLE_SIZE,
)

BS = 4096
SIZE = 16 * BS
VOLUME = "vol"


def pattern(seed: int, size: int = SIZE) -> bytes:
    return bytes((i * 7 + seed * 13 + (i >> 12)) % 251 for i in range(size))


@dataclass
class Rig:
    """A store and an origin on one fault-injecting disk, and the invalidations the store told."""

    capacity: int = 64 * BS
    on_full: str = "invalidate"
    disk: Disk = field(default_factory=Disk)
    heard: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.initial = pattern(1)
        self.origin = self.disk.file("origin", self.initial)
        self.store_raw = self.disk.file("store")
        self.store = PreservationStore.open_raw(
            self.store_raw, self.capacity, on_full=self.on_full, on_invalidated=self.hear
        )
        self.vol = self.store.attach(VOLUME, Device(self.origin, SIZE), block_size=BS)

    def hear(self, volume: str, snapshot: str, reason: str) -> None:
        self.heard.append((volume, snapshot, reason))

    def reopen_live(self) -> dict[str, object]:
        """What a restart right now (no power loss: the files as they are) would see."""
        return observe_reopened(bytes(self.store_raw.data), bytes(self.origin.data), VOLUME, BS)

    def reopen_after_power_loss(self, mode: str = "none") -> dict[str, object]:
        images = Replay(self.disk).images(self.disk.now, mode)
        return observe_reopened(bytes(images["store"]), bytes(images["origin"]), VOLUME, BS)

    def in_entry_block(self, offset: int) -> bool:
        """In an area's entry block (or the header of the area being added)."""
        areas = [*self.store.area_offsets, self.store.end]
        return any(a <= offset < a + ENTRY_BLOCK for a in areas)

    def is_area_header(self, offset: int) -> bool:
        return offset in self.store.area_offsets or offset == self.store.end

    def where(self, region: str) -> Callable[[str, str, int, int], bool]:
        """A `Fault.where` matching store writes to one region of the store file."""

        def match(file: str, op: str, offset: int, length: int) -> bool:
            if region == "table":
                return any(t <= offset < t + TABLE_SIZE for t in TABLE_OFFSETS)
            if region == "commit-record":
                return offset in COMMIT_RECORD_OFFSETS
            if offset < AREAS_OFFSET:
                return False
            if region == "area-header":
                return self.is_area_header(offset)
            entry = self.in_entry_block(offset)
            if region == "entries":
                return entry and not self.is_area_header(offset)
            return not entry

        return match


def assert_consistent(rig: Rig, where: str) -> None:
    """Space accounting holds and a restart now would see what the running store shows."""
    assert_accounting(rig.store, where)
    diff = differences(observe(rig.vol), rig.reopen_live())
    assert not diff, f"{where}: a restart would see something else: {diff}"


def store_write(error: str, region: str) -> Callable[[Rig], Fault]:
    """The fault of the store's writes to `region` (`Rig.where`) failing with `error`."""
    return lambda r: Fault(frozenset({"pwrite"}), error=error, where=r.where(region))


def origin_read_eio(rig: Rig) -> Fault:
    """Reads of the origin fail with EIO."""
    return Fault(frozenset({"pread"}), frozenset({"origin"}))


# Where a batch's copy can fail, and how: (id, fault factory given the rig, needs kernel copies).
COPY_FAILURES: list[tuple[str, Callable[[Rig], Fault], bool]] = [
    ("origin-read-eio", origin_read_eio, False),
    ("slot-write-enospc", store_write("ENOSPC", "slots"), False),
    ("slot-write-short", store_write("short", "slots"), False),
    ("slot-write-eio", store_write("EIO", "slots"), False),
    ("copy-range-enospc", lambda r: Fault(frozenset({"copy_from"}), error="ENOSPC"), True),
    ("copy-range-short", lambda r: Fault(frozenset({"copy_from"}), error="short", skip=1), True),
    ("copy-source-eio", origin_read_eio, True),
    ("entry-write-enospc", store_write("ENOSPC", "entries"), False),
    ("entry-write-short", store_write("short", "entries"), False),
    ("area-header-enospc", store_write("ENOSPC", "area-header"), False),
    ("commit-record-enospc", store_write("ENOSPC", "commit-record"), False),
    ("sync-enospc", lambda r: Fault(frozenset({"sync"}), frozenset({"store"}), error="ENOSPC"), False),
    ("sync-eio-drops-pages", lambda r: Fault(frozenset({"sync"}), frozenset({"store"}), drop=True), False),
    # Half the entries land, and the failure lasts while the batch cleans up after itself: its
    # entries cannot be zeroed until the disk has room again.
    (
        "store-writes-fail-for-a-while",
        lambda r: Fault(
            frozenset({"pwrite", "punch"}), frozenset({"store"}), error="short", skip=2, count=50
        ),
        False,
    ),
]


@pytest.mark.parametrize(
    ("make_fault", "kernel"), [(f, k) for _, f, k in COPY_FAILURES], ids=[i for i, _, _ in COPY_FAILURES]
)
def test_a_batch_whose_copy_fails_keeps_nothing_and_succeeds_when_retried(
    make_fault: Callable[[Rig], Fault], kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernel:
        monkeypatch.setattr(volume_module, "_CFR_MIN", 0)
    rig = Rig()
    frozen = rig.vol.create_snapshot("frozen")
    batch: list[tuple[int, bytes | int]] = [
        (2 * BS, b"\xaa" * 4 * BS),
        (9 * BS + 100, b"\xbb" * 50),
        (12 * BS, BS),
    ]
    after = bytearray(rig.initial)
    after[2 * BS : 6 * BS] = b"\xaa" * 4 * BS
    after[9 * BS + 100 : 9 * BS + 150] = b"\xbb" * 50
    after[12 * BS : 13 * BS] = bytes(BS)

    fault = rig.disk.inject(make_fault(rig))
    with pytest.raises(StandbyError) as info:
        rig.vol.write_batch(batch)
    rig.disk.heal()
    assert fault.fired, "the fault never fired: the test does not test anything"
    expected = DeviceError if fault.error == "EIO" else DiskFull
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    # Nothing of the batch: no space kept, the origin as it was, the snapshot valid and frozen.
    assert rig.store.stats().used_bytes == 0
    assert_accounting(rig.store, "after the failed batch")
    assert rig.vol.read(0, SIZE) == rig.initial
    assert frozen.valid and frozen.read(0, SIZE) == rig.initial
    assert not rig.heard
    if fault.count == 1:  # the clean-up could write: a restart sees the same (else: after the retry)
        assert_consistent(rig, "after the failed batch")

    rig.vol.write_batch(batch)  # the primary retries the same batch, on the same running store
    assert rig.vol.read(0, SIZE) == after
    assert frozen.valid and frozen.read(0, SIZE) == rig.initial
    assert rig.store.stats().used_bytes == 6 * BS
    assert_consistent(rig, "after the retry")
    rig.vol.flush()
    seen = rig.reopen_after_power_loss()
    assert seen["snapshots"]["frozen"][3] == rig.initial and seen["origin"] == after
    assert not rig.heard


def test_entries_that_cannot_be_zeroed_wait_until_they_can() -> None:
    """A failed copy into slots whose entries still describe earlier, deleted copies, while every
    store write fails: the entries cannot be zeroed now. The slots are neither used nor reused until
    a commit has zeroed them, and nothing is committed before that."""
    rig = Rig()
    rig.vol.create_snapshot("old")
    rig.vol.write_batch([(0, b"\x01" * 4 * BS)])
    rig.vol.delete_snapshot("old")  # slots 0-3 free, their entries still on disk
    snap = rig.vol.create_snapshot("new")
    fault = rig.disk.inject(
        Fault(frozenset({"pwrite", "punch"}), frozenset({"store"}), error="ENOSPC", skip=1, count=1000)
    )
    for attempt in range(3):
        with pytest.raises(DiskFull):
            rig.vol.write_batch([(8 * BS, b"\x02" * 4 * BS)])
        assert rig.store.quarantine, "the entries were zeroed though every write failed"
        assert rig.store.stats().used_bytes == 0
        assert_accounting(rig.store, f"attempt {attempt}")
        assert snap.valid and snap.read(0, SIZE) == rig.vol.read(0, SIZE)
    assert len(fault.fired) > 3
    rig.disk.heal()
    rig.vol.write_batch([(8 * BS, b"\x02" * 4 * BS)])
    assert not rig.store.quarantine
    assert rig.store.stats().used_bytes == 4 * BS
    assert_consistent(rig, "after the batch went through")
    rig.vol.flush()
    seen = rig.reopen_after_power_loss()
    assert seen["used_bytes"] == 4 * BS and seen["snapshots"]["new"][3] == snap.read(0, SIZE)


@pytest.mark.parametrize("on_full", ["invalidate", "defer"])
def test_disk_full_retries_neither_invalidate_nor_defer(on_full: str) -> None:
    # Room in the store for 6 blocks; a batch needing 4 copies fails five times on a full disk.
    rig = Rig(capacity=6 * BS, on_full=on_full)
    snap = rig.vol.create_snapshot("nightly")
    batch: list[tuple[int, bytes | int]] = [(0, b"\x01" * 4 * BS)]
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"}), error="ENOSPC", count=5))
    for attempt in range(5):
        with pytest.raises(DiskFull) as info:
            rig.vol.write_batch(batch)
        assert "free space on the filesystem holding" in str(info.value)
        assert snap.valid, f"attempt {attempt}: the snapshot was invalidated because the disk was full"
        assert rig.store.stats().used_bytes == 0, f"attempt {attempt}: failed copies kept their space"
    rig.disk.heal()
    rig.vol.write_batch(batch)
    assert snap.valid and snap.read(0, 4 * BS) == rig.initial[: 4 * BS]
    assert rig.store.stats().used_bytes == 4 * BS
    assert not rig.heard
    assert_consistent(rig, "after the batch went through")


def test_entries_of_failed_copies_are_never_trusted_later() -> None:
    """Batch A fails at its sync; batch B reuses A's slot for another block and fails writing its
    entry. Neither may leave an entry that a later commit declares complete: A's entry next to B's
    data would be read back as a copy of A's block holding B's block."""
    rig = Rig()
    snap = rig.vol.create_snapshot("frozen")
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"})))
    with pytest.raises(DeviceError):
        rig.vol.write_batch([(1 * BS, b"A" * BS)])
    rig.disk.inject(Fault(frozenset({"pwrite"}), where=rig.where("entries")))
    with pytest.raises(DeviceError):
        rig.vol.write_batch([(7 * BS, b"B" * BS)])
    rig.disk.heal()
    # Two commits later, the commit numbers of both failures are declared complete.
    rig.vol.create_snapshot("later-1")
    rig.vol.create_snapshot("later-2")
    assert_consistent(rig, "after the later commits")
    for mode in ("none", "all"):
        seen = rig.reopen_after_power_loss(mode)
        valid, _reason, blocks, image = seen["snapshots"]["frozen"]
        assert valid and image == rig.initial, f"{mode}: the frozen image reads another block's data"
        assert (blocks, seen["used_bytes"]) == ((0, 0), 0)  # (data blocks, hole blocks), bytes
    assert snap.read(0, SIZE) == rig.initial


def test_a_failed_commit_never_writes_over_the_durable_table() -> None:
    """The two table copies alternate so that the one holding the last durable table is never
    written before the next sync. A commit that failed must not shift that alternation."""
    rig = Rig()
    names = [f"{i}-{'x' * 120}" for i in range(6)]  # a table of several sectors: a torn write shows
    for name in names:
        rig.vol.create_snapshot(name)
    events = rig.disk.events
    last_sync = max(e.number for e in events if e.file == "store" and e.kind == SYNC)
    durable_copy = [e.offset for e in events[:last_sync] if e.kind == WRITE and e.offset in TABLE_OFFSETS][-1]
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"})))
    with pytest.raises(DeviceError):
        rig.vol.create_snapshot("b")
    rig.disk.heal()
    assert [s.name for s in rig.vol.snapshots()] == names
    start = rig.disk.now
    rig.vol.create_snapshot("b")
    sync = next(e for e in events[start:] if e.file == "store" and e.kind == SYNC)
    writes = [e for e in events[start : sync.number] if e.kind == WRITE and e.offset in TABLE_OFFSETS]
    assert writes and all(e.offset != durable_copy for e in writes), "the retry wrote over the durable table"
    # Power lost just before the retry's sync, with only the first sector of its table write on disk.
    images = Replay(rig.disk).images(sync.number, "none")
    images["store"][writes[-1].offset : writes[-1].offset + SECTOR] = writes[-1].data[:SECTOR]
    seen = observe_reopened(bytes(images["store"]), bytes(images["origin"]), VOLUME, BS)
    assert set(seen["snapshots"]) == set(names)


def test_a_failed_invalidation_is_undone_and_told_once_durable() -> None:
    rig = Rig(capacity=2 * BS)
    snap = rig.vol.create_snapshot("s0")
    rig.vol.write_batch([(0, b"\x01" * BS)])  # one copy: one slot of room left
    told_durable: list[bool] = []

    def listener(volume: str, snapshot: str, reason: str) -> None:
        rig.hear(volume, snapshot, reason)
        # Called once durable: a power loss now keeps the invalidation.
        images = Replay(rig.disk).images(rig.disk.now, "none")
        seen = observe_reopened(bytes(images["store"]), bytes(images["origin"]), VOLUME, BS)
        told_durable.append(seen["snapshots"]["s0"][0] is False)

    rig.store.on_invalidated = listener
    batch: list[tuple[int, bytes | int]] = [(4 * BS, b"\x02" * 2 * BS)]  # needs 2 copies: overflows
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"}), error="ENOSPC"))
    with pytest.raises(DiskFull):
        rig.vol.write_batch(batch)
    rig.disk.heal()
    assert snap.valid and snap.read(0, SIZE) == rig.initial, "the failed batch's invalidation stayed"
    assert not rig.heard
    assert_consistent(rig, "after the failed batch")
    rig.vol.write_batch(batch)
    assert not snap.valid
    assert [(v, s) for v, s, _ in rig.heard] == [(VOLUME, "s0")]
    assert "full" in rig.heard[0][2] and told_durable == [True]
    assert_consistent(rig, "after the overflow")


def test_no_snapshot_comes_back_from_a_failed_creation() -> None:
    """A creation whose commit failed may have written its table: the next origin write must not
    let a power loss bring that snapshot back, frozen on an origin that changed meanwhile."""
    rig = Rig()
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"})))
    with pytest.raises(DeviceError):
        rig.vol.create_snapshot("ghost")
    rig.disk.heal()
    assert rig.vol.snapshots() == []
    rig.vol.write_batch([(0, b"\x05" * BS)])
    rig.vol.flush()
    for mode in ("none", "all"):
        seen = rig.reopen_after_power_loss(mode)
        assert "ghost" not in seen["snapshots"], f"{mode}: the failed snapshot is back after a power loss"


def test_snapshot_writes_a_failed_sync_dropped_are_written_again() -> None:
    """A failed fdatasync may drop the pages it could not write; the next one then succeeds without
    them. A flush that succeeds after a failed one must still make the snapshot's writes durable."""
    rig = Rig()
    rw = rig.vol.create_snapshot("rw", writable=True)
    rw.write(3 * BS + 10, b"written" * 100)
    rig.disk.inject(Fault(frozenset({"sync"}), frozenset({"store"}), drop=True))
    with pytest.raises(DeviceError):
        rw.flush()
    rig.disk.heal()
    rw.flush()
    expected = bytearray(rig.initial)
    expected[3 * BS + 10 : 3 * BS + 710] = b"written" * 100
    seen = rig.reopen_after_power_loss("none")
    assert seen["snapshots"]["rw"][3] == expected, "a flushed snapshot write was lost in a power loss"


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault(frozenset({"pwrite"}), frozenset({"store"}), error="ENOSPC"), id="data-enospc"),
        pytest.param(Fault(frozenset({"pwrite"}), frozenset({"store"}), error="short"), id="data-short"),
        pytest.param(Fault(frozenset({"pwrite"}), frozenset({"store"}), skip=1), id="entry-eio"),
        pytest.param(Fault(frozenset({"pread"}), frozenset({"store"})), id="store-read-eio"),
        pytest.param(Fault(frozenset({"pread"}), frozenset({"origin"})), id="origin-read-eio"),
    ],
)
def test_a_failed_snapshot_write_keeps_nothing(fault: Fault) -> None:
    rig = Rig(capacity=8 * BS)
    rw = rig.vol.create_snapshot("rw", writable=True)
    rw.write(BS, b"\x11" * BS)
    rw.flush()
    before = observe(rig.vol)
    for attempt in range(4):  # would take 4 x 2 slots of a store holding 8 if kept
        fault.seen, fault.fired = 0, []
        rig.disk.inject(fault)
        with pytest.raises(StandbyError) as info:
            rw.write(BS + 1, b"\x22" * BS)  # blocks 1 (in the store) and 2 (origin), read-modify-write
        rig.disk.heal()
        assert fault.fired and isinstance(info.value, DeviceError)
        assert observe(rig.vol) == before, f"attempt {attempt}: the failed write changed something"
        assert_consistent(rig, f"attempt {attempt}")
    rw.write(BS + 1, b"\x22" * BS)
    rw.flush()
    assert rw.read(BS, 2 * BS) == b"\x11" + b"\x22" * BS + rig.initial[2 * BS + 1 : 3 * BS]
    assert_consistent(rig, "after the write went through")


def test_deleting_a_snapshot_works_while_the_disk_is_full() -> None:
    """The way out of a full disk: a deletion commits without needing new space, then frees some."""
    rig = Rig(on_full="defer")
    keep = rig.vol.create_snapshot("keep")
    rig.vol.write_batch([(0, b"\x01" * 4 * BS)])
    rig.vol.create_snapshot("old")
    rig.vol.write_batch([(0, b"\x02" * 4 * BS)])
    # A failed batch while the disk is full, then a deletion that only overwrites what exists.
    rig.disk.inject(
        Fault(
            frozenset({"pwrite"}), frozenset({"store"}), error="ENOSPC", where=rig.where("slots"), count=100
        )
    )
    with pytest.raises(DiskFull):
        rig.vol.write_batch([(8 * BS, b"\x03" * BS)])
    rig.vol.delete_snapshot("old")
    rig.disk.heal()
    assert keep.read(0, 4 * BS) == rig.initial[: 4 * BS]
    assert_consistent(rig, "after the deletion")


def every_operation(rig: Rig, rw: Snapshot) -> list[Callable[[], object]]:
    return [
        lambda: rig.vol.write_batch([(BS, b"\x02" * 2 * BS), (9 * BS, 7)]),
        lambda: rw.write(3 * BS + 5, b"\x03" * BS),
        lambda: rw.flush(),
        lambda: rig.vol.create_snapshot("new"),
        lambda: rig.vol.delete_snapshot("rw"),
        lambda: rig.vol.flush(),
    ]


@pytest.mark.parametrize("op", ["pwrite", "sync", "punch", "pread"])
@pytest.mark.parametrize("error", ["EIO", "ENOSPC"])
def test_every_failure_of_every_operation_keeps_no_space(op: str, error: str) -> None:
    """Every failing call of every kind raises a library error, for every operation, and keeps no space."""
    for skip in range(6):
        rig = Rig(capacity=4 * BS, on_full="defer")
        rw = rig.vol.create_snapshot("rw", writable=True)
        rig.vol.write_batch([(0, b"\x01" * BS)])
        rig.disk.inject(Fault(frozenset({op}), error=error, skip=skip, count=2))
        for call in every_operation(rig, rw):
            with contextlib.suppress(StandbyError):  # anything else fails the test
                call()
        rig.disk.heal()
        assert_accounting(rig.store, f"{op} {error} skip={skip}")

"""Hole entries (store format 2): a block that reads as zeros when a snapshot first needs it preserved
is kept as an entry without data.

What a user would notice: the store holds no data and no slot for such blocks (``used_bytes``, the
snapshot's ``preserved_bytes``, the store file's size), the snapshot still reads zeros there and
reports a hole in its block status (so a backup skips it), the block still counts as changed between
two snapshots, capacities and invalidation count only the data, writable snapshots and deletion keep
working, and a power loss or a failed write around hole entries keeps every frozen image.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from faultfile import MODES, SYNC, Disk, Fault, Replay
from storecheck import assert_accounting

from standbylib.blockdev import Device, open_file_device, ram_device
from standbylib.errors import DeviceError, PreservationDeferred
from standbylib.rawfile import MemFile
from standbylib.readplan import FileRange, Hole
from standbylib.snapshot import PreservationStore, Volume, layout
from standbylib.snapshot.volume import zero_blocks

BS = 4096
KiB = 1024
MiB = 1024 * KiB


def rand(n: int, seed: int) -> bytes:
    """Random bytes with no all-zero 512-byte block (a zero block would be a hole entry)."""
    data = bytearray(random.Random(seed).randbytes(n))
    data[::512] = b"\x01" * len(data[::512])
    return bytes(data)


def half_holes(tmp_path: Path, nblocks: int = 256) -> tuple[PreservationStore, Volume, Device]:
    """A file store and a sparse file volume of `nblocks` blocks: data in the first half, holes after."""
    device = open_file_device(str(tmp_path / "vol.img"), nblocks * BS)
    device.write(0, rand(nblocks // 2 * BS, seed=1))
    store = PreservationStore.open(str(tmp_path / "p.store"), capacity=4 * MiB)
    return store, store.attach("vol", device, block_size=BS), device


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_hole_entry_takes_no_slot_and_no_data_and_reads_as_a_hole(tmp_path: Path) -> None:
    store, vol, device = half_holes(tmp_path)
    size, half = vol.size, vol.size // 2
    snap = vol.create_snapshot("s")
    frozen = vol.read(0, size)
    written, on_disk = store.raw.counters.bytes_written, allocated(tmp_path / "p.store")

    vol.write_batch([(half, rand(half, seed=2))])  # 128 blocks that were holes
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.cow_copies) == (0, 0, 0)
    assert (stats.hole_entries, stats.cow_holes) == (128, 128)
    assert set(store.area_slot_sizes) == {layout.ENTRY_AREA}, "a data area was added for holes"
    assert len(store.area_offsets) == 2  # 127 entries per entry area
    # 128 entries of 32 bytes, two area headers and a commit record: nothing of the 512 KiB.
    assert store.raw.counters.bytes_written - written < 8 * KiB
    assert allocated(tmp_path / "p.store") - on_disk <= 2 * 4 * KiB
    info = snap.info()
    assert (info.preserved_blocks, info.preserved_bytes, info.hole_blocks) == (0, 0, 128)
    assert snap.read(0, size) == frozen
    assert snap.extents(0, size) == [(half, False), (half, True)]
    with snap.read_plan(half - BS, 2 * BS) as plan:
        assert [type(p) for p in plan.pieces] == [FileRange, Hole]
        assert plan.pieces[1] == Hole(BS)

    vol.write_batch([(0, rand(half, seed=3))])  # the data half: copies
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.hole_entries) == (half, 128, 128)
    info = snap.info()
    assert (info.preserved_bytes, info.hole_blocks) == (half, 128)
    assert snap.read(0, size) == frozen
    assert snap.extents(0, size) == [(half, False), (half, True)]
    store.close()

    store = PreservationStore.open(str(tmp_path / "p.store"))
    assert store.found_version == layout.VERSION
    vol = store.attach("vol", device, block_size=BS)
    snap = vol.snapshot("s")
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.hole_entries) == (half, 128, 128)
    assert (snap.info().preserved_bytes, snap.info().hole_blocks) == (half, 128)
    assert snap.read(0, size) == frozen
    assert snap.extents(0, size) == [(half, False), (half, True)]

    # Deleting the snapshot frees its hole entries; the next ones reuse their entry areas.
    vol.delete_snapshot("s")
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.hole_entries) == (0, 0, 0)
    areas = store.area_offsets
    vol.zero(0, size)
    again = vol.create_snapshot("again")
    vol.write_batch([(0, rand(size, seed=4))])
    assert store.stats().hole_entries == 256 and store.stats().used_bytes == 0
    assert store.area_offsets[: len(areas)] == areas and store.area_slot_sizes.count(layout.ENTRY_AREA) == 3
    assert again.read(0, size) == bytes(size) and again.extents(0, size) == [(size, True)]
    assert_accounting(store, "after reuse")
    store.close()
    device.close()


@pytest.mark.parametrize("block_size", [512, 4096, 65536])
@pytest.mark.parametrize("nblocks", [1, 8, 9, 100])
def test_zero_blocks_finds_exactly_the_blocks_of_zeros(block_size: int, nblocks: int) -> None:
    rng = random.Random(block_size * 1000 + nblocks)
    buf = bytearray(block_size * nblocks)
    expected = []
    for i in range(nblocks):
        kind = rng.choice(["zeros", "first", "middle", "last", "data"])
        start = i * block_size
        if kind == "first":
            buf[start] = 1
        elif kind == "middle":
            buf[start + rng.randrange(1, block_size - 1)] = 0x80
        elif kind == "last":
            buf[start + block_size - 1] = 7
        elif kind == "data":
            buf[start : start + block_size] = rand(block_size, seed=i)
        expected.append(kind == "zeros")
    found = zero_blocks(memoryview(buf), block_size)
    assert (found.tolist() if found is not None else [False] * nblocks) == expected
    assert found is None or any(expected), "no block of zeros: None, not an array of False"


@pytest.mark.parametrize("block_size", [512, 4096])
@pytest.mark.parametrize("nblocks", [5, 40])
def test_blocks_of_zeros_written_as_data_become_hole_entries(block_size: int, nblocks: int) -> None:
    """Zeros the origin holds as data (written, not trimmed) are holes too; a block with a single
    non-zero byte anywhere is data."""
    size = nblocks * block_size
    image = bytearray(size)
    zeros = 0
    for i in range(nblocks):
        start = i * block_size
        where = i % 4
        if where == 3:
            zeros += 1
        else:
            image[start + (0, block_size // 2, block_size - 1)[where]] = 0xFF
    device = ram_device(size)  # RAM: every block is data, the zeros too
    device.write(0, bytes(image))
    store = PreservationStore.in_memory(4 * MiB)
    vol = store.attach("vol", device, block_size=block_size)
    snap = vol.create_snapshot("s")
    vol.write_batch([(0, b"\xee" * size)])
    stats = store.stats()
    assert (stats.hole_entries, stats.preserved_blocks) == (zeros, nblocks - zeros)
    assert stats.used_bytes == (nblocks - zeros) * block_size
    assert snap.read(0, size) == image
    hole_at = [hole for n, hole in snap.extents(0, size) for _ in range(n // block_size)]
    assert hole_at == [i % 4 == 3 for i in range(nblocks)]


def test_a_block_whose_first_overwrite_preserved_a_hole_is_a_changed_block() -> None:
    size = 64 * BS
    device = ram_device(size)
    device.write(0, rand(8 * BS, seed=5))  # blocks 0-7 data, the rest zeros
    store = PreservationStore.in_memory(4 * MiB)
    vol = store.attach("vol", device, block_size=BS)
    vol.create_snapshot("a")
    vol.write_batch([(2 * BS, rand(BS, seed=6)), (20 * BS, rand(3 * BS, seed=7)), (40 * BS, BS)])
    vol.create_snapshot("b")
    vol.write_batch([(50 * BS, rand(BS, seed=8))])  # after b: not a change between a and b
    assert store.stats().hole_entries == 5  # blocks 20-22, 40 (zeroed zeros) and 50
    assert vol.changes("a", "b") == [(2 * BS, BS), (20 * BS, 3 * BS), (40 * BS, BS)]


def test_mixed_batches_copy_the_data_and_record_the_holes_in_one_commit(tmp_path: Path) -> None:
    """64 KiB runs of data and holes, overwritten in one batch: the data runs are copied inside the
    kernel (`copy_file_range`), the holes are entries, one store sync; scattered writes take the buffer
    path, whose data must be packed past the holes among it."""
    size = 4 * MiB
    device = open_file_device(str(tmp_path / "vol.img"), size)
    for offset in range(0, size, 128 * KiB):
        device.write(offset, rand(64 * KiB, seed=offset))
    store = PreservationStore.open(str(tmp_path / "p.store"), capacity=size)
    vol = store.attach("vol", device, block_size=BS)
    snap = vol.create_snapshot("s")
    frozen = vol.read(0, size)
    syncs = store.raw.counters.syncs
    vol.write_batch([(0, rand(2 * MiB, seed=9))])
    assert store.raw.counters.syncs - syncs == 1
    stats = store.stats()
    assert (stats.preserved_blocks, stats.hole_entries) == (256, 256)
    rng = random.Random(10)
    scattered = sorted(rng.sample(range(512, 1024), 60))
    vol.write_batch([(b * BS, rand(BS, seed=b)) for b in scattered])
    data = sum(1 for b in scattered if (b * BS) % (128 * KiB) < 64 * KiB)
    stats = store.stats()
    assert (stats.preserved_blocks, stats.hole_entries) == (256 + data, 256 + len(scattered) - data)
    assert snap.info().preserved_bytes == (256 + data) * BS
    assert snap.read(0, size) == frozen
    store.close()
    store = PreservationStore.open(str(tmp_path / "p.store"))
    vol = store.attach("vol", device, block_size=BS)
    assert vol.snapshot("s").read(0, size) == frozen
    assert store.stats().preserved_blocks == 256 + data
    store.close()
    device.close()


@pytest.mark.parametrize("on_full", ["invalidate", "defer"])
def test_hole_entries_count_against_no_capacity(on_full: str) -> None:
    size = 256 * BS
    device = ram_device(size)
    device.write(0, rand(8 * BS, seed=11))  # blocks 0-7 data, the rest zeros
    store = PreservationStore.in_memory(4 * BS, on_full=on_full)
    vol = store.attach("vol", device, block_size=BS)
    small = vol.create_snapshot("small", capacity=2 * BS)
    vol.write_batch([(8 * BS, rand(size - 8 * BS, seed=12))])  # 248 holes: no space needed
    assert small.valid and small.info().hole_blocks == 248 and small.info().fill_ratio == 0
    vol.write_batch([(0, rand(2 * BS, seed=13))])  # two data blocks: exactly the snapshot's room
    assert small.valid and small.info().preserved_bytes == 2 * BS
    if on_full == "defer":
        with pytest.raises(PreservationDeferred):
            vol.write_batch([(2 * BS, rand(BS, seed=14))])
        assert small.valid
    else:
        vol.write_batch([(2 * BS, rand(BS, seed=14))])
        assert not small.valid
        assert store.stats().hole_entries == 0 and store.stats().used_bytes == 0


def test_a_writable_snapshot_that_writes_a_block_preserved_as_a_hole_holds_it_as_data(
    tmp_path: Path,
) -> None:
    store, vol, device = half_holes(tmp_path, nblocks=16)
    ro = vol.create_snapshot("ro")
    rw = vol.create_snapshot("rw", writable=True)
    vol.write_batch([(12 * BS, rand(2 * BS, seed=15))])  # blocks 12, 13: holes, for both snapshots
    assert [(s.info().preserved_blocks, s.info().hole_blocks) for s in (ro, rw)] == [(0, 2), (0, 2)]
    rw.write(12 * BS + 100, b"abc")  # a partial write of a block read as a hole entry
    expected = bytearray(BS)
    expected[100:103] = b"abc"
    assert rw.read(12 * BS, BS) == expected and ro.read(12 * BS, BS) == bytes(BS)
    assert (rw.info().preserved_blocks, rw.info().hole_blocks) == (1, 1)
    assert rw.extents(12 * BS, 2 * BS) == [(BS, False), (BS, True)]
    assert ro.extents(12 * BS, 2 * BS) == [(2 * BS, True)]
    rw.flush()
    store.close()
    store = PreservationStore.open(str(tmp_path / "p.store"))
    vol = store.attach("vol", device, block_size=BS)
    ro, rw = vol.snapshot("ro"), vol.snapshot("rw")
    assert [(s.info().preserved_blocks, s.info().hole_blocks) for s in (ro, rw)] == [(0, 2), (1, 1)]
    assert rw.read(12 * BS, BS) == expected and ro.read(12 * BS, BS) == bytes(BS)
    assert store.stats().used_bytes == BS and store.stats().hole_entries == 2
    store.close()
    device.close()


# ------------------------------------------------------------------------------------------ crashes


def crash_rig() -> tuple[Disk, PreservationStore, Volume, bytes]:
    """A store and a 32-block origin (even blocks data, odd ones zeros) on one traced disk, with one
    snapshot; returns the origin it froze."""
    disk = Disk()
    image = bytearray(32 * BS)
    for b in range(0, 32, 2):
        image[b * BS : (b + 1) * BS] = rand(BS, seed=b)
    origin = disk.file("origin", bytes(image))
    store = PreservationStore.open_raw(disk.file("store"), 64 * BS)
    vol = store.attach("vol", Device(origin, len(image)), block_size=BS)
    vol.create_snapshot("s")
    return disk, store, vol, bytes(image)


def reopen(images: dict[str, bytearray]) -> tuple[PreservationStore, Volume]:
    store = PreservationStore.open_raw(MemFile(bytes(images["store"])))
    vol = store.attach("vol", Device(MemFile(bytes(images["origin"])), 32 * BS), block_size=BS)
    return store, vol


def test_a_power_loss_around_a_batch_of_hole_entries_keeps_the_frozen_image() -> None:
    """Cut at every event of a batch preserving 16 holes and 16 copies, in every mode: the snapshot
    reads its frozen image, what the store counts is what it references, and it keeps preserving."""
    disk, store, vol, frozen = crash_rig()
    start = disk.now
    vol.write_batch([(0, rand(32 * BS, seed=16))])
    end = disk.now
    store.close()
    replay = Replay(disk)
    for cut in range(start, end + 1):
        for mode in MODES:
            for i in range(4 if mode == "subset" else 1):
                images = replay.images(cut, mode, random.Random(cut * 10 + i))
                where = f"cut {cut} of [{start}, {end}] ({mode} {i})"
                again, v = reopen(images)
                snap = v.snapshot("s")
                assert snap.valid and snap.read(0, 32 * BS) == frozen, where
                info, stats = snap.info(), again.stats()
                assert (info.preserved_blocks, info.hole_blocks) == (
                    stats.preserved_blocks,
                    stats.hole_entries,
                ), where
                assert_accounting(again, where)
                v.write_batch([(BS, rand(2 * BS, seed=17))])  # block 1 a hole, block 2 data
                assert snap.read(0, 32 * BS) == frozen, where
                again.close()


def test_a_torn_hole_entry_of_an_unfinished_commit_is_dropped() -> None:
    """A hole entry has no data to check: it carries the checksum of its own fields. One that does not
    match, in a commit not known complete, is dropped (its block was not overwritten yet: the snapshot
    reads it from the origin) and zeroed on disk."""
    disk, store, vol, frozen = crash_rig()
    start = disk.now
    vol.write_batch([(0, rand(32 * BS, seed=18))])
    sync = next(e.number for e in disk.events[start:] if e.file == "store" and e.kind == SYNC)
    entry_area = store.area_offsets[store.area_slot_sizes.index(layout.ENTRY_AREA)]
    store.close()
    images = Replay(disk).images(sync, "all")  # every write of the batch, but not its sync
    entry = entry_area + layout.AREA_HEADER + 3 * layout.ENTRY_SIZE  # the fourth hole entry
    images["store"][entry + 8] ^= 0x04  # its block number, changed by a bad write
    again, v = reopen(images)
    # The copies of the batch check out against their checksums (made past the holes among them).
    assert (again.stats().hole_entries, again.stats().preserved_blocks) == (15, 16)
    assert v.snapshot("s").read(0, 32 * BS) == frozen
    assert bytes(again.raw.pread(layout.ENTRY_SIZE, entry)) == bytes(layout.ENTRY_SIZE)
    assert_accounting(again, "after the torn entry")
    again.close()


def test_a_batch_whose_hole_entries_cannot_be_written_keeps_nothing_and_can_be_retried() -> None:
    disk, store, vol, frozen = crash_rig()
    ops = [(0, rand(32 * BS, seed=19))]
    # The batch adds a data area at the start of the areas, then an entry area: the hole entries are
    # the first entries of that one.
    hole_entries = layout.AREAS_OFFSET + layout.area_size(BS) + layout.AREA_HEADER

    def entries(file: str, op: str, offset: int, length: int) -> bool:
        return offset == hole_entries

    for fault in (
        Fault(frozenset({"pwrite"}), frozenset({"store"}), where=entries),
        Fault(frozenset({"pwrite"}), frozenset({"store"}), error="short", where=entries),
        Fault(frozenset({"sync"}), frozenset({"store"})),
    ):
        disk.inject(fault)
        with pytest.raises(DeviceError):
            vol.write_batch(ops)
        disk.heal()
        assert fault.fired, f"{fault} did not fire"
        stats = store.stats()
        assert (stats.hole_entries, stats.used_bytes) == (0, 0), fault
        assert vol.read(0, 32 * BS) == frozen, "the origin was written although its copies failed"
        assert vol.snapshot("s").read(0, 32 * BS) == frozen
        assert_accounting(store, str(fault))
    vol.write_batch(ops)
    stats = store.stats()
    assert (stats.hole_entries, stats.preserved_blocks) == (16, 16)
    assert vol.snapshot("s").read(0, 32 * BS) == frozen
    store.close()
    for mode in MODES:
        again, v = reopen(Replay(disk).images(disk.now, mode, random.Random(1)))
        assert (again.stats().hole_entries, again.stats().preserved_blocks) == (16, 16), mode
        assert v.snapshot("s").read(0, 32 * BS) == frozen, mode
        again.close()

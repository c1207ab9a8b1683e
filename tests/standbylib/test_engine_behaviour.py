"""What the snapshot engine promises beyond single requests: overflow policies, space reclaim, sharing of
copies between snapshots, several volumes in one store, persistence across reopen, and O(1) creation."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest

from standbylib.blockdev import Device, open_file_device, ram_device
from standbylib.errors import (
    PreservationDeferred,
    PreservationFull,
    SnapshotInvalid,
    UnknownVolume,
    VolumeMismatch,
)
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Volume

BS = 4096
SIZE = 64 * 1024
NBLOCKS = SIZE // BS


def block(i: int, tag: int = 0) -> bytes:
    """A block whose every 8 bytes name it, so a misplaced block shows."""
    return (f"{tag:03d}:{i:03d}".encode() * (BS // 7 + 1))[:BS]


def fill(device: Device, tag: int = 0) -> bytes:
    image = b"".join(block(i, tag) for i in range(device.size // BS))
    device.write(0, image)
    return image


@pytest.fixture
def paths(tmp_path: Any) -> Iterator[tuple[str, str]]:
    yield str(tmp_path / "preserve.store"), str(tmp_path / "vol0.img")


def create_files(paths: tuple[str, str], capacity: int) -> tuple[PreservationStore, Device, bytes, Volume]:
    """A new store file of `capacity` bytes and a new volume file of SIZE bytes, filled (its image is
    returned), attached as vol0."""
    store_path, vol_path = paths
    store = PreservationStore.open(store_path, capacity)
    device = open_file_device(vol_path, SIZE)
    original = fill(device)
    return store, device, original, store.attach("vol0", device, block_size=BS)


def reopen_files(paths: tuple[str, str]) -> tuple[PreservationStore, Device, Volume]:
    """The store file and the volume file opened again, as a restart does, with vol0 attached."""
    store_path, vol_path = paths
    store = PreservationStore.open(store_path)
    device = open_file_device(vol_path)
    return store, device, store.attach("vol0", device, block_size=BS)


# ---------------------------------------------------------------------------------------- overflow


def test_overflow_invalidates_persistently_and_origin_keeps_every_byte(paths: tuple[str, str]) -> None:
    store, device, original, vol = create_files(paths, 4 * BS)
    snap = vol.create_snapshot("nightly")
    # Six blocks need copies; the store holds four.
    new = b"".join(block(i, 1) for i in range(6))
    vol.write(0, new)
    info = snap.info()
    assert not info.valid
    assert "full" in info.reason
    assert info.preserved_blocks == 0
    with pytest.raises(SnapshotInvalid, match="nightly"):
        snap.read(0, BS)
    assert vol.read(0, SIZE) == new + original[len(new) :]
    # Origin writes go on after the overflow, with nothing to preserve any more.
    vol.write(10 * BS + 3, b"later")
    assert store.stats().used_bytes == 0
    store.close()
    device.close()

    store, device, vol = reopen_files(paths)
    snap = vol.snapshot("nightly")
    assert not snap.info().valid
    assert snap.info().reason == info.reason
    assert store.stats().invalid_snapshots == 1
    with pytest.raises(SnapshotInvalid):
        snap.read(0, SIZE)
    expected = bytearray(new + original[len(new) :])
    expected[10 * BS + 3 : 10 * BS + 8] = b"later"
    assert vol.read(0, SIZE) == expected
    store.close()
    device.close()


def test_overflow_spares_snapshots_that_need_no_copy() -> None:
    store = PreservationStore.in_memory(4 * BS)
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    old = vol.create_snapshot("old")
    vol.write(0, b"\x01" * 4 * BS)  # the store is now full with old's four copies
    assert store.stats().used_bytes == 4 * BS
    newer = vol.create_snapshot("newer")
    newer_image = vol.read(0, SIZE)
    vol.write(0, b"\x02" * 2 * BS)  # newer needs two copies that do not fit; old has its copies already
    assert not newer.info().valid
    assert old.info().valid
    assert old.read(0, SIZE) == original
    assert vol.read(0, SIZE) == b"\x02" * 2 * BS + newer_image[2 * BS :]


def test_overflow_on_one_volume_spares_the_other_volume() -> None:
    store = PreservationStore.in_memory(3 * BS)
    dev_a, dev_b = ram_device(SIZE), ram_device(SIZE)
    fill(dev_a, 1)
    image_b = fill(dev_b, 2)
    vol_a = store.attach("a", dev_a, block_size=BS)
    vol_b = store.attach("b", dev_b, block_size=BS)
    snap_b = vol_b.create_snapshot("keep")
    vol_b.write(0, b"\x0b" * BS)
    snap_a = vol_a.create_snapshot("lose")
    vol_a.write(0, b"\x0a" * 3 * BS)  # needs three copies, two are free
    assert not snap_a.info().valid
    assert snap_b.info().valid
    assert snap_b.read(0, SIZE) == image_b
    assert vol_a.read(0, 3 * BS) == b"\x0a" * 3 * BS


def test_snapshot_capacity_overflow_invalidates_only_that_snapshot() -> None:
    store = PreservationStore.in_memory(1 << 20)
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    capped = vol.create_snapshot("capped", capacity=2 * BS)
    free = vol.create_snapshot("free")
    assert capped.info().capacity_bytes == 2 * BS
    assert free.info().capacity_bytes == 1 << 20
    vol.write(0, b"\x01" * 2 * BS)  # exactly the capacity: still valid
    assert capped.info().valid
    assert capped.info().preserved_bytes == 2 * BS
    vol.write(5 * BS, b"\x02" * BS)
    info = capped.info()
    assert not info.valid
    assert "capacity" in info.reason
    assert free.info().valid
    assert free.read(0, SIZE) == original
    assert free.info().preserved_blocks == 3


def test_snapshot_capacity_overflow_does_not_take_down_snapshots_its_space_would_save() -> None:
    # The store has room for four blocks. "capped" holds two copies and then overflows its own capacity of
    # two: once it is gone the store is empty, so "wide" (which needs three copies) must survive.
    store = PreservationStore.in_memory(4 * BS)
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    capped = vol.create_snapshot("capped", capacity=2 * BS)
    vol.write_batch([(0, b"\x01" * BS), (BS, b"\x01" * BS)])
    wide = vol.create_snapshot("wide")
    wide_image = vol.read(0, SIZE)
    vol.write(2 * BS, b"\x02" * 3 * BS)
    assert not capped.info().valid
    assert wide.info().valid, wide.info().reason
    assert wide.read(0, SIZE) == wide_image
    assert wide_image != original


def test_writable_snapshot_write_without_room_raises_full() -> None:
    store = PreservationStore.in_memory(2 * BS)
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("scratch", writable=True)
    snap.write(0, b"\x01" * 2 * BS)
    with pytest.raises(PreservationFull):
        snap.write(4 * BS, b"\x02" * BS)
    assert snap.info().valid
    assert snap.read(0, SIZE) == b"\x01" * 2 * BS + original[2 * BS :]
    assert vol.read(0, SIZE) == original


def test_rewriting_a_block_of_a_writable_snapshot_does_not_fill_the_store() -> None:
    # A filesystem on a writable snapshot rewrites the same metadata blocks again and again: that holds
    # one block of the store, however often it happens.
    store = PreservationStore.in_memory(4 * BS)
    vol = store.attach("vol0", ram_device(SIZE), block_size=BS)
    snap = vol.create_snapshot("scratch", writable=True)
    for i in range(20):
        snap.write(0, bytes([i]) * BS)
    assert snap.read(0, BS) == bytes([19]) * BS
    assert snap.info().preserved_blocks == 1
    snap.flush()
    assert store.stats().used_bytes == BS


def test_used_bytes_never_exceed_the_capacity() -> None:
    # A writable snapshot that wrote a block itself does not need the origin's old copy of that block.
    store = PreservationStore.in_memory(BS)
    device = ram_device(SIZE)
    fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("scratch", writable=True)
    snap.write(0, b"\x01" * BS)  # fills the store
    vol.write(0, b"\x02" * BS)
    stats = store.stats()
    assert stats.used_bytes <= stats.capacity_bytes
    assert snap.info().valid
    assert snap.read(0, BS) == b"\x01" * BS
    assert vol.read(0, BS) == b"\x02" * BS


# ---------------------------------------------------------------------------------------- defer


def _deferred_setup(path: str, capacity: int) -> tuple[PreservationStore, Device, bytes]:
    store = PreservationStore.open(path, capacity, on_full="defer")
    device = ram_device(SIZE)
    original = fill(device)
    return store, device, original


BATCH: list[tuple[int, bytes | int]] = [(0, b"\x0d" * BS), (BS + 100, b"\x0e" * 2 * BS), (6 * BS, BS)]


def _apply_to(image: bytes) -> bytes:
    out = bytearray(image)
    for offset, data in BATCH:
        if isinstance(data, int):
            out[offset : offset + data] = bytes(data)
        else:
            out[offset : offset + len(data)] = data
    return bytes(out)


def test_defer_applies_nothing_and_keeps_the_snapshot(paths: tuple[str, str]) -> None:
    store_path, _ = paths
    store, device, original = _deferred_setup(store_path, 3 * BS)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("backup")
    vol.write(10 * BS, b"\x01" * BS)  # one copy, two slots left; the batch needs five
    stats = store.stats()
    with open(store_path, "rb") as f:
        store_bytes = f.read()
    with pytest.raises(PreservationDeferred) as info:
        vol.write_batch(BATCH)
    assert "vol0" in str(info.value) and "backup" in str(info.value)
    assert vol.read(0, SIZE) == original[: 10 * BS] + b"\x01" * BS + original[11 * BS :]
    assert store.stats() == stats
    with open(store_path, "rb") as f:
        assert f.read() == store_bytes
    assert snap.info().valid
    assert snap.read(0, SIZE) == original
    # Still deferred when retried: nothing changed.
    with pytest.raises(PreservationDeferred):
        vol.write_batch(BATCH)
    # Deleting the snapshot frees the way: the same batch applies.
    vol.delete_snapshot("backup")
    vol.write_batch(BATCH)
    assert vol.read(0, SIZE) == _apply_to(original[: 10 * BS] + b"\x01" * BS + original[11 * BS :])
    store.close()


def test_defer_then_reopen_with_more_capacity(paths: tuple[str, str]) -> None:
    store_path, _ = paths
    store, device, original = _deferred_setup(store_path, 2 * BS)
    vol = store.attach("vol0", device, block_size=BS)
    vol.create_snapshot("backup")
    with pytest.raises(PreservationDeferred):
        vol.write_batch(BATCH)
    store.close()
    store = PreservationStore.open(store_path, 8 * BS, on_full="defer")
    assert store.stats().capacity_bytes == 8 * BS
    vol = store.attach("vol0", device, block_size=BS)
    vol.write_batch(BATCH)
    snap = vol.snapshot("backup")
    assert snap.info().valid
    assert snap.read(0, SIZE) == original
    assert snap.info().preserved_blocks == 5
    assert vol.read(0, SIZE) == _apply_to(original)
    store.close()
    # The new capacity is kept by the store.
    store = PreservationStore.open(store_path)
    assert store.stats().capacity_bytes == 8 * BS
    store.close()


def test_defer_honours_snapshot_capacity() -> None:
    store = PreservationStore.in_memory(1 << 20, on_full="defer")
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("capped", capacity=2 * BS)
    with pytest.raises(PreservationDeferred, match="capped"):
        vol.write(0, b"\x01" * 3 * BS)
    assert vol.read(0, SIZE) == original
    assert snap.info().valid
    assert store.stats().used_bytes == 0
    vol.write(0, b"\x01" * 2 * BS)
    assert snap.read(0, SIZE) == original


# ---------------------------------------------------------------------------------------- space


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_delete_frees_space_and_slots_are_reused(paths: tuple[str, str]) -> None:
    store_path, _ = paths
    store = PreservationStore.open(store_path, 64 << 20)
    device = ram_device(4 << 20)
    vol = store.attach("vol0", device, block_size=BS)
    vol.write(0, b"\x01" * (4 << 20))
    empty_alloc = _allocated(store_path)

    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        vol.create_snapshot(name)
        vol.write(0, bytes([i + 2]) * (1 << 20))  # 256 copies per snapshot
    stats = store.stats()
    assert stats.preserved_blocks == 3 * 256
    assert stats.used_bytes == 3 * 256 * BS
    full_size = os.path.getsize(store_path)
    full_alloc = _allocated(store_path)
    assert full_alloc >= empty_alloc + 3 * (1 << 20)

    vol.delete_snapshot("b")
    assert store.stats().used_bytes == 2 * 256 * BS
    for name in ("a", "c"):
        vol.delete_snapshot(name)
    stats = store.stats()
    assert stats.used_bytes == 0
    assert stats.preserved_blocks == 0
    assert stats.snapshots == 0
    # The data is deallocated from the store file, not just forgotten.
    assert _allocated(store_path) <= full_alloc - 3 * (1 << 20) + 64 * 1024

    # The same amount preserved again fits in the freed slots: the file does not grow.
    for i, name in enumerate(names):
        vol.create_snapshot(name)
        vol.write(0, bytes([i + 9]) * (1 << 20))
    assert store.stats().used_bytes == 3 * 256 * BS
    assert os.path.getsize(store_path) == full_size
    store.close()
    assert os.path.getsize(store_path) == full_size


def test_freed_slots_are_reused_after_reopen(paths: tuple[str, str]) -> None:
    store_path, _ = paths
    store = PreservationStore.open(store_path, 64 << 20)
    device = ram_device(1 << 20)
    device.write(0, b"\x07" * (1 << 20))  # data, so that overwriting it takes slots (zeros would not)
    vol = store.attach("vol0", device, block_size=BS)
    vol.create_snapshot("s")
    vol.write(0, b"\x01" * (1 << 20))
    vol.delete_snapshot("s")
    size = os.path.getsize(store_path)
    store.close()
    store = PreservationStore.open(store_path)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("t")
    vol.write(0, b"\x02" * (1 << 20))
    assert snap.read(0, 1 << 20) == b"\x01" * (1 << 20)
    assert os.path.getsize(store_path) == size
    store.close()


@pytest.mark.parametrize("n", [1, 4, 16])
def test_n_snapshots_cost_one_copy_per_first_write(n: int) -> None:
    store = PreservationStore.in_memory(16 << 20)
    device = ram_device(SIZE)
    original = fill(device)
    vol = store.attach("vol0", device, block_size=BS)
    snaps = [vol.create_snapshot(f"s{i}") for i in range(n)]
    vol.write_batch([(0, b"\x01" * 4 * BS), (8 * BS, b"\x02" * BS)])
    vol.write(0, b"\x03" * 5 * BS)  # blocks 0-3 again (already preserved) and block 4 for the first time
    stats = store.stats()
    assert stats.cow_copies == 6
    assert stats.preserved_blocks == 6
    assert stats.used_bytes == 6 * BS
    for snap in snaps:
        assert snap.read(0, SIZE) == original
        assert snap.info().preserved_blocks == 6
        assert snap.info().preserved_bytes == 6 * BS


def test_snapshots_between_writes_get_their_own_copies() -> None:
    store = PreservationStore.in_memory(16 << 20)
    device = ram_device(SIZE)
    images = [fill(device)]
    vol = store.attach("vol0", device, block_size=BS)
    snaps = []
    for i in range(1, 4):
        snaps.append(vol.create_snapshot(f"s{i}"))
        vol.write(0, block(0, i) + block(1, i))
        images.append(vol.read(0, SIZE))
    assert store.stats().cow_copies == 6  # two blocks, three generations
    for snap, image in zip(snaps, images, strict=False):
        assert snap.read(0, SIZE) == image
    # Deleting the middle snapshot frees exactly its two copies.
    vol.delete_snapshot("s2")
    assert store.stats().preserved_blocks == 4
    assert snaps[0].read(0, SIZE) == images[0]
    assert snaps[2].read(0, SIZE) == images[2]


# ---------------------------------------------------------------------------------------- volumes


def test_two_volumes_share_one_store_with_independent_snapshots() -> None:
    store = PreservationStore.in_memory(16 << 20)
    dev_a, dev_b = ram_device(SIZE), ram_device(2 * SIZE)
    image_a, image_b = fill(dev_a, 1), fill(dev_b, 2)
    vol_a = store.attach("a", dev_a, block_size=BS)
    vol_b = store.attach("b", dev_b, block_size=512)
    assert store.volume_names() == ["a", "b"]
    snap_a = vol_a.create_snapshot("nightly")
    snap_b = vol_b.create_snapshot("nightly")  # the same name in another volume is another snapshot
    vol_a.write(0, b"\x0a" * BS)
    assert snap_b.info().preserved_blocks == 0
    vol_b.write(100, b"\x0b" * 1000)  # three 512-byte blocks
    assert snap_a.info().preserved_blocks == 1
    assert snap_b.info().preserved_blocks == 3
    assert store.stats().used_bytes == BS + 3 * 512
    assert snap_a.read(0, SIZE) == image_a
    assert snap_b.read(0, 2 * SIZE) == image_b
    vol_a.delete_snapshot("nightly")
    assert [s.name for s in vol_b.snapshots()] == ["nightly"]
    assert snap_b.read(0, 2 * SIZE) == image_b
    assert store.stats().used_bytes == 3 * 512
    assert store.volume("a") is vol_a


# ---------------------------------------------------------------------------------------- names


def test_automatic_snapshot_names_never_collide_with_given_ones() -> None:
    store = PreservationStore.in_memory(1 << 20)
    vol = store.attach("vol0", ram_device(SIZE), block_size=BS)
    given = {f"snap-{i}" for i in range(2, 81, 2)}  # names an operator might well choose
    for name in sorted(given):
        vol.create_snapshot(name)
    automatic = [vol.create_snapshot().name for _ in range(5)]
    assert len(set(automatic)) == 5
    assert not set(automatic) & given
    assert len(vol.snapshots()) == 45


# ---------------------------------------------------------------------------------------- reopen


def test_reopen_restores_every_snapshot(paths: tuple[str, str]) -> None:
    store, device, original, vol = create_files(paths, 5 * BS)
    vol.create_snapshot("daily", capacity=4 * BS)
    vol.create_snapshot("scratch", writable=True)
    vol.write(0, b"\x01" * 2 * BS)
    vol.create_snapshot("doomed", capacity=BS)
    vol.snapshot("scratch").write(7 * BS + 1, b"\x02" * 10)
    vol.write(2 * BS, b"\x03" * 2 * BS)  # doomed overflows its own capacity; the store is then full
    before = {s.name: s.info() for s in vol.snapshots()}
    assert [(i.valid, i.preserved_blocks) for i in before.values()] == [(True, 4), (True, 5), (False, 0)]
    images = {s.name: s.read(0, SIZE) for s in vol.snapshots() if s.valid}
    assert images["daily"] == original
    stats = store.stats()
    store.close()
    device.close()

    store, device, vol = reopen_files(paths)
    after = {s.name: s.info() for s in vol.snapshots()}
    assert after == before
    assert [s.name for s in vol.snapshots()] == ["daily", "scratch", "doomed"]
    for name, image in images.items():
        assert vol.snapshot(name).read(0, SIZE) == image
    assert images["scratch"][7 * BS + 1 : 7 * BS + 11] == b"\x02" * 10
    assert store.stats().preserved_blocks == stats.preserved_blocks
    assert store.stats().used_bytes == stats.used_bytes
    assert store.stats().capacity_bytes == 5 * BS
    assert vol.read(0, SIZE) == b"\x01" * 2 * BS + b"\x03" * 2 * BS + original[4 * BS :]
    store.close()
    device.close()


def test_writable_snapshot_writes_survive_reopen(paths: tuple[str, str]) -> None:
    store, device, original, vol = create_files(paths, 1 << 20)
    snap = vol.create_snapshot("scratch", writable=True)
    snap.write(BS - 3, b"hello, world")
    snap.write(5 * BS, b"\x01" * BS)
    snap.write(5 * BS, b"\x02" * BS)  # replaced: the newest data wins
    snap.zero(9 * BS, 2 * BS)
    snap.flush()
    expected = bytearray(original)
    expected[BS - 3 : BS + 9] = b"hello, world"
    expected[5 * BS : 6 * BS] = b"\x02" * BS
    expected[9 * BS : 11 * BS] = bytes(2 * BS)
    assert snap.read(0, SIZE) == expected
    assert snap.info().preserved_blocks == 5
    store.close()

    store = PreservationStore.open(paths[0])  # the store reopened on the volume still open
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.snapshot("scratch")
    assert snap.read(0, SIZE) == expected
    assert snap.info().preserved_blocks == 5
    assert snap.info().writable
    assert vol.read(0, SIZE) == original  # snapshot writes never reach the origin
    store.close()
    device.close()


def test_store_in_a_memfile_survives_a_restart() -> None:
    raw = MemFile()
    device = ram_device(SIZE)
    original = fill(device)
    store = PreservationStore.open_raw(raw, 1 << 20)
    vol = store.attach("vol0", device, block_size=BS)
    vol.create_snapshot("s")
    vol.write(0, b"\x01" * SIZE)
    store.close()
    store = PreservationStore.open_raw(raw)
    vol = store.attach("vol0", device, block_size=BS)
    assert vol.snapshot("s").read(0, SIZE) == original
    assert store.stats().preserved_blocks == NBLOCKS


def test_many_small_batches_after_reopen(paths: tuple[str, str]) -> None:
    # A standby restarts with a large index and then applies many small batches between snapshots.
    store_path, _ = paths
    bs, nblocks = 512, 1024
    rng = random.Random(7)
    store = PreservationStore.open(store_path, 64 << 20)
    device = ram_device(nblocks * bs)
    device.write(0, rng.randbytes(nblocks * bs))
    vol = store.attach("vol0", device, block_size=bs)
    images = {"base": vol.read(0, nblocks * bs)}
    written: dict[str, set[int]] = {"base": set(range(nblocks))}
    vol.create_snapshot("base")
    vol.write(0, rng.randbytes(nblocks * bs))  # every block preserved once
    store.close()
    store = PreservationStore.open(store_path)
    vol = store.attach("vol0", device, block_size=bs)
    for i in range(40):
        name = f"s{i}"
        vol.create_snapshot(name)
        images[name] = vol.read(0, nblocks * bs)
        written[name] = set()
        picks = rng.sample(range(nblocks), 5)
        vol.write_batch([(b * bs, rng.randbytes(bs)) for b in picks])
        for blocks in written.values():
            blocks.update(picks)
    for name, image in images.items():
        snap = vol.snapshot(name)
        assert snap.read(0, nblocks * bs) == image, name
        assert snap.info().preserved_blocks == len(written[name]), name
    store.close()


# ---------------------------------------------------------------------------------------- cost


def test_create_snapshot_of_a_huge_volume_writes_only_a_few_kib(tmp_path: Any) -> None:
    store = PreservationStore.open(str(tmp_path / "preserve.store"), 1 << 30)
    device = open_file_device(str(tmp_path / "huge.img"), 1 << 40)  # sparse
    vol = store.attach("huge", device, block_size=BS)
    before = store.stats().bytes_written
    snaps = [vol.create_snapshot(f"s{i}") for i in range(3)]
    written = store.stats().bytes_written - before
    assert written < 64 * 1024
    # The snapshot works at the far end of the volume.
    vol.write((1 << 40) - BS, b"\x01" * BS)
    for snap in snaps:
        assert snap.read((1 << 40) - BS, BS) == bytes(BS)
    # The block was a hole: preserved as one hole entry serving the three snapshots, no data copied.
    stats = store.stats()
    assert (stats.cow_copies, stats.cow_holes, stats.used_bytes) == (0, 1, 0)
    store.close()
    device.close()


def test_index_ram_is_per_preserved_block(tmp_path: Any) -> None:
    bs = 512
    nblocks = 20_000
    store = PreservationStore.in_memory(64 << 20)
    device = ram_device(nblocks * bs)
    device.write(0, b"\x07" * (nblocks * bs))  # data: each preserved block is a copy
    vol = store.attach("vol0", device, block_size=bs)
    assert store.index_bytes() == 0
    vol.create_snapshot("s")
    vol.write(0, b"\x01" * (nblocks * bs))
    preserved = store.stats().preserved_blocks
    assert preserved == nblocks
    assert store.index_bytes() / preserved <= 32
    # A second, unrelated volume of any size adds nothing until it preserves something.
    big = open_file_device(str(tmp_path / "big.img"), 1 << 40)
    store.attach("big", big, block_size=bs)
    assert store.index_bytes() / preserved <= 32
    big.close()


def test_long_runs_are_copied_inside_the_kernel_and_survive_reopen(tmp_path: Any) -> None:
    # Runs of consecutive blocks on files are copied with copy_file_range, not through our buffer:
    # the copies must hold exactly the old data, and be found again after a reopen.
    size = 8 << 20
    rng = random.Random(5)
    original = rng.randbytes(size)
    device = open_file_device(str(tmp_path / "vol.img"), size=size)
    device.write(0, original)
    store = PreservationStore.open(str(tmp_path / "p.store"), capacity=size)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("s")
    origin_reads = device.raw.counters.bytes_read
    # 1 MiB runs, some starting mid-area, plus one unaligned write spanning two runs.
    vol.write_batch([(off, rng.randbytes(1 << 20)) for off in (0, 3 << 20, (5 << 20) + BS)])
    vol.write_batch([((2 << 20) - 100, rng.randbytes(200 + (1 << 20)))])
    # The old data was read once to checksum it and once by the kernel to copy it.
    assert device.raw.counters.bytes_read - origin_reads >= 2 * snap.info().preserved_bytes
    assert snap.read(0, size) == original
    store.close()
    store = PreservationStore.open(str(tmp_path / "p.store"))
    vol = store.attach("vol0", device, block_size=BS)
    assert vol.snapshot("s").read(0, size) == original
    assert vol.snapshot("s").info().preserved_bytes == 4 * (1 << 20) + BS
    store.close()
    device.close()


def test_extents_report_holes_of_origin_and_snapshot(tmp_path: Any) -> None:
    # A snapshot's block is a hole when the origin block is a hole and no copy serves it, or when the
    # copy that serves it is a hole entry (the block was a hole when it was preserved).
    size = 1 << 20
    device = open_file_device(str(tmp_path / "vol.img"), size=size)
    store = PreservationStore.open(str(tmp_path / "p.store"), capacity=size)
    vol = store.attach("vol0", device, block_size=BS)
    vol.write(64 * BS, b"\x01" * 16 * BS)  # data in blocks 64-79, the rest a hole
    snap = vol.create_snapshot("s")
    vol.write(8 * BS, b"\x02" * BS)  # block 8 was a hole: a hole entry now serves the snapshot
    vol.write(64 * BS, b"\x03" * BS)
    assert vol.extents(0, size) == [
        (8 * BS, True),
        (BS, False),
        (55 * BS, True),
        (16 * BS, False),
        (size - 80 * BS, True),
    ]
    assert snap.extents(0, size) == [(64 * BS, True), (16 * BS, False), (size - 80 * BS, True)]
    assert snap.extents(8 * BS + 100, 100) == [(100, True)]
    assert snap.read(8 * BS, BS) == bytes(BS)
    # Zeroing punches the origin, but the snapshot still reads its preserved data there.
    vol.zero(70 * BS, BS)
    assert vol.extents(70 * BS, BS) == [(BS, True)]
    assert snap.extents(69 * BS, 3 * BS) == [(3 * BS, False)]
    assert snap.read(70 * BS, BS) == b"\x01" * BS
    assert snap.extents(100, 200) == [(200, True)]
    # Every hole reported reads as zeros.
    pos = 0
    for n, hole in snap.extents(0, size):
        if hole:
            assert snap.read(pos, n) == bytes(n)
        pos += n
    store.close()
    device.close()


# ---------------------------------------------------------------------------------------- forget


def test_a_forgotten_volume_is_gone_after_reopen_and_its_space_is_free(paths: tuple[str, str]) -> None:
    store, device, _, vol = create_files(paths, 64 * BS)
    other_device = ram_device(SIZE)
    fill(other_device, tag=1)
    other = store.attach("vol1", other_device, block_size=BS)
    vol.create_snapshot("nightly")
    vol.write(0, b"\x01" * 4 * BS)
    other.create_snapshot("kept")
    other.write(0, b"\x07" * BS)
    with pytest.raises(VolumeMismatch, match="attached"):
        store.forget("vol0")
    vol.close()
    with pytest.raises(VolumeMismatch, match="snapshots"):
        store.forget("vol0")  # (refused: it would leave copies no volume owns)
    vol = store.attach("vol0", device, block_size=BS)
    vol.delete_snapshot("nightly")
    vol.close()
    store.forget("vol0")
    assert store.volume_names() == ["vol1"]
    assert store.stats().used_bytes == BS  # vol1's one copy
    with pytest.raises(UnknownVolume):
        store.forget("vol0")
    other.close()
    store.close()
    device.close()

    store = PreservationStore.open(paths[0])
    assert store.volume_names() == ["vol1"]
    assert store.stats().used_bytes == BS
    # The name can be used again: a new volume, with a new id, of another block size even.
    device = open_file_device(paths[1])
    again = store.attach("vol0", device, block_size=2 * BS)
    assert again.record.id not in (1, 2) and again.snapshots() == []
    again.close()
    store.close()
    device.close()

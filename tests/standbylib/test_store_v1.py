"""A store written by the engine of store format 1 (`data/store-v1.tar.gz`, made by
`data/make_store_v1.py`) opens with this software: it is upgraded to format 2 when opened, its snapshots
read what they froze and count what they preserved as before (format 1 copied blocks of zeros like any
block: those copies stay copies), and it goes on working, with hole entries from then on.
"""

from __future__ import annotations

import random
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
from faultfile import MODES, Disk, Replay
from storecheck import assert_accounting

from standbylib.blockdev import Device, open_file_device
from standbylib.errors import StoreCorrupt
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Volume, layout

FIXTURE = Path(__file__).with_name("data") / "store-v1.tar.gz"
BS = 4096
BLOCKS = 64


def blocks(*runs: tuple[int, int, int]) -> dict[int, int]:
    """{block: byte} of runs (first, end, byte)."""
    return {b: byte for first, end, byte in runs for b in range(first, end)}


def image(content: dict[int, int]) -> bytes:
    out = bytearray(BLOCKS * BS)
    for b, byte in content.items():
        out[b * BS : (b + 1) * BS] = bytes([byte]) * BS
    return bytes(out)


# The history of make_store_v1.py, replayed.
ORIGINAL = {b: 0x40 + b for b in range(32)}
AFTER_S1 = {**ORIGINAL, **blocks((0, 8, 0xB0), (40, 44, 0xC0))}
AFTER_S2 = {**AFTER_S1, **blocks((4, 12, 0xD0), (44, 46, 0xE0))}
EXPECTED = {
    # snapshot: (image, preserved blocks); every copy of format 1 has data, zeros too
    "s1": (image(ORIGINAL), 19),  # blocks 0-11 (data), 40-46 (zeros)
    "s2": (image(AFTER_S1), 11),  # blocks 4-11 (data), 44-46 (zeros)
    "w": (image({**AFTER_S2, 50: 0xF0}), 2),  # block 46 (zeros), block 50 written to it
}
ORIGIN = image({**AFTER_S2, 46: 0xA0})


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """The format-1 store and its volume, extracted into tmp_path."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


def file_version(path: Path) -> int:
    version: int = struct.unpack_from("<I", path.read_bytes(), 8)[0]
    return version


def check_snapshots(vol: Volume, where: str) -> None:
    for name, (want, preserved) in EXPECTED.items():
        snap = vol.snapshot(name)
        info = snap.info()
        assert snap.read(0, BLOCKS * BS) == want, f"{where}: {name} reads other data"
        assert (info.valid, info.preserved_blocks, info.preserved_bytes) == (True, preserved, preserved * BS)


def test_a_format_1_store_is_upgraded_and_keeps_its_snapshots(v1: Path) -> None:
    assert FIXTURE.stat().st_size < 100 * 1024
    store_path = v1 / "preserve.store"
    assert file_version(store_path) == 1
    store = PreservationStore.open(str(store_path))
    assert store.found_version == 1
    assert file_version(store_path) == layout.VERSION == 2  # upgraded, durably, when opened
    device = open_file_device(str(v1 / "vol.img"))
    vol = store.attach("vol", device, block_size=BS)
    assert vol.read(0, BLOCKS * BS) == ORIGIN
    assert [s.name for s in vol.snapshots()] == ["s1", "s2", "w"]
    check_snapshots(vol, "opened")
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.hole_entries) == (24 * BS, 24, 0)
    assert vol.changes("s1", "s2") == [(0, 8 * BS), (40 * BS, 4 * BS)]
    # Format 1's copies of zeros are data copies: they read as zeros and are reported as data.
    assert vol.snapshot("s1").extents(40 * BS, 7 * BS) == [(7 * BS, False)]

    # It goes on: block 60 was never written (a hole entry now), block 20 holds data (a copy).
    vol.write_batch([(60 * BS, b"\x61" * BS), (20 * BS, b"\x62" * BS)])
    stats = store.stats()
    assert (stats.used_bytes, stats.preserved_blocks, stats.hole_entries) == (25 * BS, 25, 1)
    for name, (_want, preserved) in EXPECTED.items():
        info = vol.snapshot(name).info()
        assert (info.preserved_blocks, info.hole_blocks) == (preserved + 1, 1), name
        assert vol.snapshot(name).extents(60 * BS, BS) == [(BS, True)], name
    s3 = vol.create_snapshot("s3")
    frozen = vol.read(0, BLOCKS * BS)
    vol.write_batch([(61 * BS, b"\x63" * BS)])  # a hole: one entry serving all four snapshots
    assert s3.read(0, BLOCKS * BS) == frozen
    assert (s3.info().preserved_blocks, s3.info().hole_blocks) == (0, 1)
    assert store.stats().hole_entries == 2
    vol.delete_snapshot("s1")
    assert_accounting(store, "after deleting s1")
    store.close()

    store = PreservationStore.open(str(store_path))
    assert store.found_version == 2
    vol = store.attach("vol", device, block_size=BS)
    for name in ("s2", "w"):
        want, preserved = EXPECTED[name]
        snap = vol.snapshot(name)
        assert snap.read(0, BLOCKS * BS) == want, name
        assert (snap.info().preserved_blocks, snap.info().hole_blocks) == (preserved + 1, 2), name
    assert vol.snapshot("s3").read(0, BLOCKS * BS) == frozen
    assert_accounting(store, "reopened")
    store.close()
    device.close()


def test_a_power_loss_while_a_format_1_store_is_upgraded_loses_nothing(v1: Path) -> None:
    store_bytes = (v1 / "preserve.store").read_bytes()
    origin = MemFile(ORIGIN)
    disk = Disk()
    store = PreservationStore.open_raw(disk.file("store", store_bytes))
    store.attach("vol", Device(origin, len(ORIGIN)), block_size=BS)
    store.close()
    replay = Replay(disk)
    for cut in range(disk.now + 1):
        for mode in MODES:
            images = replay.images(cut, mode, random.Random(cut))
            version = struct.unpack_from("<I", images["store"], 8)[0]
            assert version in (1, 2), f"cut {cut} {mode}: the superblock names version {version}"
            again = PreservationStore.open_raw(MemFile(bytes(images["store"])))
            vol = again.attach("vol", Device(MemFile(ORIGIN), len(ORIGIN)), block_size=BS)
            check_snapshots(vol, f"cut {cut} {mode}")
            vol.write_batch([(60 * BS, b"\x61" * BS)])  # an entry area, once upgraded
            assert again.stats().hole_entries == 1
            again.close()


def test_a_store_of_a_later_format_is_refused_clearly(v1: Path) -> None:
    path = v1 / "preserve.store"
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 3)
    struct.pack_into("<I", data, 40, zlib.crc32(bytes(data[:40])))
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="store format version 3, this software reads versions 1 and 2"):
        PreservationStore.open(str(path))

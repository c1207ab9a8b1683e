"""One contract suite over every block device: file, RAM, a device over the tests' fault-injecting raw
file, engine volume and snapshots, the primary's mirrored device; and size units."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from faultfile import Disk
from hypothesis import given, settings
from hypothesis import strategies as st

from primary.bitmap import WriteIntentBitmap
from primary.device import MirroredDevice
from primary.generations import Generations
from primary.mirror import Mirror
from standbylib.blockdev import BlockDevice, Device, open_file_device, ram_device
from standbylib.errors import DeviceError, InvalidArgument, InvalidLength, OutOfRange, ReadOnly
from standbylib.rawfile import MemFile, OsFile
from standbylib.snapshot import PreservationStore, Volume
from standbylib.units import format_size, parse_size

SIZE = 256 * 1024
BS = 4096


@dataclass
class Made:
    device: BlockDevice
    reopen: Callable[[], BlockDevice] | None = None  # a fresh handle on the same data, after close
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def make_file(tmp_path: Any) -> Made:
    path = str(tmp_path / "disk.img")
    dev = open_file_device(path, SIZE)

    def reopen() -> BlockDevice:
        return open_file_device(path)

    return Made(dev, reopen)


def make_ram(tmp_path: Any) -> Made:
    return Made(ram_device(SIZE))


def make_fault_file(tmp_path: Any) -> Made:
    """A `Device` over a `RawFile` of the tests (faultfile.py, no fault injected); reopened as a power cut
    leaves it, with only what a flush made durable."""
    disk = Disk()
    dev = Device(disk.file("dev", bytes(SIZE)), SIZE)

    def reopen() -> BlockDevice:
        return Device(MemFile(disk.crash(disk.now, "none")["dev"]), SIZE)

    return Made(dev, reopen)


def make_mirrored(tmp_path: Any) -> Made:
    """The primary's exported device (`MirroredDevice`) over a file, its `Mirror` never started: no
    standby, so every change is applied locally and its regions are recorded dirty in the write-intent
    bitmap (kept in RAM here, and read back by the reopened device)."""
    path = str(tmp_path / "primary.img")
    bitmap_file = MemFile()
    generations = Generations(str(tmp_path / "primary.generation"))

    def build(new: bool) -> MirroredDevice:
        bitmap = WriteIntentBitmap(bitmap_file, SIZE, 64 << 10, new=new)
        mirror = Mirror("127.0.0.1:1", "vol0", SIZE, BS, bitmap, generations)
        return MirroredDevice("vol0", open_file_device(path, SIZE), mirror)

    return Made(build(True), lambda: build(False))


def _engine(tmp_path: Any) -> tuple[PreservationStore, Device]:
    store = PreservationStore.open(str(tmp_path / "preserve.store"), 16 << 20)
    origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
    origin.write(0, os.urandom(SIZE))
    return store, origin


def _reopen_engine(tmp_path: Any, made: Made, block_size: int) -> Volume:
    """Open the store and the origin file again, as after a restart."""
    store = PreservationStore.open(str(tmp_path / "preserve.store"))
    origin = open_file_device(str(tmp_path / "origin.img"))
    made.cleanup += [store.close, origin.close]
    return store.attach("vol0", origin, block_size=block_size)


def make_volume(tmp_path: Any, block_size: int = BS) -> Made:
    store, origin = _engine(tmp_path)
    vol = store.attach("vol0", origin, block_size=block_size)
    vol.create_snapshot("watching")  # every write goes through copy-on-write
    made = Made(vol, None, [store.close, origin.close])
    made.reopen = lambda: _reopen_engine(tmp_path, made, block_size)
    return made


def make_volume_512(tmp_path: Any) -> Made:
    return make_volume(tmp_path, 512)


def make_writable_snapshot(tmp_path: Any) -> Made:
    store, origin = _engine(tmp_path)
    vol = store.attach("vol0", origin, block_size=BS)
    snap = vol.create_snapshot("scratch", writable=True)
    vol.write(0, os.urandom(SIZE // 2))  # the origin moves on under the snapshot
    made = Made(snap, None, [store.close, origin.close])
    made.reopen = lambda: _reopen_engine(tmp_path, made, BS).snapshot("scratch")
    return made


FACTORIES = {
    "file": make_file,
    "ram": make_ram,
    "fault-file": make_fault_file,
    "mirrored": make_mirrored,
    "volume": make_volume,
    "volume-512": make_volume_512,
    "writable-snapshot": make_writable_snapshot,
}


@pytest.fixture(params=sorted(FACTORIES))
def made(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Made]:
    m = FACTORIES[request.param](tmp_path)
    yield m
    m.device.close()
    for fn in m.cleanup:
        fn()


def test_is_a_block_device(made: Made) -> None:
    assert isinstance(made.device, BlockDevice)
    assert made.device.size == SIZE
    assert made.device.readonly is False


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, BS),
        (1, 1),
        (511, 2),
        (BS - 1, 2),
        (BS + 7, 3 * BS + 100),
        (SIZE - 1, 1),
        (SIZE - BS - 3, BS + 3),
        (0, SIZE),
    ],
)
def test_read_after_write(made: Made, offset: int, length: int) -> None:
    dev = made.device
    before = dev.read(0, SIZE)
    data = os.urandom(length)
    dev.write(offset, data)
    assert dev.read(offset, length) == data
    # Neighbouring bytes are untouched (partial blocks are read-modify-written correctly).
    after = dev.read(0, SIZE)
    assert after[:offset] == before[:offset]
    assert after[offset + length :] == before[offset + length :]


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * BS), st.booleans()), max_size=8))
def test_random_writes_and_zeroes_match_a_bytearray(ops: list[tuple[int, int, bool]]) -> None:
    for name, factory in FACTORIES.items():
        with _TmpDir() as tmp:
            m = factory(tmp)
            try:
                dev = m.device
                model = bytearray(dev.read(0, SIZE))
                for offset, length, zero in ops:
                    length = min(length, SIZE - offset)
                    if zero:
                        dev.zero(offset, length)
                        model[offset : offset + length] = bytes(length)
                    else:
                        data = bytes([(offset + i) % 251 for i in range(length)])
                        dev.write(offset, data)
                        model[offset : offset + length] = data
                assert dev.read(0, SIZE) == model, name
            finally:
                m.device.close()
                for fn in m.cleanup:
                    fn()


class _TmpDir:
    """A temporary directory as a pathlib.Path, for use inside Hypothesis tests (no function fixtures)."""

    def __enter__(self) -> Any:
        import pathlib
        import tempfile

        self._td = tempfile.TemporaryDirectory(prefix="blockdev-")
        return pathlib.Path(self._td.name)

    def __exit__(self, *exc: object) -> None:
        self._td.cleanup()


@pytest.mark.parametrize(("offset", "length"), [(0, SIZE), (BS - 10, 20), (3 * BS, 2 * BS), (SIZE - 5, 5)])
def test_zero(made: Made, offset: int, length: int) -> None:
    dev = made.device
    dev.write(0, b"\xff" * SIZE)
    dev.zero(offset, length)
    assert dev.read(offset, length) == bytes(length)
    if offset:
        assert dev.read(0, offset) == b"\xff" * offset
    if offset + length < SIZE:
        assert dev.read(offset + length, SIZE - offset - length) == b"\xff" * (SIZE - offset - length)


BAD = [
    pytest.param(SIZE, 1, OutOfRange, id="at-end"),
    pytest.param(SIZE - 1, 2, OutOfRange, id="across-end"),
    pytest.param(-1, 1, OutOfRange, id="negative-offset"),
    pytest.param(0, 0, InvalidLength, id="zero-length"),
    pytest.param(0, -1, InvalidLength, id="negative-length"),
]


@pytest.mark.parametrize(("offset", "length", "exc"), BAD)
def test_out_of_range(made: Made, offset: int, length: int, exc: type[Exception]) -> None:
    dev = made.device
    before = dev.read(0, SIZE)
    with pytest.raises(exc):
        dev.read(offset, length)
    with pytest.raises(exc):
        dev.zero(offset, length)
    if length >= 0:
        with pytest.raises(exc):
            dev.write(offset, b"\x01" * length)
    assert dev.read(0, SIZE) == before


def test_flush_makes_writes_durable(made: Made) -> None:
    dev = made.device
    data = os.urandom(3 * BS + 5)
    dev.write(BS - 2, data)
    dev.flush()
    assert dev.read(BS - 2, len(data)) == data
    if made.reopen is None:
        return
    dev.close()
    for fn in made.cleanup:
        fn()
    made.cleanup.clear()
    again = made.reopen()
    made.device = again
    assert again.read(BS - 2, len(data)) == data


def test_a_raw_file_is_beneath_the_contract_and_a_device_wraps_it(tmp_path: Any) -> None:
    """A `RawFile` (`OsFile`, `MemFile`, the tests' `FaultFile`) is not a block device: its size is a
    method, reads take ``(length, offset)``, and nothing is range-checked (a write past the end grows
    the file). `Device` is the block device over one (the "file", "ram" and "fault-file" cases)."""
    raw = OsFile(str(tmp_path / "raw.img"), create=True)
    try:
        assert not isinstance(raw, BlockDevice)
        assert not isinstance(MemFile(), BlockDevice)
        raw.pwrite(b"x", SIZE)
        assert raw.size() == SIZE + 1
        dev = Device(raw, SIZE)
        assert isinstance(dev, BlockDevice)
        with pytest.raises(OutOfRange):
            dev.write(SIZE, b"x")
    finally:
        raw.close()


def test_the_mirrored_device_without_a_standby_records_every_change_dirty(tmp_path: Any) -> None:
    made = make_mirrored(tmp_path)
    dev = made.device
    assert isinstance(dev, MirroredDevice)
    try:
        dev.write((64 << 10) + 100, b"x" * 10)  # region 1 of 64 KiB
        dev.zero(3 * (64 << 10), BS)  # region 3
        dev.flush()  # nothing to wait for: the barrier is dropped with no stream
        assert list(dev.mirror.bitmap.dirty_regions()) == [1, 3]
    finally:
        dev.close()


# ---------------------------------------------------------------------------------------- read-only devices


def make_readonly_snapshot(tmp_path: Any) -> Made:
    store, origin = _engine(tmp_path)
    vol = store.attach("vol0", origin, block_size=BS)
    snap = vol.create_snapshot("frozen")
    vol.write(0, os.urandom(SIZE // 2))
    return Made(snap, None, [store.close, origin.close])


def make_readonly_file(tmp_path: Any) -> Made:
    path = str(tmp_path / "disk.img")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return Made(open_file_device(path, readonly=True))


@pytest.fixture(params=["readonly-snapshot", "readonly-file"])
def readonly(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Made]:
    factory = {"readonly-snapshot": make_readonly_snapshot, "readonly-file": make_readonly_file}[
        request.param
    ]
    m = factory(tmp_path)
    yield m
    m.device.close()
    for fn in m.cleanup:
        fn()


def test_readonly_device_refuses_writes(readonly: Made) -> None:
    dev = readonly.device
    assert isinstance(dev, BlockDevice)
    assert dev.readonly is True
    assert dev.size == SIZE
    image = dev.read(0, SIZE)
    assert dev.read(BS - 1, 2) == image[BS - 1 : BS + 1]
    with pytest.raises(ReadOnly):
        dev.write(0, b"x")
    with pytest.raises(ReadOnly):
        dev.write(BS - 1, b"x" * BS)
    with pytest.raises(ReadOnly):
        dev.zero(0, SIZE)
    dev.flush()
    assert dev.read(0, SIZE) == image
    with pytest.raises(OutOfRange):
        dev.read(SIZE, 1)


# ---------------------------------------------------------------------------------------- file devices


def test_file_device_is_sparse_and_grows(tmp_path: Any) -> None:
    path = str(tmp_path / "sparse.img")
    dev = open_file_device(path, 1 << 30)
    assert dev.size == 1 << 30
    assert os.stat(path).st_blocks * 512 < 1 << 20
    assert dev.read((1 << 30) - 10, 10) == bytes(10)
    dev.close()
    dev = open_file_device(path, 2 << 30)  # a bigger size grows the file
    assert dev.size == 2 << 30
    assert os.path.getsize(path) == 2 << 30
    dev.close()
    dev = open_file_device(path)
    assert dev.size == 2 << 30
    dev.close()


def test_zero_deallocates_file_blocks(tmp_path: Any) -> None:
    path = str(tmp_path / "disk.img")
    dev = open_file_device(path, 4 << 20)
    dev.write(0, b"\x01" * (4 << 20))
    dev.flush()
    allocated = os.stat(path).st_blocks * 512
    dev.zero(0, 4 << 20)
    assert os.stat(path).st_blocks * 512 <= allocated - (4 << 20) + BS
    assert dev.read(0, 4 << 20) == bytes(4 << 20)
    dev.close()


def test_file_device_errors(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.img")
    with pytest.raises(DeviceError, match="give a size"):
        open_file_device(missing)
    assert not os.path.exists(missing)
    empty = str(tmp_path / "empty.img")
    open(empty, "wb").close()
    with pytest.raises(DeviceError, match="empty"):
        open_file_device(empty)
    small = str(tmp_path / "small.img")
    with open(small, "wb") as f:
        f.write(b"x" * 100)
    with pytest.raises(DeviceError):
        open_file_device(small, 4096, readonly=True)
    assert os.path.getsize(small) == 100
    with pytest.raises(InvalidArgument):
        ram_device(0)


# ---------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("4K", 4096),
        ("4k", 4096),
        ("64KiB", 64 << 10),
        ("64kib", 64 << 10),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("10GiB", 10 << 30),
        ("3G", 3 << 30),
        ("2TiB", 2 << 40),
        ("1P", 1 << 50),
        ("512b", 512),
        ("512B", 512),
        (" 8 MiB ", 8 << 20),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "abc", "-1", "1.5G", "4 KB", "10XiB", "1e6", "K", "0x10", "4 K B", -1]
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0B"),
        (1, "1B"),
        (512, "512B"),
        (1023, "1023B"),
        (1024, "1KiB"),
        (1536, "1536B"),
        (4096, "4KiB"),
        (64 << 10, "64KiB"),
        (1 << 20, "1MiB"),
        (3 << 30, "3GiB"),
        ((1 << 30) + (1 << 20), "1025MiB"),
        (1 << 40, "1TiB"),
        (1 << 50, "1024TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(0, 1 << 60))
def test_format_then_parse_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n

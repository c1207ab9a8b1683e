"""Read plans (`standbylib.readplan`): one contract over every device that offers them, and the
snapshot's lock held while a plan is open."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from lockwatch import waiting_writers

from standbylib.blockdev import open_file_device, ram_device
from standbylib.errors import UnknownSnapshot
from standbylib.readplan import Bytes, FileRange, Hole, PlanSource, ReadPlan
from standbylib.snapshot import PreservationStore

SIZE = 4 << 20
BS = 4096


@dataclass
class Case:
    device: PlanSource
    image: bytes  # what the device must read as
    zero_copy: bool
    close: Callable[[], None]


def _image(rng: random.Random) -> bytes:
    """Data with a hole (zeros never written) in the middle."""
    data = bytearray(rng.randbytes(SIZE))
    data[SIZE // 4 : SIZE // 2] = bytes(SIZE // 4)
    return bytes(data)


def _fill(write: Callable[[int, bytes], None], image: bytes) -> None:
    for off in range(0, SIZE, 64 << 10):
        chunk = image[off : off + (64 << 10)]
        if any(chunk):
            write(off, chunk)


def _overwrite(vol: Any, rng: random.Random) -> None:
    for _ in range(64):
        off = rng.randrange(0, SIZE - (64 << 10))
        vol.write(off, rng.randbytes(rng.randrange(1, 64 << 10)))
    vol.write(SIZE // 4 + 8192, b"\x01" * 5000)  # into the hole: its blocks are preserved as zeros


@pytest.fixture(params=["file-device", "ram-device", "snapshot-file", "snapshot-ram", "writable-snapshot"])
def case(request: Any, tmp_path: Any) -> Iterator[Case]:
    rng = random.Random(request.param)
    image = _image(rng)
    kind = request.param
    if kind == "file-device":
        dev = open_file_device(str(tmp_path / "dev.img"), SIZE)
        _fill(dev.write, image)
        yield Case(dev, image, True, dev.close)
    elif kind == "ram-device":
        dev = ram_device(SIZE)
        _fill(dev.write, image)
        yield Case(dev, image, False, dev.close)
    else:
        if kind == "snapshot-ram":
            store = PreservationStore.in_memory(4 * SIZE)
            origin = ram_device(SIZE)
        else:
            store = PreservationStore.open(str(tmp_path / "store"), 4 * SIZE)
            origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
        vol = store.attach("vol", origin, block_size=BS)
        _fill(vol.write, image)
        snap = vol.create_snapshot("s", writable=kind == "writable-snapshot")
        _overwrite(vol, rng)
        if kind == "writable-snapshot":
            mine = rng.randbytes(3 * BS + 100)
            snap.write(BS * 7 + 50, mine)
            image = image[: BS * 7 + 50] + mine + image[BS * 7 + 50 + len(mine) :]
            _overwrite(vol, rng)

        def close() -> None:
            store.close()
            origin.close()

        yield Case(snap, image, False, close)


def test_plans_cover_the_range_and_read_as_the_device(case: Case) -> None:
    rng = random.Random(1)
    ranges = [(0, SIZE), (SIZE // 4, SIZE // 4), (SIZE // 4 - 100, 300)]
    ranges += [(o, rng.randrange(1, SIZE - o + 1)) for o in (rng.randrange(SIZE) for _ in range(40))]
    try:
        for offset, length in ranges:
            with case.device.read_plan(offset, length) as plan:
                assert plan.zero_copy is case.zero_copy
                assert plan.length == length
                buf = bytearray(length)
                plan.readinto(memoryview(buf))
            assert bytes(buf) == case.image[offset : offset + length], (offset, length)
            # Holes really read as zeros, and data pieces are where the device has them.
            pos = offset
            for piece in plan.pieces:
                if isinstance(piece, Hole):
                    assert not any(case.image[pos : pos + piece.length])
                pos += piece.length
    finally:
        case.close()


def test_a_plan_reports_holes_without_reading_them(tmp_path: Any) -> None:
    dev = open_file_device(str(tmp_path / "sparse.img"), SIZE)
    dev.write(SIZE // 2, b"x" * BS)
    with dev.read_plan(0, SIZE) as plan:
        kinds = [type(p) for p in plan.pieces]
    assert kinds == [Hole, FileRange, Hole]
    assert [p.length for p in plan.pieces] == [SIZE // 2, BS, SIZE // 2 - BS]
    dev.close()


def test_an_open_snapshot_plan_holds_off_origin_writes(tmp_path: Any) -> None:
    store = PreservationStore.open(str(tmp_path / "store"), 4 * SIZE)
    origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
    vol = store.attach("vol", origin, block_size=BS)
    vol.write(0, b"a" * SIZE)
    snap = vol.create_snapshot("s")
    plan = snap.read_plan(0, SIZE)
    assert plan.zero_copy is False  # the origin changes once the plan is closed: never by reference
    written = threading.Event()
    writers = waiting_writers(store.lock)
    writer = threading.Thread(target=lambda: (vol.write(0, b"b" * BS), written.set()), daemon=True)
    writer.start()
    assert writers.reach(1), "the origin write did not wait for the open plan"
    assert not written.is_set()
    buf = bytearray(SIZE)
    plan.readinto(memoryview(buf))  # the origin range the plan points at is still the frozen data
    assert buf == b"a" * SIZE
    plan.close()
    plan.close()  # idempotent
    writer.join(5)
    assert written.is_set()
    assert snap.read(0, BS) == b"a" * BS
    assert vol.read(0, BS) == b"b" * BS
    store.close()
    origin.close()


def test_a_plan_of_a_deleted_snapshot_cannot_be_made(tmp_path: Any) -> None:
    store = PreservationStore.in_memory(SIZE)
    vol = store.attach("vol", ram_device(SIZE), block_size=BS)
    snap = vol.create_snapshot("s")
    vol.delete_snapshot("s")
    with pytest.raises(UnknownSnapshot):
        snap.read_plan(0, BS)
    # The shared lock was not left held: writers go on.
    vol.write(0, b"x" * BS)
    store.close()


def test_bytes_pieces_read_into_buffers() -> None:
    plan = ReadPlan([Bytes(b"ab"), Hole(3), Bytes(memoryview(b"cd"))])
    buf = bytearray(b"?" * 7)
    plan.readinto(memoryview(buf))
    assert buf == b"ab\0\0\0cd"
    with pytest.raises(ValueError):
        plan.readinto(memoryview(bytearray(8)))


def test_plans_follow_changes_of_the_index_after_many_reads(tmp_path: Any) -> None:
    # Many reads make the snapshot cache where it reads from; writes must not be hidden by that cache.
    store = PreservationStore.open(str(tmp_path / "store"), 4 * SIZE)
    origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
    vol = store.attach("vol", origin, block_size=BS)
    vol.write(0, b"a" * SIZE)
    snap = vol.create_snapshot("s", writable=True)
    other = vol.create_snapshot("t")
    for round_no in range(3):
        for i in range(600):
            assert snap.read(i * BS % SIZE, BS) == (
                b"w" * BS if round_no == 2 and i * BS % SIZE == BS else b"a" * BS
            )
        vol.write(round_no * 3 * BS, b"b" * 3 * BS)  # preserved: now read from the store
        if round_no == 1:
            snap.write(BS, b"w" * BS)  # the snapshot's own block
    assert snap.read(0, 4 * BS) == b"a" * BS + b"w" * BS + b"a" * 2 * BS
    assert other.read(0, SIZE) == b"a" * SIZE
    vol.delete_snapshot("t")
    assert snap.read(0, 2 * BS) == b"a" * BS + b"w" * BS
    store.close()
    origin.close()

"""The NBD read path of the primary's exported volume (`primary.device.MirroredDevice`): READs are served
on the connection's thread from the volume's read plans, never through `read` in the worker pool; small
reads are copied, large ones sent by reference; what comes back is the volume's content."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from primary.bitmap import WriteIntentBitmap
from primary.device import MirroredDevice
from primary.generations import Generations
from primary.mirror import Mirror
from standbylib.blockdev import PLAN_HOLES_MIN, open_file_device
from standbylib.nbd import NbdServer
from standbylib.nbd.client import NbdClient
from standbylib.readplan import FileRange, Hole, PlanSource

MiB = 1 << 20
SIZE = 8 * MiB
BS = 4096


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[tuple[MirroredDevice, bytes]]:
    """A mirrored volume whose standby is never reached (reads do not involve the mirror)."""
    local = open_file_device(str(tmp_path / "vol0.img"), SIZE)
    image = bytearray(random.Random(5).randbytes(SIZE))
    image[SIZE // 2 : SIZE // 2 + MiB] = bytes(MiB)  # a hole, never written
    for off in range(0, SIZE, MiB):
        if any(image[off : off + MiB]):
            local.write(off, bytes(image[off : off + MiB]))
    bitmap = WriteIntentBitmap.open(str(tmp_path / "bitmap"), SIZE)
    mirror = Mirror("127.0.0.1:1", "vol0", SIZE, BS, bitmap, Generations(str(tmp_path / "gen")))
    dev = MirroredDevice("vol0", local, mirror)
    yield dev, bytes(image)
    dev.close()
    bitmap.close()


def test_the_mirrored_volume_offers_read_plans(volume: tuple[MirroredDevice, bytes]) -> None:
    dev, image = volume
    assert isinstance(dev, PlanSource)
    with dev.read_plan(BS, BS) as small:
        assert small.zero_copy and small.pieces == [FileRange(dev.device.raw.fd, BS, BS)]  # type: ignore[attr-defined]
    # From PLAN_HOLES_MIN on, a plan reports the file's holes.
    start = SIZE // 2 - PLAN_HOLES_MIN
    with dev.read_plan(start, 2 * PLAN_HOLES_MIN) as plan:
        assert [type(piece) for piece in plan.pieces] == [FileRange, Hole]
        buf = bytearray(2 * PLAN_HOLES_MIN)
        plan.readinto(memoryview(buf))
    assert bytes(buf) == image[start : start + 2 * PLAN_HOLES_MIN]


def test_nbd_reads_of_the_volume_never_use_read(
    volume: tuple[MirroredDevice, bytes], monkeypatch: Any
) -> None:
    dev, image = volume

    def no_read(offset: int, length: int) -> bytes:
        raise AssertionError("a READ went through MirroredDevice.read (the worker pool)")

    monkeypatch.setattr(dev, "read", no_read)
    rng = random.Random(6)
    with NbdServer({"vol0": dev}) as server:
        assert server.address is not None
        host, port = server.address
        with NbdClient.connect(host, port, "vol0", timeout=10) as client:
            assert client.read(0, SIZE) == image  # large reads: sent by reference, holes as hole chunks
            for _ in range(300):
                length = rng.choice([512, BS, 3 * BS, 64 << 10, 300 << 10])
                offset = rng.randrange(0, SIZE - length + 1)
                assert client.read(offset, length) == image[offset : offset + length], (offset, length)
            # A write, acknowledged, then read back through both paths.
            data = rng.randbytes(200 << 10)
            dev.write(SIZE // 2 - 4096, data)
            assert client.read(SIZE // 2 - 4096, len(data)) == data
            assert client.read(SIZE // 2, BS) == data[BS : 2 * BS]

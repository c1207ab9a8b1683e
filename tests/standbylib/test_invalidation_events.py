"""The store tells its `on_invalidated` listener of every invalidation, once, after it is durable.

The standby daemon logs ``snapshot_invalidated`` from it. Each test counts what the listener heard
and, from inside the listener, checks that a power loss at that moment keeps the invalidation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from faultfile import Disk, Replay
from storecheck import observe_reopened

from standbylib.blockdev import Device, ram_device
from standbylib.snapshot import PreservationStore

BS = 4096
SIZE = 32 * BS


class Rig:
    def __init__(self, capacity: int, on_invalidated: Callable[[str, str, str], None] | None = None) -> None:
        self.disk = Disk()
        self.origin = self.disk.file("origin", bytes(range(256)) * (SIZE // 256))
        self.store_raw = self.disk.file("store")
        self.heard: list[tuple[str, str, str]] = []
        self.durable: list[bool] = []
        self.store = PreservationStore.open_raw(
            self.store_raw, capacity, on_invalidated=on_invalidated or self.listen
        )
        self.vol = self.store.attach("vol", Device(self.origin, SIZE), block_size=BS)

    def listen(self, volume: str, snapshot: str, reason: str) -> None:
        self.heard.append((volume, snapshot, reason))
        images = Replay(self.disk).images(self.disk.now, "none")  # a power loss right now
        seen = observe_reopened(bytes(images["store"]), bytes(images["origin"]), "vol", BS)
        self.durable.append(seen["snapshots"][snapshot][0] is False)


def test_an_overflow_is_told_once_per_snapshot_after_it_is_durable() -> None:
    rig = Rig(capacity=3 * BS)
    for name in ("a", "b", "c"):
        rig.vol.create_snapshot(name)
    rig.vol.write_batch([(0, b"\x01" * 2 * BS)])  # 2 copies shared by the three snapshots
    rig.vol.write_batch([(8 * BS, b"\x02" * 2 * BS)])  # 2 more: the store is full
    assert [(v, s) for v, s, _ in rig.heard] == [("vol", "a"), ("vol", "b"), ("vol", "c")]
    assert all(r == "the preservation store is full" for _, _, r in rig.heard)
    assert rig.durable == [True, True, True]
    # Writes go on; nothing more to tell, not even when an invalid snapshot is deleted.
    rig.vol.write_batch([(16 * BS, b"\x03" * 4 * BS)])
    rig.vol.delete_snapshot("a")
    assert len(rig.heard) == 3


def test_a_snapshot_capacity_overflow_is_told_with_its_reason() -> None:
    rig = Rig(capacity=64 * BS)
    rig.vol.create_snapshot("small", capacity=BS)
    big = rig.vol.create_snapshot("big")
    rig.vol.write_batch([(0, b"\x01" * 2 * BS)])
    assert [(s, r) for _, s, r in rig.heard] == [("small", f"its capacity of {BS} bytes is exhausted")]
    assert rig.durable == [True] and big.valid


def test_a_listener_that_fails_cannot_fail_a_write() -> None:
    def broken(volume: str, snapshot: str, reason: str) -> None:
        raise RuntimeError("the listener is broken")

    rig = Rig(capacity=BS, on_invalidated=broken)
    snap = rig.vol.create_snapshot("s")
    rig.vol.write_batch([(0, b"\x01" * 2 * BS)])
    assert not snap.valid
    assert rig.vol.read(0, 2 * BS) == b"\x01" * 2 * BS


@pytest.mark.parametrize("how", ["in_memory", "open", "open_raw"])
def test_every_way_of_opening_a_store_takes_a_listener(how: str, tmp_path: Path) -> None:
    heard: list[tuple[str, str, str]] = []

    def listen(volume: str, snapshot: str, reason: str) -> None:
        heard.append((volume, snapshot, reason))

    if how == "in_memory":
        store = PreservationStore.in_memory(BS, on_invalidated=listen)
    elif how == "open":
        store = PreservationStore.open(f"{tmp_path}/p.store", BS, on_invalidated=listen)
    else:
        store = PreservationStore.open_raw(Disk().file("store"), BS, on_invalidated=listen)
    device = ram_device(SIZE)
    device.write(0, b"o" * SIZE)  # data: overwriting it needs copies (zeros would be hole entries)
    vol = store.attach("v", device, block_size=BS)
    vol.create_snapshot("s")
    vol.write_batch([(0, b"\x01" * 2 * BS)])
    assert heard == [("v", "s", "the preservation store is full")]
    store.close()

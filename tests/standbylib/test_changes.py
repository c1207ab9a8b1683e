"""The blocks changed between two snapshots, from the preservation index alone (`Volume.changes`): what an
incremental backup archives. Every block written between the two (data, zeroes, trims, rewrites with the
same bytes) is in it, nothing else is, and applying the newer snapshot's bytes there to the older image
gives the newer image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from standbylib.blockdev import open_file_device, ram_device
from standbylib.errors import InvalidArgument, SnapshotInvalid, UnknownSnapshot
from standbylib.snapshot import PreservationStore
from standbylib.snapshot.volume import block_extents

BS = 4096
NBLOCKS = 64
SIZE = NBLOCKS * BS

# One step of a history: ("write", first block, blocks, byte) | ("zero", first, blocks) | ("snap",)
# | ("delete", index among the snapshots taken so far)
step = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NBLOCKS - 1), st.integers(1, 6), st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, NBLOCKS - 1), st.integers(1, 6)),
    st.tuples(st.just("snap")),
    st.tuples(st.just("delete"), st.integers(0, 20)),
)


def blocks_of(extents: list[tuple[int, int]]) -> set[int]:
    return {b for offset, length in extents for b in range(offset // BS, (offset + length + BS - 1) // BS)}


@settings(max_examples=150, deadline=None)
@given(st.lists(step, min_size=1, max_size=40), st.integers(0, 2**32 - 1))
def test_changes_are_exactly_the_blocks_written_between_two_snapshots(
    history: list[tuple[object, ...]], seed: int
) -> None:
    store = PreservationStore.in_memory(64 * SIZE)
    device = ram_device(SIZE)
    rng = random.Random(seed)
    device.write(0, rng.randbytes(SIZE))
    vol = store.attach("vol0", device, block_size=BS)
    taken: list[str] = []  # names, oldest first (deleted ones stay in the list)
    at: dict[str, int] = {}  # live snapshot -> how many writes came before it
    writes: list[set[int]] = []  # the blocks of each write, in order
    images: dict[str, bytes] = {}
    for op in history:
        kind = op[0]
        if kind == "snap":
            name = f"s{len(taken)}"
            vol.create_snapshot(name)
            taken.append(name)
            at[name] = len(writes)
            images[name] = device.read(0, SIZE)
        elif kind == "delete":
            live = [n for n in taken if n in at]
            if live:
                name = live[int(op[1]) % len(live)]
                vol.delete_snapshot(name)
                del at[name], images[name]
        else:
            first, count = int(op[1]), int(op[2])
            count = min(count, NBLOCKS - first)
            if kind == "write":
                vol.write(first * BS, bytes([int(op[3])]) * (count * BS))
            else:
                vol.zero(first * BS, count * BS)
            writes.append(set(range(first, first + count)))
    live = [n for n in taken if n in at]
    for i, base in enumerate(live):
        for newer in live[i + 1 :]:
            changed = vol.changes(base, newer)
            want = set().union(*writes[at[base] : at[newer]])  # written after base, before newer
            assert blocks_of(changed) == want, (base, newer)
            # The older image with the newer snapshot's bytes at the changed extents is the newer image.
            image = bytearray(images[base])
            for offset, length in changed:
                image[offset : offset + length] = vol.snapshot(newer).read(offset, length)
            assert bytes(image) == images[newer]
            # Ordered, disjoint, merged.
            ends = [o + n for o, n in changed]
            assert all(ends[k] < changed[k + 1][0] for k in range(len(changed) - 1))


def test_changes_refuses_a_base_that_is_not_older_unknown_writable_or_invalid() -> None:
    store = PreservationStore.in_memory(2 * BS, on_full="invalidate")
    device = ram_device(SIZE)
    device.write(0, b"o" * SIZE)  # data: overwriting it needs copies (zeros would be hole entries)
    vol = store.attach("vol0", device, block_size=BS)
    vol.create_snapshot("a")
    vol.write(0, b"x" * BS)
    vol.create_snapshot("b")
    assert vol.changes("a", "b") == [(0, BS)]
    with pytest.raises(InvalidArgument, match="not older"):
        vol.changes("b", "a")
    with pytest.raises(InvalidArgument, match="not older"):
        vol.changes("a", "a")
    with pytest.raises(UnknownSnapshot):
        vol.changes("a", "nope")
    vol.create_snapshot("w", writable=True)
    with pytest.raises(InvalidArgument, match="writable"):
        vol.changes("a", "w")
    # Overflowing the store's two blocks invalidates the snapshots that needed more copies.
    vol.write(BS, b"y" * (4 * BS))
    assert not vol.snapshot("b").valid
    with pytest.raises(SnapshotInvalid):
        vol.changes("a", "b")


def test_changes_cost_follows_the_changed_blocks_not_the_volume(tmp_path: Path) -> None:
    """A 1 TiB sparse volume file: the changes are found from the index, without touching the volume."""
    size = 1 << 40
    store = PreservationStore.in_memory(1 << 20)
    vol = store.attach("big", open_file_device(str(tmp_path / "big.img"), size), block_size=BS)
    vol.create_snapshot("a")
    vol.write(size - BS, b"z" * BS)
    vol.write(BS * 10, b"z" * (3 * BS))
    vol.create_snapshot("b")
    assert vol.changes("a", "b") == [(10 * BS, 3 * BS), (size - BS, BS)]


def test_block_extents_merges_consecutive_blocks_and_clips_the_last() -> None:
    blocks = np.array([0, 1, 2, 5, 7, 8], np.uint64)
    assert block_extents(blocks, BS, 9 * BS - 100) == [(0, 3 * BS), (5 * BS, BS), (7 * BS, 2 * BS - 100)]
    assert block_extents(np.empty(0, np.uint64), BS, SIZE) == []

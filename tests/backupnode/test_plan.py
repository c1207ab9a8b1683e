"""What an incremental reads (`backupnode.plan`): its changes grouped into few block-status requests,
then split exactly into ranges to read and ranges that read as zeros."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from backupnode.plan import MAX_WINDOWS, WINDOW_GAP, split_changes, windows
from standbylib.nbd import Extent
from standbylib.nbd import protocol as p

BS = 4096
SIZE = 1 << 40  # a 1 TiB volume


@st.composite
def change_lists(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Ordered, disjoint, non-adjacent changes of whole blocks, gaps from one block to many GiB."""
    out: list[tuple[int, int]] = []
    pos = draw(st.integers(0, 1 << 20)) * BS
    for _ in range(draw(st.integers(0, 300))):
        length = draw(st.integers(1, 64)) * BS
        if pos + length > SIZE:
            break
        out.append((pos, length))
        pos += length + draw(st.sampled_from([BS, 64 * 1024, WINDOW_GAP - BS, WINDOW_GAP, 1 << 30]))
    return out


@settings(max_examples=200, deadline=None)
@given(change_lists())
def test_windows_partition_the_changes_in_few_requests(changes: list[tuple[int, int]]) -> None:
    groups = list(windows(changes))
    assert [c for _s, _e, g in groups for c in g] == changes, "every change once, in order"
    assert len(groups) <= MAX_WINDOWS
    for start, end, group in groups:
        assert (start, end) == (group[0][0], group[-1][0] + group[-1][1])
    # Changes closer than the gap are never split apart.
    for (_s, end, _g1), (start, _e, _g2) in itertools.pairwise(groups):
        assert start - end >= WINDOW_GAP, (end, start)


class Map:
    """Block status of a volume described as runs (length, reads as zeros); counts the requests."""

    def __init__(self, runs: list[tuple[int, bool]]) -> None:
        self.runs = runs
        self.size = sum(n for n, _ in runs)
        self.requests = 0

    def extents(self, offset: int, length: int) -> list[Extent]:
        self.requests += 1
        out: list[Extent] = []
        pos = 0
        for n, zero in self.runs:
            a, b = max(pos, offset), min(pos + n, offset + length)
            if a < b:
                out.append(Extent(b - a, (p.STATE_HOLE | p.STATE_ZERO) if zero else 0))
            pos += n
        return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=40), st.data())
def test_split_reads_exactly_the_changed_data_and_records_the_zeroed_changes(
    runs: list[tuple[int, bool]], data: st.DataObject
) -> None:
    volume = Map([(n * BS, zero) for n, zero in runs])
    blocks = volume.size // BS
    changed = sorted(set(data.draw(st.lists(st.integers(0, blocks - 1), max_size=blocks))))
    changes: list[tuple[int, int]] = []
    for b in changed:
        if changes and changes[-1][0] + changes[-1][1] == b * BS:
            changes[-1] = (changes[-1][0], changes[-1][1] + BS)
        else:
            changes.append((b * BS, BS))
    read, zeros = split_changes(volume, changes)
    zero_blocks = set()
    pos = 0
    for n, zero in volume.runs:
        if zero:
            zero_blocks.update(range(pos // BS, (pos + n) // BS))
        pos += n

    def blocks_of(extents: list[tuple[int, int]]) -> set[int]:
        return {b for o, n in extents for b in range(o // BS, (o + n) // BS)}

    assert blocks_of(read) == set(changed) - zero_blocks
    assert blocks_of(zeros) == set(changed) & zero_blocks
    assert volume.requests <= MAX_WINDOWS * 2


def test_scattered_changes_over_a_large_volume_cost_few_requests() -> None:
    """10 MiB of 4 KiB changes spread over 16 GiB: a few dozen requests, not one per change."""
    volume = Map([(16 << 30, False)])
    changes = [(i * (16 << 30) // 2560 // BS * BS, BS) for i in range(2560)]
    read, zeros = split_changes(volume, changes)
    assert read == changes and zeros == []
    assert volume.requests <= MAX_WINDOWS

"""What a backup reads: the extents of a full archive, and the split of an incremental's changes.

A full archive holds the snapshot's data extents, as NBD block status (``base:allocation``) reports
them: holes are skipped. An incremental archive holds the ranges the standby reports as changed since
the base snapshot (`SnapshotChanges`, from its preservation index): those that read as zeros in the
new snapshot (trimmed, zeroed, or holes) are recorded as zeroed and not read; the rest is read. Block
status is asked once per *window* of changes (changes less than `WINDOW_GAP` apart share one, and
there are at most `MAX_WINDOWS`), so thousands of scattered 4 KiB changes cost a few dozen requests
however large the volume, and the standby's cost of each follows the extents it reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from standbylib.nbd import Extent

Extents = list[tuple[int, int]]

#: Changes closer than this share one block-status request.
WINDOW_GAP = 4 << 20
#: At most this many block-status requests for an incremental's changes.
MAX_WINDOWS = 64


class Mapper(Protocol):
    """What the plan needs of an NBD client: block status of a range."""

    @property
    def size(self) -> int: ...

    def extents(self, offset: int, length: int) -> list[Extent]: ...


def append(out: Extents, offset: int, length: int) -> None:
    """Add [offset, +length) to the ordered `out`, merged with the last extent when they touch."""
    if out and out[-1][0] + out[-1][1] == offset:
        out[-1] = (out[-1][0], out[-1][1] + length)
    else:
        out.append((offset, length))


def data_extents(client: Mapper) -> Extents:
    """The whole image's data extents (offset, length), adjacent ones merged: a full archive's."""
    out: Extents = []
    pos = 0
    for ext in client.extents(0, client.size):
        if not ext.is_hole:
            append(out, pos, ext.length)
        pos += ext.length
    return out


def windows(
    changes: Extents, gap: int = WINDOW_GAP, most: int = MAX_WINDOWS
) -> Iterator[tuple[int, int, Extents]]:
    """The changes grouped: (start, end, the changes in [start, end)). Changes less than `gap` apart
    share a group, and there are at most `most` groups (split at the widest gaps): each group is one
    block-status request, whose cost on the standby follows the extents it reports, while the cost of a
    request itself is a round trip. Scattered changes over a large volume thus cost `most` round trips,
    not one per change."""
    if not changes:
        return
    gaps = [(changes[i + 1][0] - (changes[i][0] + changes[i][1]), i) for i in range(len(changes) - 1)]
    wide = sorted((g for g in gaps if g[0] >= gap), reverse=True)[: most - 1]
    cuts = sorted(i for _g, i in wide)
    first = 0
    for i in [*cuts, len(changes) - 1]:
        group = changes[first : i + 1]
        yield group[0][0], group[-1][0] + group[-1][1], group
        first = i + 1


def _runs(start: int, extents: Iterable[Extent]) -> Iterator[tuple[int, int, bool]]:
    """Block status as absolute runs: (offset, end, reads as zeros)."""
    pos = start
    for ext in extents:
        yield pos, pos + ext.length, ext.is_hole or ext.is_zero
        pos += ext.length


def split_changes(client: Mapper, changes: Extents) -> tuple[Extents, Extents]:
    """The changed ranges split by the new snapshot's block status: (those to read, those that read as
    zeros), each ordered and merged."""
    data: Extents = []
    zeros: Extents = []
    for start, end, group in windows(changes):
        runs = list(_runs(start, client.extents(start, end - start)))
        i = 0
        for offset, length in group:
            pos, stop = offset, offset + length
            while pos < stop:
                while runs[i][1] <= pos:
                    i += 1
                run_end = min(runs[i][1], stop)
                append(zeros if runs[i][2] else data, pos, run_end - pos)
                pos = run_end
    return data, zeros

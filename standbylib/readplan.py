"""Read plans: where the bytes of a device range come from, so a server can move them without detours.

A device with the optional `PlanSource` capability answers ``read_plan(offset, length)`` with a
`ReadPlan`: the range as consecutive pieces, each a `Hole` (reads as zeros), a `FileRange` (bytes of
an open file, read with ``preadv`` or sent with ``sendfile``) or `Bytes` (already in memory). The NBD
server copies file ranges straight into its own reused, page-aligned reply buffer (no ``bytes``
objects), sends holes as hole chunks, and sends everything with one ``sendmsg``.

Consistency: while a plan is open (until `ReadPlan.close`, or the end of its ``with`` block) the pieces
describe exactly the device's content, e.g. a snapshot's frozen image even while its origin is being
overwritten. After the plan is closed the file ranges may change, so their bytes must be copied
before closing; only a plan with ``zero_copy`` set allows a consumer to hand the file pages to the
kernel by reference (``sendfile``), whose socket buffers keep referring to the page cache until the
peer has read them: a later overwrite of the file shows in data "already sent" (measured on Linux
6.18 over loopback). That is harmless for a plain file device, whose writers are NBD clients that
wait for a read's reply before depending on it, and wrong for a snapshot, whose origin is overwritten
by replication at any time; snapshots therefore never set ``zero_copy``.

This module sits below `standbylib.blockdev`, the engine and the NBD server, so that devices can
implement the capability without importing the server.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

from standbylib.rawfile import Buffer

_ZEROS = bytes(1 << 20)


class Hole(NamedTuple):
    """`length` bytes that read as zeros."""

    length: int


class FileRange(NamedTuple):
    """`length` bytes of the open file `fd` at `offset`; past the end of the file they read as zeros."""

    fd: int
    offset: int
    length: int


class Bytes(NamedTuple):
    """Bytes already in memory (owned by the plan: they do not change)."""

    data: Buffer

    @property
    def length(self) -> int:
        return len(self.data)


Piece = Hole | FileRange | Bytes


class ReadPlan:
    """The pieces of one device range, in order; a context manager that releases what backs them.

    `pieces` cover the range exactly. `zero_copy`: file ranges may be sent by reference (``sendfile``)
    while the plan is open, see the module docstring; otherwise they must be copied before `close`.
    `release` is called once by `close` (e.g. to drop a snapshot's read lock). Not thread-safe: one
    consumer per plan.
    """

    __slots__ = ("_release", "pieces", "zero_copy")

    def __init__(
        self, pieces: list[Piece], *, zero_copy: bool = False, release: Callable[[], None] | None = None
    ) -> None:
        self.pieces = pieces
        self.zero_copy = zero_copy
        self._release = release

    @property
    def length(self) -> int:
        return sum(p.length for p in self.pieces)

    def close(self) -> None:
        """Release what keeps the pieces valid; idempotent."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> ReadPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def readinto(self, view: memoryview) -> None:
        """Copy the whole range into `view` (exactly `length` bytes), holes as zeros."""
        pos = 0
        for piece in self.pieces:
            n = piece.length
            if isinstance(piece, FileRange):
                pread_full(piece.fd, view[pos : pos + n], piece.offset)
            elif isinstance(piece, Bytes):
                view[pos : pos + n] = piece.data
            else:
                zero_fill(view[pos : pos + n])
            pos += n
        if pos != len(view):
            raise ValueError(f"plan covers {pos} bytes, buffer has {len(view)}")


@runtime_checkable
class PlanSource(Protocol):
    """Optional device capability: ``read_plan(offset, length)`` -> an open `ReadPlan` of the range.

    Raises what ``read`` raises for a bad range or an unusable device. The caller must close the plan
    (it may hold a lock that writers of the device wait for), and should do so promptly.
    """

    def read_plan(self, offset: int, length: int) -> ReadPlan: ...


def pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` from `fd` at `offset`; what lies past the end of the file reads as zeros."""
    done, total = 0, len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            zero_fill(view[done:])
            return
        done += n


def zero_fill(view: memoryview) -> None:
    step = len(_ZEROS)
    for start in range(0, len(view), step):
        end = min(start + step, len(view))
        view[start:end] = _ZEROS[: end - start]

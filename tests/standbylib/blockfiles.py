"""Support of the tests (no tests here): devices and sparse files as the tests handle them.

`ForwardingDevice` passes a device's calls to another one, for a test to change one behaviour (a flush
that waits, extents that report holes, no read plans). `data_extents` is where a file holds data, as the
filesystem reports it (SEEK_DATA / SEEK_HOLE), not as the code under test says; the role and end-to-end
suites use it too (their conftest puts this folder on the import path).
"""

from __future__ import annotations

import os
from typing import Any

from standbylib.blockdev import Device


class ForwardingDevice:
    """A block device that passes reads, writes, zeroes and flushes to `inner`. It has neither of the
    optional device methods (``read_plan``, ``extents``): a subclass adds those it wants. `close` closes
    `inner` too unless the subclass sets `closes_inner` False (the test closes it)."""

    closes_inner = True

    def __init__(self, inner: Device) -> None:
        self.inner = inner
        self.size = inner.size
        self.readonly = inner.readonly

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def write(self, offset: int, data: Any) -> None:
        self.inner.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.inner.zero(offset, length)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        if self.closes_inner:
            self.inner.close()


def data_extents(path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The ``(start, end)`` byte ranges of the file at `path` that hold data, in order (SEEK_DATA /
    SEEK_HOLE); everything else is a hole."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after `pos`
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out

"""The primary's exported device: the local volume, with every change mirrored in order.

`MirroredDevice` is a `BlockDevice`, so the NBD server serves it like any other. A write is applied to
the local volume and queued on the `Mirror` under one lock, so the standby receives writes in exactly
the order they hit the local volume (overlapping writes included). In ``sync`` mode the call returns
only once the standby acknowledged the batch holding it (DRBD protocol C).

The standby applies whole blocks: a write that does not cover whole blocks is mirrored as the aligned
blocks it touches, read back from the local volume under the same lock. A write of zeros, a trim or a
write-zeroes is mirrored as a zeroed range, which the standby keeps sparse.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from primary.mirror import Mirror
from standbylib.blockdev import Device, check_range
from standbylib.rawfile import Buffer

_ZEROS = bytes(1 << 20)


class WriteMetrics(Protocol):
    def write_done(self, volume: str, seconds: float, nbytes: int) -> None: ...


class NullWriteMetrics:
    def write_done(self, volume: str, seconds: float, nbytes: int) -> None:
        pass


def is_zero(data: Buffer) -> bool:
    """True when every byte of `data` is zero (compared a MiB at a time against a zero buffer)."""
    view = memoryview(data).cast("B")
    if not view or view[0] or view[-1]:
        return not view
    step = len(_ZEROS)
    for start in range(0, len(view), step):
        chunk = view[start : start + step]
        if chunk != _ZEROS[: len(chunk)]:
            return False
    return True


class MirroredDevice:
    """The local `device` exported as volume `name`; changes go to `mirror`."""

    def __init__(
        self, name: str, device: Device, mirror: Mirror, *, metrics: WriteMetrics | None = None
    ) -> None:
        self.name = name
        self.device = device
        self.mirror = mirror
        self.block_size = mirror.block_size
        self.metrics: WriteMetrics = metrics or NullWriteMetrics()
        self._order = threading.Lock()

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def readonly(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        return self.device.read(offset, length)

    def readinto(self, offset: int, buf: memoryview) -> None:
        self.device.readinto(offset, buf)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return self.device.extents(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        check_range(offset, len(data), self.size)
        start = time.perf_counter()
        with self._order:
            self.device.write(offset, data)
            op = self._mirror_range(offset, len(data), data)
        self.mirror.wait(op)
        self.metrics.write_done(self.name, time.perf_counter() - start, len(data))

    def zero(self, offset: int, length: int) -> None:
        check_range(offset, length, self.size)
        start = time.perf_counter()
        with self._order:
            self.device.zero(offset, length)
            op = self._mirror_range(offset, length, None)
        self.mirror.wait(op)
        self.metrics.write_done(self.name, time.perf_counter() - start, length)

    def flush(self) -> None:
        """Local fdatasync, then a barrier the standby acknowledges once replica and store are durable."""
        self.device.flush()
        self.mirror.wait(self.mirror.submit_barrier())

    def close(self) -> None:
        self.device.close()

    def _mirror_range(self, offset: int, length: int, data: Buffer | None) -> int:
        """Queue the change of ``[offset, offset+length)`` (already applied locally); the last op number.

        Called under the order lock, so reading back partial blocks sees exactly this write's result.
        """
        bs = self.block_size
        first = offset - offset % bs
        end = -(-(offset + length) // bs) * bs
        if data is not None and first == offset and end == offset + length:
            payload = bytes(data) if not isinstance(data, bytes) else data
            if is_zero(payload):
                return self.mirror.submit_zero(offset, length)
            return self.mirror.submit_write(offset, payload)
        if data is None:
            # Zeroed range: the whole blocks inside travel as a zeroed range, partial edge blocks as data.
            inner_first = -(-offset // bs) * bs
            inner_end = (offset + length) // bs * bs
            op = 0
            if inner_end > inner_first:
                op = self.mirror.submit_zero(inner_first, inner_end - inner_first)
            edges = set()
            if offset != first:
                edges.add(first)
            if offset + length != end:
                edges.add(end - bs)
            for block in sorted(edges):
                op = self.mirror.submit_write(block, self.device.read(block, bs))
            return op
        payload = self.device.read(first, end - first)
        if is_zero(payload):
            return self.mirror.submit_zero(first, end - first)
        return self.mirror.submit_write(first, payload)

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
from collections.abc import Callable
from typing import Protocol

from primary.mirror import Finisher, Mirror, WritesFenced
from standbylib.blockdev import Device, check_range
from standbylib.rawfile import Buffer, is_zero
from standbylib.readplan import ReadPlan


class WriteMetrics(Protocol):
    def write_done(self, volume: str, seconds: float, nbytes: int) -> None: ...


class NullWriteMetrics:
    def write_done(self, volume: str, seconds: float, nbytes: int) -> None:
        pass


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
        mirror.attach(self._order, device.read, self._is_hole, device)

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

    def read_plan(self, offset: int, length: int) -> ReadPlan:
        """The local volume's read plan (`standbylib.readplan`): the NBD server serves READs from it on
        the connection's thread, sent from the page cache (``zero_copy``).

        No lock: a read that races a write of the same range may return the old data, the new, or a
        mix of both, as on any disk; a client that depends on a read waits for its reply before
        writing, so sending the file's pages by reference is safe (readplan's docstring). Writes
        only come from this device's `write` and `zero`."""
        return self.device.read_plan(offset, length)

    def _is_hole(self, offset: int, length: int) -> bool:
        runs = self.device.extents(offset, length)
        return len(runs) == 1 and runs[0][1]

    def write(self, offset: int, data: Buffer) -> None:
        check_range(offset, len(data), self.size)
        self.mirror.check_writable()
        start = time.perf_counter()
        first, end = self._aligned(offset, len(data))
        self.mirror.mark(first, end - first)  # durable in the bitmap before the write
        with self._order:
            tracked = self.mirror.begin(first, end - first)
            with self.mirror.failing(first, end - first, tracked):
                self.device.write(offset, data)
            op = self._mirror_range(offset, len(data), data, tracked)
        self.mirror.wait(op)
        self.mirror.check_writable()  # fenced while it waited: not on the standby, and will not be
        self.metrics.write_done(self.name, time.perf_counter() - start, len(data))

    def write_async(
        self, offset: int, data: Buffer, done: Callable[..., Finisher], more: bool = False
    ) -> bool:
        """`write` without blocking the caller: `done` is called once the write is acknowledged as the
        mode asks (maybe before this returns); what it returns is a `Mirror.when_done` finisher. False,
        with nothing done, when the write would have to wait for a bitmap sync: then the caller uses
        `write` (in a thread that may block).

        With `more` (the caller has further requests at hand) the mirrored write is queued but not
        sent: the burst's writes share a batch, sent by `send_pending` (or the next acknowledgement).

        The local write itself happens before this returns, under the order lock; errors raise."""
        check_range(offset, len(data), self.size)
        self.mirror.check_writable()
        start = time.perf_counter()
        first, end = self._aligned(offset, len(data))
        if not self.mirror.try_mark(first, end - first):
            return False
        with self._order:
            tracked = self.mirror.begin(first, end - first)
            try:
                self.device.write(offset, data)
            except BaseException:
                self.mirror.failed(first, end - first, tracked)
                raise
            op = self._mirror_range(offset, len(data), data, tracked, send=not more)
        nbytes = len(data)

        def finished() -> Finisher:
            self.metrics.write_done(self.name, time.perf_counter() - start, nbytes)
            try:
                self.mirror.check_writable()  # fenced meanwhile: not on the standby, and never will be
            except WritesFenced as e:
                return done(e)
            return done()

        self.mirror.when_done(op, finished)
        return True

    def zero(self, offset: int, length: int) -> None:
        check_range(offset, length, self.size)
        self.mirror.check_writable()
        start = time.perf_counter()
        first, end = self._aligned(offset, length)
        self.mirror.mark(first, end - first)
        with self._order:
            tracked = self.mirror.begin(first, end - first)
            with self.mirror.failing(first, end - first, tracked):
                self.device.zero(offset, length)
            op = self._mirror_range(offset, length, None, tracked)
        self.mirror.wait(op)
        self.mirror.check_writable()
        self.metrics.write_done(self.name, time.perf_counter() - start, length)

    def flush(self) -> None:
        """A barrier the standby acknowledges once replica and store are durable, and meanwhile the
        local fdatasync: the two syncs overlap instead of adding up."""
        barrier = self.mirror.submit_barrier()
        self.device.flush()
        self.mirror.wait(barrier, mode="sync")

    def close(self) -> None:
        self.device.close()

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.block_size
        return offset - offset % bs, -(-(offset + length) // bs) * bs

    def send_pending(self) -> None:
        """Send the mirrored writes `write_async` held back for a burst."""
        self.mirror.send_pending()

    def _mirror_range(
        self, offset: int, length: int, data: Buffer | None, tracked: bool, *, send: bool = True
    ) -> int:
        """Queue the change of ``[offset, offset+length)`` (already applied locally); the last op number.

        Called under the order lock, so reading back partial blocks sees exactly this write's result.
        The ops cover whole blocks; the last one releases the aligned range `begin` marked.
        """
        if not tracked:
            return 0  # written while the standby is away: the bitmap alone records it
        bs = self.block_size
        first, end = self._aligned(offset, length)
        span = (first, end - first)
        m = self.mirror
        if data is None:
            # Zeroed range: the whole blocks inside travel as a zeroed range, partial edge blocks as data.
            inner_first = -(-offset // bs) * bs
            inner_end = (offset + length) // bs * bs
            if inner_end > inner_first:
                if inner_first > first:
                    m.submit_write(first, self.device.read(first, inner_first - first), send=send)
                if end > inner_end:
                    m.submit_zero(inner_first, inner_end - inner_first, send=send)
                    return m.submit_write(
                        inner_end, self.device.read(inner_end, end - inner_end), span, send=send
                    )
                return m.submit_zero(inner_first, inner_end - inner_first, span, send=send)
            payload: Buffer = self.device.read(first, end - first)
        elif first == offset and end == offset + length:
            payload = data
        else:
            payload = self.device.read(first, end - first)
        if is_zero(payload):
            return m.submit_zero(first, end - first, span, send=send)
        # A bytes or bytearray payload is the caller's own (the NBD server hands it over): no copy.
        if not isinstance(payload, (bytes, bytearray)):
            payload = bytes(payload)
        return m.submit_write(first, payload, span, send=send)

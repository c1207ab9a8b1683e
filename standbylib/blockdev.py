"""Block devices: one interface over a file, RAM, and (in the engine) volumes and snapshots.

Every device is byte-addressed: ``read(offset, length)`` and ``write(offset,
data)`` accept any in-range request; devices with an internal block size
(volumes, snapshots) align and read-modify-write inside. Range checks live here,
in `check_range`, so every implementation rejects the same bad requests with
the same exceptions before touching anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Protocol, runtime_checkable

from standbylib.errors import (
    DeviceBusy,
    DeviceError,
    InvalidArgument,
    InvalidBlockSize,
    InvalidLength,
    OutOfRange,
    ReadOnly,
)
from standbylib.rawfile import Buffer, MemFile, OsFile, RawFile
from standbylib.readplan import Bytes, FileRange, Hole, Piece, ReadPlan

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 4096
#: Shortest range whose read plan (`Device.read_plan`) reports the file's holes.
PLAN_HOLES_MIN = 64 << 10


def check_block_size(block_size: int) -> int:
    """Return `block_size` if it is a power of two from 512 B to 1 MiB, else raise InvalidBlockSize."""
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise InvalidBlockSize(block_size=block_size)
    return block_size


def check_range(offset: int, length: int, size: int) -> None:
    """Reject negative, zero-length and out-of-range requests on a device of `size` bytes."""
    if length <= 0:
        raise InvalidLength(length=length)
    if offset < 0 or offset + length > size:
        raise OutOfRange(offset=offset, length=length, size=size)


@runtime_checkable
class BlockDevice(Protocol):
    """What every device offers. Methods are safe to call from several threads."""

    @property
    def size(self) -> int:
        """Size in bytes."""
        ...

    @property
    def readonly(self) -> bool: ...

    def read(self, offset: int, length: int) -> bytes:
        """Return `length` bytes at `offset`."""
        ...

    def write(self, offset: int, data: Buffer) -> None:
        """Write `data` at `offset`. Durable only after `flush`."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make a range read as zeros, deallocating it where the backend can."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def close(self) -> None: ...


class Device:
    """A plain device over a `RawFile`: a (sparse) file, a block device, or RAM."""

    def __init__(self, raw: RawFile, size: int, *, readonly: bool = False) -> None:
        if size <= 0:
            raise InvalidArgument(detail=f"device size {size} must be greater than 0")
        self.raw = raw
        self._size = size
        self._readonly = readonly

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def path(self) -> str:
        return self.raw.path

    def read(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self._size)
        return self.raw.pread(length, offset)

    def readinto(self, offset: int, buf: memoryview) -> None:
        check_range(offset, len(buf), self._size)
        self.raw.preadinto(buf, offset)

    def write(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        check_range(offset, len(data), self._size)
        self.raw.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self._check_writable()
        check_range(offset, length, self._size)
        self.raw.punch(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Consecutive ``(length, is_hole)`` runs covering the range; holes read as zeros."""
        check_range(offset, length, self._size)
        return self.raw.extents(offset, length)

    def read_plan(self, offset: int, length: int) -> ReadPlan:
        """The range as holes and ranges of the file (`standbylib.readplan`), with ``zero_copy`` set.

        Zero copy is safe here because the bytes only change when someone writes this device, and
        an NBD client depending on a read waits for its reply before writing. Nothing is locked.

        A range shorter than `PLAN_HOLES_MIN` is one file range: asking the filesystem where its
        holes are (``lseek``) costs as much as reading it (4 KiB reads from the page cache), and
        sending a small hole as zeros costs little.
        """
        check_range(offset, length, self._size)
        raw = self.raw
        if not isinstance(raw, OsFile):
            return ReadPlan([Bytes(raw.pread(length, offset))])
        pieces: list[Piece]
        if length < PLAN_HOLES_MIN:
            pieces = [FileRange(raw.fd, offset, length)]
        else:
            pieces = []
            pos = offset
            for run, hole in raw.extents(offset, length):
                pieces.append(Hole(run) if hole else FileRange(raw.fd, pos, run))
                pos += run
        raw.counters.reads += 1
        raw.counters.bytes_read += length
        return ReadPlan(pieces, zero_copy=True)

    def flush(self) -> None:
        if not self._readonly:
            self.raw.sync()

    def close(self) -> None:
        self.raw.close()

    def _check_writable(self) -> None:
        if self._readonly:
            raise ReadOnly(what=f"device {self.raw.path}")


def open_file_device(
    path: str, size: int | None = None, *, readonly: bool = False, exclusive: bool = False
) -> Device:
    """Open the file or block device at `path`.

    With `size` given and no file at `path`, a sparse file of that size is
    created. With `size` given and a smaller regular file, the file is grown
    (sparsely). Without `size`, the device's current size is used.

    With `exclusive`, an exclusive advisory lock (flock) is taken on the open file and held until it
    is closed: the primary agent and the standby daemon both take it, so neither opens a volume the
    other is writing. Raises `DeviceBusy` when another open file holds it.
    """
    exists = os.path.exists(path)
    if not exists and size is None:
        raise DeviceError(path=path, detail="no such file; give a size to create it")
    raw = OsFile(path, create=not exists, readonly=readonly)
    if exclusive:
        try:
            fcntl.flock(raw.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raw.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DeviceBusy(path=path) from e
            raise DeviceError(path=path, detail=f"lock: {e.strerror}") from e
    current = raw.size()
    if size is None:
        size = current
    elif current < size:
        if readonly:
            raw.close()
            raise DeviceError(path=path, detail=f"has {current} bytes, {size} asked")
        if os.path.isfile(path):
            raw.truncate(size)
        else:
            raw.close()
            raise DeviceError(path=path, detail=f"block device has {current} bytes, {size} asked")
    if size <= 0:
        raw.close()
        raise DeviceError(path=path, detail="device is empty; give a size")
    return Device(raw, size, readonly=readonly)


def ram_device(size: int) -> Device:
    """A device held in RAM (contents lost when the process ends)."""
    if size <= 0:
        raise InvalidArgument(detail=f"device size {size} must be greater than 0")
    return Device(MemFile(bytes(size)), size)

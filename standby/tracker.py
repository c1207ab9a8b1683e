"""What a promoted volume must send back: the regions written while it was promoted (or changed by the
rollback of `promote --at`), tracked in a persistent bitmap until the old primary has pulled them.

`ChangeTracker` is that bitmap: ``failback/VOLUME.bitmap`` in the data directory, one bit per region of
`granularity` bytes (the volume's block size, or a larger power of two so the bitmap stays within
`MAX_BITS`). A region is marked durably (written and synced) *before* the write that changes it reaches
the volume, so a power cut never loses a tracked block; marking a region already marked costs nothing.

`TrackedExport` is the read-write NBD export of a promoted volume: every write, zero and trim marks the
tracker first. `retire` (at `demote`) ends it: a client still connected gets an error for every later
request (EPERM for writes), so nothing changes the volume behind the failback's back.
"""

from __future__ import annotations

import os
import struct
import threading

import numpy as np

from standbylib.blockdev import check_range
from standbylib.errors import DeviceError, ReadOnly, StandbyError
from standbylib.rawfile import Buffer, fsync_directory
from standbylib.snapshot.volume import Volume

MAGIC = b"SBTRACK1"
HEADER = struct.Struct("<8sQI")  # magic, volume size, granularity
HEADER_SIZE = 64
#: At most this many bits (an 8 MiB bitmap): bigger volumes get coarser regions.
MAX_BITS = 1 << 26
DIR = "failback"


def granularity_for(size: int, block_size: int) -> int:
    """The region size of a tracker for a volume of `size` bytes in blocks of `block_size`."""
    granularity = block_size
    while -(-size // granularity) > MAX_BITS:
        granularity *= 2
    return granularity


class ChangeTracker:
    """The regions of a volume of `size` bytes changed since tracking began, persisted at `path`."""

    def __init__(self, path: str, size: int, granularity: int, bits: bytearray, fd: int) -> None:
        self.path = path
        self.size = size
        self.granularity = granularity
        self._bits = bits
        self._fd = fd
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: str, size: int, block_size: int) -> ChangeTracker:
        """A new, empty tracker at `path` (durable when this returns)."""
        granularity = granularity_for(size, block_size)
        nbits = -(-size // granularity)
        bits = bytearray(-(-nbits // 8))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        work = path + ".new"
        fd = os.open(work, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, HEADER.pack(MAGIC, size, granularity).ljust(HEADER_SIZE, b"\0") + bits, 0)
            os.fsync(fd)
            os.replace(work, path)
            fsync_directory(os.path.dirname(path))
        except OSError as e:
            os.close(fd)
            raise DeviceError(path=path, detail=f"cannot create the failback tracker: {e.strerror}") from e
        return cls(path, size, granularity, bits, fd)

    @classmethod
    def open(cls, path: str, size: int) -> ChangeTracker:
        """The tracker saved at `path` for a volume of `size` bytes."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(path=path, detail=f"cannot open the failback tracker: {e.strerror}") from e
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            magic, saved_size, granularity = HEADER.unpack_from(data)
            if magic != MAGIC or saved_size != size or granularity <= 0:
                raise StandbyError(
                    detail=f"{path} is not the failback tracker of a volume of {size} bytes "
                    f"(magic {magic!r}, size {saved_size})"
                )
            nbits = -(-size // granularity)
            bits = bytearray(data[HEADER_SIZE : HEADER_SIZE + -(-nbits // 8)])
            if len(bits) * 8 < nbits:
                raise StandbyError(detail=f"{path} is cut short ({len(data)} bytes)")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, size, granularity, bits, fd)

    def mark(self, offset: int, length: int) -> None:
        """Mark `[offset, offset+length)` durably; returns at once when it is marked already."""
        self.mark_extents([(offset, length)])

    def mark_extents(self, extents: list[tuple[int, int]]) -> None:
        """Mark every ``(offset, length)`` of `extents` durably, with one write and one sync at most."""
        g = self.granularity
        with self._lock:
            bits = self._bits
            changed_lo, changed_hi = len(bits), -1
            for offset, length in extents:
                if length <= 0:
                    continue
                for i in range(offset // g, (min(offset + length, self.size) - 1) // g + 1):
                    byte, bit = i >> 3, 1 << (i & 7)
                    if not bits[byte] & bit:
                        bits[byte] |= bit
                        changed_lo, changed_hi = min(changed_lo, byte), max(changed_hi, byte)
            if changed_hi < 0:
                return
            try:
                os.pwrite(self._fd, bytes(bits[changed_lo : changed_hi + 1]), HEADER_SIZE + changed_lo)
                os.fdatasync(self._fd)
            except OSError as e:
                detail = f"cannot record a tracked write: {e.strerror}"
                raise DeviceError(path=self.path, detail=detail) from e

    def extents(self) -> list[tuple[int, int]]:
        """The tracked regions as merged ``(offset, length)`` byte extents, in order."""
        g, nbits = self.granularity, -(-self.size // self.granularity)
        with self._lock:
            bits = np.unpackbits(np.frombuffer(bytes(self._bits), dtype=np.uint8), bitorder="little")[:nbits]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
        starts, ends = edges[0::2], edges[1::2]
        size = self.size
        return [(int(a) * g, min(int(b) * g, size) - int(a) * g) for a, b in zip(starts, ends, strict=True)]

    def tracked_bytes(self) -> int:
        """Bytes of the tracked regions (a count of the bits; the last region may be short)."""
        g, nbits = self.granularity, -(-self.size // self.granularity)
        with self._lock:
            count = int.from_bytes(self._bits, "little").bit_count()
            last = bool(self._bits[(nbits - 1) >> 3] & (1 << ((nbits - 1) & 7)))
        return count * g - (nbits * g - self.size if last else 0)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def remove(self) -> None:
        """Close and delete the tracker (the failback completed)."""
        self.close()
        try:
            os.unlink(self.path)
            fsync_directory(os.path.dirname(self.path))
        except FileNotFoundError:
            pass


class Retired(ReadOnly):
    template = (
        "volume {volume!r} was demoted on this standby: its read-write export has ended (the old primary "
        "takes it back; connect to it)"
    )


class TrackedExport:
    """The read-write export of a promoted `volume`: changes are marked in `tracker` before they are made."""

    def __init__(self, volume: Volume, tracker: ChangeTracker) -> None:
        self._volume = volume
        self.tracker = tracker
        self._retired = False

    def retire(self) -> None:
        self._retired = True

    def _live(self) -> Volume:
        if self._retired:
            raise Retired(volume=self._volume.name)
        return self._volume

    @property
    def size(self) -> int:
        return self._volume.size

    @property
    def readonly(self) -> bool:
        return False

    def read(self, offset: int, length: int) -> bytes:
        return self._live().read(offset, length)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return self._live().extents(offset, length)

    def write(self, offset: int, data: Buffer) -> None:
        volume = self._live()
        check_range(offset, len(data), volume.size)
        self.tracker.mark(offset, len(data))
        volume.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        volume = self._live()
        check_range(offset, length, volume.size)
        self.tracker.mark(offset, length)
        volume.zero(offset, length)

    def flush(self) -> None:
        self._live().flush()

    def close(self) -> None:
        """The export does not own the volume: nothing to close."""

"""The primary's persistent write-intent bitmap: which regions of a volume may differ from the standby.

One bit per region of `granularity` bytes (64 KiB by default). The contract, as in DRBD:

* a region's bit is durable **before** any write to the region is issued (`mark` returns only then), so
  after a crash every region whose local data might differ from the standby's is marked;
* a bit is cleared lazily, after the standby acknowledged every write to its region (`release`) and the
  region stayed idle (`clean`); losing a clear only costs an extra resync of that region, so clears are
  written without a sync;
* while the standby is away, writes are only marked (`mark_dirty`): such a region stays set until a
  resync has sent it and the standby acknowledged (`resync_begin` / `release`).

Amortising the syncs: marking a region that is not set yet also sets the next `ahead` regions, so a
sequential writer pays one fdatasync per ``ahead + 1`` regions (4 MiB by default). Idle regions stay
set as a hot set of at most `hot` regions (4 GiB by default), the least recently used beyond it cleared
after `linger` seconds, so a random writer over a working set that fits pays no sync at all once it is
marked; when no region was marked for `quiet` seconds, every idle region is cleared. The price is the
resync after a crash of the primary: every set bit, so at most the hot set plus what was in flight
(DRBD's activity log makes the same trade: 1237 extents of 4 MiB by default).

Concurrent markers share syncs (group commit): bits are set and their pages written under the lock, the
fdatasync runs outside it, and one sync covers every page written before it started, so writers
marking different regions at once wait for one or two syncs, not one each.

File layout: a 4 KiB header (magic, version, granularity, volume size, a checksum), then the bits,
little-endian within each byte, region ``i`` at byte ``i // 8``, bit ``i % 8``. Only the pages of
changed bits are written.

Thread-safe: one lock for the bits and counters, a second one that serialises the syncs.

Failures to write the file (a full or failing disk) never leave a bit believed durable that is not: a
`mark` whose page write or sync fails raises (its hold undone: the caller must not issue the write), and
every page is rewritten before the next sync (after a failed fsync the kernel may have dropped the dirty
pages, so retrying the sync alone would prove nothing). The file is allocated in full when created, so
marking needs no new disk space on filesystems that overwrite in place.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np

from standbylib.errors import DeviceError, DiskFull, InvalidArgument, StandbyError
from standbylib.rawfile import OsFile, RawFile, fsync_directory

MAGIC = b"STBYBMAP"
VERSION = 1
HEADER = 4096
PAGE = 4096
DEFAULT_GRANULARITY = 64 << 10
#: Regions set beyond a newly marked one (with 64 KiB regions: one sync per 4 MiB written in order).
DEFAULT_AHEAD = 63
#: Bytes of idle regions kept set (the hot set), and seconds without a mark after which all are cleared.
DEFAULT_HOT_BYTES = 4 << 30
DEFAULT_QUIET = 20.0
_HEAD = struct.Struct("<8sII")  # magic, version, length of the JSON that follows


class BitmapError(StandbyError):
    template = "write-intent bitmap {path}: {detail}"


class WriteIntentBitmap:
    """The bitmap of a volume of `size` bytes kept in `raw` (see `open`)."""

    def __init__(
        self,
        raw: RawFile,
        size: int,
        granularity: int,
        *,
        ahead: int = DEFAULT_AHEAD,
        linger: float = 2.0,
        hot: int | None = None,
        quiet: float = DEFAULT_QUIET,
        new: bool,
    ) -> None:
        check_granularity(granularity)
        if size <= 0:
            raise InvalidArgument(detail=f"volume size {size} must be greater than 0")
        self.raw = raw
        self.path = raw.path
        self.size = size
        self.granularity = granularity
        self.shift = granularity.bit_length() - 1
        self.nbits = -(-size // granularity)
        self.ahead = ahead
        self.linger = linger
        self.hot = DEFAULT_HOT_BYTES // granularity if hot is None else hot
        self.quiet = quiet
        self._last_mark = 0.0
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._written = 0  # generation of bit pages written (bumped under _lock) ...
        self._synced = 0  # ... and the generation the last completed sync covers
        # A page write or a sync failed: the file may lack set bits; every page is rewritten before the
        # next sync (under _lock).
        self._stale = False
        nbytes = -(-self.nbits // 8)
        self._bits = np.zeros(-(-nbytes // PAGE) * PAGE, dtype=np.uint8)  # what the file holds (or will)
        self._inflight = np.zeros(self.nbits, dtype=np.uint32)  # mirrored writes not yet acknowledged
        self._dirty = np.zeros(self.nbits, dtype=bool)  # changed while the standby was away
        # The same memory seen element by element: indexing these costs a tenth of indexing numpy
        # arrays, which matters on the path of every write (a few regions per call).
        self._bits_at = self._bits.data
        self._inflight_at = self._inflight.data
        self._dirty_at = self._dirty.data
        self._idle_since: dict[int, float] = {}  # set, no writes in flight, not dirty: clear candidates
        self.syncs = 0
        if new:
            self._write_header()
            self.raw.truncate(HEADER + len(self._bits))
            self.raw.sync()
            self.syncs += 1
        else:
            self._read()

    @classmethod
    def open(
        cls,
        path: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        ahead: int = DEFAULT_AHEAD,
        linger: float = 2.0,
        hot: int | None = None,
    ) -> WriteIntentBitmap:
        """Open the bitmap at `path`, creating it (all clear) when missing.

        An existing bitmap must describe the same size and granularity (else `BitmapError`: resizing a
        volume or changing the granularity needs a full resync, so the operator removes the file). Every
        set bit of an existing bitmap is dirty: the regions are resynced.
        """
        if not os.path.exists(path):
            # Built under another name and renamed once durable: a crash never leaves half a header.
            work = f"{path}.creating"
            raw = OsFile(work, create=True)
            try:
                raw.truncate(0)
                bitmap = cls(raw, size, granularity, ahead=ahead, linger=linger, hot=hot, new=True)
                _allocate(raw, HEADER + len(bitmap._bits), required=True)
                os.rename(work, path)
                raw.path = bitmap.path = path
                fsync_directory(path)
                return bitmap
            except BaseException:
                raw.close()
                raise
        raw = OsFile(path)
        try:
            bitmap = cls(raw, size, granularity, ahead=ahead, linger=linger, hot=hot, new=False)
            _allocate(raw, HEADER + len(bitmap._bits), required=False)  # older, sparse files
            return bitmap
        except BaseException:
            raw.close()
            raise

    def close(self) -> None:
        """Write pending clears and close (the file is closed even when the writes fail)."""
        with self._lock:
            try:
                self._write_pages(np.arange(len(self._bits) // PAGE))
                self.raw.sync()
            finally:
                self.raw.close()

    # -- format ---------------------------------------------------------------------------------------

    def _write_header(self) -> None:
        meta = json.dumps({"granularity": self.granularity, "size": self.size}, sort_keys=True).encode()
        body = _HEAD.pack(MAGIC, VERSION, len(meta)) + meta
        header = body + struct.pack("<I", zlib.crc32(body))
        self.raw.pwrite(header.ljust(HEADER, b"\0"), 0)

    def _read(self) -> None:
        head = self.raw.pread(HEADER, 0)
        magic, version, n = _HEAD.unpack_from(head)
        if magic != MAGIC:
            raise BitmapError(path=self.path, detail="not a write-intent bitmap (bad magic)")
        if version != VERSION or n > HEADER - _HEAD.size - 4:
            raise BitmapError(path=self.path, detail=f"unsupported version {version}")
        body = head[: _HEAD.size + n]
        (crc,) = struct.unpack_from("<I", head, _HEAD.size + n)
        if zlib.crc32(body) != crc:
            raise BitmapError(path=self.path, detail="header checksum mismatch")
        meta = json.loads(body[_HEAD.size :])
        if meta["granularity"] != self.granularity or meta["size"] != self.size:
            raise BitmapError(
                path=self.path,
                detail=f"made for {meta['size']} bytes in regions of {meta['granularity']}, not {self.size} "
                f"in regions of {self.granularity}; remove it to force a full resync",
            )
        data = self.raw.pread(len(self._bits), HEADER)
        self._bits[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._dirty[:] = self._unpacked()

    def _unpacked(self) -> np.ndarray:
        return np.unpackbits(self._bits, bitorder="little")[: self.nbits].astype(bool)

    def _write_pages(self, pages: np.ndarray) -> None:
        for page in np.unique(pages):
            start = int(page) * PAGE
            self.raw.pwrite(self._bits[start : start + PAGE].tobytes(), HEADER + start)

    # -- regions ------------------------------------------------------------------------------------

    def regions(self, offset: int, length: int) -> range:
        """Region numbers touched by ``[offset, offset+length)``."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise InvalidArgument(
                detail=f"range [{offset}, +{length}) outside the volume of {self.size} bytes"
            )
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def _set(self, regions: np.ndarray) -> bool:
        """Set bits in memory and write their pages; True when any was clear (the caller syncs)."""
        byte, bit = regions >> 3, (regions & 7).astype(np.uint8)
        masks = np.left_shift(np.uint8(1), bit)
        was = self._bits[byte] & masks
        if was.all():
            return False
        np.bitwise_or.at(self._bits, byte, masks)
        self._write_pages(byte[was == 0] // PAGE)
        return True

    def _is_set(self, region: int) -> bool:
        return bool(self._bits_at[region >> 3] & (1 << (region & 7)))

    def _all_set(self, regions: range) -> bool:
        bits = self._bits_at
        return all(bits[r >> 3] & (1 << (r & 7)) for r in regions)

    def _hold(self, regions: range) -> None:
        """Under the lock: one more write in flight in each region."""
        inflight, idle = self._inflight_at, self._idle_since
        for r in regions:
            inflight[r] += 1
            idle.pop(r, None)

    def _unhold(self, regions: range) -> None:
        """Under the lock: undo a `_hold` whose write will not be issued."""
        inflight, dirty, idle = self._inflight_at, self._dirty_at, self._idle_since
        now = time.monotonic()
        for r in regions:
            if inflight[r]:  # (an `abandon` may have zeroed it meanwhile)
                inflight[r] -= 1
            if not inflight[r] and not dirty[r] and self._is_set(r):
                idle.setdefault(r, now)

    def mark(self, offset: int, length: int) -> None:
        """A mirrored write to the range is about to be issued: its bits are durable when this returns.

        Raises `DeviceError` (`DiskFull`) when the bitmap cannot be written or synced: then nothing is
        held and the caller must not issue the write (it would be untracked)."""
        regions = self.regions(offset, length)
        with self._lock:
            self._hold(regions)
            try:
                need = self._set_ahead(regions)
            except BaseException:
                self._unhold(regions)
                raise
        try:
            self._sync_to(need)
        except BaseException:
            with self._lock:
                self._unhold(regions)
            raise

    def try_mark(self, offset: int, length: int) -> bool:
        """`mark` when it needs no sync (every bit set and durable already); False, changing nothing,
        when it would have to wait for one."""
        regions = self.regions(offset, length)
        with self._lock:
            if self._synced < self._written or not self._all_set(regions):
                return False
            self._hold(regions)
            return True

    def mark_dirty(self, offset: int, length: int) -> None:
        """A write to the range is issued while the standby is away: set until resynced."""
        regions = self.regions(offset, length)
        with self._lock:
            self._dirty[regions.start : regions.stop] = True
            for r in regions:
                self._idle_since.pop(r, None)
            need = self._set_ahead(regions)
        self._sync_to(need)

    def _set_ahead(self, regions: range) -> int:
        """Under the lock: set the bits of `regions` (and `ahead` more); the page generation that must
        be synced before they are durable (0 when nothing needs a sync)."""
        if self._all_set(regions):
            # Set already, maybe by a marker whose sync is still running: wait for the newest sync.
            return self._written if self._synced < self._written else 0
        stop = min(self.nbits, regions.stop + self.ahead)
        self._last_mark = time.monotonic()
        try:
            self._set(np.arange(regions.start, stop, dtype=np.int64))
        except BaseException:
            # The bits are set in memory but maybe not in the file: whoever relies on them next must
            # sync, and the sync rewrites every page first.
            self._stale = True
            self._written += 1
            raise
        now = time.monotonic()
        for r in range(regions.stop, stop):  # marked ahead, not written yet: clear candidates
            if not self._inflight[r] and not self._dirty[r]:
                self._idle_since.setdefault(r, now)
        self._written += 1
        return self._written

    def _sync_to(self, need: int) -> None:
        """Return once a sync that started after page generation `need` was written has completed."""
        if not need:
            return
        with self._sync_lock:
            if self._synced >= need:
                return  # another marker's sync covered our pages
            with self._lock:
                covers = self._written
                if self._stale:
                    self._write_pages(np.arange(len(self._bits) // PAGE))
                    self._stale = False
            try:
                self.raw.sync()
            except BaseException:
                # After a failed fsync the kernel may have dropped the dirty pages: write them again.
                with self._lock:
                    self._stale = True
                raise
            self.syncs += 1
            self._synced = covers

    def release(self, offset: int, length: int) -> None:
        """The standby acknowledged a write to the range (one `mark` or `resync_begin` each)."""
        self.release_all([(offset, length)])

    def release_all(self, ranges: list[tuple[int, int]]) -> None:
        """`release` of each ``(offset, length)`` (one lock round for a whole acknowledged batch)."""
        spans = [(self.regions(offset, length), offset, length) for offset, length in ranges]
        now = time.monotonic()
        inflight, dirty, idle = self._inflight_at, self._dirty_at, self._idle_since
        with self._lock:
            for regions, offset, length in spans:
                if not all(inflight[r] for r in regions):
                    raise InvalidArgument(detail=f"release of [{offset}, +{length}) without a matching mark")
                for r in regions:
                    left = inflight[r] - 1
                    inflight[r] = left
                    if not left and not dirty[r]:
                        idle[r] = now

    def abandon(self) -> None:
        """The standby went away: every write in flight becomes dirty (it may never be acknowledged)."""
        with self._lock:
            self._dirty |= self._inflight > 0
            self._inflight[:] = 0
            self._idle_since = {r: t for r, t in self._idle_since.items() if not self._dirty[r]}

    def drop(self, offset: int, length: int) -> None:
        """A marked write will not be acknowledged (its batch was dropped): its regions need a resync."""
        regions = self.regions(offset, length)
        with self._lock:
            counts = self._inflight[regions.start : regions.stop]
            if (counts == 0).any():
                raise InvalidArgument(detail=f"drop of [{offset}, +{length}) without a matching mark")
            counts -= 1
            self._dirty[regions.start : regions.stop] = True
            for r in regions:
                self._idle_since.pop(r, None)

    def dirty_regions(self) -> Iterator[int]:
        """Regions to resync, in order (a snapshot of the moment of the call)."""
        with self._lock:
            found = np.flatnonzero(self._dirty)
        for r in found:
            yield int(r)

    def resync_begin(self, region: int) -> tuple[int, int]:
        """Region `region` is about to be sent by the resync: ``(offset, length)`` to read and send.

        It stays set (in flight) until `release` of that range.
        """
        with self._lock:
            self._dirty[region] = False
            self._inflight[region] += 1
            self._idle_since.pop(region, None)
        return self.span(region)

    def span(self, region: int) -> tuple[int, int]:
        """``(offset, length)`` of region `region` (the last one of an odd-sized volume is short)."""
        offset = region << self.shift
        return offset, min(self.granularity, self.size - offset)

    def clean(
        self, *, now: float | None = None, force: bool = False, released_before: float | None = None
    ) -> int:
        """Clear idle bits; the number cleared.

        Cleared: the least recently released idle regions beyond the hot set that were idle for `linger`
        seconds, or every region idle for `linger` seconds once nothing was marked for `quiet` seconds,
        or every idle region with `force`. `released_before` (a `time.monotonic` value) also requires
        the release to be older than that: the caller passes the time it sent a flush barrier the
        standby has acknowledged, so that a cleared bit always means the standby holds the region
        durably. Clears are written without a sync: a lost clear only means one more region to resync.
        """
        now = time.monotonic() if now is None else now
        limit = now - self.linger
        if released_before is not None:
            limit = min(limit, released_before)
        with self._lock:
            ready = self._cleanable(now, limit, force)
            if not ready:
                return 0
            for r in ready:
                del self._idle_since[r]
            regions = np.array(ready, dtype=np.int64)
            byte = regions >> 3
            masks = np.left_shift(np.uint8(1), (regions & 7).astype(np.uint8))
            np.bitwise_and.at(self._bits, byte, ~masks)
            try:
                self._write_pages(byte // PAGE)
            except BaseException:
                # A lost clear costs a resync only, but a failed page write may have left the page in any
                # state: the next sync rewrites every page first.
                self._stale = True
                self._written += 1
                raise
            return len(ready)

    def _cleanable(self, now: float, limit: float, force: bool) -> list[int]:
        idle = self._idle_since
        if force or now - self._last_mark >= self.quiet:
            return [r for r, t in idle.items() if force or t <= limit]
        excess = len(idle) - self.hot
        if excess <= 0:
            return []
        oldest = sorted((t, r) for r, t in idle.items())[:excess]
        return [r for t, r in oldest if t <= limit]

    def wants_clean(self, now: float | None = None) -> bool:
        """Whether a `clean` could clear something now (given a flush barrier acknowledged first)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return bool(self._cleanable(now, now - self.linger, False))

    # -- state --------------------------------------------------------------------------------------

    def marked(self) -> int:
        """Bits set (in memory; the file has at least these, or more while clears are unwritten)."""
        with self._lock:
            return int(np.unpackbits(self._bits).sum())

    def dirty(self) -> int:
        """Regions that wait for a resync."""
        with self._lock:
            return int(self._dirty.sum())

    def out_of_sync_bytes(self) -> int:
        """Bytes that may differ from the standby: dirty regions and regions with writes in flight."""
        with self._lock:
            return int(((self._inflight > 0) | self._dirty).sum()) * self.granularity

    def on_disk(self) -> np.ndarray:
        """The bits as the file holds them now (for tests and diagnostics)."""
        data = self.raw.pread(len(self._bits), HEADER)
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: self.nbits].astype(
            bool
        )


def _allocate(raw: RawFile, size: int, *, required: bool) -> None:
    """Allocate the file's blocks, so that writing bits later needs no new space (a full disk then fails
    the start, not a client's write). `required`: a failure raises, else it is ignored."""
    if not isinstance(raw, OsFile):
        return
    try:
        os.posix_fallocate(raw.fd, 0, size)
    except OSError as e:
        if required and e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            kind = DiskFull if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else DeviceError
            raise kind(path=raw.path, detail=f"allocate {size} bytes: {e.strerror}") from e


def check_granularity(granularity: int) -> int:
    if granularity < 4096 or granularity & (granularity - 1):
        raise InvalidArgument(detail=f"bitmap granularity {granularity} must be a power of two >= 4 KiB")
    return granularity

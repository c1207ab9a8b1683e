"""Positional file I/O beneath block devices and preservation stores.

A `RawFile` is the smallest thing the engine writes to: positional reads and
writes, ``sync`` (fdatasync), hole punching and resizing. Three implementations
share the protocol: `OsFile` (a real file or block device), `MemFile` (RAM) and,
in the tests, a fault-injecting file that can lose everything written since the
last ``sync``. Each keeps I/O counters, so benchmarks and metrics can report what
really reached the backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat
from dataclasses import dataclass
from typing import Protocol

from standbylib.errors import DeviceError, DiskFull

#: Write errors that mean no space, for now: the same write may succeed once space is freed.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
#: copy_file_range errors that mean "not here" (another filesystem, no support): copy in user space.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def io_error(path: str, what: str, e: OSError) -> DeviceError:
    """The library error for `e`, raised by `what` on `path`: `DiskFull` when there is no space
    (or a file-size limit was hit), else `DeviceError`."""
    kind = DiskFull if e.errno in _FULL else DeviceError
    return kind(path=path, detail=f"{what}: {e.strerror or e}")


Buffer = bytes | bytearray | memoryview


@dataclass
class IOCounters:
    """What was asked of a backend since it was opened."""

    reads: int = 0
    bytes_read: int = 0
    writes: int = 0
    bytes_written: int = 0
    syncs: int = 0
    punches: int = 0


class RawFile(Protocol):
    """Positional I/O on one file. Not thread-safe by itself; callers serialise writes."""

    path: str
    counters: IOCounters

    def pread(self, length: int, offset: int) -> bytes:
        """Read `length` bytes at `offset`; bytes past the end of the file read as zeros."""
        ...

    def preadinto(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset`; bytes past the end of the file read as zeros."""
        ...

    def pwrite(self, data: Buffer, offset: int) -> None:
        """Write all of `data` at `offset`, growing the file if needed."""
        ...

    def sync(self) -> None:
        """Make every completed write durable (fdatasync)."""
        ...

    def punch(self, offset: int, length: int) -> None:
        """Deallocate a range; it reads as zeros afterwards."""
        ...

    def size(self) -> int: ...

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Consecutive ``(length, is_hole)`` runs covering ``[offset, offset+length)``."""
        ...

    def truncate(self, size: int) -> None: ...

    def close(self) -> None: ...


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class OsFile:
    """A real file (or block device) opened for positional I/O."""

    def __init__(self, path: str, *, create: bool = False, readonly: bool = False) -> None:
        self.path = path
        self.counters = IOCounters()
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DeviceError(path=path, detail=e.strerror or str(e)) from e
        self._can_punch = True

    def pread(self, length: int, offset: int) -> bytes:
        self.counters.reads += 1
        self.counters.bytes_read += length
        try:
            data = os.pread(self.fd, length, offset)
            if len(data) < length:
                # Short read: either EOF (zeros by contract) or a signal; retry the rest.
                chunks = [data]
                got = len(data)
                while got < length:
                    more = os.pread(self.fd, length - got, offset + got)
                    if not more:
                        chunks.append(bytes(length - got))
                        break
                    chunks.append(more)
                    got += len(more)
                data = b"".join(chunks)
        except OSError as e:
            raise io_error(self.path, f"read at {offset}", e) from e
        return data

    def preadinto(self, buf: memoryview, offset: int) -> None:
        self.counters.reads += 1
        self.counters.bytes_read += len(buf)
        done = 0
        total = len(buf)
        try:
            while done < total:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    buf[done:] = bytes(total - done)
                    return
                done += n
        except OSError as e:
            raise io_error(self.path, f"read at {offset + done}", e) from e

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.counters.writes += 1
        self.counters.bytes_written += len(data)
        self._write_all(data, offset)

    def copy_from(self, src: OsFile, src_offset: int, length: int, offset: int) -> None:
        """Copy `length` bytes of `src` at `src_offset` to `offset`, inside the kernel
        (copy_file_range: no trip through user space; shared extents where the filesystem can).

        Where the kernel cannot copy between these files (another filesystem, no support) the
        bytes go through user space instead. Raises `DiskFull` when the destination has no space
        (ENOSPC, EDQUOT, EFBIG), `DeviceError` otherwise (naming the file that failed); part of the
        range may have been written then.
        """
        self.counters.writes += 1
        self.counters.bytes_written += length
        src.counters.reads += 1
        src.counters.bytes_read += length
        done = 0
        try:
            while done < length:
                n = os.copy_file_range(src.fd, self.fd, length - done, src_offset + done, offset + done)
                if n == 0:  # past the end of the source: the rest reads as zeros
                    self._write_all(bytes(length - done), offset + done)
                    return
                done += n
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise io_error(self.path, f"copy from {src.path} at {offset + done}", e) from e
        # Copy the rest through user space, a MiB at a time (reads name the source when they fail).
        while done < length:
            n = min(length - done, 1 << 20)
            self._write_all(src.pread(n, src_offset + done), offset + done)
            done += n

    def _write_all(self, data: Buffer, offset: int) -> None:
        """`pwrite` without counting (the caller counted the whole operation)."""
        view = memoryview(data)
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                raise io_error(self.path, f"write at {offset}", e) from e
            view = view[n:]
            offset += n

    def sync(self) -> None:
        """fdatasync. A failure (ENOSPC, EDQUOT: `DiskFull`; EIO...: `DeviceError`) may have lost
        any write since the previous successful sync, even one a later sync reports done: the
        kernel may drop the pages it failed to write. Rewrite what must be durable, then sync."""
        self.counters.syncs += 1
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_error(self.path, "fdatasync", e) from e

    def sync_all(self) -> None:
        """fsync: like `sync`, and the file's metadata (its modification time) too."""
        self.counters.syncs += 1
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise io_error(self.path, "fsync", e) from e

    def stat(self) -> os.stat_result:
        """fstat of the open file."""
        try:
            return os.fstat(self.fd)
        except OSError as e:
            raise io_error(self.path, "fstat", e) from e

    def filesystem_id(self) -> int:
        """The filesystem's id (statvfs f_fsid; derived from the filesystem's UUID on ext4 and btrfs,
        so it survives a change of device number), 0 when unknown."""
        try:
            return int(os.fstatvfs(self.fd).f_fsid)
        except (OSError, AttributeError):
            return 0

    def punch(self, offset: int, length: int) -> None:
        """Deallocate ``[offset, offset+length)``; it reads as zeros afterwards.

        fallocate(PUNCH_HOLE) allocates nothing, so it works on a full filesystem (a range inside
        one filesystem block is zeroed in place; some filesystems, e.g. older fuse2fs, leave such a
        range untouched when it starts on a block boundary: callers that need zeros read back).
        Where punching is not supported, zeros are written instead, which needs space.
        """
        self.counters.punches += 1
        if self._can_punch:
            res = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            if res == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise io_error(self.path, f"punch hole at {offset}", OSError(err, os.strerror(err)))
            self._can_punch = False
        # No hole punching here (e.g. tmpfs without support): write zeros instead.
        zeros = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite(zeros[:n], offset)
            offset += n

    def size(self) -> int:
        try:
            st = os.fstat(self.fd)
            if st.st_size == 0 and not stat.S_ISREG(st.st_mode):
                # Block devices report 0 in st_size; seek to the end instead.
                return os.lseek(self.fd, 0, os.SEEK_END)
        except OSError as e:
            raise io_error(self.path, "size", e) from e
        return st.st_size

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Holes and data as the filesystem reports them (SEEK_HOLE / SEEK_DATA).

        SEEK_HOLE first: a range that is all data, the common case, costs one lseek.
        """
        end = offset + length
        runs: list[tuple[int, bool]] = []
        pos = offset
        while pos < end:
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # at or past the end of the file: reads as zeros
                    runs.append((end - pos, True))
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole reporting here
                    runs.append((end - pos, False))
                    break
                raise DeviceError(path=self.path, detail=f"seek hole: {e.strerror}") from e
            if hole > pos:
                stop = min(hole, end)
                runs.append((stop - pos, False))
                pos = stop
                continue
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos, the rest is a hole
                    raise DeviceError(path=self.path, detail=f"seek data: {e.strerror}") from e
                data = end
            if data <= pos:  # written meanwhile: call a block data rather than loop
                stop = min(end, pos + 4096)
                runs.append((stop - pos, False))
            else:
                stop = min(data, end)
                runs.append((stop - pos, True))
            pos = stop
        return runs

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise io_error(self.path, f"resize to {size}", e) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class MemFile:
    """A file held in RAM; `sync` is free and only counted."""

    def __init__(self, data: bytes | bytearray = b"", path: str = "<ram>") -> None:
        self.path = path
        self.counters = IOCounters()
        self.data = bytearray(data)

    def pread(self, length: int, offset: int) -> bytes:
        self.counters.reads += 1
        self.counters.bytes_read += length
        chunk = bytes(self.data[offset : offset + length])
        if len(chunk) < length:
            chunk += bytes(length - len(chunk))
        return chunk

    def preadinto(self, buf: memoryview, offset: int) -> None:
        self.counters.reads += 1
        self.counters.bytes_read += len(buf)
        chunk = self.data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        if len(chunk) < len(buf):
            buf[len(chunk) :] = bytes(len(buf) - len(chunk))

    def pwrite(self, data: Buffer, offset: int) -> None:
        self.counters.writes += 1
        self.counters.bytes_written += len(data)
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def sync(self) -> None:
        self.counters.syncs += 1

    def punch(self, offset: int, length: int) -> None:
        self.counters.punches += 1
        end = min(offset + length, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)

    def size(self) -> int:
        return len(self.data)

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return [(length, False)]

    def truncate(self, size: int) -> None:
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def close(self) -> None:
        pass


def fsync_directory(path: str) -> None:
    """Make the entries of the directory holding `path` durable (after a create or a rename)."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably: a crash leaves the old or the new contents.

    The data goes to ``PATH.tmp``, is fsynced, renamed over `path`, and the directory is fsynced.
    Raises `DiskFull` (ENOSPC, EDQUOT, EFBIG) or `DeviceError` (anything else), both naming `path`;
    on any failure before the rename `path` keeps its old contents and ``PATH.tmp`` is removed. A
    failure of the final directory fsync leaves the new contents in place, maybe not durable yet.
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise io_error(path, "replace", e) from e
        raise
    try:
        fsync_directory(path)
    except OSError as e:
        raise io_error(path, "fsync of its directory", e) from e


_ZEROS = bytes(1 << 20)


def is_zero(data: Buffer) -> bool:
    """True when every byte of `data` is zero (compared a MiB at a time against a zero buffer: a copy to
    bytes and a memcmp, about 50 us per MiB, where comparing a memoryview goes element by element, 35
    times slower)."""
    view = memoryview(data).cast("B")
    if not view or view[0] or view[-1]:
        return not view
    step = len(_ZEROS)
    for start in range(0, len(view), step):
        chunk = view[start : start + step]
        if chunk.tobytes() != _ZEROS[: len(chunk)]:
            return False
    return True

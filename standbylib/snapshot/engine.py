"""The engine's entry point: `PreservationStore`, opened on a file or RAM, whose volumes are `Volume`s.

`Store` (`standbylib.snapshot.store`) is the whole preservation store; what it hands out for an
attached origin device is left to a subclass, so that the store does not depend on volumes and
volumes depend only on the store. `PreservationStore` binds each attached device to a `Volume`
(`standbylib.snapshot.volume`), and opens stores: it is the class callers use, and the only one that
knows both. A new store file is built under a temporary name and renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import os

from standbylib.blockdev import BlockDevice
from standbylib.errors import DeviceError, InvalidArgument, StoreNotWritable
from standbylib.rawfile import MemFile, OsFile, RawFile, fsync_directory, io_error
from standbylib.snapshot import layout
from standbylib.snapshot.commit import InvalidationListener
from standbylib.snapshot.records import VolumeRecord
from standbylib.snapshot.store import Store, check_arguments
from standbylib.snapshot.volume import Volume


class PreservationStore(Store[Volume]):
    """Copy-on-write preservation store. Create with `open` (file) or `in_memory` (RAM)."""

    @classmethod
    def open(
        cls,
        path: str,
        capacity: int | None = None,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """Open the store file at `path`, creating it when missing (then `capacity` is required).

        `capacity` (bytes) limits the preserved data; given for an existing store it
        replaces the stored capacity. `on_full` is ``invalidate`` (default: the
        affected snapshots become invalid, origin writes go on) or ``defer``
        (`Volume.write_batch` raises `PreservationDeferred` and applies nothing).

        `on_invalidated(volume, snapshot, reason)` is called once per snapshot that becomes
        invalid, whatever the cause (overflow, capacity, an origin changed behind the engine's
        back), as soon as that is durable. It is called with the store's lock held, from the
        thread whose operation caused it: it must be quick and must not call back into the store
        (queue the event instead). What it raises is suppressed: it cannot fail a write.
        """
        check_arguments(capacity, on_full)
        exists = os.path.exists(path)
        if not exists:
            if capacity is None:
                raise InvalidArgument(detail=f"{path} does not exist; give a capacity to create a store")
            parent = os.path.dirname(os.path.abspath(path))
            if not os.access(parent, os.W_OK):
                raise StoreNotWritable(path=path, detail=f"directory {parent} is not writable")
        elif not os.access(path, os.R_OK | os.W_OK):
            raise StoreNotWritable(path=path, detail="permission denied")
        # A new store is built under a temporary name and renamed into place once
        # complete, so a crash never leaves a half-made store at `path`.
        work = f"{path}.creating" if not exists else path
        try:
            if not exists and os.path.exists(work):
                os.unlink(work)
            raw = OsFile(work, create=not exists)
        except (DeviceError, OSError) as e:
            detail = e.fields["detail"] if isinstance(e, DeviceError) else (e.strerror or str(e))
            raise StoreNotWritable(path=path, detail=detail) from e
        try:
            store = cls(
                raw, capacity=capacity, on_full=on_full, new=not exists, on_invalidated=on_invalidated
            )
            if not exists:
                try:
                    os.rename(work, path)
                    raw.path = store._path = path
                    fsync_directory(path)
                except OSError as e:
                    raise io_error(path, "create", e) from e
            return store
        except BaseException:
            raw.close()
            if not exists:
                with contextlib.suppress(OSError):
                    os.unlink(work)
            raise

    @classmethod
    def in_memory(
        cls,
        capacity: int,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """A store held in RAM (claim 4): fast, lost when the process ends."""
        return cls(
            MemFile(path="<ram>"), capacity=capacity, on_full=on_full, new=True, on_invalidated=on_invalidated
        )

    @classmethod
    def open_raw(
        cls,
        raw: RawFile,
        capacity: int | None = None,
        *,
        on_full: str = "invalidate",
        on_invalidated: InvalidationListener | None = None,
    ) -> PreservationStore:
        """Open a store on any `RawFile` (used by tests to inject faults).

        An empty file, or one whose creation was interrupted before its superblock
        became durable (nothing can have been preserved in it yet), is made a new store.
        """
        return cls(
            raw, capacity=capacity, on_full=on_full, new=_unformatted(raw), on_invalidated=on_invalidated
        )

    def _bind(self, record: VolumeRecord, device: BlockDevice, changed_outside: str) -> Volume:
        vol = Volume(self, record, device)
        vol.changed_outside = changed_outside
        return vol


def _unformatted(raw: RawFile) -> bool:
    """Empty, or an interrupted creation: no superblock magic yet and no room for an area."""
    size = raw.size()
    if size == 0:
        return True
    head = raw.pread(512, 0)
    return size <= layout.AREAS_OFFSET and not head.startswith(layout.MAGIC) and not any(head)

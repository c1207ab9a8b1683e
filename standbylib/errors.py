"""The library's exception hierarchy.

Every exception carries its fields and renders its message from a template, so
the edges (NBD server, gRPC servicers, command line) can translate by class in
one table each and never parse messages.

Two families matter to servers:

* `RequestError`: one request was wrong or could not be served; the
  connection or session that made it goes on.
* everything else derived from `StandbyError`: the object (store, volume) is
  unusable for this operation, e.g. a corrupt store or a closed engine.
"""

from __future__ import annotations

from typing import Any


class StandbyError(Exception):
    """Base of every error raised on purpose by the library."""

    template = "{detail}"

    def __init__(self, **fields: Any) -> None:
        self.fields = fields
        for name, value in fields.items():
            setattr(self, name, value)
        super().__init__(self.template.format(**fields))


class RequestError(StandbyError):
    """A single request failed; the caller may go on with other requests."""


class InvalidArgument(RequestError):
    template = "invalid argument: {detail}"


class OutOfRange(RequestError):
    template = "request [{offset}, {offset}+{length}) is outside the device of {size} bytes"


class InvalidLength(RequestError):
    template = "invalid request length {length}: must be greater than 0"


class InvalidBlockSize(InvalidArgument):
    template = "invalid block size {block_size}: must be a power of two from 512 B to 1 MiB"


class Fenced(RequestError):
    """The peer took the volume over (it was promoted there): this side's copy is outdated."""

    template = "volume {volume!r} was taken over by the peer"


class PermissionDenied(RequestError):
    template = "permission denied: {detail}"


class Overloaded(RequestError):
    """A limit of the server's own (connections, streams) is reached; try again later."""

    template = "the server is at a limit: {detail}"


class ReadOnly(RequestError):
    template = "{what} is read-only"


class NotFound(RequestError):
    template = "{what} not found"


class UnknownVolume(NotFound):
    template = "unknown volume {volume!r}"


class UnknownSnapshot(NotFound):
    template = "unknown snapshot {snapshot!r} of volume {volume!r}"


class AlreadyExists(RequestError):
    template = "{what} already exists"


class SnapshotExists(AlreadyExists):
    template = "snapshot {snapshot!r} of volume {volume!r} already exists"


class SnapshotInvalid(RequestError):
    template = (
        "snapshot {snapshot!r} of volume {volume!r} is invalid ({reason}); its image is lost, "
        "delete it and take a new one"
    )


class ReplicaInconsistent(RequestError):
    template = (
        "volume {volume!r} is inconsistent (a resync from the primary is under way); "
        "take the snapshot when `standbyctl status` shows it uptodate"
    )


class PreservationFull(RequestError):
    template = (
        "preservation store full: {needed} more bytes needed, {free} free of {capacity} "
        "(delete snapshots or raise the capacity)"
    )


class PreservationDeferred(StandbyError):
    """Policy ``defer``: this batch would overflow the preservation space of a snapshot.

    Nothing of the batch was applied. The caller should stop applying writes to
    `volume` (and track them elsewhere) until space is freed, then retry.
    """

    template = (
        "writes to volume {volume!r} deferred: snapshot(s) {snapshots} would overflow their "
        "preservation space ({needed} bytes needed, {free} free)"
    )


class StoreError(StandbyError):
    """The preservation store cannot be used as asked."""

    template = "preservation store {path}: {detail}"


class StoreNotWritable(StoreError):
    template = "preservation store {path} is not writable: {detail}"


class StoreCorrupt(StoreError):
    template = "preservation store {path} is corrupt: {detail}"


class VolumeMismatch(StoreError):
    template = "volume {volume!r}: {detail}"


class DeviceError(StandbyError):
    template = "device {path}: {detail}"


class DiskFull(DeviceError):
    """A write found no space (ENOSPC, EDQUOT) or hit a file-size limit (EFBIG): it may succeed later.

    The engine refuses the request and keeps nothing of it (no snapshot is invalidated for it), so
    the same request can be retried once space is freed (see docs/ENGINE.md, "Failures").
    """

    template = (
        "device {path}: {detail}; free space on the filesystem holding {path} "
        "(delete files or snapshots): replication resumes by itself"
    )


class DeviceBusy(DeviceError):
    """Another process (or another open of this process) holds the device's exclusive lock."""

    template = (
        "device {path} is in use by another process (a primary agent or standby daemon has it open); "
        "stop that process first: two writers would corrupt it"
    )


class Closed(StandbyError):
    template = "{what} is closed"

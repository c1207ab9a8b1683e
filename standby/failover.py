"""Failover and failback (docs/OPERATIONS.md).

Failover: `Failover.promote` makes a replica the primary copy, exported read-write over NBD; from then on
its volume refuses mirrored writes (`Promoted`), so the old primary, when it returns, learns that its data
is out of date. Failback: `Failover.adopt` seeds the replica of a new volume with a copy of an image (the
old primary's volume), so the new primary's first sync resends only the blocks that differ.
"""

from __future__ import annotations

import os
import time
import uuid

from standby.replica import INCONSISTENT, UPTODATE, Replica
from standby.replicas import Replicas
from standbylib.blockdev import check_block_size
from standbylib.errors import InvalidArgument, RequestError, StandbyError
from standbylib.runtime import logs
from standbylib.snapshot.records import check_name

log = logs.get(__name__)


class Promoted(RequestError):
    template = (
        "volume {volume!r} was promoted on this standby ({when}): it is the primary copy now and takes no "
        "mirrored writes. This primary's data is out of date: stop it and reattach its host as the new "
        "standby (docs/OPERATIONS.md, failback)"
    )


class PromoteRefused(RequestError):
    template = "cannot promote volume {volume!r}: {detail}"


class Failover:
    """Promotion and adoption of the replicas in `replicas`."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas

    def adopt(self, volume: str, path: str, block_size: int = 4096) -> bool:
        """Seed the replica of a new `volume` with a copy of the image at `path` (sparse: only its data
        extents are copied); False, changing nothing, when the volume has a replica already.

        Failback: the old primary's host becomes the new standby with its old volume as the replica, so
        the first sync from the new primary compares checksums and resends only the blocks that differ.
        The copy's history is unknown to the standby, so that first sync is a full (checksummed) one.
        """
        check_name("volume", volume)
        check_block_size(block_size)
        if self._replicas.get(volume) is not None:
            return False
        size = os.stat(path).st_size
        if size <= 0 or size % block_size:
            raise InvalidArgument(
                detail=f"{path}: size {size} is not a positive multiple of the block size {block_size}"
            )
        target = self._replicas.path(volume)
        work = target + ".adopting"
        copied = _sparse_copy(path, work)
        os.replace(work, target)
        self._replicas.add_file(volume, block_size)
        log.info("replica_adopted", volume=volume, source=path, size=size, data_bytes=copied)
        return True

    def promote(self, volume: str, *, force: bool = False) -> Replica:
        """Make the replica of `volume` the primary copy: exported read-write as VOLUME over NBD (writes
        go through the engine, so snapshots and backups go on), mirrored writes refused from now on.

        Refused while a primary is connected or a resync is under way, unless `force`. The replica's
        data becomes a new generation: the old primary, when it returns, is refused as out of date.
        """
        replica = self._replicas.replica(volume)
        if replica.promoted_at:
            raise PromoteRefused(volume=volume, detail=f"it was promoted already ({replica.promoted_at})")
        if replica.connected and not force:
            raise PromoteRefused(
                volume=volume,
                detail=f"primary {replica.primary_id or 'unknown'} is connected and mirroring it; stop that "
                "primary first (or give --force if it is gone but its stream has not timed out)",
            )
        if replica.state == INCONSISTENT and not force:
            raise PromoteRefused(
                volume=volume,
                detail="a resync is under way, so the replica is not a consistent image; wait until it is "
                "uptodate (or give --force to promote it as it is)",
            )
        with self._replicas.lock:
            base = replica.generation
            self._replicas.change(
                replica,
                promoted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                generation=str(uuid.uuid4()),
                state=UPTODATE,
            )
            self._replicas.add_export(volume, replica.volume)
        log.warning(
            "volume_promoted", volume=volume, generation=replica.generation, base_generation=base, force=force
        )
        return replica


def _sparse_copy(src: str, dst: str) -> int:
    """Copy `src` to a new file `dst` keeping its holes (only data extents are copied, in the kernel);
    the bytes of data copied. `dst` is durable when this returns."""
    copied = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            offset = start
            while offset < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
                if n <= 0:
                    raise StandbyError(detail=f"copying {src} stopped at byte {offset} of {size}")
                offset += n
            copied += end - start
            pos = end
        os.fsync(fout.fileno())
    return copied

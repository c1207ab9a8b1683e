"""Failover and failback (docs/OPERATIONS.md).

Failover: `Failover.promote` makes a replica the primary copy, exported read-write over NBD; from then on
its volume refuses mirrored writes (`Promoted`, a `Fenced` error: the old primary, when it returns, learns
that it is outdated and fences itself). With `at`, the replica is first *rolled back* to a snapshot: the
state it holds is kept as a new snapshot, then every block written since that snapshot gets the
snapshot's contents again, written through the engine (so the kept snapshot and every other snapshot
stay frozen). The rollback is a list of blocks fixed by two frozen snapshots, so redoing it is harmless:
it is resumed at start when a crash cut it short, and the export serves only once it completed.

Every block written while promoted, and every block the rollback changed, is marked in the volume's
`ChangeTracker` before it changes. `Failover.demote` ends the read-write export; the tracker stays until
the old primary, whose handshake then gets `failback`, has pulled those blocks (`failback_blocks`) and
handshakes again holding the promoted generation (`failback_done`). Mirroring then resumes from it.

`Failover.adopt` seeds the replica of a new volume with a copy of an image, so a new primary's first
sync resends only the blocks that differ (a new standby seeded from an old copy).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

from standby.replica import INCONSISTENT, UPTODATE, Replica
from standby.replicas import Replicas
from standby.tracker import DIR as TRACKER_DIR
from standby.tracker import ChangeTracker, TrackedExport
from standbylib.blockdev import check_block_size, check_range
from standbylib.checksums import block_digests
from standbylib.errors import Fenced, InvalidArgument, RequestError, StandbyError
from standbylib.rawfile import is_zero
from standbylib.runtime import logs
from standbylib.snapshot.records import check_name
from standbylib.snapshot.volume import Snapshot, WriteOp

log = logs.get(__name__)

#: Bytes of a rollback written as one group commit, and of a failback chunk.
ROLLBACK_STEP = 4 << 20
CHUNK = 1 << 20
#: Extents of a rollback closer than this are read from the snapshot together.
READ_GAP = 256 << 10


class Promoted(Fenced):
    template = (
        "volume {volume!r} was promoted on this standby ({when}): it is the primary copy now and takes no "
        "mirrored writes. This primary is outdated: `standbyctl demote {volume}` on the standby hands the "
        "volume back, and this primary then receives what changed (docs/OPERATIONS.md, failback)"
    )


class PromoteRefused(RequestError):
    template = "cannot promote volume {volume!r}: {detail}"


class DemoteRefused(RequestError):
    template = "cannot demote volume {volume!r}: {detail}"


class TakeoverRefused(RequestError):
    template = "cannot release volume {volume!r} for a takeover: {detail}"


class FailbackRefused(RequestError):
    template = "volume {volume!r}: no failback to pull: {detail}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Failover:
    """Promotion, rollback, demotion and adoption of the replicas in `replicas`."""

    def __init__(self, replicas: Replicas, data_dir: str) -> None:
        self._replicas = replicas
        self._data_dir = data_dir

    def tracker_path(self, volume: str) -> str:
        return os.path.join(self._data_dir, TRACKER_DIR, f"{volume}.bitmap")

    def adopt(self, volume: str, path: str, block_size: int = 4096) -> bool:
        """Seed the replica of a new `volume` with a copy of the image at `path` (sparse: only its data
        extents are copied); False, changing nothing, when the volume has a replica already.

        The copy's history is unknown to the standby, so the first sync from a primary is a full
        (checksummed) one: it compares checksums and resends only the blocks that differ.
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

    # -- at start ----------------------------------------------------------------------------------------

    def resume(self, replica: Replica) -> None:
        """At start: reopen the tracker of a promoted or demoted replica, finish a rollback a crash cut
        short, and export a promoted volume again."""
        if not (replica.promoted_at or replica.failback):
            return
        path = self.tracker_path(replica.name)
        if os.path.exists(path):
            replica.tracker = ChangeTracker.open(path, replica.size)
        else:  # promoted by a version without trackers: everything may have changed
            replica.tracker = ChangeTracker.create(path, replica.size, replica.block_size)
            replica.tracker.mark(0, replica.size)
        if replica.rollback_pending:
            log.warning("rollback_resumed", volume=replica.name, to=replica.rolled_back_to)
            self._rollback(replica)
        if replica.promoted_at:
            self._replicas.add_export(replica.name, TrackedExport(replica.volume, replica.tracker))

    # -- failover ----------------------------------------------------------------------------------------

    def promote(self, volume: str, *, force: bool = False, at: str = "") -> Replica:
        """Make the replica of `volume` the primary copy: exported read-write as VOLUME over NBD (writes
        go through the engine, so snapshots and backups go on), mirrored writes refused from now on.

        Refused while a primary is connected or a resync is under way, unless `force` (the connected
        primary's stream then ends with `Promoted`: it fences itself). The replica's data becomes a new
        generation. With `at`, it is first rolled back to that snapshot (see the module's docstring).
        """
        replica = self._replicas.replica(volume)
        if replica.promoted_at:
            raise PromoteRefused(volume=volume, detail=f"it was promoted already ({replica.promoted_at})")
        if replica.connected and not force:
            raise PromoteRefused(
                volume=volume,
                detail=f"primary {replica.primary_id or 'unknown'} is connected and mirroring it; stop that "
                "primary first (or give --force: it is then fenced, see its --fencing policy)",
            )
        if replica.state == INCONSISTENT and not force:
            raise PromoteRefused(
                volume=volume,
                detail="a resync is under way, so the replica is not a consistent image; wait until it is "
                "uptodate (or give --force to promote it as it is)",
            )
        if at:
            self._check_target(replica, at)
        when = _now()
        kept = ""
        # No batch of a primary still connected (--force) is half applied while this changes; lock order:
        # a replica's apply lock, then the table's lock (a batch's state saves take them in that order).
        with replica.apply_lock:
            if at:
                kept = _free_name(replica, f"before-rollback-{when.replace('-', '').replace(':', '')}")
                replica.volume.create_snapshot(kept)
                self._replicas.add_export(f"{volume}@{kept}", replica.volume.snapshot(kept))
                log.warning("snapshot_created", volume=volume, snapshot=kept, reason="the state rolled back")
            with self._replicas.lock:
                if replica.tracker is None:
                    path = self.tracker_path(volume)
                    if replica.failback and os.path.exists(path):  # promoted again before the pull
                        replica.tracker = ChangeTracker.open(path, replica.size)
                    else:
                        replica.tracker = ChangeTracker.create(path, replica.size, replica.block_size)
                base = replica.generation
                self._replicas.change(
                    replica,
                    promoted_at=when,
                    # A failback still waiting keeps serving the primary it was waiting for.
                    promoted_from=replica.promoted_from if replica.failback else base,
                    generation=str(uuid.uuid4()),
                    state=UPTODATE,
                    rolled_back_to=at,
                    kept_snapshot=kept,
                    rollback_pending=bool(at),
                    failback=False,
                )
        log.warning(
            "volume_promoted",
            volume=volume,
            generation=replica.generation,
            base_generation=base,
            force=force,
            at=at or None,
            kept_snapshot=kept or None,
        )
        if at:
            self._rollback(replica)
        self._replicas.add_export(volume, TrackedExport(replica.volume, replica.tracker))
        return replica

    def _check_target(self, replica: Replica, at: str) -> None:
        snap = replica.volume.snapshot(at)  # NotFound for an unknown snapshot
        if snap.info().writable:
            raise PromoteRefused(
                volume=replica.name,
                detail=f"snapshot {at!r} is writable; roll back to a read-only snapshot (its own writes "
                "are not the volume's history)",
            )
        if not snap.valid:
            raise PromoteRefused(
                volume=replica.name,
                detail=f"snapshot {at!r} is invalid ({snap.info().reason}): its preserved copies are "
                "incomplete, so the volume cannot be rolled back to it",
            )

    def _rollback(self, replica: Replica) -> None:
        """Write back, through the engine, the contents of snapshot `rolled_back_to` for every block
        written since it (up to `kept_snapshot`); marked in the tracker first. Idempotent."""
        volume, tracker = replica.volume, replica.tracker
        assert tracker is not None
        target = volume.snapshot(replica.rolled_back_to)
        extents = volume.changes(replica.rolled_back_to, replica.kept_snapshot)
        total = sum(length for _, length in extents)
        tracker.mark_extents(extents)
        started = time.monotonic()
        replica.rollback_remaining = total
        for ops, nbytes in _steps(target, extents):
            volume.write_batch(ops)
            replica.rollback_remaining -= nbytes
        volume.flush()
        replica.rollback_remaining = 0
        self._replicas.change(replica, rollback_pending=False)
        log.warning(
            "volume_rolled_back",
            volume=replica.name,
            to=replica.rolled_back_to,
            kept_snapshot=replica.kept_snapshot,
            bytes=total,
            seconds=round(time.monotonic() - started, 3),
        )

    def takeover(self, volume: str) -> str:
        """Release `volume` from the primary that owns it, so another primary may claim it (its data
        replaces the replica if their histories differ); the previous owner. Refused while a primary
        mirrors it."""
        replica = self._replicas.replica(volume)
        if replica.connected:
            raise TakeoverRefused(
                volume=volume, detail=f"primary {replica.primary_id} is connected and mirroring it"
            )
        previous = replica.owner
        self._replicas.change(replica, owner="")
        log.warning("volume_takeover", volume=volume, previous_owner=previous or None)
        return previous

    # -- failback ----------------------------------------------------------------------------------------

    def demote(self, volume: str) -> Replica:
        """End the promotion of `volume`: its read-write export ends (clients still connected get errors)
        and the replica waits for the old primary to pull what the tracker marks."""
        replica = self._replicas.replica(volume)
        if not replica.promoted_at:
            raise DemoteRefused(volume=volume, detail=f"it is not promoted (it is {replica.status})")
        if replica.rollback_pending:
            raise DemoteRefused(volume=volume, detail="its rollback has not completed")
        with self._replicas.lock:
            export = self._replicas.export(volume)
            if isinstance(export, TrackedExport):
                export.retire()
            self._replicas.drop_export(volume)
        replica.volume.flush()
        try:
            self._replicas.change(replica, promoted_at="", failback=True)
        except BaseException:
            assert replica.tracker is not None
            self._replicas.add_export(volume, TrackedExport(replica.volume, replica.tracker))
            raise
        tracked = replica.tracker.tracked_bytes() if replica.tracker else 0
        log.warning(
            "volume_demoted",
            volume=volume,
            generation=replica.generation,
            waits_for=replica.promoted_from or None,
            tracked_bytes=tracked,
        )
        return replica

    def failback_for(self, replica: Replica, generation: str, base: str, previous: str) -> bool:
        """Whether a primary presenting these generations is the old primary a failback waits for: its
        data descends from the generation the replica held when it was promoted."""
        if not replica.failback:
            return False
        origin = replica.promoted_from
        return bool(origin) and origin in (generation, base, previous)

    def _failback_replica(self, volume: str, generation: str, regions: list[tuple[int, int]]) -> Replica:
        """The replica of `volume`, waiting for the failback of `generation`; `regions` checked."""
        replica = self._replicas.replica(volume)
        if not replica.failback or replica.tracker is None:
            raise FailbackRefused(volume=volume, detail=f"it is {replica.status}")
        if generation != replica.generation:
            raise FailbackRefused(
                volume=volume,
                detail=f"the standby holds generation {replica.generation}, not {generation}: "
                "handshake again",
            )
        for offset, length in regions:
            check_range(offset, length, replica.size)
            if offset % replica.block_size or length % replica.block_size:
                raise InvalidArgument(
                    detail=f"region [{offset}, +{length}) is not aligned to blocks of {replica.block_size}"
                )
        return replica

    def failback_blocks(
        self, volume: str, generation: str, regions: list[tuple[int, int]]
    ) -> Iterator[tuple[int, int, bytes | None]]:
        """What the old primary pulls: every tracked region and `regions` (its own unmirrored ones),
        merged, in order, as ``(offset, length, data or None for zeros)`` pieces of at most `CHUNK`."""
        replica = self._failback_replica(volume, generation, regions)
        assert replica.tracker is not None
        merged = _merge(replica.tracker.extents() + list(regions))
        volume_ = replica.volume
        for offset, length in merged:
            pos, end = offset, offset + length
            while pos < end:
                n = min(CHUNK, end - pos)
                data = volume_.read(pos, n)
                yield pos, n, None if is_zero(data) else data
                pos += n

    def failback_digests(
        self, volume: str, generation: str, regions: list[tuple[int, int]]
    ) -> Iterator[tuple[int, int, bytes]]:
        """The digests of the blocks of `regions` the tracker does not mark, as ``(offset, length,
        digests)`` pieces of at most `CHUNK`: the old primary compares them with its own blocks and
        pulls only those that differ (its set bitmap regions mostly hold what the standby has)."""
        replica = self._failback_replica(volume, generation, regions)
        assert replica.tracker is not None
        tracked = replica.tracker.extents()
        for offset, length in _subtract(_merge(list(regions)), tracked):
            pos, end = offset, offset + length
            while pos < end:
                n = min(CHUNK, end - pos)
                yield pos, n, block_digests(replica.volume.read(pos, n), replica.block_size)
                pos += n

    def failback_done(self, replica: Replica) -> None:
        """The old primary holds the replica's generation now: the failback is complete."""
        with self._replicas.lock:
            self._replicas.change(replica, failback=False, promoted_from="")
            tracker, replica.tracker = replica.tracker, None
        if tracker is not None:
            tracker.remove()
        log.info("failback_completed", volume=replica.name, generation=replica.generation)


def _free_name(replica: Replica, name: str) -> str:
    names = {s.name for s in replica.volume.snapshots()}
    candidate, n = name, 1
    while candidate in names:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _steps(snapshot: Snapshot, extents: list[tuple[int, int]]) -> Iterator[tuple[list[WriteOp], int]]:
    """The rollback's writes: `snapshot`'s bytes (or zeros) for `extents`, in group commits of about
    `ROLLBACK_STEP` bytes; with the bytes each covers.

    Extents less than `READ_GAP` apart are read with one snapshot read (the blocks between are read
    and dropped): a few large reads cost less than many 4 KiB ones."""
    ops: list[WriteOp] = []
    nbytes = 0
    for window in _windows(extents):
        start = window[0][0]
        data = memoryview(snapshot.read(start, window[-1][0] + window[-1][1] - start))
        for offset, length in window:
            piece = data[offset - start : offset - start + length]
            ops.append((offset, length if is_zero(piece) else bytes(piece)))
            nbytes += length
        if nbytes >= ROLLBACK_STEP:
            yield ops, nbytes
            ops, nbytes = [], 0
    if ops:
        yield ops, nbytes


def _windows(extents: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """`extents` (ordered, each at most `CHUNK` after splitting) grouped into runs read together: gaps
    below `READ_GAP`, at most `CHUNK` from the first byte to the last."""
    window: list[tuple[int, int]] = []
    for offset, length in extents:
        for pos in range(offset, offset + length, CHUNK):
            piece = (pos, min(CHUNK, offset + length - pos))
            if window and (
                piece[0] - (window[-1][0] + window[-1][1]) > READ_GAP
                or piece[0] + piece[1] - window[0][0] > CHUNK
            ):
                yield window
                window = []
            window.append(piece)
    if window:
        yield window


def _subtract(extents: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`extents` (merged, ordered) without what `holes` (merged, ordered) covers."""
    out: list[tuple[int, int]] = []
    i = 0
    for offset, length in extents:
        pos, end = offset, offset + length
        while i < len(holes) and holes[i][0] + holes[i][1] <= pos:
            i += 1
        j = i
        while pos < end and j < len(holes) and holes[j][0] < end:
            h_start, h_end = holes[j][0], holes[j][0] + holes[j][1]
            if h_start > pos:
                out.append((pos, h_start - pos))
            pos = max(pos, h_end)
            j += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(e for e in extents if e[1] > 0):
        if out and offset <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, offset + length - last_off))
        else:
            out.append((offset, length))
    return out


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

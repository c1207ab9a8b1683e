"""A primary's Mirror stream on a replica: claiming the volume (one stream per volume at a time), the
ordered apply of the stream's batches, and the release of the volume when the stream ends.

`Replica.stream_lock` is held from `Streams.open` to `Streams.close`. Batches are numbered afresh by each
stream and applied strictly in order: a batch applied already is acknowledged again, a gap is refused.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from standby.failover import FailbackRefused, Promoted
from standby.replica import INCONSISTENT, UPTODATE, Replica
from standby.replicas import Replicas
from standby.verify import ProbeResult, Verifier, apply_with_probes
from standbylib.checksums import DIGEST_SIZE, Payload, Probe, Repair
from standbylib.errors import AlreadyExists, InvalidArgument, OutOfRange, PreservationDeferred
from standbylib.runtime import logs

log = logs.get(__name__)


class Busy(AlreadyExists):
    template = "volume {volume!r} is already being mirrored by primary {primary}; one primary per volume"


class NodeMetrics(Protocol):
    def observe_apply(self, volume: str, seconds: float, nbytes: int) -> None: ...


class NullMetrics:
    def observe_apply(self, volume: str, seconds: float, nbytes: int) -> None:
        pass


class Streams:
    """The Mirror streams on the replicas of `replicas`; verify probes they carry are counted by
    `verifier`, apply latencies observed by `metrics`."""

    def __init__(self, replicas: Replicas, verifier: Verifier, metrics: NodeMetrics) -> None:
        self._replicas = replicas
        self._verifier = verifier
        self._metrics = metrics

    def open(
        self,
        replica: Replica,
        primary_id: str,
        first_sequence: int,
        *,
        resync: bool = False,
        generation: str = "",
    ) -> Replica:
        """Claim `replica` for a Mirror stream; batches numbered from `first_sequence` will follow.

        With `resync` the replica is inconsistent until a batch marked up to date is applied.
        """
        if replica.failback:
            raise FailbackRefused(
                volume=replica.name,
                detail="it waits for its old primary to pull what changed while it was promoted; "
                "handshake first",
            )
        if not replica.stream_lock.acquire(timeout=5):
            raise Busy(volume=replica.name, primary=replica.primary_id or "unknown")
        try:
            # Each stream numbers its batches afresh from `first_sequence`: what a broken stream did not
            # deliver, the primary resends from its write-intent bitmap, not by batch number.
            if primary_id and replica.owner != primary_id:
                self._replicas.change(replica, owner=primary_id)
            if resync:
                self._replicas.set_state(replica, INCONSISTENT)
                replica.pending_generation = generation
            elif generation and replica.state != INCONSISTENT:
                self._replicas.set_state(replica, replica.state, generation=generation)
        except BaseException:
            # The state could not be saved (a full disk, say): refuse this stream and hold nothing, so
            # the primary's next attempt, once space is back, finds the volume free.
            replica.stream_lock.release()
            raise
        replica.applied_sequence = first_sequence - 1
        replica.primary_id = primary_id
        replica.connected = True
        log.info("mirror_connected", volume=replica.name, primary=primary_id, first_sequence=first_sequence)
        return replica

    def close(self, replica: Replica) -> None:
        """The stream on `replica` ended: the volume is free for the next one; a verify running fails."""
        if replica.state == UPTODATE and not replica.deferred_reason:
            replica.in_sync_at = time.time()
        replica.connected = False
        replica.note_resync(0, done=True)  # (a progress the next stream reports again)
        self._verifier.primary_gone(replica)
        replica.stream_lock.release()
        log.info("mirror_disconnected", volume=replica.name, applied_sequence=replica.applied_sequence)

    def apply(
        self,
        replica: Replica,
        sequence: int,
        ops: Sequence[tuple[int, Payload]],
        flush: bool,
        uptodate: bool = False,
        mismatched: list[int] | None = None,
    ) -> bool:
        """Apply batch `sequence` to the replica; False when it had been applied already.

        `uptodate` ends a resync: the replica is made durable and becomes up to date.

        An op is a write (``(offset, data)``, ``(offset, zero_length)``, or either as a verify's `Repair`)
        or a `Probe`: the replica's blocks are compared, after the writes before it in the batch and
        before those after it, and the offsets of the blocks that differ are appended to `mismatched`.

        Every op is checked before anything is applied: a batch with one bad op changes nothing.
        """
        with replica.apply_lock:  # promote waits for a batch being applied
            return self._apply(replica, sequence, ops, flush, uptodate, mismatched)

    def _apply(
        self,
        replica: Replica,
        sequence: int,
        ops: Sequence[tuple[int, Payload]],
        flush: bool,
        uptodate: bool,
        mismatched: list[int] | None,
    ) -> bool:
        if replica.promoted_at:
            raise Promoted(volume=replica.name, when=replica.promoted_at)
        if sequence <= replica.applied_sequence:
            return False
        if sequence != replica.applied_sequence + 1:
            raise InvalidArgument(
                detail=f"volume {replica.name!r}: batch {sequence} arrived, "
                f"{replica.applied_sequence + 1} expected"
            )
        nbytes, checksums = _check_ops(replica, ops)
        start = time.perf_counter()
        results: list[ProbeResult] = []
        repaired: dict[int, int] = {}  # verify id -> blocks resent
        try:
            if checksums:
                apply_with_probes(replica.volume, ops, results, repaired)
            elif ops:
                replica.volume.write_batch(
                    [(o, p.data if isinstance(p, Repair) else p) for o, p in ops]  # type: ignore[misc]
                )
            if flush or uptodate:
                replica.volume.flush()
        except PreservationDeferred as e:
            if not replica.deferred_reason:
                log.warning("replication_deferred", volume=replica.name, reason=str(e))
            replica.deferred_reason = str(e)
            raise
        if replica.deferred_reason:
            log.info("replication_resumed", volume=replica.name)
            replica.deferred_reason = ""
        if uptodate:
            self._replicas.set_state(
                replica, UPTODATE, generation=replica.pending_generation or replica.generation
            )
        replica.applied_sequence = sequence
        replica.last_error = replica.last_reason = ""
        if replica.state == UPTODATE:
            replica.in_sync_at = time.time()
        replica.applied_bytes += nbytes
        replica.applied_batches += 1
        self._metrics.observe_apply(replica.name, time.perf_counter() - start, nbytes)
        for _, _, found in results:
            if mismatched is not None:
                mismatched.extend(found)
        if results or repaired:
            self._verifier.progress(replica, results, repaired)
        return True


def _check_ops(replica: Replica, ops: Sequence[tuple[int, Payload]]) -> tuple[int, bool]:
    """Check every op of a batch against the replica (aligned, in range, a probe's digests whole); the
    bytes its writes carry, and whether it holds probes or repairs (applied group by group, and counted
    for verify)."""
    bs, size = replica.block_size, replica.size
    nbytes = 0
    checksums = False
    for offset, payload in ops:
        what = "write"
        if isinstance(payload, Probe):
            what, length, checksums = "probe", payload.length, True
        else:
            checksums = checksums or isinstance(payload, Repair)
            data = payload.data if isinstance(payload, Repair) else payload
            length = data if isinstance(data, int) else len(data)
        if length <= 0 or offset % bs or length % bs:
            raise InvalidArgument(
                detail=f"volume {replica.name!r}: {what} [{offset}, +{length}) is not aligned to its "
                f"block size {bs}"
            )
        if offset + length > size:
            raise OutOfRange(offset=offset, length=length, size=size)
        if isinstance(payload, Probe):
            if len(payload.digests) != length // bs * DIGEST_SIZE:
                raise InvalidArgument(
                    detail=f"volume {replica.name!r}: probe [{offset}, +{length}) carries "
                    f"{len(payload.digests)} bytes of digests, {length // bs * DIGEST_SIZE} expected "
                    f"({DIGEST_SIZE} per block of {bs})"
                )
        else:
            nbytes += length
    return nbytes, checksums

"""The standby node: a data directory of replicas and one preservation store, and what the services do
with them (handshake, ordered apply, flush barriers, verify, snapshots, failover, status).

Layout of ``--data-dir``::

    standby.json          identity of this standby (a UUID), written once
    state.json            per volume: whether its replica is inconsistent (a resync is under way)
    preservation.store    the preservation store (copies, index, snapshot table) of every volume
    replicas/NAME.img     one sparse replica file per volume, created at the volume's first handshake
    failback/NAME.bitmap  blocks written while the volume was promoted, until its old primary pulled them
    leases.json           deadlines of snapshot leases (backups)
    reserve.space         4 MiB kept allocated, given up to save a state file when the disk is full

`StandbyNode` is the façade the services, the data channel, the daemon's main and the metrics call; it
opens the data directory and hands each call to the part that owns it:

- `standby.replicas`: the replica table, the replica files, the NBD exports, durable state changes;
- `standby.statefiles`: ``standby.json``, ``state.json``, how state files are written, the space reserve;
- `standby.handshake`: the handshake rules (creation, full sync, split brain);
- `standby.streams`: a primary's Mirror stream (one per volume) and the ordered apply of its batches;
- `standby.verify`: verify sessions and the comparison of the primary's probes;
- `standby.snapshots`: snapshots and their leases;
- `standby.failover`: promote (failover, rollback), demote and the failback, adopt;
- `standby.refusals`: refusals of a primary, counted by reason.

The node is thread-safe: gRPC threads call it concurrently. The engine serialises its own state; the
replica table adds one lock for its tables and the state saves, and a replica's stream lock makes sure at
most one Mirror stream applies to a volume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

from standby.failover import DemoteRefused, FailbackRefused, Failover, Promoted, PromoteRefused
from standby.handshake import SplitBrain, TakeoverRequired, handshake
from standby.leases import Leases
from standby.refusals import REFUSAL_REASONS, Refusals, refusal_reason
from standby.removal import Removal, RemoveRefused
from standby.replica import DEFERRED, FAILBACK, INCONSISTENT, PROMOTED, UPTODATE, Replica
from standby.replicas import REPLICA_DIR, Replicas
from standby.snapshots import Snapshots, snapshot_invalidated
from standby.statefiles import StateFiles
from standby.streams import Busy, NodeMetrics, NullMetrics, Streams
from standby.tracker import TrackedExport
from standby.verify import Verifier, VerifyFailed, VerifyRefused, VerifySession
from standbylib.checksums import Payload
from standbylib.errors import InvalidArgument
from standbylib.snapshot import PreservationStore
from standbylib.snapshot.volume import Snapshot, SnapshotInfo
from standbylib.units import parse_size

__all__ = [
    "DEFERRED",
    "FAILBACK",
    "INCONSISTENT",
    "PROMOTED",
    "REFUSAL_REASONS",
    "UPTODATE",
    "Busy",
    "DemoteRefused",
    "FailbackRefused",
    "NodeMetrics",
    "NullMetrics",
    "PromoteRefused",
    "Promoted",
    "RemoveRefused",
    "Replica",
    "SplitBrain",
    "StandbyNode",
    "TakeoverRequired",
    "VerifyFailed",
    "VerifyRefused",
    "VerifySession",
    "check_capacity",
    "parse_capacity",
    "refusal_reason",
]

STORE_FILE = "preservation.store"


def check_capacity(spec: str | int) -> str:
    """Validate a capacity, ``SIZE`` or ``PCT%``, before any directory exists; returns it as text."""
    text = str(spec).strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise InvalidArgument(detail=f"preservation capacity {text!r}: a percentage must be in (0, 100]")
    elif parse_size(text) <= 0:
        raise InvalidArgument(detail=f"preservation capacity {text!r} must be greater than 0")
    return text


def parse_capacity(spec: str | int, data_dir: str) -> int:
    """``SIZE`` bytes, or ``PCT%`` of the filesystem holding `data_dir` (at least 1 MiB)."""
    text = check_capacity(spec)
    if text.endswith("%"):
        st = os.statvfs(data_dir)
        return max(1 << 20, int(st.f_blocks * st.f_frsize * float(text[:-1]) / 100))
    return parse_size(text)


class StandbyNode:
    """The standby's data directory `data_dir`, opened: its replicas, its store of `capacity` (``SIZE``
    or ``PCT%`` of the filesystem; `on_full` says what the store does when full), its state files."""

    def __init__(
        self,
        data_dir: str,
        *,
        capacity: str | int = "20%",
        on_full: str = "invalidate",
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.on_full = on_full
        self.metrics: NodeMetrics = metrics or NullMetrics()
        os.makedirs(os.path.join(self.data_dir, REPLICA_DIR), exist_ok=True)
        self._files = StateFiles(self.data_dir)
        self.id = self._files.identity()
        self._files.keep_reserve()
        self._files.load_states()
        self.leases = Leases(self.data_dir)
        self.capacity = parse_capacity(capacity, self.data_dir)
        self.store = PreservationStore.open(
            self.store_path, self.capacity, on_full=on_full, on_invalidated=snapshot_invalidated
        )
        self._replicas = Replicas(self.data_dir, self.store, self._files)
        self._refusals = Refusals(self._replicas)
        self._verifier = Verifier()
        self._streams = Streams(self._replicas, self._verifier, self.metrics)
        self._snapshots = Snapshots(self._replicas, self.leases, self._files)
        self._failover = Failover(self._replicas, self.data_dir)
        self._removal = Removal(
            self._replicas, self.leases, self._files, lambda v: (self._failover.tracker_path(v),)
        )
        try:
            for name in self.store.volume_names():
                replica = self._replicas.open_existing(name)
                if replica.removing:
                    self._removal.resume(replica)
                else:
                    self._failover.resume(replica)
            self._removal.sweep()
        except BaseException:
            self.close()
            raise

    @property
    def store_path(self) -> str:
        return os.path.join(self.data_dir, STORE_FILE)

    def replica_path(self, volume: str) -> str:
        return self._replicas.path(volume)

    def close(self) -> None:
        with self._replicas.lock:
            self._replicas.close()
            self.store.close()

    # -- state files and health --------------------------------------------------------------------------

    @property
    def reserve_path(self) -> str:
        return self._files.reserve_path

    def write_state_file(self, path: str, write: Callable[[], object]) -> None:
        """Run `write`, which replaces the state file `path`; a failure is loud and raised
        (`StateFiles.write`)."""
        self._files.write(path, write)

    @property
    def state_write_failures(self) -> dict[str, int]:
        """Failed writes of state files, by file name."""
        return self._files.write_failures()

    def problems(self) -> list[str]:
        """Conditions an operator must act on now (state files that could not be saved)."""
        return self._files.problems()

    @property
    def refusals(self) -> dict[tuple[str, str], int]:
        """Refusals of primaries by (volume, reason); the volume is "" for names no replica has."""
        return self._refusals.counts()

    def refused(self, volume: str, exc: BaseException) -> bool:
        """Count a refusal of a primary's handshake, stream or batch for `volume` and remember why; True
        when the reason differs from the previous refusal's (callers log state changes, not attempts)."""
        return self._refusals.count(volume, exc)

    # -- replication -------------------------------------------------------------------------------------

    def handshake(
        self,
        volume: str,
        size: int,
        block_size: int,
        *,
        generation: str = "",
        base_generation: str = "",
        discard: bool = False,
        previous_generation: str = "",
        primary_id: str = "",
    ) -> tuple[Replica, bool, bool]:
        """The replica of `volume` (created, sparse, at first contact), whether it was created, and
        whether it needs a full sync (`standby.handshake.handshake`)."""
        return handshake(
            self._replicas,
            volume,
            size,
            block_size,
            generation=generation,
            base_generation=base_generation,
            discard=discard,
            previous_generation=previous_generation,
            primary_id=primary_id,
            failover=self._failover,
        )

    def replica(self, volume: str) -> Replica:
        return self._replicas.replica(volume)

    def replicas(self) -> list[Replica]:
        return self._replicas.all()

    def open_stream(
        self, volume: str, primary_id: str, first_sequence: int, *, resync: bool = False, generation: str = ""
    ) -> Replica:
        """Claim `volume` for a Mirror stream; batches numbered from `first_sequence` will follow.

        With `resync` the replica is inconsistent until a batch marked up to date is applied.
        """
        return self._streams.open(
            self.replica(volume), primary_id, first_sequence, resync=resync, generation=generation
        )

    def close_stream(self, replica: Replica) -> None:
        self._streams.close(replica)

    def apply(
        self,
        replica: Replica,
        sequence: int,
        ops: Sequence[tuple[int, Payload]],
        flush: bool,
        uptodate: bool = False,
        mismatched: list[int] | None = None,
    ) -> bool:
        """Apply batch `sequence` to the replica; False when it had been applied already
        (`standby.streams.Streams.apply`)."""
        return self._streams.apply(replica, sequence, ops, flush, uptodate, mismatched)

    # -- verify ------------------------------------------------------------------------------------------

    def start_verify(self, volume: str, repair: bool) -> VerifySession:
        """Start a verify of `volume`: its next Mirror reply asks the primary for the probes."""
        return self._verifier.start(self.replica(volume), repair)

    def take_verify_command(self, replica: Replica) -> tuple[int, bool] | None:
        """The verify command the next Mirror reply must carry, once."""
        return self._verifier.take_command(replica)

    def verify_status(self, session: VerifySession, wait: float = 0.0) -> VerifySession:
        """A copy of the session's progress, after waiting up to `wait` seconds for a change or its end."""
        return self._verifier.status(session, wait)

    def cancel_verify(self, session: VerifySession, reason: str) -> None:
        self._verifier.cancel(session, reason)

    # -- snapshots ---------------------------------------------------------------------------------------

    def create_snapshot(
        self,
        volume: str,
        name: str | None,
        *,
        writable: bool = False,
        capacity: int | None = None,
        lease: float | None = None,
    ) -> SnapshotInfo:
        """Freeze `volume`'s image; with a `lease` (seconds) the snapshot is deleted unless renewed."""
        return self._snapshots.create(volume, name, writable=writable, capacity=capacity, lease=lease)

    def renew_lease(self, volume: str, name: str, seconds: float, *, release: bool = False) -> SnapshotInfo:
        """Extend (or give) the lease of an existing snapshot to `seconds` from now, or drop it."""
        return self._snapshots.renew_lease(volume, name, seconds, release=release)

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Delete the snapshots whose lease ran out; their export names."""
        return self._snapshots.expire_leases(now)

    def delete_snapshot(self, volume: str, name: str) -> None:
        self._snapshots.delete(volume, name)

    def snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        return self._snapshots.infos(volume)

    def snapshot(self, volume: str, name: str) -> Snapshot:
        return self._snapshots.get(volume, name)

    def snapshot_changes(self, volume: str, base: str, name: str) -> list[tuple[int, int]]:
        return self._snapshots.changes(volume, base, name)

    # -- NBD exports (called by the NBD server's connection threads) ---------------------------------

    def export(self, name: str) -> Snapshot | TrackedExport | None:
        """The NBD export `name`: a snapshot (VOLUME@SNAPSHOT), or a promoted volume (VOLUME, read-write)."""
        return self._replicas.export(name)

    def export_names(self) -> list[str]:
        return self._replicas.export_names()

    # -- failover --------------------------------------------------------------------------------------

    def adopt(self, volume: str, path: str, block_size: int = 4096) -> bool:
        """Seed the replica of a new `volume` with a copy of the image at `path`; False, changing nothing,
        when the volume has a replica already (failback, `standby.failover.Failover.adopt`)."""
        return self._failover.adopt(volume, path, block_size)

    def promote(self, volume: str, *, force: bool = False, at: str = "") -> Replica:
        """Make the replica of `volume` the primary copy, exported read-write over NBD, rolled back to
        snapshot `at` first if given; refused while a primary is connected or a resync is under way,
        unless `force` (`Failover.promote`)."""
        return self._failover.promote(volume, force=force, at=at)

    def takeover(self, volume: str) -> str:
        """Release `volume` from its primary, for another to claim it; the previous owner
        (`Failover.takeover`)."""
        return self._failover.takeover(volume)

    def remove(self, volume: str, *, force: bool = False) -> tuple[int, int]:
        """Remove the replica of `volume` and everything of it here (`standby.removal`): (its snapshots
        deleted, the bytes its replica file held)."""
        return self._removal.remove(volume, force=force)

    def demote(self, volume: str) -> Replica:
        """End the promotion of `volume`; the old primary pulls what changed (`Failover.demote`)."""
        return self._failover.demote(volume)

    def failback_blocks(
        self, volume: str, generation: str, regions: list[tuple[int, int]]
    ) -> Iterator[tuple[int, int, bytes | None]]:
        """What the old primary of a demoted `volume` pulls (`Failover.failback_blocks`)."""
        return self._failover.failback_blocks(volume, generation, regions)

    def failback_digests(
        self, volume: str, generation: str, regions: list[tuple[int, int]]
    ) -> Iterator[tuple[int, int, bytes]]:
        """The digests of `regions`' untracked blocks, for the old primary (`Failover.failback_digests`)."""
        return self._failover.failback_digests(volume, generation, regions)

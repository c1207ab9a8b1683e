"""The standby node: a data directory of replicas and one preservation store, and what the services do
with them (handshake, ordered apply, flush barriers, snapshots, status).

Layout of ``--data-dir``::

    standby.json          identity of this standby (a UUID), written once
    state.json            per volume: whether its replica is inconsistent (a resync is under way)
    preservation.store    the preservation store (copies, index, snapshot table) of every volume
    replicas/NAME.img     one sparse replica file per volume, created at the volume's first handshake
    leases.json           deadlines of snapshot leases (backups)
    reserve.space         4 MiB kept allocated, given up to save a state file when the disk is full

The node is thread-safe: gRPC threads call it concurrently. The engine serialises its own state; the
node adds one lock for its tables and makes sure at most one Mirror stream applies to a volume.

Verify (`start_verify`): the node asks the connected primary, on its next Mirror reply, to probe the
whole volume; the probes travel in the ordered stream and are compared in `apply` at exactly their
point of the write sequence, so writes going on never cause a false mismatch (docs/REPLICATION.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from standby.leases import Leases, check_lease
from standbylib.blockdev import Device, check_block_size, open_file_device
from standbylib.checksums import DIGEST_SIZE, Payload, Probe, Repair, block_digests, zero_digests
from standbylib.errors import (
    AlreadyExists,
    DeviceError,
    DiskFull,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PreservationDeferred,
    ReplicaInconsistent,
    RequestError,
    StandbyError,
    UnknownVolume,
    VolumeMismatch,
)
from standbylib.rawfile import replace_file
from standbylib.runtime import logs
from standbylib.snapshot import PreservationStore
from standbylib.snapshot.records import check_name
from standbylib.snapshot.volume import Snapshot, SnapshotInfo, Volume, WriteOp
from standbylib.units import parse_size

log = logs.get(__name__)

STORE_FILE = "preservation.store"
REPLICA_DIR = "replicas"
IDENTITY_FILE = "standby.json"
STATE_FILE = "state.json"
#: Space kept aside in the data directory, given up to save a state file on a full disk (see `_reserve`).
RESERVE_FILE = "reserve.space"
RESERVE_BYTES = 4 << 20

UPTODATE, INCONSISTENT, DEFERRED, PROMOTED = "uptodate", "inconsistent", "deferred", "promoted"

#: Offsets of out-of-sync blocks a verify session keeps (the count is exact).
VERIFY_FIRST_OFFSETS = 20
#: A verify fails when the primary made no progress on it for this long (e.g. a primary too old to verify).
VERIFY_STALL_SECONDS = 60.0


class SplitBrain(RequestError):
    template = (
        "volume {volume!r}: split brain: the standby holds generation {standby}, which the primary does not "
        "know (its generation is {primary}, the last one it shared with this standby {base}); both sides "
        "were changed since they last agreed. To keep the primary's data, restart it with "
        "--discard-standby-data (the standby's replica is overwritten by a full resync)"
    )


class Promoted(RequestError):
    template = (
        "volume {volume!r} was promoted on this standby ({when}): it is the primary copy now and takes no "
        "mirrored writes. This primary's data is out of date: stop it and reattach its host as the new "
        "standby (docs/OPERATIONS.md, failback)"
    )


class PromoteRefused(RequestError):
    template = "cannot promote volume {volume!r}: {detail}"


class Busy(AlreadyExists):
    template = "volume {volume!r} is already being mirrored by primary {primary}; one primary per volume"


class VerifyRefused(RequestError):
    template = "cannot verify volume {volume!r}: {detail}"


class VerifyFailed(RequestError):
    template = "verify of volume {volume!r} failed: {detail}"


#: The `reason` label of a refusal (standby_replication_refusals_total), by error class, most specific first.
REFUSAL_REASONS: tuple[tuple[type[StandbyError], str], ...] = (
    (DiskFull, "disk_full"),
    (PreservationDeferred, "deferred"),
    (SplitBrain, "split_brain"),
    (Promoted, "promoted"),
    (Busy, "busy"),
    (VolumeMismatch, "volume_mismatch"),
    (ReplicaInconsistent, "inconsistent"),
    (DeviceError, "io_error"),
    (RequestError, "invalid_request"),
    (StandbyError, "error"),
)


def refusal_reason(exc: BaseException) -> str:
    for kind, reason in REFUSAL_REASONS:
        if isinstance(exc, kind):
            return reason
    return "error"


@dataclass
class VerifySession:
    """One verify of a replica: progress as the primary's probes (and, with `repair`, resends) arrive."""

    id: int
    volume: str
    repair: bool
    total_bytes: int
    block_size: int
    started: float = field(default_factory=time.monotonic)
    checked_bytes: int = 0
    mismatched_blocks: int = 0
    first_offsets: list[int] = field(default_factory=list)
    repaired_blocks: int = 0
    done: bool = False
    error: str = ""
    last_progress: float = field(default_factory=time.monotonic)
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def running(self) -> bool:
        return not self.done

    def complete(self) -> bool:
        """Under `cond`: every block was compared and, with `repair`, every mismatch was resent."""
        return self.checked_bytes >= self.total_bytes and (
            not self.repair or self.repaired_blocks >= self.mismatched_blocks
        )


class NodeMetrics(Protocol):
    def observe_apply(self, volume: str, seconds: float, nbytes: int) -> None: ...


class NullMetrics:
    def observe_apply(self, volume: str, seconds: float, nbytes: int) -> None:
        pass


@dataclass
class Replica:
    """One volume's replica and its replication state."""

    name: str
    path: str
    device: Device
    volume: Volume
    state: str = UPTODATE
    connected: bool = False
    primary_id: str = ""
    applied_sequence: int = 0
    applied_bytes: int = 0
    applied_batches: int = 0
    deferred_reason: str = ""
    generation: str = ""  # the primary's data generation this replica holds completely ("" = none)
    # When the replica was last known to follow the primary (connected, up to date, nothing held back).
    in_sync_at: float = field(default_factory=time.time)
    pending_generation: str = ""  # adopted when the running resync completes
    stream_lock: threading.Lock = field(default_factory=threading.Lock)
    verify: VerifySession | None = None  # the latest verify session
    verify_command: tuple[int, bool] | None = None  # (id, repair) for the next Mirror reply
    promoted_at: str = ""  # when `standbyctl promote` made the replica the primary copy (RFC 3339)
    last_error: str = ""  # why the last handshake, stream or batch was refused; "" once a batch is applied
    last_reason: str = ""  # its `refusal_reason`

    def lag_seconds(self, now: float | None = None) -> float:
        """0 while the replica follows the primary; else how long since it last did (how stale it may be)."""
        if self.connected and self.state == UPTODATE and not self.deferred_reason:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.in_sync_at)

    @property
    def status(self) -> str:
        """``uptodate``, ``inconsistent`` (a resync is under way), ``deferred`` (writes held back) or
        ``promoted`` (the primary copy since a failover)."""
        if self.promoted_at:
            return PROMOTED
        return DEFERRED if self.deferred_reason else self.state

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def block_size(self) -> int:
        return self.volume.block_size


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
        self._lock = threading.RLock()  # re-entered: state saves take it under callers that hold it
        self._replicas: dict[str, Replica] = {}
        self._exports: dict[str, Snapshot | Volume] = {}  # NBD exports: snapshots, promoted volumes
        # Health: refusals by (volume, reason), failed state-file writes by file, and the conditions an
        # operator must act on now (a state file that could not be saved), by file.
        self.refusals: dict[tuple[str, str], int] = {}
        self.state_write_failures: dict[str, int] = {}
        self._problems: dict[str, str] = {}
        os.makedirs(os.path.join(self.data_dir, REPLICA_DIR), exist_ok=True)
        self.id = self._identity()
        self._reserve()
        self._saved = self._load_state()
        self.leases = Leases(self.data_dir)
        self.capacity = parse_capacity(capacity, self.data_dir)
        self.store = PreservationStore.open(
            self.store_path, self.capacity, on_full=on_full, on_invalidated=self._invalidated
        )
        try:
            for name in self.store.volume_names():
                self._attach_existing(name)
        except BaseException:
            self.close()
            raise

    def _invalidated(self, volume: str, snapshot: str, reason: str) -> None:
        """The engine's notice that a snapshot lost its frozen image (called with the store's lock held)."""
        log.error("snapshot_invalidated", volume=volume, snapshot=snapshot, reason=reason)

    @property
    def store_path(self) -> str:
        return os.path.join(self.data_dir, STORE_FILE)

    def replica_path(self, volume: str) -> str:
        return os.path.join(self.data_dir, REPLICA_DIR, f"{volume}.img")

    def _identity(self) -> str:
        path = os.path.join(self.data_dir, IDENTITY_FILE)
        try:
            with open(path) as fh:
                return str(json.load(fh)["id"])
        except FileNotFoundError:
            ident = str(uuid.uuid4())
            replace_file(path, json.dumps({"id": ident}).encode())
            return ident
        except (OSError, ValueError, KeyError) as e:
            raise StandbyError(detail=f"{path} is unreadable ({e}); restore it or remove it") from e

    def _load_state(self) -> dict[str, dict[str, Any]]:
        path = os.path.join(self.data_dir, STATE_FILE)
        try:
            with open(path) as fh:
                volumes = json.load(fh)["volumes"]
                return {str(k): dict(v) for k, v in volumes.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise StandbyError(detail=f"{path} is unreadable ({e}); remove it and resync the volumes") from e

    def _save_state(self) -> None:
        """Persist each replica's consistency and generation (durably: a restart must not report an
        inconsistent replica up to date, nor forget which history it holds)."""
        state = {
            r.name: {
                "inconsistent": r.state == INCONSISTENT,
                "generation": r.generation,
                "promoted": r.promoted_at,
            }
            for r in self._replicas.values()
        }
        path = os.path.join(self.data_dir, STATE_FILE)
        self.write_state_file(path, lambda: replace_file(path, json.dumps({"volumes": state}).encode()))

    def write_state_file(self, path: str, write: Callable[[], object]) -> None:
        """Run `write`, which replaces the state file `path`; a failure is loud (logged at error, counted
        in `state_write_failures`, listed in `problems` until a later write of that file succeeds) and
        raised as `DiskFull` or `DeviceError`, so the caller can undo what it changed in memory."""
        name = os.path.basename(path)
        try:
            try:
                write()
            except DiskFull:
                # A full disk must not stop the state from moving on (a resync could then never start
                # to send the trims that would free space): give up the reserve and try once more.
                if not self._release_reserve():
                    raise
                write()
        except (OSError, StandbyError) as e:
            if isinstance(e, OSError):
                kind = DiskFull if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else DeviceError
                e = kind(path=path, detail=f"cannot save: {e.strerror or e}")
            with self._lock:
                self.state_write_failures[name] = self.state_write_failures.get(name, 0) + 1
                first = name not in self._problems
                self._problems[name] = f"{path} could not be saved: {e}"
            log.error("state_write_failed", file=path, error=str(e), first=first)
            raise e from None
        if name in self._problems:
            with self._lock:
                self._problems.pop(name, None)
            log.info("state_write_recovered", file=path)
        self._reserve()

    @property
    def reserve_path(self) -> str:
        return os.path.join(self.data_dir, RESERVE_FILE)

    def _reserve(self) -> None:
        """Keep `RESERVE_BYTES` allocated in the data directory (a file of real blocks), while the
        filesystem has room to spare: state files are small, and this space lets them be saved once the
        disk is full (`write_state_file`). Retaken only when four times its size is free, so that it
        never competes with the writes that need the space."""
        path = self.reserve_path
        if os.path.exists(path):
            return
        try:
            st = os.statvfs(self.data_dir)
            if st.f_bavail * st.f_frsize < 4 * RESERVE_BYTES:
                return
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(path + ".tmp", path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path + ".tmp")

    def _release_reserve(self) -> bool:
        """Free the reserve (True), or False when there is none."""
        try:
            os.unlink(self.reserve_path)
        except OSError:
            return False
        log.warning("space_reserve_released", file=self.reserve_path, bytes=RESERVE_BYTES)
        return True

    def problems(self) -> list[str]:
        """Conditions an operator must act on now (state files that could not be saved)."""
        with self._lock:
            return sorted(self._problems.values())

    def _set_state(self, replica: Replica, state: str, generation: str | None = None) -> None:
        """Change the replica's state (and generation) durably; on a failure to save it, nothing changes
        (in memory either) and the error is raised."""
        if replica.state == state and (generation is None or generation == replica.generation):
            return
        with self._lock:
            old, old_generation = replica.state, replica.generation
            replica.state = state
            if generation is not None:
                replica.generation = generation
            try:
                self._save_state()
            except StandbyError:
                replica.state, replica.generation = old, old_generation
                raise
        log.info("replica_state", volume=replica.name, old=old, new=state, generation=replica.generation)

    def refused(self, volume: str, exc: BaseException) -> bool:
        """Count a refusal of a primary's handshake, stream or batch for `volume` and remember why; True
        when the reason differs from the previous refusal's (callers log state changes, not attempts)."""
        reason = refusal_reason(exc)
        with self._lock:
            replica = self._replicas.get(volume)
            # A name no replica has is counted under "": any client can make up names.
            key = (volume if replica is not None else "", reason)
            self.refusals[key] = self.refusals.get(key, 0) + 1
            if replica is None:
                return True
            new = replica.last_reason != reason
            replica.last_error, replica.last_reason = str(exc), reason
            return new

    def _attach_existing(self, name: str) -> None:
        path = self.replica_path(name)
        if not os.path.exists(path):
            raise StandbyError(
                detail=f"the preservation store knows volume {name!r} but its replica {path} is missing"
            )
        device = open_file_device(path, exclusive=True)
        block_size = self.store.volume_records[name].block_size
        volume = self.store.attach(name, device, block_size=block_size)
        replica = Replica(name=name, path=path, device=device, volume=volume)
        saved = self._saved.get(name, {})
        replica.generation = str(saved.get("generation", ""))
        if saved.get("inconsistent"):
            replica.state = INCONSISTENT
        replica.promoted_at = str(saved.get("promoted") or "")
        self._replicas[name] = replica
        if volume.changed_outside:
            # Its data is no longer what the primary sent: no generation describes it. The next
            # primary's handshake gets a full sync, which compares checksums and resends what differs.
            log.warning("replica_changed_outside", volume=name, reason=volume.changed_outside)
            self._set_state(replica, INCONSISTENT, generation="")
        if replica.promoted_at:
            self._exports[name] = volume
        for snap in volume.snapshots():
            self._exports[f"{name}@{snap.name}"] = snap
        log.info("replica_opened", volume=name, size=volume.size, block_size=block_size)

    def close(self) -> None:
        with self._lock:
            for replica in self._replicas.values():
                try:
                    replica.volume.flush()
                    replica.volume.close()
                finally:
                    replica.device.close()
            self._replicas.clear()
            self._exports.clear()
            self.store.close()

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
    ) -> tuple[Replica, bool, bool]:
        """The replica of `volume` (created, sparse, at first contact), whether it was created, and
        whether it needs a full sync.

        Generations tell whose data is newer: the replica may hold the primary's current generation
        (in sync), its base or its previous one (older: the primary resyncs what its bitmap marked; the
        previous one when the acknowledgement of a completed resync was lost with the link). Anything
        else means the histories diverged: refused as a split brain unless `discard` (then a full sync).
        """
        replica, created = self._handshake(volume, size, block_size)
        if replica.promoted_at:
            raise Promoted(volume=volume, when=replica.promoted_at)
        held = replica.generation
        if created or discard or not held:
            reason = (
                "new replica"
                if created
                else "discarded"
                if discard
                else "changed outside the daemon, or never completed a sync"
            )
            if held or not created:
                log.warning("full_sync", volume=volume, reason=reason, generation=held)
            self._set_state(replica, INCONSISTENT, generation="")
            return replica, created, True
        if held in (generation, base_generation) or (previous_generation and held == previous_generation):
            return replica, False, False
        raise SplitBrain(
            volume=volume, standby=held, primary=generation or "none", base=base_generation or "none"
        )

    def _handshake(self, volume: str, size: int, block_size: int) -> tuple[Replica, bool]:
        check_name("volume", volume)
        check_block_size(block_size)
        if size <= 0 or size % block_size:
            raise InvalidArgument(
                detail=f"volume {volume!r}: size {size} must be a positive multiple of the block size "
                f"{block_size}"
            )
        with self._lock:
            replica = self._replicas.get(volume)
            if replica is not None:
                if replica.block_size != block_size or replica.size != size:
                    raise VolumeMismatch(
                        volume=volume,
                        detail=f"the primary has {size} bytes in blocks of {block_size}, the replica "
                        f"{replica.size} bytes in blocks of {replica.block_size}; "
                        "resize or rename the volume",
                    )
                return replica, False
            path = self.replica_path(volume)
            if os.path.exists(path):
                # A replica file the store does not know (a crash between creating it and registering it).
                os.unlink(path)
            _create_sparse(volume, path, size)
            device = open_file_device(path, size, exclusive=True)
            try:
                vol = self.store.attach(volume, device, block_size=block_size)
            except BaseException:
                device.close()
                os.unlink(path)
                raise
            replica = Replica(name=volume, path=path, device=device, volume=vol)
            self._replicas[volume] = replica
            log.info("replica_created", volume=volume, size=size, block_size=block_size, path=path)
            return replica, True

    def replica(self, volume: str) -> Replica:
        with self._lock:
            replica = self._replicas.get(volume)
        if replica is None:
            raise UnknownVolume(volume=volume)
        return replica

    def open_stream(
        self, volume: str, primary_id: str, first_sequence: int, *, resync: bool = False, generation: str = ""
    ) -> Replica:
        """Claim `volume` for a Mirror stream; batches numbered from `first_sequence` will follow.

        With `resync` the replica is inconsistent until a batch marked up to date is applied.
        """
        replica = self.replica(volume)
        if not replica.stream_lock.acquire(timeout=5):
            raise Busy(volume=volume, primary=replica.primary_id or "unknown")
        try:
            # Each stream numbers its batches afresh from `first_sequence`: what a broken stream did not
            # deliver, the primary resends from its write-intent bitmap, not by batch number.
            if resync:
                self._set_state(replica, INCONSISTENT)
                replica.pending_generation = generation
            elif generation and replica.state != INCONSISTENT:
                self._set_state(replica, replica.state, generation=generation)
        except BaseException:
            # The state could not be saved (a full disk, say): refuse this stream and hold nothing, so
            # the primary's next attempt, once space is back, finds the volume free.
            replica.stream_lock.release()
            raise
        replica.applied_sequence = first_sequence - 1
        replica.primary_id = primary_id
        replica.connected = True
        log.info("mirror_connected", volume=volume, primary=primary_id, first_sequence=first_sequence)
        return replica

    def close_stream(self, replica: Replica) -> None:
        if replica.state == UPTODATE and not replica.deferred_reason:
            replica.in_sync_at = time.time()
        replica.connected = False
        replica.verify_command = None
        session = replica.verify
        if session is not None:
            self._fail_verify(session, "the primary disconnected; run verify again")
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
        if replica.promoted_at:
            raise Promoted(volume=replica.name, when=replica.promoted_at)
        if sequence <= replica.applied_sequence:
            return False
        if sequence != replica.applied_sequence + 1:
            raise InvalidArgument(
                detail=f"volume {replica.name!r}: batch {sequence} arrived, "
                f"{replica.applied_sequence + 1} expected"
            )
        bs, size = replica.block_size, replica.size
        nbytes = 0
        checksums = False  # probes or repairs: applied group by group, and counted for verify
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
        start = time.perf_counter()
        results: list[tuple[int, int, list[int]]] = []  # (verify id, bytes compared, mismatched offsets)
        repaired: dict[int, int] = {}  # verify id -> blocks resent
        try:
            if checksums:
                self._apply_with_probes(replica, ops, results, repaired)
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
            self._set_state(replica, UPTODATE, generation=replica.pending_generation or replica.generation)
        replica.applied_sequence = sequence
        replica.last_error = replica.last_reason = ""
        if replica.state == UPTODATE:
            replica.in_sync_at = time.time()
        replica.applied_bytes += nbytes
        replica.applied_batches += 1
        self.metrics.observe_apply(replica.name, time.perf_counter() - start, nbytes)
        for _, _, found in results:
            if mismatched is not None:
                mismatched.extend(found)
        if results or repaired:
            self._verify_progress(replica, results, repaired)
        return True

    def _apply_with_probes(
        self,
        replica: Replica,
        ops: Sequence[tuple[int, Payload]],
        results: list[tuple[int, int, list[int]]],
        repaired: dict[int, int],
    ) -> None:
        """Apply the writes of a batch that holds probes, comparing each probe where it stands.

        The writes between two probes are one group commit. (Under ``--on-full defer`` a later group may
        be refused after an earlier one was applied; the primary then resends the whole batch's regions
        by its bitmap, so that is harmless.)"""
        bs = replica.block_size
        group: list[WriteOp] = []
        for offset, payload in ops:
            if isinstance(payload, Probe):
                if group:
                    replica.volume.write_batch(group)
                    group = []
                results.append((payload.verify_id, payload.length, self._compare(replica, offset, payload)))
            elif isinstance(payload, Repair):
                group.append((offset, payload.data))
                length = payload.data if isinstance(payload.data, int) else len(payload.data)
                repaired[payload.verify_id] = repaired.get(payload.verify_id, 0) + length // bs
            else:
                group.append((offset, payload))
        if group:
            replica.volume.write_batch(group)

    @staticmethod
    def _compare(replica: Replica, offset: int, probe: Probe) -> list[int]:
        """Offsets of the blocks of the probe's range whose digest on the replica differs."""
        bs, length = replica.block_size, probe.length
        runs = replica.volume.extents(offset, length)
        if len(runs) == 1 and runs[0][1]:
            ours = zero_digests(length, bs)  # a hole: zeros, nothing to read
        else:
            ours = block_digests(replica.volume.read(offset, length), bs)
        if ours == probe.digests:
            return []
        theirs, d = probe.digests, DIGEST_SIZE
        return [
            offset + i * bs
            for i in range(length // bs)
            if ours[i * d : i * d + d] != theirs[i * d : i * d + d]
        ]

    # -- verify ------------------------------------------------------------------------------------------

    def start_verify(self, volume: str, repair: bool) -> VerifySession:
        """Start a verify of `volume`: its next Mirror reply asks the primary for the probes."""
        replica = self.replica(volume)
        with self._lock:
            if not replica.connected:
                raise VerifyRefused(
                    volume=volume,
                    detail="no primary is connected; verify compares the replica with the primary's volume",
                )
            if replica.state == INCONSISTENT:
                raise VerifyRefused(
                    volume=volume,
                    detail="a resync from the primary is under way (the replica is inconsistent); verify "
                    "when `standbyctl status` shows it uptodate",
                )
            running = replica.verify
            if running is not None and running.running:
                raise VerifyRefused(volume=volume, detail="another verify of this volume is running")
            session = VerifySession(
                id=secrets.randbits(62) + 1,
                volume=volume,
                repair=repair,
                total_bytes=replica.size,
                block_size=replica.block_size,
            )
            replica.verify = session
            replica.verify_command = (session.id, repair)
        log.info("verify_started", volume=volume, id=session.id, repair=repair, bytes=replica.size)
        return session

    def take_verify_command(self, replica: Replica) -> tuple[int, bool] | None:
        """The verify command the next Mirror reply must carry, once."""
        if replica.verify_command is None:
            return None
        with self._lock:
            command, replica.verify_command = replica.verify_command, None
        return command

    def verify_status(self, session: VerifySession, wait: float = 0.0) -> VerifySession:
        """A copy of the session's progress, after waiting up to `wait` seconds for a change or its end."""
        with session.cond:
            if not session.done and wait > 0:
                session.cond.wait(wait)
            if not session.done and time.monotonic() - session.last_progress > VERIFY_STALL_SECONDS:
                self._end_verify(
                    session,
                    f"the primary made no progress for {VERIFY_STALL_SECONDS:.0f} s (is it older than this "
                    "standby, or stuck?); run verify again",
                )
            return VerifySession(
                id=session.id,
                volume=session.volume,
                repair=session.repair,
                total_bytes=session.total_bytes,
                block_size=session.block_size,
                started=session.started,
                checked_bytes=session.checked_bytes,
                mismatched_blocks=session.mismatched_blocks,
                first_offsets=list(session.first_offsets),
                repaired_blocks=session.repaired_blocks,
                done=session.done,
                error=session.error,
                last_progress=session.last_progress,
            )

    def cancel_verify(self, session: VerifySession, reason: str) -> None:
        self._fail_verify(session, reason)

    def _fail_verify(self, session: VerifySession, reason: str) -> None:
        with session.cond:
            if not session.done:
                self._end_verify(session, reason)

    def _end_verify(self, session: VerifySession, error: str = "") -> None:
        """Under `session.cond`: the session is over (failed when `error`)."""
        session.done = True
        session.error = error
        session.cond.notify_all()
        fields: dict[str, Any] = {
            "volume": session.volume,
            "id": session.id,
            "checked_bytes": session.checked_bytes,
            "mismatched_blocks": session.mismatched_blocks,
            "repaired_blocks": session.repaired_blocks,
            "first_offsets": session.first_offsets[:5],
            "seconds": round(time.monotonic() - session.started, 3),
        }
        if error:
            log.warning("verify_failed", error=error, **fields)
        else:
            log.info("verify_done", repair=session.repair, **fields)

    def _verify_progress(
        self, replica: Replica, results: list[tuple[int, int, list[int]]], repaired: dict[int, int]
    ) -> None:
        session = replica.verify
        if session is None:
            return
        with session.cond:
            if session.done:
                return
            changed = False
            for verify_id, nbytes, found in results:
                if verify_id != session.id:
                    continue
                changed = True
                session.checked_bytes += nbytes
                session.mismatched_blocks += len(found)
                room = VERIFY_FIRST_OFFSETS - len(session.first_offsets)
                if room > 0:
                    session.first_offsets.extend(found[:room])
            if repaired.get(session.id):
                changed = True
                session.repaired_blocks += repaired[session.id]
            if not changed:
                return
            session.last_progress = time.monotonic()
            if session.complete():
                self._end_verify(session)
            session.cond.notify_all()

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
        replica = self.replica(volume)
        if replica.state == INCONSISTENT:
            raise ReplicaInconsistent(volume=volume)
        if lease is not None:
            check_lease(lease)
        snap = replica.volume.create_snapshot(name or None, writable=writable, capacity=capacity)
        if lease is not None:
            # The lease is taken with the snapshot or not at all: a snapshot left without the lease its
            # backup asked for would pin preserved blocks forever once that backup is gone.
            try:
                self.write_state_file(self.leases.path, lambda: self.leases.grant(volume, snap.name, lease))
            except BaseException:
                replica.volume.delete_snapshot(snap.name)
                log.warning("snapshot_deleted", volume=volume, snapshot=snap.name, reason="lease not saved")
                raise
        with self._lock:
            self._exports[f"{volume}@{snap.name}"] = snap
        info = snap.info()
        log.info(
            "snapshot_created",
            volume=volume,
            snapshot=snap.name,
            writable=writable,
            capacity=capacity,
            lease=lease,
        )
        return info

    def renew_lease(self, volume: str, name: str, seconds: float) -> SnapshotInfo:
        """Extend (or give) the lease of an existing snapshot to `seconds` from now."""
        snap = self.snapshot(volume, name)
        self.write_state_file(self.leases.path, lambda: self.leases.grant(volume, name, seconds))
        return snap.info()

    def expire_leases(self, now: float | None = None) -> list[str]:
        """Delete the snapshots whose lease ran out; their export names."""
        gone: list[str] = []
        for volume, name in self.leases.expired(now):
            try:
                self.delete_snapshot(volume, name)
            except NotFound:
                self.leases.drop(volume, name)  # deleted already, or its volume is gone
                continue
            log.warning("snapshot_lease_expired", volume=volume, snapshot=name)
            gone.append(f"{volume}@{name}")
        return gone

    def delete_snapshot(self, volume: str, name: str) -> None:
        replica = self.replica(volume)
        replica.volume.delete_snapshot(name)
        with self._lock:
            self._exports.pop(f"{volume}@{name}", None)
        log.info("snapshot_deleted", volume=volume, snapshot=name)
        # The snapshot is gone whatever happens to its lease entry: one left in leases.json (the file
        # could not be saved) names no snapshot, and is dropped when it runs out.
        with contextlib.suppress(StandbyError):
            self.write_state_file(self.leases.path, lambda: self.leases.drop(volume, name))

    def snapshots(self, volume: str | None = None) -> list[SnapshotInfo]:
        if volume:
            replicas = [self.replica(volume)]
        else:
            with self._lock:
                replicas = sorted(self._replicas.values(), key=lambda r: r.name)
        return [s.info() for r in replicas for s in r.volume.snapshots()]

    def snapshot(self, volume: str, name: str) -> Snapshot:
        return self.replica(volume).volume.snapshot(name)

    def replicas(self) -> list[Replica]:
        with self._lock:
            return sorted(self._replicas.values(), key=lambda r: r.name)

    # -- NBD exports (called by the NBD server's connection threads) ---------------------------------

    def export(self, name: str) -> Snapshot | Volume | None:
        """The NBD export `name`: a snapshot (VOLUME@SNAPSHOT), or a promoted volume (VOLUME, read-write)."""
        return self._exports.get(name)

    # -- failover --------------------------------------------------------------------------------------

    def adopt(self, volume: str, path: str, block_size: int = 4096) -> bool:
        """Seed the replica of a new `volume` with a copy of the image at `path` (sparse: only its data
        extents are copied); False, changing nothing, when the volume has a replica already.

        Failback: the old primary's host becomes the new standby with its old volume as the replica, so
        the first sync from the new primary compares checksums and resends only the blocks that differ.
        The copy's history is unknown to the standby, so that first sync is a full (checksummed) one.
        """
        check_name("volume", volume)
        check_block_size(block_size)
        with self._lock:
            if volume in self._replicas:
                return False
        size = os.stat(path).st_size
        if size <= 0 or size % block_size:
            raise InvalidArgument(
                detail=f"{path}: size {size} is not a positive multiple of the block size {block_size}"
            )
        target = self.replica_path(volume)
        work = target + ".adopting"
        copied = _sparse_copy(path, work)
        os.replace(work, target)
        device = open_file_device(target, exclusive=True)
        try:
            vol = self.store.attach(volume, device, block_size=block_size)
        except BaseException:
            device.close()
            os.unlink(target)
            raise
        with self._lock:
            self._replicas[volume] = Replica(name=volume, path=target, device=device, volume=vol)
            self._save_state()
        log.info("replica_adopted", volume=volume, source=path, size=size, data_bytes=copied)
        return True

    def promote(self, volume: str, *, force: bool = False) -> Replica:
        """Make the replica of `volume` the primary copy: exported read-write as VOLUME over NBD (writes
        go through the engine, so snapshots and backups go on), mirrored writes refused from now on.

        Refused while a primary is connected or a resync is under way, unless `force`. The replica's
        data becomes a new generation: the old primary, when it returns, is refused as out of date.
        """
        replica = self.replica(volume)
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
        with self._lock:
            before = (replica.promoted_at, replica.generation, replica.state)
            replica.promoted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            base = replica.generation
            replica.generation = str(uuid.uuid4())
            replica.state = UPTODATE
            try:
                self._save_state()
            except StandbyError:
                replica.promoted_at, replica.generation, replica.state = before
                raise
            self._exports[volume] = replica.volume
        log.warning(
            "volume_promoted", volume=volume, generation=replica.generation, base_generation=base, force=force
        )
        return replica

    def export_names(self) -> list[str]:
        return sorted(self._exports)


def _create_sparse(volume: str, path: str, size: int) -> None:
    """Create the replica file of `volume`: `size` bytes, sparse. A size the filesystem cannot hold
    (EFBIG, or beyond what a file offset can express) is the primary's bad argument, not the standby's
    failure; on any error nothing is left behind."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except (OSError, OverflowError) as e:
        os.close(fd)
        os.unlink(path)
        if isinstance(e, OverflowError) or e.errno in (errno.EFBIG, errno.EINVAL):
            raise InvalidArgument(
                detail=f"volume {volume!r}: size {size} is more than the standby's filesystem can hold"
            ) from e
        raise DeviceError(path=path, detail=f"resize to {size}: {e.strerror}") from e
    os.close(fd)


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

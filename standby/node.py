"""The standby node: a data directory of replicas and one preservation store, and what the services do
with them (handshake, ordered apply, flush barriers, snapshots, status).

Layout of ``--data-dir``::

    standby.json          identity of this standby (a UUID), written once
    state.json            per volume: whether its replica is inconsistent (a resync is under way)
    preservation.store    the preservation store (copies, index, snapshot table) of every volume
    replicas/NAME.img     one sparse replica file per volume, created at the volume's first handshake

The node is thread-safe: gRPC threads call it concurrently. The engine serialises its own state; the
node adds one lock for its tables and makes sure at most one Mirror stream applies to a volume.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from standbylib.blockdev import Device, check_block_size, open_file_device
from standbylib.errors import (
    AlreadyExists,
    InvalidArgument,
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

UPTODATE, INCONSISTENT, DEFERRED = "uptodate", "inconsistent", "deferred"


class SplitBrain(RequestError):
    template = (
        "volume {volume!r}: split brain: the standby holds generation {standby}, which the primary does not "
        "know (its generation is {primary}, the last one it shared with this standby {base}); both sides "
        "were changed since they last agreed. To keep the primary's data, restart it with "
        "--discard-standby-data (the standby's replica is overwritten by a full resync)"
    )


class Busy(AlreadyExists):
    template = "volume {volume!r} is already being mirrored by primary {primary}; one primary per volume"


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

    def lag_seconds(self, now: float | None = None) -> float:
        """0 while the replica follows the primary; else how long since it last did (how stale it may be)."""
        if self.connected and self.state == UPTODATE and not self.deferred_reason:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.in_sync_at)

    @property
    def status(self) -> str:
        """``uptodate``, ``inconsistent`` (a resync is under way) or ``deferred`` (writes held back)."""
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
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._exports: dict[str, Snapshot] = {}
        os.makedirs(os.path.join(self.data_dir, REPLICA_DIR), exist_ok=True)
        self.id = self._identity()
        self._saved = self._load_state()
        self.capacity = parse_capacity(capacity, self.data_dir)
        self.store = PreservationStore.open(self.store_path, self.capacity, on_full=on_full)
        try:
            for name in self.store.volume_names():
                self._attach_existing(name)
        except BaseException:
            self.close()
            raise

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
            r.name: {"inconsistent": r.state == INCONSISTENT, "generation": r.generation}
            for r in self._replicas.values()
        }
        replace_file(os.path.join(self.data_dir, STATE_FILE), json.dumps({"volumes": state}).encode())

    def _set_state(self, replica: Replica, state: str, generation: str | None = None) -> None:
        if replica.state == state and (generation is None or generation == replica.generation):
            return
        with self._lock:
            old = replica.state
            replica.state = state
            if generation is not None:
                replica.generation = generation
            self._save_state()
        log.info("replica_state", volume=replica.name, old=old, new=state, generation=replica.generation)

    def _attach_existing(self, name: str) -> None:
        path = self.replica_path(name)
        if not os.path.exists(path):
            raise StandbyError(
                detail=f"the preservation store knows volume {name!r} but its replica {path} is missing"
            )
        device = open_file_device(path)
        block_size = self.store.volume_records[name].block_size
        volume = self.store.attach(name, device, block_size=block_size)
        replica = Replica(name=name, path=path, device=device, volume=volume)
        saved = self._saved.get(name, {})
        replica.generation = str(saved.get("generation", ""))
        if saved.get("inconsistent"):
            replica.state = INCONSISTENT
        self._replicas[name] = replica
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
    ) -> tuple[Replica, bool, bool]:
        """The replica of `volume` (created, sparse, at first contact), whether it was created, and
        whether it needs a full sync.

        Generations tell whose data is newer: the replica may hold the primary's current generation
        (in sync) or its base (older: the primary resyncs what its bitmap marked). Anything else means
        the histories diverged: refused as a split brain unless `discard` (then a full sync).
        """
        replica, created = self._handshake(volume, size, block_size)
        held = replica.generation
        if created or discard or not held:
            reason = "new replica" if created else "discarded" if discard else "never completed a sync"
            if held or not created:
                log.warning("full_sync", volume=volume, reason=reason, generation=held)
            self._set_state(replica, INCONSISTENT, generation="")
            return replica, created, True
        if held in (generation, base_generation):
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
            device = open_file_device(path, size)
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
        # Each stream numbers its batches afresh from `first_sequence`: what a broken stream did not
        # deliver, the primary resends from its write-intent bitmap, not by batch number.
        replica.applied_sequence = first_sequence - 1
        replica.primary_id = primary_id
        replica.connected = True
        if resync:
            replica.pending_generation = generation
            self._set_state(replica, INCONSISTENT)
        elif generation and replica.state != INCONSISTENT:
            self._set_state(replica, replica.state, generation=generation)
        log.info("mirror_connected", volume=volume, primary=primary_id, first_sequence=first_sequence)
        return replica

    def close_stream(self, replica: Replica) -> None:
        if replica.state == UPTODATE and not replica.deferred_reason:
            replica.in_sync_at = time.time()
        replica.connected = False
        replica.stream_lock.release()
        log.info("mirror_disconnected", volume=replica.name, applied_sequence=replica.applied_sequence)

    def apply(
        self, replica: Replica, sequence: int, ops: Sequence[WriteOp], flush: bool, uptodate: bool = False
    ) -> bool:
        """Apply batch `sequence` to the replica; False when it had been applied already.

        `uptodate` ends a resync: the replica is made durable and becomes up to date.

        Every write is checked before anything is applied: a batch with one bad write changes nothing.
        """
        if sequence <= replica.applied_sequence:
            return False
        if sequence != replica.applied_sequence + 1:
            raise InvalidArgument(
                detail=f"volume {replica.name!r}: batch {sequence} arrived, "
                f"{replica.applied_sequence + 1} expected"
            )
        bs, size = replica.block_size, replica.size
        nbytes = 0
        for offset, data in ops:
            length = data if isinstance(data, int) else len(data)
            if length <= 0 or offset % bs or length % bs:
                raise InvalidArgument(
                    detail=f"volume {replica.name!r}: write [{offset}, +{length}) is not aligned to its "
                    f"block size {bs}"
                )
            if offset + length > size:
                raise OutOfRange(offset=offset, length=length, size=size)
            nbytes += length
        start = time.perf_counter()
        try:
            if ops:
                replica.volume.write_batch(ops)
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
        if replica.state == UPTODATE:
            replica.in_sync_at = time.time()
        replica.applied_bytes += nbytes
        replica.applied_batches += 1
        self.metrics.observe_apply(replica.name, time.perf_counter() - start, nbytes)
        return True

    # -- snapshots ---------------------------------------------------------------------------------------

    def create_snapshot(
        self, volume: str, name: str | None, *, writable: bool = False, capacity: int | None = None
    ) -> SnapshotInfo:
        replica = self.replica(volume)
        if replica.state == INCONSISTENT:
            raise ReplicaInconsistent(volume=volume)
        snap = replica.volume.create_snapshot(name or None, writable=writable, capacity=capacity)
        with self._lock:
            self._exports[f"{volume}@{snap.name}"] = snap
        info = snap.info()
        log.info("snapshot_created", volume=volume, snapshot=snap.name, writable=writable, capacity=capacity)
        return info

    def delete_snapshot(self, volume: str, name: str) -> None:
        replica = self.replica(volume)
        replica.volume.delete_snapshot(name)
        with self._lock:
            self._exports.pop(f"{volume}@{name}", None)
        log.info("snapshot_deleted", volume=volume, snapshot=name)

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

    def export(self, name: str) -> Snapshot | None:
        return self._exports.get(name)

    def export_names(self) -> list[str]:
        return sorted(self._exports)

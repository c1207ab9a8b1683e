"""A replica: one volume's copy on the standby and its replication state.

`Replica` is the record the node's parts share: the replica table (`standby.replicas`) creates it and
saves its durable fields (`DURABLE`, in ``state.json``), a primary's stream (`standby.streams`) moves its
sequence, counters and health, failover (`standby.failover`) promotes, rolls back and demotes it.
Its status is one of `UPTODATE`, `INCONSISTENT` (a resync is under way), `DEFERRED` (writes held back),
`PROMOTED` (the primary copy since a failover) or `FAILBACK` (demoted: the old primary has yet to pull
what changed while it was promoted).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from standby.tracker import ChangeTracker
from standbylib.blockdev import Device
from standbylib.snapshot.volume import Volume

UPTODATE, INCONSISTENT, DEFERRED, PROMOTED = "uptodate", "inconsistent", "deferred", "promoted"
FAILBACK = "failback"
#: Every status a replica can report (`Replica.status`).
STATES = (UPTODATE, INCONSISTENT, DEFERRED, PROMOTED, FAILBACK)
#: The fields saved in ``state.json`` (`standby.statefiles`), and changed only through `Replicas.change`.
DURABLE = (
    "state",
    "generation",
    "promoted_at",
    "promoted_from",
    "rolled_back_to",
    "kept_snapshot",
    "rollback_pending",
    "failback",
    "owner",
    "removing",
)


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
    apply_lock: threading.Lock = field(default_factory=threading.Lock)  # a batch being applied; promote
    promoted_at: str = ""  # when `standbyctl promote` made the replica the primary copy (RFC 3339)
    promoted_from: str = ""  # the generation it held then (the old primary's): whom a failback serves
    rolled_back_to: str = ""  # the snapshot `promote --at` rolled it back to
    kept_snapshot: str = ""  # the snapshot keeping the state that rollback replaced
    rollback_pending: bool = False  # the rollback has not completed (resumed at start)
    failback: bool = False  # demoted: the old primary has yet to pull what `tracker` marks
    owner: str = ""  # the primary (its id) that mirrors this volume; another needs `standbyctl takeover`
    removing: bool = False  # `standbyctl remove` began removing it (finished at start if cut short)
    tracker: ChangeTracker | None = None  # while promoted and until the failback completes
    rollback_remaining: int = 0  # bytes of a rollback under way not written back yet
    # The primary's resync as its batches report it: what it has still to send, the most it had (since
    # the resync began), and when the first report came.
    resync_remaining: int = 0
    resync_total: int = 0
    resync_since: float = 0.0
    last_error: str = ""  # why the last handshake, stream or batch was refused; "" once a batch is applied
    last_reason: str = ""  # its `refusal_reason`

    def note_resync(self, remaining: int, done: bool = False) -> None:
        """A batch's report of the primary's resync (`remaining` bytes to send; 0: none)."""
        if done:
            self.resync_remaining = self.resync_total = 0
            self.resync_since = 0.0
            return
        if not remaining:  # all sent (100 % until the end-of-resync marker), or no resync at all
            self.resync_remaining = 0
            return
        if not self.resync_total:
            self.resync_since = time.monotonic()
        self.resync_remaining = remaining
        self.resync_total = max(self.resync_total, remaining)

    def resync_progress(self) -> tuple[float, float] | None:
        """The running resync's fraction done and the seconds it may still take (at its pace so far; 0
        when not known yet), or None when no resync is reported."""
        if not self.resync_total:
            return None
        done = self.resync_total - self.resync_remaining
        elapsed = time.monotonic() - self.resync_since
        eta = self.resync_remaining * elapsed / done if done and elapsed > 0 else 0.0
        return done / self.resync_total, eta

    def lag_seconds(self, now: float | None = None) -> float:
        """0 while the replica follows the primary; else how long since it last did (how stale it may be)."""
        if self.connected and self.state == UPTODATE and not self.deferred_reason:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.in_sync_at)

    @property
    def status(self) -> str:
        """``uptodate``, ``inconsistent`` (a resync is under way), ``deferred`` (writes held back) or
        ``promoted`` (the primary copy since a failover) or ``failback`` (demoted, not pulled yet)."""
        if self.promoted_at:
            return PROMOTED
        if self.failback:
            return FAILBACK
        return DEFERRED if self.deferred_reason else self.state

    @property
    def size(self) -> int:
        return self.volume.size

    @property
    def block_size(self) -> int:
        return self.volume.block_size

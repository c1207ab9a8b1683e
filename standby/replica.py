"""A replica: one volume's copy on the standby and its replication state.

`Replica` is the record the node's parts share: the replica table (`standby.replicas`) creates it and
saves its durable fields (`state`, `generation`, `promoted_at`, in ``state.json``), a primary's stream
(`standby.streams`) moves its sequence, counters and health, failover (`standby.failover`) promotes it.
Its status is one of `UPTODATE`, `INCONSISTENT` (a resync is under way), `DEFERRED` (writes held back)
or `PROMOTED` (the primary copy since a failover).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from standbylib.blockdev import Device
from standbylib.snapshot.volume import Volume

UPTODATE, INCONSISTENT, DEFERRED, PROMOTED = "uptodate", "inconsistent", "deferred", "promoted"


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

"""Refusals of a primary's handshake, stream or batch: counted by volume and reason (the metric
``standby_replication_refusals_total``), the last one remembered on its replica (``standbyctl status``).

Callers log a refusal when its reason differs from the previous one's, so a primary retrying against
the same cause makes one log line, not one a second.
"""

from __future__ import annotations

from standby.failover import FailbackRefused, Promoted
from standby.handshake import SplitBrain, TakeoverRequired
from standby.replicas import Replicas
from standby.streams import Busy
from standbylib.errors import (
    DeviceError,
    DiskFull,
    PreservationDeferred,
    ReplicaInconsistent,
    RequestError,
    StandbyError,
    VolumeMismatch,
)

#: The `reason` label of a refusal (standby_replication_refusals_total), by error class, most specific first.
REFUSAL_REASONS: tuple[tuple[type[StandbyError], str], ...] = (
    (DiskFull, "disk_full"),
    (PreservationDeferred, "deferred"),
    (SplitBrain, "split_brain"),
    (Promoted, "promoted"),
    (FailbackRefused, "failback"),
    (Busy, "busy"),
    (TakeoverRequired, "takeover"),
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


class Refusals:
    """The refusals counted so far for the volumes of `replicas`."""

    def __init__(self, replicas: Replicas) -> None:
        self._replicas = replicas
        self._counts: dict[tuple[str, str], int] = {}  # by (volume, reason)

    def count(self, volume: str, exc: BaseException) -> bool:
        """Count a refusal of a primary's handshake, stream or batch for `volume` and remember why; True
        when the reason differs from the previous refusal's (callers log state changes, not attempts)."""
        reason = refusal_reason(exc)
        with self._replicas.lock:
            replica = self._replicas.get(volume)
            # A name no replica has is counted under "": any client can make up names.
            key = (volume if replica is not None else "", reason)
            self._counts[key] = self._counts.get(key, 0) + 1
            if replica is None:
                return True
            new = replica.last_reason != reason
            replica.last_error, replica.last_reason = str(exc), reason
            return new

    def counts(self) -> dict[tuple[str, str], int]:
        """Refusals by (volume, reason); the volume is "" for names no replica has."""
        with self._replicas.lock:
            return dict(self._counts)

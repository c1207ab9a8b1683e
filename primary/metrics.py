"""The primary's Prometheus metrics (docs/MONITORING.md)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from primary.mirror import STATES, Mirror
from standbylib.runtime.metrics import LATENCY_BUCKETS


class PrimaryMetrics:
    def __init__(self, registry: CollectorRegistry, mode: str) -> None:
        self.mode = mode
        self._write_children: dict[str, tuple[Any, Any]] = {}
        self.write_latency = Histogram(
            "standby_write_latency_seconds",
            "Time from a client's write (or zero/trim) reaching the primary to its answer; in sync mode "
            "this includes the standby applying it.",
            ["volume", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.written = Counter(
            "standby_written_bytes",
            "Bytes clients wrote (or zeroed) through the primary.",
            ["volume"],
            registry=registry,
        )
        self.mirrored = Counter(
            "standby_mirrored_bytes",
            "Bytes of writes and zeroed ranges sent to the standby (whole blocks).",
            ["volume"],
            registry=registry,
        )
        self.batches = Counter(
            "standby_mirror_batches",
            "Replication batches sent to the standby.",
            ["volume"],
            registry=registry,
        )
        self.up = Gauge(
            "standby_replication_connected",
            "1 while the standby acknowledges the Mirror stream's batches (a stream whose batches are "
            "refused, or that is still resending after an outage, is not connected yet).",
            ["volume"],
            registry=registry,
        )
        self.state = Gauge(
            "standby_replication_state",
            "1 for the replication state the volume is in: connecting, connected, disconnected (the link "
            "or the standby is down), refused (the standby refuses its batches or its handshake), blocked "
            "(the volume file is not the one its data generations belong to), outdated (the standby took "
            "the volume over: fenced until a failback).",
            ["volume", "state"],
            registry=registry,
        )
        self.writes_fenced = Gauge(
            "standby_writes_fenced",
            "1 while the primary refuses its clients' writes because it is outdated (--fencing "
            "refuse-writes); 0 while it takes them (an outdated primary with --fencing keep-serving too).",
            ["volume"],
            registry=registry,
        )
        self.refusals = Counter(
            "standby_mirror_refusals",
            "Replication attempts the standby refused (a handshake, the stream or a batch answered with "
            "an error status), by gRPC status: resource_exhausted, failed_precondition, ...",
            ["volume", "reason"],
            registry=registry,
        )
        self.state_write_failures = Counter(
            "standby_state_write_failures",
            "Failures to write the primary's own state, by file: bitmap (the write-intent bitmap: a "
            "client write that cannot be marked fails) or generation (the data generations).",
            ["volume", "file"],
            registry=registry,
        )
        self.resent = Counter(
            "standby_resync_bytes",
            "Bytes resent to the standby by resyncs (regions marked in the write-intent bitmap).",
            ["volume"],
            registry=registry,
        )
        self.out_of_sync = Gauge(
            "standby_out_of_sync_bytes",
            "Bytes that may differ on the standby: bitmap regions with writes not yet acknowledged or "
            "changed while it was away, x the bitmap granularity.",
            ["volume"],
            registry=registry,
        )
        self.resync_remaining = Gauge(
            "standby_resync_remaining_bytes",
            "Bytes the resync still has to send (dirty regions x granularity).",
            ["volume"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "standby_mirror_in_flight_bytes",
            "Bytes submitted to the mirror and not yet acknowledged by the standby.",
            ["volume"],
            registry=registry,
        )

    def add_volume(self, volume: str, mirror: Mirror) -> None:
        """Create the volume's series (at 0, so they exist before its first write); the gauges read the
        mirror and its bitmap at every scrape."""
        self.written.labels(volume)
        self.mirrored.labels(volume)
        self.batches.labels(volume)
        self.resent.labels(volume)
        self.up.labels(volume).set(0)
        self.set_state(volume, "connecting")
        self.state_write_failures.labels(volume, "bitmap")
        self.state_write_failures.labels(volume, "generation")
        self.in_flight.labels(volume).set_function(mirror.in_flight_bytes)
        self.writes_fenced.labels(volume).set_function(lambda: 0 if mirror.writable() else 1)
        self.out_of_sync.labels(volume).set_function(mirror.bitmap.out_of_sync_bytes)
        self.resync_remaining.labels(volume).set_function(
            lambda: mirror.bitmap.dirty() * mirror.bitmap.granularity
        )

    def resynced(self, volume: str, nbytes: int) -> None:
        self.resent.labels(volume).inc(nbytes)

    def write_done(self, volume: str, seconds: float, nbytes: int) -> None:
        # Called for every client write: the labelled children are looked up once per volume.
        children = self._write_children.get(volume)
        if children is None:
            children = self._write_children[volume] = (
                self.write_latency.labels(volume, self.mode),
                self.written.labels(volume),
            )
        children[0].observe(seconds)
        children[1].inc(nbytes)

    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        self.mirrored.labels(volume).inc(nbytes)
        self.batches.labels(volume).inc()

    def connected(self, volume: str, up: bool) -> None:
        self.up.labels(volume).set(1 if up else 0)

    def set_state(self, volume: str, state: str) -> None:
        for name in STATES:
            self.state.labels(volume, name).set(1 if name == state else 0)

    def refused(self, volume: str, reason: str) -> None:
        self.refusals.labels(volume, reason).inc()

    def state_write_failed(self, volume: str, file: str) -> None:
        self.state_write_failures.labels(volume, file).inc()

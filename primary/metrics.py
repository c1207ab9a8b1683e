"""The primary's Prometheus metrics (ARCHITECTURE section 7)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from primary.mirror import Mirror
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
            "1 while the Mirror stream to the standby is open.",
            ["volume"],
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
        self.in_flight.labels(volume).set_function(mirror.in_flight_bytes)
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

"""The primary's Prometheus metrics (ARCHITECTURE section 7)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from standbylib.runtime.metrics import LATENCY_BUCKETS


class PrimaryMetrics:
    def __init__(self, registry: CollectorRegistry, mode: str) -> None:
        self.mode = mode
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
        self.in_flight = Gauge(
            "standby_mirror_in_flight_bytes",
            "Bytes submitted to the mirror and not yet acknowledged by the standby.",
            ["volume"],
            registry=registry,
        )

    def add_volume(self, volume: str, in_flight: Callable[[], float]) -> None:
        """Create the volume's series (at 0, so they exist before its first write); `in_flight` is read
        at every scrape."""
        self.written.labels(volume)
        self.mirrored.labels(volume)
        self.batches.labels(volume)
        self.up.labels(volume).set(0)
        self.in_flight.labels(volume).set_function(in_flight)

    def write_done(self, volume: str, seconds: float, nbytes: int) -> None:
        self.write_latency.labels(volume, self.mode).observe(seconds)
        self.written.labels(volume).inc(nbytes)

    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        self.mirrored.labels(volume).inc(nbytes)
        self.batches.labels(volume).inc()

    def connected(self, volume: str, up: bool) -> None:
        self.up.labels(volume).set(1 if up else 0)

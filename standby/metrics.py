"""The standby's Prometheus metrics (docs/MONITORING.md).

Gauges and counters that describe state are read from the node at scrape time (a custom collector),
so they can never drift from the truth: a snapshot's used bytes are its distinct preserved blocks x
block size, as the engine counts them. Only the apply latency is observed as it happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from standby.datachannel import REFUSAL_REASONS as CHANNEL_REFUSALS
from standby.node import StandbyNode
from standby.refusals import REFUSAL_REASONS
from standby.replica import STATES
from standbylib.runtime.metrics import LATENCY_BUCKETS


class StandbyMetrics:
    """What the node observes while it works; also registers the state collector."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.apply_latency = Histogram(
            "standby_apply_latency_seconds",
            "Time to apply one replication batch to the replica through the snapshot engine "
            "(preservation copies, store sync, origin writes; plus the flush for barriers).",
            ["volume"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

        self.channel_refusals = Counter(
            "standby_data_channel_refusals_total",
            "Connections to the data channel refused, by reason: tls (no TLS handshake), hello (no "
            "valid hello), token (unknown, used or expired), certificate (not the one of the gRPC "
            "call), protocol (a malformed frame), timeout, limit (too many connections).",
            ["reason"],
            registry=registry,
        )
        for reason in CHANNEL_REFUSALS:
            self.channel_refusals.labels(reason)
        self.limits = Counter(
            "standby_limit_reached_total",
            "Times the standby refused work at a limit of its own: grpc_mirror_streams (Mirror streams "
            "on gRPC, each holding a worker thread), data_channel_connections, data_channel_hellos "
            "(connections from one address that have not presented a token yet).",
            ["limit"],
            registry=registry,
        )
        for limit in ("grpc_mirror_streams", "data_channel_connections", "data_channel_hellos"):
            self.limits.labels(limit)

    def channel_refused(self, reason: str) -> None:
        self.channel_refusals.labels(reason).inc()

    def limit_reached(self, limit: str) -> None:
        self.limits.labels(limit).inc()

    def observe_apply(self, volume: str, seconds: float, nbytes: int) -> None:
        self.apply_latency.labels(volume).observe(seconds)

    def watch(self, node: StandbyNode) -> None:
        self.registry.register(StateCollector(node))


class StateCollector(Collector):
    def __init__(self, node: StandbyNode) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["volume", "snapshot"]
        used = GaugeMetricFamily(
            "standby_preservation_used_bytes",
            "Preserved bytes: per snapshot (labels volume, snapshot) its distinct preserved blocks x "
            "block size; without labels, the whole preservation store.",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            "standby_preservation_capacity_bytes",
            "Preservation capacity: per snapshot its limit (the store's unless one was given); "
            "without labels, the store's.",
            labels=labels,
        )
        fill = GaugeMetricFamily(
            "standby_preservation_fill_ratio",
            "used_bytes / capacity_bytes, per snapshot and (without labels) for the store; at 1 a "
            "snapshot is invalidated (or, with --on-full defer, replication is deferred).",
            labels=labels,
        )
        valid = GaugeMetricFamily(
            "standby_snapshot_valid",
            "1 while the snapshot reads its frozen image, 0 once invalidated.",
            labels=labels,
        )
        snapshots_info = GaugeMetricFamily(
            "standby_snapshot_created_timestamp_seconds",
            "When the snapshot was taken (Unix time).",
            labels=labels,
        )
        cow = CounterMetricFamily(
            "standby_cow_copies",
            "Blocks copied into the preservation store before being overwritten (one copy serves every "
            "snapshot that lacked the block).",
            labels=["volume"],
        )
        holes = CounterMetricFamily(
            "standby_cow_holes",
            "Blocks that were holes or zeros when first overwritten after a snapshot: preserved as hole "
            "entries, without data or store space.",
            labels=["volume"],
        )
        applied = CounterMetricFamily(
            "standby_applied_bytes", "Bytes of mirrored writes applied to the replica.", labels=["volume"]
        )
        batches = CounterMetricFamily(
            "standby_applied_batches", "Replication batches applied to the replica.", labels=["volume"]
        )
        connected = GaugeMetricFamily(
            "standby_replication_connected", "1 while a primary's Mirror stream is open.", labels=["volume"]
        )
        size = GaugeMetricFamily(
            "standby_volume_size_bytes", "Size of the replicated volume.", labels=["volume"]
        )
        lag = GaugeMetricFamily(
            "standby_replication_lag_seconds",
            "0 while the replica follows the primary (connected, up to date, nothing deferred); otherwise "
            "the seconds since it last did: how stale the standby's image may be.",
            labels=["volume"],
        )
        refusals = CounterMetricFamily(
            "standby_replication_refusals",
            "Handshakes, streams and batches of a primary that the standby refused, by reason: disk_full, "
            "deferred, split_brain, promoted, failback, busy, takeover, volume_mismatch, inconsistent, "
            "io_error, invalid_request, error.",
            labels=["volume", "reason"],
        )
        # Every reason of every volume from 0 (a counter that appears at 1 hides its first increase).
        counts = dict(self.node.refusals)
        for replica in self.node.replicas():
            for _kind, reason in REFUSAL_REASONS:
                counts.setdefault((replica.name, reason), 0)
        for (volume, reason), n in sorted(counts.items()):
            refusals.add_metric([volume, reason], n)
        write_failures = CounterMetricFamily(
            "standby_state_write_failures",
            "Failed saves of a state file of the data directory (state.json, leases.json), by file.",
            labels=["file"],
        )
        for file, n in sorted(self.node.state_write_failures.items()):
            write_failures.add_metric([file], n)
        problems = GaugeMetricFamily(
            "standby_problems",
            "Conditions an operator must act on now (standbyctl status lists them): state files that "
            "could not be saved.",
        )
        problems.add_metric([], len(self.node.problems()))
        state = GaugeMetricFamily(
            "standby_volume_state",
            "1 for the state the volume's replica is in: uptodate, inconsistent (a resync is under way), "
            "deferred (writes held back), promoted (the primary copy since a failover: no second copy), "
            "failback (demoted, waiting for its old primary to take back what changed).",
            labels=["volume", "state"],
        )
        tracked = GaugeMetricFamily(
            "standby_failback_tracked_bytes",
            "Bytes written while the volume was promoted (or changed by its rollback), which the old "
            "primary receives at the failback; 0 when there is no failback to come.",
            labels=["volume"],
        )
        for replica in self.node.replicas():
            name = replica.name
            for snap in replica.volume.snapshots():
                info = snap.info()
                key = [name, info.name]
                used.add_metric(key, info.preserved_bytes)
                capacity.add_metric(key, info.capacity_bytes)
                fill.add_metric(key, info.fill_ratio)
                valid.add_metric(key, 1 if info.valid else 0)
                snapshots_info.add_metric(key, _timestamp(info.created))
            cow.add_metric([name], replica.volume.cow_copies)
            holes.add_metric([name], replica.volume.cow_holes)
            applied.add_metric([name], replica.applied_bytes)
            batches.add_metric([name], replica.applied_batches)
            connected.add_metric([name], 1 if replica.connected else 0)
            size.add_metric([name], replica.size)
            lag.add_metric([name], replica.lag_seconds())
            for status in STATES:
                state.add_metric([name, status], 1 if replica.status == status else 0)
            tracked.add_metric([name], replica.tracker.tracked_bytes() if replica.tracker else 0)
        stats = self.node.store.stats()
        used.add_metric(["", ""], stats.used_bytes)
        capacity.add_metric(["", ""], stats.capacity_bytes)
        fill.add_metric(["", ""], stats.fill_ratio)
        yield from (used, capacity, fill, valid, snapshots_info, cow, applied, batches, connected, size, lag)
        yield from (refusals, write_failures, problems, state, tracked, holes)


def _timestamp(created: str) -> float:
    return datetime.strptime(created.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()

"""Metrics and health as an operator's Prometheus and load balancer see them; the values match the truth."""

from __future__ import annotations

import json

import grpc
import pytest
from e2e_support import BS, Appliance, MiB, qemu_io, rand
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(180)


def test_preservation_fill_equals_distinct_preserved_blocks(appliance: Appliance) -> None:
    a = appliance
    a.writer.write(0, rand(4 * MiB, seed=1))  # data everywhere the test overwrites later
    capacity = 8 * MiB
    a.standby.snapshot("vol0", "s1", "--capacity", "8MiB")

    # N distinct blocks of s1 overwritten, some several times and some partially
    n_blocks = {7, 8, 9, 10, 100, 101, 500, 1000, 1023}
    a.writer.many([(b * BS, rand(BS, seed=b)) for b in sorted(n_blocks)])
    a.writer.fill(8 * BS, 2 * BS, 0x10)  # blocks 8, 9 again
    a.writer.write(100 * BS + 17, rand(33, seed=3))  # block 100 again, partially
    a.writer.write(200 * BS + 4000, rand(200, seed=4))  # straddles blocks 200 and 201
    n_blocks |= {200, 201}
    n = len(n_blocks)

    m = a.standby.metrics()
    used = m.get("standby_preservation_used_bytes", volume="vol0", snapshot="s1")
    cap = m.get("standby_preservation_capacity_bytes", volume="vol0", snapshot="s1")
    fill = m.get("standby_preservation_fill_ratio", volume="vol0", snapshot="s1")
    assert used == n * BS, f"s1 used bytes {used}, truth {n} blocks x {BS} = {n * BS}"
    assert cap == capacity, f"s1 capacity {cap}, created with {capacity}"
    assert fill == pytest.approx(used / capacity), f"s1 fill {fill}, truth {used / capacity}"
    assert m.get("standby_snapshot_valid", volume="vol0", snapshot="s1") == 1
    listed = {s["name"]: s for s in a.standby.snapshots("vol0")}
    assert listed["s1"]["preserved_bytes"] == n * BS, listed["s1"]
    assert listed["s1"]["capacity_bytes"] == capacity, listed["s1"]

    # a second snapshot: blocks that s1 lacks are copied once for both; s1's own copies are older data
    a.standby.snapshot("vol0", "s2")
    m_blocks = {9, 10, 300, 301, 302}  # 9, 10 already preserved for s1
    a.writer.many([(b * BS, rand(BS, seed=1000 + b)) for b in sorted(m_blocks)])
    m2 = a.standby.metrics()
    s1_used = m2.get("standby_preservation_used_bytes", volume="vol0", snapshot="s1")
    s2_used = m2.get("standby_preservation_used_bytes", volume="vol0", snapshot="s2")
    assert s1_used == len(n_blocks | m_blocks) * BS, (
        f"s1 used {s1_used}, truth {len(n_blocks | m_blocks)} blocks"
    )
    assert s2_used == len(m_blocks) * BS, f"s2 used {s2_used}, truth {len(m_blocks)} blocks"
    copies = n + len(m_blocks)  # one copy per first write after each snapshot, shared by both
    assert m2.get("standby_cow_copies_total", volume="vol0") == copies
    store_used = m2.get("standby_preservation_used_bytes")
    store_cap = m2.get("standby_preservation_capacity_bytes")
    assert store_used == copies * BS, f"store used {store_used}, truth {copies} copies x {BS}"
    assert store_cap > 0
    assert m2.get("standby_preservation_fill_ratio") == pytest.approx(store_used / store_cap)


def test_replication_metrics_count_what_was_written(appliance: Appliance) -> None:
    a = appliance
    s0 = a.standby.metrics()
    p0 = a.primary.metrics()
    assert s0.get("standby_replication_connected", volume="vol0") == 1
    assert p0.get("standby_replication_connected", volume="vol0") == 1
    applied0 = s0.get("standby_applied_bytes_total", volume="vol0")
    batches0 = s0.get("standby_applied_batches_total", volume="vol0")
    # a labelled counter may appear only at its first increment: absent counts as 0 here
    mirrored0 = p0.find("standby_mirrored_bytes_total", volume="vol0") or 0.0

    a.writer.fill(0, MiB, 0x5A)
    a.writer.write(3 * MiB, rand(64 * 1024, seed=2))
    written = MiB + 64 * 1024

    s1 = a.standby.metrics()
    p1 = a.primary.metrics()
    assert s1.get("standby_applied_bytes_total", volume="vol0") - applied0 == written
    assert s1.get("standby_applied_batches_total", volume="vol0") > batches0
    assert p1.get("standby_mirrored_bytes_total", volume="vol0") - mirrored0 == written
    assert s1.total("standby_apply_latency_seconds_count") > 0
    assert p1.total("standby_write_latency_seconds_count") >= 2
    assert s1.get("standby_cow_copies_total", volume="vol0") == 0, "no snapshot: nothing to preserve"


def test_overflowing_a_snapshot_invalidates_it_and_loses_no_origin_write(appliance: Appliance) -> None:
    a = appliance
    a.writer.write(0, rand(MiB, seed=1))
    a.standby.snapshot("vol0", "small", "--capacity", "64KiB")  # 16 blocks
    a.writer.write(0, rand(MiB, seed=2))  # 256 blocks to preserve: overflow, never refused

    assert a.standby.replica("vol0").read_bytes() == a.model.freeze(), "an origin write was lost on overflow"
    snap = {s["name"]: s for s in a.standby.snapshots("vol0")}["small"]
    assert snap["valid"] is False, f"an overflowed snapshot must be invalid: {snap}"
    assert a.standby.metrics().get("standby_snapshot_valid", volume="vol0", snapshot="small") == 0
    cp = qemu_io(a.standby.uri("vol0@small"), "read 0 4k", check=False)
    assert cp.returncode != 0 or "failed" in cp.stdout + cp.stderr, (
        f"an invalid snapshot must fail reads (EIO):\n{cp.stdout}{cp.stderr}"
    )


def test_grpc_health_service_reports_serving(appliance: Appliance) -> None:
    with grpc.insecure_channel(appliance.standby.grpc) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_daemon_logs_are_json_lines_with_an_event_name(appliance: Appliance) -> None:
    a = appliance
    a.writer.fill(0, MiB, 0x01)
    a.standby.snapshot("vol0", "logged")
    a.standby.ctl("snapshot", "delete", "vol0", "logged")
    for d in (a.primary.daemon, a.standby.daemon):
        assert d.stop() == 0, f"{d.name} did not exit 0 on SIGTERM"
        bad = [
            line
            for line in d.lines
            if line.strip() and not (line.startswith("{") and '"event"' in line and _is_json_object(line))
        ]
        assert not bad, f"{d.name}: stderr lines that are not JSON objects with an event:\n" + "\n".join(
            bad[:10]
        )
        services = {e.get("service") for e in d.events if e.get("event") == "listening"}
        want = {"grpc", "nbd", "metrics"} if d is a.standby.daemon else {"nbd", "metrics"}
        assert want <= services, f"{d.name} logged listening for {services}"


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False

"""The primary against a standby that takes the handshake but refuses every batch (a full disk): it is
not `connected`, says why, counts the refusals, retries with a growing backoff (not several times a
second), and recovers once the standby takes batches again; the backoff starts afresh only after a
healthy stream. In process, real gRPC on loopback."""

from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc
from primary_support import (
    BS,
    MiB,
    RecordingMetrics,
    close,
    files_equal,
    mirrored,
    settled,
    start_wrapped_rig,
    wait_until,
)

from primary.mirror import BACKOFF_FIRST
from standbylib.errors import DiskFull
from standbylib.rpc.v1 import replication_pb2


class Refusing:
    """Wraps the standby's `apply`: while `refuse` is set, every batch holding writes fails as a full disk
    does (RESOURCE_EXHAUSTED, nothing applied)."""

    def __init__(self) -> None:
        self.refuse = threading.Event()
        self.refused = 0

    def __call__(self, node, apply):
        def wrapped(replica, sequence, ops, flush, uptodate=False, mismatched=None):
            if self.refuse.is_set() and ops:
                self.refused += 1
                raise DiskFull(path=replica.path, detail="write: No space left on device")
            return apply(replica, sequence, ops, flush, uptodate, mismatched)

        return wrapped


def test_a_standby_refusing_every_batch_is_not_connected_and_gets_few_attempts(tmp_path):
    refusing = Refusing()
    rig = start_wrapped_rig(str(tmp_path / "standby"), refusing)
    metrics = RecordingMetrics()
    dev = mirrored(tmp_path, rig.target, metrics=metrics)
    m = dev.mirror
    try:
        dev.write(0, os.urandom(64 * 1024))
        wait_until(lambda: settled(dev), what="the first sync")
        assert m.state == "connected" and metrics.up

        refusing.refuse.set()
        dev.write(MiB, os.urandom(BS))  # refused on the standby: answered, tracked in the bitmap
        wait_until(lambda: m.state == "refused", what="the refused state")
        assert not m.connected and not metrics.up
        assert m.last_error.startswith("RESOURCE_EXHAUSTED"), m.last_error
        assert metrics.refusals.get("resource_exhausted", 0) >= 1
        # The stream before was healthy: the first retry is fast.
        assert m.retry_in <= BACKOFF_FIRST
        states_before = len(metrics.states)
        handshakes = m.handshakes

        # Four seconds of refusals: a handful of attempts (each one a handshake and a refused resync),
        # not the 20-40 of a backoff reset by every handshake. Connected never, even for a moment.
        started = time.monotonic()
        while time.monotonic() - started < 4.0:
            assert not metrics.up and not m.connected, "a refusing standby was reported connected"
            assert m.handshakes - handshakes <= 5, f"{m.handshakes - handshakes} attempts in 4 s"
            time.sleep(0.05)
        attempts = m.handshakes - handshakes
        assert attempts >= 2, f"only {attempts} attempts in 4 s"
        assert metrics.states[states_before:] == [], f"the state flapped: {metrics.states[states_before:]}"
        assert m.retry_in > BACKOFF_FIRST, "the backoff did not grow"
        assert refusing.refused >= attempts

        # The cause removed: the next attempt resyncs what was tracked, and the mirror is connected.
        refusing.refuse.clear()
        wait_until(lambda: settled(dev), timeout=30, what="the recovery")
        assert metrics.states[-1] == "connected" and metrics.up
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
    finally:
        close(dev)
        rig.stop()
        rig.node.close()


def test_the_backoff_starts_afresh_only_after_a_healthy_stream(tmp_path):
    refusing = Refusing()
    rig = start_wrapped_rig(str(tmp_path / "standby"), refusing)
    dev = mirrored(tmp_path, rig.target)
    m = dev.mirror
    try:
        wait_until(lambda: settled(dev), what="the first sync")
        refusing.refuse.set()
        for i in range(3):  # three refusals in a row: the pause grows each time
            dev.write(i * MiB, os.urandom(BS))
            failures = m._failures
            wait_until(lambda f=failures: m._failures > f, what="a refusal")
        grown = m.retry_in
        assert grown > 2 * BACKOFF_FIRST, grown
        refusing.refuse.clear()
        wait_until(lambda: settled(dev), timeout=30, what="the recovery")
        # Healthy again: one more refusal is retried quickly.
        refusing.refuse.set()
        dev.write(3 * MiB, os.urandom(BS))
        wait_until(lambda: m.state == "refused", what="the refusal")
        assert m.retry_in <= BACKOFF_FIRST
    finally:
        close(dev)
        rig.stop()
        rig.node.close()


def test_a_standby_silent_while_the_stream_opens_is_timed_out_and_writers_go_on(tmp_path):
    """The standby takes the handshake, then never answers the stream's opening (a link that stalls
    right there): no batch is in flight, yet after the ack timeout the primary drops the stream and says
    why, and a sync-mode client write returns (tracked in the bitmap) instead of waiting for ever."""
    release = threading.Event()
    opened = threading.Event()

    def handshake(request, context):
        return replication_pb2.HandshakeReply(
            volume=request.volume, size=request.size, block_size=request.block_size, standby_id="s"
        )

    def mirror(requests, context):
        next(requests)  # the open, asking for the data channel: never answered
        opened.set()
        release.wait(60)
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "standbyappliance.v1.Replication",
                {
                    "Handshake": grpc.unary_unary_rpc_method_handler(
                        handshake,
                        request_deserializer=replication_pb2.HandshakeRequest.FromString,
                        response_serializer=replication_pb2.HandshakeReply.SerializeToString,
                    ),
                    "Mirror": grpc.stream_stream_rpc_method_handler(
                        mirror,
                        request_deserializer=replication_pb2.MirrorRequest.FromString,
                        response_serializer=replication_pb2.MirrorReply.SerializeToString,
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    dev = mirrored(tmp_path, f"127.0.0.1:{port}", ack_timeout=1.0)
    try:
        assert opened.wait(30), "the primary never opened its stream"
        done = threading.Event()
        writer = threading.Thread(target=lambda: (dev.write(0, b"w" * BS), done.set()), daemon=True)
        writer.start()
        assert done.wait(20), "a client write waited for a standby that never answered the opening"
        wait_until(lambda: dev.mirror.last_error.startswith("NOT_ANSWERING"), what="the stream dropped")
        assert dev.mirror.state == "disconnected"
        assert dev.mirror.bitmap.out_of_sync_bytes() > 0  # the write is tracked for the next resync
    finally:
        release.set()
        close(dev)
        server.stop(0)

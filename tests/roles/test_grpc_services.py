"""The standby's gRPC services with raw stubs: every bad request gets its status code and changes nothing."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from standby_rig import replica_digest

from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2, replication_pb2_grpc

MiB = 1 << 20


def open_msg(volume="vol0", first=1, primary="p1"):
    return replication_pb2.MirrorRequest(
        open=replication_pb2.MirrorOpen(volume=volume, first_sequence=first, primary_id=primary)
    )


def batch_msg(seq, writes, flush=False):
    return replication_pb2.MirrorRequest(
        batch=replication_pb2.Batch(
            sequence=seq,
            writes=[
                replication_pb2.Write(offset=o, zero_length=d)
                if isinstance(d, int)
                else replication_pb2.Write(offset=o, data=d)
                for o, d in writes
            ],
            flush=flush,
        )
    )


@pytest.fixture
def stubs(rig):
    channel = grpc.insecure_channel(rig.target)
    yield (
        replication_pb2_grpc.ReplicationStub(channel),
        control_pb2_grpc.ControlStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    channel.close()


def handshake(repl, volume="vol0", size=MiB, block_size=4096):
    return repl.Handshake(
        replication_pb2.HandshakeRequest(volume=volume, size=size, block_size=block_size, primary_id="p1")
    )


def test_health_is_serving(stubs):
    assert stubs[2].Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_mirror_applies_and_acknowledges_each_batch(rig, stubs):
    repl = stubs[0]
    reply = handshake(repl)
    assert reply.created and reply.size == MiB and reply.standby_id == rig.node.id
    acks = list(
        repl.Mirror(
            iter([open_msg(), batch_msg(1, [(0, b"a" * 4096)]), batch_msg(2, [(8192, 4096)], flush=True)])
        )
    )
    assert [(a.sequence, a.durable) for a in acks] == [(1, False), (2, True)]
    assert rig.node.replica("vol0").volume.read(0, 4096) == b"a" * 4096


@pytest.mark.parametrize(
    ("writes", "code"),
    [
        ([(0, b"a" * 4096), (512, b"b" * 4096)], grpc.StatusCode.INVALID_ARGUMENT),
        ([(0, b"a" * 4096), (4096, b"b" * 1000)], grpc.StatusCode.INVALID_ARGUMENT),
        ([(0, b"a" * 4096), (MiB, b"b" * 4096)], grpc.StatusCode.OUT_OF_RANGE),
        ([(MiB - 4096, 8192)], grpc.StatusCode.OUT_OF_RANGE),
    ],
)
def test_a_bad_batch_ends_the_stream_with_its_status_and_applies_nothing(rig, stubs, writes, code):
    repl = stubs[0]
    handshake(repl)
    list(repl.Mirror(iter([open_msg(), batch_msg(1, [(0, b"x" * 8192)], flush=True)])))
    before = replica_digest(rig.node)
    with pytest.raises(grpc.RpcError) as err:
        list(repl.Mirror(iter([open_msg(first=2), batch_msg(2, writes)])))
    assert err.value.code() == code
    assert "vol0" in err.value.details() or "outside" in err.value.details()
    assert replica_digest(rig.node) == before
    # The volume is free again for a correct stream.
    acks = list(repl.Mirror(iter([open_msg(first=2), batch_msg(2, [(0, b"y" * 4096)])])))
    assert [a.sequence for a in acks] == [2]


def test_stream_protocol_errors(rig, stubs):
    repl = stubs[0]
    handshake(repl)
    with pytest.raises(grpc.RpcError) as err:
        list(repl.Mirror(iter([batch_msg(1, [(0, b"a" * 4096)])])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(repl.Mirror(iter([open_msg(volume="nope")])))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(repl.Mirror(iter([open_msg(), open_msg()])))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("size", "block_size", "code"),
    [
        (MiB, 1000, grpc.StatusCode.INVALID_ARGUMENT),
        (MiB + 1, 4096, grpc.StatusCode.INVALID_ARGUMENT),
        (0, 4096, grpc.StatusCode.INVALID_ARGUMENT),
        (2 * MiB, 4096, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_handshake_errors(stubs, size, block_size, code):
    repl = stubs[0]
    handshake(repl)
    with pytest.raises(grpc.RpcError) as err:
        handshake(repl, size=size, block_size=block_size)
    assert err.value.code() == code


def test_an_error_about_a_huge_name_is_cut_short_and_keeps_its_code(stubs):
    repl = stubs[0]
    with pytest.raises(grpc.RpcError) as err:
        handshake(repl, volume="x" * 20000)
    # gRPC refuses metadata over 16 KiB: an echo of the whole name would turn into RESOURCE_EXHAUSTED
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters in all" in err.value.details() and len(err.value.details()) <= 4096


def initial_sync(repl):
    """What a primary does with a new replica: a resync stream that ends with an `uptodate` batch."""
    handshake(repl)
    opening = replication_pb2.MirrorRequest(
        open=replication_pb2.MirrorOpen(
            volume="vol0", first_sequence=1, primary_id="p1", resync=True, generation="g1"
        )
    )
    done = replication_pb2.MirrorRequest(batch=replication_pb2.Batch(sequence=1, uptodate=True))
    list(repl.Mirror(iter([opening, done])))


def test_control_errors_have_their_codes_and_messages(stubs):
    repl, ctl, _ = stubs
    initial_sync(repl)
    ctl.CreateSnapshot(control_pb2.CreateSnapshotRequest(volume="vol0", name="s1"))
    cases = [
        (
            ctl.CreateSnapshot,
            control_pb2.CreateSnapshotRequest(volume="vol0", name="s1"),
            "ALREADY_EXISTS",
            "s1",
        ),
        (ctl.CreateSnapshot, control_pb2.CreateSnapshotRequest(volume="nope"), "NOT_FOUND", "nope"),
        (
            ctl.CreateSnapshot,
            control_pb2.CreateSnapshotRequest(volume="vol0", name="a@b"),
            "INVALID_ARGUMENT",
            "a@b",
        ),
        (ctl.DeleteSnapshot, control_pb2.DeleteSnapshotRequest(volume="vol0", name="zz"), "NOT_FOUND", "zz"),
        (
            ctl.DeleteSnapshot,
            control_pb2.DeleteSnapshotRequest(volume="nope", name="s1"),
            "NOT_FOUND",
            "nope",
        ),
        (ctl.ListSnapshots, control_pb2.ListSnapshotsRequest(volume="nope"), "NOT_FOUND", "nope"),
    ]
    for call, request, code, word in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code().name == code
        assert word in err.value.details()
    listed = ctl.ListSnapshots(control_pb2.ListSnapshotsRequest())
    assert [(s.name, s.export) for s in listed.snapshots] == [("s1", "vol0@s1")]
    status = ctl.Status(control_pb2.StatusRequest())
    assert [(v.name, v.state, v.connected) for v in status.volumes] == [("vol0", "uptodate", False)]


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x12\x7f\x08", b"\x0a\x05abc"])
def test_malformed_messages_are_invalid_argument_and_the_server_goes_on(rig, stubs, garbage):
    channel = grpc.insecure_channel(rig.target)
    try:
        raw_handshake = channel.unary_unary(
            "/standbyappliance.v1.Replication/Handshake", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            raw_handshake(garbage)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed HandshakeRequest" in err.value.details()
        raw_mirror = channel.stream_stream(
            "/standbyappliance.v1.Replication/Mirror", request_serializer=None, response_deserializer=None
        )
        handshake(stubs[0])
        opening = open_msg().SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            list(raw_mirror(iter([opening, garbage])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed MirrorRequest" in err.value.details()
    finally:
        channel.close()
    # Still serving, and the volume is free for a proper stream.
    acks = list(stubs[0].Mirror(iter([open_msg(), batch_msg(1, [(0, b"a" * 4096)])])))
    assert [a.sequence for a in acks] == [1]


def test_received_acks_come_before_applied_acks(rig, stubs):
    repl = stubs[0]
    handshake(repl)
    opening = replication_pb2.MirrorRequest(
        open=replication_pb2.MirrorOpen(volume="vol0", first_sequence=1, primary_id="p1", received_acks=True)
    )
    replies = list(
        repl.Mirror(iter([opening, batch_msg(1, [(0, b"a" * 4096)]), batch_msg(2, [(4096, 4096)])]))
    )
    for seq in (1, 2):
        kinds = [r.received for r in replies if r.sequence == seq]
        assert kinds == [True, False], replies
    assert rig.node.replica("vol0").volume.read(0, 4096) == b"a" * 4096


def test_a_resync_makes_the_replica_inconsistent_until_uptodate_even_across_a_restart(tmp_path):
    from standby_rig import start_rig

    data = str(tmp_path / "standby")
    rig = start_rig(data)
    channel = grpc.insecure_channel(rig.target)
    repl, ctl = replication_pb2_grpc.ReplicationStub(channel), control_pb2_grpc.ControlStub(channel)
    handshake(repl)
    opening = replication_pb2.MirrorRequest(
        open=replication_pb2.MirrorOpen(volume="vol0", first_sequence=1, primary_id="p1", resync=True)
    )
    list(repl.Mirror(iter([opening, batch_msg(1, [(0, b"r" * 4096)])])))
    assert ctl.Status(control_pb2.StatusRequest()).volumes[0].state == "inconsistent"
    with pytest.raises(grpc.RpcError) as err:
        ctl.CreateSnapshot(control_pb2.CreateSnapshotRequest(volume="vol0", name="s"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "resync" in err.value.details()
    channel.close()
    rig.stop()
    rig.node.close()

    rig = start_rig(data)
    channel = grpc.insecure_channel(rig.target)
    repl, ctl = replication_pb2_grpc.ReplicationStub(channel), control_pb2_grpc.ControlStub(channel)
    try:
        assert ctl.Status(control_pb2.StatusRequest()).volumes[0].state == "inconsistent"
        done = replication_pb2.MirrorRequest(
            batch=replication_pb2.Batch(
                sequence=2, writes=[replication_pb2.Write(offset=4096, data=b"s" * 4096)], uptodate=True
            )
        )
        list(repl.Mirror(iter([open_msg(first=2, primary="p2"), done])))
        assert ctl.Status(control_pb2.StatusRequest()).volumes[0].state == "uptodate"
        ctl.CreateSnapshot(control_pb2.CreateSnapshotRequest(volume="vol0", name="s"))
    finally:
        channel.close()
        rig.stop()
        rig.node.close()

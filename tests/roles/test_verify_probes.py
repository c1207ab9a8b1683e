"""Online verify and checksum probes in process: the standby's probe validation and in-order comparison,
the Verify control call against a real mirrored primary, and the checksum-skipping full sync."""

from __future__ import annotations

import os
import threading

import grpc
import pytest
from standby_rig import replica_digest, start_rig
from test_primary_mirror import files_equal, mirrored, wait_until

from standby.node import VerifyRefused
from standbylib.checksums import Probe, Repair, block_digests, zero_digests
from standbylib.errors import InvalidArgument, OutOfRange, UnknownVolume
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2, replication_pb2_grpc

MiB = 1 << 20
BS = 4096


def probe_of(data: bytes, verify_id: int = 0) -> Probe:
    return Probe(len(data), block_digests(data, BS), verify_id)


# -- the standby node --------------------------------------------------------------------------------


def test_a_probe_compares_the_replica_where_it_stands_in_the_batch(node):
    replica, _, _ = node.handshake("vol0", MiB, BS)
    node.open_stream("vol0", "p1", 1)
    old, new = b"o" * 2 * BS, b"n" * 2 * BS
    node.apply(replica, 1, [(0, old)], False)
    found: list[int] = []
    # The write before the probe is applied first; the one after it, after the comparison.
    ops = [(0, new), (0, probe_of(new)), (BS, b"x" * BS), (BS, probe_of(new[:BS]))]
    assert node.apply(replica, 2, ops, False, mismatched=found)
    assert found == [BS]
    assert replica.volume.read(0, 2 * BS) == new[:BS] + b"x" * BS
    assert replica.applied_bytes == 2 * BS + 2 * BS + BS  # probes are not counted as applied data
    # A hole compares as zeros.
    found.clear()
    node.apply(replica, 3, [(8 * BS, Probe(4 * BS, zero_digests(4 * BS, BS)))], False, mismatched=found)
    assert found == []


@pytest.mark.parametrize(
    ("probe_op", "error"),
    [
        ((100, Probe(BS, b"\0" * 8)), InvalidArgument),  # misaligned offset
        ((0, Probe(1000, b"\0" * 8)), InvalidArgument),  # partial block
        ((0, Probe(2 * BS, b"\0" * 8)), InvalidArgument),  # one digest for two blocks
        ((0, Probe(BS, b"\0" * 9)), InvalidArgument),  # not whole digests
        ((MiB - BS, Probe(2 * BS, b"\0" * 16)), OutOfRange),  # past the end
        ((0, Repair(b"r" * 100, 5)), InvalidArgument),  # a repair is checked like a write
    ],
)
def test_a_bad_probe_refuses_the_whole_batch(node, probe_op, error):
    replica, _, _ = node.handshake("vol0", MiB, BS)
    node.open_stream("vol0", "p1", 1)
    node.apply(replica, 1, [(0, b"x" * 8192)], True)
    before = replica_digest(node)
    with pytest.raises(error):
        node.apply(replica, 2, [(0, b"a" * BS), probe_op], False)
    assert replica_digest(node) == before
    assert replica.applied_sequence == 1


def test_verify_sessions_count_probes_and_repairs_and_fail_on_disconnect(node):
    replica, _, _ = node.handshake("vol0", 4 * BS, BS)
    with pytest.raises(UnknownVolume):
        node.start_verify("nope", False)
    with pytest.raises(VerifyRefused, match="no primary is connected"):
        node.start_verify("vol0", False)
    node.open_stream("vol0", "p1", 1, resync=True)
    with pytest.raises(VerifyRefused, match="resync"):
        node.start_verify("vol0", False)
    node.apply(replica, 1, [(0, b"a" * 4 * BS)], False, uptodate=True)
    session = node.start_verify("vol0", True)
    with pytest.raises(VerifyRefused, match="another verify"):
        node.start_verify("vol0", False)
    assert node.take_verify_command(replica) == (session.id, True)
    assert node.take_verify_command(replica) is None  # once
    wrong = b"a" * BS + b"b" * BS
    node.apply(replica, 2, [(0, probe_of(wrong, session.id))], False)
    node.apply(replica, 3, [(2 * BS, probe_of(b"a" * 2 * BS, session.id))], False)
    status = node.verify_status(session)
    assert (status.checked_bytes, status.mismatched_blocks, status.first_offsets) == (4 * BS, 1, [BS])
    assert not status.done  # the repair is still to come
    node.apply(replica, 4, [(BS, Repair(b"b" * BS, session.id))], False)
    status = node.verify_status(session)
    assert status.done and not status.error and status.repaired_blocks == 1
    # A new session fails when the primary goes away.
    again = node.start_verify("vol0", False)
    node.close_stream(replica)
    status = node.verify_status(again)
    assert status.done and "disconnected" in status.error


# -- over gRPC ----------------------------------------------------------------------------------------


@pytest.fixture
def stubs(rig):
    channel = grpc.insecure_channel(rig.target)
    yield replication_pb2_grpc.ReplicationStub(channel), control_pb2_grpc.ControlStub(channel)
    channel.close()


def test_bad_probes_end_the_stream_with_invalid_argument(rig, stubs):
    repl, _ = stubs
    repl.Handshake(replication_pb2.HandshakeRequest(volume="vol0", size=MiB, block_size=BS, primary_id="p1"))
    open_msg = replication_pb2.MirrorRequest(
        open=replication_pb2.MirrorOpen(volume="vol0", first_sequence=1, primary_id="p1")
    )

    def batch(seq, *writes):
        return replication_pb2.MirrorRequest(batch=replication_pb2.Batch(sequence=seq, writes=list(writes)))

    good = replication_pb2.Write(offset=0, data=b"g" * BS)
    replies = list(
        repl.Mirror(
            iter(
                [
                    open_msg,
                    batch(1, good),
                    batch(2, replication_pb2.Write(offset=0, checksum_length=BS, digests=b"\0" * 8)),
                ]
            )
        )
    )
    assert [(r.sequence, list(r.mismatched)) for r in replies] == [(1, []), (2, [0])]
    before = replica_digest(rig.node)
    for bad in (
        replication_pb2.Write(offset=512, checksum_length=BS, digests=b"\0" * 8),
        replication_pb2.Write(offset=0, checksum_length=2 * BS, digests=b"\0" * 8),
    ):
        opening = replication_pb2.MirrorRequest(
            open=replication_pb2.MirrorOpen(volume="vol0", first_sequence=3, primary_id="p1")
        )
        overwrite = replication_pb2.Write(offset=0, data=b"z" * BS)
        with pytest.raises(grpc.RpcError) as err:
            list(repl.Mirror(iter([opening, batch(3, overwrite, bad)])))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "probe" in err.value.details()
        assert replica_digest(rig.node) == before


def verify(ctl, volume="vol0", repair=False):
    progress = list(ctl.Verify(control_pb2.VerifyRequest(volume=volume, repair=repair), timeout=60))
    assert progress and progress[-1].done
    return progress[-1]


def test_verify_finds_a_flipped_byte_repairs_it_and_finds_nothing_then(rig, stubs, tmp_path):
    _, ctl = stubs
    dev = mirrored(tmp_path, rig.target)
    try:
        dev.write(0, os.urandom(2 * MiB))
        dev.flush()
        wait_until(lambda: rig.node.replica("vol0").status == "uptodate")
        last = verify(ctl)
        assert (last.mismatched_blocks, last.checked_bytes, last.total_bytes) == (0, 4 * MiB, 4 * MiB)
        with open(rig.node.replica_path("vol0"), "r+b") as f:
            f.seek(MiB + 5 * BS + 17)
            byte = f.read(1)
            f.seek(MiB + 5 * BS + 17)
            f.write(bytes([byte[0] ^ 0xFF]))
        last = verify(ctl)
        assert (last.mismatched_blocks, list(last.first_offsets)) == (1, [MiB + 5 * BS])
        assert last.repaired_blocks == 0
        last = verify(ctl, repair=True)
        assert (last.mismatched_blocks, last.repaired_blocks) == (1, 1)
        assert verify(ctl).mismatched_blocks == 0
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
    finally:
        dev.mirror.stop()
        dev.close()


def test_verify_while_writes_go_on_reports_no_false_mismatch(rig, stubs, tmp_path):
    _, ctl = stubs
    dev = mirrored(tmp_path, rig.target)
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            n += 1
            dev.write((n * 7919 % 1000) * BS + (n % 3) * 100, bytes([n % 251 + 1]) * 6000)

    t = threading.Thread(target=writer)
    try:
        wait_until(lambda: rig.node.replica("vol0").status == "uptodate")
        t.start()
        for _ in range(3):
            assert verify(ctl).mismatched_blocks == 0
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        dev.mirror.stop()
        dev.close()


def test_verify_is_refused_for_an_unknown_volume_or_without_a_primary(rig, stubs):
    repl, ctl = stubs
    with pytest.raises(grpc.RpcError) as err:
        verify(ctl, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
    repl.Handshake(replication_pb2.HandshakeRequest(volume="vol0", size=MiB, block_size=BS, primary_id="p1"))
    with pytest.raises(grpc.RpcError) as err:
        verify(ctl)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no primary is connected" in err.value.details()


def test_a_full_sync_of_a_replica_holding_old_data_resends_only_what_differs(tmp_path):
    rig = start_rig(str(tmp_path / "standby"))
    try:
        dev = mirrored(tmp_path, rig.target, size=8 * MiB)
        dev.write(0, os.urandom(6 * MiB))
        dev.flush()
        wait_until(lambda: not dev.mirror.resyncing and dev.mirror.bitmap.dirty() == 0)
        dev.mirror.stop()
        dev.close()
        dev.mirror.bitmap.close()
        # Change 3 blocks of the replica behind the engine's back (and one block in place of a hole).
        with open(rig.node.replica_path("vol0"), "r+b") as f:
            for offset in (0, 3 * MiB + 8 * BS, 3 * MiB + 9 * BS, 7 * MiB):
                f.seek(offset)
                f.write(b"\xee" * BS)
        again = mirrored(tmp_path, rig.target, size=8 * MiB, discard_standby_data=True)
        try:
            wait_until(lambda: not again.mirror.resyncing and again.mirror.bitmap.dirty() == 0)
            again.flush()
            assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
            assert rig.node.replica("vol0").status == "uptodate"
            # 3 blocks resent after their checksums differed, plus the zeroed hole regions (2 MiB).
            assert again.mirror.resent_bytes == 3 * BS + 2 * MiB
        finally:
            again.mirror.stop()
            again.close()
    finally:
        rig.stop()
        rig.node.close()

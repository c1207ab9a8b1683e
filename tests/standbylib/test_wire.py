"""The hand-written batch encoder produces exactly what protobuf parses as the intended message."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from standbylib.checksums import Probe, Repair, block_digests, zero_digests
from standbylib.rpc.v1 import replication_pb2
from standbylib.rpc.wire import batch_view, decode_batch, encode_batch, varint

u64 = st.integers(min_value=0, max_value=2**64 - 1)
plain = st.one_of(st.binary(max_size=300), st.integers(min_value=0, max_value=2**63))
ops_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**63),
        st.one_of(
            plain,
            st.builds(Probe, u64, st.binary(max_size=80), u64),
            st.builds(Repair, plain, u64),
        ),
    ),
    max_size=12,
)


def expected_write(offset, payload):
    if isinstance(payload, Probe):
        return replication_pb2.Write(
            offset=offset,
            checksum_length=payload.length,
            digests=payload.digests,
            verify_id=payload.verify_id,
        )
    verify_id = 0
    if isinstance(payload, Repair):
        payload, verify_id = payload.data, payload.verify_id
    if isinstance(payload, int):
        return replication_pb2.Write(offset=offset, zero_length=payload, verify_id=verify_id)
    return replication_pb2.Write(offset=offset, data=payload, verify_id=verify_id)


@settings(max_examples=300, deadline=None)
@given(
    sequence=st.integers(min_value=0, max_value=2**64 - 1),
    ops=ops_strategy,
    flush=st.booleans(),
    uptodate=st.booleans(),
    resync_remaining=st.one_of(st.just(0), st.integers(min_value=0, max_value=2**64 - 1)),
)
def test_protobuf_parses_our_encoding(sequence, ops, flush, uptodate, resync_remaining):
    wire = b"".join(encode_batch(sequence, ops, flush, uptodate, resync_remaining))
    parsed = replication_pb2.MirrorRequest.FromString(wire)
    assert parsed.WhichOneof("kind") == "batch"
    expected = replication_pb2.Batch(
        sequence=sequence,
        writes=[expected_write(o, d) for o, d in ops],
        flush=flush,
        uptodate=uptodate,
        resync_remaining=resync_remaining,
    )
    assert parsed.batch == expected
    # Same bytes as protobuf's own serialisation (deterministic field order, defaults omitted).
    assert wire == replication_pb2.MirrorRequest(batch=expected).SerializeToString(deterministic=True)
    # And the data channel's decoder reads the same batch back.
    view = batch_view(wire)
    assert view is not None
    decoded = decode_batch(view)
    assert (decoded.sequence, decoded.flush, decoded.uptodate, decoded.resync_remaining) == (
        sequence,
        flush,
        uptodate,
        resync_remaining,
    )


def test_large_payloads_are_referenced_not_copied():
    data = bytearray(b"x" * (1 << 20))
    pieces = encode_batch(7, [(4096, data)], False)
    assert any(p is data for p in pieces)


def test_varint_edges():
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        encoded = varint(value)
        decoded, shift = 0, 0
        for byte in encoded:
            decoded |= (byte & 0x7F) << shift
            shift += 7
        assert decoded == value
        assert all(b & 0x80 for b in encoded[:-1]) and not encoded[-1] & 0x80


def test_block_digests_are_little_endian_xxh3_per_block():
    import struct

    import xxhash

    data = b"a" * 4096 + b"b" * 4096
    digests = block_digests(data, 4096)
    assert len(digests) == 16
    assert struct.unpack("<2Q", digests) == (
        xxhash.xxh3_64_intdigest(b"a" * 4096),
        xxhash.xxh3_64_intdigest(b"b" * 4096),
    )
    assert block_digests(memoryview(bytearray(data)), 4096) == digests
    assert zero_digests(3 * 512, 512) == block_digests(bytes(3 * 512), 512)


def test_a_frame_reader_grown_by_big_frames_gives_the_memory_back_after_small_ones() -> None:
    import socket
    import threading

    from standbylib.rpc.frames import SHRINK_AFTER, FrameReader, send_frame

    a, b = socket.socketpair()
    big, small = b"x" * (1 << 20), b"y" * 100
    frames = [big] + [small] * SHRINK_AFTER + [big]
    sender = threading.Thread(target=lambda: [send_frame(b, [f]) for f in frames], daemon=True)
    sender.start()
    try:
        reader = FrameReader(a, initial=64 * 1024)
        sizes = []
        for want in frames:
            assert bytes(reader.read()) == want
            sizes.append(reader.buffer_size)
        assert sizes[0] >= 1 << 20  # grown for the big frame
        assert sizes[-2] == 64 * 1024  # given back after the small ones
        assert sizes[-1] >= 1 << 20  # and grown again when needed
    finally:
        sender.join(10)
        a.close()
        b.close()

"""The hand-written batch encoder produces exactly what protobuf parses as the intended message."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from standbylib.rpc.v1 import replication_pb2
from standbylib.rpc.wire import encode_batch, varint

ops_strategy = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=2**63),
        st.one_of(st.binary(max_size=300), st.integers(min_value=0, max_value=2**63)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    sequence=st.integers(min_value=0, max_value=2**64 - 1),
    ops=ops_strategy,
    flush=st.booleans(),
    uptodate=st.booleans(),
)
def test_protobuf_parses_our_encoding(sequence, ops, flush, uptodate):
    wire = b"".join(encode_batch(sequence, ops, flush, uptodate))
    parsed = replication_pb2.MirrorRequest.FromString(wire)
    assert parsed.WhichOneof("kind") == "batch"
    expected = replication_pb2.Batch(
        sequence=sequence,
        writes=[
            replication_pb2.Write(offset=o, zero_length=d)
            if isinstance(d, int)
            else replication_pb2.Write(offset=o, data=d)
            for o, d in ops
        ],
        flush=flush,
        uptodate=uptodate,
    )
    assert parsed.batch == expected
    # Same bytes as protobuf's own serialisation (deterministic field order, defaults omitted).
    assert wire == replication_pb2.MirrorRequest(batch=expected).SerializeToString(deterministic=True)


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

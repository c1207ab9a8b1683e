"""The data channel's hand-written decoder (`batch_view`, `decode_batch`) reads what protobuf reads.

For any bytes, `decode_batch(batch_view(x))` either refuses them (`MalformedMessage`, an
InvalidArgument), finds no batch where protobuf finds none, or gives exactly the batch protobuf's
``MirrorRequest.FromString`` gives: the sequence, flush and uptodate flags, and each op (offset, data
bytes, zero length, probe, verify id) read as the standby reads protobuf's `Write`.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import example, given, settings
from hypothesis import strategies as st

from standbylib.checksums import Probe, Repair
from standbylib.rpc.v1 import replication_pb2
from standbylib.rpc.wire import (
    MalformedMessage,
    batch_view,
    decode_batch,
    encode_batch,
    varint,
)

U64 = st.integers(min_value=0, max_value=2**64 - 1)
payloads = st.one_of(
    st.binary(max_size=300),
    U64,
    st.builds(Probe, U64, st.binary(max_size=80), U64),
    st.builds(Repair, st.one_of(st.binary(max_size=300), U64), U64),
)
ops_strategy = st.lists(st.tuples(U64, payloads), max_size=10)

Reading = tuple[int, list[tuple[Any, ...]], bool, bool]


def op_key(offset: int, payload: Any) -> tuple[Any, ...]:
    """One op as comparable values (data views become bytes)."""
    if isinstance(payload, Probe):
        return (offset, "probe", payload.length, bytes(payload.digests), payload.verify_id)
    verify_id = 0
    if isinstance(payload, Repair):
        payload, verify_id = payload.data, payload.verify_id
    if isinstance(payload, int):
        return (offset, "zero", payload, verify_id)
    return (offset, "data", bytes(payload), verify_id)


def protobuf_reading(message: bytes) -> Reading | None:
    """The batch protobuf reads in `message` (None: it reads no batch); raises DecodeError."""
    request = replication_pb2.MirrorRequest.FromString(message)
    if request.WhichOneof("kind") != "batch":
        return None
    batch = request.batch
    ops: list[tuple[Any, ...]] = []
    for w in batch.writes:  # as the standby reads protobuf's Write (standby.batches.ops_of)
        if w.checksum_length:
            ops.append((w.offset, "probe", w.checksum_length, w.digests, w.verify_id))
        elif w.zero_length:
            ops.append((w.offset, "zero", w.zero_length, w.verify_id))
        else:
            ops.append((w.offset, "data", w.data, w.verify_id))
    return batch.sequence, ops, batch.flush, batch.uptodate


def hand_reading(message: bytes) -> Reading | None:
    """The batch the data channel reads in `message` (None: no batch); raises MalformedMessage."""
    view = batch_view(message)
    if view is None:
        return None
    decoded = decode_batch(view)
    return decoded.sequence, [op_key(o, p) for o, p in decoded.ops], decoded.flush, decoded.uptodate


def check_same_reading(message: bytes) -> str:
    """Asserts the property for `message`; what happened ("refused", "no batch", "batch"). No batch
    is a refusal too: the data channel accepts nothing but batches after the hello."""
    try:
        ours = hand_reading(message)
    except MalformedMessage:
        return "refused"
    try:
        theirs = protobuf_reading(message)
    except DecodeError:
        if ours is None:
            return "no batch"  # the data channel refuses a frame without a batch all the same
        raise AssertionError(
            f"the data channel reads {ours!r} in {message.hex()}, which protobuf refuses as malformed"
        ) from None
    if ours is None:
        assert theirs is None, f"the data channel finds no batch in {message.hex()}, protobuf {theirs!r}"
        return "no batch"
    assert theirs is not None, f"the data channel reads a batch in {message.hex()}, protobuf none: {ours!r}"
    assert ours == theirs, f"{message.hex()}: the data channel reads {ours!r}, protobuf {theirs!r}"
    return "batch"


@settings(max_examples=400, deadline=None)
@given(sequence=U64, ops=ops_strategy, flush=st.booleans(), uptodate=st.booleans())
def test_the_encoders_batches_are_read_as_protobuf_reads_them(
    sequence: int, ops: list[tuple[int, Any]], flush: bool, uptodate: bool
) -> None:
    message = b"".join(bytes(p) for p in encode_batch(sequence, ops, flush, uptodate))
    assert check_same_reading(message) == "batch"
    view = batch_view(message)
    assert view is not None
    decoded = decode_batch(view)
    assert decoded.sequence == sequence and decoded.flush == flush and decoded.uptodate == uptodate


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=200))
@example(b"")
@example(b"\x12\x00")
@example(b"\x12\x02\x08\x01")
def test_random_bytes_are_refused_or_read_as_protobuf_reads_them(message: bytes) -> None:
    check_same_reading(message)


@st.composite
def mutated_batches(draw: st.DrawFn) -> bytes:
    """An encoded batch with a few bytes changed, inserted or cut."""
    message = bytearray(
        b"".join(
            bytes(p)
            for p in encode_batch(
                draw(U64), draw(st.lists(st.tuples(U64, payloads), max_size=4)), draw(st.booleans())
            )
        )
    )
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        kind = draw(st.sampled_from(["set", "insert", "cut"]))
        at = draw(st.integers(min_value=0, max_value=len(message)))
        if kind == "set" and at < len(message):
            message[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            message[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            del message[at : at + draw(st.integers(min_value=1, max_value=8))]
    return bytes(message)


@settings(max_examples=800, deadline=None)
@given(mutated_batches())
def test_mutated_batches_are_refused_or_read_as_protobuf_reads_them(message: bytes) -> None:
    check_same_reading(message)


def request(batch: bytes) -> bytes:
    """A MirrorRequest whose batch field holds `batch` (a serialised Batch, possibly invalid)."""
    return b"\x12" + varint(len(batch)) + batch


#: Messages at the edges of the wire format, each checked for the property.
EDGES = {
    # a tag of field number 0: protobuf refuses the message
    "field_number_0_in_batch": request(b"\x08\x01\x00\x00"),
    "field_number_0_in_write": request(b"\x12\x04\x08\x00\x00\x00"),
    "field_number_0_at_top": b"\x00\x00" + request(b"\x08\x01"),
    # a tag of more than 32 bits (an unknown field of fixed32 type): protobuf refuses the message
    "tag_of_33_bits_in_write": request(b"\x12\x09\xd5\x80\x80\x80\x10" + bytes(4)),
    "tag_of_33_bits_at_top": b"\xd5\x80\x80\x80\x10" + bytes(4) + request(b"\x08\x01"),
    # 10-byte varints whose value needs more than 64 bits: protobuf keeps the low 64
    "sequence_of_70_bits": request(b"\x08" + b"\xff" * 9 + b"\x7f"),
    "sequence_2_pow_64": request(b"\x08" + b"\x80" * 9 + b"\x02"),
    "offset_of_70_bits": request(b"\x12\x0b\x08" + b"\xff" * 9 + b"\x7f"),
    "flush_2_pow_64": request(b"\x18" + b"\x80" * 9 + b"\x02"),
    # a malformed `hello` or `open` next to the batch: protobuf parses them, and refuses the message
    "malformed_hello_before_batch": b"\x1a\x02\x0a\x7f" + request(b"\x08\x01"),
    "malformed_open_after_batch": request(b"\x08\x01") + b"\x0a\x02\x10\x80",
    # oneof: the last of `batch` and `hello` is the message's kind
    "batch_then_hello": request(b"\x08\x05") + b"\x1a\x00",
    "hello_then_batch": b"\x1a\x00" + request(b"\x08\x05"),
    # the largest 64-bit values, and non-minimal varints: read as protobuf reads them
    "sequence_2_pow_64_minus_1": request(b"\x08" + b"\xff" * 9 + b"\x01"),
    "non_minimal_varint": request(b"\x08\x81\x80\x80\x00"),
    "unknown_fields_of_each_wire_type": request(
        b"\x08\x01\x28\x05\x31" + bytes(8) + b"\x3a\x01x\x3d" + bytes(4)
    ),
    "write_field_with_wrong_wire_type": request(b"\x12\x03\x0a\x01x"),
    "data_repeated": request(b"\x12\x08\x12\x02ab\x12\x02cd"),
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_edges_of_the_wire_format_are_refused_or_read_as_protobuf_reads_them(case: str) -> None:
    check_same_reading(EDGES[case])

"""Hand-written encoder of the hot message: a `MirrorRequest` holding a `Batch`.

protobuf's Python runtime copies each write's data into the message and again when serialising, and
builds the message slowly (measured 0.3 GB/s for 4 MiB batches of 1 MiB writes, against 16 GB/s for one
`bytes.join`): that alone held mirrored throughput to a fraction of the disk's. This encoder emits the
same wire format (proto/v1/replication.proto) with one join, and `tests/standbylib/test_wire.py` checks
that protobuf parses it into the message it would have built itself. Decoding stays with protobuf (it
is fast).
"""

from __future__ import annotations

from collections.abc import Sequence

from standbylib.rawfile import Buffer

# Field tags: (number << 3) | wire type (0 varint, 2 length-delimited).
_REQUEST_BATCH = b"\x12"  # MirrorRequest.batch = 2
_BATCH_SEQUENCE = b"\x08"  # Batch.sequence = 1
_BATCH_WRITES = b"\x12"  # Batch.writes = 2
_BATCH_FLUSH = b"\x18\x01"  # Batch.flush = 3, true
_BATCH_UPTODATE = b"\x20\x01"  # Batch.uptodate = 4, true
_WRITE_OFFSET = b"\x08"  # Write.offset = 1
_WRITE_DATA = b"\x12"  # Write.data = 2
_WRITE_ZERO = b"\x18"  # Write.zero_length = 3


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer below 2**64."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch(
    sequence: int, ops: Sequence[tuple[int, Buffer | int]], flush: bool, uptodate: bool = False
) -> list[Buffer]:
    """The serialised ``MirrorRequest{batch: Batch{sequence, writes, flush, uptodate}}`` as pieces to join.

    Each op is ``(offset, data)`` or ``(offset, zero_length)``. The data buffers are referenced, not
    copied; ``b"".join(pieces)`` makes the message.
    """
    pieces: list[Buffer] = []
    body = 0
    for offset, data in ops:
        head = _WRITE_OFFSET + varint(offset) if offset else b""
        # proto3 leaves out fields at their default (0, empty), and so do we: identical bytes.
        if isinstance(data, int):
            write = head + _WRITE_ZERO + varint(data) if data else head
            entry = _BATCH_WRITES + varint(len(write)) + write
            pieces.append(entry)
            body += len(entry)
        else:
            n = len(memoryview(data))
            prefix = head + _WRITE_DATA + varint(n) if n else head
            entry = _BATCH_WRITES + varint(len(prefix) + n) + prefix
            pieces.append(entry)
            if n:
                pieces.append(data)
            body += len(entry) + n
    start = _BATCH_SEQUENCE + varint(sequence) if sequence else b""
    end = (_BATCH_FLUSH if flush else b"") + (_BATCH_UPTODATE if uptodate else b"")
    body += len(start) + len(end)
    return [_REQUEST_BATCH + varint(body) + start, *pieces, end]

"""Block checksums, and what a mirrored op carries besides data: probes and repairs.

The verify and the checksum-based full sync compare the replica with the primary's volume block by
block: per block, the 8-byte little-endian xxh3_64 digest (docs/REPLICATION.md, Verify). A *probe* op
carries the digests of a range; a *repair* resends blocks a probe found out of sync. The wire format
(`standbylib.rpc.wire`) encodes and decodes these; the primary builds them, the standby checks them.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

from standbylib.rawfile import Buffer

#: Bytes of one block's digest in `Write.digests`.
DIGEST_SIZE = 8


class Probe(NamedTuple):
    """A probe op: the digests of the blocks of ``[offset, offset+length)`` (the offset is the op's)."""

    length: int
    digests: bytes
    verify_id: int = 0  # 0: a probe of the checksum-based full sync


class Repair(NamedTuple):
    """A write (data or zero length) that resends blocks verify session `verify_id` found out of sync."""

    data: Buffer | int
    verify_id: int


#: What a mirrored op carries: data, a zeroed length, a probe or a repair.
Payload = Buffer | int | Probe | Repair


def block_digests(data: Buffer, block_size: int) -> bytes:
    """The digests of each `block_size` block of `data` (a whole number of blocks), concatenated."""
    view = memoryview(data).cast("B")
    digest = xxhash.xxh3_64_intdigest
    values = [digest(view[i : i + block_size]) for i in range(0, len(view), block_size)]
    return struct.pack(f"<{len(values)}Q", *values)


_zero_digests: dict[int, bytes] = {}


def zero_digests(length: int, block_size: int) -> bytes:
    """`block_digests` of `length` bytes of zeros (a hole), without reading or hashing them."""
    one = _zero_digests.get(block_size)
    if one is None:
        one = _zero_digests[block_size] = block_digests(bytes(block_size), block_size)
    return one * (length // block_size)

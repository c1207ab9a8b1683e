"""On-disk format of the preservation store (see docs/STORE-FORMAT.md).

One file holds everything, so that one fdatasync commits a batch's preserved
copies together with their index entries (group commit)::

    0        superblock (4 KiB): magic, version, geometry
    4 KiB    table copy A  (TABLE_SIZE): volumes and snapshots, JSON, checksummed
    +T       table copy B  (TABLE_SIZE): written alternately with A
    4 MiB    area 0: one 4 KiB entry block + ENTRIES_PER_AREA slots of one slot size
             area 1 ...

Each slot has a 32-byte entry in its area's entry block that says what the slot
holds (a preserved origin block, or a block written to a writable snapshot), in
which commit it was written and the CRC-32 of its data. The in-RAM index is
rebuilt from the entry blocks on open.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import xxhash

MAGIC = b"SBYPRES1"
VERSION = 1
SUPERBLOCK_SIZE = 4096
COMMIT_MAGIC = b"SBYCOMMT"
COMMIT_RECORD_OFFSET = 512  # in the superblock's second sector
# Commit n writes its record to COMMIT_RECORD_OFFSETS[n % 2] (the second one in the third sector), so a
# write that fails half way leaves the other record, one commit older, intact. Format version 1 wrote
# only the first: the second then reads as zeros, which is no record.
COMMIT_RECORD_OFFSETS = (COMMIT_RECORD_OFFSET, 1024)
TABLE_MAGIC = b"SBYTABLE"
TABLE_SIZE = 1 << 20
TABLE_OFFSETS = (SUPERBLOCK_SIZE, SUPERBLOCK_SIZE + TABLE_SIZE)
AREAS_OFFSET = 4 << 20
AREA_MAGIC = b"SBYAREA1"
ENTRY_BLOCK = 4096
ENTRY_SIZE = 32
AREA_HEADER = 32
ENTRIES_PER_AREA = (ENTRY_BLOCK - AREA_HEADER) // ENTRY_SIZE  # 127

# Entry kinds.
FREE = 0
COPY = 1  # a preserved origin block, shared by every snapshot of its interval
PRIVATE = 2  # a block written to a writable snapshot (claim 8)

# tag: for COPY, the generation (epoch of the newest snapshot when copied);
#      for PRIVATE, the snapshot id.
ENTRY_DTYPE = np.dtype(
    [
        ("kind", "<u1"),
        ("pad", "<u1"),
        ("vol", "<u2"),
        ("tag", "<u4"),
        ("block", "<u8"),
        ("seq", "<u8"),
        ("dsum", "<u4"),
        ("reserved", "<u4"),
    ]
)
assert ENTRY_DTYPE.itemsize == ENTRY_SIZE

_SUPER = struct.Struct("<8sIIQQQI")  # magic, version, entry_block, table_size, areas_offset, reserved, crc
_COMMIT = struct.Struct("<8sQI")  # magic, last completed commit number, crc
_TABLE_HEADER = struct.Struct("<8sQII")  # magic, seq, length, crc
TABLE_HEADER_SIZE = _TABLE_HEADER.size
_AREA_HEADER = struct.Struct("<8sIIIII4x")  # magic, area number, slot size, nslots, reserved, crc


def data_checksum(data: bytes | bytearray | memoryview) -> int:
    """Checksum of a slot's data: the low 32 bits of XXH3-64 (several times faster than CRC-32)."""
    return xxhash.xxh3_64_intdigest(data) & 0xFFFFFFFF


def pack_superblock() -> bytes:
    body = _SUPER.pack(MAGIC, VERSION, ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET, 0, 0)
    crc = zlib.crc32(body[:-4])
    return _SUPER.pack(MAGIC, VERSION, ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET, 0, crc).ljust(
        SUPERBLOCK_SIZE, b"\0"
    )


def check_superblock(data: bytes) -> str | None:
    """Return None if `data` is a valid superblock of this version, else what is wrong."""
    magic, version, entry_block, table_size, areas_offset, _reserved, crc = _SUPER.unpack_from(data)
    if magic != MAGIC:
        return "not a preservation store (bad magic)"
    if zlib.crc32(data[: _SUPER.size - 4]) != crc:
        return "superblock checksum mismatch"
    if version != VERSION:
        return f"store format version {version}, this software reads version {VERSION}"
    if (entry_block, table_size, areas_offset) != (ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET):
        return "unexpected geometry"
    return None


def pack_commit_record(completed: int) -> bytes:
    """Record that every commit numbered up to `completed` ended with a sync."""
    body = _COMMIT.pack(COMMIT_MAGIC, completed, 0)
    return _COMMIT.pack(COMMIT_MAGIC, completed, zlib.crc32(body[:16]))


def unpack_commit_record(data: bytes) -> int:
    """The last commit known complete, or 0 when the record is missing or torn."""
    magic, completed, crc = _COMMIT.unpack_from(data)
    if magic != COMMIT_MAGIC or zlib.crc32(data[:16]) != crc:
        return 0
    return int(completed)


def pack_table(seq: int, table: dict[str, Any]) -> bytes:
    payload = json.dumps(table, separators=(",", ":"), sort_keys=True).encode()
    if _TABLE_HEADER.size + len(payload) > TABLE_SIZE:
        raise ValueError("table too large")
    crc = zlib.crc32(struct.pack("<QI", seq, len(payload)) + payload)
    return _TABLE_HEADER.pack(TABLE_MAGIC, seq, len(payload), crc) + payload


def unpack_table(data: bytes) -> tuple[int, dict[str, Any]] | None:
    """Return (seq, table) of a table copy, or None if it is missing or torn."""
    magic, seq, length, crc = _TABLE_HEADER.unpack_from(data)
    if magic != TABLE_MAGIC or length > TABLE_SIZE - _TABLE_HEADER.size:
        return None
    payload = data[_TABLE_HEADER.size : _TABLE_HEADER.size + length]
    if zlib.crc32(struct.pack("<QI", seq, length) + payload) != crc:
        return None
    table: dict[str, Any] = json.loads(payload)
    return seq, table


def pack_area_header(area_no: int, slot_size: int) -> bytes:
    body = _AREA_HEADER.pack(AREA_MAGIC, area_no, slot_size, ENTRIES_PER_AREA, 0, 0)
    crc = zlib.crc32(body[:20])
    return _AREA_HEADER.pack(AREA_MAGIC, area_no, slot_size, ENTRIES_PER_AREA, 0, crc)


def unpack_area_header(data: bytes | bytearray | memoryview, area_no: int) -> int | None:
    """Return the slot size of a valid header of area `area_no`, else None."""
    magic, number, slot_size, nslots, _reserved, crc = _AREA_HEADER.unpack_from(data)
    if magic != AREA_MAGIC or zlib.crc32(data[:20]) != crc:
        return None
    if number != area_no or nslots != ENTRIES_PER_AREA or slot_size < 512 or slot_size & (slot_size - 1):
        return None
    return int(slot_size)


def area_size(slot_size: int) -> int:
    return ENTRY_BLOCK + ENTRIES_PER_AREA * slot_size

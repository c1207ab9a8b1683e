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
which commit it was written and the checksum of its data. An area of slot size 0
(an *entry area*, format 2) is an entry block alone: its entries are hole entries,
blocks preserved as zeros, which have no data. The in-RAM index is rebuilt from
the entry blocks on open.

Format 1 stores (no entry areas, no hole entries) are read as they are and
upgraded to format 2 when opened (`superblock_version`, `pack_superblock`).
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
import xxhash

MAGIC = b"SBYPRES1"
VERSION = 2
#: Versions this software opens; an older one is upgraded to `VERSION` when opened.
READABLE_VERSIONS = (1, 2)
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
HOLE = 3  # format 2: a preserved origin block that read as zeros; no data, only in entry areas

#: The slot size of an entry area: an entry block without slots, holding hole entries.
ENTRY_AREA = 0

# tag: for COPY and HOLE, the generation (epoch of the newest snapshot when preserved);
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


#: The bytes of a hole entry its checksum covers.
HOLE_CHECKED = 24


def entry_checksums(entries: np.ndarray) -> list[int]:
    """The checksum of each hole entry of `entries` (`ENTRY_DTYPE`): the low 32 bits of XXH3-64 of its
    bytes 0-23 (kind to commit number). A hole entry has no data, so it checks itself."""
    raw = memoryview(entries.tobytes())
    return [
        xxhash.xxh3_64_intdigest(raw[i : i + HOLE_CHECKED]) & 0xFFFFFFFF
        for i in range(0, len(raw), ENTRY_SIZE)
    ]


#: The superblock of the current version fits in its first sector; the commit records follow it.
SUPERBLOCK_SECTOR = COMMIT_RECORD_OFFSET


def pack_superblock() -> bytes:
    """The superblock of a new store, padded to `SUPERBLOCK_SIZE` (commit records zero)."""
    body = _SUPER.pack(MAGIC, VERSION, ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET, 0, 0)
    crc = zlib.crc32(body[:-4])
    return _SUPER.pack(MAGIC, VERSION, ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET, 0, crc).ljust(
        SUPERBLOCK_SIZE, b"\0"
    )


def check_superblock(data: bytes) -> str | None:
    """Return None if `data` is a valid superblock of a version this software reads, else what is
    wrong."""
    magic, version, entry_block, table_size, areas_offset, _reserved, crc = _SUPER.unpack_from(data)
    if magic != MAGIC:
        return "not a preservation store (bad magic)"
    if zlib.crc32(data[: _SUPER.size - 4]) != crc:
        return "superblock checksum mismatch"
    if version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        return f"store format version {version}, this software reads versions {readable}"
    if (entry_block, table_size, areas_offset) != (ENTRY_BLOCK, TABLE_SIZE, AREAS_OFFSET):
        return "unexpected geometry"
    return None


def superblock_version(data: bytes) -> int:
    """The format version a superblock (checked by `check_superblock`) names."""
    version: int = _SUPER.unpack_from(data)[1]
    return version


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
    """Return the slot size of a valid header of area `area_no` (`ENTRY_AREA` for an entry area),
    else None."""
    magic, number, slot_size, nslots, _reserved, crc = _AREA_HEADER.unpack_from(data)
    if magic != AREA_MAGIC or zlib.crc32(data[:20]) != crc:
        return None
    if number != area_no or nslots != ENTRIES_PER_AREA:
        return None
    if slot_size != ENTRY_AREA and (slot_size < 512 or slot_size & (slot_size - 1)):
        return None
    return int(slot_size)


def area_size(slot_size: int) -> int:
    """Bytes of an area of `slot_size` slots: its entry block, then its slots (none in an entry area)."""
    return ENTRY_BLOCK + ENTRIES_PER_AREA * slot_size

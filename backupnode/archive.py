"""The backup archive: one sequential stream that plain GNU tar restores (docs/ARCHIVE-FORMAT.md).

A zstd-compressed POSIX pax tar with three members, in this order:

1. ``MANIFEST.json``: everything known before the image is read (format and version, volume, size,
   block size, snapshot name and time, chunk size, the data extents);
2. the image, ``VOLUME.img``, as a sparse member in GNU sparse format 1.0 (pax records
   ``GNU.sparse.*``, the map of data extents at the start of the member's data): holes take no space;
3. ``TRAILER.json``: the SHA-256 of every chunk of the image's data, the byte counts, and
   ``"complete": true``.

The per-chunk checksums come last because the stream is written in one pass, never seeked (it may go
to a tape or a pipe): they are only known once the data went by. A reader therefore trusts nothing
until it has met the trailer: an archive cut anywhere (no trailer, a short member, a broken zstd
frame) is rejected, and `restore` writes to a temporary name that it renames only then.

Chunks cut the image's *data stream* (the data extents back to back, as the member stores them) every
`chunk_size` bytes, so holes cost no hashing; `verify` maps a bad chunk back to the image offset where
it starts.

This module holds the format and its writer (`ArchiveWriter`); `backupnode.reader` reads and checks
archives (`read_archive`, for restore and verify).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from standbylib.errors import StandbyError
from standbylib.rawfile import Buffer

FORMAT = "standby-archive"
VERSION = 2  # 1: full archives only, no identity (still read)
BLOCK = 512  # tar's record unit
DEFAULT_CHUNK = 4 << 20
MANIFEST_NAME = "MANIFEST.json"
TRAILER_NAME = "TRAILER.json"
#: zstd level of the archive: 3 is zstd's default, fast enough to keep up with the network.
LEVEL = 3
#: Bytes handed to the compressor at a time (`ArchiveWriter._emit`).
FEED = 1 << 20


class ArchiveError(StandbyError):
    template = "archive {path}: {detail}"


class IncompleteArchive(ArchiveError):
    """The archive ends before its trailer: a cut or still-running backup."""


class CorruptArchive(ArchiveError):
    """The archive is complete in form but its content does not match its checksums."""


FULL = "full"
INCREMENTAL = "incremental"


@dataclass(slots=True)
class Manifest:
    """What an archive holds, known before its data: the archive's first member.

    A full archive holds the snapshot's data extents (everything else reads as zeros). An incremental
    archive holds only what changed since its base snapshot: `extents` are the changed ranges that
    hold data, `zero_extents` the changed ranges that read as zeros (trimmed or zeroed), and every
    other byte is the base's. `identity` names the snapshot uniquely (the standby's id, the volume and
    the snapshot's epoch there); `base` names the base snapshot and the SHA-256 of its archive."""

    volume: str
    size: int
    block_size: int
    snapshot: str
    snapshot_created: str
    extents: list[tuple[int, int]]  # (offset, length) of each data extent, in order
    chunk_size: int = DEFAULT_CHUNK
    image_name: str = ""
    created_by: str = "standby-backup"
    kind: str = FULL
    identity: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(
        default_factory=dict
    )  # incremental: {"snapshot": identity, "archive_sha256"}
    zero_extents: list[tuple[int, int]] = field(default_factory=list)  # incremental: changed, reading zeros
    # The replica when the snapshot was taken ({"state", "connected", "in_sync_at", "lag_seconds"}):
    # an archive of a replica that was behind its primary says so. Empty when the standby did not say.
    replica: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION

    def __post_init__(self) -> None:
        if not self.image_name:
            self.image_name = f"{self.volume}.img"

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length in self.extents)

    @property
    def changed_bytes(self) -> int:
        """Bytes an incremental changes (data and zeroed); a full archive's whole image."""
        if self.kind == FULL:
            return self.size
        return self.data_bytes + sum(length for _, length in self.zero_extents)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": self.version,
            "kind": self.kind,
            "volume": self.volume,
            "size": self.size,
            "block_size": self.block_size,
            "snapshot": self.snapshot,
            "snapshot_created": self.snapshot_created,
            "identity": self.identity,
            "chunk_size": self.chunk_size,
            "image": self.image_name,
            "data_bytes": self.data_bytes,
            "extents": [[offset, length] for offset, length in self.extents],
            "created_by": self.created_by,
        }
        if self.kind == INCREMENTAL:
            doc["base"] = self.base
            doc["zero_extents"] = [[offset, length] for offset, length in self.zero_extents]
        if self.replica:
            doc["replica"] = self.replica
        if self.version == 1:  # as version 1 wrote it
            for key in ("kind", "identity", "base", "zero_extents", "replica"):
                doc.pop(key, None)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], path: str) -> Manifest:
        if doc.get("format") != FORMAT:
            raise ArchiveError(path=path, detail=f"not a backup archive (format {doc.get('format')!r})")
        if doc.get("version") not in (1, VERSION):
            raise ArchiveError(
                path=path, detail=f"archive format version {doc.get('version')} is not supported"
            )
        try:
            m = cls(
                volume=str(doc["volume"]),
                size=int(doc["size"]),
                block_size=int(doc["block_size"]),
                snapshot=str(doc["snapshot"]),
                snapshot_created=str(doc["snapshot_created"]),
                extents=[(int(o), int(n)) for o, n in doc["extents"]],
                chunk_size=int(doc["chunk_size"]),
                image_name=str(doc["image"]),
                created_by=str(doc.get("created_by", "")),
                kind=str(doc.get("kind", FULL)),
                identity=dict(doc.get("identity") or {}),
                base=dict(doc.get("base") or {}),
                zero_extents=[(int(o), int(n)) for o, n in doc.get("zero_extents", [])],
                replica=dict(doc.get("replica") or {}),
                version=int(doc["version"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArchiveError(path=path, detail=f"malformed manifest ({e})") from None
        if m.kind not in (FULL, INCREMENTAL):
            raise ArchiveError(path=path, detail=f"unknown archive kind {m.kind!r}")
        if m.kind == INCREMENTAL and not (m.base.get("snapshot") and m.base.get("archive_sha256")):
            raise ArchiveError(path=path, detail="an incremental archive that does not name its base")
        return m

    def check(self) -> None:
        """Extents ordered, disjoint and inside the image, the zeroed ones too (`ValueError` if not)."""
        check_extents(self.extents, self.size)
        check_extents(sorted(self.extents + self.zero_extents), self.size)


def same_snapshot(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two snapshot identities name the same snapshot: the same standby, volume and epoch."""
    keys = ("standby", "volume", "epoch")
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in keys)


@dataclass(slots=True)
class Trailer:
    chunks: list[str]  # SHA-256 (hex) of each chunk of the data stream
    data_bytes: int
    complete: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"complete": self.complete, "data_bytes": self.data_bytes, "chunk_sha256": self.chunks}


def check_extents(extents: list[tuple[int, int]], size: int) -> None:
    """Extents must be ordered, disjoint, non-empty and inside the image."""
    end = 0
    for offset, length in extents:
        if length <= 0 or offset < end or offset + length > size:
            raise ValueError(f"bad extent [{offset}, +{length}) in an image of {size} bytes")
        end = offset + length


# -- writing ----------------------------------------------------------------------------------------


def _member_header(name: str, size: int, mtime: float, pax: dict[str, str] | None = None) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(mtime)
    info.mode = 0o600
    info.type = tarfile.REGTYPE
    info.uname = info.gname = ""
    if pax:
        info.pax_headers = dict(pax)
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def sparse_map(extents: list[tuple[int, int]], size: int) -> bytes:
    """The GNU sparse 1.0 map that starts the member's data, padded to a tar block.

    A file that ends in a hole gets a last, empty extent at its end, as GNU tar writes it, so that
    every extractor gives the file its full size."""
    entries = list(extents)
    if not entries or entries[-1][0] + entries[-1][1] < size:
        entries.append((size, 0))
    text = f"{len(entries)}\n" + "".join(f"{o}\n{n}\n" for o, n in entries)
    raw = text.encode()
    return raw + _padding(len(raw))


class ArchiveWriter:
    """Write an archive to `out` (any writable binary stream; it is only ever appended to).

    `begin` writes the manifest and the image member's header; then `write` the data of the extents,
    in order and exactly; then `finish` writes the trailer and the tar and zstd ends. `close` without
    `finish` leaves a recognisably incomplete archive (no trailer)."""

    def __init__(self, out: IO[bytes], manifest: Manifest, *, level: int = LEVEL, threads: int = -1) -> None:
        manifest.check()
        self.manifest = manifest
        params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads, write_checksum=True)
        self._z = zstandard.ZstdCompressor(compression_params=params).stream_writer(out, closefd=False)
        self._chunks: list[str] = []
        self._hash = hashlib.sha256()
        self._in_chunk = 0
        self._written = 0
        self._member = 0
        self._mtime = _timestamp(manifest.snapshot_created)
        self._data_bytes = manifest.data_bytes  # summed once: `write` is called per piece
        self.raw_bytes = 0  # tar bytes before compression
        self._pending = bytearray()  # tar bytes not yet handed to the compressor (less than FEED)

    def _emit(self, data: Buffer) -> None:
        """Tar bytes to the compressor, in pieces of `FEED` bytes: a call into zstd's multi-threaded
        stream costs about 60 us whatever its size (an incremental made of 4 KiB changes spent most
        of its time there), and a fixed feed makes the compressed bytes independent of how the data
        arrived (request sizes), which `--resume` relies on."""
        view = memoryview(data).cast("B")
        if len(self._pending) + len(view) < FEED:
            self._pending += view
        else:
            take = FEED - len(self._pending)
            self._pending += view[:take]
            self._z.write(self._pending)
            view = view[take:]
            while len(view) >= FEED:
                self._z.write(view[:FEED])
                view = view[FEED:]
            self._pending = bytearray(view)
        self.raw_bytes += len(memoryview(data).cast("B"))

    def _drain(self) -> None:
        if self._pending:
            self._z.write(self._pending)
            self._pending = bytearray()

    def begin(self) -> None:
        m = self.manifest
        doc = (json.dumps(m.to_json(), indent=1) + "\n").encode()
        self._emit(_member_header(MANIFEST_NAME, len(doc), self._mtime) + doc + _padding(len(doc)))
        smap = sparse_map(m.extents, m.size)
        self._member = len(smap) + self._data_bytes
        pax = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": m.image_name,
            "GNU.sparse.realsize": str(m.size),
        }
        self._emit(_member_header(f"GNUSparseFile.0/{m.image_name}", self._member, self._mtime, pax) + smap)

    def write(self, data: Buffer) -> None:
        """The next bytes of the data extents (the image's data, in extent order)."""
        view = memoryview(data).cast("B")
        if self._written + len(view) > self._data_bytes:
            raise ValueError("more data than the manifest's extents hold")
        self._emit(view)
        self._written += len(view)
        size = self.manifest.chunk_size
        while len(view):
            take = min(len(view), size - self._in_chunk)
            self._hash.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == size:
                self._end_chunk()

    def _end_chunk(self) -> None:
        self._chunks.append(self._hash.hexdigest())
        self._hash = hashlib.sha256()
        self._in_chunk = 0

    def finish(self) -> Trailer:
        m = self.manifest
        if self._written != m.data_bytes:
            raise ValueError(f"{self._written} of {m.data_bytes} data bytes written")
        if self._in_chunk:
            self._end_chunk()
        self._emit(_padding(self._member))
        trailer = Trailer(self._chunks, self._written)
        doc = (json.dumps(trailer.to_json()) + "\n").encode()
        self._emit(_member_header(TRAILER_NAME, len(doc), self._mtime) + doc + _padding(len(doc)))
        self._emit(b"\0" * (2 * BLOCK))  # end of the tar archive
        self._drain()
        self._z.close()  # type: ignore[no-untyped-call]  # ends the zstd frame; the output stays open
        return trailer

    def close(self) -> None:
        """Flush what is buffered; without `finish` the archive stays incomplete (no trailer)."""
        if not self._z.closed:
            self._drain()
            self._z.flush(zstandard.FLUSH_BLOCK)


def _timestamp(created: str) -> float:
    """A snapshot's RFC 3339 time as seconds since the epoch (0 when it cannot be read)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def data_pieces(extents: Iterable[tuple[int, int]], piece: int) -> Iterator[tuple[int, int]]:
    """The extents cut in pieces of at most `piece` bytes, in order (what the backup reads)."""
    for offset, length in extents:
        pos = 0
        while pos < length:
            n = min(piece, length - pos)
            yield offset + pos, n
            pos += n


def sync_fd(fd: int) -> None:
    """fsync what can be (a regular file); pipes and terminals cannot."""
    with contextlib.suppress(OSError):
        os.fsync(fd)

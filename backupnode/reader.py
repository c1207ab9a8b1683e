"""Reading a backup archive: restore and verify (docs/ARCHIVE-FORMAT.md; the format is `backupnode.archive`).

The reader trusts nothing until it has met the trailer: an archive cut anywhere (no trailer, a short
member, a broken zstd frame) is an `IncompleteArchive`, and a chunk whose SHA-256 differs from the
trailer's is reported (verify) or fails the restore before its temporary file is renamed.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

import zstandard

from backupnode.archive import (
    BLOCK,
    MANIFEST_NAME,
    TRAILER_NAME,
    ArchiveError,
    CorruptArchive,
    IncompleteArchive,
    Manifest,
    Trailer,
    sparse_map,
)


@dataclass(slots=True)
class ReadResult:
    manifest: Manifest
    trailer: Trailer
    bad_chunks: list[int] = field(default_factory=list)  # chunk numbers whose SHA-256 differs


class _Stream:
    """Exact reads from the decompressed archive; a short read is an incomplete archive.

    `end` checks that the zstd frame ended exactly (its checksum included) with nothing after it:
    an archive cut even in the last bytes of the frame is incomplete."""

    INPUT = 1 << 20

    def __init__(self, raw: IO[bytes], path: str) -> None:
        self.path = path
        self._raw = raw
        self._z = zstandard.ZstdDecompressor().decompressobj()
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    def _more(self) -> bool:
        """Decompress more input into the buffer; False at the end of the input."""
        if self._eof:
            return False
        try:
            data = self._raw.read(self.INPUT)
        except OSError as e:
            raise ArchiveError(path=self.path, detail=f"read error: {e.strerror or e}") from None
        if not data:
            self._eof = True
            return False
        try:
            out = self._z.decompress(data)
        except zstandard.ZstdError as e:
            raise CorruptArchive(path=self.path, detail=f"the compressed stream is damaged ({e})") from None
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += out
        return True

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._more():
                raise IncompleteArchive(path=self.path, detail="it ends early: the backup did not finish")
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return out

    def end(self) -> None:
        while self._more():
            pass
        if len(self._buf) - self._pos or self._z.unused_data:
            raise CorruptArchive(path=self.path, detail="unexpected data after the end of the archive")
        if not self._z.eof:
            raise IncompleteArchive(path=self.path, detail="the compressed stream is cut short")

    def close(self) -> None:
        self._buf = bytearray()


def _parse_pax(data: bytes, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise CorruptArchive(path=path, detail="malformed pax header") from None
        record = data[space + 1 : pos + length - 1].decode("utf-8", "replace")
        key, _, value = record.partition("=")
        out[key] = value
        pos += length
    return out


@dataclass(slots=True)
class _Member:
    name: str
    size: int
    pax: dict[str, str]


def _next_member(stream: _Stream) -> _Member | None:
    """The next member's header (None at the end of the tar)."""
    pax: dict[str, str] = {}
    while True:
        block = stream.read(BLOCK)
        if block == b"\0" * BLOCK:
            return None
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise CorruptArchive(path=stream.path, detail=f"bad tar header ({e})") from None
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            data = stream.read(info.size + (-info.size % BLOCK))[: info.size]
            if info.type == tarfile.XHDTYPE:
                pax.update(_parse_pax(data, stream.path))
            continue
        size = int(pax["size"]) if "size" in pax else info.size
        return _Member(pax.get("path", info.name), size, pax)


def _read_manifest(stream: _Stream) -> tuple[Manifest, dict[str, Any]]:
    """The first member, which must be the manifest: parsed and checked, and its JSON document."""
    path = stream.path
    first = _next_member(stream)
    if first is None or first.name != MANIFEST_NAME:
        raise ArchiveError(path=path, detail="not a backup archive (no MANIFEST.json first)")
    try:
        doc = json.loads(stream.read(first.size + (-first.size % BLOCK))[: first.size])
    except ValueError:
        raise CorruptArchive(path=path, detail="the manifest is not valid JSON") from None
    manifest = Manifest.from_json(doc, path)
    try:
        manifest.check()
    except ValueError as e:
        raise CorruptArchive(path=path, detail=f"manifest: {e}") from None
    return manifest, doc


def read_manifest(raw: IO[bytes], path: str) -> tuple[Manifest, dict[str, Any]]:
    """Only the manifest at the front of an archive (a quick look: nothing else is read or checked)."""
    stream = _Stream(raw, path)
    try:
        return _read_manifest(stream)
    finally:
        stream.close()


def read_archive(
    raw: IO[bytes], path: str, *, sink: Any = None, stop_at_first_bad: bool = False
) -> ReadResult:
    """Read a whole archive, checking its structure and every chunk.

    `sink`, if given, gets ``sink.manifest(manifest)`` first, then ``sink.data(offset, bytes)`` for
    each piece of the image's data at its image offset. Raises `IncompleteArchive` or
    `CorruptArchive`; chunk mismatches are returned in `bad_chunks` (the first one raises with
    `stop_at_first_bad`)."""
    stream = _Stream(raw, path)
    try:
        manifest, _doc = _read_manifest(stream)
        if sink is not None:
            sink.manifest(manifest)
        image = _next_member(stream)
        if image is None:
            raise IncompleteArchive(path=path, detail="it ends after the manifest")
        _check_image_member(image, manifest, path)
        hashes, bad = _read_image(stream, image, manifest, sink, stop_at_first_bad)
        last = _next_member(stream)
        if last is None or last.name != TRAILER_NAME:
            raise IncompleteArchive(path=path, detail="no trailer after the image: the backup did not finish")
        try:
            tdoc = json.loads(stream.read(last.size + (-last.size % BLOCK))[: last.size])
            trailer = Trailer(
                [str(h) for h in tdoc["chunk_sha256"]], int(tdoc["data_bytes"]), bool(tdoc["complete"])
            )
        except (ValueError, KeyError, TypeError):
            raise CorruptArchive(path=path, detail="the trailer is malformed") from None
        if not trailer.complete or trailer.data_bytes != manifest.data_bytes:
            raise CorruptArchive(path=path, detail="the trailer does not match the manifest")
        if len(trailer.chunks) != len(hashes):
            raise CorruptArchive(
                path=path, detail=f"{len(trailer.chunks)} chunk checksums for {len(hashes)} chunks"
            )
        bad = [i for i, (got, want) in enumerate(zip(hashes, trailer.chunks, strict=True)) if got != want]
        if bad and stop_at_first_bad:
            offset = image_offset(manifest, bad[0] * manifest.chunk_size)
            raise CorruptArchive(
                path=path, detail=f"chunk {bad[0]} (image offset {offset}) does not match its checksum"
            )
        if _next_member(stream) is not None:
            raise CorruptArchive(path=path, detail="unexpected member after the trailer")
        stream.read(BLOCK)  # the second of the two zero records that end a tar
        stream.end()
        return ReadResult(manifest, trailer, bad)
    finally:
        stream.close()


def _check_image_member(member: _Member, manifest: Manifest, path: str) -> None:
    pax = member.pax
    if pax.get("GNU.sparse.major") != "1" or pax.get("GNU.sparse.minor") != "0":
        raise CorruptArchive(path=path, detail="the image member is not in GNU sparse format 1.0")
    if pax.get("GNU.sparse.name") != manifest.image_name or pax.get("GNU.sparse.realsize") != str(
        manifest.size
    ):
        raise CorruptArchive(path=path, detail="the image member does not match the manifest")


def _read_image(
    stream: _Stream, member: _Member, manifest: Manifest, sink: Any, stop_at_first_bad: bool
) -> tuple[list[str], list[int]]:
    smap = sparse_map(manifest.extents, manifest.size)
    if stream.read(len(smap)) != smap:
        raise CorruptArchive(
            path=stream.path, detail="the image's sparse map differs from the manifest's extents"
        )
    if member.size != len(smap) + manifest.data_bytes:
        raise CorruptArchive(path=stream.path, detail="the image member's size does not match the manifest")
    hashes: list[str] = []
    h = hashlib.sha256()
    in_chunk = 0
    chunk = manifest.chunk_size
    for offset, length in manifest.extents:
        pos = 0
        while pos < length:
            take = min(length - pos, chunk - in_chunk)
            data = stream.read(take)
            h.update(data)
            if sink is not None:
                sink.data(offset + pos, data)
            pos += take
            in_chunk += take
            if in_chunk == chunk:
                hashes.append(h.hexdigest())
                h, in_chunk = hashlib.sha256(), 0
    if in_chunk:
        hashes.append(h.hexdigest())
    stream.read(-member.size % BLOCK)
    return hashes, []


def image_offset(manifest: Manifest, data_offset: int) -> int:
    """The image offset of byte `data_offset` of the data stream."""
    pos = 0
    for offset, length in manifest.extents:
        if data_offset < pos + length:
            return offset + data_offset - pos
        pos += length
    return manifest.size

"""Where archives live: local files or S3 objects, behind one set of verbs for the archive catalogue.

An archive ``A`` (a path, or ``s3://BUCKET/KEY``) is complete once its index ``A + INDEX_SUFFIX`` exists:
a small JSON document written once, after the archive, and never overwritten. An archive without an
index is incomplete (a backup cut short, or still running). Deleting removes the index first, so an
archive never looks complete while it is half gone.

A destination (`list_indexes`) is a local directory or an S3 prefix, ``s3://BUCKET/`` or
``s3://BUCKET/PREFIX/``; only the archives directly in it are listed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from backupnode import s3
from backupnode.s3 import INDEX_SUFFIX, S3Location, S3Reader, is_s3
from standbylib.errors import StandbyError

__all__ = [
    "INDEX_SUFFIX",
    "DestinationError",
    "IndexExists",
    "delete_archive",
    "list_indexes",
    "open_read",
    "read_index",
    "write_index",
]


class DestinationError(StandbyError):
    template = "{url}: {detail}"


class IndexExists(DestinationError):
    template = "{url} exists: an index is never overwritten"


def index_url(archive_url: str) -> str:
    """The index of `archive_url`."""
    return archive_url + INDEX_SUFFIX


def open_read(url: str) -> IO[bytes]:
    """The archive at `url` as a binary stream: a local path, "-" (standard input) or ``s3://``.

    A missing local file raises `FileNotFoundError`, as `open` does; a missing object `s3.NoSuchArchive`."""
    if url == "-":
        return sys.stdin.buffer
    if is_s3(url):
        return io.BufferedReader(S3Reader(url), buffer_size=1 << 20)
    return open(url, "rb")


def write_index(archive_url: str, doc: dict[str, Any]) -> None:
    """Write the index of `archive_url` once: an existing index is never replaced (`IndexExists`).
    Locally it appears whole or not at all (written aside, synced, then linked to its name)."""
    if is_s3(archive_url):
        try:
            s3.put_index(s3.client(), S3Location.parse(archive_url), doc)
        except s3.ObjectExists:
            raise IndexExists(url=index_url(archive_url)) from None
        return
    final = Path(index_url(archive_url))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as e:
        raise DestinationError(url=str(final), detail=f"cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(s3.index_bytes(doc))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, final)  # unlike a rename, a link never replaces an existing index
        _sync_dir(final.parent)
    except FileExistsError:
        raise IndexExists(url=str(final)) from None
    except OSError as e:
        raise DestinationError(url=str(final), detail=f"cannot write: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_index(archive_url: str) -> dict[str, Any] | None:
    """The index of `archive_url`, or None when it has none (an incomplete archive, or no archive)."""
    url = index_url(archive_url)
    if is_s3(archive_url):
        raw = s3.get_small(s3.client(), S3Location.parse(url))
    else:
        try:
            raw = Path(url).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise DestinationError(url=url, detail=e.strerror or str(e)) from None
    return None if raw is None else _parse(url, raw)


def list_indexes(dest: str) -> list[tuple[str, dict[str, Any]]]:
    """Every complete archive directly in `dest` (a directory or an S3 prefix), as (archive URL, index),
    sorted by URL. An index that vanishes while listed (a delete) is left out."""
    if is_s3(dest):
        prefix = S3Location.parse_prefix(dest)
        client = s3.client()
        names = [key for key in s3.list_keys(client, prefix) if key.endswith(INDEX_SUFFIX)]
        urls = [S3Location(prefix.bucket, key).url for key in names]
    else:
        try:
            with os.scandir(dest) as entries:
                urls = [e.path for e in entries if e.name.endswith(INDEX_SUFFIX) and e.is_file()]
        except OSError as e:
            raise DestinationError(url=dest, detail=e.strerror or str(e)) from None
    found = []
    for url in sorted(urls):
        archive = url[: -len(INDEX_SUFFIX)]
        doc = read_index(archive)
        if doc is not None:
            found.append((archive, doc))
    return found


def delete_archive(archive_url: str) -> None:
    """Delete the archive: its index first (so it stops looking complete), then the archive itself.
    Missing pieces are fine. On S3, an open multipart upload of the key is left alone."""
    if is_s3(archive_url):
        archive = S3Location.parse(archive_url)
        client = s3.client()
        s3.delete(client, archive.index)
        s3.delete(client, archive)
        return
    for path in (index_url(archive_url), archive_url):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DestinationError(url=path, detail=f"cannot delete: {e.strerror or e}") from None


def _parse(url: str, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise DestinationError(url=url, detail=f"malformed index ({e})") from None
    if not isinstance(doc, dict):
        raise DestinationError(url=url, detail="malformed index (not a JSON object)")
    return doc


def _sync_dir(path: Path) -> None:
    """fsync a directory, so a new name in it survives a crash (where the filesystem allows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

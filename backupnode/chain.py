"""Chains of archives: a full archive, then incrementals, oldest first; restored and verified as one.

An incremental names its base: the base snapshot's identity and the SHA-256 of the base's archive.
Before anything is written, the manifests at the front of the archives are checked: the first must be
a full archive, each next one an incremental of the same volume and size whose base is the snapshot
the archive before it holds. While the archives are read, each one's SHA-256 is computed and compared
with what the next one names, so an incremental made on another archive of the same snapshot is
refused too. `restore` writes ``IMAGE.partial`` and renames it to IMAGE only once every archive was
read whole and every chunk matched: a broken chain never leaves an image that looks complete.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from typing import IO, Any

from backupnode import destinations
from backupnode.archive import FULL, ArchiveError, CorruptArchive, Manifest, same_snapshot
from backupnode.progress import Progress
from backupnode.reader import ReadResult, read_archive, read_manifest
from standbylib.errors import StandbyError
from standbylib.rawfile import OsFile


class BrokenChain(StandbyError):
    template = "{detail}"


class UnreadableArchive(StandbyError):
    template = "cannot read {path}: {reason}"


class HashingReader:
    """A readable stream that hashes what goes through it (the archive's SHA-256)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data


def describe(m: Manifest) -> str:
    epoch = m.identity.get("epoch")
    return f"{m.volume}@{m.snapshot}" + (f" (epoch {epoch})" if epoch is not None else "")


def check_links(archives: Sequence[str], manifests: Sequence[Manifest]) -> None:
    """The chain's order and linkage from its manifests alone (`BrokenChain` naming the problem)."""
    first = manifests[0]
    if first.kind != FULL:
        base = first.base.get("snapshot", {})
        raise BrokenChain(
            detail=f"{archives[0]} is an incremental archive (of {describe(first)}, on base "
            f"{base.get('volume')}@{base.get('name')}): a chain starts with a full archive, then its "
            "incrementals, oldest first"
        )
    for i in range(1, len(manifests)):
        prev, m = manifests[i - 1], manifests[i]
        if m.kind == FULL:
            raise BrokenChain(
                detail=f"{archives[i]} is a full archive: only the first archive of a chain is full "
                "(restore it alone, or drop the archives before it)"
            )
        if (m.volume, m.size) != (prev.volume, prev.size):
            raise BrokenChain(
                detail=f"{archives[i]} is of volume {m.volume!r} ({m.size} bytes), {archives[i - 1]} of "
                f"{prev.volume!r} ({prev.size} bytes): a chain is one volume's"
            )
        if not same_snapshot(m.base.get("snapshot", {}), prev.identity):
            base = m.base.get("snapshot", {})
            raise BrokenChain(
                detail=f"{archives[i]} was made on {base.get('volume')}@{base.get('name')} (epoch "
                f"{base.get('epoch')}), but the archive before it, {archives[i - 1]}, holds "
                f"{describe(prev)}: the chain is mis-ordered or misses a link (oldest first)"
            )


class ImageSink:
    """Applies a chain to ``IMAGE.partial``: the full archive's data into a new sparse file, then each
    incremental's zeroed ranges (holes punched) and data. `commit` renames it to IMAGE."""

    def __init__(self, path: str, progress: Progress) -> None:
        self.path = path
        self.work = path + ".partial"
        self.progress = progress
        self.file: OsFile | None = None

    def manifest(self, m: Manifest) -> None:
        if m.kind == FULL:
            with suppress(FileNotFoundError):
                os.unlink(self.work)
            self.file = OsFile(self.work, create=True)
            self.file.truncate(m.size)  # sparse: holes are never written
        elif self.file is None:
            raise BrokenChain(
                detail=f"{describe(m)} is an incremental archive: give its full archive and the "
                "incrementals before it too, oldest first"
            )
        else:
            for offset, length in m.zero_extents:
                self.file.punch(offset, length)
        self.progress.start(m.data_bytes)

    def data(self, offset: int, data: bytes) -> None:
        assert self.file is not None
        self.file.pwrite(data, offset)
        self.progress.advance(len(data))

    def commit(self) -> None:
        assert self.file is not None
        self.file.sync()
        self.file.close()
        self.file = None
        os.replace(self.work, self.path)

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        with suppress(FileNotFoundError):
            os.unlink(self.work)


class CountingSink:
    """Only counts (for `verify`'s progress bar)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def manifest(self, m: Manifest) -> None:
        self.progress.start(m.data_bytes)

    def data(self, offset: int, data: bytes) -> None:
        self.progress.advance(len(data))


def read_chain(
    archives: Sequence[str], sink: Any, *, stop_at_first_bad: bool
) -> list[tuple[ReadResult, str]]:
    """Read every archive of a chain whole into `sink`, checking the chain; each one's result and
    SHA-256. Raises `BrokenChain` or an `ArchiveError` naming the archive."""
    if sum(a == "-" for a in archives) > 1:
        raise BrokenChain(detail="standard input (-) can hold only one archive of a chain")
    if len(archives) > 1:
        manifests = []
        for url in archives:
            if url == "-":
                raise BrokenChain(detail="a chain of several archives is read from files or s3://, not -")
            with ExitStack() as stack:
                manifests.append(read_manifest(stack.enter_context(_opened(url)), url)[0])
        check_links(archives, manifests)
    out: list[tuple[ReadResult, str]] = []
    for i, url in enumerate(archives):
        with ExitStack() as stack:
            raw = HashingReader(stack.enter_context(_opened(url)))
            result = read_archive(raw, url, sink=sink, stop_at_first_bad=stop_at_first_bad)  # type: ignore[arg-type]
        sha = raw.sha256.hexdigest()
        if i and result.manifest.base.get("archive_sha256") != out[-1][1]:
            raise BrokenChain(
                detail=f"{url} was made on another archive of {out[-1][0].manifest.snapshot} than "
                f"{archives[i - 1]} (SHA-256 {out[-1][1][:16]}..., it names "
                f"{str(result.manifest.base.get('archive_sha256'))[:16]}...): the chain is broken"
            )
        out.append((result, sha))
    return out


def _opened(url: str) -> Any:
    """The archive's bytes as a context manager (standard input is left open)."""
    try:
        raw = destinations.open_read(url)
    except OSError as e:
        raise UnreadableArchive(path=url, reason=e.strerror or str(e)) from None
    if url == "-":
        return _Borrowed(raw)
    return raw


class _Borrowed:
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw

    def __enter__(self) -> IO[bytes]:
        return self.raw

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = ["ArchiveError", "BrokenChain", "CorruptArchive", "ImageSink", "read_chain"]

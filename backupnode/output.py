"""Where an archive goes: a file, standard output (a pipe or a tape), or an S3 object, and its index.

Every archive written to a file or to S3 gets an *index* beside it once it is complete
(``ARCHIVE.manifest.json``, written once, never overwritten): its manifest, its SHA-256 and size. An
archive without its index is incomplete (a backup still running, or one that died); `list`, `prune`
and the search for an incremental's base only count indexed archives. An archive written to standard
output has no index: its reader checks its trailer.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import IO, Any

from backupnode import destinations, s3
from backupnode.archive import Manifest
from standbylib.errors import StandbyError

INDEX_FORMAT = "standby-archive-index"


class OutputFailed(StandbyError):
    template = "{detail}"


def index_document(manifest: Manifest, sha256: str, size: int, chunks: int) -> dict[str, Any]:
    """The index of a complete archive."""
    return {
        "format": INDEX_FORMAT,
        "version": 1,
        "archive_sha256": sha256,
        "archive_bytes": size,
        "chunks": chunks,
        "manifest": manifest.to_json(),
    }


class Output:
    """The archive's sink: counts and hashes every byte, and turns write errors into one clear line.

    `finish` makes the archive complete (fsync and index for a file, the multipart upload's end and
    index for S3); `abandon` leaves what was written recognisably incomplete (no index), and aborts an
    S3 upload unless `keep_upload` (an interruption `--resume` may continue)."""

    def __init__(
        self,
        url: str,
        *,
        force: bool,
        expected_bytes: int,
        resume: bool = False,
        in_flight: int = 4,
        on_part: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.name = "standard output" if url == "-" else url
        self.written = 0
        self.sha256 = hashlib.sha256()
        self.upload: s3.S3Upload | None = None
        self.file: IO[bytes] | None = None
        self.regular = False
        if s3.is_s3(url):
            self.upload = s3.S3Upload(
                url,
                part_size=s3.part_size_for(expected_bytes),
                in_flight=in_flight,
                resume=resume,
                on_part=on_part,
            )
            self.sha256 = self.upload.sha256  # the upload hashes what it sends
        else:
            self.file, self.regular = _open_file(url, force)

    @property
    def resumed_parts(self) -> int:
        return self.upload.skipped_parts if self.upload is not None else 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            if self.upload is not None:
                self.upload.write(view)  # it hashes what it uploads: `sha256` is the upload's then
            else:
                assert self.file is not None
                self.file.write(view)
                self.sha256.update(view)
        except OSError as e:
            raise OutputFailed(detail=f"cannot write the archive to {self.name}: {e.strerror or e}") from None
        self.written += len(view)
        return len(view)

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError as e:
                raise OutputFailed(
                    detail=f"cannot write the archive to {self.name}: {e.strerror or e}"
                ) from None

    def finish(self, manifest: Manifest, chunks: int) -> dict[str, Any] | None:
        """Make the archive complete; its index (None for standard output or a device)."""
        index = index_document(manifest, self.sha256.hexdigest(), self.written, chunks)
        if self.upload is not None:
            self.upload.finish(index)
            return index
        assert self.file is not None
        self.flush()
        if self.file is sys.stdout.buffer:
            return None
        try:
            if self.regular:
                os.fsync(self.file.fileno())
            self.file.close()
            if not self.regular:
                return None
            destinations.write_index(self.url, index)
        except OSError as e:
            raise OutputFailed(detail=f"cannot complete the archive {self.name}: {e.strerror or e}") from None
        return index

    def abandon(self, *, keep_upload: bool) -> None:
        if self.upload is not None and not keep_upload:
            self.upload.abort()
        if self.file is not None and self.file is not sys.stdout.buffer:
            with suppress(OSError):
                self.file.close()


def preflight(url: str, *, force: bool, resume: bool, destination: bool) -> None:
    """Refuse, before any snapshot is made, an output that cannot take the archive: an S3 bucket that
    is missing or refuses these credentials, an S3 key or a file that exists (a file only without
    --force; an S3 archive is never overwritten), --resume of something not on S3."""
    if resume and not s3.is_s3(url):
        raise OutputFailed(detail="--resume continues an interrupted upload to s3://: give an s3:// --output")
    if s3.is_s3(url):
        client = s3.client()
        if destination:
            s3.check_bucket(client, s3.S3Location.parse_prefix(url))
            return
        loc = s3.S3Location.parse(url)
        s3.check_bucket(client, loc)
        if not resume:
            for target in (loc, loc.index):
                if s3.exists(client, target):
                    raise s3.ObjectExists(url=target.url, detail="an archive on S3 is never overwritten")
    elif url != "-" and not destination and not force and os.path.isfile(url):
        raise OutputFailed(detail=f"{url} exists: give --force to overwrite it")


def _open_file(path: str, force: bool) -> tuple[IO[bytes], bool]:
    """The output stream, and whether it is a regular file (then it is fsynced and indexed)."""
    if path == "-":
        if sys.stdout.isatty():
            raise OutputFailed(
                detail="refusing to write an archive to a terminal: redirect it or give --output FILE"
            )
        return sys.stdout.buffer, False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and not force:
        raise OutputFailed(detail=f"{path} exists: give --force to overwrite it")
    regular = st is None or stat.S_ISREG(st.st_mode)
    if regular:
        # An archive overwritten with --force is incomplete until its new index is written.
        with suppress(FileNotFoundError):
            os.unlink(path + destinations.INDEX_SUFFIX)
    try:
        return open(path, "wb"), regular
    except OSError as e:
        raise OutputFailed(detail=f"cannot open {path} for the archive: {e.strerror or e}") from None

"""`standby-backup`: the backup node. Streams a frozen snapshot to an archive; restores and checks archives.

standby-backup run VOLUME --standby H:P --output FILE|- [--snapshot NAME] [--keep-snapshot]
standby-backup restore ARCHIVE --output IMAGE [--force]
standby-backup verify ARCHIVE
standby-backup list ARCHIVE [--json]

The archive format is docs/ARCHIVE-FORMAT.md: plain ``tar --zstd -xSf ARCHIVE`` restores it too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack, suppress
from typing import IO, Any

from backupnode.archive import Manifest
from backupnode.progress import Progress
from backupnode.reader import ReadResult, image_offset, read_archive, read_manifest
from standbylib.errors import StandbyError
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.main import EXIT_FAILED, EXIT_OK, run
from standbylib.units import human_size

PROG = "standby-backup"
log = logs.get(__name__)


class OutputExists(StandbyError):
    template = "{path} exists: give --force to overwrite it"


class UnreadableInput(StandbyError):
    template = "cannot read {path}: {reason}"


def open_input(path: str, stack: ExitStack) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    try:
        return stack.enter_context(open(path, "rb"))
    except OSError as e:
        raise UnreadableInput(path=path, reason=e.strerror or str(e)) from None


# -- restore ----------------------------------------------------------------------------------------


class ImageSink:
    """Writes the image's data at its offsets into a sparse file named ``IMAGE.partial``; `commit`
    renames it to IMAGE once the archive was read completely and every chunk matched."""

    def __init__(self, path: str, progress: Progress) -> None:
        self.path = path
        self.work = path + ".partial"
        self.progress = progress
        self.fd = -1
        self.size = 0

    def manifest(self, m: Manifest) -> None:
        self.fd = os.open(self.work, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, m.size)  # sparse: holes are never written
        self.size = m.size
        self.progress.start(m.data_bytes)

    def data(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self.progress.advance(len(data))

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.work, self.path)

    def abandon(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with suppress(FileNotFoundError):
            os.unlink(self.work)


def restore(archive: str, output: str, force: bool) -> int:
    if os.path.exists(output) and not force:
        raise OutputExists(path=output)
    t0 = time.monotonic()
    progress = Progress("restore", enabled=sys.stderr.isatty())
    sink = ImageSink(output, progress)
    with ExitStack() as stack:
        raw = open_input(archive, stack)
        try:
            result = read_archive(raw, archive, sink=sink, stop_at_first_bad=True)
            sink.commit()
        except BaseException:
            sink.abandon()
            raise
        finally:
            progress.close()
    m = result.manifest
    seconds = time.monotonic() - t0
    print(
        f"restored {m.volume}@{m.snapshot} ({human_size(m.size)}, {human_size(m.data_bytes)} of data) to "
        f"{output} in {seconds:.1f} s"
    )
    log.info(
        "restore_done",
        archive=archive,
        output=output,
        size=m.size,
        data_bytes=m.data_bytes,
        seconds=round(seconds, 3),
    )
    return EXIT_OK


# -- verify and list --------------------------------------------------------------------------------


class CountingSink:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def manifest(self, m: Manifest) -> None:
        self.progress.start(m.data_bytes)

    def data(self, offset: int, data: bytes) -> None:
        self.progress.advance(len(data))


def verify(archive: str) -> int:
    progress = Progress("verify", enabled=sys.stderr.isatty())
    with ExitStack() as stack:
        raw = open_input(archive, stack)
        try:
            result: ReadResult = read_archive(raw, archive, sink=CountingSink(progress))
        finally:
            progress.close()
    m = result.manifest
    if result.bad_chunks:
        first = result.bad_chunks[0]
        offset = image_offset(m, first * m.chunk_size)
        print(
            f"{archive}: {len(result.bad_chunks)} of {len(result.trailer.chunks)} chunks damaged, the first "
            f"at image offset {offset}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(
        f"{archive}: complete, {len(result.trailer.chunks)} chunks OK ({m.volume}@{m.snapshot}, "
        f"{human_size(m.size)}, {human_size(m.data_bytes)} of data)"
    )
    return EXIT_OK


def list_archive(archive: str, as_json: bool) -> int:
    """The manifest (read from the front of the archive only: a quick look, not a check)."""
    with ExitStack() as stack:
        raw = open_input(archive, stack)
        m, doc = read_manifest(raw, archive)
    if as_json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    print(f"volume     {m.volume}")
    print(f"snapshot   {m.snapshot} (taken {m.snapshot_created})")
    print(f"size       {human_size(m.size)} ({m.size} bytes), block size {m.block_size}")
    print(f"data       {human_size(m.data_bytes)} in {len(m.extents)} extents (the rest are holes)")
    print(f"image      {m.image_name}, checksums per {human_size(m.chunk_size)} of data")
    return EXIT_OK


# -- command line -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The backup node: stream a frozen snapshot from the standby to a compressed, "
        "tape-friendly archive, and restore, verify or list archives.",
        epilog="Exit codes: 0 ok, 1 the operation failed (the reason is printed), 2 usage error. "
        "Archives are zstd-compressed pax tar files: `tar --zstd -xSf ARCHIVE` restores the image "
        "without this program (docs/ARCHIVE-FORMAT.md).",
    )
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("restore", help="write the image an archive holds (sparse)")
    r.add_argument("archive", metavar="ARCHIVE", help="the archive file, or - for standard input")
    r.add_argument("--output", "-o", metavar="IMAGE", required=True, help="the image file to create")
    r.add_argument("--force", action="store_true", help="overwrite IMAGE if it exists")

    v = sub.add_parser("verify", help="check an archive is complete and every chunk matches its checksum")
    v.add_argument("archive", metavar="ARCHIVE", help="the archive file, or - for standard input")

    ls = sub.add_parser("list", help="show what an archive holds (its manifest)")
    ls.add_argument("archive", metavar="ARCHIVE", help="the archive file, or - for standard input")
    ls.add_argument("--json", action="store_true", help="the manifest as JSON")

    add_run_parser(sub)
    return p


def add_run_parser(sub: Any) -> None:
    from backupnode.config import RunConfig

    r = sub.add_parser(
        "run",
        help="back up a volume: snapshot on the standby, stream it over NBD into an archive",
        description="Back up VOLUME: ask the standby for a snapshot (or use --snapshot NAME), read it "
        "over NBD from the address the standby reports, and write the archive strictly sequentially "
        "(a file, - for standard output, or a tape device). A snapshot made for the backup is deleted "
        "at the end, also on failure or Ctrl-C, unless --keep-snapshot.",
    )
    r.add_argument("volume", metavar="VOLUME")
    cfg.add_options(r, RunConfig)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.command == "run":
            from backupnode.backup import backup
            from backupnode.config import RunConfig

            conf = cfg.resolve(RunConfig, args)
            if args.show_config:
                sys.stdout.write(cfg.show(conf))
                return EXIT_OK
            logs.configure("backup", level=conf.log_level, fmt=conf.log_format)
            if not conf.output:
                raise cfg.ConfigError(detail="--output is required: a file, - for standard output, or a tape")
            return backup(args.volume, conf)
        logs.configure("backup", level="warning")
        if args.command == "restore":
            return restore(args.archive, args.output, args.force)
        if args.command == "verify":
            return verify(args.archive)
        return list_archive(args.archive, args.json)

    return run(PROG, body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

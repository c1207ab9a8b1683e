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
from typing import Any

from backupnode import catalog, destinations
from backupnode.archive import INCREMENTAL
from backupnode.chain import CountingSink, ImageSink, read_chain
from backupnode.progress import Progress
from backupnode.reader import image_offset, read_manifest
from standbylib.errors import StandbyError
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.main import EXIT_FAILED, EXIT_OK, add_version, run
from standbylib.units import human_size

PROG = "standby-backup"
ARCHIVE_HELP = "an archive file, s3://BUCKET/KEY, or - for standard input"
log = logs.get(__name__)


class OutputExists(StandbyError):
    template = "{path} exists: give --force to overwrite it"


# -- restore and verify -------------------------------------------------------------------------------


def restore(archives: list[str], output: str, force: bool) -> int:
    """Write the image of the newest snapshot of a chain (a full archive, then its incrementals)."""
    if os.path.exists(output) and not force:
        raise OutputExists(path=output)
    t0 = time.monotonic()
    progress = Progress("restore", enabled=sys.stderr.isatty())
    sink = ImageSink(output, progress)
    try:
        results = read_chain(archives, sink, stop_at_first_bad=True)
        sink.commit()
    except BaseException:
        sink.abandon()
        raise
    finally:
        progress.close()
    m = results[-1][0].manifest
    data = sum(r.manifest.data_bytes for r, _sha in results)
    seconds = time.monotonic() - t0
    links = f" from {len(results)} archives" if len(results) > 1 else ""
    print(
        f"restored {m.volume}@{m.snapshot} ({human_size(m.size)}, {human_size(data)} of data{links}) to "
        f"{output} in {seconds:.1f} s"
    )
    log.info(
        "restore_done",
        archives=archives,
        output=output,
        size=m.size,
        data_bytes=data,
        seconds=round(seconds, 3),
    )
    return EXIT_OK


def verify(archives: list[str]) -> int:
    """Check each archive whole (every chunk) and, for several, their linkage as a chain."""
    progress = Progress("verify", enabled=sys.stderr.isatty())
    try:
        results = read_chain(archives, CountingSink(progress), stop_at_first_bad=False)
    finally:
        progress.close()
    failed = False
    for url, (result, sha) in zip(archives, results, strict=True):
        m = result.manifest
        if result.bad_chunks:
            failed = True
            offset = image_offset(m, result.bad_chunks[0] * m.chunk_size)
            print(
                f"{url}: {len(result.bad_chunks)} of {len(result.trailer.chunks)} chunks damaged, the first "
                f"at image offset {offset}",
                file=sys.stderr,
            )
            continue
        kind = "incremental" if m.kind == INCREMENTAL else "full"
        print(
            f"{url}: complete, {kind}, {len(result.trailer.chunks)} chunks OK ({m.volume}@{m.snapshot}, "
            f"{human_size(m.size)}, {human_size(m.data_bytes)} of data), SHA-256 {sha}"
        )
    if len(archives) > 1 and not failed:
        print(f"chain of {len(archives)} archives linked: restores {results[-1][0].manifest.snapshot}")
    return EXIT_FAILED if failed else EXIT_OK


def list_archive(archive: str, as_json: bool) -> int:
    """The manifest (read from the front of the archive only: a quick look, not a check), or, for a
    directory or an s3:// prefix ending in /, the complete archives there."""
    if archive.endswith("/") or os.path.isdir(archive):
        return list_destination(archive, as_json)
    with destinations.open_read(archive) as raw:
        m, doc = read_manifest(raw, archive)
    if as_json:
        print(json.dumps(doc, indent=1))
        return EXIT_OK
    print(f"volume     {m.volume}")
    print(f"snapshot   {m.snapshot} (taken {m.snapshot_created})")
    print(f"kind       {m.kind}")
    if m.kind == INCREMENTAL:
        base = m.base.get("snapshot", {})
        print(f"base       {base.get('volume')}@{base.get('name')}")
        print(f"base sha   {m.base.get('archive_sha256')} (its archive's SHA-256)")
        print(f"changed    {human_size(m.changed_bytes)}: {human_size(m.data_bytes)} of data in "
              f"{len(m.extents)} extents, {human_size(m.changed_bytes - m.data_bytes)} zeroed")  # fmt: skip
    else:
        print(f"data       {human_size(m.data_bytes)} in {len(m.extents)} extents (the rest are holes)")
    if m.replica:
        print(f"replica    {replica_text(m.replica)}")
    print(f"size       {human_size(m.size)} ({m.size} bytes), block size {m.block_size}")
    print(f"image      {m.image_name}, checksums per {human_size(m.chunk_size)} of data")
    return EXIT_OK


def replica_text(replica: dict[str, Any]) -> str:
    """How the replica was when the snapshot was taken, in words."""
    state = replica.get("state", "?")
    lag = float(replica.get("lag_seconds") or 0)
    if state == "uptodate" and replica.get("connected") and not lag:
        return "uptodate, following its primary when the snapshot was taken"
    link = "connected" if replica.get("connected") else "disconnected"
    return (
        f"{state}, {link} when the snapshot was taken: last in sync with its primary "
        f"{replica.get('in_sync_at', '?')} ({lag:.0f} s before): an older image than the primary's then"
    )


def list_destination(dest: str, as_json: bool) -> int:
    """The complete (indexed) archives in a directory or under an s3:// prefix, oldest snapshot first."""
    found = catalog.archives(dest)
    if as_json:
        print(json.dumps([{"archive": e.url, **e.index} for e in found], indent=1))
        return EXIT_OK
    print(f"{'ARCHIVE':40} {'VOLUME':10} {'SNAPSHOT':28} {'KIND':11} {'BASE':28} SIZE")
    for e in found:
        m = e.manifest
        base = m.base.get("snapshot", {}).get("name", "-") if m.kind == INCREMENTAL else "-"
        print(f"{e.name:40} {m.volume:10} {m.snapshot:28} {m.kind:11} {base:28} {human_size(e.size)}")
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
    add_version(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser(
        "restore",
        help="write the image an archive, or a chain of archives, holds (sparse)",
        description="Write the image of the newest snapshot of a chain: its full archive first, then "
        "its incrementals, oldest first (a single full archive is a chain too). The chain's order and "
        "links are checked before anything is written; the image is written as IMAGE.partial and "
        "renamed to IMAGE only once every archive was read and every checksum matched.",
    )
    r.add_argument("archive", metavar="ARCHIVE", nargs="+", help=ARCHIVE_HELP)
    r.add_argument("--output", "-o", metavar="IMAGE", required=True, help="the image file to create")
    r.add_argument("--force", action="store_true", help="overwrite IMAGE if it exists")

    v = sub.add_parser(
        "verify",
        help="check archives are complete, every chunk matches, and a chain is linked",
        description="Read each archive whole and check every chunk against its checksum; with several "
        "archives, also that they form a chain (full first, each incremental made on the one before).",
    )
    v.add_argument("archive", metavar="ARCHIVE", nargs="+", help=ARCHIVE_HELP)

    ls = sub.add_parser(
        "list",
        help="show what an archive holds (its manifest), or the archives in a directory or s3 prefix",
    )
    ls.add_argument(
        "archive", metavar="ARCHIVE|DEST", help=ARCHIVE_HELP + "; or a directory, or s3://BUCKET/PREFIX/"
    )
    ls.add_argument("--json", action="store_true", help="as JSON")

    add_run_parser(sub)
    catalog.add_prune_parser(sub)
    return p


def add_run_parser(sub: Any) -> None:
    from backupnode.config import RunConfig

    r = sub.add_parser(
        "run",
        help="back up a volume: snapshot on the standby, stream it over NBD into an archive",
        description="Back up VOLUME: ask the standby for a snapshot (or use --snapshot NAME), read it "
        "over NBD from the address the standby reports, and write the archive strictly sequentially "
        "(a file, - for standard output, a tape device, or s3://BUCKET/KEY; a directory or an "
        "s3://BUCKET/PREFIX/ names the archive VOLUME-SNAPSHOT.tar.zst in it). With --since, the "
        "archive is incremental: only the blocks written since that older snapshot, which the standby "
        "knows from its preservation store (keep each backup's snapshot with --keep-snapshot to make "
        "the next one incremental; --since latest finds it beside the output). A snapshot made for the "
        "backup is deleted at the end, also on failure or Ctrl-C, unless --keep-snapshot; after an "
        "interrupted upload to S3 it stays until its lease runs out, for --resume.",
        epilog="Examples: standby-backup run vol0 --output /backup/vol0/ --keep-snapshot; then nightly "
        "standby-backup run vol0 --output /backup/vol0/ --since latest --keep-snapshot --release-base "
        "--keep-lease 8d. Endpoint, region and credentials of s3:// come from the standard AWS "
        "environment variables and files (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws/...). "
        "docs/OPERATIONS.md has the nightly set-up.",
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
        if args.command == "prune":
            return catalog.prune_command(args)
        return list_archive(args.archive, args.json)

    return run(PROG, body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

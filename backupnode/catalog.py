"""The archives a destination holds, as the backup node finds, names, resumes and prunes them.

A *destination* is a directory or an ``s3://BUCKET/PREFIX/``; its complete archives are the ones with an
index (`backupnode.output`). This module:

* names an archive written "into" a destination: ``VOLUME-SNAPSHOT.tar.zst``;
* finds the base of an incremental (`find_base`): the archive, in the output's destination or named by
  `--base-archive`, whose manifest holds the `--since` snapshot (same standby, volume and epoch), and
  checks that snapshot is still on the standby;
* records, beside an S3 upload while it runs, which snapshot it archives (a *marker*,
  ``KEY.partial.json``), so that `--resume` regenerates the same bytes from the same snapshot;
* prunes (`prune`): keeps the newest archive of each of the last N days, weeks and months of each volume
  (as borg prune does), and every archive a kept incremental needs, down to its full archive.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from backupnode import destinations, s3
from backupnode.archive import INCREMENTAL, Manifest, same_snapshot
from backupnode.config import RunConfig
from backupnode.control import Standby, UnknownSnapshotOnStandby, identity
from standbylib.errors import StandbyError
from standbylib.rpc.v1 import control_pb2
from standbylib.runtime import logs
from standbylib.runtime.main import EXIT_OK
from standbylib.units import human_size

log = logs.get(__name__)

MARKER_SUFFIX = ".partial.json"
LATEST = "latest"


class CatalogError(StandbyError):
    template = "{detail}"


@dataclass
class Entry:
    """A complete archive of a destination."""

    url: str
    index: dict[str, Any]

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_json(self.index["manifest"], self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def size(self) -> int:
        return int(self.index.get("archive_bytes", 0))

    @property
    def sha256(self) -> str:
        return str(self.index.get("archive_sha256", ""))

    @property
    def created(self) -> datetime:
        return parse_time(self.manifest.snapshot_created)

    @property
    def order(self) -> tuple[datetime, int, str]:
        """Oldest snapshot first: snapshot times have whole seconds, so two taken in the same second are
        ordered by their epoch on the standby (a later snapshot has a larger one)."""
        m = self.manifest
        return parse_time(m.snapshot_created), int(m.identity.get("epoch", 0)), self.url


def parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.fromtimestamp(0, UTC)


def is_destination(url: str) -> bool:
    """A directory or a prefix (ending in /) that archives go into, rather than one archive's name."""
    return url.endswith("/") or (not s3.is_s3(url) and url != "-" and os.path.isdir(url))


def destination_of(output: str) -> str:
    """The destination an archive is in: its directory or S3 prefix ("" for standard output)."""
    if output == "-":
        return ""
    if is_destination(output):
        return output
    if s3.is_s3(output):
        return output.rsplit("/", 1)[0] + "/"
    return os.path.dirname(os.path.abspath(output))


def archive_url(output: str, volume: str, snapshot: str) -> str:
    """Where the archive of `volume@snapshot` goes for `--output`: itself, or a name in it when it is a
    destination."""
    if not is_destination(output):
        return output
    name = f"{volume}-{snapshot}.tar.zst"
    return output + name if output.endswith("/") else os.path.join(output, name)


def archives(dest: str, volume: str | None = None) -> list[Entry]:
    """The complete archives in `dest` (of `volume` only, when given), oldest snapshot first."""
    found = [Entry(url, doc) for url, doc in destinations.list_indexes(dest)]
    if volume is not None:
        found = [e for e in found if e.index.get("manifest", {}).get("volume") == volume]
    return sorted(found, key=lambda e: e.order)


# -- the base of an incremental ----------------------------------------------------------------------


def find_base(
    standby: Standby, volume: str, conf: RunConfig
) -> tuple[control_pb2.SnapshotInfo, str, str] | None:
    """For `--since`: the base snapshot on the standby, its archive and that archive's SHA-256; None for
    a full backup (no `--since`, or `--since latest` with no usable base)."""
    if not conf.since:
        return None
    dest = destination_of(conf.output)
    if conf.since == LATEST:
        if not dest:
            raise CatalogError(
                detail="--since latest looks for the last archive beside --output: "
                "give a file, a directory or s3://"
            )
        found = archives(dest, volume)
        for entry in reversed(found):
            ident = entry.manifest.identity
            try:
                snap = standby.snapshot(volume, str(ident.get("name", "")))
            except UnknownSnapshotOnStandby:
                continue
            if not (same_snapshot(identity(snap), ident) and snap.valid):
                continue
            full = chain_start(found, entry)
            age = (datetime.now(UTC) - full.created).total_seconds() if full is not None else None
            if conf.full_every and (age is None or age > conf.full_every):
                log.info("full_backup_due", volume=volume, full=full.url if full else None,
                         age_seconds=round(age) if age is not None else None)  # fmt: skip
                return None
            return snap, entry.url, entry.sha256
        log.info("full_backup_no_base", volume=volume, destination=dest,
                 reason="no archive in the destination holds a snapshot still on the standby")  # fmt: skip
        return None
    snap = standby.snapshot(volume, conf.since)
    if not snap.valid:
        raise CatalogError(
            detail=f"the base snapshot {volume}@{conf.since} is invalid ({snap.reason}): its changes are not "
            "known, run a full backup"
        )
    if conf.base_archive:
        entry = Entry(conf.base_archive, _index_of(conf.base_archive))
        if not same_snapshot(entry.manifest.identity, identity(snap)):
            raise CatalogError(
                detail=f"{conf.base_archive} holds {volume}@{entry.manifest.snapshot} (epoch "
                f"{entry.manifest.identity.get('epoch')}), not the snapshot {volume}@{conf.since} (epoch "
                f"{snap.epoch}) given with --since"
            )
        return snap, entry.url, entry.sha256
    if not dest:
        raise CatalogError(detail="--since with --output -: name the base's archive with --base-archive")
    for entry in archives(dest, volume):
        if same_snapshot(entry.manifest.identity, identity(snap)):
            return snap, entry.url, entry.sha256
    raise CatalogError(
        detail=f"no complete archive of {volume}@{conf.since} in {dest}: give --base-archive ARCHIVE, or "
        "run a full backup first"
    )


def chain_start(entries: list[Entry], entry: Entry) -> Entry | None:
    """The full archive `entry`'s chain starts from, following each incremental's base by its
    archive's SHA-256 (None when a link is missing)."""
    by_sha = {e.sha256: e for e in entries}
    seen: set[str] = set()
    while entry.manifest.kind == INCREMENTAL:
        base = by_sha.get(str(entry.manifest.base.get("archive_sha256")))
        if base is None or base.url in seen:
            return None
        seen.add(base.url)
        entry = base
    return entry


def _index_of(url: str) -> dict[str, Any]:
    doc = destinations.read_index(url)
    if doc is None:
        raise CatalogError(
            detail=f"{url} has no index ({url}{destinations.INDEX_SUFFIX}): it is incomplete, or not "
            "an archive of this program"
        )
    return doc


# -- markers of uploads in progress ------------------------------------------------------------------


def mark(url: str, volume: str, snap: control_pb2.SnapshotInfo, made: str) -> None:
    """Beside an S3 upload: which snapshot it archives (read back by `--resume`)."""
    if not s3.is_s3(url):
        return
    doc = {"archive": url, "volume": volume, "snapshot": identity(snap), "made": bool(made)}
    loc = s3.S3Location.parse(url + MARKER_SUFFIX)
    s3.call(s3.client(), "put_object", loc.url, Bucket=loc.bucket, Key=loc.key, Body=json.dumps(doc).encode())


def unmark(url: str) -> None:
    if s3.is_s3(url):
        s3.delete(s3.client(), s3.S3Location.parse(url + MARKER_SUFFIX))


def resumed_marker(output: str, volume: str) -> dict[str, Any] | None:
    """The marker of the interrupted upload `--resume` continues (None: there is none to continue); the
    output is on S3 (`output.preflight` refused anything else)."""
    client = s3.client()
    if is_destination(output):
        prefix = s3.S3Location.parse_prefix(output)
        urls = [
            s3.S3Location(prefix.bucket, k).url
            for k in s3.list_keys(client, prefix)
            if k.endswith(MARKER_SUFFIX)
        ]
    else:
        urls = [output + MARKER_SUFFIX]
    for url in sorted(urls, reverse=True):
        raw = s3.get_small(client, s3.S3Location.parse(url))
        if raw is None:
            continue
        doc = json.loads(raw)
        if doc.get("volume") == volume:
            return dict(doc)
    return None


def marked_snapshot(standby: Standby, volume: str, marker: dict[str, Any]) -> control_pb2.SnapshotInfo:
    """The snapshot an interrupted upload archived, which `--resume` must archive again."""
    want = marker.get("snapshot", {})
    gone = CatalogError(
        detail=f"the snapshot {volume}@{want.get('name')} of the interrupted upload {marker.get('archive')} "
        "is gone from the standby (its lease ran out?): start the backup again without --resume"
    )
    try:
        snap = standby.snapshot(volume, str(want.get("name", "")))
    except UnknownSnapshotOnStandby:
        raise gone from None
    if not same_snapshot(identity(snap), want):
        raise gone
    log.info("upload_resumed", volume=volume, snapshot=snap.name, archive=marker.get("archive"))
    return snap


# -- prune ---------------------------------------------------------------------------------------------


def keep_set(entries: list[Entry], daily: int, weekly: int, monthly: int) -> set[str]:
    """The URLs to keep among one volume's archives: the newest of each of the last `daily` days,
    `weekly` ISO weeks and `monthly` months that have archives (as borg prune), then every archive a
    kept incremental needs, down to its full archive."""
    newest_first = sorted(entries, key=lambda e: e.order, reverse=True)
    keep: set[str] = set()
    for count, period in (
        (daily, lambda t: t.strftime("%Y-%m-%d")),
        (weekly, lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2])),
        (monthly, lambda t: t.strftime("%Y-%m")),
    ):
        seen: list[str] = []
        for e in newest_first:
            p = period(e.created)
            if p in seen:
                continue
            if len(seen) == count:
                break
            seen.append(p)
            keep.add(e.url)
    todo = [e for e in entries if e.url in keep]
    while todo:
        for base in bases_of(entries, todo.pop()):
            if base.url not in keep:
                keep.add(base.url)
                todo.append(base)
    return keep


def bases_of(entries: list[Entry], entry: Entry) -> list[Entry]:
    """The archives `entry` may be based on: the one with the SHA-256 its manifest names, and, so that
    nothing a kept incremental needs is ever deleted, any archive of its base snapshot."""
    m = entry.manifest
    if m.kind != INCREMENTAL:
        return []
    want = m.base.get("snapshot", {})
    sha = m.base.get("archive_sha256")
    return [e for e in entries if e.sha256 == sha or same_snapshot(e.manifest.identity, want)]


def prune(dest: str, daily: int, weekly: int, monthly: int, dry_run: bool) -> int:
    if daily + weekly + monthly <= 0:
        raise CatalogError(detail="give at least one of --keep-daily, --keep-weekly, --keep-monthly above 0")
    found = archives(dest)
    volumes = sorted({e.manifest.volume for e in found})
    kept = deleted = 0
    for volume in volumes:
        mine = [e for e in found if e.manifest.volume == volume]
        keep = keep_set(mine, daily, weekly, monthly)
        for e in sorted(mine, key=lambda e: e.order):
            m = e.manifest
            what = f"{e.name} ({m.kind}, {volume}@{m.snapshot}, {human_size(e.size)})"
            if e.url in keep:
                kept += 1
                print(f"keep    {what}")
                continue
            deleted += 1
            print(f"{'would delete' if dry_run else 'delete'}  {what}")
            if not dry_run:
                destinations.delete_archive(e.url)
                log.info("archive_pruned", archive=e.url, volume=volume, snapshot=m.snapshot)
    verb = "would delete" if dry_run else "deleted"
    print(f"{kept} archives kept, {deleted} {verb}", file=sys.stderr)
    return EXIT_OK


def add_prune_parser(sub: Any) -> None:
    p = sub.add_parser(
        "prune",
        help="delete old archives of a directory or s3 prefix, keeping daily, weekly and monthly ones",
        description="Keep, for each volume, the newest archive of each of the last N days, weeks and "
        "months that have archives, and every archive a kept incremental needs (its base, down to the "
        "full archive); delete the other complete archives of DEST. Archives without an index "
        "(incomplete) are left alone.",
    )
    p.add_argument("dest", metavar="DEST", help="a directory, or s3://BUCKET/PREFIX/")
    p.add_argument("--keep-daily", type=int, default=0, metavar="N", help="daily archives to keep")
    p.add_argument("--keep-weekly", type=int, default=0, metavar="N", help="weekly archives to keep")
    p.add_argument("--keep-monthly", type=int, default=0, metavar="N", help="monthly archives to keep")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")


def prune_command(args: argparse.Namespace) -> int:
    return prune(args.dest, args.keep_daily, args.keep_weekly, args.keep_monthly, args.dry_run)

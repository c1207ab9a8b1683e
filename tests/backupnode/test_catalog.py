"""Retention (`standby-backup prune`) over a directory of indexed archives: daily, weekly and monthly
archives kept as borg prune keeps them, never an archive a kept incremental needs, `--dry-run` deletes
nothing, incomplete archives (no index) are left alone."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from backupnode import destinations
from backupnode.archive import FULL, INCREMENTAL, Manifest
from backupnode.catalog import CatalogError, Entry, archives, chain_start, keep_set, prune
from backupnode.main import main
from backupnode.output import index_document

START = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def write_archive(
    dest: Path, volume: str, day: int, base: Entry | None = None, epoch: int = 0, name: str = ""
) -> Entry:
    """An archive file and its index, of a snapshot taken `day` days after START (at 02:00)."""
    created = (START + timedelta(days=day)).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = name or f"{volume}-d{day:03d}.tar.zst"
    ident = {
        "standby": "s-1",
        "volume": volume,
        "epoch": epoch or day + 1,
        "name": f"d{day}",
        "created": created,
    }
    m = Manifest(
        volume=volume, size=1 << 20, block_size=4096, snapshot=f"d{day}", snapshot_created=created,
        extents=[], kind=INCREMENTAL if base else FULL, identity=ident,
        base={"snapshot": base.manifest.identity, "archive_sha256": base.sha256} if base else {},
    )  # fmt: skip
    path = dest / name
    path.write_bytes(name.encode())
    sha = hashlib.sha256(name.encode()).hexdigest()
    destinations.write_index(str(path), index_document(m, sha, len(name), 0))
    return Entry(str(path), destinations.read_index(str(path)) or {})


def names(entries: list[Entry]) -> list[str]:
    return [e.name for e in entries]


def test_daily_weekly_monthly_and_every_base_of_a_kept_incremental(tmp_path: Path) -> None:
    # A full archive every 7 days, incrementals in between, for 60 days.
    made: list[Entry] = []
    for day in range(60):
        base = None if day % 7 == 0 else made[-1]
        made.append(write_archive(tmp_path, "vol0", day, base))
    keep = keep_set(archives(str(tmp_path), "vol0"), daily=3, weekly=0, monthly=0)
    kept = sorted(Path(u).name for u in keep)
    # The last 3 days (57, 58, 59) are incrementals of the chain that starts on day 56: it stays whole.
    assert kept == [f"vol0-d{d:03d}.tar.zst" for d in range(56, 60)], kept
    keep = keep_set(archives(str(tmp_path), "vol0"), daily=0, weekly=0, monthly=3)
    kept = sorted(Path(u).name for u in keep)
    # The newest of March (day 59), February (58) and January (30), with their chains down to their
    # full archives (days 56 and 28).
    assert kept == sorted(
        [f"vol0-d{d:03d}.tar.zst" for d in (28, 29, 30)] + [f"vol0-d{d:03d}.tar.zst" for d in range(56, 60)]
    ), kept
    for url in keep:
        e = next(x for x in made if x.url == url)
        start = chain_start(archives(str(tmp_path), "vol0"), e)
        assert start is not None and start.url in keep, f"{e.name} is kept without its full archive"


def test_snapshots_of_the_same_second_are_listed_in_the_order_they_were_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two backups in one second: the standby names the second snapshot NAME-2, whose archive's name
    # sorts before the first's ("-" before "."); its epoch is larger.
    full = write_archive(tmp_path, "vol0", 0, epoch=5, name="vol0-backup-20260101T020000Z.tar.zst")
    inc = write_archive(
        tmp_path, "vol0", 0, base=full, epoch=6, name="vol0-backup-20260101T020000Z-2.tar.zst"
    )
    assert names(archives(str(tmp_path), "vol0")) == [full.name, inc.name]
    assert main(["list", "--json", str(tmp_path)]) == 0
    listed = [Path(a["archive"]).name for a in json.loads(capsys.readouterr().out)]
    assert listed == [full.name, inc.name], "`list` must give a chain in the order restore takes it"


def test_prune_deletes_index_and_archive_dry_run_nothing_and_leaves_incomplete_ones(tmp_path: Path) -> None:
    full = write_archive(tmp_path, "vol0", 0)
    write_archive(tmp_path, "vol0", 1, full)
    other = write_archive(tmp_path, "vol0", 10)
    write_archive(tmp_path, "vol1", 3)
    (tmp_path / "vol0-running.tar.zst").write_bytes(b"no index: still being written")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["prune", str(tmp_path), "--keep-daily", "1", "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "--dry-run deleted something"
    prune(str(tmp_path), daily=1, weekly=0, monthly=0, dry_run=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([
        other.name, other.name + ".manifest.json", "vol1-d003.tar.zst", "vol1-d003.tar.zst.manifest.json",
        "vol0-running.tar.zst",
    ]), left  # fmt: skip


def test_prune_needs_a_keep_option(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="at least one of"):
        prune(str(tmp_path), daily=0, weekly=0, monthly=0, dry_run=True)


def test_a_kept_incremental_keeps_an_archive_of_its_base_snapshot_even_when_the_sha_does_not_match(
    tmp_path: Path,
) -> None:
    full = write_archive(tmp_path, "vol0", 0)
    inc = write_archive(tmp_path, "vol0", 1, full)
    # The index of the base names another SHA-256 (say, it was rewritten): its snapshot still links them.
    (tmp_path / (full.name + ".manifest.json")).unlink()
    doc = dict(full.index, archive_sha256="0" * 64)
    destinations.write_index(full.url, doc)
    keep = keep_set(archives(str(tmp_path), "vol0"), daily=1, weekly=0, monthly=0)
    assert keep == {full.url, inc.url}

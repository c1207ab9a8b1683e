"""The settings of `standby-backup run` (flags, or keys of a --config TOML file)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from standbylib.runtime import config as cfg
from standbylib.runtime.logs import LogSettings
from standbylib.runtime.tls import ClientTlsSettings
from standbylib.units import parse_duration, parse_size

DEFAULT_STANDBY = os.environ.get("STANDBY_ADDRESS", "127.0.0.1:7700")


def address(text: str) -> str:
    """`text` once it is a valid HOST:PORT."""
    cfg.parse_address(text)
    return text


@dataclass
class RunConfig(ClientTlsSettings, LogSettings):
    standby: str = cfg.setting(
        DEFAULT_STANDBY, "gRPC address of the standby daemon ($STANDBY_ADDRESS)", parse=address, metavar="H:P"
    )
    output: str = cfg.setting(
        "",
        "where the archive goes: a file (not overwritten without --force), - for standard output, a "
        "tape device, or s3://BUCKET/KEY; a directory or s3://BUCKET/PREFIX/ (ending in /) names the "
        "archive VOLUME-SNAPSHOT.tar.zst in it",
        metavar="FILE|-|s3://BUCKET/KEY",
    )
    snapshot: str = cfg.setting(
        "", "back up this existing snapshot (left in place) instead of making one", metavar="NAME"
    )
    since: str = cfg.setting(
        "",
        "an incremental archive: only the blocks written since this older snapshot (kept on the "
        "standby since its own backup); 'latest': the snapshot of the newest complete archive of the "
        "volume in the output's directory or prefix, or a full backup when there is none",
        metavar="SNAPSHOT|latest",
    )
    full_every: float = cfg.setting(
        0.0,
        "with --since latest: make a full archive instead when the full archive the chain starts from "
        "is older than this (0: never)",
        parse=parse_duration,
        metavar="DURATION",
    )
    base_archive: str = cfg.setting(
        "",
        "the archive of the --since snapshot, which the incremental names as its base (default: found "
        "in the output's directory or prefix)",
        metavar="ARCHIVE",
    )
    release_base: bool = cfg.setting(
        False, "after an incremental, delete its base snapshot on the standby (the new one is the next base)"
    )
    resume: bool = cfg.setting(
        False,
        "continue an interrupted upload to s3://: regenerate the archive from the same snapshot and "
        "upload only the parts not there yet",
    )
    keep_snapshot: bool = cfg.setting(
        False, "keep the snapshot made for the backup (the base of the next incremental)"
    )
    keep_lease: float = cfg.setting(
        0.0,
        "with --keep-snapshot: the kept snapshot's lease, so that it goes if backups stop (0: kept until "
        "deleted)",
        parse=parse_duration,
        metavar="SECONDS|DURATION",
    )
    pre_snapshot: str = cfg.setting(
        "",
        "a shell command run just before the run takes its snapshot, e.g. to freeze the filesystem on "
        "the primary for a consistent image: 'ssh db1 fsfreeze -f /srv/data'; the run fails, with no "
        "snapshot, when it fails",
        metavar="COMMAND",
    )
    post_snapshot: str = cfg.setting(
        "",
        "a shell command run right after the snapshot is taken (or could not be), whatever happened: "
        "'ssh db1 fsfreeze -u /srv/data'; the run fails when it fails",
        metavar="COMMAND",
    )
    hook_timeout: float = cfg.setting(
        60.0, "seconds a --pre-snapshot or --post-snapshot command may take", parse=float, metavar="SECONDS"
    )
    force: bool = cfg.setting(False, "overwrite an existing output file")
    nbd: str = cfg.setting("", "NBD address to read from, if not the one the standby reports", metavar="H:P")
    connections: int = cfg.setting(
        2, "NBD connections (when the export allows several)", parse=int, metavar="N"
    )
    depth: int = cfg.setting(4, "NBD read requests in flight per connection", parse=int, metavar="N")
    request_size: int = cfg.setting(1 << 20, "bytes per NBD read request", parse=parse_size, metavar="SIZE")
    level: int = cfg.setting(3, "zstd compression level (1 fastest .. 19 smallest)", parse=int, metavar="N")
    threads: int = cfg.setting(
        -1, "zstd worker threads (-1: one per CPU, 0: compress in the calling thread)", parse=int, metavar="N"
    )
    chunk_size: int = cfg.setting(
        4 << 20, "bytes of data per SHA-256 checksum in the archive", parse=parse_size, metavar="SIZE"
    )
    lease: float = cfg.setting(
        300.0,
        "seconds a snapshot made for the backup outlives this program if it dies (renewed while it runs)",
        parse=float,
        metavar="SECONDS",
    )
    timeout: float = cfg.setting(
        30.0, "seconds to wait for the standby's answers", parse=float, metavar="SECONDS"
    )
    metrics_listen: str = cfg.setting(
        "127.0.0.1:9702",
        "serve metrics here while running (off: none)",
        parse=lambda text: text if text == "off" else address(text),
        metavar="H:P|off",
    )
    metrics_linger: float = cfg.setting(
        0.0,
        "seconds to keep serving metrics after the run, for a last scrape",
        parse=float,
        metavar="SECONDS",
    )
    metrics_textfile: str = cfg.setting(
        "", "at the end, write the metrics to this file (node_exporter's textfile collector)", metavar="FILE"
    )
    nbd_tls: bool = cfg.setting(
        False,
        "start TLS on the NBD connections (NBD_OPT_STARTTLS), with the files of --tls-ca, --tls-cert "
        "and --tls-key; fails when the server does not offer TLS",
    )

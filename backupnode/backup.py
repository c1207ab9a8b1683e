"""`standby-backup run`: a frozen snapshot of the standby, read over NBD, streamed into an archive.

The patent's Figure 5: the backup node, not the primary or the standby, pays for reading, compressing
and writing the archive. The standby only serves the snapshot's blocks over NBD.

Steps: the standby's status gives the NBD address and checks the volume; a snapshot is made for the
backup (with a lease the backup renews, so that a backup node that dies does not pin the snapshot and
its preserved blocks forever) or an existing one is used (`--snapshot`, then left in place); what to
read comes from block status (a full archive: the data extents, so holes are neither read nor stored)
or, for an incremental (`--since`), from the standby's record of the blocks written since the base
snapshot (`backupnode.plan`); the data is read with several requests in flight on several connections
and written in order, strictly sequentially (a file, a pipe, a tape or one S3 multipart upload:
`backupnode.output`); the snapshot is checked to be still valid before the trailer makes the archive
complete and its index is written; the snapshot made for the backup is deleted, also on failure or
Ctrl-C, unless `--keep-snapshot` (then it keeps a lease of `--keep-lease`, as the next base).

An archive is byte-identical when made again from the same snapshot (fixed tar headers and times, fixed
zstd parameters), which is what lets `--resume` continue an interrupted upload: the run records which
snapshot it archives beside the upload (a marker, `catalog.mark`), and a resumed run regenerates the
archive from it and uploads only the parts that are not there yet.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile
from prometheus_client.parser import text_string_to_metric_families

from backupnode import catalog, s3
from backupnode.archive import FULL, INCREMENTAL, ArchiveWriter, Manifest, data_pieces
from backupnode.config import RunConfig
from backupnode.control import LeaseKeeper, Standby, identity
from backupnode.output import Output, preflight
from backupnode.plan import data_extents, split_changes
from backupnode.progress import Progress
from standbylib.errors import StandbyError
from standbylib.nbd import NbdPool
from standbylib.rpc.v1 import control_pb2
from standbylib.runtime import config as cfg
from standbylib.runtime import logs, rpc
from standbylib.runtime.main import EXIT_OK, package_version
from standbylib.runtime.metrics import MetricsServer, build_info
from standbylib.runtime.tls import TlsFiles
from standbylib.units import human_size

log = logs.get(__name__)


class BackupFailed(StandbyError):
    template = "{detail}"


class Interrupted(KeyboardInterrupt):
    """SIGTERM: unwind like Ctrl-C, so the snapshot made for the backup is released."""


class BackupMetrics:
    def __init__(self, volume: str) -> None:
        self.registry = CollectorRegistry()
        build_info(self.registry, "standby-backup", package_version())
        self.bytes = Counter(
            "standby_backup_bytes",
            "Bytes of image data read from the snapshot and archived.",
            ["volume"],
            registry=self.registry,
        ).labels(volume)
        self.archive_bytes = Counter(
            "standby_backup_archive_bytes",
            "Bytes written to the archive (compressed).",
            ["volume"],
            registry=self.registry,
        ).labels(volume)
        self.changed_bytes = Gauge(
            "standby_backup_changed_bytes",
            "Bytes the archive of the last run covers: the whole image for a full archive, the bytes "
            "written since the base snapshot for an incremental.",
            ["volume", "kind"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            "standby_backup_last_success_timestamp_seconds",
            "Unix time the last backup of the volume, of this kind (full or incremental), completed (kept "
            "from the --metrics-textfile of earlier runs; 0: none known).",
            ["volume", "kind"],
            registry=self.registry,
        )
        self.duration = Gauge(
            "standby_backup_duration_seconds",
            "Seconds the backup has run (the whole run once it ended).",
            ["volume"],
            registry=self.registry,
        ).labels(volume)
        self.last_run_success = Gauge(
            "standby_backup_last_run_success",
            "1 if the last backup run of the volume succeeded, 0 if it failed (or runs now).",
            ["volume"],
            registry=self.registry,
        ).labels(volume)
        self.running = Gauge(
            "standby_backup_running",
            "1 while a backup of the volume runs.",
            ["volume"],
            registry=self.registry,
        ).labels(volume)


def tls_files(conf: RunConfig) -> TlsFiles:
    """The TLS files of the run, checked (a `ConfigError` when unusable)."""
    tls = conf.client_files()
    if conf.nbd_tls and not tls.enabled:
        raise cfg.ConfigError(detail="--nbd-tls needs --tls-ca (and --tls-cert/--tls-key for mutual TLS)")
    if tls.enabled:
        tls.channel_credentials()  # every file readable and matching
    else:
        tls.check_client()
    return tls


@dataclass
class Job:
    """What one run archives: the snapshot, and for an incremental its base."""

    volume: str
    snap: control_pb2.SnapshotInfo
    block_size: int
    output: str
    base: control_pb2.SnapshotInfo | None = None
    base_archive: str = ""
    base_sha256: str = ""

    @property
    def kind(self) -> str:
        return INCREMENTAL if self.base is not None else FULL


def backup(volume: str, conf: RunConfig) -> int:
    tls = tls_files(conf)
    t0 = time.monotonic()
    metrics = BackupMetrics(volume)
    if conf.metrics_textfile:
        for kind in (FULL, INCREMENTAL):
            if last := _previous_success(conf.metrics_textfile, volume, kind):
                metrics.last_success.labels(volume, kind).set(last)
    server = _metrics_server(conf.metrics_listen, metrics.registry)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    standby = Standby(conf.standby, conf.timeout, tls)
    made = ""
    lease: LeaseKeeper | None = None
    succeeded = False
    metrics.running.set(1)
    try:
        status = standby.status()
        vol = next((v for v in status.volumes if v.name == volume), None)
        if vol is None:
            known = ", ".join(v.name for v in status.volumes) or "none"
            raise BackupFailed(
                detail=f"the standby {conf.standby} has no volume {volume!r} (it has: {known})"
            )
        preflight(
            conf.output, force=conf.force, resume=conf.resume, destination=catalog.is_destination(conf.output)
        )
        marker = catalog.resumed_marker(conf.output, volume) if conf.resume else None
        base = catalog.find_base(standby, volume, conf)
        if marker is not None:
            snap = catalog.marked_snapshot(standby, volume, marker)
            made = snap.name if marker.get("made") else ""
        elif conf.snapshot:
            snap = standby.snapshot(volume, conf.snapshot)
        else:
            snap, made = _snapshot_between_hooks(standby, volume, conf)
        if made:
            lease = LeaseKeeper(standby, volume, made, conf.lease)
        if not snap.valid:
            raise BackupFailed(
                detail=f"snapshot {volume}@{snap.name} is invalid ({snap.reason or 'no reason given'})"
            )
        job = Job(volume, snap, vol.block_size, catalog.archive_url(conf.output, volume, snap.name))
        if base is not None:
            job.base, job.base_archive, job.base_sha256 = base
        address = conf.nbd or cfg.reachable(status.nbd, conf.standby)
        host, port = cfg.parse_address(address)
        summary = _stream(job, host, port, conf, metrics, standby, tls, made)
        now = time.time()
        metrics.last_success.labels(volume, job.kind).set(now)
        metrics.last_run_success.set(1)
        seconds = time.monotonic() - t0
        metrics.duration.set(seconds)
        _summarise(job, summary, seconds)
        succeeded = True
        return EXIT_OK
    finally:
        metrics.running.set(0)
        metrics.duration.set(time.monotonic() - t0)
        if lease is not None:
            lease.stop()
        _release(standby, volume, made, conf, succeeded)
        if succeeded and conf.release_base and conf.since and base is not None:
            _delete(standby, volume, base[0].name)
        standby.close()
        signal.signal(signal.SIGTERM, previous)
        if conf.metrics_textfile:
            write_to_textfile(conf.metrics_textfile, metrics.registry)
        if server is not None:
            if conf.metrics_linger > 0:
                time.sleep(conf.metrics_linger)  # let a scrape see how the run ended
            server.stop()


def _snapshot_between_hooks(
    standby: Standby, volume: str, conf: RunConfig
) -> tuple[control_pb2.SnapshotInfo, str]:
    """The run's own snapshot, taken between the --pre-snapshot and --post-snapshot commands. The post
    command runs whatever happened once the pre command was started (it thaws what the pre command
    froze); its own failure fails the run, unless the run failed already (then it is logged)."""
    made = ""
    try:
        run_hook("pre_snapshot", conf.pre_snapshot, conf.hook_timeout, volume)
        snap = _new_snapshot(standby, volume, conf.lease)
        made = snap.name
        log.info("snapshot_created", volume=volume, snapshot=made, lease_seconds=conf.lease)
    except BaseException:
        with contextlib.suppress(BackupFailed):  # (logged by run_hook: hook_ran, exit_status)
            run_hook("post_snapshot", conf.post_snapshot, conf.hook_timeout, volume, made)
        raise
    try:
        run_hook("post_snapshot", conf.post_snapshot, conf.hook_timeout, volume, made)
    except BaseException:
        _delete(standby, volume, made)
        raise
    return snap, made


def run_hook(which: str, command: str, timeout: float, volume: str, snapshot: str = "") -> None:
    """Run the `--pre-snapshot` or `--post-snapshot` shell command (nothing when empty), with
    STANDBY_VOLUME and STANDBY_SNAPSHOT in its environment; `BackupFailed` when it fails or hangs."""
    if not command:
        return
    started = time.monotonic()
    env = {**os.environ, "STANDBY_VOLUME": volume, "STANDBY_SNAPSHOT": snapshot}
    flag = "--" + which.replace("_", "-")
    try:
        cp = subprocess.run(
            command, shell=True, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackupFailed(detail=f"the {flag} command did not finish in {timeout:g} s: {command}") from None
    seconds = round(time.monotonic() - started, 3)
    log.info("hook_ran", hook=which, command=command, exit_status=cp.returncode, seconds=seconds)
    if cp.returncode != 0:
        last = (cp.stderr.strip().splitlines() or [""])[-1]
        raise BackupFailed(
            detail=f"the {flag} command failed (exit status {cp.returncode}){': ' + last if last else ''}: "
            f"{command}"
        )


def _new_snapshot(standby: Standby, volume: str, lease: float) -> control_pb2.SnapshotInfo:
    """A snapshot for this backup, leased, named ``backup-TIME`` (``-2``, ``-3``... when a backup of the
    same second kept one of that name)."""
    name = "backup-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 100):
        try:
            return standby.create(volume, name if n == 1 else f"{name}-{n}", lease)
        except rpc.RemoteError as e:
            if e.fields.get("code") != grpc.StatusCode.ALREADY_EXISTS:
                raise BackupFailed(detail=f"the standby refused a snapshot of {volume!r}: {e}") from None
    raise BackupFailed(detail=f"snapshots {name} to {name}-99 of {volume!r} exist already")


def _release(standby: Standby, volume: str, made: str, conf: RunConfig, succeeded: bool) -> None:
    """The snapshot made for the backup: deleted, or kept with its lease (`--keep-lease`, or none), or
    left leased for `--resume` after an interrupted upload."""
    if not made:
        return
    if conf.keep_snapshot and succeeded:
        try:
            if conf.keep_lease > 0:
                standby.renew(volume, made, conf.keep_lease)
            else:
                standby.release_lease(volume, made)
            log.info("snapshot_kept", volume=volume, snapshot=made, lease_seconds=conf.keep_lease or None)
        except StandbyError as e:
            log.warning("snapshot_lease_not_set", volume=volume, snapshot=made, error=str(e))
        return
    if not succeeded and s3.is_s3(conf.output) and not conf.keep_snapshot:
        # An interrupted upload can be resumed while the snapshot's lease runs (--resume).
        log.info("snapshot_left_for_resume", volume=volume, snapshot=made, lease_seconds=conf.lease)
        return
    _delete(standby, volume, made)


def _delete(standby: Standby, volume: str, name: str) -> None:
    try:
        standby.delete(volume, name)
        log.info("snapshot_deleted", volume=volume, snapshot=name)
    except StandbyError as e:
        log.warning("snapshot_not_deleted", volume=volume, snapshot=name, error=str(e))


def _previous_success(path: str, volume: str, kind: str) -> float:
    """The last success of `kind` an earlier run wrote to the textfile `path` (0 when none): a failed
    run must not make Prometheus forget when the volume was last backed up."""
    try:
        with open(path) as fh:
            families = list(text_string_to_metric_families(fh.read()))
    except (OSError, ValueError):
        return 0.0
    for family in families:
        for sample in family.samples:
            if sample.name == "standby_backup_last_success_timestamp_seconds" and sample.labels == {
                "volume": volume,
                "kind": kind,
            }:
                return float(sample.value)
    return 0.0


def _stream(
    job: Job,
    host: str,
    port: int,
    conf: RunConfig,
    metrics: BackupMetrics,
    standby: Standby,
    tls: TlsFiles,
    made: str,
) -> dict[str, Any]:
    volume, snap = job.volume, job.snap
    export = f"{volume}@{snap.name}"
    context = tls.client_context() if conf.nbd_tls else None
    out: Output | None = None
    done = False
    progress = Progress(
        "backup", enabled=sys.stderr.isatty(), log_lines=True, volume=volume, snapshot=snap.name
    )
    with NbdPool.connect(
        host,
        port,
        export,
        connections=conf.connections,
        timeout=conf.timeout,
        tls=context,
        server_name=tls.server_name,
    ) as pool:
        try:
            manifest = _manifest(job, pool, standby, conf)
            metrics.changed_bytes.labels(volume, manifest.kind).set(manifest.changed_bytes)
            out = Output(
                job.output,
                force=conf.force,
                # The archive is at most its data plus headers and sparse maps: parts sized for that
                # keep memory low for a large sparse volume, and always fit in S3's 10,000 parts.
                expected_bytes=manifest.data_bytes + manifest.size // 64 + (64 << 20),
                resume=conf.resume,
                on_part=progress.uploaded_part,
            )
            catalog.mark(job.output, volume, snap, made)
            log.info(
                "backup_started",
                volume=volume,
                snapshot=snap.name,
                kind=manifest.kind,
                base=job.base.name if job.base is not None else None,
                export=export,
                nbd=f"{host}:{port}",
                output=job.output,
                size=manifest.size,
                data_bytes=manifest.data_bytes,
                changed_bytes=manifest.changed_bytes,
                extents=len(manifest.extents),
                connections=pool.connections,
            )
            writer = ArchiveWriter(out, manifest, level=conf.level, threads=conf.threads)  # type: ignore[arg-type]
            writer.begin()
            progress.start(manifest.data_bytes)
            for _offset, data in pool.read_many(
                data_pieces(manifest.extents, conf.request_size), depth=conf.depth
            ):
                writer.write(data)
                metrics.bytes.inc(len(data))
                progress.advance(len(data))
            # The data read is the frozen image only if the snapshot survived until now.
            now = standby.snapshot(volume, snap.name)
            if not now.valid:
                raise BackupFailed(
                    detail=f"snapshot {export} was invalidated during the backup "
                    f"({now.reason or 'preservation store full'}); the archive is incomplete"
                )
            trailer = writer.finish()
            metrics.archive_bytes.inc(out.written)
            out.finish(manifest, len(trailer.chunks))
            catalog.unmark(job.output)
            done = True
        finally:
            progress.close()
            if out is not None and not done:
                out.abandon(keep_upload=_resumable())
    return {
        "kind": manifest.kind,
        "size": manifest.size,
        "data_bytes": manifest.data_bytes,
        "changed_bytes": manifest.changed_bytes,
        "archive_bytes": out.written,
        "archive_sha256": out.sha256.hexdigest(),
        "resumed_parts": out.resumed_parts,
        "chunks": len(trailer.chunks),
        "output": job.output,
    }


def _resumable() -> bool:
    """Whether the exception being handled leaves an upload `--resume` may continue: an interruption
    (Ctrl-C, SIGTERM) does; an error does not (the upload is aborted)."""
    return isinstance(sys.exc_info()[1], KeyboardInterrupt)


def _manifest(job: Job, pool: NbdPool, standby: Standby, conf: RunConfig) -> Manifest:
    """The archive's manifest: for a full archive the snapshot's data extents; for an incremental the
    changes since the base, split into data to read and zeroed ranges."""
    first = pool.clients[0]
    zeros: list[tuple[int, int]] = []
    base: dict[str, Any] = {}
    if job.base is None:
        extents = data_extents(first)
    else:
        changes = standby.changes(job.volume, job.base.name, job.snap.name)
        extents, zeros = split_changes(first, changes)
        base = {"snapshot": identity(job.base), "archive_sha256": job.base_sha256}
    return Manifest(
        volume=job.volume,
        size=pool.size,
        block_size=job.block_size,
        snapshot=job.snap.name,
        snapshot_created=job.snap.created,
        extents=extents,
        chunk_size=conf.chunk_size,
        kind=job.kind,
        identity=identity(job.snap),
        base=base,
        zero_extents=zeros,
        replica=replica_at_snapshot(job.snap),
    )


def replica_at_snapshot(snap: control_pb2.SnapshotInfo) -> dict[str, Any]:
    """The replica's state when `snap` was taken, as the standby recorded it ({} when it did not)."""
    if not snap.replica_state:
        return {}
    return {
        "state": snap.replica_state,
        "connected": snap.replica_connected,
        "in_sync_at": snap.replica_in_sync_at,
        "lag_seconds": round(snap.replica_lag_seconds, 3),
    }


def _summarise(job: Job, s: dict[str, Any], seconds: float) -> None:
    ratio = s["data_bytes"] / s["archive_bytes"] if s["archive_bytes"] else 0.0
    rate = s["data_bytes"] / seconds if seconds else 0.0
    what = f"{job.volume}@{job.snap.name}"
    if job.base is not None:
        what += f" (incremental since {job.base.name}: {human_size(s['changed_bytes'])} changed)"
    print(
        f"backed up {what}: {human_size(s['data_bytes'])} of data read ({human_size(s['size'])} "
        f"image), {human_size(s['archive_bytes'])} written to {s['output']} (compression {ratio:.2f}x), "
        f"{seconds:.1f} s, {human_size(int(rate))}/s",
        file=sys.stderr,
    )
    log.info(
        "backup_done",
        volume=job.volume,
        snapshot=job.snap.name,
        kind=s["kind"],
        base=job.base.name if job.base is not None else None,
        bytes_read=s["data_bytes"],
        bytes_changed=s["changed_bytes"],
        bytes_written=s["archive_bytes"],
        archive_sha256=s["archive_sha256"],
        resumed_parts=s["resumed_parts"],
        compression_ratio=round(ratio, 3),
        seconds=round(seconds, 3),
        bytes_per_second=round(rate),
        chunks=s["chunks"],
    )


def _metrics_server(listen: str, registry: CollectorRegistry) -> MetricsServer | None:
    if not listen or listen == "off":
        return None
    try:
        server = MetricsServer(registry, cfg.parse_address(listen))
    except OSError as e:
        log.warning("metrics_not_served", address=listen, error=str(e))
        return None
    log.info("listening", service="metrics", address=cfg.format_address(server.address))
    return server


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()

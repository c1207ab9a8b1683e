"""`standby-backup run`: a frozen snapshot of the standby, read over NBD, streamed into an archive.

The patent's Figure 5: the backup node, not the primary or the standby, pays for reading, compressing
and writing the archive. The standby only serves the snapshot's blocks over NBD.

Steps: the standby's status gives the NBD address and checks the volume; a snapshot is made for the
backup (with a lease the backup renews, so that a backup node that dies does not pin the snapshot and
its preserved blocks forever) or an existing one is used (`--snapshot`, then left in place); block
status gives the data extents, so holes are neither read nor stored; the data is read with several
requests in flight on several connections and written in order, strictly sequentially (a file, a pipe
or a tape); the snapshot is checked to be still valid before the trailer makes the archive complete;
the snapshot made for the backup is deleted, also on failure or Ctrl-C, unless `--keep-snapshot`.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, write_to_textfile

from backupnode.archive import ArchiveWriter, Manifest, data_pieces
from backupnode.config import RunConfig
from backupnode.progress import Progress
from standbylib.errors import StandbyError
from standbylib.nbd import NbdClient, NbdPool
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc
from standbylib.runtime import config as cfg
from standbylib.runtime import logs, rpc
from standbylib.runtime.main import EXIT_OK
from standbylib.runtime.metrics import MetricsServer
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
        self.last_success = Gauge(
            "standby_backup_last_success_timestamp_seconds",
            "Unix time the last backup of the volume completed (kept from the --metrics-textfile of earlier "
            "runs; 0: none known).",
            ["volume"],
            registry=self.registry,
        ).labels(volume)
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


class CountingWriter:
    """The archive's output: counts bytes, turns write errors into one clear line."""

    def __init__(self, out: IO[bytes], name: str, metrics: BackupMetrics) -> None:
        self.out = out
        self.name = name
        self.metrics = metrics
        self.written = 0

    def write(self, data: Any) -> int:
        try:
            n = self.out.write(data)
        except OSError as e:
            raise BackupFailed(detail=f"cannot write the archive to {self.name}: {e.strerror or e}") from None
        size = len(memoryview(data))
        self.written += size
        self.metrics.archive_bytes.inc(size)
        return n if n is not None else size

    def flush(self) -> None:
        try:
            self.out.flush()
        except OSError as e:
            raise BackupFailed(detail=f"cannot write the archive to {self.name}: {e.strerror or e}") from None


class Standby:
    """The standby's control API, with one-line errors."""

    def __init__(self, target: str, timeout: float, tls: TlsFiles | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.tls = tls
        self.channel = rpc.channel(target, tls)
        self.stub = control_pb2_grpc.ControlStub(self.channel)

    def status(self) -> control_pb2.StatusReply:
        with rpc.calling(self.target, self.tls):
            reply: control_pb2.StatusReply = self.stub.Status(
                control_pb2.StatusRequest(), timeout=self.timeout
            )
            return reply

    def create(self, volume: str, name: str, lease: float) -> control_pb2.SnapshotInfo:
        with rpc.calling(self.target, self.tls):
            info: control_pb2.SnapshotInfo = self.stub.CreateSnapshot(
                control_pb2.CreateSnapshotRequest(volume=volume, name=name, lease_seconds=lease),
                timeout=self.timeout,
            )
            return info

    def renew(self, volume: str, name: str, lease: float) -> None:
        with rpc.calling(self.target, self.tls):
            self.stub.RenewSnapshotLease(
                control_pb2.RenewSnapshotLeaseRequest(volume=volume, name=name, lease_seconds=lease),
                timeout=self.timeout,
            )

    def snapshot(self, volume: str, name: str) -> control_pb2.SnapshotInfo:
        with rpc.calling(self.target, self.tls):
            reply = self.stub.ListSnapshots(
                control_pb2.ListSnapshotsRequest(volume=volume), timeout=self.timeout
            )
        for s in reply.snapshots:
            if s.name == name:
                found: control_pb2.SnapshotInfo = s
                return found
        raise BackupFailed(detail=f"volume {volume!r} has no snapshot {name!r} on the standby {self.target}")

    def delete(self, volume: str, name: str) -> None:
        with rpc.calling(self.target, self.tls):
            self.stub.DeleteSnapshot(
                control_pb2.DeleteSnapshotRequest(volume=volume, name=name), timeout=self.timeout
            )

    def close(self) -> None:
        self.channel.close()


class LeaseKeeper:
    """Renews a snapshot's lease every third of it until stopped."""

    def __init__(self, standby: Standby, volume: str, name: str, lease: float) -> None:
        self.standby, self.volume, self.name, self.lease = standby, volume, name, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.standby.renew(self.volume, self.name, self.lease)
            except StandbyError as e:
                log.warning("lease_renewal_failed", volume=self.volume, snapshot=self.name, error=str(e))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def open_output(path: str, force: bool) -> tuple[IO[bytes], bool]:
    """The output stream, and whether it is a regular file (then it is fsynced at the end)."""
    if not path:
        raise BackupFailed(detail="--output is required: a file, - for standard output, or a tape device")
    if path == "-":
        if sys.stdout.isatty():
            raise BackupFailed(
                detail="refusing to write an archive to a terminal: redirect it or give --output FILE"
            )
        return sys.stdout.buffer, False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and not force:
        raise BackupFailed(detail=f"{path} exists: give --force to overwrite it")
    regular = st is None or stat.S_ISREG(st.st_mode)
    try:
        return open(path, "wb"), regular
    except OSError as e:
        raise BackupFailed(detail=f"cannot open {path} for the archive: {e.strerror or e}") from None


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


def backup(volume: str, conf: RunConfig) -> int:
    tls = tls_files(conf)
    t0 = time.monotonic()
    metrics = BackupMetrics(volume)
    if conf.metrics_textfile:
        metrics.last_success.set(_previous_success(conf.metrics_textfile, volume))
    server = _metrics_server(conf.metrics_listen, metrics.registry)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    standby = Standby(conf.standby, conf.timeout, tls)
    made = ""
    lease: LeaseKeeper | None = None
    metrics.running.set(1)
    try:
        status = standby.status()
        vol = next((v for v in status.volumes if v.name == volume), None)
        if vol is None:
            known = ", ".join(v.name for v in status.volumes) or "none"
            raise BackupFailed(
                detail=f"the standby {conf.standby} has no volume {volume!r} (it has: {known})"
            )
        if conf.snapshot:
            snap = standby.snapshot(volume, conf.snapshot)
        else:
            name = "backup-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            try:
                snap = standby.create(volume, name, conf.lease)
            except rpc.RemoteError as e:
                raise BackupFailed(detail=f"the standby refused a snapshot of {volume!r}: {e}") from None
            made = snap.name
            lease = LeaseKeeper(standby, volume, made, conf.lease)
            log.info("snapshot_created", volume=volume, snapshot=made, lease_seconds=conf.lease)
        if not snap.valid:
            raise BackupFailed(
                detail=f"snapshot {volume}@{snap.name} is invalid ({snap.reason or 'no reason given'})"
            )
        address = conf.nbd or status.nbd
        host, port = cfg.parse_address(address)
        summary = _stream(volume, snap, host, port, conf, metrics, standby, tls)
        metrics.last_success.set(time.time())
        metrics.last_run_success.set(1)
        seconds = time.monotonic() - t0
        metrics.duration.set(seconds)
        _summarise(volume, snap.name, summary, seconds)
        return EXIT_OK
    finally:
        metrics.running.set(0)
        metrics.duration.set(time.monotonic() - t0)
        if lease is not None:
            lease.stop()
        if made and not conf.keep_snapshot:
            try:
                standby.delete(volume, made)
                log.info("snapshot_deleted", volume=volume, snapshot=made)
            except StandbyError as e:
                log.warning("snapshot_not_deleted", volume=volume, snapshot=made, error=str(e))
        standby.close()
        signal.signal(signal.SIGTERM, previous)
        if conf.metrics_textfile:
            write_to_textfile(conf.metrics_textfile, metrics.registry)
        if server is not None:
            if conf.metrics_linger > 0:
                time.sleep(conf.metrics_linger)  # let a scrape see how the run ended
            server.stop()


def _previous_success(path: str, volume: str) -> float:
    """The last success an earlier run wrote to the textfile `path` (0 when none): a failed run must
    not make Prometheus forget when the volume was last backed up."""
    prefix = f'standby_backup_last_success_timestamp_seconds{{volume="{volume}"}} '
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(prefix):
                    return float(line[len(prefix) :].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _stream(
    volume: str,
    snap: control_pb2.SnapshotInfo,
    host: str,
    port: int,
    conf: RunConfig,
    metrics: BackupMetrics,
    standby: Standby,
    tls: TlsFiles,
) -> dict[str, Any]:
    export = f"{volume}@{snap.name}"
    context = tls.client_context() if conf.nbd_tls else None
    out: IO[bytes] | None = None
    regular = False
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
            extents = _data_extents(pool.clients[0])
            first = pool.clients[0]
            manifest = Manifest(
                volume=volume,
                size=pool.size,
                block_size=first.min_block if first.min_block > 1 else 512,
                snapshot=snap.name,
                snapshot_created=snap.created,
                extents=extents,
                chunk_size=conf.chunk_size,
            )
            out, regular = open_output(conf.output, conf.force)
            counting = CountingWriter(out, conf.output if conf.output != "-" else "standard output", metrics)
            log.info(
                "backup_started",
                volume=volume,
                snapshot=snap.name,
                export=export,
                nbd=f"{host}:{port}",
                size=manifest.size,
                data_bytes=manifest.data_bytes,
                extents=len(extents),
                connections=pool.connections,
            )
            writer = ArchiveWriter(counting, manifest, level=conf.level, threads=conf.threads)  # type: ignore[arg-type]
            writer.begin()
            progress.start(manifest.data_bytes)
            pieces = data_pieces(extents, conf.request_size)
            for _offset, data in pool.read_many(pieces, depth=conf.depth):
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
            counting.flush()
            if regular:
                os.fsync(out.fileno())
        finally:
            progress.close()
            if out is not None and out is not sys.stdout.buffer:
                out.close()
    return {
        "size": manifest.size,
        "data_bytes": manifest.data_bytes,
        "archive_bytes": counting.written,
        "chunks": len(trailer.chunks),
        "output": conf.output,
    }


def _data_extents(client: NbdClient) -> list[tuple[int, int]]:
    """The image's data extents (offset, length), adjacent ones merged."""
    out: list[tuple[int, int]] = []
    pos = 0
    for ext in client.extents(0, client.size):
        if not ext.is_hole:
            if out and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + ext.length)
            else:
                out.append((pos, ext.length))
        pos += ext.length
    return out


def _summarise(volume: str, snapshot: str, s: dict[str, Any], seconds: float) -> None:
    ratio = s["data_bytes"] / s["archive_bytes"] if s["archive_bytes"] else 0.0
    rate = s["data_bytes"] / seconds if seconds else 0.0
    print(
        f"backed up {volume}@{snapshot}: {human_size(s['data_bytes'])} of data read ({human_size(s['size'])} "
        f"image), {human_size(s['archive_bytes'])} written to {s['output']} (compression {ratio:.2f}x), "
        f"{seconds:.1f} s, {human_size(int(rate))}/s",
        file=sys.stderr,
    )
    log.info(
        "backup_done",
        volume=volume,
        snapshot=snapshot,
        bytes_read=s["data_bytes"],
        bytes_written=s["archive_bytes"],
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

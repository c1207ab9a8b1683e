"""`standby-primary`: export protected volumes read-write over NBD and mirror every write to the standby.

standby-primary --volume NAME=PATH[,size=SIZE][,block-size=SIZE] (repeatable) --standby H:P
                [--nbd-listen H:P] [--metrics-listen H:P] [--mode sync] [--transport auto]
                [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]]
                [--nbd-tls off|optional|require [--nbd-tls-cert FILE --nbd-tls-key FILE]
                 [--nbd-tls-ca FILE] [--require-client-cert]]

TLS: docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from primary.bitmap import DEFAULT_GRANULARITY, DEFAULT_HOT_BYTES, WriteIntentBitmap, check_granularity
from primary.device import MirroredDevice
from primary.generations import Generations, VolumeFile
from primary.metrics import PrimaryMetrics
from primary.mirror import FENCING, MODES, TRANSPORTS, Mirror
from standbylib.blockdev import Device, check_block_size, open_file_device
from standbylib.errors import DeviceBusy, InvalidArgument, StandbyError
from standbylib.nbd.server import NbdServer
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.logs import LogSettings
from standbylib.runtime.main import EXIT_OK, StopSignal, daemon_main, daemon_parser, gather, package_version
from standbylib.runtime.metrics import MetricsServer, build_info
from standbylib.runtime.tls import ClientTlsSettings, NbdTlsSettings, nbd_tls_of
from standbylib.snapshot.records import check_name
from standbylib.units import parse_size

log = logs.get("primary.main")


@dataclass
class VolumeSpec:
    """``NAME=PATH[,size=SIZE][,block-size=SIZE]``."""

    name: str
    path: str
    size: int | None = None
    block_size: int = 4096
    spec: str = field(default="", repr=False)


def parse_volume(text: str) -> VolumeSpec:
    name, sep, rest = str(text).partition("=")
    if not sep or not rest:
        raise InvalidArgument(detail=f"volume {text!r} must be NAME=PATH[,size=SIZE][,block-size=SIZE]")
    check_name("volume", name)
    path, *options = rest.split(",")
    if not path:
        raise InvalidArgument(detail=f"volume {text!r} has no PATH")
    vol = VolumeSpec(name=name, path=path, spec=str(text))
    for option in options:
        key, sep, value = option.partition("=")
        if key == "size" and sep:
            vol.size = parse_size(value)
        elif key == "block-size" and sep:
            vol.block_size = check_block_size(parse_size(value))
        else:
            raise InvalidArgument(detail=f"volume {name!r}: unknown option {option!r} (size=, block-size=)")
    if vol.size is not None and (vol.size <= 0 or vol.size % vol.block_size):
        raise InvalidArgument(
            detail=f"volume {name!r}: size {vol.size} must be a positive multiple of the block size "
            f"{vol.block_size}"
        )
    return vol


@dataclass
class PrimaryConfig(NbdTlsSettings, ClientTlsSettings, LogSettings):
    volume: list[VolumeSpec] = cfg.setting(  # noqa: RUF009 (a dataclass field with a default factory)
        [],
        "a protected volume, NAME=PATH[,size=SIZE][,block-size=SIZE]; repeatable. A missing PATH is "
        "created as a sparse file when size is given",
        parse=parse_volume,
        metavar="NAME=PATH[,...]",
        repeat=True,
    )
    standby: str | None = cfg.setting(None, "gRPC address of the standby daemon", metavar="H:P")
    nbd_listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 10810),
        "NBD address of the read-write volume exports",
        parse=cfg.parse_address,
        metavar="H:P",
    )
    metrics_listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 9701), "Prometheus metrics address", parse=cfg.parse_address, metavar="H:P"
    )
    mode: str = cfg.setting(
        "sync",
        "when a client's write is answered: sync = after the standby applied it, received = after it "
        "received it, async = after the local write (FLUSH always waits for the standby's durability)",
        choices=MODES,
    )
    fencing: str = cfg.setting(
        "refuse-writes",
        "when the standby took the volume over (promoted it), this primary is outdated until a failback: "
        "refuse-writes = clients' writes fail with EIO (no divergence), keep-serving = they go on, only "
        "on this host, and are replaced by the standby's data at the failback (as DRBD's resource-only)",
        choices=FENCING,
    )
    transport: str = cfg.setting(
        "auto",
        "how batches travel to the standby: channel = on its data channel (a TCP connection opened "
        "through gRPC, under the same TLS; much cheaper per batch), grpc = on the gRPC stream, auto = "
        "the data channel when the standby offers one and it can be reached, else gRPC",
        choices=TRANSPORTS,
    )
    standby_data: tuple[str, int] | None = cfg.setting(
        None,
        "the standby's data channel, when it is not at the port the standby offers on the host of "
        "--standby (a NAT or a proxy in between)",
        parse=cfg.parse_address,
        metavar="H:P",
    )
    bitmap_granularity: int = cfg.setting(
        DEFAULT_GRANULARITY,
        "bytes per bit of the write-intent bitmap: the unit of resync after an outage or a crash",
        parse=lambda text: check_granularity(parse_size(text)),
        metavar="SIZE",
    )
    activity_log: int = cfg.setting(
        DEFAULT_HOT_BYTES,
        "bytes of recently written regions that stay marked in the bitmap (like DRBD's activity log): "
        "rewriting them needs no bitmap sync; after a crash of the primary they are resynced",
        parse=parse_size,
        metavar="SIZE",
    )
    state_dir: str | None = cfg.setting(
        None,
        "directory of the write-intent bitmaps (NAME.bitmap) and data generations (NAME.generation); "
        "default: beside each volume file, PATH.bitmap and PATH.generation",
        metavar="DIR",
    )
    connect_timeout: float = cfg.setting(
        10.0,
        "seconds to wait at start for the standby before serving anyway (writes are then tracked and "
        "resynced when it comes)",
        parse=float,
        metavar="SECONDS",
    )
    ack_timeout: float = cfg.setting(
        10.0,
        "seconds without an acknowledgement after which the standby is considered gone (writes then go "
        "on, tracked in the bitmap)",
        parse=float,
        metavar="SECONDS",
    )
    discard_standby_data: bool = cfg.setting(
        False,
        "overwrite the standby's replica with a full resync even if its history diverged (split brain), "
        "or when the volume file is not the one the recorded generations belong to (this file's data is "
        "then kept); applies to the first connection of this run",
    )
    require_client_cert: bool = cfg.setting(
        False, "NBD over TLS: refuse clients without a certificate signed by --nbd-tls-ca (or --tls-ca)"
    )


def open_volume(spec: VolumeSpec) -> Device:
    if not os.path.exists(spec.path) and spec.size is None:
        raise StandbyError(
            detail=f"volume {spec.name!r}: {spec.path} does not exist; give size= to create it"
        )
    try:
        # Exclusive: another primary agent or a standby daemon (its replicas) holding the file is refused.
        device = open_file_device(spec.path, spec.size, exclusive=True)
    except DeviceBusy as e:
        raise StandbyError(detail=f"volume {spec.name!r}: {e}") from e
    if device.size % spec.block_size:
        device.close()
        raise StandbyError(
            detail=f"volume {spec.name!r}: {spec.path} has {device.size} bytes, not a multiple of the block "
            f"size {spec.block_size}"
        )
    return device


def bitmap_path(spec: VolumeSpec, state_dir: str | None) -> str:
    if state_dir:
        os.makedirs(state_dir, exist_ok=True)
        return os.path.join(state_dir, f"{spec.name}.bitmap")
    if os.path.exists(spec.path) and not os.path.isfile(spec.path):
        raise cfg.ConfigError(
            detail=f"volume {spec.name!r}: {spec.path} is not a regular file; give --state-dir"
        )
    return spec.path + ".bitmap"


def open_generations(spec: VolumeSpec, local: Device, state: str, discard: bool) -> Generations:
    """The volume's data generations (STATE.generation beside its bitmap), bound to its file."""
    fd = getattr(local.raw, "fd", None)
    volume = VolumeFile(spec.path, fd) if isinstance(fd, int) else None
    generations = Generations(
        state.removesuffix(".bitmap") + ".generation", volume, name=spec.name, discard=discard
    )
    if generations.bind_reason:
        log.info(
            "volume_file_bound",
            volume=spec.name,
            path=os.path.abspath(spec.path),
            generation=generations.current,
            reason=generations.bind_reason,
            xattr=generations.xattr,
        )
    return generations


def bitmap_volume(bitmap: WriteIntentBitmap, devices: dict[str, MirroredDevice]) -> str:
    return next((name for name, dev in devices.items() if dev.mirror.bitmap is bitmap), bitmap.path)


def check(conf: PrimaryConfig) -> list[str]:
    """What is wrong with `conf` on this host (`--check-config`): every problem, not only the first."""

    def volumes() -> None:
        if not conf.volume:
            raise cfg.ConfigError(detail="give at least one --volume NAME=PATH[,size=SIZE]")
        names = [v.name for v in conf.volume]
        if len(set(names)) != len(names):
            raise cfg.ConfigError(detail=f"volume names must be unique: {', '.join(names)}")

    def standby() -> None:
        if not conf.standby:
            raise cfg.ConfigError(detail="--standby H:P is required (the standby daemon's gRPC address)")
        cfg.parse_address(conf.standby)

    def volume(spec: VolumeSpec) -> None:
        if os.path.exists(spec.path):
            if not os.access(spec.path, os.R_OK | os.W_OK):
                raise cfg.ConfigError(
                    detail=f"volume {spec.name!r}: {spec.path} is not readable and writable"
                )
            return
        if spec.size is None:
            raise cfg.ConfigError(
                detail=f"volume {spec.name!r}: {spec.path} does not exist; give size= to create it"
            )
        cfg.check_directory(
            os.path.dirname(os.path.abspath(spec.path)), f"volume {spec.name!r}: the directory of"
        )

    def tls() -> None:
        files = conf.client_files()
        if files.enabled:
            files.channel_credentials()
        else:
            files.check_client()

    def state_dir() -> None:
        if conf.state_dir:
            cfg.check_directory(conf.state_dir, "--state-dir")

    steps: list[Callable[[], object]] = [volumes, standby, tls, lambda: nbd_tls_of(conf), state_dir]
    steps += [functools.partial(volume, spec) for spec in conf.volume]
    return gather(*steps)


def serve(conf: PrimaryConfig) -> int:
    if not conf.volume:
        raise cfg.ConfigError(detail="give at least one --volume NAME=PATH[,size=SIZE]")
    if not conf.standby:
        raise cfg.ConfigError(detail="--standby H:P is required (the standby daemon's gRPC address)")
    cfg.parse_address(conf.standby)
    names = [v.name for v in conf.volume]
    if len(set(names)) != len(names):
        raise cfg.ConfigError(detail=f"volume names must be unique: {', '.join(names)}")
    tls = conf.client_files()
    if tls.enabled:
        tls.channel_credentials()  # every file readable and matching, before anything starts
    else:
        tls.check_client()
    if conf.require_client_cert and conf.nbd_tls == "off":
        raise cfg.ConfigError(detail="--require-client-cert applies to NBD over TLS: give --nbd-tls")
    nbd_security = nbd_tls_of(conf)
    stop = StopSignal()
    registry = CollectorRegistry()
    build_info(registry, "standby-primary", package_version())
    metrics = PrimaryMetrics(registry, conf.mode)
    devices: dict[str, MirroredDevice] = {}
    nbd = metrics_server = None
    bitmaps: list[WriteIntentBitmap] = []
    opened: list[Device] = []  # volumes opened (closed at the end, also when the start fails)
    try:
        for spec in conf.volume:
            local = open_volume(spec)
            opened.append(local)
            state = bitmap_path(spec, conf.state_dir)
            generations = open_generations(spec, local, state, conf.discard_standby_data)
            # A region resent by a resync must be whole blocks (the standby refuses anything else).
            granularity = max(conf.bitmap_granularity, spec.block_size)
            bitmap = WriteIntentBitmap.open(
                state, local.size, granularity, hot=conf.activity_log // granularity
            )
            bitmaps.append(bitmap)
            if bitmap.dirty():
                log.info("bitmap_dirty", volume=spec.name, bytes=bitmap.dirty() * bitmap.granularity)
            mirror = Mirror(
                conf.standby,
                spec.name,
                local.size,
                spec.block_size,
                bitmap,
                generations,
                mode=conf.mode,
                discard_standby_data=conf.discard_standby_data,
                metrics=metrics,
                ack_timeout=conf.ack_timeout,
                tls=tls if tls.enabled else None,
                transport=conf.transport,
                data_address=conf.standby_data,
                fencing=conf.fencing,
            )
            metrics.add_volume(spec.name, mirror)
            devices[spec.name] = MirroredDevice(spec.name, local, mirror, metrics=metrics)
            mirror.start()
        metrics_server = MetricsServer(registry, conf.metrics_listen)
        log.info("listening", service="metrics", address=cfg.format_address(metrics_server.address))
        deadline = time.monotonic() + conf.connect_timeout
        for name, dev in devices.items():
            if dev.mirror.blocked:
                continue  # (logged: volume_file_mismatch)
            while not dev.mirror.wait_connected(0.1) and time.monotonic() < deadline and not stop.wait(0):
                if dev.mirror.refused:
                    break  # the standby answered, with a refusal (logged: mirror_disconnected, mirror_fenced)
            if not dev.mirror.live and not dev.mirror.refused:
                log.warning(
                    "standby_unreachable",
                    volume=name,
                    standby=conf.standby,
                    error=dev.mirror.last_error,
                    note="serving anyway; writes are tracked and resynced when the standby is back",
                )
        nbd = NbdServer(devices, conf.nbd_listen, tls=nbd_security)
        log.info("listening", service="nbd", address=cfg.format_address(nbd.start()), tls=conf.nbd_tls)
        log.info(
            "ready", volumes=names, standby=conf.standby, mode=conf.mode, tls="on" if tls.enabled else "off"
        )
        stop.wait()
        log.info("stopping", signal=stop.signum)
    finally:
        if nbd is not None:
            nbd.stop()
        for name, dev in devices.items():
            dev.mirror.stop()
            try:
                dev.device.flush()
                dev.mirror.generations.clean_stop()
            except StandbyError as e:
                metrics.state_write_failed(name, "generation")
                log.error(
                    "state_write_failed",
                    volume=name,
                    file="generation",
                    error=str(e),
                    effect="the clean stop is not recorded: the next start checks the volume file's "
                    "identity, size and generation attribute only",
                )
        for local in opened:
            local.close()
        for bitmap in bitmaps:
            try:
                bitmap.close()
            except StandbyError as e:
                metrics.state_write_failed(bitmap_volume(bitmap, devices), "bitmap")
                log.error(
                    "state_write_failed",
                    volume=bitmap_volume(bitmap, devices),
                    file="bitmap",
                    error=str(e),
                    effect="regions the file still marks are resynced at the next start",
                )
        if metrics_server is not None:
            metrics_server.stop()
    log.info("stopped")
    return EXIT_OK


DESCRIPTION = (
    "Primary agent: exports each protected volume read-write over NBD (export name = "
    "volume name) and mirrors every write, in order, to the standby daemon."
)


def parser() -> argparse.ArgumentParser:
    """The command line (for the man page and the shell completion, scripts/manpages.py)."""
    return daemon_parser("standby-primary", DESCRIPTION, PrimaryConfig, check)


def main(argv: list[str] | None = None) -> int:
    return daemon_main("standby-primary", DESCRIPTION, PrimaryConfig, "primary", serve, argv, check=check)


if __name__ == "__main__":
    sys.exit(main())

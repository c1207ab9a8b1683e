"""`standby-primary`: export protected volumes read-write over NBD and mirror every write to the standby.

standby-primary --volume NAME=PATH[,size=SIZE][,block-size=SIZE] (repeatable) --standby H:P
                [--nbd-listen H:P] [--metrics-listen H:P] [--mode sync]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from primary.device import MirroredDevice
from primary.metrics import PrimaryMetrics
from primary.mirror import Mirror
from standbylib.blockdev import Device, check_block_size, open_file_device
from standbylib.errors import InvalidArgument, StandbyError
from standbylib.nbd.server import NbdServer
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.main import EXIT_OK, run, wait_for_signal
from standbylib.runtime.metrics import MetricsServer
from standbylib.snapshot.records import check_name
from standbylib.units import parse_size

log = logs.get("primary.main")

MODES = ("sync",)


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
class PrimaryConfig:
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
        "sync", "when a client's write is answered: sync = after the standby applied it", choices=MODES
    )
    log_level: str = cfg.setting("info", "log level", choices=logs.LEVELS)
    log_format: str = cfg.setting(
        "auto",
        "log format (auto: console on a terminal, else JSON lines)",
        choices=("auto", "json", "console"),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="standby-primary",
        description="Primary agent: exports each protected volume read-write over NBD (export name = "
        "volume name) and mirrors every write, in order, to the standby daemon.",
        epilog="Stop it with SIGTERM or Ctrl-C. Exit codes: 0 ok, 1 failed, 2 usage or configuration error.",
    )
    cfg.add_options(p, PrimaryConfig)
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    return p


def open_volume(spec: VolumeSpec) -> Device:
    if not os.path.exists(spec.path) and spec.size is None:
        raise StandbyError(
            detail=f"volume {spec.name!r}: {spec.path} does not exist; give size= to create it"
        )
    device = open_file_device(spec.path, spec.size)
    if device.size % spec.block_size:
        device.close()
        raise StandbyError(
            detail=f"volume {spec.name!r}: {spec.path} has {device.size} bytes, not a multiple of the block "
            f"size {spec.block_size}"
        )
    return device


def serve(conf: PrimaryConfig) -> int:
    if not conf.volume:
        raise cfg.ConfigError(detail="give at least one --volume NAME=PATH[,size=SIZE]")
    if not conf.standby:
        raise cfg.ConfigError(detail="--standby H:P is required (the standby daemon's gRPC address)")
    cfg.parse_address(conf.standby)
    names = [v.name for v in conf.volume]
    if len(set(names)) != len(names):
        raise cfg.ConfigError(detail=f"volume names must be unique: {', '.join(names)}")
    registry = CollectorRegistry()
    metrics = PrimaryMetrics(registry, conf.mode)
    devices: dict[str, MirroredDevice] = {}
    nbd = metrics_server = None
    try:
        for spec in conf.volume:
            local = open_volume(spec)
            mirror = Mirror(conf.standby, spec.name, local.size, spec.block_size, metrics=metrics)
            metrics.add_volume(spec.name, mirror.in_flight_bytes)
            devices[spec.name] = MirroredDevice(spec.name, local, mirror, metrics=metrics)
            mirror.start()
        metrics_server = MetricsServer(registry, conf.metrics_listen)
        log.info("listening", service="metrics", address=cfg.format_address(metrics_server.address))
        for name, dev in devices.items():
            while not dev.mirror.wait_connected(10):
                log.warning(
                    "waiting_for_standby", volume=name, standby=conf.standby, error=dev.mirror.last_error
                )
        nbd = NbdServer(devices, conf.nbd_listen)
        log.info("listening", service="nbd", address=cfg.format_address(nbd.start()))
        log.info("ready", volumes=names, standby=conf.standby, mode=conf.mode)
        signum = wait_for_signal()
        log.info("stopping", signal=signum)
    finally:
        if nbd is not None:
            nbd.stop()
        for dev in devices.values():
            dev.mirror.stop()
            dev.device.flush()
            dev.close()
        if metrics_server is not None:
            metrics_server.stop()
    log.info("stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        conf = cfg.resolve(PrimaryConfig, args)
        if args.show_config:
            sys.stdout.write(cfg.show(conf))
            return EXIT_OK
        logs.configure("primary", level=conf.log_level, fmt=conf.log_format)
        return serve(conf)

    return run("standby-primary", body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

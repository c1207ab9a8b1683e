"""`standby-daemon`: keep replicas of the primary's volumes, snapshot them, export snapshots over NBD.

standby-daemon --data-dir DIR [--listen H:P] [--nbd-listen H:P] [--metrics-listen H:P]
               [--preservation-capacity SIZE|PCT%] [--on-full invalidate|defer]
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from standby import services
from standby.metrics import StandbyMetrics
from standby.node import StandbyNode, check_capacity
from standbylib.nbd.server import NbdServer
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.main import EXIT_OK, StopSignal, daemon_main
from standbylib.runtime.metrics import MetricsServer
from standbylib.runtime.rpc import create_server
from standbylib.units import parse_size

log = logs.get("standby.main")


@dataclass
class StandbyConfig:
    data_dir: str | None = cfg.setting(
        None, "directory of the replicas, the preservation store and the standby's identity", metavar="DIR"
    )
    listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 7700), "gRPC address (replication and control)", parse=cfg.parse_address, metavar="H:P"
    )
    nbd_listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 10809), "NBD address of the snapshot exports", parse=cfg.parse_address, metavar="H:P"
    )
    metrics_listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 9700), "Prometheus metrics address", parse=cfg.parse_address, metavar="H:P"
    )
    preservation_capacity: str = cfg.setting(
        "20%",
        "space for preserved blocks, shared by all snapshots: a size (64GiB) or a percentage of the "
        "filesystem holding --data-dir",
        metavar="SIZE|PCT%",
        parse=check_capacity,
    )
    on_full: str = cfg.setting(
        "invalidate",
        "when a snapshot's preservation space is full: invalidate the snapshot (writes go on), or defer "
        "the volume's writes until space is freed",
        choices=("invalidate", "defer"),
    )
    adopt: list[str] = cfg.setting(  # noqa: RUF009 (a dataclass field with a default factory)
        [],
        "NAME=PATH[,block-size=SIZE]: seed the replica of a new volume with a copy of PATH (failback: the "
        "old primary's volume, so the new primary resends only the blocks that differ); repeatable, "
        "ignored for a volume that has a replica",
        metavar="NAME=PATH",
        repeat=True,
    )
    log_level: str = cfg.setting("info", "log level", choices=logs.LEVELS)
    log_format: str = cfg.setting(
        "auto",
        "log format (auto: console on a terminal, else JSON lines)",
        choices=("auto", "json", "console"),
    )


def parse_adopt(spec: str) -> tuple[str, str, int]:
    """``NAME=PATH[,block-size=SIZE]``."""
    name, sep, rest = spec.partition("=")
    path, _, option = rest.partition(",")
    block_size = 4096
    if option:
        key, _, value = option.partition("=")
        if key != "block-size":
            raise cfg.ConfigError(detail=f"--adopt {spec!r}: unknown option {option!r} (block-size=)")
        block_size = parse_size(value)
    if not sep or not name or not path:
        raise cfg.ConfigError(detail=f"--adopt {spec!r} must be NAME=PATH[,block-size=SIZE]")
    if not os.path.isfile(path):
        raise cfg.ConfigError(detail=f"--adopt {spec!r}: {path} is not a file")
    return name, path, block_size


#: Seconds between checks for snapshot leases that ran out.
LEASE_CHECK = 1.0


def serve(conf: StandbyConfig) -> int:
    if not conf.data_dir:
        raise cfg.ConfigError(detail="--data-dir is required (or data_dir in the --config file)")
    stop = StopSignal()
    registry = CollectorRegistry()
    metrics = StandbyMetrics(registry)
    node = StandbyNode(
        conf.data_dir, capacity=conf.preservation_capacity, on_full=conf.on_full, metrics=metrics
    )
    nbd = grpc_server = metrics_server = None
    try:
        for spec in conf.adopt:
            name, path, block_size = parse_adopt(spec)
            if not node.adopt(name, path, block_size):
                log.warning("adopt_ignored", volume=name, reason="the volume has a replica already")
        metrics.watch(node)
        nbd = NbdServer(node.export, conf.nbd_listen, list_exports=node.export_names)
        nbd_address = cfg.format_address(nbd.start())
        log.info("listening", service="nbd", address=nbd_address)
        grpc_server, bound, _health = create_server(
            conf.listen, lambda server: services.register(server, node, nbd_address)
        )
        log.info("listening", service="grpc", address=cfg.format_address(bound))
        metrics_server = MetricsServer(registry, conf.metrics_listen)
        log.info("listening", service="metrics", address=cfg.format_address(metrics_server.address))
        stats = node.store.stats()
        log.info(
            "ready",
            data_dir=node.data_dir,
            standby_id=node.id,
            volumes=[r.name for r in node.replicas()],
            preservation_capacity=stats.capacity_bytes,
            on_full=conf.on_full,
        )
        while not stop.wait(LEASE_CHECK):
            node.expire_leases()
        log.info("stopping", signal=stop.signum)
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2).wait()
        if nbd is not None:
            nbd.stop()
        if metrics_server is not None:
            metrics_server.stop()
        node.close()
    log.info("stopped")
    return EXIT_OK


DESCRIPTION = (
    "Standby daemon: applies the primary's mirrored writes to replicas through the "
    "copy-on-write snapshot engine and exports each snapshot over NBD as VOLUME@SNAPSHOT."
)


def main(argv: list[str] | None = None) -> int:
    return daemon_main("standby-daemon", DESCRIPTION, StandbyConfig, "standby", serve, argv)


if __name__ == "__main__":
    sys.exit(main())

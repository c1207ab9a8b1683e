"""`standby-daemon`: keep replicas of the primary's volumes, snapshot them, export snapshots over NBD.

standby-daemon --data-dir DIR [--listen H:P] [--data-listen H:P|off] [--nbd-listen H:P] [--metrics-listen H:P]
               [--preservation-capacity SIZE|PCT%] [--on-full invalidate|defer]
               [--tls-cert FILE --tls-key FILE [--tls-ca FILE] [--require-client-cert]]
               [--nbd-tls off|optional|require [--nbd-tls-cert FILE --nbd-tls-key FILE --nbd-tls-ca FILE]]
               [--policy FILE]

TLS and authorization by certificate identity (--policy): docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from standby import authz, services
from standby.datachannel import DataChannelServer
from standby.metrics import StandbyMetrics
from standby.node import StandbyNode, check_capacity, parse_capacity
from standby.policy import Policy, load_setting
from standbylib.nbd.server import NbdServer
from standbylib.runtime import config as cfg
from standbylib.runtime import logs
from standbylib.runtime.logs import LogSettings
from standbylib.runtime.main import EXIT_OK, StopSignal, daemon_main, daemon_parser, gather, package_version
from standbylib.runtime.metrics import MetricsServer, build_info
from standbylib.runtime.rpc import create_server
from standbylib.runtime.tls import NbdTlsSettings, TlsFiles, nbd_tls_of
from standbylib.units import parse_size

log = logs.get("standby.main")


def parse_data_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT``, or ``off`` (no data channel)."""
    return None if str(text).strip().lower() in ("off", "none", "") else cfg.parse_address(text)


@dataclass
class StandbyConfig(NbdTlsSettings, LogSettings):
    data_dir: str | None = cfg.setting(
        None, "directory of the replicas, the preservation store and the standby's identity", metavar="DIR"
    )
    listen: tuple[str, int] = cfg.setting(
        ("127.0.0.1", 7700), "gRPC address (replication and control)", parse=cfg.parse_address, metavar="H:P"
    )
    data_listen: tuple[str, int] | None = cfg.setting(
        ("127.0.0.1", 7701),
        "data channel address: primaries send their batches there, on a plain TCP (or TLS) connection "
        "opened through gRPC; 'off': batches travel on the gRPC stream only (slower)",
        parse=parse_data_listen,
        metavar="H:P|off",
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
    tls_cert: str | None = cfg.setting(
        None,
        "PEM certificate chain of the gRPC server; with --tls-key, gRPC is served over TLS only",
        metavar="FILE",
    )
    tls_key: str | None = cfg.setting(None, "PEM private key of --tls-cert", metavar="FILE")
    tls_ca: str | None = cfg.setting(
        None, "PEM CA certificates that client certificates must chain to", metavar="FILE"
    )
    require_client_cert: bool = cfg.setting(
        False,
        "mutual TLS: refuse gRPC clients (and NBD clients over TLS) without a certificate signed by "
        "--tls-ca (--nbd-tls-ca for NBD)",
    )
    policy: Policy | None = cfg.setting(  # noqa: RUF009 (a dataclass field, as every setting)
        None,
        "authorization by client certificate identity: a TOML file granting identities (CN=NAME, "
        "DNS:NAME, URI:URI, email:ADDRESS) roles on volumes; needs mutual TLS; not set: every client "
        "the CA vouches for may do everything (docs/SECURITY.md)",
        parse=load_setting,
        metavar="FILE",
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


def grpc_tls(conf: StandbyConfig) -> TlsFiles:
    """The gRPC server's TLS files (not enabled without any)."""
    tls = TlsFiles(conf.tls_cert, conf.tls_key, conf.tls_ca, conf.require_client_cert)
    if tls.enabled or tls.require_client_cert:
        tls.server_credentials()  # every file readable and matching, before anything starts
    return tls


def data_channel_tls(tls: TlsFiles) -> ssl.SSLContext | None:
    """The data channel's TLS: the gRPC server's certificate, key and client-certificate rule."""
    return tls.server_context() if tls.enabled else None


def tls_mode(tls: TlsFiles) -> str:
    return "mutual" if tls.require_client_cert else "on" if tls.enabled else "off"


def check_policy(conf: StandbyConfig, tls: TlsFiles) -> None:
    """A policy needs identities: gRPC over mutual TLS, every client presenting a certificate."""
    if conf.policy is None:
        return
    if not tls.enabled:
        missing = "gRPC has no TLS (--tls-cert, --tls-key, --tls-ca and --require-client-cert)"
    elif not tls.require_client_cert:
        missing = "gRPC does not require client certificates (--require-client-cert)"
    else:
        return
    raise cfg.ConfigError(
        detail=f"--policy {conf.policy.spec} needs mutual TLS, the identities come from client "
        f"certificates: {missing}"
    )


def policy_of(conf: StandbyConfig) -> str:
    """The policy as the `listening` events show it: its file, or none (every client may do everything)."""
    return conf.policy.spec if conf.policy is not None else "none"


#: Seconds between checks for snapshot leases that ran out.
LEASE_CHECK = 1.0


def check(conf: StandbyConfig) -> list[str]:
    """What is wrong with `conf` on this host (`--check-config`): every problem, not only the first."""

    def data_dir() -> None:
        if not conf.data_dir:
            raise cfg.ConfigError(detail="--data-dir is required (or data_dir in the --config file)")
        cfg.check_directory(conf.data_dir, "--data-dir")

    def capacity() -> None:
        if not conf.data_dir:
            return
        where = conf.data_dir
        while not os.path.exists(where):
            where = os.path.dirname(os.path.abspath(where))
        wanted = parse_capacity(conf.preservation_capacity, where)
        st = os.statvfs(where)
        total = st.f_blocks * st.f_frsize
        if wanted > total:
            raise cfg.ConfigError(
                detail=f"--preservation-capacity {conf.preservation_capacity} is {wanted} bytes, more than "
                f"the filesystem of {where} holds ({total} bytes)"
            )

    def tls() -> None:
        check_policy(conf, grpc_tls(conf))

    def adopted() -> None:
        for spec in conf.adopt:
            parse_adopt(spec)

    return gather(data_dir, capacity, tls, lambda: nbd_tls_of(conf), adopted)


def serve(conf: StandbyConfig) -> int:
    if not conf.data_dir:
        raise cfg.ConfigError(detail="--data-dir is required (or data_dir in the --config file)")
    tls = grpc_tls(conf)
    check_policy(conf, tls)
    nbd_security = nbd_tls_of(conf)
    stop = StopSignal()
    registry = CollectorRegistry()
    build_info(registry, "standby-daemon", package_version())
    metrics = StandbyMetrics(registry)
    authorizer = exports_access = None
    if conf.policy is not None:
        denials = authz.Denials(registry)
        authorizer = authz.Authorizer(conf.policy, denials)
        exports_access = authz.ExportGuard(conf.policy, denials)
    node = StandbyNode(
        conf.data_dir, capacity=conf.preservation_capacity, on_full=conf.on_full, metrics=metrics
    )
    nbd = grpc_server = metrics_server = channels = None
    try:
        for spec in conf.adopt:
            name, path, block_size = parse_adopt(spec)
            if not node.adopt(name, path, block_size):
                log.warning("adopt_ignored", volume=name, reason="the volume has a replica already")
        metrics.watch(node)
        nbd = NbdServer(
            node.export,
            conf.nbd_listen,
            list_exports=node.export_names,
            tls=nbd_security,
            access=exports_access,
        )
        nbd_address = cfg.format_address(nbd.start())
        log.info("listening", service="nbd", address=nbd_address, tls=conf.nbd_tls, policy=policy_of(conf))
        if conf.data_listen is not None:
            channels = DataChannelServer(node, conf.data_listen, tls=data_channel_tls(tls), metrics=metrics)
            data_address = cfg.format_address(channels.start())
            log.info("listening", service="data", address=data_address, tls=tls_mode(tls))

        def register(server: grpc.Server) -> None:
            services.register(server, node, nbd_address, channels, metrics, nbd_tls=conf.nbd_tls)

        # With a policy every call passes the authorizer first (the health service stays open).
        grpc_server, bound, _health = create_server(
            conf.listen,
            register,
            workers=services.GRPC_WORKERS,
            tls=tls,
            interceptors=() if authorizer is None else (authorizer,),
        )
        log.info(
            "listening",
            service="grpc",
            address=cfg.format_address(bound),
            tls=tls_mode(tls),
            policy=policy_of(conf),
        )
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
        if channels is not None:
            channels.stop()
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


def parser() -> argparse.ArgumentParser:
    """The command line (for the man page and the shell completion, scripts/manpages.py)."""
    return daemon_parser("standby-daemon", DESCRIPTION, StandbyConfig, check)


def main(argv: list[str] | None = None) -> int:
    return daemon_main("standby-daemon", DESCRIPTION, StandbyConfig, "standby", serve, argv, check=check)


if __name__ == "__main__":
    sys.exit(main())

"""An in-process standby (real gRPC server on loopback, real engine) for the role tests, and what they do
with a standby node: sync a volume once, fingerprint a replica."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from standby import services
from standby.node import StandbyNode
from standby.replica import Replica
from standbylib.runtime.rpc import create_server

MiB = 1 << 20


@dataclass
class StandbyRig:
    node: StandbyNode
    target: str
    server: object

    def stop(self) -> None:
        self.server.stop(grace=None).wait()  # type: ignore[attr-defined]


def start_rig(data_dir: str, port: int = 0, capacity: str = "64MiB") -> StandbyRig:
    node = StandbyNode(data_dir, capacity=capacity)
    server, bound, _ = create_server(("127.0.0.1", port), lambda s: services.register(s, node, "127.0.0.1:1"))
    return StandbyRig(node, f"127.0.0.1:{bound[1]}", server)


def replica_digest(node: StandbyNode, volume: str = "vol0") -> str:
    """The sha256 of the replica file of `volume`."""
    with open(node.replica_path(volume), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def synced(node: StandbyNode, data: bytes, primary_id: str = "p1") -> Replica:
    """vol0 (4 MiB, 4 KiB blocks) handshaked and fully synced once at generation g1, the sync writing
    `data` at offset 0: an up-to-date replica (a snapshot or a promotion needs one)."""
    replica, _, _ = node.handshake("vol0", 4 * MiB, 4096)
    node.open_stream("vol0", primary_id, 1, resync=True, generation="g1")
    node.apply(replica, 1, [(0, data)], False, uptodate=True)
    node.close_stream(replica)
    return replica

"""An in-process standby (real gRPC server on loopback, real engine) for the role tests."""

from __future__ import annotations

from dataclasses import dataclass

from standby import services
from standby.node import StandbyNode
from standbylib.runtime.rpc import create_server


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

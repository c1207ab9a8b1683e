"""The standby as the backup node sees it: its control API with one-line errors, and snapshot leases."""

from __future__ import annotations

import threading
from typing import Any

from standbylib.errors import StandbyError
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc
from standbylib.runtime import logs, rpc
from standbylib.runtime.tls import TlsFiles

log = logs.get(__name__)


class UnknownSnapshotOnStandby(StandbyError):
    template = "volume {volume!r} has no snapshot {name!r} on the standby {standby}"


def identity(snap: control_pb2.SnapshotInfo) -> dict[str, Any]:
    """What names a snapshot uniquely in archives: the standby's id, the volume and the snapshot's epoch
    there (its name and time are kept for people)."""
    return {
        "standby": snap.standby_id,
        "volume": snap.volume,
        "epoch": snap.epoch,
        "name": snap.name,
        "created": snap.created,
    }


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

    def release_lease(self, volume: str, name: str) -> None:
        """Drop a snapshot's lease: it stays until deleted."""
        with rpc.calling(self.target, self.tls):
            self.stub.RenewSnapshotLease(
                control_pb2.RenewSnapshotLeaseRequest(volume=volume, name=name, release=True),
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
        raise UnknownSnapshotOnStandby(volume=volume, name=name, standby=self.target)

    def delete(self, volume: str, name: str) -> None:
        with rpc.calling(self.target, self.tls):
            self.stub.DeleteSnapshot(
                control_pb2.DeleteSnapshotRequest(volume=volume, name=name), timeout=self.timeout
            )

    def changes(self, volume: str, base: str, name: str) -> list[tuple[int, int]]:
        """The byte extents written between snapshot `base` and the later `name` (the standby's
        preservation index says)."""
        out: list[tuple[int, int]] = []
        with rpc.calling(self.target, self.tls):
            request = control_pb2.SnapshotChangesRequest(volume=volume, base=base, snapshot=name)
            for reply in self.stub.SnapshotChanges(request, timeout=self.timeout):
                out.extend(zip(reply.offsets, reply.lengths, strict=True))
        return out

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

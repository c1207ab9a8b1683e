"""The standby's gRPC servicers: Replication (handshake, ordered batch stream) and Control.

Thin adapters: they translate messages to `StandbyNode` calls and library errors to status codes
(`standbylib.runtime.rpc.STATUS_TABLE`); the node does the work.
"""

from __future__ import annotations

import itertools
import queue
import ssl
import threading
from collections.abc import Iterator
from typing import Protocol

import grpc

from standby.batches import applied_reply, apply_batch, ops_of
from standby.datachannel import DataChannelServer
from standby.node import StandbyNode
from standby.replica import Replica
from standby.verify import VerifyFailed, VerifySession
from standbylib.errors import InvalidArgument, Overloaded, StandbyError
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2, replication_pb2_grpc
from standbylib.runtime import logs
from standbylib.runtime.main import package_version
from standbylib.runtime.rpc import abort, add_service, guarded
from standbylib.snapshot.volume import SnapshotInfo

#: Batches received and not yet applied, per stream, in `received` mode (each up to a few MiB).
RECEIVE_QUEUE = 8
#: Mirror streams over gRPC (each holds one of the server's worker threads for its lifetime) at most;
#: the server has `GRPC_WORKERS`, so control calls always find a free worker.
GRPC_STREAM_LIMIT = 64
GRPC_WORKERS = GRPC_STREAM_LIMIT + 16
#: Seconds between two progress messages of a verify.
VERIFY_PROGRESS_INTERVAL = 0.5
#: Extents per `SnapshotChanges` reply: 65536 x two varints stays far below gRPC's 4 MiB message limit.
CHANGES_PER_REPLY = 65536

log = logs.get(__name__)


def rfc3339(created: str) -> str:
    """The engine's timestamp (microseconds) as RFC 3339 to the second: 2026-01-01T00:00:00Z."""
    return created.split(".")[0].rstrip("Z") + "Z"


def snapshot_message(info: SnapshotInfo) -> control_pb2.SnapshotInfo:
    return control_pb2.SnapshotInfo(
        volume=info.volume,
        name=info.name,
        valid=info.valid,
        writable=info.writable,
        created=rfc3339(info.created),
        preserved_bytes=info.preserved_bytes,
        capacity_bytes=info.capacity_bytes,
        export=f"{info.volume}@{info.name}",
        reason=info.reason,
        epoch=info.epoch,
        replica_state=info.labels.get("replica_state", ""),
        replica_connected=bool(info.labels.get("replica_connected")),
        replica_in_sync_at=info.labels.get("replica_in_sync_at", ""),
        replica_lag_seconds=info.labels.get("replica_lag_seconds", 0.0),
    )


class Limits(Protocol):
    def limit_reached(self, limit: str) -> None: ...


class NullLimits:
    def limit_reached(self, limit: str) -> None:
        pass


class ReplicationService(replication_pb2_grpc.ReplicationServicer):
    """`channels`: the data channel's listener (None: batches travel on the Mirror stream only).
    `grpc_stream_limit`: Mirror streams that may hold a worker thread at once (the gRPC transport)."""

    def __init__(
        self,
        node: StandbyNode,
        channels: DataChannelServer | None = None,
        *,
        grpc_stream_limit: int = GRPC_STREAM_LIMIT,
        limits: Limits | None = None,
    ) -> None:
        self.node = node
        self.channels = channels
        self.grpc_stream_limit = grpc_stream_limit
        self.limits: Limits = limits or NullLimits()
        self._grpc_streams = 0
        self._streams_lock = threading.Lock()

    @guarded
    def Handshake(
        self, request: replication_pb2.HandshakeRequest, context: grpc.ServicerContext
    ) -> replication_pb2.HandshakeReply:
        try:
            replica, created, full = self.node.handshake(
                request.volume,
                request.size,
                request.block_size,
                generation=request.generation,
                base_generation=request.base_generation,
                discard=request.discard_standby_data,
                previous_generation=request.previous_generation,
                primary_id=request.primary_id,
            )
        except StandbyError as e:
            self.node.refused(request.volume, e)
            raise
        log.info(
            "handshake",
            volume=request.volume,
            primary=request.primary_id,
            size=request.size,
            block_size=request.block_size,
            created=created,
            full_sync=full,
            generation=replica.generation,
        )
        return replication_pb2.HandshakeReply(
            volume=replica.name,
            size=replica.size,
            block_size=replica.block_size,
            created=created,
            standby_id=self.node.id,
            applied_sequence=replica.applied_sequence if replica.primary_id == request.primary_id else 0,
            generation=replica.generation,
            full_sync=full,
            failback=replica.failback,
            tracked_bytes=replica.tracker.tracked_bytes() if replica.failback and replica.tracker else 0,
        )

    @guarded
    def FailbackPull(
        self, request: replication_pb2.FailbackPullRequest, context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.FailbackChunk]:
        regions = [(e.offset, e.length) for e in request.regions]
        replica = self.node.replica(request.volume)
        tracked = replica.tracker.tracked_bytes() if replica.tracker else 0
        pieces: Iterator[tuple[int, int, bytes | None]]
        if request.checksums:
            pieces = self.node.failback_digests(request.volume, request.generation, regions)
        else:
            pieces = self.node.failback_blocks(request.volume, request.generation, regions)
        # Checked before the first chunk, so a refusal is the call's status, not a broken stream.
        first = next(pieces, None)
        log.info(
            "failback_pull",
            volume=request.volume,
            primary=request.primary_id,
            tracked_bytes=tracked,
            primary_regions=len(regions),
            checksums=request.checksums,
        )
        return self._failback_chunks(request, first, pieces, tracked, context)

    def _failback_chunks(
        self,
        request: replication_pb2.FailbackPullRequest,
        first: tuple[int, int, bytes | None] | None,
        pieces: Iterator[tuple[int, int, bytes | None]],
        tracked: int,
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.FailbackChunk]:
        sent = 0
        chunk = replication_pb2.FailbackChunk
        if first is not None:
            try:
                for offset, length, data in itertools.chain([first], pieces):
                    if request.checksums:
                        yield chunk(offset=offset, length=length, digests=data)
                        continue
                    sent += length
                    yield chunk(offset=offset, length=length, data=data or b"")
            except StandbyError as e:
                abort(context, e)
        if not request.checksums:
            log.info("failback_sent", volume=request.volume, tracked_bytes=tracked, sent_bytes=sent)
        yield chunk(done=True, tracked_bytes=tracked, sent_bytes=sent)

    def Mirror(
        self, requests: Iterator[replication_pb2.MirrorRequest], context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.MirrorReply]:
        opened = replication_pb2.MirrorOpen()
        claimed = False  # this call holds a worker for the stream's lifetime (counted)
        try:
            first = next(requests, None)
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first Mirror message must be `open`")
            opened = first.open
            if self.channels is not None:
                # A stream of this volume whose data channel never came: its claim goes, for this one.
                self.channels.revoke(opened.volume)
            if not opened.data_channel or self.channels is None:
                self._claim_worker(opened.volume)
                claimed = True
            replica = self.node.open_stream(
                opened.volume,
                opened.primary_id,
                opened.first_sequence or 1,
                resync=opened.resync,
                generation=opened.generation,
            )
        except StandbyError as e:
            self._release_worker(claimed)
            if self.node.refused(opened.volume, e):
                log.warning("stream_refused", volume=opened.volume, primary=opened.primary_id, error=str(e))
            abort(context, e)
        handed_over = False
        try:
            if opened.data_channel:
                if self.channels is not None:
                    # The session moves to the data channel: this call (and its worker thread) ends.
                    offer = self.channels.offer(replica, opened, peer_certificate(context))
                    handed_over = True
                    yield replication_pb2.MirrorReply(channel=offer)
                    return
                yield replication_pb2.MirrorReply()  # no data channel here: batches follow on this stream
            if opened.received_acks:
                yield from self._pipelined(replica, requests, context)
                return
            for request in requests:
                batch = self._batch(request, context)
                mismatched = self._apply(replica, batch, context)
                yield applied_reply(self.node, replica, batch.sequence, batch.flush, mismatched)
        finally:
            if not handed_over:
                self.node.close_stream(replica)
            self._release_worker(claimed)

    def _release_worker(self, claimed: bool) -> None:
        if claimed:
            with self._streams_lock:
                self._grpc_streams -= 1

    def _claim_worker(self, volume: str) -> None:
        """Count a Mirror stream that will hold a worker thread; refuse it at `grpc_stream_limit` (the
        workers beyond it stay free for control calls)."""
        with self._streams_lock:
            if self._grpc_streams >= self.grpc_stream_limit:
                self.limits.limit_reached("grpc_mirror_streams")
                log.warning(
                    "limit_reached",
                    limit="grpc_mirror_streams",
                    value=self.grpc_stream_limit,
                    volume=volume,
                    effect="the stream is refused; primaries using the data channel are not limited by it",
                )
                raise Overloaded(
                    detail=f"the standby serves {self.grpc_stream_limit} Mirror streams over gRPC, its "
                    "limit; a primary using the data channel (--transport auto or channel) needs none"
                )
            self._grpc_streams += 1

    @staticmethod
    def _batch(
        request: replication_pb2.MirrorRequest, context: grpc.ServicerContext
    ) -> replication_pb2.Batch:
        if request.WhichOneof("kind") != "batch":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only batches may follow `open`")
        return request.batch

    def _apply(
        self, replica: Replica, batch: replication_pb2.Batch, context: grpc.ServicerContext
    ) -> list[int]:
        try:
            return apply_batch(
                self.node,
                replica,
                batch.sequence,
                ops_of(batch),
                batch.flush,
                batch.uptodate,
                batch.resync_remaining,
            )
        except StandbyError as e:
            abort(context, e)

    def _pipelined(
        self,
        replica: Replica,
        requests: Iterator[replication_pb2.MirrorRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.MirrorReply]:
        """`received` mode: a reader acknowledges each batch on arrival and queues it; this thread applies
        batches in order and acknowledges them again once applied."""
        replies: queue.Queue[replication_pb2.MirrorReply | BaseException | None] = queue.Queue()
        batches: queue.Queue[replication_pb2.Batch | BaseException | None] = queue.Queue(
            maxsize=RECEIVE_QUEUE
        )

        from_stream: list[BaseException] = []

        def read() -> None:
            try:
                for request in requests:
                    if request.WhichOneof("kind") != "batch":
                        raise InvalidArgument(detail="only batches may follow `open`")
                    replies.put(replication_pb2.MirrorReply(sequence=request.batch.sequence, received=True))
                    batches.put(request.batch)
                batches.put(None)
            except BaseException as e:  # the stream broke, or a protocol error: the applier ends it
                if not isinstance(e, StandbyError):
                    from_stream.append(e)
                batches.put(e)

        reader = threading.Thread(target=read, name=f"receive-{replica.name}", daemon=True)
        reader.start()

        def apply_all() -> None:
            try:
                while (item := batches.get()) is not None:
                    if isinstance(item, BaseException):
                        replies.put(item)
                        return
                    mismatched = apply_batch(
                        self.node,
                        replica,
                        item.sequence,
                        ops_of(item),
                        item.flush,
                        item.uptodate,
                        item.resync_remaining,
                    )
                    replies.put(applied_reply(self.node, replica, item.sequence, item.flush, mismatched))
                replies.put(None)
            except BaseException as e:
                replies.put(e)

        applier = threading.Thread(target=apply_all, name=f"apply-{replica.name}", daemon=True)
        applier.start()
        try:
            while (reply := replies.get()) is not None:
                if isinstance(reply, StandbyError):
                    abort(context, reply)
                if isinstance(reply, BaseException):
                    if isinstance(reply, grpc.RpcError) or not context.is_active():
                        return
                    if any(reply is e for e in from_stream):
                        # Raised by the request stream itself: a message that did not parse, for which
                        # the call was aborted already; raised here, it ends the call with that status.
                        raise reply
                    abort(context, reply)
                yield reply
        finally:
            # The next stream of this volume may start once this one applies nothing more.
            applier.join(30)


def peer_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The DER certificate the client presented on this call (mutual TLS), else None."""
    pems = list(context.auth_context().get("x509_pem_cert") or [])
    if not pems:
        return None
    pem = pems[0]
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii") if isinstance(pem, bytes) else str(pem))


class ControlService(control_pb2_grpc.ControlServicer):
    def __init__(self, node: StandbyNode, nbd_address: str, nbd_tls: str = "off") -> None:
        self.node = node
        self.nbd_address = nbd_address
        self.nbd_tls = nbd_tls

    @guarded
    def Status(
        self, request: control_pb2.StatusRequest, context: grpc.ServicerContext
    ) -> control_pb2.StatusReply:
        node = self.node
        volumes = [self._volume_status(r) for r in node.replicas()]
        stats = node.store.stats()
        return control_pb2.StatusReply(
            nbd=self.nbd_address,
            nbd_tls=self.nbd_tls,
            volumes=volumes,
            store=control_pb2.StoreStatus(
                path=node.store_path,
                capacity_bytes=stats.capacity_bytes,
                used_bytes=stats.used_bytes,
                on_full=node.on_full,
            ),
            standby_id=node.id,
            version=package_version(),
            problems=node.problems(),
        )

    def _volume_status(self, r: Replica) -> control_pb2.VolumeStatus:
        progress = r.resync_progress()
        return control_pb2.VolumeStatus(
            name=r.name,
            size=r.size,
            block_size=r.block_size,
            state=r.status,
            connected=r.connected,
            snapshots=[self._message(s.info()) for s in r.volume.snapshots()],
            applied_bytes=r.applied_bytes,
            applied_batches=r.applied_batches,
            cow_copies=r.volume.cow_copies,
            primary_id=r.primary_id,
            last_error=r.last_error,
            promoted_at=r.promoted_at,
            rolled_back_to=r.rolled_back_to,
            kept_snapshot=r.kept_snapshot,
            tracked_bytes=r.tracker.tracked_bytes() if r.tracker else 0,
            rollback_remaining_bytes=r.rollback_remaining,
            owner=r.owner,
            resync_remaining_bytes=r.resync_remaining if progress else 0,
            resync_total_bytes=r.resync_total if progress else 0,
            resync_eta_seconds=progress[1] if progress else 0.0,
        )

    @guarded
    def Promote(
        self, request: control_pb2.PromoteRequest, context: grpc.ServicerContext
    ) -> control_pb2.VolumeStatus:
        return self._volume_status(self.node.promote(request.volume, force=request.force, at=request.at))

    @guarded
    def Demote(
        self, request: control_pb2.DemoteRequest, context: grpc.ServicerContext
    ) -> control_pb2.VolumeStatus:
        return self._volume_status(self.node.demote(request.volume))

    @guarded
    def Takeover(
        self, request: control_pb2.TakeoverRequest, context: grpc.ServicerContext
    ) -> control_pb2.VolumeStatus:
        self.node.takeover(request.volume)
        return self._volume_status(self.node.replica(request.volume))

    @guarded
    def RemoveVolume(
        self, request: control_pb2.RemoveVolumeRequest, context: grpc.ServicerContext
    ) -> control_pb2.RemoveVolumeReply:
        snapshots, held = self.node.remove(request.volume, force=request.force)
        return control_pb2.RemoveVolumeReply(
            volume=request.volume, snapshots_deleted=snapshots, replica_bytes=held
        )

    @guarded
    def CreateSnapshot(
        self, request: control_pb2.CreateSnapshotRequest, context: grpc.ServicerContext
    ) -> control_pb2.SnapshotInfo:
        info = self.node.create_snapshot(
            request.volume,
            request.name or None,
            writable=request.writable,
            capacity=request.capacity_bytes or None,
            lease=request.lease_seconds or None,
        )
        return self._message(info)

    @guarded
    def RenewSnapshotLease(
        self, request: control_pb2.RenewSnapshotLeaseRequest, context: grpc.ServicerContext
    ) -> control_pb2.SnapshotInfo:
        info = self.node.renew_lease(
            request.volume, request.name, request.lease_seconds, release=request.release
        )
        return self._message(info)

    def _message(self, info: SnapshotInfo) -> control_pb2.SnapshotInfo:
        message = snapshot_message(info)
        message.lease_remaining_seconds = self.node.leases.remaining(info.volume, info.name) or 0.0
        message.standby_id = self.node.id
        return message

    @guarded
    def ListSnapshots(
        self, request: control_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> control_pb2.ListSnapshotsReply:
        return control_pb2.ListSnapshotsReply(
            snapshots=[self._message(i) for i in self.node.snapshots(request.volume or None)]
        )

    @guarded
    def DeleteSnapshot(
        self, request: control_pb2.DeleteSnapshotRequest, context: grpc.ServicerContext
    ) -> control_pb2.DeleteSnapshotReply:
        self.node.delete_snapshot(request.volume, request.name)
        return control_pb2.DeleteSnapshotReply()

    def Verify(
        self, request: control_pb2.VerifyRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.VerifyProgress]:
        """Start a verify and stream its progress until it is done (or fails, or the client goes)."""
        try:
            session = self.node.start_verify(request.volume, request.repair)
        except StandbyError as e:
            abort(context, e)
        try:
            while True:
                status = self.node.verify_status(session, VERIFY_PROGRESS_INTERVAL)
                if status.error:
                    abort(context, VerifyFailed(volume=request.volume, detail=status.error))
                yield _progress(status)
                if status.done:
                    return
                if not context.is_active():
                    return
        finally:
            self.node.cancel_verify(session, "standbyctl went away before the verify was done")

    def SnapshotChanges(
        self, request: control_pb2.SnapshotChangesRequest, context: grpc.ServicerContext
    ) -> Iterator[control_pb2.SnapshotChangesReply]:
        try:
            extents = self.node.snapshot_changes(request.volume, request.base, request.snapshot)
        except StandbyError as e:
            abort(context, e)
        for i in range(0, max(len(extents), 1), CHANGES_PER_REPLY):
            piece = extents[i : i + CHANGES_PER_REPLY]
            yield control_pb2.SnapshotChangesReply(
                offsets=[offset for offset, _ in piece], lengths=[length for _, length in piece]
            )


def _progress(status: VerifySession) -> control_pb2.VerifyProgress:
    return control_pb2.VerifyProgress(
        volume=status.volume,
        checked_bytes=min(status.checked_bytes, status.total_bytes),
        total_bytes=status.total_bytes,
        mismatched_blocks=status.mismatched_blocks,
        first_offsets=status.first_offsets,
        repaired_blocks=status.repaired_blocks,
        done=status.done,
        block_size=status.block_size,
    )


def register(
    server: grpc.Server,
    node: StandbyNode,
    nbd_address: str,
    channels: DataChannelServer | None = None,
    limits: Limits | None = None,
    nbd_tls: str = "off",
) -> None:
    replication = ReplicationService(node, channels, limits=limits)
    add_service(server, replication_pb2.DESCRIPTOR.services_by_name["Replication"], replication)
    control = ControlService(node, nbd_address, nbd_tls)
    add_service(server, control_pb2.DESCRIPTOR.services_by_name["Control"], control)

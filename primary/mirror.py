"""Mirroring one volume's writes, in order, to the standby over a gRPC `Mirror` stream.

Writers call `submit` in the order they applied their writes locally and get an op number; `wait`
blocks until the standby acknowledged the batch holding that op. Ops are coalesced into numbered
batches of up to `batch_bytes` when the stream is ready to take one, so concurrent client writes share
messages (per-write messages cannot reach the throughput this needs). At most `window_batches`
batches are unacknowledged at a time; while the window is full, new ops gather into the next batch.

Ordering: ops enter batches in submission order and batches carry consecutive sequence numbers, which
the standby applies strictly in order; nothing is ever reordered, overlapping writes included.

A broken stream is reopened (after a new handshake, with capped, jittered exponential backoff) and
every unacknowledged batch is resent with its original number; the standby skips those it had applied.
Writers simply wait longer. (Tracking writes while the standby is away is the write-intent bitmap's job.)
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from standbylib.errors import StandbyError
from standbylib.rpc.v1 import replication_pb2, replication_pb2_grpc
from standbylib.rpc.wire import encode_batch
from standbylib.runtime import logs, rpc

log = logs.get(__name__)

#: Largest batch payload (bytes of data and zeroed ranges); a single larger write travels alone.
BATCH_BYTES = 4 << 20
#: Unacknowledged batches on the stream.
WINDOW_BATCHES = 4
#: The Mirror method's full name (proto/v1/replication.proto).
MIRROR_METHOD = "/standbyappliance.v1.Replication/Mirror"
#: Reconnect backoff: first delay, cap.
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 10.0


class MirrorMetrics(Protocol):
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None: ...
    def connected(self, volume: str, up: bool) -> None: ...


class NullMirrorMetrics:
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        pass

    def connected(self, volume: str, up: bool) -> None:
        pass


class MirrorStopped(StandbyError):
    template = "mirroring of volume {volume!r} stopped before the standby acknowledged the write"


@dataclass(slots=True)
class _Op:
    number: int
    offset: int
    data: bytes | None  # None: `zero` bytes of zeros, or a barrier when zero == 0
    zero: int
    barrier: bool


@dataclass(slots=True)
class _Batch:
    sequence: int
    last_op: int
    nbytes: int
    writes: int
    message: bytes  # the serialised MirrorRequest


class Mirror:
    """The ordered mirror of volume `volume` (of `size` bytes in blocks of `block_size`) to `target`."""

    def __init__(
        self,
        target: str,
        volume: str,
        size: int,
        block_size: int,
        *,
        primary_id: str | None = None,
        metrics: MirrorMetrics | None = None,
        batch_bytes: int = BATCH_BYTES,
        window_batches: int = WINDOW_BATCHES,
    ) -> None:
        self.target = target
        self.volume = volume
        self.size = size
        self.block_size = block_size
        self.primary_id = primary_id or str(uuid.uuid4())
        self.metrics: MirrorMetrics = metrics or NullMirrorMetrics()
        self.batch_bytes = batch_bytes
        self.window_batches = window_batches
        self._cond = threading.Condition()
        self._pending: deque[_Op] = deque()
        self._outstanding: OrderedDict[int, _Batch] = OrderedDict()
        self._next_op = 1
        self._acked_op = 0
        self._next_sequence = 1
        self._stream_id = 0
        self._running = True
        self.connected = False
        self.handshakes = 0
        self.last_error = ""
        self._first_contact = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mirror-{volume}", daemon=True)

    # -- writers ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once the first handshake succeeded."""
        return self._first_contact.wait(timeout)

    def submit_write(self, offset: int, data: bytes) -> int:
        return self._submit(offset, data, 0, False)

    def submit_zero(self, offset: int, length: int) -> int:
        return self._submit(offset, None, length, False)

    def submit_barrier(self) -> int:
        """A flush barrier after every op submitted so far: acknowledged once the standby is durable."""
        return self._submit(0, None, 0, True)

    def _submit(self, offset: int, data: bytes | None, zero: int, barrier: bool) -> int:
        with self._cond:
            if not self._running:
                raise MirrorStopped(volume=self.volume)
            n = self._next_op
            self._next_op += 1
            self._pending.append(_Op(n, offset, data, zero, barrier))
            self._cond.notify_all()
            return n

    def wait(self, op: int, timeout: float | None = None) -> None:
        """Block until the standby acknowledged op number `op` (and every op before it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._acked_op < op:
                if not self._running:
                    raise MirrorStopped(volume=self.volume)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"op {op} of volume {self.volume!r} not acknowledged in time")
                self._cond.wait(remaining)

    def in_flight_bytes(self) -> int:
        with self._cond:
            pending = sum(len(o.data) if o.data is not None else o.zero for o in self._pending)
            return pending + sum(b.nbytes for b in self._outstanding.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what was submitted is acknowledged (or `timeout` passes), then close the stream."""
        with self._cond:
            target = self._next_op - 1
            deadline = time.monotonic() + timeout
            while self._acked_op < target and self.connected and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._running = False
            self._stream_id += 1
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the stream -----------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        channel = rpc.channel(self.target)
        try:
            while self._running:
                try:
                    self._handshake(channel)
                    delay = BACKOFF_FIRST
                    self._stream(channel)
                except grpc.RpcError as e:
                    self._disconnected(e.code().name if hasattr(e, "code") else "error", _details(e))
                except StandbyError as e:
                    self._disconnected("refused", str(e))
                if not self._running:
                    break
                pause = random.uniform(delay / 2, delay)
                delay = min(BACKOFF_CAP, delay * 2)
                with self._cond:
                    self._cond.wait_for(lambda: not self._running, pause)
        finally:
            channel.close()

    def _disconnected(self, code: str, details: str) -> None:
        was = self.connected
        with self._cond:
            self.connected = False
            self._stream_id += 1
            self._cond.notify_all()
        self.metrics.connected(self.volume, False)
        message = f"{code}: {details}"
        if was or message != self.last_error:
            log.warning("mirror_disconnected", volume=self.volume, target=self.target, error=message)
        self.last_error = message

    def _handshake(self, channel: grpc.Channel) -> None:
        stub = replication_pb2_grpc.ReplicationStub(channel)
        reply = stub.Handshake(
            replication_pb2.HandshakeRequest(
                volume=self.volume, size=self.size, block_size=self.block_size, primary_id=self.primary_id
            ),
            timeout=30,
        )
        self.handshakes += 1
        log.info(
            "handshake",
            volume=self.volume,
            target=self.target,
            standby_id=reply.standby_id,
            created=reply.created,
            applied_sequence=reply.applied_sequence,
        )
        self._first_contact.set()

    def _stream(self, channel: grpc.Channel) -> None:
        # Batches are serialised by `wire.encode_batch` (protobuf's encoder is too slow for bulk data),
        # so this call passes request bytes through unchanged.
        mirror = channel.stream_stream(
            MIRROR_METHOD,
            request_serializer=_identity,
            response_deserializer=replication_pb2.MirrorReply.FromString,
        )
        with self._cond:
            self._stream_id += 1
            stream_id = self._stream_id
            first = next(iter(self._outstanding), self._next_sequence)
        responses = mirror(self._requests(stream_id, first))
        try:
            with self._cond:
                self.connected = True
            self.metrics.connected(self.volume, True)
            log.info("mirror_connected", volume=self.volume, target=self.target, first_sequence=first)
            for reply in responses:
                self._acknowledged(reply.sequence)
            if self._running:
                raise StandbyError(detail="the standby ended the stream")
        finally:
            responses.cancel()

    def _acknowledged(self, sequence: int) -> None:
        with self._cond:
            while self._outstanding:
                seq, batch = next(iter(self._outstanding.items()))
                if seq > sequence:
                    break
                del self._outstanding[seq]
                self._acked_op = max(self._acked_op, batch.last_op)
            self._cond.notify_all()

    def _requests(self, stream_id: int, first: int) -> Iterator[bytes]:
        """The request side of one stream: `open`, the unacknowledged batches again, then new ones."""
        opening = replication_pb2.MirrorOpen(
            volume=self.volume, first_sequence=first, primary_id=self.primary_id
        )
        yield replication_pb2.MirrorRequest(open=opening).SerializeToString()
        with self._cond:
            resend = list(self._outstanding.values())
        for batch in resend:
            yield batch.message
        while True:
            with self._cond:
                while self._stream_id == stream_id and (
                    not self._pending or len(self._outstanding) >= self.window_batches
                ):
                    if not self._running and not self._pending:
                        return
                    self._cond.wait()
                if self._stream_id != stream_id:
                    return
                batch = self._form_batch()
            self.metrics.batch_sent(self.volume, batch.nbytes, batch.writes)
            yield batch.message

    def _form_batch(self) -> _Batch:
        """Take pending ops (under the lock) into the next batch."""
        ops: list[tuple[int, bytes | int]] = []
        nbytes = 0
        flush = False
        last = 0
        while self._pending:
            op = self._pending[0]
            size = len(op.data) if op.data is not None else op.zero
            if ops and nbytes + size > self.batch_bytes:
                break
            self._pending.popleft()
            last = op.number
            if op.barrier:
                flush = True
                break
            ops.append((op.offset, op.data if op.data is not None else op.zero))
            nbytes += size
        sequence = self._next_sequence
        self._next_sequence += 1
        message = b"".join(encode_batch(sequence, ops, flush))
        batch = _Batch(sequence, last, nbytes, len(ops), message)
        self._outstanding[sequence] = batch
        return batch


def _identity(message: bytes) -> bytes:
    return message


def _details(e: grpc.RpcError) -> str:
    details = e.details() if hasattr(e, "details") else None
    return str(details or e)

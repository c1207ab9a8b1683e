"""Mirroring one volume's changes, in order, to the standby over a gRPC `Mirror` stream.

Writers (the exported device) call `mark` first, then under their order lock `begin` before they write
locally and `submit_write`/`submit_zero` after, and finally `wait` for the acknowledgement their mode
asks for. Ops are coalesced
into numbered batches of up to `batch_bytes` when the stream can take one, so concurrent client writes
share messages; at most `window_batches` batches are unacknowledged. Nothing is ever reordered: ops
enter batches in submission order, batches carry consecutive numbers, the standby applies them in order.

The write-intent bitmap (`standbylib.bitmap`) keeps the standby recoverable without ever stalling the
primary for long:

* connected: `mark` marks the regions (durably) as in flight; the standby's acknowledgement releases
  them; a periodic flush barrier, once acknowledged, lets released regions be cleared;
* the link breaks, the standby stops answering for `ack_timeout` seconds, or it refuses a batch: every
  unacknowledged op is dropped and its regions become dirty; waiting writers return (their data is on
  the local volume and tracked); new writes only mark their regions dirty;
* reconnected (capped, jittered exponential backoff): the dirty regions are resent in the background
  while new writes flow (the replica is `inconsistent` meanwhile), then a batch marked `uptodate` ends
  the resync. A resync cut short resumes with what is still dirty; after a crash every bit left in the
  bitmap file is dirty.

Modes (DRBD protocols C/B/A): ``sync`` waits until the standby applied the write, ``received`` until it
received it, ``async`` not at all. A flush barrier always waits for the standby's durability (or the
drop of the connection).

Checksums (docs/REPLICATION.md, Verify): a *probe* op carries the digests of a range as read under the
order lock, so it travels in the stream at exactly the point of the read and the standby compares its
replica at that same point: writes going on never cause a false mismatch. The standby asks for a verify
on a reply (`MirrorReply.verify`; an idle stream sends an empty heartbeat batch every second so that a
reply comes); the mismatches come back on the probes' acknowledgements and are resent when a repair was
asked. A full sync of a replica that may hold old data probes each region instead of sending it, and
resends only the blocks that differ (DRBD's csums-alg).
"""

from __future__ import annotations

import bisect
import heapq
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from primary.generations import Generations
from standbylib.bitmap import WriteIntentBitmap
from standbylib.errors import StandbyError
from standbylib.rawfile import Buffer, is_zero
from standbylib.rpc.v1 import replication_pb2, replication_pb2_grpc
from standbylib.rpc.wire import Payload, Probe, Repair, block_digests, encode_batch, zero_digests
from standbylib.runtime import logs, rpc
from standbylib.runtime.tls import TlsFiles

log = logs.get(__name__)

MODES = ("sync", "received", "async")

#: Largest batch payload (bytes of data and zeroed ranges); a single larger write travels alone.
BATCH_BYTES = 4 << 20
#: Unacknowledged batches on the stream.
WINDOW_BATCHES = 4
#: Bytes of resync data in flight at most (new writes get the rest of the window).
RESYNC_WINDOW = 8 << 20
#: The Mirror method's full name (proto/v1/replication.proto).
MIRROR_METHOD = "/standbyappliance.v1.Replication/Mirror"
#: Reconnect backoff: first delay, cap.
BACKOFF_FIRST, BACKOFF_CAP = 0.2, 10.0
#: Seconds between flush barriers that let acknowledged regions of the bitmap be cleared.
CLEAN_INTERVAL = 1.0
#: Bytes of volume one probe covers, and bytes of volume covered by probes in flight at most.
PROBE_CHUNK = 1 << 20
PROBE_WINDOW = 64 << 20
#: Longest run of blocks a repair resends as one op.
REPAIR_RUN = 1 << 20


#: What a completion callback may return: called once per round of callbacks (see `Mirror.when_done`).
Finisher = Callable[[], None] | None


class MirrorMetrics(Protocol):
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None: ...
    def connected(self, volume: str, up: bool) -> None: ...
    def resynced(self, volume: str, nbytes: int) -> None: ...


class NullMirrorMetrics:
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        pass

    def connected(self, volume: str, up: bool) -> None:
        pass

    def resynced(self, volume: str, nbytes: int) -> None:
        pass


@dataclass(slots=True)
class _Op:
    number: int
    offset: int
    data: Buffer | None  # None: `zero` bytes of zeros, or a marker (barrier, uptodate) when zero == 0
    zero: int
    barrier: bool = False
    uptodate: bool = False
    # The range marked in flight in the bitmap that this op's acknowledgement releases (or its drop
    # makes dirty): a write's whole aligned range, carried by the last op of the write.
    release: tuple[int, int] | None = None
    resync: bool = False
    probe: Probe | None = None  # a probe (digests of a range), not a write
    verify_id: int = 0  # a write that repairs blocks this verify found out of sync
    heartbeat: bool = False  # nothing: an empty batch, so that the standby answers

    @property
    def length(self) -> int:
        if self.probe is not None:
            return len(self.probe.digests)
        return len(self.data) if self.data is not None else self.zero

    @property
    def payload(self) -> Payload:
        if self.probe is not None:
            return self.probe
        data = self.data if self.data is not None else self.zero
        return Repair(data, self.verify_id) if self.verify_id else data


@dataclass(slots=True)
class _Mismatch:
    """Blocks a probe found out of sync, to resend (`Mirror._repair`)."""

    offsets: list[int]
    verify_id: int
    # A full-sync probe's region: held in flight in the bitmap until the resend is acknowledged.
    hold: tuple[int, int] | None


@dataclass(slots=True)
class _Batch:
    sequence: int
    ops: list[_Op]
    nbytes: int
    message: bytes  # the serialised MirrorRequest
    sent: float = 0.0


class Mirror:
    """The ordered mirror of volume `volume` (`size` bytes in blocks of `block_size`) to `target`."""

    def __init__(
        self,
        target: str,
        volume: str,
        size: int,
        block_size: int,
        bitmap: WriteIntentBitmap,
        generations: Generations,
        *,
        mode: str = "sync",
        discard_standby_data: bool = False,
        primary_id: str | None = None,
        metrics: MirrorMetrics | None = None,
        batch_bytes: int = BATCH_BYTES,
        window_batches: int = WINDOW_BATCHES,
        ack_timeout: float = 10.0,
        tls: TlsFiles | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.target = target
        self.tls = tls
        self.volume = volume
        self.size = size
        self.block_size = block_size
        self.bitmap = bitmap
        self.generations = generations
        self._discard = discard_standby_data
        self._stream_generation = ""
        self.mode = mode
        self.primary_id = primary_id or str(uuid.uuid4())
        self.metrics: MirrorMetrics = metrics or NullMirrorMetrics()
        self.batch_bytes = batch_bytes
        self.window_batches = window_batches
        self.ack_timeout = ack_timeout
        # Lock order: _state_lock, then _cond, then the bitmap's lock. `_state_lock` makes "connected?"
        # and the bitmap mark one step, so no write is marked dirty after a resync pass looked.
        self._state_lock = threading.Lock()
        # One lock, three conditions: `_cond` wakes writers waiting for acknowledgements, `_work` the
        # sender waiting for ops or window, `_events` the threads waiting for a change of state.
        self._cond = threading.Condition()
        self._work = threading.Condition(self._cond)  # type: ignore[arg-type]
        self._events = threading.Condition(self._cond)  # type: ignore[arg-type]
        self._pending_bytes = 0
        self._pending: deque[_Op] = deque()
        self._outstanding: OrderedDict[int, _Batch] = OrderedDict()
        self._next_op = 1
        self._done_op = 0  # every op up to this one was acknowledged (applied) or dropped
        self._received_op = 0  # ... received (or better)
        self._next_sequence = 1
        self._stream_id = 0
        self._running = True
        self._resync_bytes = 0  # resync bytes in flight
        self._responses: Any = None  # the call's response iterator, to cancel it
        self.connected = False
        self.resyncing = False
        self.handshakes = 0
        self.resent_bytes = 0
        self.last_error = ""
        self._first_contact = threading.Event()
        self._lock: AbstractContextManager[object] = threading.Lock()
        self._read: Callable[[int, int], bytes] | None = None
        self._is_hole: Callable[[int, int], bool] = lambda offset, length: False
        # Checksums: whether the running full sync probes instead of sending (the replica may hold old
        # data); verify requests, the ids that asked for repair, and the mismatches to resend.
        self._probe_resync = False
        self._verify_next: tuple[int, bool] | None = None
        self._verify_ids: OrderedDict[int, bool] = OrderedDict()  # id -> repair, the latest few
        self._verify_thread: threading.Thread | None = None
        self._verify_counts: dict[int, list[int]] = {}  # id -> [mismatched blocks, repaired blocks]
        self._repairs: deque[_Mismatch] = deque()
        self._repair_lock = threading.Lock()
        self._heartbeat_sequence = 0  # the next batch number at the last tick
        self.verify_passes = 0
        self._thread = threading.Thread(target=self._run, name=f"mirror-{volume}", daemon=True)
        self._resync_thread = threading.Thread(target=self._resync_loop, name=f"resync-{volume}", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name=f"mirror-tick-{volume}", daemon=True)
        # Completion callbacks (`when_done`): (op number, tie-breaker, callback), a heap by op number.
        self._callbacks: list[tuple[int, int, Callable[[], Finisher]]] = []
        self._callback_count = 0
        self._completer = threading.Thread(target=self._complete_loop, name=f"complete-{volume}", daemon=True)

    def attach(
        self,
        order_lock: AbstractContextManager[object],
        read: Callable[[int, int], bytes],
        is_hole: Callable[[int, int], bool],
    ) -> None:
        """How the resync reads the local volume: under the writers' `order_lock`, so that a region read
        for resync is queued before any later write to it."""
        self._lock, self._read, self._is_hole = order_lock, read, is_hole

    def start(self) -> None:
        """Start mirroring; `attach` must have been called (the resync reads the local volume)."""
        if self._read is None:
            raise StandbyError(
                detail=f"mirror of {self.volume!r} started before it was attached to its volume"
            )
        self._thread.start()
        self._resync_thread.start()
        self._ticker.start()
        self._completer.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once the stream was first opened (writes from then on are mirrored)."""
        return self._first_contact.wait(timeout)

    # -- writers (under the device's order lock) ------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Before a write to ``[offset, offset+length)``, outside the order lock: its regions are marked
        in flight in the bitmap, durably, when this returns (concurrent writers share the syncs).

        Every `mark` is followed by one `begin` of the same range."""
        self.bitmap.mark(offset, length)

    def try_mark(self, offset: int, length: int) -> bool:
        """`mark` if that needs no bitmap sync (the regions are set and durable already); else False
        and nothing changed. Lets a caller that must not block (an NBD connection's reader) go on."""
        return self.bitmap.try_mark(offset, length)

    def begin(self, offset: int, length: int) -> bool:
        """Under the order lock, just before the local write of a range `mark` made durable.

        True when the write will be mirrored (then pass `tracked=True` to the submit), False when the
        standby is away and the region is only recorded as dirty.
        """
        with self._state_lock:
            live = self.connected
            if not live:
                self.bitmap.drop(offset, length)
        return live

    @contextmanager
    def failing(self, offset: int, length: int, tracked: bool) -> Iterator[None]:
        """Around the local write after `begin`: if it fails, the range (maybe partly written) is made
        dirty, so a later resync sends what the volume holds."""
        try:
            yield
        except BaseException:
            if tracked:
                self.bitmap.drop(offset, length)
            raise

    def submit_write(self, offset: int, data: Buffer, release: tuple[int, int] | None = None) -> int:
        """Queue a write (after `begin` returned True); `release` is the range `begin` marked, given
        with the last op of a client write."""
        return self._submit(_Op(0, offset, data, 0, release=release))

    def submit_zero(self, offset: int, length: int, release: tuple[int, int] | None = None) -> int:
        return self._submit(_Op(0, offset, None, length, release=release))

    def submit_barrier(self) -> int:
        """A flush barrier after every op submitted so far: acknowledged once the standby is durable."""
        return self._submit(_Op(0, 0, None, 0, barrier=True))

    def _submit(self, op: _Op) -> int:
        with self._cond:
            op.number = self._next_op
            self._next_op += 1
            if not self.connected or not self._running:
                self._drop_op(op)
                self._done_op = max(self._done_op, op.number)
                self._received_op = max(self._received_op, op.number)
                self._cond.notify_all()
                return op.number
            self._pending.append(op)
            self._pending_bytes += op.length
            if self._sendable():
                self._work.notify()
            return op.number

    def _sendable(self) -> bool:
        """Under the lock: whether the sender should form a batch now.

        With nothing unacknowledged, at once; otherwise only once a quarter batch is pending (or a
        marker that ends one), so that small writes arriving while a batch travels share the next one
        instead of each paying a message (the per-message cost dominates small writes).
        """
        if not self._pending:
            return False
        n = len(self._outstanding)
        if n == 0:
            return True
        if n >= self.window_batches:
            return False
        last = self._pending[-1]
        return self._pending_bytes >= self.batch_bytes // 4 or last.barrier or last.uptodate

    def _wake_all(self) -> None:
        """Under the lock: the state changed; every waiter looks again."""
        self._cond.notify_all()
        self._work.notify_all()
        self._events.notify_all()

    def wait(self, op: int, *, mode: str | None = None, timeout: float | None = None) -> None:
        """Block until op number `op` is acknowledged as `mode` asks (default: this mirror's mode), or
        dropped. ``async`` returns at once."""
        mode = mode or self.mode
        if mode == "async" or op == 0:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._received_op if mode == "received" else self._done_op) < op:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"op {op} of volume {self.volume!r} not acknowledged in time")
                self._cond.wait(remaining)

    def when_done(self, op: int, callback: Callable[[], Finisher]) -> None:
        """Call `callback` once op number `op` is acknowledged as this mirror's mode asks, or dropped:
        at once (in this thread) when it is already, else in the mirror's completion thread.

        The asynchronous form of `wait`, for callers that must not block; callbacks must be quick. A
        callback may return a finisher: the completion thread calls each distinct finisher once after
        a round of callbacks (an NBD connection sends the replies the round queued in one go)."""
        with self._cond:
            level = self._received_op if self.mode == "received" else self._done_op
            if self.mode != "async" and op > level and self._running:
                self._callback_count += 1
                heapq.heappush(self._callbacks, (op, self._callback_count, callback))
                return
        finisher = callback()
        if finisher is not None:
            finisher()

    def _complete_loop(self) -> None:
        """Run the callbacks of acknowledged (or dropped) ops, in op order, outside the lock."""
        while True:
            with self._cond:
                while True:
                    level = self._received_op if self.mode == "received" else self._done_op
                    if not self._running:
                        level = self._next_op  # stopping: nothing more will be acknowledged
                    if self._callbacks and self._callbacks[0][0] <= level:
                        break
                    if not self._running:
                        return
                    self._cond.wait()
                ready = []
                while self._callbacks and self._callbacks[0][0] <= level:
                    ready.append(heapq.heappop(self._callbacks)[2])
            finishers: dict[Callable[[], None], None] = {}
            for callback in ready:
                try:
                    finisher = callback()
                except Exception:  # a callback's failure must not stop the others
                    log.exception("completion_callback_failed", volume=self.volume)
                    continue
                if finisher is not None:
                    finishers[finisher] = None
            for finisher in finishers:
                try:
                    finisher()
                except Exception:
                    log.exception("completion_finisher_failed", volume=self.volume)

    def in_flight_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes + sum(b.nbytes for b in self._outstanding.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what was submitted is acknowledged (or `timeout` passes), then close the stream."""
        with self._cond:
            target = self._next_op - 1
            deadline = time.monotonic() + timeout
            while self._done_op < target and self.connected and time.monotonic() < deadline:
                self._cond.wait(0.1)
            self._running = False
            self._stream_id += 1
            self._wake_all()
        for t in (self._thread, self._resync_thread, self._ticker, self._completer):
            if t.is_alive():
                t.join(timeout)

    # -- dropping -----------------------------------------------------------------------------------

    def _drop_op(self, op: _Op) -> None:
        """Under the lock: `op` will never be acknowledged; its regions need a resync."""
        if op.release is not None:
            self.bitmap.drop(*op.release)
        if op.resync:
            self._resync_bytes -= op.length

    def _drop_all(self) -> None:
        """Under the lock: the stream is gone; every unacknowledged op is dropped and its writer released."""
        for batch in self._outstanding.values():
            for op in batch.ops:
                self._drop_op(op)
        for op in self._pending:
            self._drop_op(op)
        self._outstanding.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self._done_op = self._received_op = self._next_op - 1
        self._wake_all()

    # -- the stream -----------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        channel = rpc.channel(self.target, self.tls)
        try:
            while self._running:
                try:
                    if self._handshake(channel):
                        # A new, wiped or discarded replica: everything the primary holds must be sent.
                        self.bitmap.mark_dirty(0, self.size)
                        log.info("full_sync_needed", volume=self.volume, bytes=self.size)
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
                    self._events.wait_for(lambda: not self._running, pause)
        finally:
            channel.close()

    def _disconnected(self, code: str, details: str) -> None:
        with self._state_lock, self._cond:
            was = self.connected
            self.connected = False
            self.resyncing = False
            self._stream_id += 1
            self._drop_all()
            if was:
                # From now on the standby may lack writes: a new generation of the primary's data.
                self.generations.rotate()
        self.metrics.connected(self.volume, False)
        message = f"{code}: {details}"
        if was or message != self.last_error:
            log.warning(
                "mirror_disconnected",
                volume=self.volume,
                target=self.target,
                error=message,
                out_of_sync_bytes=self.bitmap.out_of_sync_bytes(),
            )
        self.last_error = message

    def _handshake(self, channel: grpc.Channel) -> bool:
        """Introduce the volume; True when the standby needs a full sync."""
        stub = replication_pb2_grpc.ReplicationStub(channel)
        reply = stub.Handshake(
            replication_pb2.HandshakeRequest(
                volume=self.volume,
                size=self.size,
                block_size=self.block_size,
                primary_id=self.primary_id,
                generation=self.generations.current,
                base_generation=self.generations.base,
                discard_standby_data=self._discard,
            ),
            timeout=30,
        )
        self.handshakes += 1
        self._discard = False  # once: a later reconnect must not throw the resynced data away again
        # A full sync of a replica that existed already: probe each region, resend what differs.
        self._probe_resync = bool(reply.full_sync and not reply.created)
        log.info(
            "handshake",
            volume=self.volume,
            target=self.target,
            standby_id=reply.standby_id,
            created=reply.created,
            full_sync=reply.full_sync,
            standby_generation=reply.generation,
        )
        return bool(reply.full_sync)

    def _stream(self, channel: grpc.Channel) -> None:
        # Batches are serialised by `wire.encode_batch` (protobuf's encoder is too slow for bulk data),
        # so this call passes request bytes through unchanged.
        mirror = channel.stream_stream(
            MIRROR_METHOD,
            request_serializer=_identity,
            response_deserializer=replication_pb2.MirrorReply.FromString,
        )
        with self._state_lock, self._cond:
            self._stream_id += 1
            stream_id = self._stream_id
            first = self._next_sequence
            # From here on writes are mirrored; whatever is dirty now is resent first.
            # What is dirty now is what this connection resends (counted here: the resync thread starts
            # clearing bits as soon as `connected` is set).
            dirty_bytes = self.bitmap.dirty() * self.bitmap.granularity
            resync = dirty_bytes > 0
            self.connected = True
            self.resyncing = resync
            self._stream_generation = self.generations.current
            if not resync:
                self.generations.agree(self._stream_generation)
            self._wake_all()
        self._first_contact.set()
        responses = mirror(self._requests(stream_id, first, resync))
        try:
            with self._cond:
                self._responses = responses
            self.metrics.connected(self.volume, True)
            log.info(
                "mirror_connected",
                volume=self.volume,
                target=self.target,
                mode=self.mode,
                resync_bytes=dirty_bytes,
            )
            for reply in responses:
                self._acknowledged(reply)
            if self._running:
                raise StandbyError(detail="the standby ended the stream")
        finally:
            with self._cond:
                self._responses = None
            responses.cancel()

    def _acknowledged(self, reply: replication_pb2.MirrorReply) -> None:
        with self._cond:
            if reply.received:
                batch = self._outstanding.get(reply.sequence)
                if batch is not None and batch.ops:
                    self._received_op = max(self._received_op, batch.ops[-1].number)
                    self._cond.notify_all()
                return
            if reply.mismatched or reply.HasField("verify"):
                self._checksum_reply(reply)
            while self._outstanding:
                seq, batch = next(iter(self._outstanding.items()))
                if seq > reply.sequence:
                    break
                del self._outstanding[seq]
                self.bitmap.release_all([op.release for op in batch.ops if op.release is not None])
                for op in batch.ops:
                    if op.resync:
                        self._resync_bytes -= op.length
                        self.metrics.resynced(self.volume, op.length)
                    if op.uptodate:
                        self.resyncing = False
                        self.generations.agree(self._stream_generation)
                        log.info("resync_done", volume=self.volume, generation=self._stream_generation)
                if batch.ops:
                    last = batch.ops[-1].number
                    self._done_op = max(self._done_op, last)
                    self._received_op = max(self._received_op, last)
            self._cond.notify_all()
            if self._sendable():
                self._work.notify()

    def _requests(self, stream_id: int, first: int, resync: bool) -> Iterator[bytes]:
        """The request side of one stream: `open`, then batches as the window allows."""
        opening = replication_pb2.MirrorOpen(
            volume=self.volume,
            first_sequence=first,
            primary_id=self.primary_id,
            received_acks=self.mode == "received",
            resync=resync,
            generation=self._stream_generation,
        )
        yield replication_pb2.MirrorRequest(open=opening).SerializeToString()
        while True:
            with self._cond:
                while self._stream_id == stream_id and not self._sendable():
                    if not self._running and not self._pending:
                        return
                    self._work.wait()
                if self._stream_id != stream_id:
                    return
                batch = self._form_batch()
            self.metrics.batch_sent(self.volume, batch.nbytes, len(batch.ops))
            yield batch.message

    def _form_batch(self) -> _Batch:
        """Take pending ops (under the lock) into the next batch."""
        ops: list[_Op] = []
        writes: list[tuple[int, Payload]] = []
        nbytes = 0
        flush = uptodate = False
        while self._pending:
            op = self._pending[0]
            if ops and nbytes + op.length > self.batch_bytes:
                break
            self._pending.popleft()
            self._pending_bytes -= op.length
            ops.append(op)
            if op.barrier or op.uptodate:
                flush, uptodate = op.barrier, op.uptodate
                break
            if op.heartbeat:
                continue
            writes.append((op.offset, op.payload))
            nbytes += op.length
        sequence = self._next_sequence
        self._next_sequence += 1
        message = b"".join(encode_batch(sequence, writes, flush, uptodate))
        batch = _Batch(sequence, ops, nbytes, message, time.monotonic())
        self._outstanding[sequence] = batch
        return batch

    # -- resync -------------------------------------------------------------------------------------

    def _resync_loop(self) -> None:
        """Send the dirty regions while connected, then mark the replica up to date."""
        while self._running:
            with self._cond:
                self._events.wait_for(lambda: not self._running or (self.connected and self.resyncing), 1.0)
                if not self._running or not (self.connected and self.resyncing):
                    continue
                stream_id = self._stream_id
            try:
                self._resync_pass(stream_id)
            except StandbyError as e:
                log.warning("resync_interrupted", volume=self.volume, error=str(e))

    def _resync_pass(self, stream_id: int) -> None:
        g = self.bitmap.granularity
        started = time.monotonic()
        sent = 0
        # A full sync of a replica that may hold old data sends probes of the regions that are not holes;
        # the blocks that differ come back on the acknowledgements and are resent (`_repair`), before the
        # `uptodate` marker.
        probing = self._probe_resync
        probed = 0
        probes: deque[tuple[int, int]] = deque()  # (op number, bytes covered) of probes in flight
        covered = 0
        repaired_before = self._verify_counts.setdefault(0, [0, 0])[1]
        while True:
            regions = list(self.bitmap.dirty_regions())
            if not regions:
                break
            last = 0
            for region in regions:
                while covered >= PROBE_WINDOW:
                    number, nbytes = probes.popleft()
                    self.wait(number, mode="sync")
                    covered -= nbytes
                with self._cond:
                    self._cond.wait_for(
                        lambda: (
                            self._stream_id != stream_id
                            or not self._running
                            or self._resync_bytes < RESYNC_WINDOW
                        )
                    )
                    if self._stream_id != stream_id or not self._running:
                        return
                with self._lock:
                    with self._cond:
                        if self._stream_id != stream_id or not self.connected:
                            return
                    offset, length = self.bitmap.resync_begin(region)
                    span = (offset, length)
                    if self._is_hole(offset, length):
                        op = _Op(0, offset, None, length, resync=True, release=span)
                    else:
                        assert self._read is not None
                        data = self._read(offset, length)
                        op = _Op(0, offset, data, 0, resync=True, release=span)
                        if probing:
                            digests = (
                                zero_digests(length, self.block_size)
                                if is_zero(data)
                                else block_digests(data, self.block_size)
                            )
                            op = _Op(0, offset, None, 0, release=span, probe=Probe(length, digests))
                        elif is_zero(data):
                            op = _Op(0, offset, None, length, resync=True, release=span)
                    if op.probe is None:
                        with self._cond:
                            self._resync_bytes += length
                    last = self._submit(op)
                if op.probe is not None:
                    probes.append((last, length))
                    covered += length
                    probed += length
                else:
                    sent += length
                if self._repairs:
                    self._repair()
            if probing and last:
                # Every probe answered (or dropped): resend what they found before the marker.
                self.wait(last, mode="sync")
                with self._cond:
                    if self._stream_id != stream_id or not self._running:
                        return
                self._repair()
        # Everything dirty was sent: once it is applied the replica is up to date.
        with self._lock:
            marker = self._submit(_Op(0, 0, None, 0, uptodate=True))
        self.wait(marker, mode="sync")
        with self._cond:
            self.resent_bytes += sent
        seconds = round(time.monotonic() - started, 3)
        if probing:
            repaired = (self._verify_counts[0][1] - repaired_before) * self.block_size
            log.info(
                "resync_sent",
                volume=self.volume,
                bytes=sent + repaired,
                seconds=seconds,
                granularity=g,
                checksummed_bytes=probed,
                resent_after_checksum_bytes=repaired,
                skipped_bytes=probed - repaired,
            )
        else:
            log.info("resync_sent", volume=self.volume, bytes=sent, seconds=seconds, granularity=g)

    # -- verify and checksums -----------------------------------------------------------------------

    def _checksum_reply(self, reply: replication_pb2.MirrorReply) -> None:
        """Under the lock, before the acknowledgement of batch `reply.sequence` is processed: queue the
        resend of the blocks its probes found out of sync; start a verify the standby asks for."""
        if reply.HasField("verify") and reply.verify.id:
            self._verify_requested(reply.verify.id, reply.verify.repair)
        batch = self._outstanding.get(reply.sequence)
        if not reply.mismatched or batch is None:
            return
        probes = sorted((op.offset, i) for i, op in enumerate(batch.ops) if op.probe is not None)
        found: dict[int, list[int]] = {}
        starts = [start for start, _ in probes]
        for offset in reply.mismatched:
            k = bisect.bisect_right(starts, offset) - 1
            if k < 0:
                continue
            op = batch.ops[probes[k][1]]
            assert op.probe is not None
            if offset < op.offset + op.probe.length:
                found.setdefault(probes[k][1], []).append(offset)
        for index, offsets in found.items():
            op = batch.ops[index]
            assert op.probe is not None
            vid = op.probe.verify_id
            counts = self._verify_counts.setdefault(vid, [0, 0])
            counts[0] += len(offsets)
            if vid == 0 and op.release is not None:
                # A full-sync probe: its region stays in flight (one more hold than the acknowledgement
                # releases) until the resend is acknowledged, or becomes dirty if it is dropped.
                for region in self.bitmap.regions(*op.release):
                    self.bitmap.resync_begin(region)
                self._repairs.append(_Mismatch(sorted(offsets), 0, op.release))
            elif vid and self._verify_ids.get(vid):
                self._repairs.append(_Mismatch(sorted(offsets), vid, None))

    def _verify_requested(self, verify_id: int, repair: bool) -> None:
        """Under the lock: run a verify pass (after the running one, which it cuts short)."""
        if verify_id in self._verify_ids:
            return  # asked already
        self._verify_ids[verify_id] = repair
        while len(self._verify_ids) > 16:
            self._verify_ids.popitem(last=False)
        self._verify_next = (verify_id, repair)
        if self._verify_thread is None or not self._verify_thread.is_alive():
            self._verify_thread = threading.Thread(
                target=self._verify_loop, name=f"verify-{self.volume}", daemon=True
            )
            self._verify_thread.start()
        self._cond.notify_all()

    def _verify_loop(self) -> None:
        while True:
            with self._cond:
                request, self._verify_next = self._verify_next, None
                if request is None or not self._running or not self.connected:
                    self._verify_thread = None
                    return
                stream_id = self._stream_id
            try:
                self._verify_pass(request[0], request[1], stream_id)
            except Exception as e:  # a failed pass must not kill the thread silently
                log.exception("verify_pass_failed", volume=self.volume, error=repr(e))

    def _verify_pass(self, verify_id: int, repair: bool, stream_id: int) -> None:
        """Probe the whole volume, chunk by chunk, each read under the order lock (so each probe sits in
        the stream exactly where its read happened); with `repair`, resend what differs."""
        bs = self.block_size
        chunk = max(PROBE_CHUNK, bs)
        started = time.monotonic()
        self.verify_passes += 1
        log.info("verify_pass_started", volume=self.volume, id=verify_id, repair=repair, bytes=self.size)
        counts = self._verify_counts.setdefault(verify_id, [0, 0])
        probes: deque[tuple[int, int]] = deque()
        covered = last = 0
        for offset in range(0, self.size, chunk):
            length = min(chunk, self.size - offset)
            while covered >= PROBE_WINDOW:
                number, nbytes = probes.popleft()
                self.wait(number, mode="sync")
                covered -= nbytes
            with self._lock:
                with self._cond:
                    stopped = (
                        self._stream_id != stream_id
                        or not self._running
                        or not self.connected
                        or self._verify_next is not None
                    )
                if stopped:
                    with self._cond:
                        self._verify_counts.pop(verify_id, None)
                    log.warning("verify_pass_stopped", volume=self.volume, id=verify_id, checked=offset)
                    return
                if self._is_hole(offset, length):
                    digests = zero_digests(length, bs)
                else:
                    assert self._read is not None
                    digests = block_digests(self._read(offset, length), bs)
                last = self._submit(_Op(0, offset, None, 0, probe=Probe(length, digests, verify_id)))
            probes.append((last, length))
            covered += length
            if self._repairs:
                self._repair()
        self.wait(last, mode="sync")
        self._repair()
        with self._cond:
            mismatched, repaired = self._verify_counts.pop(verify_id, counts)
        log.info(
            "verify_pass_done",
            volume=self.volume,
            id=verify_id,
            mismatched_blocks=mismatched,
            seconds=round(time.monotonic() - started, 3),
        )
        if repair and mismatched:
            log.info("verify_repair", volume=self.volume, id=verify_id, blocks=repaired, bytes=repaired * bs)

    def _repair(self) -> None:
        """Resend the blocks probes found out of sync (queued by `_checksum_reply`), read under the order
        lock, so the resend carries the volume's current data at its point of the stream."""
        with self._repair_lock:
            while True:
                with self._cond:
                    if not self._repairs:
                        return
                    item = self._repairs.popleft()
                self._repair_one(item)

    def _repair_one(self, item: _Mismatch) -> None:
        bs = self.block_size
        runs: list[tuple[int, int]] = []
        for offset in item.offsets:
            if runs and runs[-1][0] + runs[-1][1] == offset and runs[-1][1] < REPAIR_RUN:
                runs[-1] = (runs[-1][0], runs[-1][1] + bs)
            else:
                runs.append((offset, bs))
        if item.hold is None:
            for offset, length in runs:
                self.bitmap.mark(offset, length)  # durable before the resend, like a client write
        with self._cond:
            self._cond.wait_for(
                lambda: not self.connected or not self._running or self._resync_bytes < RESYNC_WINDOW
            )
        blocks = 0
        with self._lock:
            spans: list[tuple[int, int, tuple[int, int] | None]] = []
            if item.hold is not None:
                if self.begin(*item.hold):
                    last = len(runs) - 1
                    spans = [(o, n, item.hold if i == last else None) for i, (o, n) in enumerate(runs)]
            else:
                spans = [(o, n, (o, n)) for o, n in runs if self.begin(o, n)]
            for offset, length, release in spans:
                assert self._read is not None
                data = self._read(offset, length)
                op = _Op(0, offset, data, 0, release=release, resync=True, verify_id=item.verify_id)
                if is_zero(data):
                    op = _Op(0, offset, None, length, release=release, resync=True, verify_id=item.verify_id)
                with self._cond:
                    self._resync_bytes += length
                    self.resent_bytes += length
                    blocks += length // bs
                self._submit(op)
        with self._cond:
            self._verify_counts.setdefault(item.verify_id, [0, 0])[1] += blocks

    # -- periodic work ------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        """Clear acknowledged regions once a flush barrier made them durable; time out a silent standby."""
        while self._running:
            with self._cond:
                self._events.wait_for(lambda: not self._running, CLEAN_INTERVAL)
                if not self._running:
                    return
                oldest = next(iter(self._outstanding.values()), None)
                silent = oldest is not None and time.monotonic() - oldest.sent > self.ack_timeout
                responses = self._responses
                connected = self.connected
            if silent and responses is not None:
                log.warning("standby_not_answering", volume=self.volume, seconds=self.ack_timeout)
                responses.cancel()
                continue
            if connected and self.bitmap.wants_clean():
                sent_at = time.monotonic()
                op = self.submit_barrier()
                try:
                    self.wait(op, mode="sync", timeout=self.ack_timeout)
                except TimeoutError:
                    continue
                with self._cond:
                    still = self.connected
                if still:
                    self.bitmap.clean(released_before=sent_at)
            self._heartbeat(connected)

    def _heartbeat(self, connected: bool) -> None:
        """From the tick loop: an empty batch when nothing was sent since the last tick (so the standby
        can answer, e.g. with a verify command, and a silent one is noticed); resends left over by a
        stream that ended become dirty."""
        with self._cond:
            idle = (
                connected
                and not self._outstanding
                and not self._pending
                and self._next_sequence == self._heartbeat_sequence
            )
            self._heartbeat_sequence = self._next_sequence
            leftover = bool(self._repairs) and not self.connected
        if idle:
            self._submit(_Op(0, 0, None, 0, heartbeat=True))
        if leftover and self._repair_lock.acquire(blocking=False):
            self._repair_lock.release()
            self._repair()


def _identity(message: bytes) -> bytes:
    return message


def _details(e: grpc.RpcError) -> str:
    details = e.details() if hasattr(e, "details") else None
    return str(details or e)

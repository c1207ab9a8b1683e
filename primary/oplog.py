"""The op log: one volume's changes on their way to the standby, in order, and who waits for them.

Every change the primary mirrors is an *op* (a write, a zeroed range, a flush barrier, a probe of
checksums, the end-of-resync marker) numbered in submission order. Pending ops are cut into numbered
batches of up to `batch_bytes` when the window lets one go; at most `window_batches` batches are
unacknowledged. Nothing is ever reordered: ops enter batches in submission order, batches carry
consecutive numbers, the standby applies them in order. This module is the only owner of that order.

Two ways out (`primary.stream` decides which): on the data channel a batch is formed and sent by the
thread that made it sendable (a writer, or the thread that processed an acknowledgement: `pump`),
under `send_lock`; on the gRPC stream its request iterator waits on `work` and forms the batches.

Acknowledgements (`acknowledged`, `received`) release the batches' ranges in the write-intent bitmap
(one call per batch), advance the levels `wait` and `when_done` look at, and return the callbacks they
made ready, which the acknowledging thread runs (`run_callbacks`): no hand-off to another thread. When
the stream ends every unacknowledged op is dropped (`close`): its ranges become dirty in the bitmap and
its writers are released (their data is on the local volume and tracked for the next resync).

Lock order: the mirror's state lock, then `cond`, then the bitmap's lock; `send_lock` is taken before
`cond`, never while holding it.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from primary.bitmap import WriteIntentBitmap
from primary.datalink import DataLink
from standbylib.checksums import Payload, Probe, Repair
from standbylib.rawfile import Buffer
from standbylib.rpc.wire import encode_batch
from standbylib.runtime import logs

log = logs.get(__name__)

#: Largest batch payload (bytes of data and zeroed ranges); a single larger write travels alone.
BATCH_BYTES = 4 << 20
#: Unacknowledged batches on the stream.
WINDOW_BATCHES = 4
#: On the data channel (about 13 us of CPU per message instead of 250 on gRPC), up to this many batches
#: are sent as soon as ops are pending (a burst of client requests shares one: `send=False`), so the
#: standby applies one while the next travels.
CHANNEL_EAGER = 4

#: Bytes of resync data in flight at most (new writes get the rest of the window).
RESYNC_WINDOW = 8 << 20

#: What a completion callback may return: called once per round of callbacks (see `OpLog.when_done`).
Finisher = Callable[[], None] | None


class BatchMetrics(Protocol):
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None: ...
    def resynced(self, volume: str, nbytes: int) -> None: ...


@dataclass(slots=True)
class Op:
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
class Batch:
    sequence: int
    ops: list[Op]
    nbytes: int
    pieces: list[Buffer]  # the serialised MirrorRequest, in pieces (the data is referenced, not copied)
    sent: float = 0.0


class OpLog:
    """The ordered ops of volume `volume` between their submission and their acknowledgement.

    `cond` guards everything here; the mirror shares it for the state that must change in one step
    with the log (a stream opening or ending). Its other conditions: `work` wakes the gRPC request
    iterator waiting for a batch, `events` the threads waiting for a change of state, `drops` the
    completion thread (`complete_loop`), which runs only the callbacks of dropped ops.
    """

    def __init__(
        self,
        volume: str,
        bitmap: WriteIntentBitmap,
        metrics: BatchMetrics,
        *,
        mode: str,
        batch_bytes: int = BATCH_BYTES,
        window_batches: int = WINDOW_BATCHES,
    ) -> None:
        self.volume = volume
        self.bitmap = bitmap
        self.metrics = metrics
        self.mode = mode
        self.batch_bytes = batch_bytes
        self.window_batches = window_batches
        self.cond = threading.Condition()
        self.work = threading.Condition(self.cond)  # type: ignore[arg-type]
        self.events = threading.Condition(self.cond)  # type: ignore[arg-type]
        self.drops = threading.Condition(self.cond)  # type: ignore[arg-type]
        # Batches go out on the data channel `link` in order: formed and sent under `send_lock`.
        self.send_lock = threading.Lock()
        self.link: DataLink | None = None
        self._pending: deque[Op] = deque()
        self._pending_bytes = 0
        self._outstanding: OrderedDict[int, Batch] = OrderedDict()
        self._next_op = 1
        self.done_op = 0  # every op up to this one was acknowledged (applied) or dropped
        self.received_op = 0  # ... received (or better)
        self.next_sequence = 1
        # Each stream that opens gets a new number; so does each end (a stale waiter sees the change).
        self.stream_id = 0
        self.running = True
        self.live = False  # a stream is open: submitted ops are queued, else dropped at once
        self.resync_bytes = 0  # resync bytes in flight
        # What the running resync has still to send, as the tick thread last counted it (0: none); each
        # batch carries it, for the standby's status.
        self.resync_remaining = 0
        self.resent_bytes = 0  # bytes resent by resyncs and repairs, in all
        # Completion callbacks (`when_done`): (op number, tie-breaker, callback), a heap by op number.
        self._callbacks: list[tuple[int, int, Callable[[], Finisher]]] = []
        self._callback_count = 0

    # -- submitting ---------------------------------------------------------------------------------

    def submit(self, op: Op, send: bool = True) -> int:
        """Number `op` and queue it (or drop it at once when no stream is open); its number. Without
        `send` it waits for `send_pending` (or the next acknowledgement), so a burst shares a batch."""
        with self.cond:
            op.number = self._next_op
            self._next_op += 1
            if not self.live or not self.running:
                self._drop_op(op)
                self.done_op = max(self.done_op, op.number)
                self.received_op = max(self.received_op, op.number)
                self.cond.notify_all()
                return op.number
            self._pending.append(op)
            self._pending_bytes += op.length
            if not send or not self.sendable():
                return op.number
            if self.link is None:
                self.work.notify()
                return op.number
        self.pump()
        return op.number

    def send_pending(self) -> None:
        """Send what can go now (the ops queued without `send`)."""
        with self.cond:
            if not self.sendable():
                return
            if self.link is None:
                self.work.notify()
                return
        self.pump()

    def pump(self) -> None:
        """Send the batches that can go now on the data channel, in order (see `send_lock`). A thread
        that finds another sending leaves its ops to it; the sender looks again before it leaves."""
        while True:
            if not self.send_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self.cond:
                        link = self.link
                        if link is None or not self.sendable():
                            break
                        batch = self.form_batch()
                    self.metrics.batch_sent(self.volume, batch.nbytes, len(batch.ops))
                    try:
                        link.send(batch.pieces)
                    except (OSError, ValueError):
                        link.cancel()  # the acknowledging thread sees the channel end and drops
                        return
            finally:
                self.send_lock.release()
            with self.cond:
                if self.link is None or not self.sendable():
                    return

    def sendable(self) -> bool:
        """Under the lock: whether a batch should be formed now.

        With nothing unacknowledged, at once; otherwise only once a quarter batch is pending (or a
        marker that ends one), so that small writes arriving while a batch travels share the next one
        instead of each paying a message (the per-message cost dominates small writes). On the data
        channel, whose messages are cheap, up to `CHANNEL_EAGER` batches go at once.
        """
        if not self._pending:
            return False
        n = len(self._outstanding)
        if n == 0:
            return True
        if n >= self.window_batches:
            return False
        if self.link is not None and n < CHANNEL_EAGER:
            return True
        last = self._pending[-1]
        return self._pending_bytes >= self.batch_bytes // 4 or last.barrier or last.uptodate

    def form_batch(self) -> Batch:
        """Under the lock: take pending ops into the next batch, now unacknowledged."""
        ops: list[Op] = []
        writes: list[tuple[int, Payload]] = []
        nbytes = 0
        flush = uptodate = False
        pending = self._pending
        while pending:
            op = pending[0]
            if ops and nbytes + op.length > self.batch_bytes:
                break
            pending.popleft()
            self._pending_bytes -= op.length
            ops.append(op)
            if op.barrier or op.uptodate:
                flush, uptodate = op.barrier, op.uptodate
                break
            if op.heartbeat:
                continue
            writes.append((op.offset, op.payload))
            nbytes += op.length
        sequence = self.next_sequence
        self.next_sequence += 1
        pieces = encode_batch(sequence, writes, flush, uptodate, self.resync_remaining)
        batch = Batch(sequence, ops, nbytes, pieces, time.monotonic())
        self._outstanding[sequence] = batch
        return batch

    def resync_taken(self, nbytes: int) -> None:
        """The resync took `nbytes` of dirty regions to send: what the next batches report as left."""
        self.resync_remaining = max(0, self.resync_remaining - nbytes)

    def add_resync(self, nbytes: int) -> None:
        """`nbytes` more resync bytes are about to be submitted (see `resync_room`)."""
        with self.cond:
            self.resync_bytes += nbytes

    def resync_room(self, stream_id: int) -> bool:
        """Wait until the resync window has room; False when stream `stream_id` is gone."""
        with self.cond:
            self.cond.wait_for(lambda: not self.current(stream_id) or self.resync_bytes < RESYNC_WINDOW)
            return self.current(stream_id)

    def current(self, stream_id: int) -> bool:
        """Under the lock: stream `stream_id` is the open one (its ops are queued, not dropped)."""
        return self.stream_id == stream_id and self.live and self.running

    # -- waiting ------------------------------------------------------------------------------------

    def level(self, mode: str | None = None) -> int:
        """Under the lock: every op up to this number is acknowledged as `mode` asks (or dropped)."""
        return self.received_op if (mode or self.mode) == "received" else self.done_op

    def wait(self, op: int, *, mode: str | None = None, timeout: float | None = None) -> None:
        """Block until op number `op` is acknowledged as `mode` asks (default: the log's mode), or
        dropped. ``async`` returns at once."""
        mode = mode or self.mode
        if mode == "async" or op == 0:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.level(mode) < op:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"op {op} of volume {self.volume!r} not acknowledged in time")
                self.cond.wait(remaining)

    def when_done(self, op: int, callback: Callable[[], Finisher]) -> None:
        """Call `callback` once op number `op` is acknowledged as the mode asks, or dropped: at once
        (in this thread) when it is already, else in the thread that processes the acknowledgement
        (or, for a drop, in the completion thread).

        The asynchronous form of `wait`, for callers that must not block; callbacks must be quick. A
        callback may return a finisher: each distinct finisher is called once after a round of
        callbacks (an NBD connection sends the replies the round queued in one go)."""
        with self.cond:
            if self.mode != "async" and op > self.level() and self.running:
                self._callback_count += 1
                heapq.heappush(self._callbacks, (op, self._callback_count, callback))
                return
        finisher = callback()
        if finisher is not None:
            finisher()

    def complete_loop(self) -> None:
        """The completion thread: run the callbacks of dropped ops (and of every op once stopping)."""
        while True:
            with self.cond:
                while True:
                    level = self.level() if self.running else self._next_op  # stopping: all of them
                    if self._callbacks and self._callbacks[0][0] <= level:
                        break
                    if not self.running:
                        return
                    self.drops.wait()
                ready = self.take_ready(level)
            self.run_callbacks(ready)

    def take_ready(self, level: int | None = None) -> list[Callable[[], Finisher]]:
        """Under the lock: the callbacks whose ops are acknowledged as the mode asks (up to `level`)."""
        if level is None:
            level = self.level()
        ready = []
        callbacks = self._callbacks
        while callbacks and callbacks[0][0] <= level:
            ready.append(heapq.heappop(callbacks)[2])
        return ready

    def run_callbacks(self, ready: list[Callable[[], Finisher]]) -> None:
        """Outside the lock: run `ready` in op order, then each distinct finisher they returned once."""
        if not ready:
            return
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

    # -- acknowledgements ---------------------------------------------------------------------------

    def received(self, sequence: int) -> None:
        """Under the lock: the standby received batch `sequence` (``received`` mode)."""
        batch = self._outstanding.get(sequence)
        if batch is not None and batch.ops:
            self.received_op = max(self.received_op, batch.ops[-1].number)
            self.cond.notify_all()

    def acknowledged(self, sequence: int) -> bool:
        """Under the lock: the standby applied every batch up to `sequence`: their ranges are released
        in the bitmap, their ops done. True when the end-of-resync marker was among them."""
        uptodate = False
        outstanding = self._outstanding
        while outstanding:
            seq, batch = next(iter(outstanding.items()))
            if seq > sequence:
                break
            del outstanding[seq]
            self.bitmap.release_all([op.release for op in batch.ops if op.release is not None])
            for op in batch.ops:
                if op.resync:
                    self.resync_bytes -= op.length
                    self.metrics.resynced(self.volume, op.length)
                uptodate = uptodate or op.uptodate
            if batch.ops:
                last = batch.ops[-1].number
                self.done_op = max(self.done_op, last)
                self.received_op = max(self.received_op, last)
        self.cond.notify_all()
        if self.link is None and self.sendable():
            self.work.notify()
        return uptodate

    def batch(self, sequence: int) -> Batch | None:
        """Under the lock: unacknowledged batch `sequence`, if it is."""
        return self._outstanding.get(sequence)

    def oldest_sent(self) -> float | None:
        """Under the lock: when the oldest unacknowledged batch was sent (None: none is)."""
        oldest = next(iter(self._outstanding.values()), None)
        return None if oldest is None else oldest.sent

    def pending(self) -> bool:
        """Under the lock: ops wait for a batch."""
        return bool(self._pending)

    def idle(self) -> bool:
        """Under the lock: nothing pending or unacknowledged."""
        return not self._outstanding and not self._pending

    def in_flight_bytes(self) -> int:
        with self.cond:
            return self._pending_bytes + sum(b.nbytes for b in self._outstanding.values())

    def last_submitted(self) -> int:
        """Under the lock: the number of the last op submitted."""
        return self._next_op - 1

    # -- streams ------------------------------------------------------------------------------------

    def open(self) -> tuple[int, int]:
        """Under the lock: a stream opened; ops are queued from now on. Its id and first batch number."""
        self.stream_id += 1
        self.live = True
        self.wake_all()
        return self.stream_id, self.next_sequence

    def attach_link(self, link: DataLink, stream_id: int) -> bool:
        """Batches of stream `stream_id` go on `link` from now on; False (nothing changed) when that
        stream is over."""
        with self.cond:
            if self.stream_id != stream_id or not self.running:
                return False
            self.link = link
            return True

    def detach_link(self) -> None:
        """No batch goes on the data channel any more (after its last send: taken under `send_lock`)."""
        with self.send_lock, self.cond:
            self.link = None

    def close(self) -> None:
        """Under the lock: the stream is gone: every unacknowledged op is dropped (its regions dirty in
        the bitmap), and every writer waiting for one released."""
        self.live = False
        self.stream_id += 1
        for batch in self._outstanding.values():
            for op in batch.ops:
                self._drop_op(op)
        for op in self._pending:
            self._drop_op(op)
        self._outstanding.clear()
        self._pending.clear()
        self._pending_bytes = 0
        self.done_op = self.received_op = self._next_op - 1
        self.wake_all()

    def stop(self) -> DataLink | None:
        """Under the lock: no more acknowledgements will come; the waiters and the completion thread
        finish. The data channel in use, to be cancelled by the caller."""
        self.running = False
        self.stream_id += 1
        self.wake_all()
        return self.link

    def wake_all(self) -> None:
        """Under the lock: the state changed; every waiter looks again."""
        self.cond.notify_all()
        self.work.notify_all()
        self.events.notify_all()
        self.drops.notify_all()

    def _drop_op(self, op: Op) -> None:
        """Under the lock: `op` will never be acknowledged; its regions need a resync."""
        if op.release is not None:
            self.bitmap.drop(*op.release)
        if op.resync:
            self.resync_bytes -= op.length

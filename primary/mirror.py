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
* reconnected: the dirty regions are resent in the background while new writes flow (the replica is
  `inconsistent` meanwhile), holes and zeroed ranges first (on a full standby disk they make the room
  the data needs), then a batch marked `uptodate` ends the resync. A resync cut short resumes with what
  is still dirty; after a crash every bit left in the bitmap file is dirty.

Reconnects back off exponentially (jittered, 0.2 s growing threefold up to 30 s), and the backoff is
reset only by a healthy stream: one whose batches the standby acknowledged and that either had nothing
to resend, completed its resync, or stayed up acknowledging for `STABLE_SECONDS`. A standby that takes
the handshake but refuses every batch (a full disk, ``--on-full defer``) thus gets a few attempts a
minute, not several a second. `state` (and the `connected` metric) says ``connected`` only for such a
healthy stream; the logs change once per state change: a repeated identical failure is logged once (and
again, with the attempts so far and the next retry, when the error changes), the recovery once.

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
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from primary.datalink import ChannelError, DataLink
from primary.generations import Generations, StateWriteError
from standbylib.bitmap import WriteIntentBitmap
from standbylib.errors import DeviceError, StandbyError
from standbylib.rawfile import Buffer, is_zero
from standbylib.rpc.v1 import replication_pb2, replication_pb2_grpc
from standbylib.rpc.wire import Payload, Probe, Repair, block_digests, encode_batch, zero_digests
from standbylib.runtime import logs, rpc
from standbylib.runtime.tls import TlsFiles

log = logs.get(__name__)

MODES = ("sync", "received", "async")
#: How batches travel: on the standby's data channel when it offers one, else on the gRPC stream
#: (auto); on the data channel only; on the gRPC stream only.
TRANSPORTS = ("auto", "channel", "grpc")

#: Largest batch payload (bytes of data and zeroed ranges); a single larger write travels alone.
BATCH_BYTES = 4 << 20
#: Unacknowledged batches on the stream.
WINDOW_BATCHES = 4
#: On the data channel (about 13 us of CPU per message instead of 250), up to this many batches are
#: sent as soon as ops are pending (a burst of client requests shares one: `send=False`), so the
#: standby applies one while the next travels.
CHANNEL_EAGER = 4
#: Bytes of resync data in flight at most (new writes get the rest of the window).
RESYNC_WINDOW = 8 << 20
#: The Mirror method's full name (proto/v1/replication.proto).
MIRROR_METHOD = "/standbyappliance.v1.Replication/Mirror"
#: Reconnect backoff: first delay, growth factor, cap; each pause is drawn from [delay / 2, delay].
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_CAP = 0.2, 3.0, 30.0
#: Seconds a stream that is still resending must stay up, acknowledged, to count as healthy.
STABLE_SECONDS = 30.0
#: Replication states (`Mirror.state`): no healthy stream yet; a healthy stream; the link or the standby
#: is down; the standby refuses (its batches or the handshake); the volume file is not the one its
#: generations belong to (no attempt is made).
STATES = ("connecting", "connected", "disconnected", "refused", "blocked")
#: gRPC statuses that say the link or the standby is down rather than that the standby refused.
_TRANSPORT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_TRANSPORT_NAMES = frozenset(code.name for code in _TRANSPORT)
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
    def set_state(self, volume: str, state: str) -> None: ...
    def refused(self, volume: str, reason: str) -> None: ...
    def state_write_failed(self, volume: str, file: str) -> None: ...
    def resynced(self, volume: str, nbytes: int) -> None: ...


class NullMirrorMetrics:
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        pass

    def connected(self, volume: str, up: bool) -> None:
        pass

    def set_state(self, volume: str, state: str) -> None:
        pass

    def refused(self, volume: str, reason: str) -> None:
        pass

    def state_write_failed(self, volume: str, file: str) -> None:
        pass

    def resynced(self, volume: str, nbytes: int) -> None:
        pass


class BitmapWriteFailed(DeviceError):
    """A client write was refused: its regions could not be marked durably in the write-intent bitmap."""

    template = (
        "volume {volume!r}: the write was not done: it could not be marked in the write-intent bitmap "
        "{path} ({detail})"
    )


def describe(error: BaseException) -> str:
    """`error` as a short line: a device error as ``PATH: DETAIL`` (without the advice of its template,
    which speaks of the standby's data)."""
    if isinstance(error, DeviceError) and "path" in error.fields and "detail" in error.fields:
        return f"{error.fields['path']}: {error.fields['detail']}"
    return str(error)


class StateReport:
    """Failures to write the primary's own state (`kind`: bitmap, generation), reported loudly but once:
    `state_write_failed` (error) at the first failure and when the error changes, counted every time;
    `state_write_recovered` at the next success."""

    def __init__(self, volume: str, metrics: MirrorMetrics) -> None:
        self.volume = volume
        self.metrics = metrics
        self.failing: dict[str, str] = {}  # kind -> the last error logged (digits masked)
        self._lock = threading.Lock()

    def failed(self, kind: str, error: BaseException, consequence: str) -> None:
        self.metrics.state_write_failed(self.volume, kind)
        message = describe(error)
        key = _masked(message)
        with self._lock:
            known = self.failing.get(kind)
            self.failing[kind] = key
        if known != key:
            log.error("state_write_failed", volume=self.volume, file=kind, error=message, effect=consequence)

    def ok(self, kind: str) -> None:
        if kind in self.failing:  # (checked without the lock first: the common case costs a lookup)
            with self._lock:
                gone = self.failing.pop(kind, None)
            if gone is not None:
                log.info("state_write_recovered", volume=self.volume, file=kind)


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
    pieces: list[Buffer]  # the serialised MirrorRequest, in pieces (the data is referenced, not copied)
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
        transport: str = "auto",
        data_address: tuple[str, int] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.data_address = data_address  # where the data channel is, if not at the offered port
        # The data channel of the current stream (None: batches go on the gRPC stream); `_send_lock`
        # keeps batches in order on it: they are formed and sent under it, by whichever thread made
        # them sendable (a writer, the acknowledging thread), not handed to a sender thread.
        self._link: DataLink | None = None
        self._send_lock = threading.Lock()
        self._channel_unreachable = False  # the last attempt could not connect: use gRPC once
        self.transport_in_use = ""  # "channel" or "grpc" while a stream is open
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
        # The completion thread: woken only when ops are dropped or the mirror stops (callbacks of
        # acknowledged ops run in the thread that processed the acknowledgement).
        self._drops = threading.Condition(self._cond)  # type: ignore[arg-type]
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
        # `_live`: a stream is open and writes are mirrored; `_confirmed`: it is healthy (see `_confirm`).
        self._live = False
        self._confirmed = False
        self.state = "connecting"  # one of STATES
        self.resyncing = False
        self.handshakes = 0
        self.resent_bytes = 0
        self.last_error = ""
        self.retry_in = 0.0  # seconds to the next attempt, drawn at the last failure
        self.reports = StateReport(volume, self.metrics)
        # Since the last healthy stream: failed attempts, the resync bytes announced by each stream
        # opened, the failure last logged (code, masked details), whether a handshake was logged.
        self._failures = 0
        self._announced = 0
        self._logged_failure: tuple[str, str] | None = None
        self._handshake_logged: tuple[object, ...] | None = None
        self._down_since = time.monotonic()
        self._reset_backoff = False
        self._opened_at = 0.0  # when the current stream opened
        self._silenced_stream = 0  # the stream the tick loop cancelled for want of acknowledgements
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

    @property
    def live(self) -> bool:
        """A stream is open: writes are mirrored (whether or not the standby acknowledges them yet)."""
        return self._live

    @property
    def connected(self) -> bool:
        """The standby acknowledges a healthy stream (the `connected` state)."""
        return self._live and self._confirmed

    @property
    def blocked(self) -> bool:
        """The volume file is not the one the generations belong to: no connection is attempted."""
        return bool(self.generations.mismatch)

    # -- writers (under the device's order lock) ------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Before a write to ``[offset, offset+length)``, outside the order lock: its regions are marked
        in flight in the bitmap, durably, when this returns (concurrent writers share the syncs).

        Every `mark` is followed by one `begin` of the same range. Raises when the bitmap cannot be
        written: then the write must fail (unmarked, it would not be resent after a crash)."""
        try:
            self.bitmap.mark(offset, length)
        except DeviceError as e:
            self.reports.failed("bitmap", e, "client writes fail until the bitmap can be written")
            raise BitmapWriteFailed(
                volume=self.volume, path=self.bitmap.path, detail=e.fields.get("detail", str(e))
            ) from e
        if self.reports.failing:
            self.reports.ok("bitmap")

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
            live = self._live
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
            self.failed(offset, length, tracked)
            raise

    def failed(self, offset: int, length: int, tracked: bool) -> None:
        """The local write after `begin` failed: the range (maybe partly written) is made dirty, so a
        later resync sends what the volume holds (`failing` as a plain call)."""
        if tracked:
            self.bitmap.drop(offset, length)

    def submit_write(
        self, offset: int, data: Buffer, release: tuple[int, int] | None = None, *, send: bool = True
    ) -> int:
        """Queue a write (after `begin` returned True); `release` is the range `begin` marked, given
        with the last op of a client write. Without `send` it waits for `send_pending` (or the next
        acknowledgement) to be sent, so a burst of writes shares a batch."""
        return self._submit(_Op(0, offset, data, 0, release=release), send)

    def submit_zero(
        self, offset: int, length: int, release: tuple[int, int] | None = None, *, send: bool = True
    ) -> int:
        return self._submit(_Op(0, offset, None, length, release=release), send)

    def send_pending(self) -> None:
        """Send what can go now (the ops queued without `send`)."""
        with self._cond:
            if not self._sendable():
                return
            if self._link is None:
                self._work.notify()
                return
        self._pump()

    def submit_barrier(self) -> int:
        """A flush barrier after every op submitted so far: acknowledged once the standby is durable."""
        return self._submit(_Op(0, 0, None, 0, barrier=True))

    def _submit(self, op: _Op, send: bool = True) -> int:
        with self._cond:
            op.number = self._next_op
            self._next_op += 1
            if not self._live or not self._running:
                self._drop_op(op)
                self._done_op = max(self._done_op, op.number)
                self._received_op = max(self._received_op, op.number)
                self._cond.notify_all()
                return op.number
            self._pending.append(op)
            self._pending_bytes += op.length
            if not send or not self._sendable():
                return op.number
            if self._link is None:
                self._work.notify()
                return op.number
        self._pump()
        return op.number

    def _pump(self) -> None:
        """Send the batches that can go now on the data channel, in order (see `_send_lock`). A thread
        that finds another sending leaves its ops to it; the sender looks again before it leaves."""
        while True:
            if not self._send_lock.acquire(blocking=False):
                return
            try:
                while True:
                    with self._cond:
                        link = self._link
                        if link is None or not self._sendable():
                            break
                        batch = self._form_batch()
                    self.metrics.batch_sent(self.volume, batch.nbytes, len(batch.ops))
                    try:
                        link.send(batch.pieces)
                    except (OSError, ValueError):
                        link.cancel()  # the acknowledging thread sees the channel end and drops
                        return
            finally:
                self._send_lock.release()
            with self._cond:
                if self._link is None or not self._sendable():
                    return

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
        if self._link is not None and n < CHANNEL_EAGER:
            return True
        last = self._pending[-1]
        return self._pending_bytes >= self.batch_bytes // 4 or last.barrier or last.uptodate

    def _wake_all(self) -> None:
        """Under the lock: the state changed; every waiter looks again."""
        self._cond.notify_all()
        self._work.notify_all()
        self._events.notify_all()
        self._drops.notify_all()

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
        """Run the callbacks of dropped ops (and of every op once stopping), outside the lock."""
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
                    self._drops.wait()
                ready = self._take_ready(level)
            self._run_callbacks(ready)

    def _take_ready(self, level: int | None = None) -> list[Callable[[], Finisher]]:
        """Under the lock: the callbacks whose ops are acknowledged as the mode asks (up to `level`)."""
        if level is None:
            level = self._received_op if self.mode == "received" else self._done_op
        ready = []
        callbacks = self._callbacks
        while callbacks and callbacks[0][0] <= level:
            ready.append(heapq.heappop(callbacks)[2])
        return ready

    def _run_callbacks(self, ready: list[Callable[[], Finisher]]) -> None:
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

    def in_flight_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes + sum(b.nbytes for b in self._outstanding.values())

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what was submitted is acknowledged (or `timeout` passes), then close the stream.

        A clean stop while the standby follows ends with a flush barrier; once it is acknowledged every
        region acknowledged before it is cleared in the bitmap, so that the next start resends nothing
        (the activity log is for crashes)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._next_op - 1
            while self._done_op < target and self._live and time.monotonic() < deadline:
                self._cond.wait(0.1)
            settle = self._live and self._running and not self.resyncing
        if settle:
            sent_at = time.monotonic()
            barrier = self.submit_barrier()
            try:
                self.wait(barrier, mode="sync", timeout=max(0.1, deadline - time.monotonic()))
                with self._cond:
                    durable = self._live and self._done_op >= barrier
                if durable:
                    self.bitmap.clean(force=True, released_before=sent_at)
            except TimeoutError:
                pass
            except DeviceError as e:
                self.reports.failed("bitmap", e, "idle regions stay marked (resent at the next start)")
        with self._cond:
            self._running = False
            self._stream_id += 1
            self._wake_all()
            link = self._link
        if link is not None:
            link.cancel()  # the standby sees the channel close; the stream's thread ends
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
        if self.generations.mismatch:
            self._block(self.generations.mismatch)
            return
        delay = BACKOFF_FIRST
        channel = rpc.channel(self.target, self.tls)
        try:
            while self._running:
                failure = self._attempt(channel)
                if not self._running:
                    break
                if self._reset_backoff:  # the stream was healthy: the first retry is fast again
                    delay, self._reset_backoff = BACKOFF_FIRST, False
                pause = random.uniform(delay / 2, delay)
                delay = min(BACKOFF_CAP, delay * BACKOFF_FACTOR)
                self._disconnected(failure, pause)
                with self._cond:
                    self._events.wait_for(lambda: not self._running, pause)
        finally:
            channel.close()

    def _attempt(self, channel: grpc.Channel) -> tuple[str, str, str]:
        """One connection: handshake, then the stream until it ends. How it ended: ``(code, details,
        state)``, state ``refused`` when the standby answered with an error status, else
        ``disconnected``."""
        try:
            try:
                self.generations.flush()
            except StateWriteError as e:
                self.reports.failed("generation", e, "kept in memory; written at the next change")
            if self._handshake(channel):
                # A new, wiped or discarded replica: everything the primary holds must be sent.
                try:
                    self.bitmap.mark_dirty(0, self.size)
                except DeviceError as e:
                    self.reports.failed("bitmap", e, "the full sync waits until the bitmap can be written")
                    detail = f"the full sync could not be marked in the bitmap: {describe(e)}"
                    return ("BITMAP", detail, "disconnected")
                log.info("full_sync_needed", volume=self.volume, bytes=self.size)
            self._stream(channel)
        except ChannelError as e:
            name = e.status
            if name == "UNAVAILABLE" and self._silenced_stream == self._stream_id:
                return ("NOT_ANSWERING", f"no acknowledgement for {self.ack_timeout:g} s", "disconnected")
            if name in _TRANSPORT_NAMES:
                return (name, str(e), "disconnected")
            self.metrics.refused(self.volume, name.lower())
            return (name, str(e), "refused")
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.CANCELLED and self._silenced_stream == self._stream_id:
                return ("NOT_ANSWERING", f"no acknowledgement for {self.ack_timeout:g} s", "disconnected")
            name = code.name if code is not None else "UNKNOWN"
            if code in _TRANSPORT:
                return (name, _details(e), "disconnected")
            self.metrics.refused(self.volume, name.lower())
            return (name, _details(e), "refused")
        except StandbyError as e:
            return ("ERROR", str(e), "disconnected")
        except Exception as e:  # a bug: logged with its traceback, and the mirror goes on retrying
            log.exception("mirror_stream_failed", volume=self.volume, error=repr(e))
            return ("INTERNAL", repr(e), "disconnected")
        return ("ERROR", "the stream ended", "disconnected")

    def _block(self, message: str) -> None:
        """The volume file is not the one the generations belong to: never connect (see generations)."""
        with self._cond:
            self.state = "blocked"
            self.last_error = message
        self.metrics.connected(self.volume, False)
        self.metrics.set_state(self.volume, "blocked")
        log.error("volume_file_mismatch", volume=self.volume, target=self.target, error=message)

    def _disconnected(self, failure: tuple[str, str, str], pause: float) -> None:
        code, details, state = failure
        message = f"{code}: {details}"
        with self._state_lock, self._cond:
            was_live, was_confirmed = self._live, self._confirmed
            if was_confirmed:
                self._down_since = time.monotonic()
            self._live = self._confirmed = False
            self.resyncing = False
            self._stream_id += 1
            self._drop_all()
            self.state = state
            self.last_error = message
            self.retry_in = pause
        self.metrics.connected(self.volume, False)
        self.metrics.set_state(self.volume, state)
        if was_live:
            # From now on the standby may lack writes: a new generation of the primary's data.
            try:
                self.generations.rotate()
            except StateWriteError as e:
                effect = (
                    "the data generation stays the last one recorded"
                    if e.fields.get("what") == "the data generations"
                    else "the volume file carries the previous generation (accepted after a crash only)"
                )
                self.reports.failed("generation", e, effect)
            else:
                self.reports.ok("generation")
        self._failures += 1
        fields: dict[str, Any] = {
            "volume": self.volume,
            "target": self.target,
            "error": message,
            "state": state,
            "attempts": self._failures,
            "retry_in": round(pause, 1),
            "out_of_sync_bytes": self.bitmap.out_of_sync_bytes(),
        }
        key = (code, _masked(details))
        if was_confirmed or key != self._logged_failure:
            log.warning("mirror_disconnected", **fields)
        else:  # the same failure again: logged once, when it began
            log.debug("mirror_disconnected", **fields)
        self._logged_failure = key

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
                previous_generation=self.generations.previous,
                discard_standby_data=self._discard,
            ),
            timeout=30,
        )
        self.handshakes += 1
        self._discard = False  # once: a later reconnect must not throw the resynced data away again
        if not reply.full_sync and reply.generation and reply.generation == self.generations.previous:
            # The standby completed the last stream's resync but its acknowledgement was lost with the
            # link: it holds that generation completely (the base from now on, should more be lost).
            self._agree(reply.generation)
        # A full sync of a replica that existed already: probe each region, resend what differs.
        self._probe_resync = bool(reply.full_sync and not reply.created)
        fields = {
            "volume": self.volume,
            "target": self.target,
            "standby_id": reply.standby_id,
            "created": reply.created,
            "full_sync": reply.full_sync,
            "standby_generation": reply.generation,
        }
        summary = (reply.standby_id, reply.created, reply.full_sync, reply.generation)
        if summary != self._handshake_logged:
            log.info("handshake", **fields)
            self._handshake_logged = summary
        else:  # the same handshake again since the last healthy stream (a standby that keeps refusing)
            log.debug("handshake", **fields)
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
            # clearing bits as soon as `_live` is set).
            dirty_bytes = self.bitmap.dirty() * self.bitmap.granularity
            resync = dirty_bytes > 0
            self._live = True
            self._opened_at = time.monotonic()
            self._announced += dirty_bytes
            if self.state != "refused":  # (a standby that refused stays `refused` until it acknowledges)
                self.state = "connecting"
            self.resyncing = resync
            self._stream_generation = self.generations.current
            self._wake_all()
        self.metrics.set_state(self.volume, self.state)
        if not resync:
            self._agree(self._stream_generation)
            # Its acknowledgement makes the stream healthy at once (nothing to resend).
            self._submit(_Op(0, 0, None, 0, heartbeat=True))
        self._first_contact.set()
        # Ask for the data channel unless told not to, or unless it could not be reached last time.
        want = self.transport != "grpc" and not self._channel_unreachable
        self._channel_unreachable = False
        decided = threading.Event()
        responses = mirror(self._requests(stream_id, first, resync, want, decided))
        try:
            with self._cond:
                self._responses = responses
            if want and self._open_channel(responses, stream_id, decided):
                return
            self.transport_in_use = "grpc"
            decided.set()
            for reply in responses:
                self._acknowledged(reply)
            if self._running:
                raise StandbyError(detail="the standby ended the stream")
        finally:
            decided.set()
            with self._cond:
                self._responses = None
            responses.cancel()

    def _open_channel(self, responses: Any, stream_id: int, decided: threading.Event) -> bool:
        """The standby's answer to the data channel request: connect to the channel it offers and run
        the stream there until it ends (raises); False when it offers none (the stream goes on, on
        gRPC, unless the transport is ``channel``)."""
        answer = next(responses, None)
        if answer is None:
            raise StandbyError(detail="the standby ended the stream")
        if not answer.HasField("channel"):
            if self.transport == "channel":
                raise ChannelError(
                    status="FAILED_PRECONDITION",
                    detail="the standby offers no data channel (started with --data-listen off?); "
                    "--transport auto falls back to gRPC",
                )
            return False
        try:
            link = DataLink.connect(answer.channel, channel_target(self.target), self.tls, self.data_address)
        except ChannelError:
            if self.transport == "auto":
                self._channel_unreachable = True  # the next attempt goes by gRPC
            raise
        self.transport_in_use = "channel"
        decided.set()  # the request side of the call ends
        for _ in responses:  # the gRPC call ends: the session lives on the data channel
            pass
        with self._cond:
            if self._stream_id != stream_id or not self._running:
                link.close()
                return True
            self._link = link
            self._responses = link
        try:
            self._pump()
            for reply in link.replies():
                self._acknowledged(reply)
        finally:
            with self._send_lock, self._cond:  # no batch is sent on a closed channel
                self._link = None
            link.close()
        return True

    def _agree(self, generation: str) -> None:
        """The standby holds `generation`: recorded, or reported when that cannot be written."""
        try:
            self.generations.agree(generation)
        except StateWriteError as e:
            self.reports.failed("generation", e, "kept in memory; written at the next change")
        else:
            self.reports.ok("generation")

    def _confirm(self) -> None:
        """Under the lock: the stream is healthy (acknowledged, and nothing left to resend or up for
        `STABLE_SECONDS`): the `connected` state, and the backoff starts afresh."""
        self._confirmed = True
        self._reset_backoff = True
        self.state = "connected"
        log.info(
            "mirror_connected",
            volume=self.volume,
            target=self.target,
            mode=self.mode,
            transport=self.transport_in_use,
            resync_bytes=self._announced,
            attempts=self._failures,
            down_seconds=round(time.monotonic() - self._down_since, 1),
        )
        self.metrics.connected(self.volume, True)
        self.metrics.set_state(self.volume, "connected")
        self._failures = self._announced = 0
        self._logged_failure = self._handshake_logged = None

    def _acknowledged(self, reply: replication_pb2.MirrorReply) -> None:
        """Process an acknowledgement; then, in this thread, send what the window now lets go (data
        channel) and run the completion callbacks of the ops it acknowledged."""
        with self._cond:
            self._acknowledge(reply)
            ready = self._take_ready()
            link = self._link
        if link is not None:
            self._pump()
        self._run_callbacks(ready)

    def _acknowledge(self, reply: replication_pb2.MirrorReply) -> None:
        """Under the lock: the bookkeeping of an acknowledgement."""
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
                    self._agree(self._stream_generation)
                    log.info("resync_done", volume=self.volume, generation=self._stream_generation)
            if batch.ops:
                last = batch.ops[-1].number
                self._done_op = max(self._done_op, last)
                self._received_op = max(self._received_op, last)
        if (
            not self._confirmed
            and self._live
            and (not self.resyncing or time.monotonic() - self._opened_at >= STABLE_SECONDS)
        ):
            self._confirm()
        self._cond.notify_all()
        if self._link is None and self._sendable():
            self._work.notify()

    def _requests(
        self, stream_id: int, first: int, resync: bool, channel: bool, decided: threading.Event
    ) -> Iterator[bytes]:
        """The request side of one stream: `open`, then batches as the window allows. With `channel`,
        the batches wait until `decided`: they go on the data channel if the standby offered one."""
        opening = replication_pb2.MirrorOpen(
            volume=self.volume,
            first_sequence=first,
            primary_id=self.primary_id,
            received_acks=self.mode == "received",
            resync=resync,
            generation=self._stream_generation,
            data_channel=channel,
        )
        yield replication_pb2.MirrorRequest(open=opening).SerializeToString()
        if channel:
            while not decided.wait(0.5):
                with self._cond:
                    if self._stream_id != stream_id or not self._running:
                        return
            if self.transport_in_use != "grpc":
                return  # batches go on the data channel: the call's request side ends
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
            yield b"".join(batch.pieces)

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
        pieces = encode_batch(sequence, writes, flush, uptodate)
        batch = _Batch(sequence, ops, nbytes, pieces, time.monotonic())
        self._outstanding[sequence] = batch
        return batch

    # -- resync -------------------------------------------------------------------------------------

    def _resync_loop(self) -> None:
        """Send the dirty regions while connected, then mark the replica up to date."""
        while self._running:
            with self._cond:
                self._events.wait_for(lambda: not self._running or (self._live and self.resyncing), 1.0)
                if not self._running or not (self._live and self.resyncing):
                    continue
                stream_id = self._stream_id
            try:
                self._resync_pass(stream_id)
            except StandbyError as e:
                log.warning("resync_interrupted", volume=self.volume, error=str(e))

    def _resync_room(self, stream_id: int) -> bool:
        """Wait until the resync window has room; False when the stream is gone."""
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._stream_id != stream_id or not self._running or self._resync_bytes < RESYNC_WINDOW
                )
            )
            return self._stream_id == stream_id and self._running and self._live

    def _resync_pass(self, stream_id: int) -> None:
        """Send every dirty region, then the `uptodate` marker once they are applied.

        Holes first, then the regions holding data, each of those as its runs of zero blocks (zeroed
        ranges) before its runs of data: on a standby whose disk is full, the trims free the room the data
        needs, which sending in offset order would never reach. A region's bit is released only by the
        acknowledgement of its last op, as for a client write."""
        g = self.bitmap.granularity
        started = time.monotonic()
        sent = zeroed = 0
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
            # 1. The regions that are holes: one zeroed range each. The others wait for step 2.
            data_regions: list[int] = []
            for region in regions:
                if not self._resync_room(stream_id):
                    return
                with self._lock:
                    with self._cond:
                        if self._stream_id != stream_id or not self._live:
                            return
                    offset, length = self.bitmap.span(region)
                    if not self._is_hole(offset, length):
                        data_regions.append(region)
                        continue
                    self.bitmap.resync_begin(region)
                    with self._cond:
                        self._resync_bytes += length
                    self._submit(_Op(0, offset, None, length, resync=True, release=(offset, length)))
                sent += length
                zeroed += length
            # 2. The regions holding data (or probes of them).
            last = 0
            for region in data_regions:
                while covered >= PROBE_WINDOW:
                    number, nbytes = probes.popleft()
                    self.wait(number, mode="sync")
                    covered -= nbytes
                if not self._resync_room(stream_id):
                    return
                with self._lock:
                    with self._cond:
                        if self._stream_id != stream_id or not self._live:
                            return
                    offset, length = self.bitmap.resync_begin(region)
                    span = (offset, length)
                    ops: list[_Op]
                    if self._is_hole(offset, length):  # trimmed since step 1
                        ops = [_Op(0, offset, None, length, resync=True, release=span)]
                    else:
                        assert self._read is not None
                        data = self._read(offset, length)
                        if probing:
                            digests = (
                                zero_digests(length, self.block_size)
                                if is_zero(data)
                                else block_digests(data, self.block_size)
                            )
                            ops = [_Op(0, offset, None, 0, release=span, probe=Probe(length, digests))]
                        else:
                            ops = self._resync_ops(offset, data, span)
                    resent = sum(op.length for op in ops if op.probe is None)
                    with self._cond:
                        self._resync_bytes += resent
                    for op in ops:
                        last = self._submit(op)
                if ops[0].probe is not None:
                    probes.append((last, length))
                    covered += length
                    probed += length
                else:
                    sent += length
                    zeroed += sum(op.length for op in ops if op.data is None)
                if self._repairs:
                    self._repair()
            if probing and last:
                # Every probe answered (or dropped): resend what they found before the marker.
                self.wait(last, mode="sync")
                with self._cond:
                    if self._stream_id != stream_id or not self._running:
                        return
                self._repair()
        # Everything dirty was sent: once it is applied the replica is up to date. (Counted before the
        # marker goes: its acknowledgement ends `resyncing`, and whoever sees that sees the count.)
        with self._cond:
            self.resent_bytes += sent
        with self._lock:
            marker = self._submit(_Op(0, 0, None, 0, uptodate=True))
        self.wait(marker, mode="sync")
        with self._cond:
            if self._stream_id != stream_id:
                return  # dropped with its stream (`mirror_disconnected` says why); resumed at the next one
        seconds = round(time.monotonic() - started, 3)
        if probing:
            repaired = (self._verify_counts[0][1] - repaired_before) * self.block_size
            log.info(
                "resync_sent",
                volume=self.volume,
                bytes=sent + repaired,
                seconds=seconds,
                granularity=g,
                zeroed_bytes=zeroed,
                checksummed_bytes=probed,
                resent_after_checksum_bytes=repaired,
                skipped_bytes=probed - repaired,
            )
        else:
            log.info(
                "resync_sent",
                volume=self.volume,
                bytes=sent,
                seconds=seconds,
                granularity=g,
                zeroed_bytes=zeroed,
            )

    def _resync_ops(self, offset: int, data: bytes, span: tuple[int, int]) -> list[_Op]:
        """The ops resending region `span` whose blocks read `data`: its runs of zero blocks as zeroed
        ranges first, then its runs of data; the last op releases the region."""
        bs = self.block_size
        view = memoryview(data)
        zero_runs: list[tuple[int, int]] = []
        data_runs: list[tuple[int, int]] = []
        start, kind = 0, is_zero(view[:bs])
        for at in range(bs, len(data), bs):
            z = is_zero(view[at : at + bs])
            if z != kind:
                (zero_runs if kind else data_runs).append((start, at))
                start, kind = at, z
        (zero_runs if kind else data_runs).append((start, len(data)))
        ops = [_Op(0, offset + a, None, b - a, resync=True) for a, b in zero_runs]
        for a, b in data_runs:
            chunk = data if (a, b) == (0, len(data)) else bytes(view[a:b])
            ops.append(_Op(0, offset + a, chunk, 0, resync=True))
        ops[-1].release = span
        return ops

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
                if request is None or not self._running or not self._live:
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
                        or not self._live
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
            marked: list[tuple[int, int]] = []
            for offset, length in runs:
                try:
                    self.bitmap.mark(offset, length)  # durable before the resend, like a client write
                except DeviceError as e:
                    self.reports.failed("bitmap", e, "blocks found out of sync are not resent")
                    for done in marked:  # never sent: resynced at the next connection
                        self.bitmap.drop(*done)
                    return
                marked.append((offset, length))
        with self._cond:
            self._cond.wait_for(
                lambda: not self._live or not self._running or self._resync_bytes < RESYNC_WINDOW
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
                connected = self._live
                healthy = self._confirmed
                stream_id = self._stream_id
            if silent and responses is not None:
                if healthy:
                    log.warning("standby_not_answering", volume=self.volume, seconds=self.ack_timeout)
                else:  # not answering again: `mirror_disconnected` says so once
                    log.debug("standby_not_answering", volume=self.volume, seconds=self.ack_timeout)
                self._silenced_stream = stream_id
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
                    still = self._live
                if still:
                    try:
                        self.bitmap.clean(released_before=sent_at)
                    except DeviceError as e:
                        self.reports.failed("bitmap", e, "idle regions stay marked (resent after a crash)")
                    else:
                        self.reports.ok("bitmap")
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
            leftover = bool(self._repairs) and not self._live
        if idle:
            self._submit(_Op(0, 0, None, 0, heartbeat=True))
        if leftover and self._repair_lock.acquire(blocking=False):
            self._repair_lock.release()
            self._repair()


def _identity(message: bytes) -> bytes:
    return message


def channel_target(target: str) -> str:
    """The host of a gRPC target ``HOST:PORT`` (``[v6]:PORT``): where a wildcard data channel is."""
    host = target.rpartition(":")[0] if ":" in target else target
    return host.strip("[]") or "127.0.0.1"


def _masked(text: str) -> str:
    """`text` with its numbers masked: two errors that differ only in counts are the same failure."""
    return re.sub(r"\d+", "#", text)


def _details(e: grpc.RpcError) -> str:
    details = e.details() if hasattr(e, "details") else None
    return str(details or e)

"""Mirroring one volume's changes, in order, to the standby: the mirror and its connection.

Writers (the exported device) call `mark` first, then under their order lock `begin` before they write
locally and `submit_write`/`submit_zero` after, and finally `wait` (or `when_done`) for the
acknowledgement their mode asks for. The parts, one module each:

* `primary.oplog`: the ops in order, their batches and window, the acknowledgements and who waits;
* `primary.stream`: how a stream travels (the gRPC call, the data channel);
* `primary.resync`: resending what the write-intent bitmap marks dirty after a reconnect;
* `primary.verify`: verify passes, full-sync probes, and the repair of what they find;
* `primary.reports`: the metrics a mirror feeds, and failures to write the primary's own state;
* this module: the mirror writers see, and the connection's life (handshake, reconnects, backoff,
  health, the periodic flush barrier and heartbeat). It is longer than the others because the two share
  one state machine: whether writes are mirrored (`begin`) changes in the same step as the stream opens
  or ends, under one lock, and a split would spread that step over two classes.

The write-intent bitmap (`primary.bitmap`) keeps the standby recoverable without ever stalling the
primary for long:

* connected: `mark` marks the regions (durably) as in flight; the standby's acknowledgement releases
  them; a periodic flush barrier, once acknowledged, lets released regions be cleared;
* the link breaks, the standby stops answering for `ack_timeout` seconds, or it refuses a batch: every
  unacknowledged op is dropped and its regions become dirty; waiting writers return (their data is on
  the local volume and tracked); new writes only mark their regions dirty;
* reconnected: the dirty regions are resent in the background while new writes flow (`primary.resync`).

Reconnects back off exponentially (jittered, 0.2 s growing threefold up to 30 s), and the backoff is
reset only by a healthy stream: one whose batches the standby acknowledged and that either had nothing
to resend, completed its resync, or stayed up acknowledging for `STABLE_SECONDS`. A standby that takes
the handshake but refuses every batch (a full disk, ``--on-full defer``) thus gets a few attempts a
minute, not several a second. `state` (and the `connected` metric) says ``connected`` only for such a
healthy stream; the logs change once per state change: a repeated identical failure is logged once (and
again, with the attempts so far and the next retry, when the error changes), the recovery once.

Modes (DRBD protocols C/B/A): ``sync`` waits until the standby applied the write, ``received`` until it
received it, ``async`` not at all. A flush barrier always waits for the standby's durability (or the
drop of the connection). An idle stream sends an empty heartbeat batch every second, so that the
standby can answer (with a verify request, say) and a silent one is noticed.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import grpc

from primary.bitmap import WriteIntentBitmap
from primary.datalink import ChannelError
from primary.generations import Generations, StateWriteError
from primary.local import LocalVolume
from primary.oplog import BATCH_BYTES, WINDOW_BATCHES, Finisher, Op, OpLog
from primary.reports import (
    BitmapWriteFailed,
    MirrorMetrics,
    NullMirrorMetrics,
    StateReport,
    describe,
    masked,
)
from primary.resync import Resync
from primary.stream import TRANSPORT_CODE_NAMES, TRANSPORT_CODES, TRANSPORTS, Transport, details
from primary.verify import Checksums
from standbylib.blockdev import Device
from standbylib.checksums import DIGEST_SIZE, block_digests
from standbylib.errors import DeviceError, RequestError, StandbyError
from standbylib.rawfile import Buffer
from standbylib.rpc.v1 import replication_pb2, replication_pb2_grpc
from standbylib.runtime import logs, rpc
from standbylib.runtime.tls import TlsFiles

log = logs.get(__name__)

__all__ = ["MODES", "STATES", "TRANSPORTS", "BitmapWriteFailed", "Finisher", "Mirror", "NullMirrorMetrics"]

MODES = ("sync", "received", "async")
#: Reconnect backoff: first delay, growth factor, cap; each pause is drawn from [delay / 2, delay].
BACKOFF_FIRST, BACKOFF_FACTOR, BACKOFF_CAP = 0.2, 3.0, 30.0
#: Seconds a stream that is still resending must stay up, acknowledged, to count as healthy.
STABLE_SECONDS = 30.0
#: Replication states (`Mirror.state`): no healthy stream yet; a healthy stream; the link or the standby
#: is down; the standby refuses (its batches or the handshake); the volume file is not the one its
#: generations belong to (no attempt is made).
STATES = ("connecting", "connected", "disconnected", "refused", "blocked", "outdated")
#: Longest pause between the handshakes of a fenced primary (it waits for `standbyctl demote`).
FENCED_RETRY = 2.0
#: What a fenced primary does with its clients' writes (`--fencing`): refuse them (EIO), or keep
#: serving them, outdated (they are replaced by the standby's data at the failback).
FENCING = ("refuse-writes", "keep-serving")


class WritesFenced(RequestError):
    """A client's write to a fenced volume under ``--fencing refuse-writes`` (the NBD client gets EIO)."""

    template = "volume {volume!r} is outdated, so writes are refused (--fencing refuse-writes): {reason}"


#: Seconds between flush barriers that let acknowledged regions of the bitmap be cleared.
CLEAN_INTERVAL = 1.0


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
        fencing: str = "refuse-writes",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if fencing not in FENCING:
            raise ValueError(f"fencing {fencing!r} is not one of {', '.join(FENCING)}")
        self.fencing = fencing
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
        self.primary_id = primary_id or generations.primary_id
        self.metrics: MirrorMetrics = metrics or NullMirrorMetrics()
        self.ack_timeout = ack_timeout
        self.reports = StateReport(volume, self.metrics)
        # Lock order: _state_lock, then the op log's lock, then the bitmap's lock. `_state_lock` makes
        # "connected?" and the bitmap mark one step, so no write is marked dirty after a resync pass looked.
        self._state_lock = threading.Lock()
        self.log = OpLog(
            volume, bitmap, self.metrics, mode=mode, batch_bytes=batch_bytes, window_batches=window_batches
        )
        self._cond = self.log.cond
        self.transport = Transport(self.log, target, tls, transport, data_address)
        self.local = LocalVolume()
        self._device: Device | None = None  # set by `attach`: where a failback writes
        self.checksums = Checksums(
            self.log,
            self.local,
            bitmap,
            volume=volume,
            size=size,
            block_size=block_size,
            reports=self.reports,
            begin=self.begin,
        )
        self.resync = Resync(
            self.log, self.local, bitmap, self.checksums, volume=volume, block_size=block_size
        )
        # `_confirmed`: the open stream is healthy (see `_confirm`).
        self._confirmed = False
        self.state = "connecting"  # one of STATES
        self.handshakes = 0
        self.last_error = ""
        self.retry_in = 0.0  # seconds to the next attempt, drawn at the last failure
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
        self._heartbeat_sequence = 0  # the next batch number at the last tick
        self._threads = [
            threading.Thread(target=self._run, name=f"mirror-{volume}", daemon=True),
            threading.Thread(target=self.resync.loop, name=f"resync-{volume}", daemon=True),
            threading.Thread(target=self._tick_loop, name=f"mirror-tick-{volume}", daemon=True),
            # Runs the callbacks of dropped ops (those of acknowledged ops run in the acknowledging thread).
            threading.Thread(target=self.log.complete_loop, name=f"complete-{volume}", daemon=True),
        ]

    def attach(
        self,
        order_lock: AbstractContextManager[object],
        read: Callable[[int, int], bytes],
        is_hole: Callable[[int, int], bool],
        device: Device | None = None,
    ) -> None:
        """How the resync reads the local volume: under the writers' `order_lock`, so that a region read
        for resync is queued before any later write to it; a failback writes the standby's blocks to
        `device` under the same lock."""
        self.local.lock, self.local.read, self.local.is_hole = order_lock, read, is_hole
        self._device = device

    @property
    def refused(self) -> bool:
        """The standby answered the last attempt with a refusal (or took the volume over)."""
        return self.state in ("refused", "outdated")

    @property
    def outdated(self) -> str:
        """Why this primary is outdated (the standby took the volume over); "" when it is not."""
        return self.generations.outdated

    def writable(self) -> bool:
        """False while the primary is outdated and its fencing policy refuses writes."""
        return not (self.generations.outdated and self.fencing == "refuse-writes")

    def check_writable(self) -> None:
        """Raise `WritesFenced` when the primary is outdated and its fencing policy refuses writes."""
        if self.generations.outdated and self.fencing == "refuse-writes":
            raise WritesFenced(volume=self.volume, reason=self.generations.outdated)

    def start(self) -> None:
        """Start mirroring; `attach` must have been called (the resync reads the local volume)."""
        if self.local.read is None:
            raise StandbyError(
                detail=f"mirror of {self.volume!r} started before it was attached to its volume"
            )
        for thread in self._threads:
            thread.start()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """True once the stream was first opened (writes from then on are mirrored)."""
        return self._first_contact.wait(timeout)

    @property
    def live(self) -> bool:
        """A stream is open: writes are mirrored (whether or not the standby acknowledges them yet)."""
        return self.log.live

    @property
    def connected(self) -> bool:
        """The standby acknowledges a healthy stream (the `connected` state)."""
        return self.log.live and self._confirmed

    @property
    def blocked(self) -> bool:
        """The volume file is not the one the generations belong to: no connection is attempted."""
        return bool(self.generations.mismatch)

    @property
    def resyncing(self) -> bool:
        """The open stream resends dirty regions (the replica is `inconsistent` meanwhile)."""
        return self.resync.active

    @property
    def resent_bytes(self) -> int:
        return self.log.resent_bytes

    @property
    def verify_passes(self) -> int:
        return self.checksums.passes

    @property
    def transport_in_use(self) -> str:
        """``channel`` or ``grpc``: how the last stream opened travels."""
        return self.transport.in_use

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
            live = self.log.live
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
        return self.log.submit(Op(0, offset, data, 0, release=release), send)

    def submit_zero(
        self, offset: int, length: int, release: tuple[int, int] | None = None, *, send: bool = True
    ) -> int:
        return self.log.submit(Op(0, offset, None, length, release=release), send)

    def send_pending(self) -> None:
        """Send what can go now (the ops queued without `send`)."""
        self.log.send_pending()

    def submit_barrier(self) -> int:
        """A flush barrier after every op submitted so far: acknowledged once the standby is durable."""
        return self.log.submit(Op(0, 0, None, 0, barrier=True))

    def wait(self, op: int, *, mode: str | None = None, timeout: float | None = None) -> None:
        """Block until op number `op` is acknowledged as `mode` asks (default: this mirror's mode), or
        dropped. ``async`` returns at once."""
        self.log.wait(op, mode=mode, timeout=timeout)

    def when_done(self, op: int, callback: Callable[[], Finisher]) -> None:
        """Call `callback` once op number `op` is acknowledged as this mirror's mode asks, or dropped
        (`OpLog.when_done`): the asynchronous form of `wait`."""
        self.log.when_done(op, callback)

    def in_flight_bytes(self) -> int:
        return self.log.in_flight_bytes()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after what was submitted is acknowledged (or `timeout` passes), then close the stream.

        A clean stop while the standby follows ends with a flush barrier; once it is acknowledged every
        region acknowledged before it is cleared in the bitmap, so that the next start resends nothing
        (the activity log is for crashes)."""
        deadline = time.monotonic() + timeout
        oplog = self.log
        with self._cond:
            target = oplog.last_submitted()
            while oplog.done_op < target and oplog.live and time.monotonic() < deadline:
                self._cond.wait(0.1)
            settle = oplog.live and oplog.running and not self.resync.active
        if settle:
            sent_at = time.monotonic()
            barrier = self.submit_barrier()
            try:
                self.wait(barrier, mode="sync", timeout=max(0.1, deadline - time.monotonic()))
                with self._cond:
                    durable = oplog.live and oplog.done_op >= barrier
                if durable:
                    self.bitmap.clean(force=True, released_before=sent_at)
            except TimeoutError:
                pass
            except DeviceError as e:
                self.reports.failed("bitmap", e, "idle regions stay marked (resent at the next start)")
        with self._cond:
            link = oplog.stop()
        if link is not None:
            link.cancel()  # the standby sees the channel close; the stream's thread ends
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # -- the connection -------------------------------------------------------------------------------

    def _run(self) -> None:
        if self.generations.mismatch:
            self._block(self.generations.mismatch)
            return
        if self.generations.outdated:
            with self._cond:
                self.state, self.last_error = "outdated", self.generations.outdated
            self.metrics.set_state(self.volume, "outdated")
            log.error(
                "mirror_fenced", volume=self.volume, fencing=self.fencing, error=self.generations.outdated
            )
        delay = BACKOFF_FIRST
        channel = rpc.channel(self.target, self.tls)
        try:
            while self.log.running:
                failure = self._attempt(channel)
                if not self.log.running:
                    break
                if self._reset_backoff:  # the stream was healthy: the first retry is fast again
                    delay, self._reset_backoff = BACKOFF_FIRST, False
                if self.generations.outdated:  # fenced: ask often, the failback waits on it
                    delay = min(delay, FENCED_RETRY)
                pause = random.uniform(delay / 2, delay)
                delay = min(BACKOFF_CAP, delay * BACKOFF_FACTOR)
                self._disconnected(failure, pause)
                with self._cond:
                    self.log.events.wait_for(lambda: not self.log.running, pause)
        finally:
            channel.close()

    def _attempt(self, channel: grpc.Channel) -> tuple[str, str, str]:
        """One connection: handshake, then the stream until it ends. How it ended: ``(code, details,
        state)``, state ``refused`` when the standby answered with an error status, else
        ``disconnected``."""
        silent = ("NOT_ANSWERING", f"no acknowledgement for {self.ack_timeout:g} s", "disconnected")
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
            if name == "UNAVAILABLE" and self._silenced_stream == self.log.stream_id:
                return silent
            if name == "ABORTED":
                return self._fence(str(e))
            if name in TRANSPORT_CODE_NAMES:
                return (name, str(e), "disconnected")
            self.metrics.refused(self.volume, name.lower())
            return (name, str(e), "refused")
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.CANCELLED and self._silenced_stream == self.log.stream_id:
                return silent
            name = code.name if code is not None else "UNKNOWN"
            if code in TRANSPORT_CODES:
                text = details(e)
                if code == grpc.StatusCode.UNAVAILABLE:  # with the likely cause, for a TLS handshake
                    text = rpc.explain_unavailable(text, self.tls is not None and self.tls.enabled)
                return (name, text, "disconnected")
            if code == grpc.StatusCode.ABORTED:
                return self._fence(details(e))
            self.metrics.refused(self.volume, name.lower())
            return (name, details(e), "refused")
        except StandbyError as e:
            return ("ERROR", str(e), "disconnected")
        except Exception as e:  # a bug: logged with its traceback, and the mirror goes on retrying
            log.exception("mirror_stream_failed", volume=self.volume, error=repr(e))
            return ("INTERNAL", repr(e), "disconnected")
        return ("ERROR", "the stream ended", "disconnected")

    def _fence(self, reason: str) -> tuple[str, str, str]:
        """The standby took the volume over (promoted it): this primary is outdated until a failback.
        Recorded first, so that the writers the drop of the stream wakes see it."""
        self.metrics.refused(self.volume, "aborted")
        first = not self.generations.outdated
        try:
            self.generations.fence(reason)
        except StateWriteError as e:
            self.reports.failed("generation", e, "outdated in memory; written at the next change")
        if first:
            log.error("mirror_fenced", volume=self.volume, fencing=self.fencing, error=reason)
        return ("ABORTED", reason, "outdated")

    def _block(self, message: str) -> None:
        """The volume file is not the one the generations belong to: never connect (see generations)."""
        with self._cond:
            self.state = "blocked"
            self.last_error = message
        self.metrics.connected(self.volume, False)
        self.metrics.set_state(self.volume, "blocked")
        log.error("volume_file_mismatch", volume=self.volume, target=self.target, error=message)

    def _disconnected(self, failure: tuple[str, str, str], pause: float) -> None:
        code, text, state = failure
        message = f"{code}: {text}"
        with self._state_lock, self._cond:
            was_live, was_confirmed = self.log.live, self._confirmed
            if was_confirmed:
                self._down_since = time.monotonic()
            self._confirmed = False
            self.resync.active = False
            self.log.close()
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
        key = (code, masked(text))
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
        if reply.failback:
            self._pull(stub, reply)
            return self._handshake(channel)  # holding the standby's generation now: in sync
        if not reply.full_sync and reply.generation and reply.generation == self.generations.previous:
            # The standby completed the last stream's resync but its acknowledgement was lost with the
            # link: it holds that generation completely (the base from now on, should more be lost).
            self._agree(reply.generation)
        # A full sync of a replica that existed already: probe each region, resend what differs.
        self.resync.probing = bool(reply.full_sync and not reply.created)
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

    def _pull(
        self, stub: replication_pb2_grpc.ReplicationStub, reply: replication_pb2.HandshakeReply
    ) -> None:
        """Failback: write the blocks the standby tracked while it was promoted, and those of this
        primary's own set bitmap regions that differ from the standby's, from the standby to the local
        volume; then hold the standby's generation.

        The bitmap's set regions are mostly what the standby holds already (acknowledged, not cleared
        yet: the hot set), so they are compared by checksum first (one digest per block, from the
        standby) and only the blocks that differ are pulled. The writers' order lock is held
        throughout, so no client write lands in the middle (they wait); a crash before the end leaves
        the generations as they were, and the next handshake pulls again.
        """
        assert self._device is not None, "a failback needs the mirror attached to its device"
        device = self._device
        timeout = max(60.0, self.size / (20 << 20))
        regions = [self.bitmap.span(r) for r in self.bitmap.dirty_regions()]
        started = time.monotonic()
        log.warning(
            "failback_started",
            volume=self.volume,
            standby_generation=reply.generation,
            tracked_bytes=reply.tracked_bytes,
            primary_regions_bytes=sum(n for _, n in regions),
        )
        written = 0
        last: replication_pb2.FailbackChunk | None = None

        def pull(regions: list[tuple[int, int]], checksums: bool) -> Iterator[replication_pb2.FailbackChunk]:
            nonlocal last
            request = replication_pb2.FailbackPullRequest(
                volume=self.volume,
                primary_id=self.primary_id,
                generation=reply.generation,
                regions=[replication_pb2.Extent(offset=o, length=n) for o, n in regions],
                checksums=checksums,
            )
            last = None
            for chunk in stub.FailbackPull(request, timeout=timeout):
                if chunk.done:
                    last = chunk
                    return
                if chunk.offset + chunk.length > self.size:
                    raise StandbyError(detail=f"the standby sent a failback chunk beyond the volume: {chunk}")
                yield chunk
            raise StandbyError(detail="the failback stream ended before its last message")

        bs = self.block_size
        with self.local.lock:
            differ: list[tuple[int, int]] = []
            if regions:
                for chunk in pull(regions, checksums=True):
                    local = block_digests(device.read(chunk.offset, chunk.length), bs)
                    for i in range(0, len(local), DIGEST_SIZE):
                        if local[i : i + DIGEST_SIZE] != chunk.digests[i : i + DIGEST_SIZE]:
                            block = chunk.offset + i // DIGEST_SIZE * bs
                            if differ and differ[-1][0] + differ[-1][1] == block:
                                differ[-1] = (differ[-1][0], differ[-1][1] + bs)
                            else:
                                differ.append((block, bs))
            for chunk in pull(differ, checksums=False):
                if len(chunk.data) not in (0, chunk.length):
                    raise StandbyError(detail=f"the standby sent a bad failback chunk at {chunk.offset}")
                if chunk.data:
                    device.write(chunk.offset, chunk.data)
                else:
                    device.zero(chunk.offset, chunk.length)
                written += chunk.length
            assert last is not None
            device.flush()
            self.generations.adopt(reply.generation)
            spans = [self.bitmap.resync_begin(r) for r in self.bitmap.dirty_regions()]
            self.bitmap.release_all(spans)
            self.bitmap.clean(force=True)
        log.warning(
            "failback_pulled",
            volume=self.volume,
            generation=reply.generation,
            tracked_bytes=last.tracked_bytes,
            differing_bytes=sum(n for _, n in differ),
            sent_bytes=last.sent_bytes,
            written_bytes=written,
            seconds=round(time.monotonic() - started, 3),
        )

    def _stream(self, channel: grpc.Channel) -> None:
        """Open a stream (from here on writes are mirrored) and run it until it ends (raises)."""
        with self._state_lock, self._cond:
            stream_id, first = self.log.open()
            # Whatever is dirty now is what this connection resends (counted here: the resync thread
            # starts clearing bits as soon as the stream is open).
            dirty_bytes = self.bitmap.dirty() * self.bitmap.granularity
            resync = dirty_bytes > 0
            self._opened_at = time.monotonic()
            self._announced += dirty_bytes
            if self.state != "refused":  # (a standby that refused stays `refused` until it acknowledges)
                self.state = "connecting"
            self.resync.active = resync
            self.log.resync_remaining = dirty_bytes
            self._stream_generation = self.generations.current
        self.metrics.set_state(self.volume, self.state)
        if not resync:
            self._agree(self._stream_generation)
            # Its acknowledgement makes the stream healthy at once (nothing to resend).
            self.log.submit(Op(0, 0, None, 0, heartbeat=True))
        self._first_contact.set()
        opening = replication_pb2.MirrorOpen(
            volume=self.volume,
            first_sequence=first,
            primary_id=self.primary_id,
            received_acks=self.mode == "received",
            resync=resync,
            generation=self._stream_generation,
        )
        self.transport.run(channel, opening, stream_id, self._acknowledged)

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
            transport=self.transport.in_use,
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
        oplog = self.log
        with self._cond:
            self._acknowledge(reply)
            ready = oplog.take_ready()
            link = oplog.link
        if link is not None:
            oplog.pump()
        oplog.run_callbacks(ready)

    def _acknowledge(self, reply: replication_pb2.MirrorReply) -> None:
        """Under the lock: the bookkeeping of an acknowledgement."""
        if reply.received:
            self.log.received(reply.sequence)
            return
        if reply.mismatched or reply.HasField("verify"):
            self.checksums.reply(reply)
        if self.log.acknowledged(reply.sequence):  # the end-of-resync marker
            self.resync.active = False
            self.log.resync_remaining = 0
            self._agree(self._stream_generation)
            log.info("resync_done", volume=self.volume, generation=self._stream_generation)
        if (
            not self._confirmed
            and self.log.live
            and (not self.resync.active or time.monotonic() - self._opened_at >= STABLE_SECONDS)
        ):
            self._confirm()

    # -- periodic work ------------------------------------------------------------------------------

    def _tick_loop(self) -> None:
        """Clear acknowledged regions once a flush barrier made them durable; time out a silent standby."""
        oplog = self.log
        while oplog.running:
            with self._cond:
                oplog.events.wait_for(lambda: not oplog.running, CLEAN_INTERVAL)
                if not oplog.running:
                    return
                oldest = oplog.oldest_sent()
                silent = oldest is not None and time.monotonic() - oldest > self.ack_timeout
                silent = silent or self.transport.answer_overdue(self.ack_timeout)
                call = self.transport.call
                connected = oplog.live
                healthy = self._confirmed
                stream_id = oplog.stream_id
            if silent and call is not None:
                if healthy:
                    log.warning("standby_not_answering", volume=self.volume, seconds=self.ack_timeout)
                else:  # not answering again: `mirror_disconnected` says so once
                    log.debug("standby_not_answering", volume=self.volume, seconds=self.ack_timeout)
                self._silenced_stream = stream_id
                call.cancel()
                continue
            if connected and self.bitmap.wants_clean():
                sent_at = time.monotonic()
                op = self.submit_barrier()
                try:
                    self.wait(op, mode="sync", timeout=self.ack_timeout)
                except TimeoutError:
                    continue
                with self._cond:
                    still = oplog.live
                if still:
                    try:
                        self.bitmap.clean(released_before=sent_at)
                    except DeviceError as e:
                        self.reports.failed("bitmap", e, "idle regions stay marked (resent after a crash)")
                    else:
                        self.reports.ok("bitmap")
            # (a count of the bitmap: once a tick, not per batch)
            oplog.resync_remaining = (
                self.bitmap.dirty() * self.bitmap.granularity if self.resync.active else 0
            )
            self._heartbeat(connected)

    def _heartbeat(self, connected: bool) -> None:
        """From the tick loop: an empty batch when nothing was sent since the last tick (so the standby
        can answer, e.g. with a verify command, and a silent one is noticed); resends left over by a
        stream that ended become dirty."""
        with self._cond:
            idle = connected and self.log.idle() and self.log.next_sequence == self._heartbeat_sequence
            self._heartbeat_sequence = self.log.next_sequence
        if idle:
            self.log.submit(Op(0, 0, None, 0, heartbeat=True))
        self.checksums.leftovers()

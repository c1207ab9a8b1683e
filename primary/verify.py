"""Checksums on the primary: the verify passes the standby asks for, and the repair of what probes find.

A *probe* op carries the digests of a range as read under the order lock, so it travels in the stream at
exactly the point of the read and the standby compares its replica at that same point: writes going on
never cause a false mismatch (docs/REPLICATION.md, Verify). The standby asks for a verify on a reply
(`MirrorReply.verify`); the mismatches come back on the probes' acknowledgements (`Checksums.reply`) and
are resent (`Checksums.repair`) when a repair was asked, or always for the probes of a full sync
(`primary.resync`), which resends only the blocks that differ (DRBD's csums-alg).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from primary.bitmap import WriteIntentBitmap
from primary.local import LocalVolume
from primary.oplog import Op, OpLog
from standbylib.checksums import Probe, block_digests, zero_digests
from standbylib.errors import DeviceError
from standbylib.rawfile import is_zero
from standbylib.rpc.v1 import replication_pb2
from standbylib.runtime import logs

log = logs.get(__name__)

#: Bytes of volume one probe covers, and bytes of volume covered by probes in flight at most.
PROBE_CHUNK = 1 << 20
PROBE_WINDOW = 64 << 20
#: Longest run of blocks a repair resends as one op.
REPAIR_RUN = 1 << 20
#: Verify requests remembered (a request the standby repeats on later replies is not run twice).
REMEMBERED = 16


class FailureReport(Protocol):
    def failed(self, kind: str, error: BaseException, consequence: str) -> None: ...


@dataclass(slots=True)
class Mismatch:
    """Blocks a probe found out of sync, to resend (`Checksums.repair`)."""

    offsets: list[int]
    verify_id: int
    # A full-sync probe's region: held in flight in the bitmap until the resend is acknowledged.
    hold: tuple[int, int] | None


class ProbeWindow:
    """The probes of one pass in flight: at most `PROBE_WINDOW` bytes of volume covered at once."""

    def __init__(self, oplog: OpLog) -> None:
        self.log = oplog
        self._probes: deque[tuple[int, int]] = deque()  # (op number, bytes covered)
        self._covered = 0
        self.last = 0  # the number of the last probe submitted

    def room(self) -> None:
        """Wait until the window has room for another probe."""
        while self._covered >= PROBE_WINDOW:
            number, nbytes = self._probes.popleft()
            self.log.wait(number, mode="sync")
            self._covered -= nbytes

    def sent(self, number: int, covered: int) -> None:
        self._probes.append((number, covered))
        self._covered += covered
        self.last = number


class Checksums:
    """The verify passes and repairs of one volume's mirror.

    `begin` is the mirror's: under the order lock, whether a write of a range will be mirrored (else the
    range was made dirty in the bitmap)."""

    def __init__(
        self,
        oplog: OpLog,
        local: LocalVolume,
        bitmap: WriteIntentBitmap,
        *,
        volume: str,
        size: int,
        block_size: int,
        reports: FailureReport,
        begin: Callable[[int, int], bool],
    ) -> None:
        self.log = oplog
        self.local = local
        self.bitmap = bitmap
        self.volume = volume
        self.size = size
        self.block_size = block_size
        self.reports = reports
        self.begin = begin
        self.passes = 0
        # Under the log's lock: the next pass asked for, the ids that asked (and whether for a repair),
        # the running pass's thread, the blocks found and repaired per id, the mismatches to resend.
        self._next: tuple[int, bool] | None = None
        self._ids: OrderedDict[int, bool] = OrderedDict()
        self._thread: threading.Thread | None = None
        self.counts: dict[int, list[int]] = {}  # id -> [mismatched blocks, repaired blocks]; 0: full sync
        self._repairs: deque[Mismatch] = deque()
        self._repair_lock = threading.Lock()

    # -- replies (under the log's lock) -------------------------------------------------------------

    def reply(self, reply: replication_pb2.MirrorReply) -> None:
        """Under the lock, before the acknowledgement of batch `reply.sequence` is processed: queue the
        resend of the blocks its probes found out of sync; start a verify the standby asks for."""
        if reply.HasField("verify") and reply.verify.id:
            self._requested(reply.verify.id, reply.verify.repair)
        batch = self.log.batch(reply.sequence)
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
            counts = self.counts.setdefault(vid, [0, 0])
            counts[0] += len(offsets)
            if vid == 0 and op.release is not None:
                # A full-sync probe: its region stays in flight (one more hold than the acknowledgement
                # releases) until the resend is acknowledged, or becomes dirty if it is dropped.
                for region in self.bitmap.regions(*op.release):
                    self.bitmap.resync_begin(region)
                self._repairs.append(Mismatch(sorted(offsets), 0, op.release))
            elif vid and self._ids.get(vid):
                self._repairs.append(Mismatch(sorted(offsets), vid, None))

    def _requested(self, verify_id: int, repair: bool) -> None:
        """Under the lock: run a verify pass (after the running one, which it cuts short)."""
        if verify_id in self._ids:
            return  # asked already
        self._ids[verify_id] = repair
        while len(self._ids) > REMEMBERED:
            self._ids.popitem(last=False)
        self._next = (verify_id, repair)
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=f"verify-{self.volume}", daemon=True)
            self._thread.start()
        self.log.cond.notify_all()

    # -- verify passes ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.log.cond:
                request, self._next = self._next, None
                if request is None or not self.log.running or not self.log.live:
                    self._thread = None
                    return
                stream_id = self.log.stream_id
            try:
                self._pass(request[0], request[1], stream_id)
            except Exception as e:  # a failed pass must not kill the thread silently
                log.exception("verify_pass_failed", volume=self.volume, error=repr(e))

    def _pass(self, verify_id: int, repair: bool, stream_id: int) -> None:
        """Probe the whole volume, chunk by chunk, each read under the order lock (so each probe sits in
        the stream exactly where its read happened); with `repair`, resend what differs."""
        bs = self.block_size
        chunk = max(PROBE_CHUNK, bs)
        started = time.monotonic()
        self.passes += 1
        log.info("verify_pass_started", volume=self.volume, id=verify_id, repair=repair, bytes=self.size)
        counts = self.counts.setdefault(verify_id, [0, 0])
        window = ProbeWindow(self.log)
        for offset in range(0, self.size, chunk):
            length = min(chunk, self.size - offset)
            window.room()
            with self.local.lock:
                with self.log.cond:
                    stopped = not self.log.current(stream_id) or self._next is not None
                    if stopped:
                        self.counts.pop(verify_id, None)
                if stopped:
                    log.warning("verify_pass_stopped", volume=self.volume, id=verify_id, checked=offset)
                    return
                if self.local.is_hole(offset, length):
                    digests = zero_digests(length, bs)
                else:
                    digests = block_digests(self.local.read_range(offset, length), bs)
                number = self.log.submit(Op(0, offset, None, 0, probe=Probe(length, digests, verify_id)))
            window.sent(number, length)
            if self._repairs:
                self.repair()
        self.log.wait(window.last, mode="sync")
        self.repair()
        with self.log.cond:
            mismatched, repaired = self.counts.pop(verify_id, counts)
        log.info(
            "verify_pass_done",
            volume=self.volume,
            id=verify_id,
            mismatched_blocks=mismatched,
            seconds=round(time.monotonic() - started, 3),
        )
        if repair and mismatched:
            log.info("verify_repair", volume=self.volume, id=verify_id, blocks=repaired, bytes=repaired * bs)

    # -- probes and repairs -------------------------------------------------------------------------

    def probe(self, offset: int, data: bytes, release: tuple[int, int]) -> Op:
        """The probe op of a full sync for the region `release` whose blocks read `data`."""
        length = len(data)
        bs = self.block_size
        digests = zero_digests(length, bs) if is_zero(data) else block_digests(data, bs)
        return Op(0, offset, None, 0, release=release, probe=Probe(length, digests))

    def repairs_waiting(self) -> bool:
        return bool(self._repairs)

    def repair(self) -> None:
        """Resend the blocks probes found out of sync (queued by `reply`), read under the order lock, so
        the resend carries the volume's current data at its point of the stream."""
        with self._repair_lock:
            while True:
                with self.log.cond:
                    if not self._repairs:
                        return
                    item = self._repairs.popleft()
                self._repair_one(item)

    def leftovers(self) -> None:
        """Resends left over by a stream that ended become dirty (unless a repair is running)."""
        with self.log.cond:
            leftover = bool(self._repairs) and not self.log.live
        if leftover and self._repair_lock.acquire(blocking=False):
            self._repair_lock.release()
            self.repair()

    def _repair_one(self, item: Mismatch) -> None:
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
        with self.log.cond:
            stream_id = self.log.stream_id
        self.log.resync_room(stream_id)
        blocks = 0
        with self.local.lock:
            spans: list[tuple[int, int, tuple[int, int] | None]] = []
            if item.hold is not None:
                if self.begin(*item.hold):
                    last = len(runs) - 1
                    spans = [(o, n, item.hold if i == last else None) for i, (o, n) in enumerate(runs)]
            else:
                spans = [(o, n, (o, n)) for o, n in runs if self.begin(o, n)]
            for offset, length, release in spans:
                data = self.local.read_range(offset, length)
                op = Op(0, offset, data, 0, release=release, resync=True, verify_id=item.verify_id)
                if is_zero(data):
                    op = Op(0, offset, None, length, release=release, resync=True, verify_id=item.verify_id)
                with self.log.cond:
                    self.log.add_resync(length)
                    self.log.resent_bytes += length
                    blocks += length // bs
                self.log.submit(op)
        with self.log.cond:
            self.counts.setdefault(item.verify_id, [0, 0])[1] += blocks

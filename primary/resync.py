"""Resync: sending the regions the write-intent bitmap marks dirty, while new writes flow.

After a reconnect the dirty regions are resent in the background (the replica is `inconsistent`
meanwhile): holes and zeroed ranges first (on a full standby disk they make the room the data needs),
then a batch marked `uptodate` ends the resync. A resync cut short resumes with what is still dirty;
after a crash every bit left in the bitmap file is dirty. A full sync of a replica that may hold old data
probes each region instead of sending it, and resends only the blocks that differ (`primary.verify`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from primary.bitmap import WriteIntentBitmap
from primary.local import LocalVolume
from primary.oplog import Op, OpLog
from primary.verify import Checksums, ProbeWindow
from standbylib.errors import StandbyError
from standbylib.rawfile import is_zero
from standbylib.runtime import logs

log = logs.get(__name__)


class Resync:
    """The resync of one volume's mirror: its thread runs `loop`.

    `active` (under the log's lock) says a resync is due or running on the open stream: the mirror sets
    it when a stream opens with dirty regions, clears it when the `uptodate` marker is acknowledged or
    the stream ends. `probing`: the running full sync probes instead of sending."""

    def __init__(
        self,
        oplog: OpLog,
        local: LocalVolume,
        bitmap: WriteIntentBitmap,
        checksums: Checksums,
        *,
        volume: str,
        block_size: int,
    ) -> None:
        self.log = oplog
        self.local = local
        self.bitmap = bitmap
        self.checksums = checksums
        self.volume = volume
        self.block_size = block_size
        self.active = False
        self.probing = False

    def loop(self) -> None:
        """Send the dirty regions while connected, then mark the replica up to date."""
        oplog = self.log
        while oplog.running:
            with oplog.cond:
                oplog.events.wait_for(lambda: not oplog.running or (oplog.live and self.active), 1.0)
                if not oplog.running or not (oplog.live and self.active):
                    continue
                stream_id = oplog.stream_id
            try:
                self._pass(stream_id)
            except StandbyError as e:
                log.warning("resync_interrupted", volume=self.volume, error=str(e))

    def _pass(self, stream_id: int) -> None:
        """Send every dirty region, then the `uptodate` marker once they are applied.

        Holes first, then the regions holding data, each of those as its runs of zero blocks (zeroed
        ranges) before its runs of data: on a standby whose disk is full, the trims free the room the data
        needs, which sending in offset order would never reach. A region's bit is released only by the
        acknowledgement of its last op, as for a client write."""
        oplog, local = self.log, self.local
        started = time.monotonic()
        sent = zeroed = probed = 0
        # A full sync of a replica that may hold old data sends probes of the regions that are not holes;
        # the blocks that differ come back on the acknowledgements and are resent (`Checksums.repair`),
        # before the `uptodate` marker.
        probing = self.probing
        window = ProbeWindow(oplog)
        repaired_before = self.checksums.counts.setdefault(0, [0, 0])[1]
        while True:
            regions = list(self.bitmap.dirty_regions())
            if not regions:
                break
            # 1. The regions that are holes: one zeroed range each. The others wait for step 2.
            data_regions: list[int] = []
            for region in regions:
                with self._turn(stream_id) as current:
                    if not current:
                        return
                    offset, length = self.bitmap.span(region)
                    if not local.is_hole(offset, length):
                        data_regions.append(region)
                        continue
                    self.bitmap.resync_begin(region)
                    oplog.resync_taken(length)
                    oplog.add_resync(length)
                    oplog.submit(Op(0, offset, None, length, resync=True, release=(offset, length)))
                sent += length
                zeroed += length
            # 2. The regions holding data (or probes of them).
            for region in data_regions:
                window.room()
                with self._turn(stream_id) as current:
                    if not current:
                        return
                    offset, length = self.bitmap.resync_begin(region)
                    oplog.resync_taken(length)
                    span = (offset, length)
                    ops: list[Op]
                    if local.is_hole(offset, length):  # trimmed since step 1
                        ops = [Op(0, offset, None, length, resync=True, release=span)]
                    elif probing:
                        ops = [self.checksums.probe(offset, local.read_range(offset, length), span)]
                    else:
                        ops = self._ops(offset, local.read_range(offset, length), span)
                    oplog.add_resync(sum(op.length for op in ops if op.probe is None))
                    for op in ops:
                        last = oplog.submit(op)
                if ops[0].probe is not None:
                    window.sent(last, length)
                    probed += length
                else:
                    sent += length
                    zeroed += sum(op.length for op in ops if op.data is None)
                if self.checksums.repairs_waiting():
                    self.checksums.repair()
            if probing and window.last:
                # Every probe answered (or dropped): resend what they found before the marker.
                oplog.wait(window.last, mode="sync")
                with oplog.cond:
                    if oplog.stream_id != stream_id or not oplog.running:
                        return
                self.checksums.repair()
        # Everything dirty was sent: once it is applied the replica is up to date. (Counted before the
        # marker goes: its acknowledgement ends `active`, and whoever sees that sees the count.)
        with oplog.cond:
            oplog.resent_bytes += sent
        with local.lock:
            marker = oplog.submit(Op(0, 0, None, 0, uptodate=True))
        oplog.wait(marker, mode="sync")
        with oplog.cond:
            if oplog.stream_id != stream_id:
                return  # dropped with its stream (`mirror_disconnected` says why); resumed at the next one
        seconds = round(time.monotonic() - started, 3)
        granularity = self.bitmap.granularity
        if probing:
            repaired = (self.checksums.counts[0][1] - repaired_before) * self.block_size
            log.info(
                "resync_sent",
                volume=self.volume,
                bytes=sent + repaired,
                seconds=seconds,
                granularity=granularity,
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
                granularity=granularity,
                zeroed_bytes=zeroed,
            )

    @contextmanager
    def _turn(self, stream_id: int) -> Iterator[bool]:
        """Wait for room in the resync window, then hold the order lock (a region read now is queued
        before any later write to it): whether stream `stream_id` is still the open one."""
        if not self.log.resync_room(stream_id):
            yield False
            return
        with self.local.lock:
            with self.log.cond:
                current = self.log.current(stream_id)
            yield current

    def _ops(self, offset: int, data: bytes, span: tuple[int, int]) -> list[Op]:
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
        ops = [Op(0, offset + a, None, b - a, resync=True) for a, b in zero_runs]
        for a, b in data_runs:
            chunk = data if (a, b) == (0, len(data)) else bytes(view[a:b])
            ops.append(Op(0, offset + a, chunk, 0, resync=True))
        ops[-1].release = span
        return ops

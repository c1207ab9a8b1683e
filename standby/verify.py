"""Verify: an operator's comparison of a replica with the primary's volume, while writes go on.

`Verifier.start` opens a session and leaves a command for the volume's next Mirror reply
(`Verifier.take_command`); the primary then sends probes (the block digests of its volume) in the ordered
stream and, with repair, resends the blocks found out of sync. `apply_with_probes` compares each probe at
exactly its point of the write sequence, so writes going on never cause a false mismatch
(docs/REPLICATION.md); `Verifier.progress` counts what was compared, found and repaired until the session
is complete. A session fails when its primary disconnects, when the client watching it goes away, or when
the primary makes no progress on it for `VERIFY_STALL_SECONDS`.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from standby.replica import INCONSISTENT, Replica
from standbylib.checksums import DIGEST_SIZE, Payload, Probe, Repair, block_digests, zero_digests
from standbylib.errors import RequestError
from standbylib.runtime import logs
from standbylib.snapshot.volume import Volume, WriteOp

log = logs.get(__name__)

#: Offsets of out-of-sync blocks a verify session keeps (the count is exact).
VERIFY_FIRST_OFFSETS = 20
#: A verify fails when the primary made no progress on it for this long (e.g. a primary too old to verify).
VERIFY_STALL_SECONDS = 60.0

#: What one probe found: (verify id, bytes compared, offsets of the blocks that differ).
ProbeResult = tuple[int, int, list[int]]


class VerifyRefused(RequestError):
    template = "cannot verify volume {volume!r}: {detail}"


class VerifyFailed(RequestError):
    template = "verify of volume {volume!r} failed: {detail}"


@dataclass
class VerifySession:
    """One verify of a replica: progress as the primary's probes (and, with `repair`, resends) arrive."""

    id: int
    volume: str
    repair: bool
    total_bytes: int
    block_size: int
    started: float = field(default_factory=time.monotonic)
    checked_bytes: int = 0
    mismatched_blocks: int = 0
    first_offsets: list[int] = field(default_factory=list)
    repaired_blocks: int = 0
    done: bool = False
    error: str = ""
    last_progress: float = field(default_factory=time.monotonic)
    cond: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def running(self) -> bool:
        return not self.done

    def complete(self) -> bool:
        """Under `cond`: every block was compared and, with `repair`, every mismatch was resent."""
        return self.checked_bytes >= self.total_bytes and (
            not self.repair or self.repaired_blocks >= self.mismatched_blocks
        )


class Verifier:
    """The verify sessions of the replicas (the latest one of each volume), and the commands waiting
    for a volume's next Mirror reply."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, VerifySession] = {}  # by volume: its latest session
        self._commands: dict[str, tuple[int, bool]] = {}  # by volume: (id, repair) for the next reply

    def start(self, replica: Replica, repair: bool) -> VerifySession:
        """Start a verify of `replica`: its next Mirror reply asks the primary for the probes."""
        volume = replica.name
        with self._lock:
            if not replica.connected:
                raise VerifyRefused(
                    volume=volume,
                    detail="no primary is connected; verify compares the replica with the primary's volume",
                )
            if replica.state == INCONSISTENT:
                raise VerifyRefused(
                    volume=volume,
                    detail="a resync from the primary is under way (the replica is inconsistent); verify "
                    "when `standbyctl status` shows it uptodate",
                )
            running = self._sessions.get(volume)
            if running is not None and running.running:
                raise VerifyRefused(volume=volume, detail="another verify of this volume is running")
            session = VerifySession(
                id=secrets.randbits(62) + 1,
                volume=volume,
                repair=repair,
                total_bytes=replica.size,
                block_size=replica.block_size,
            )
            self._sessions[volume] = session
            self._commands[volume] = (session.id, repair)
        log.info("verify_started", volume=volume, id=session.id, repair=repair, bytes=replica.size)
        return session

    def take_command(self, replica: Replica) -> tuple[int, bool] | None:
        """The verify command the next Mirror reply must carry, once."""
        if replica.name not in self._commands:
            return None
        with self._lock:
            return self._commands.pop(replica.name, None)

    def status(self, session: VerifySession, wait: float = 0.0) -> VerifySession:
        """A copy of the session's progress, after waiting up to `wait` seconds for a change or its end."""
        with session.cond:
            if not session.done and wait > 0:
                session.cond.wait(wait)
            if not session.done and time.monotonic() - session.last_progress > VERIFY_STALL_SECONDS:
                _end(
                    session,
                    f"the primary made no progress for {VERIFY_STALL_SECONDS:.0f} s (is it older than this "
                    "standby, or stuck?); run verify again",
                )
            return VerifySession(
                id=session.id,
                volume=session.volume,
                repair=session.repair,
                total_bytes=session.total_bytes,
                block_size=session.block_size,
                started=session.started,
                checked_bytes=session.checked_bytes,
                mismatched_blocks=session.mismatched_blocks,
                first_offsets=list(session.first_offsets),
                repaired_blocks=session.repaired_blocks,
                done=session.done,
                error=session.error,
                last_progress=session.last_progress,
            )

    def cancel(self, session: VerifySession, reason: str) -> None:
        """End the session as failed for `reason`, unless it is over already."""
        _fail(session, reason)

    def primary_gone(self, replica: Replica) -> None:
        """The stream of `replica` ended: its pending command is dropped and its running session fails."""
        with self._lock:
            self._commands.pop(replica.name, None)
            session = self._sessions.get(replica.name)
        if session is not None:
            _fail(session, "the primary disconnected; run verify again")

    def progress(self, replica: Replica, results: list[ProbeResult], repaired: dict[int, int]) -> None:
        """Count what an applied batch's probes compared and found, and the blocks it repaired, in the
        volume's session they name; the session ends when it is complete."""
        with self._lock:
            session = self._sessions.get(replica.name)
        if session is None:
            return
        with session.cond:
            if session.done:
                return
            changed = False
            for verify_id, nbytes, found in results:
                if verify_id != session.id:
                    continue
                changed = True
                session.checked_bytes += nbytes
                session.mismatched_blocks += len(found)
                room = VERIFY_FIRST_OFFSETS - len(session.first_offsets)
                if room > 0:
                    session.first_offsets.extend(found[:room])
            if repaired.get(session.id):
                changed = True
                session.repaired_blocks += repaired[session.id]
            if not changed:
                return
            session.last_progress = time.monotonic()
            if session.complete():
                _end(session)
            session.cond.notify_all()


def _fail(session: VerifySession, reason: str) -> None:
    with session.cond:
        if not session.done:
            _end(session, reason)


def _end(session: VerifySession, error: str = "") -> None:
    """Under `session.cond`: the session is over (failed when `error`)."""
    session.done = True
    session.error = error
    session.cond.notify_all()
    fields: dict[str, Any] = {
        "volume": session.volume,
        "id": session.id,
        "checked_bytes": session.checked_bytes,
        "mismatched_blocks": session.mismatched_blocks,
        "repaired_blocks": session.repaired_blocks,
        "first_offsets": session.first_offsets[:5],
        "seconds": round(time.monotonic() - session.started, 3),
    }
    if error:
        log.warning("verify_failed", error=error, **fields)
    else:
        log.info("verify_done", repair=session.repair, **fields)


def apply_with_probes(
    volume: Volume,
    ops: Sequence[tuple[int, Payload]],
    results: list[ProbeResult],
    repaired: dict[int, int],
) -> None:
    """Apply the writes of a batch that holds probes, comparing each probe where it stands: what it
    found goes to `results`, the blocks each verify's repairs resent to `repaired` (by verify id).

    The writes between two probes are one group commit. (Under ``--on-full defer`` a later group may
    be refused after an earlier one was applied; the primary then resends the whole batch's regions
    by its bitmap, so that is harmless.)"""
    bs = volume.block_size
    group: list[WriteOp] = []
    for offset, payload in ops:
        if isinstance(payload, Probe):
            if group:
                volume.write_batch(group)
                group = []
            results.append((payload.verify_id, payload.length, compare(volume, offset, payload)))
        elif isinstance(payload, Repair):
            group.append((offset, payload.data))
            length = payload.data if isinstance(payload.data, int) else len(payload.data)
            repaired[payload.verify_id] = repaired.get(payload.verify_id, 0) + length // bs
        else:
            group.append((offset, payload))
    if group:
        volume.write_batch(group)


def compare(volume: Volume, offset: int, probe: Probe) -> list[int]:
    """Offsets of the blocks of the probe's range whose digest on the replica differs."""
    bs, length = volume.block_size, probe.length
    runs = volume.extents(offset, length)
    if len(runs) == 1 and runs[0][1]:
        ours = zero_digests(length, bs)  # a hole: zeros, nothing to read
    else:
        ours = block_digests(volume.read(offset, length), bs)
    if ours == probe.digests:
        return []
    theirs, d = probe.digests, DIGEST_SIZE
    return [
        offset + i * bs for i in range(length // bs) if ours[i * d : i * d + d] != theirs[i * d : i * d + d]
    ]

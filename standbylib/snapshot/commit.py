"""The store's commit protocol: transactions, commits, commit records and group commit.

`Committer` is the part of the preservation store (`standbylib.snapshot.store.Store` builds on it)
that makes writes durable. It owns the store file's slot space and journal
(`standbylib.snapshot.slots`) and:

* the commit protocol: every write since the last commit becomes durable with a single ``sync`` of
  the store file, and slots freed meanwhile are reused only after that sync. The table is written
  once per commit, to the copy that does not hold the last durable table, just before the sync;
* group commit (`flush`): callers that want their writes durable share commits. One of them (the
  leader) commits for all, running the sync without the lock so that writes go on meanwhile; those
  wait for the next commit, which covers them all. A caller returns only once a commit prepared after
  its call began has synced; when that commit fails, every caller it covered gets the error.

Crash safety: each commit records, just before its sync, that the commit before it completed. On
open, only the entries of commits after the recorded one can be incomplete
(`standbylib.snapshot.recovery` checks them).

Failures: an operation that fails before its commit completes (no space, an I/O error) is undone
in RAM (`transaction`): the slots it took are given back, and the entries it may have written are
zeroed before any later commit could declare them complete (or, when even that fails, the slots are
kept aside, `quarantine`, and every commit refuses to run until they are zeroed). A failed sync may
have lost any write since the previous sync even if a later sync succeeds (the kernel may drop the
pages it failed to write), so the writes that RAM still relies on are written again before the next
commit's sync.

Threading: `lock` is the store's reader-writer lock (`RWLock`). Only the sync of a group commit runs
without it; at most one commit is between its preparation and its end at any time (`_syncing`), and
a commit made under the lock (`commit`) first waits for that one to end. The `on_invalidated`
listener is called with the exclusive side held.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from standbylib.errors import Closed, StandbyError, StoreError
from standbylib.rawfile import RawFile
from standbylib.snapshot import layout
from standbylib.snapshot.rwlock import RWLock
from standbylib.snapshot.slots import Journal, SlotSpace

#: Longest a group commit's leader waits for the callers of the previous commit (`Committer.flush`).
_GATHER_MAX = 0.005

#: ``on_invalidated(volume, snapshot, reason)``: a snapshot became invalid, durably.
InvalidationListener = Callable[[str, str, str], None]


@dataclass(eq=False)
class _Commit:
    """One commit from its preparation (`Committer._prepare`) to its end (`_finish`).

    What it took from the store when it was prepared goes back if its sync fails: the write ranges
    its sync covers (`covered`), the slots freed before it (`freed`, reused only once it synced), the
    invalidations to tell (`notices`), whether an operation had failed before it (`unsettled`).
    """

    seq: int  # its commit number: the entries written before its preparation carry it (or less)
    synced: bool  # it syncs (something was written since the previous commit)
    table_at: int | None  # the table copy it wrote
    covered: list[list[int]]
    freed: list[int]
    notices: list[tuple[str, str, str]]
    unsettled: bool
    flushers: int = 0  # `flush` callers waiting when it was prepared (it covers them)
    done: bool = False  # its sync returned (set under `_commit_cv`)
    error: BaseException | None = None  # what its sync (or preparation) raised
    finished: bool = False  # `_finish` ran


class Committer:
    """Transactions and commits of one store file, and the slot operations whose writes join the open
    commit. The store built on it (`Store`) supplies the table's bytes (`_pack_table`)."""

    def __init__(self, raw: RawFile, on_invalidated: InvalidationListener | None) -> None:
        self._raw = raw
        self._path = raw.path
        #: Called once per snapshot that became invalid, durably (see `PreservationStore.open`).
        self.on_invalidated = on_invalidated
        #: The store's reader-writer lock: exclusive to change anything, shared to look.
        self.lock = RWLock()
        self._closed = False
        self._journal = Journal(raw)
        self._slots = SlotSpace(raw, self._journal, self.on_abort)
        self._table_seq = 0  # update number of the last durable table
        self._table_pending = False  # the table changed since it was last written
        # Commit state. `_commit_seq` numbers the open commit, the one new writes join;
        # `_durable_seq` is the last one whose sync succeeded (what the next commit record names).
        self._commit_seq = 1
        self._durable_seq = 0
        self._record_parity = 1  # which commit record the next commit writes; flips when one syncs
        # Group commit (`flush`): the commit between its preparation and its end, the leader elected
        # among `flush` callers, and the failures they may have to report, under `_commit_cv`.
        commit_lock = threading.Lock()
        self._commit_cv = threading.Condition(commit_lock)
        self._gather_cv = threading.Condition(commit_lock)  # a caller arrived (for the leader)
        self._syncing: _Commit | None = None
        self._leader = False
        self._flushers: dict[int, int] = {}  # target commit -> `flush` callers waiting for it
        self._last_batch = 0  # callers the last group commit covered
        self._last_sync = 0.0  # seconds the last sync took
        self._failures = 0
        self._failed: tuple[int, BaseException] | None = None  # (commit number, error) of the last
        # Failure handling (see the module docstring).
        self._undo: list[Callable[[], None]] | None = None  # of the operation in progress
        self._unsettled = False  # an operation failed since the last commit
        self._notices: list[tuple[str, str, str]] = []  # invalidations, told once durable

    def _pack_table(self, seq: int) -> bytes:
        """The table as update number `seq` (raises `StoreError` when it does not fit)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ transactions

    def check_open(self) -> None:
        """Raise `Closed` once the store is closed."""
        if self._closed:
            raise Closed(what=f"preservation store {self._path}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Undo the RAM changes of the operation in the block if it fails before its commit.

        Changes register their undo with `on_abort`; a successful `commit` makes everything
        before it durable, so it forgets the undos registered so far. On an exception the undos
        run newest first, then the exception goes on. A transaction inside another joins it.
        Call with the exclusive lock held.
        """
        if self._undo is not None:
            yield
            return
        self._undo = []
        try:
            yield
        except BaseException:
            undo, self._undo = self._undo, None
            self._unsettled = True
            for fn in reversed(undo):
                fn()
            raise
        self._undo = None

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run `fn` if the operation in progress fails before its next commit (see `transaction`)."""
        if self._undo is not None:
            self._undo.append(fn)

    def needs_commit(self) -> bool:
        """Whether something written (or a failure's clean-up) still waits for a commit."""
        return self._journal.dirty or self._table_pending or bool(self._slots.quarantine)

    def unsettled(self) -> bool:
        """Whether an operation failed since the last commit. Its undo left RAM as before, but the
        file may hold what it wrote (a table naming a snapshot whose creation failed): commit before
        changing an origin without preserving, so that no power loss can bring that back."""
        return self._unsettled or self._table_pending or bool(self._slots.quarantine)

    def write_table(self) -> None:
        """Schedule the table for the next commit.

        The table is written once per commit, to the copy that does not hold the
        last durable table, just before the sync: two table writes in one commit
        would overwrite that copy before the new one is durable.
        """
        self._pack_table(self._table_seq + 1)  # refuse an oversized table now, not at commit
        self._table_pending = True
        self._journal.dirty = True

    # ------------------------------------------------------------------ commits

    def commit(self) -> None:
        """Make every write since the last commit durable with one sync; then reuse freed slots.

        Call with the exclusive lock held: the sync runs under it. A group commit in progress
        (`flush`) ends first. Refuses (raising the write's error) while entries of a failed operation
        cannot be zeroed. When it fails, nothing is declared durable: the table stays pending, the
        table copy it may have written is made unreadable (it could describe changes the failed
        operation undoes), and after a failed sync the writes RAM relies on are written again by the
        next commit.
        """
        self._settle()
        c = self._prepare()
        self._sync(c)
        self._finish(c)
        if c.error is not None:
            raise c.error
        if self._undo is not None:
            self._undo.clear()  # durable now: a later failure of the operation keeps it

    def flush(self) -> None:
        """Make every write made so far to the store durable, sharing the commit with other callers.

        Group commit: while a commit's sync is in progress, callers wait for it to end, then one of
        them (the leader) commits for all of them, with its sync outside the lock so that writes go
        on meanwhile. A caller returns once a commit prepared after its call began has synced. When
        that commit fails, every caller it covered raises the error, and nothing is reported durable
        (the next commit writes again what the failed sync may have lost). Called with the exclusive
        lock held, it commits under it (`commit`). Raises `Closed` once the store is closed.

        Before preparing, the leader waits a little (`_GATHER_MAX` at most, and half the duration of
        the last sync) for as many callers as the previous group commit covered: callers that it
        released come back with their next request within a millisecond or so, and would otherwise
        just miss the next commit and wait for two syncs instead of one. The next leader is elected
        as soon as a sync returns; it ends that commit itself (`_settle`) if its leader has not yet.
        """
        if self.lock.owned():
            with self.lock:
                self.check_open()
                self.commit()
            return
        cv = self._commit_cv
        with cv:
            # Everything written so far carries at most `_commit_seq`, which only `_prepare` moves on
            # (under this condition's lock): the commits after the one syncing cover it.
            target = self._commit_seq
            failures = self._failures
            self._flushers[target] = self._flushers.get(target, 0) + 1
            self._gather_cv.notify()
        try:
            while True:
                with cv:
                    while True:
                        if self._durable_seq >= target:
                            return
                        failed = self._failed
                        if self._failures != failures and failed is not None and failed[0] >= target:
                            raise _copy_error(failed[1], self._path)
                        if self._closed:
                            raise Closed(what=f"preservation store {self._path}")
                        syncing = self._syncing
                        if not self._leader and (syncing is None or syncing.done):
                            self._leader = True
                            break
                        cv.wait()
                    self._gather()
                self._lead(target)
        finally:
            with cv:
                left = self._flushers[target] - 1
                if left:
                    self._flushers[target] = left
                else:
                    del self._flushers[target]

    def _waiting_flushers(self) -> int:
        """`flush` callers not covered by a synced commit yet (under `_commit_cv`)."""
        return sum(n for t, n in self._flushers.items() if t > self._durable_seq)

    def _gather(self) -> None:
        """The elected leader, under `_commit_cv`: wait a little for the previous batch to come back."""
        if self._last_batch <= 1:
            return
        deadline = time.monotonic() + min(self._last_sync / 2, _GATHER_MAX)
        while self._waiting_flushers() < self._last_batch and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._gather_cv.wait(left)

    def _lead(self, target: int) -> None:
        """Commit for every `flush` caller: prepare under the lock, sync without it, finish under it.
        The leadership ends once the sync returned (or nothing was to be synced)."""
        try:
            with self.lock:
                self.check_open()
                self._settle()
                if self._durable_seq >= target:
                    c = None  # a commit made meanwhile under the lock covered it
                else:
                    try:
                        c = self._prepare()
                    except BaseException as e:
                        self._fail(self._commit_seq, e)
                        raise
        except BaseException:
            self._resign()
            raise
        if c is None:
            self._resign()
            return
        self._sync(c, leader=True)
        with self.lock:
            self._finish(c)  # unless the next leader (`_settle`) or `close` finished it already
        if c.error is not None:
            raise c.error

    def _resign(self) -> None:
        with self._commit_cv:
            self._leader = False
            self._commit_cv.notify_all()

    def _wake_flushers(self) -> None:
        """Once the store is closed: `flush` callers waiting get `Closed`."""
        with self._commit_cv:
            self._commit_cv.notify_all()
            self._gather_cv.notify_all()

    def _settle(self) -> None:
        """With the exclusive lock held: wait for the sync of a group commit in progress, and end it."""
        c = self._syncing
        if c is None:
            return
        with self._commit_cv:
            while not c.done:
                self._commit_cv.wait()
        self._finish(c)

    def _prepare(self) -> _Commit:
        """First half of a commit, with the exclusive lock held and no commit in progress.

        Writes what the next sync must make durable (writes lost by a failed sync, the table, the
        commit record naming the last commit known synced) and takes the lists that wait for that
        sync; from here on new writes carry the next commit number. Raises, with nothing taken,
        when a write fails.
        """
        journal = self._journal
        self._slots.settle_quarantine()
        if journal.sync_failed:
            journal.rewrite()
        table_at: int | None = None
        try:
            if self._table_pending:
                # Update n goes to copy n % 2: never the copy holding the last durable table (n - 1),
                # however many times a failed commit is retried.
                seq = self._table_seq + 1
                table_at = layout.TABLE_OFFSETS[seq % 2]
                self._raw.pwrite(self._pack_table(seq), table_at)
                journal.dirty = True
            if journal.dirty:
                # Say which commit is known to have ended with a sync, so that recovery checks only
                # the entries of commits that may not have completed. Two records, alternately (the
                # alternation moves on only when a commit syncs): a torn record never hides the
                # previous one (recovery would otherwise check, and drop, entries of long-complete
                # commits).
                record_at = layout.COMMIT_RECORD_OFFSETS[self._record_parity]
                self._raw.pwrite(layout.pack_commit_record(self._durable_seq), record_at)
        except BaseException:
            if table_at is not None:
                with contextlib.suppress(StandbyError):
                    journal.zero(table_at, layout.TABLE_HEADER_SIZE)
            raise
        slots = self._slots
        c = _Commit(
            seq=self._commit_seq,
            synced=journal.dirty,
            table_at=table_at,
            covered=journal.take(),
            freed=slots.pending,
            notices=self._notices,
            unsettled=self._unsettled,
        )
        slots.pending, self._notices = [], []
        self._table_pending = False
        self._unsettled = False
        journal.dirty = False
        with self._commit_cv:
            c.flushers = self._waiting_flushers()
            self._commit_seq += 1  # writes made from now on (during the sync) belong to the next commit
        self._syncing = c
        return c

    def _sync(self, c: _Commit, *, leader: bool = False) -> None:
        """The sync of commit `c` (with or without the lock); its outcome is published at once, so
        that `flush` callers it covers return without waiting for `_finish` (and, from a group
        commit's `leader`, the next leader may be elected)."""
        error: BaseException | None = None
        if c.synced:
            start = time.monotonic()
            try:
                self._raw.sync()
            except BaseException as e:
                error = e
            self._last_sync = time.monotonic() - start
        with self._commit_cv:
            c.error = error
            c.done = True
            if leader:
                self._leader = False
                self._last_batch = c.flushers
            if error is None:
                self._durable_seq = c.seq  # every write before its preparation is durable
            else:
                self._failures += 1
                self._failed = (c.seq, error)
            self._commit_cv.notify_all()

    def _fail(self, seq: int, error: BaseException) -> None:
        """A commit covering the writes up to commit `seq` failed before its sync: tell `flush` callers."""
        with self._commit_cv:
            self._failures += 1
            self._failed = (seq, error)
            self._commit_cv.notify_all()

    def _finish(self, c: _Commit) -> None:
        """End commit `c`, with the exclusive lock held: reuse the slots freed before it and tell the
        invalidations once it synced; otherwise give back what it took, so that the next commit
        writes again what the failed sync may have lost and the slots wait for that one."""
        if c.finished:
            return
        c.finished = True
        self._syncing = None
        if c.error is None:
            if c.table_at is not None:
                self._table_seq += 1
            if c.synced:
                self._record_parity ^= 1
            if c.freed:
                self._slots.release(c.freed)
            if c.notices and self.on_invalidated is not None:
                for volume, snapshot, reason in c.notices:
                    with contextlib.suppress(Exception):
                        self.on_invalidated(volume, snapshot, reason)
        else:
            journal = self._journal
            journal.sync_failed = True
            journal.dirty = True
            if c.table_at is not None:
                self._table_pending = True
                with contextlib.suppress(StandbyError):
                    journal.zero(c.table_at, layout.TABLE_HEADER_SIZE)
            journal.put_back(c.covered)
            self._slots.pending[:0] = c.freed
            self._notices[:0] = c.notices
            self._unsettled = self._unsettled or c.unsettled
        # No one to wake: `_sync` published the outcome (`flush` callers and `_settle` wait for that).

    # ------------------------------------------------------------------ slots, written in the open commit

    def allocate(self, slot_size: int, n: int) -> list[int]:
        """Take `n` free slots of `slot_size`, lowest first, adding areas as needed; given back if the
        operation in progress fails before its commit."""
        return self._slots.allocate(slot_size, n)

    def write_slots(self, slots: list[int], data: memoryview, slot_size: int) -> None:
        """Write consecutive `slot_size` pieces of `data` to `slots` (durable with the next commit)."""
        self._slots.write_slots(slots, data, slot_size)

    def write_entries(
        self,
        slots: list[int],
        kind: int,
        vol: int,
        tags: Iterable[int],
        blocks: Iterable[int],
        sums: list[int] | None,
        segments: list[tuple[int, int]] | None,
    ) -> None:
        """Write the entries describing `slots`, in the open commit (see `SlotSpace.write_entries`)."""
        self._slots.write_entries(slots, kind, vol, tags, blocks, sums, segments, self._commit_seq)

    def note_written(self, offset: int, length: int) -> None:
        """Remember a write made to the store file directly, which RAM will rely on once committed."""
        self._journal.note(offset, length)

    def slot_offset(self, slot: int) -> int:
        """Where the data of `slot` is in the store file."""
        return self._slots.slot_offset(slot)

    def slot_offsets(self, slots: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """`slot_offset` of each of `slots`, vectorised; -1 for a hole entry (it has no data)."""
        return self._slots.slot_offsets(slots)

    def is_hole(self, slots: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
        """For each of `slots`, whether it is a hole entry (no data: the block read as zeros)."""
        return self._slots.is_hole(slots)

    @staticmethod
    def slot_runs(slots: list[int]) -> list[tuple[int, int]]:
        """Split positions [0, n) of `slots` into runs contiguous in the file (`SlotSpace.slot_runs`)."""
        return SlotSpace.slot_runs(slots)

    @staticmethod
    def copy_pieces(runs: list[tuple[int, int]], blocks: list[int]) -> list[tuple[int, int]]:
        """Split slot `runs` where `blocks` are not consecutive either (`SlotSpace.copy_pieces`)."""
        return SlotSpace.copy_pieces(runs, blocks)

    def release(self, slots: Iterable[int]) -> None:
        """Free `slots` now and deallocate their data (their snapshot's removal is durable)."""
        self._slots.release(slots)

    def free_rewritten(self, slots: list[int]) -> None:
        """Free `slots`, whose blocks a writable snapshot rewrote, once the next commit synced (their
        data stays allocated for the next writes; see `SlotSpace.free_rewritten`)."""
        self._slots.free_rewritten(slots)

    def deallocate_free(self) -> None:
        """Punch holes in the free slots that rewrites left allocated (when a snapshot is deleted)."""
        self._slots.deallocate_free()

    def has_pending_frees(self) -> bool:
        """Whether slots freed since the last commit wait for the next one to be reused."""
        return bool(self._slots.pending)


def _copy_error(error: BaseException, path: str) -> BaseException:
    """The error of a failed commit, for one more `flush` caller it covered (each raises its own)."""
    if isinstance(error, StandbyError):
        with contextlib.suppress(Exception):
            return type(error)(**error.fields)
    return StoreError(path=path, detail=f"a commit failed: {error}")

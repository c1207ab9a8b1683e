"""A reader-writer lock for the preservation store: many snapshot readers, or one writer.

Snapshot reads (and read plans, until their bytes are copied) take the *shared* side, so reads of
several NBD connections run in parallel; anything that changes the origin, the store or the index
(origin writes, snapshot writes, create/delete/invalidate, commit, close) takes the *exclusive* side,
except the sync of a group commit, which runs without the lock (`PreservationStore.flush`).
``with lock:`` means the exclusive side, so code written for the store's former `threading.RLock`
keeps its meaning.

Fairness is phase-fair: a waiting writer stops new readers from entering, and a writer leaving admits
every reader that queued behind it before the next writer. Neither side starves: replication keeps
flowing under a steady NBD read load, and reads keep flowing under a steady stream of batches.

Re-entrancy: the exclusive side is re-entrant, and its holder may also take the shared side (it then
holds both until it releases both). A thread holding the shared side may take it again (it never
waits then, even behind a queued writer), but must not ask for the exclusive side: that would wait
for itself, so it raises `RuntimeError` instead.
"""

from __future__ import annotations

import threading


class RWLock:
    """Shared/exclusive lock; see the module docstring for fairness and re-entrancy."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._readers_ok = threading.Condition(self._mutex)
        self._writer_ok = threading.Condition(self._mutex)
        self._readers = 0  # shared holds granted (a thread holding it twice counts twice)
        self._writer: int | None = None  # thread holding the exclusive side
        self._depth = 0  # its nesting depth
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._phase = 0  # bumped when a leaving writer admits the queued readers
        self._local = threading.local()

    # -- shared -----------------------------------------------------------------------------------------

    def acquire_shared(self) -> None:
        me = threading.get_ident()
        held: int = getattr(self._local, "shared", 0)
        with self._mutex:
            if held or self._writer == me or (self._writer is None and not self._waiting_writers):
                self._readers += 1
            else:
                self._waiting_readers += 1
                phase = self._phase
                while self._phase == phase:
                    self._readers_ok.wait()
                # Admitted by `_admit_readers`, which counted us in `_readers` already.
        self._local.shared = held + 1

    def release_shared(self) -> None:
        held: int = getattr(self._local, "shared", 0)
        if not held:
            raise RuntimeError("release_shared without acquire_shared in this thread")
        self._local.shared = held - 1
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._waiting_writers:
                self._writer_ok.notify()

    def shared(self) -> _Shared:
        """``with lock.shared():`` holds the shared side for the block."""
        return _Shared(self)

    # -- exclusive --------------------------------------------------------------------------------------

    def acquire_exclusive(self) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._writer == me:
                self._depth += 1
                return
            if getattr(self._local, "shared", 0):
                raise RuntimeError("cannot take the exclusive side while holding the shared side")
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._writer_ok.wait()
            except BaseException:
                self._waiting_writers -= 1
                if self._writer is None and not self._waiting_writers:
                    self._admit_readers()
                raise
            self._waiting_writers -= 1
            self._writer = me
            self._depth = 1

    def release_exclusive(self) -> None:
        with self._mutex:
            if self._writer != threading.get_ident():
                raise RuntimeError("release_exclusive by a thread that does not hold the exclusive side")
            self._depth -= 1
            if self._depth:
                return
            self._writer = None
            if self._waiting_readers:
                self._admit_readers()
            elif self._waiting_writers:
                self._writer_ok.notify()

    def owned(self) -> bool:
        """Whether the calling thread holds the exclusive side."""
        return self._writer == threading.get_ident()

    def _admit_readers(self) -> None:
        self._readers += self._waiting_readers
        self._waiting_readers = 0
        self._phase += 1
        self._readers_ok.notify_all()

    def __enter__(self) -> RWLock:
        self.acquire_exclusive()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_exclusive()


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_shared()

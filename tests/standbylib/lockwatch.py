"""Support of the lock tests (no tests here): seeing that a thread is blocked by an `RWLock`.

A thread that set an event just before calling ``acquire_*`` may not have reached the lock yet, so "it
has not acquired" would prove nothing. `Waiting` watches one of the lock's conditions instead: a
thread counted there found the lock taken and went to sleep on it, which is the ordering the tests
claim."""

from __future__ import annotations

import threading

from standbylib.snapshot.rwlock import RWLock


class Waiting:
    """Counts the waits on `cond` (a condition of an `RWLock`) from now on."""

    def __init__(self, cond: threading.Condition) -> None:
        self.count = 0
        self._seen = threading.Condition()
        real = cond.wait

        def wait(timeout: float | None = None) -> bool:
            with self._seen:
                self.count += 1
                self._seen.notify_all()
            return real(timeout)

        cond.wait = wait  # type: ignore[method-assign]

    def reach(self, n: int, timeout: float = 5.0) -> bool:
        """True once `n` waits began (False after `timeout` seconds)."""
        with self._seen:
            return self._seen.wait_for(lambda: self.count >= n, timeout)


def waiting_writers(lock: RWLock) -> Waiting:
    """Writers that found `lock` held and wait for it."""
    return Waiting(lock._writer_ok)


def waiting_readers(lock: RWLock) -> Waiting:
    """Readers that found `lock` held (or a writer queued) and wait for it."""
    return Waiting(lock._readers_ok)

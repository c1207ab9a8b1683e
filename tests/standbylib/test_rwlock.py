"""The store's reader-writer lock: readers share, writers exclude, neither side starves.

The orderings are observed, not slept for: `lockwatch` sees a thread go to sleep on the lock, so "it has
not acquired yet" is checked while it is known to be blocked by the lock."""

from __future__ import annotations

import threading
import time

import pytest
from lockwatch import waiting_readers, waiting_writers

from standbylib.snapshot.rwlock import RWLock


def start(target: object) -> threading.Thread:
    # Daemon threads: a lock that deadlocks fails the test (a join times out) instead of hanging pytest.
    t = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = RWLock()
    writers = waiting_writers(lock)
    inside = threading.Barrier(4, timeout=5)  # the three readers and this thread
    release = threading.Event()
    order: list[str] = []

    def reader() -> None:
        with lock.shared():
            inside.wait()  # all three readers hold the lock at once
            release.wait(5)
            order.append("reader leaves")  # still holding the lock

    def writer() -> None:
        with lock:
            order.append("writer in")

    readers = [start(reader) for _ in range(3)]
    inside.wait()  # raises BrokenBarrierError unless the three readers got in together
    w = start(writer)
    assert writers.reach(1), "the writer did not wait for the lock the readers hold"
    assert order == [], "the writer got in while readers held the lock"
    release.set()
    w.join(5)
    for t in readers:
        t.join(5)
    assert not w.is_alive() and not any(t.is_alive() for t in readers)
    assert order == ["reader leaves"] * 3 + ["writer in"]


def test_a_waiting_writer_is_not_starved_by_a_stream_of_readers() -> None:
    lock = RWLock()
    stop = threading.Event()
    wrote = threading.Event()
    reading = [threading.Event() for _ in range(4)]
    reads_after = [0] * 4  # reads each reader did once the writer was through

    def reader(i: int) -> None:
        while not stop.is_set():
            with lock.shared():
                # A read takes a while: the four readers overlap, so the lock is always held shared.
                time.sleep(0.001)
            reading[i].set()
            if wrote.is_set():
                reads_after[i] += 1

    readers = [start(lambda i=i: reader(i)) for i in range(4)]
    for e in reading:
        assert e.wait(5), "a reader never got the lock"
    w = start(lambda: (lock.acquire_exclusive(), wrote.set(), lock.release_exclusive()))
    w.join(5)
    assert wrote.is_set(), "the writer was starved by the readers"
    deadline = time.monotonic() + 5
    while sum(reads_after) < 4 and time.monotonic() < deadline:  # nor are readers starved after it
        time.sleep(0.001)
    stop.set()
    for t in readers:
        t.join(5)
    assert sum(reads_after) >= 4, "the readers did not go on after the writer"


def queue_behind_the_holder(held: str, first: str, second: str, why: tuple[str, str]) -> None:
    """With the lock held (`held`: "shared" or "exclusive"), a thread of kind `first` then one of kind
    `second` ("r" a reader, "w" a writer) each queue on the lock (`why`: what it means if one does not);
    once the holder releases it, they get in in the order they queued."""
    lock = RWLock()
    waiting = {"w": waiting_writers(lock), "r": waiting_readers(lock)}
    order: list[str] = []

    def enter(kind: str) -> None:
        with lock if kind == "w" else lock.shared():
            order.append(kind)

    hold, release = (
        (lock.acquire_shared, lock.release_shared)
        if held == "shared"
        else (lock.acquire_exclusive, lock.release_exclusive)
    )
    hold()
    threads = []
    for kind, message in zip((first, second), why, strict=True):
        threads.append(start(lambda kind=kind: enter(kind)))
        assert waiting[kind].reach(1), message
    assert order == []
    release()
    for t in threads:
        t.join(5)
    assert order == [first, second]


def test_readers_arriving_behind_a_waiting_writer_wait_for_it() -> None:
    """What keeps a stream of readers from starving a writer: once it waits, a new reader does not
    overlap the readers already in (which would keep the lock shared forever), it queues."""
    why = ("the writer did not wait for the reader", "a reader got in past a waiting writer")
    queue_behind_the_holder("shared", "w", "r", why)


def test_readers_queued_behind_a_writer_go_before_the_next_writer() -> None:
    why = ("the reader did not queue behind the writer", "the second writer did not queue")
    queue_behind_the_holder("exclusive", "r", "w", why)


def test_exclusive_is_reentrant_and_its_holder_may_read() -> None:
    lock = RWLock()
    with lock, lock, lock.shared():
        pass
    # Fully released: another thread can write.
    done = threading.Event()
    t = start(lambda: (lock.acquire_exclusive(), done.set(), lock.release_exclusive()))
    t.join(5)
    assert done.is_set()


def test_a_reader_may_read_again_even_behind_a_waiting_writer_but_not_upgrade() -> None:
    lock = RWLock()
    writers = waiting_writers(lock)
    holding = threading.Event()
    go = threading.Event()
    order: list[str] = []
    upgrade: list[BaseException] = []

    def reader() -> None:
        lock.acquire_shared()
        holding.set()
        go.wait(5)
        lock.acquire_shared()  # nested: must not wait for the queued writer (that would deadlock)
        order.append("nested read")
        lock.release_shared()
        try:
            lock.acquire_exclusive()
        except RuntimeError as e:
            upgrade.append(e)
        order.append("reader leaves")
        lock.release_shared()

    def writer() -> None:
        with lock:
            order.append("writer in")

    r = start(reader)
    assert holding.wait(5)
    w = start(writer)
    assert writers.reach(1), "the writer did not queue behind the reader"
    go.set()  # the nested read comes while the writer waits
    r.join(5)
    assert not r.is_alive(), "the nested read waited for the queued writer: deadlock"
    assert len(upgrade) == 1, "a reader asking for the exclusive side was not refused"
    w.join(5)
    assert not w.is_alive()
    assert order == ["nested read", "reader leaves", "writer in"]


def test_release_without_acquire_is_an_error() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError):
        lock.release_shared()
    with pytest.raises(RuntimeError):
        lock.release_exclusive()

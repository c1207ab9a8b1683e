"""The store's reader-writer lock: readers share, writers exclude, neither side starves."""

from __future__ import annotations

import threading
import time

import pytest

from standbylib.snapshot.rwlock import RWLock


def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = RWLock()
    inside = threading.Barrier(3, timeout=5)
    release = threading.Event()
    wrote = threading.Event()

    def reader() -> None:
        with lock.shared():
            inside.wait()  # all three readers hold the lock at once
            release.wait(5)

    def writer() -> None:
        with lock:
            wrote.set()

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.1)
    assert not wrote.is_set()
    release.set()
    w.join(5)
    assert wrote.is_set()
    for t in readers:
        t.join(5)


def test_a_waiting_writer_is_not_starved_by_a_stream_of_readers() -> None:
    lock = RWLock()
    stop = threading.Event()
    wrote = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            with lock.shared():
                time.sleep(0.001)

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for t in readers:
        t.start()
    time.sleep(0.05)
    w = threading.Thread(target=lambda: (lock.acquire_exclusive(), wrote.set(), lock.release_exclusive()))
    w.start()
    w.join(5)
    stop.set()
    for t in readers:
        t.join(5)
    assert wrote.is_set()


def test_readers_queued_behind_a_writer_go_before_the_next_writer() -> None:
    lock = RWLock()
    order: list[str] = []

    def read() -> None:
        with lock.shared():
            order.append("r")

    def write() -> None:
        with lock:
            order.append("w")

    lock.acquire_exclusive()
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.05)
    second = threading.Thread(target=write)
    second.start()
    time.sleep(0.05)
    lock.release_exclusive()
    reader.join(5)
    second.join(5)
    assert order == ["r", "w"]


def test_exclusive_is_reentrant_and_its_holder_may_read() -> None:
    lock = RWLock()
    with lock, lock, lock.shared():
        pass
    # Fully released: another thread can write.
    done = threading.Event()
    t = threading.Thread(target=lambda: (lock.acquire_exclusive(), done.set(), lock.release_exclusive()))
    t.start()
    t.join(5)
    assert done.is_set()


def test_a_reader_may_read_again_even_behind_a_waiting_writer_but_not_upgrade() -> None:
    lock = RWLock()
    lock.acquire_shared()
    w = threading.Thread(target=lambda: (lock.acquire_exclusive(), lock.release_exclusive()))
    w.start()
    time.sleep(0.05)
    lock.acquire_shared()  # nested: must not wait for the queued writer (that would deadlock)
    lock.release_shared()
    with pytest.raises(RuntimeError):
        lock.acquire_exclusive()
    lock.release_shared()
    w.join(5)
    assert not w.is_alive()


def test_release_without_acquire_is_an_error() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError):
        lock.release_shared()
    with pytest.raises(RuntimeError):
        lock.release_exclusive()

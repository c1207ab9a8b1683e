"""Group commit: FUA writes and flushes of a writable snapshot share store commits, and lose nothing.

An NBD FUA write to a writable snapshot is `Snapshot.write` then `Snapshot.flush`; with several
requests in flight, flushes arriving while a commit's sync runs wait for the next commit, which covers
them all (`PreservationStore.flush`). These tests run concurrent writers on a store whose syncs are
slow (`SlowSyncFile`), and check:

* concurrent FUA writers share commits (far fewer syncs than FUA writes), and each flush returns only
  after a sync that began after its write had returned;
* one writer alone gets one commit per flush (nothing skipped);
* every acknowledged FUA write survives a power cut at any point of a concurrent workload (snapshot
  FUA, flush and plain writes, origin batches copying on write meanwhile), whatever the cut keeps of
  the writes not yet synced (`faultfile.Replay`: none, all, torn);
* a failed commit fails every flush it covered, reports nothing durable, and the next commit writes
  again what the failed sync lost;
* closing the store waits for the sync in progress; later flushes raise `Closed`;
* the vectorised index update and the slots that rewrites free (left allocated for reuse, punched
  when a snapshot is deleted).

Reproduce a power-cut failure with the seed in its message: ``GROUP_COMMIT_SEED=<seed> pytest -k power_cut``.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from faultfile import MODES, Disk, Fault, Replay
from storecheck import assert_accounting

from standbylib.blockdev import Device
from standbylib.errors import Closed, DeviceError
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Snapshot
from standbylib.snapshot.index import ChainIndex

BS = 4096
VOLUME = "vol"
NEVER = 1 << 62
SEED = int(os.environ.get("GROUP_COMMIT_SEED", "20261207"))

tick: Callable[[], int] = itertools.count().__next__  # a logical clock shared by all threads


class LockedDisk(Disk):
    """A `Disk` whose trace takes events from several threads (the group commit's sync runs outside
    the store's lock, while other threads write)."""

    def __init__(self) -> None:
        super().__init__()
        self.mutex = threading.Lock()

    def record(self, file: str, kind: str, offset: int = 0, data: bytes = b"", length: int = 0) -> None:
        with self.mutex:
            super().record(file, kind, offset, data, length)


class SlowSyncFile:
    """A `RawFile` around `inner` whose syncs take `delay` seconds longer, counted and timed; other
    threads go on writing meanwhile. A traced `FaultFile` puts the sync point where `point` says:

    * ``"start"``: writes made during the sync are not covered by it (the least fdatasync promises);
    * ``"end"``: a power cut during the sync may keep any of the writes since the previous sync,
      those made during it included, while losing others (a sync writes back in no particular order).
    """

    def __init__(self, inner: Any, delay: float, point: str = "start") -> None:
        self.inner = inner
        self.delay = delay
        self.point = point
        self.path = inner.path
        self.counters = inner.counters
        self.syncs: list[tuple[int, int]] = []  # (start, end) ticks
        self.in_sync = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def sync(self) -> None:
        start = tick()
        self.in_sync.set()
        try:
            if self.point == "start":
                self.inner.sync()
            time.sleep(self.delay)  # a slow device: other callers arrive while this sync runs
            if self.point == "end":
                self.inner.sync()
        finally:
            self.in_sync.clear()
        self.syncs.append((start, tick()))


def run_threads(n: int, target: Callable[[int], None]) -> None:
    """Run `target(i)` in `n` threads started together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a writer thread hangs"
    if errors:
        raise errors[0]


def mem_rig(delay: float, blocks: int = 256) -> tuple[PreservationStore, SlowSyncFile, Snapshot]:
    raw = SlowSyncFile(MemFile(path="<store>"), delay)
    store = PreservationStore.open_raw(raw, 64 << 20)  # type: ignore[arg-type]
    vol = store.attach(VOLUME, Device(MemFile(bytes(blocks * BS)), blocks * BS), block_size=BS)
    return store, raw, vol.create_snapshot("w", writable=True)


# ------------------------------------------------------------------ sharing commits


def test_concurrent_fua_writers_share_commits_and_each_waits_for_a_sync_after_its_write() -> None:
    store, raw, snap = mem_rig(delay=0.01)
    writers, per_writer = 8, 12
    done: list[tuple[int, int]] = []  # (tick when the write returned, tick when the flush returned)
    lock = threading.Lock()

    def fua_writer(i: int) -> None:
        rng = random.Random(SEED + i)
        for k in range(per_writer):
            n = rng.randint(1, 4)
            block = i * 32 + rng.randrange(32 - n)
            snap.write(block * BS, bytes([i * 16 + k % 16 + 1]) * (n * BS))
            written = tick()
            snap.flush()
            with lock:
                done.append((written, tick()))

    syncs_before = len(raw.syncs)
    run_threads(writers, fua_writer)
    syncs = raw.syncs[syncs_before:]
    fua = writers * per_writer
    assert len(done) == fua
    # Before group commit each flush committed on its own, under the store's lock: one sync each.
    assert len(syncs) <= fua // 3, f"{len(syncs)} syncs for {fua} concurrent FUA writes: commits not shared"
    for written, acked in done:
        assert any(written < start and end < acked for start, end in syncs), (
            "a flush returned without a sync that began after its write"
        )
    assert_accounting(store)
    store.close()


def test_a_single_fua_writer_gets_one_commit_per_flush() -> None:
    store, raw, snap = mem_rig(delay=0.002)
    before = len(raw.syncs)
    for k in range(10):
        snap.write(k * BS, bytes([k + 1]) * BS)
        written = tick()
        snap.flush()
        assert raw.syncs[-1][0] > written
    assert len(raw.syncs) - before == 10
    snap.flush()  # nothing written since: no sync
    assert len(raw.syncs) - before == 10
    store.close()


# ------------------------------------------------------------------ power cuts


@dataclass
class Version:
    data: bytes
    start: int  # event number when its write was called
    written: int  # event number when its write returned
    durable: int = NEVER  # event number by which a flush that covers it had returned


@pytest.mark.parametrize("point", ["start", "end"])
def test_every_acknowledged_fua_write_survives_a_power_cut(point: str) -> None:
    """Snapshot writers (FUA, write then flush, plain writes) and an origin writer run concurrently on
    traced files; at cut points over the trace, the reopened snapshot must read, for every block, its
    last version acknowledged before the cut or a version written after it, never an older one."""
    seed = SEED
    rng = random.Random(seed)
    writers, per_writer, own = 6, 24, 16  # each snapshot writer owns `own` blocks
    blocks = writers * own + 16
    size = blocks * BS
    capacity = 16 << 20
    disk = LockedDisk()
    frozen = rng.randbytes(size)
    origin_raw = disk.file("origin", frozen)
    store_raw = SlowSyncFile(disk.file("store"), delay=0.002, point=point)
    store = PreservationStore.open_raw(store_raw, capacity)  # type: ignore[arg-type]
    vol = store.attach(VOLUME, Device(origin_raw, size), block_size=BS)
    snap = vol.create_snapshot("w", writable=True)
    begin = disk.now  # the snapshot exists from here on
    versions: dict[int, list[Version]] = {}
    flushes: list[tuple[int, int]] = []  # (event when called, event when returned)
    record = threading.Lock()

    def snapshot_writer(i: int) -> None:
        r = random.Random(seed * 31 + i)
        image = bytearray(frozen[i * own * BS : (i + 1) * own * BS])
        for _ in range(per_writer):
            first = r.randrange(own - 2)
            n = r.randint(1, 3)
            offset = first * BS
            if r.random() < 0.25:  # a partial block: read-modify-write in the engine
                offset += r.randrange(1, BS)
            data = r.randbytes(min(n * BS, own * BS - offset))
            start = disk.now
            snap.write(i * own * BS + offset, data)
            written = disk.now
            image[offset : offset + len(data)] = data
            with record:
                for b in range(offset // BS, (offset + len(data) - 1) // BS + 1):
                    block = bytes(image[b * BS : (b + 1) * BS])
                    versions.setdefault(i * own + b, []).append(Version(block, start, written))
            if r.random() < 0.75:  # a FUA write, or a write then a flush: the same calls
                called = disk.now
                snap.flush()
                with record:
                    flushes.append((called, disk.now))

    def origin_writer() -> None:
        r = random.Random(seed * 17)
        for _ in range(40):
            ops: list[tuple[int, bytes | int]] = []
            for _ in range(r.randint(1, 3)):
                b = r.randrange(blocks - 2)
                ops.append((b * BS, r.randbytes(r.randint(1, 2) * BS)))
            vol.write_batch(ops)
            time.sleep(0.001)  # paced: the origin batches spread over the snapshot writers' flushes

    run_threads(writers + 1, lambda i: snapshot_writer(i) if i < writers else origin_writer())
    end = disk.now
    # A write is durable once a flush called after it returned has returned.
    for vs in versions.values():
        for v in vs:
            v.durable = min((back for called, back in flushes if called >= v.written), default=NEVER)
    acked = sum(1 for vs in versions.values() for v in vs if v.durable < NEVER)
    assert acked > writers * per_writer // 2
    store.close()

    # Random cuts; a cut right where each flush returned (what it acknowledged must be there); and
    # cuts just before syncs of the store (everything since the previous sync may be kept or lost).
    syncs = [e for e in disk.sync_events("store") if e >= begin]
    cuts = sorted(
        {
            *rng.sample(range(begin, end + 1), 32),
            end,
            *(back for _c, back in flushes),
            *rng.sample(syncs, min(48, len(syncs))),
        }
    )
    for mode in MODES:
        replay = Replay(disk)
        for cut in cuts:
            images = replay.images(cut, mode, random.Random(cut))
            where = f"seed={seed} sync point={point} mode={mode} cut={cut}/{end}"
            again = PreservationStore.open_raw(MemFile(bytes(images["store"])), capacity)
            try:
                reopened = again.attach(VOLUME, Device(MemFile(bytes(images["origin"])), size), block_size=BS)
                got = reopened.snapshot("w")
                assert got.valid, f"{where}: the snapshot is invalid"
                image = got.read(0, size)
                for b in range(blocks):
                    have = image[b * BS : (b + 1) * BS]
                    vs = versions.get(b, [])
                    durable = [v for v in vs if v.durable <= cut]
                    base = durable[-1].data if durable else frozen[b * BS : (b + 1) * BS]
                    later = [v.data for v in vs[len(durable) :] if v.start < cut]
                    assert have in (base, *later), (
                        f"{where}: block {b} reads neither its last acknowledged version nor a later one"
                    )
            finally:
                again.close()


# ------------------------------------------------------------------ failures and close


def test_a_failed_commit_fails_every_flush_it_covered_and_the_next_commit_writes_again() -> None:
    disk = LockedDisk()
    size = 32 * BS
    origin_raw = disk.file("origin", bytes(size))
    store_raw = SlowSyncFile(disk.file("store"), delay=0.002)
    store = PreservationStore.open_raw(store_raw, 4 << 20)  # type: ignore[arg-type]
    vol = store.attach(VOLUME, Device(origin_raw, size), block_size=BS)
    snap = vol.create_snapshot("w", writable=True)
    flushers = 4
    for i in range(flushers):
        snap.write(i * BS, bytes([0xA0 + i]) * BS)
    results: list[BaseException | None] = [None] * flushers

    def flush(i: int) -> None:
        try:
            snap.flush()
        except DeviceError as e:
            results[i] = e

    # Hold the lock while the flushers arrive, so that one commit covers all of them; its sync fails
    # and loses what it should have made durable (as Linux may after a writeback error).
    threads = [threading.Thread(target=flush, args=(i,)) for i in range(flushers)]
    with store.lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(store._flushers.values()) < flushers:
            assert time.monotonic() < deadline, "the flushers did not arrive"
            time.sleep(0.001)
        disk.inject(Fault(frozenset({"sync"}), frozenset({"store"}), drop=True))
    for t in threads:
        t.join(30)
    assert all(isinstance(r, DeviceError) for r in results), f"a flush covered by a failed commit: {results}"
    assert len({id(r) for r in results}) == flushers, "each caller raises an exception of its own"

    # Nothing was reported durable, and indeed a power cut now loses those writes.
    images = Replay(disk).images(disk.now, "all")
    lost = PreservationStore.open_raw(MemFile(bytes(images["store"])), 4 << 20)
    got = lost.attach(VOLUME, Device(MemFile(bytes(images["origin"])), size), block_size=BS).snapshot("w")
    assert got.read(0, flushers * BS) == bytes(flushers * BS)
    lost.close()

    disk.heal()
    snap.flush()  # writes again what the failed sync lost, then syncs
    images = Replay(disk).images(disk.now, "none")
    again = PreservationStore.open_raw(MemFile(bytes(images["store"])), 4 << 20)
    got = again.attach(VOLUME, Device(MemFile(bytes(images["origin"])), size), block_size=BS).snapshot("w")
    assert got.read(0, flushers * BS) == b"".join(bytes([0xA0 + i]) * BS for i in range(flushers))
    again.close()
    assert_accounting(store)
    store.close()


def test_close_waits_for_the_sync_in_progress_and_later_flushes_raise_closed() -> None:
    store, raw, snap = mem_rig(delay=0.2)
    snap.write(0, b"\x01" * BS)
    outcome: list[BaseException | None] = []

    def flush() -> None:
        try:
            snap.flush()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=flush)
    t.start()
    assert raw.in_sync.wait(10), "the flush did not start a sync"
    store.close()  # waits for that sync: the file is not closed under it
    t.join(10)
    assert outcome == [None]
    assert raw.syncs, "the sync did not end"
    with pytest.raises(Closed):
        snap.flush()


def test_a_flush_under_the_stores_lock_commits_there() -> None:
    store, raw, snap = mem_rig(delay=0.001)
    snap.write(0, b"\x02" * BS)
    before = len(raw.syncs)
    with store.lock:
        snap.flush()  # would wait for itself if it waited for a leader
    assert len(raw.syncs) == before + 1
    store.close()


# ------------------------------------------------------------------ index and freed slots


def test_replace_many_does_what_replace_does_block_by_block() -> None:
    rng = random.Random(SEED)
    for _ in range(30):
        a, b = ChainIndex(), ChainIndex()
        # Several levels, some blocks with several generations.
        for _level in range(rng.randint(1, 12)):
            blocks = sorted(rng.sample(range(200), rng.randint(1, 20)))
            gen = rng.randint(0, 3)
            fresh = [x for x in blocks if gen not in {g for g, _s in a.range(x, x + 1).get(x, [])}]
            slots = [rng.randrange(1 << 20) for _ in fresh]
            a.add_many(fresh, gen, slots)
            b.add_many(fresh, gen, slots)
        blocks = sorted(rng.sample(range(220), rng.randint(1, 40)))
        gen = rng.randint(0, 3)
        slots = [rng.randrange(1 << 20) for _ in blocks]
        olds = [a.replace(x, gen, s) for x, s in zip(blocks, slots, strict=True)]
        expected = [old for old in olds if old is not None]
        got = b.replace_many(np.array(blocks, np.uint64), gen, slots)
        assert sorted(got) == sorted(expected)
        assert all(np.array_equal(x, y) for x, y in zip(a.arrays(), b.arrays(), strict=True))


def test_rewritten_blocks_free_their_slots_for_reuse_and_deleting_the_snapshot_punches_them() -> None:
    store, _raw, snap = mem_rig(delay=0)
    n = 8
    snap.write(0, b"\x11" * (n * BS))
    snap.flush()
    first_slots = sorted(int(s) for s in snap.record.private.arrays()[2])
    snap.write(0, b"\x22" * (n * BS))
    snap.flush()  # the first slots are free once their replacements are durable
    assert store.allocated_free == set(first_slots)
    assert all(store.raw.pread(BS, store.slot_offset(s)) == b"\x11" * BS for s in first_slots), (
        "slots freed by a rewrite are left allocated (no hole punched)"
    )
    assert_accounting(store)
    snap.write(0, b"\x33" * (n * BS))  # reuses them
    snap.flush()
    assert not store.allocated_free & set(first_slots)
    assert snap.read(0, n * BS) == b"\x33" * (n * BS)
    assert_accounting(store)
    freed = sorted(store.allocated_free)
    assert freed
    snap.volume.delete_snapshot("w")
    assert not store.allocated_free
    assert all(store.raw.pread(BS, store.slot_offset(s)) == bytes(BS) for s in freed), (
        "deleting a snapshot punches the free slots rewrites left allocated"
    )
    assert_accounting(store)
    store.close()

"""The write-intent bitmap: durable before writes, lazily cleared, dirty across outages and crashes."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from faultfile import MODES, Disk
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from primary.bitmap import BitmapError, WriteIntentBitmap
from standbylib.errors import InvalidArgument
from standbylib.rawfile import MemFile

KiB, MiB = 1 << 10, 1 << 20
G = 64 * KiB


def fresh(size=16 * MiB, **kw):
    return WriteIntentBitmap(MemFile(), size, G, new=True, **kw)


def test_a_mark_is_on_disk_when_it_returns_and_a_release_clears_only_after_linger():
    bm = fresh(ahead=0, linger=5.0)
    bm.mark(100 * KiB, 100 * KiB)  # regions 1..3
    assert list(np.flatnonzero(bm.on_disk())) == [1, 2, 3]
    bm.release(100 * KiB, 100 * KiB)
    assert bm.clean() == 0 and bm.on_disk()[1:4].all()  # still lingering
    assert bm.clean(now=1e12) == 3
    assert not bm.on_disk().any() and bm.marked() == 0


def test_the_activity_log_keeps_the_most_recent_regions_marked_and_their_rewrites_need_no_sync():
    bm = fresh(ahead=0, linger=0, hot=8)
    for r in range(16):  # 16 regions written and acknowledged, oldest first
        bm.mark(r * G, 4096)
        bm.release(r * G, 4096)
    assert bm.clean() == 8  # the 8 least recently used leave the activity log
    assert list(np.flatnonzero(bm.on_disk())) == list(range(8, 16))
    syncs = bm.syncs
    assert bm.try_mark(12 * G, 4096)  # a region in the log: marked without a sync
    bm.release(12 * G, 4096)
    bm.mark(13 * G, 4096)
    assert bm.syncs == syncs
    assert not bm.try_mark(3 * G, 4096)  # out of the log: would need a sync, so nothing changes
    assert not bm.on_disk()[3] and bm.out_of_sync_bytes() == G  # only region 13 is in flight
    bm.release(13 * G, 4096)
    assert bm.clean(now=time.monotonic() + 60) == 8  # quiet long enough: every idle region is cleared
    assert not bm.on_disk().any()


def test_concurrent_markers_share_syncs():
    class SlowSync(MemFile):
        def sync(self) -> None:
            time.sleep(0.02)  # a slow sync: the other markers arrive while it runs, and share the next

    bm = WriteIntentBitmap(SlowSync(), 16 * MiB, G, new=True, ahead=0)
    before = bm.syncs
    threads = [threading.Thread(target=bm.mark, args=(r * G, 4096)) for r in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.on_disk()[:16].all()
    assert bm.syncs - before < 8, f"{bm.syncs - before} syncs for 16 concurrent marks"


def test_a_region_with_a_write_in_flight_is_never_cleared():
    bm = fresh(ahead=0, linger=0)
    bm.mark(0, 4096)
    bm.mark(0, 4096)  # a second write to region 0
    bm.release(0, 4096)
    assert bm.clean(force=True) == 0 and bm.on_disk()[0]
    bm.release(0, 4096)
    assert bm.clean(force=True) == 1 and not bm.on_disk()[0]
    with pytest.raises(InvalidArgument, match="without a matching mark"):
        bm.release(0, 4096)


def test_sequential_writes_share_syncs_by_marking_ahead():
    bm = fresh(size=64 * MiB, ahead=15)
    before = bm.syncs
    for off in range(0, 64 * MiB, MiB):  # 64 writes of 16 regions each
        bm.mark(off, MiB)
    assert bm.syncs - before == 64 * MiB // (16 * G)  # one sync per 16 regions, not per write
    hot = fresh(size=64 * MiB, ahead=0)
    before = hot.syncs
    for _ in range(3):
        for off in range(0, 4 * MiB, 4096):  # a hot set rewritten: one sync per region, once
            hot.mark(off, 4096)
            hot.release(off, 4096)
    assert hot.syncs - before == 4 * MiB // G


def test_an_outage_makes_in_flight_writes_dirty_until_resynced():
    bm = fresh(ahead=0, linger=0)
    bm.mark(0, G)
    bm.abandon()  # the standby went away before acknowledging
    bm.mark_dirty(5 * G, 10)
    assert list(bm.dirty_regions()) == [0, 5]
    assert bm.clean(force=True) == 0 and bm.out_of_sync_bytes() == 2 * G
    for region in list(bm.dirty_regions()):
        offset, length = bm.resync_begin(region)
        assert (offset, length) == (region * G, G)
        bm.release(offset, length)
    assert bm.dirty() == 0 and bm.clean(force=True) == 2 and bm.marked() == 0


def test_the_last_region_of_an_odd_sized_volume_is_short():
    bm = fresh(size=G * 3 + 4096, ahead=0)
    bm.mark_dirty(3 * G, 4096)
    assert bm.resync_begin(3) == (3 * G, 4096)
    with pytest.raises(InvalidArgument):
        bm.mark(3 * G, 8192)


def test_reopen_makes_every_set_bit_dirty(tmp_path):
    path = str(tmp_path / "vol.bitmap")
    bm = WriteIntentBitmap.open(path, 16 * MiB, G, ahead=0)
    bm.mark(0, 2 * G)
    bm.mark(10 * G, 1)
    bm.raw.close()  # a crash: no clean close
    again = WriteIntentBitmap.open(path, 16 * MiB, G)
    assert list(again.dirty_regions()) == [0, 1, 10]
    again.close()
    with pytest.raises(BitmapError, match="remove it to force a full resync"):
        WriteIntentBitmap.open(path, 32 * MiB, G)
    with pytest.raises(BitmapError, match="remove it to force a full resync"):
        WriteIntentBitmap.open(path, 16 * MiB, 2 * G)
    with open(path, "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(BitmapError, match="bad magic"):
        WriteIntentBitmap.open(path, 16 * MiB, G)


@pytest.mark.parametrize("granularity", [0, 1000, 2048, 3 * G])
def test_bad_granularity(granularity):
    with pytest.raises(InvalidArgument):
        WriteIntentBitmap(MemFile(), MiB, granularity, new=True)


@pytest.mark.parametrize("seed", range(6))
def test_after_a_power_loss_every_issued_write_is_covered(seed):
    """Crash at every event of a random history: each region written (mark returned) and not cleaned
    since must be set in what survives."""
    rng = random.Random(seed)
    disk = Disk()
    nregions = 64
    bm = WriteIntentBitmap(disk.file("bm"), nregions * G, G, ahead=rng.choice([0, 3]), linger=0, new=True)
    must: list[tuple[int, set[int]]] = []  # (event number after which, regions that must be set)
    covered: set[int] = set()
    inflight: list[tuple[int, int]] = []
    for _ in range(120):
        op = rng.random()
        if op < 0.5:
            off, n = rng.randrange(nregions) * G + rng.randrange(G), rng.randrange(1, 3 * G)
            n = min(n, nregions * G - off)
            bm.mark(off, n)
            inflight.append((off, n))
            covered |= set(bm.regions(off, n))
        elif op < 0.8 and inflight:
            off, n = inflight.pop(rng.randrange(len(inflight)))
            bm.release(off, n)
        else:
            bm.clean(force=True)
            held = {r for off, n in inflight for r in bm.regions(off, n)}
            covered &= held
        must.append((disk.now, set(covered)))
    # Creation is atomic (built under another name and renamed), so crashes count from its first sync.
    for cut in range(disk.sync_events("bm")[0] + 1, disk.now + 1):
        mode = rng.choice(MODES)
        image = disk.crash(cut, mode, rng)["bm"]
        after = WriteIntentBitmap(MemFile(image), nregions * G, G, new=False)
        need = set()
        for when, regions in must:
            if when <= cut:
                need = regions
        assert need <= set(after.dirty_regions()), (cut, mode)


class BitmapModel(RuleBasedStateMachine):
    """Random marks, releases, outages, resyncs and cleans against a plain model of the rules."""

    def __init__(self):
        super().__init__()
        self.n = 40
        self.bm = WriteIntentBitmap(MemFile(), self.n * G, G, ahead=2, linger=0, new=True)
        self.inflight = [0] * self.n
        self.dirty = [False] * self.n
        self.writes: list[tuple[int, int]] = []

    @rule(region=st.integers(0, 39), count=st.integers(1, 3))
    def mark(self, region, count):
        count = min(count, self.n - region)
        self.bm.mark(region * G, count * G)
        self.writes.append((region, count))
        for r in range(region, region + count):
            self.inflight[r] += 1

    @rule(region=st.integers(0, 39))
    def write_during_outage(self, region):
        self.bm.mark_dirty(region * G, G)
        self.dirty[region] = True

    @rule(data=st.data())
    def release(self, data):
        if self.writes:
            region, count = self.writes.pop(data.draw(st.integers(0, len(self.writes) - 1)))
            self.bm.release(region * G, count * G)
            for r in range(region, region + count):
                self.inflight[r] -= 1

    @rule()
    def outage(self):
        self.bm.abandon()
        for r in range(self.n):
            if self.inflight[r]:
                self.dirty[r] = True
            self.inflight[r] = 0
        self.writes.clear()

    @rule(data=st.data())
    def resync_one(self, data):
        dirty = list(self.bm.dirty_regions())
        assert dirty == [r for r in range(self.n) if self.dirty[r]]
        if dirty:
            r = data.draw(st.sampled_from(dirty))
            self.bm.resync_begin(r)
            self.dirty[r] = False
            self.inflight[r] += 1
            self.writes.append((r, 1))

    @rule()
    def clean(self):
        self.bm.clean(force=True)
        expected = [bool(self.inflight[r] or self.dirty[r]) for r in range(self.n)]
        assert list(self.bm.on_disk()) == expected

    @invariant()
    def needed_bits_are_on_disk(self):
        disk = self.bm.on_disk()
        for r in range(self.n):
            if self.inflight[r] or self.dirty[r]:
                assert disk[r], r
        assert (
            self.bm.out_of_sync_bytes()
            == sum(1 for r in range(self.n) if self.inflight[r] or self.dirty[r]) * G
        )


TestBitmapModel = BitmapModel.TestCase
TestBitmapModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)

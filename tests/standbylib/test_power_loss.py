"""Power loss at any point of a snapshot workload: every valid snapshot still reads the image it froze.

A seeded random workload (origin batches with unaligned writes and zero requests, snapshots created,
written, flushed and deleted, freed slots reused, overflow invalidations, blocks that read as zeros
preserved as hole entries) runs on a store and an
origin made of `FaultFile`s sharing one `Disk`. A reference model records, when each snapshot is
created, the image it must freeze, and for writable snapshots every later version of each block.
Then, for hundreds of cut points over the trace, the store and origin are rebuilt as a power loss
before that event would leave them (pending writes dropped, kept, or torn at sector granularity),
reopened with `PreservationStore.open_raw` and `Device`, and checked:

* the store opens and the volume attaches;
* every snapshot whose creation completed before the cut is there (unless its deletion completed),
  no snapshot appears before its creation started, none survives a completed deletion;
* a snapshot is invalid only if an overflow invalidated it, and is invalid if that completed;
* every valid snapshot reads exactly its frozen image; a writable one reads per block its last
  version made durable by a store sync before the cut, or a later version written before the cut;
* the reopened store keeps working: origin writes go through copy-on-write, a new snapshot freezes
  the new origin, a writable snapshot takes a write, and a second reopen reads the same.

Reproduce a failure with the seed printed in its message: ``POWERLOSS_SEED=<seed> pytest -k power_loss``
(``POWERLOSS_CUTS`` sets the number of cut points per workload; ``POWERLOSS_CUT`` runs one cut only).
"""

from __future__ import annotations

import bisect
import os
import random
import time
from dataclasses import dataclass, field

import pytest
from faultfile import MODES, SECTOR, SYNC, Disk, FaultFile, Replay
from workload import random_ops

from standbylib.blockdev import Device
from standbylib.errors import PreservationFull, SnapshotInvalid
from standbylib.snapshot import PreservationStore, Snapshot, Volume
from standbylib.snapshot.layout import ENTRIES_PER_AREA, ENTRY_AREA, TABLE_OFFSETS

KiB = 1024
MiB = 1024 * KiB
NEVER = 1 << 62
VOLUME = "vol"

DEFAULT_SEED = 20240917
SEED_ENV = "POWERLOSS_SEED"
CUTS_ENV = "POWERLOSS_CUTS"
ONE_CUT_ENV = "POWERLOSS_CUT"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


# ------------------------------------------------------------ the model


@dataclass
class Version:
    """One content of a block of a writable snapshot, written by `Snapshot.write`."""

    data: bytes
    start: int  # event number when the write was called
    durable: int = NEVER  # event number of the store sync that made it durable


@dataclass
class SnapModel:
    name: str
    writable: bool
    frozen: bytes  # the origin when create_snapshot was called
    created: tuple[int, int]  # (first, end) event numbers of the create call
    deleted: tuple[int, int] | None = None
    invalidated: tuple[int, int] | None = None  # the origin batch during which it became invalid
    versions: dict[int, list[Version]] = field(default_factory=dict)
    image: bytearray = field(default_factory=bytearray)  # what it reads now (live run)


@dataclass(frozen=True)
class Config:
    volume_size: int
    block_size: int
    capacity: int  # store capacity in bytes: small ones make overflows invalidate snapshots
    ops: int

    def __str__(self) -> str:
        size, capacity = self.volume_size // KiB, self.capacity // KiB
        return f"volume={size}KiB block={self.block_size} capacity={capacity}KiB ops={self.ops}"


class Workload:
    """Runs the random workload on fault-injecting files and keeps the reference model."""

    def __init__(self, seed: int, config: Config) -> None:
        self.seed = seed
        self.config = config
        self.rng = random.Random(seed)
        self.size = config.volume_size
        self.bs = config.block_size
        self.disk = Disk()
        initial = self.rng.randbytes(self.size)
        self.origin_raw = self.disk.file("origin", initial)
        self.store_raw = self.disk.file("store")
        self.model = bytearray(initial)
        self.snaps: list[SnapModel] = []
        self.private_blocks_written = 0
        self.most_valid = 0  # most valid snapshots of the volume at once
        self.store = PreservationStore.open_raw(self.store_raw, config.capacity)
        self.vol = self.store.attach(VOLUME, Device(self.origin_raw, self.size), block_size=self.bs)
        self.setup_end = self.disk.now

    # -- the run

    def run(self) -> None:
        rng = self.rng
        for i in range(self.config.ops):
            live = [s for s in self.snaps if s.deleted is None]
            valid = [s for s in live if s.invalidated is None]
            writable = [s for s in valid if s.writable]
            r = rng.random()
            if (r < 0.13 and len(valid) < 5) or (r < 0.3 and len(valid) < 2):
                self.create(writable=rng.random() < 0.4)
            elif r < 0.19 and (len(live) > 3 or any(s.invalidated for s in live)):
                invalid = [s for s in live if s.invalidated]
                victim = rng.choice(invalid if invalid and rng.random() < 0.5 else live)
                self.delete(victim)
            elif r < 0.33 and writable:
                self.snapshot_write(rng.choice(writable))
            elif r < 0.38:
                self.flush_snapshot_or_origin()
            else:
                self.batch()
            valid_now = sum(1 for s in self.snaps if s.deleted is None and s.invalidated is None)
            self.most_valid = max(self.most_valid, valid_now)
            if i % 25 == 0:
                self.check_live()
        self.check_live()
        syncs = self.disk.sync_events("store")
        for s in self.snaps:
            for versions in s.versions.values():
                for v in versions:
                    # Durable at the first store sync issued after the write returned.
                    j = bisect.bisect_left(syncs, v.durable)
                    v.durable = syncs[j] if j < len(syncs) else NEVER

    def batch(self) -> None:
        ops = random_ops(
            self.rng, self.size, self.bs, max_ops=5, max_blocks=4, aligned_share=0.3, zero_share=0.15
        )
        start = self.disk.now
        self.vol.write_batch(ops)
        end = self.disk.now
        apply_ops(self.model, ops)
        for s in self.snaps:
            if s.deleted is None and s.invalidated is None and not self.vol.snapshot(s.name).valid:
                s.invalidated = (start, end)

    def create(self, *, writable: bool) -> None:
        name = f"s{len(self.snaps)}"
        frozen = bytes(self.model)
        start = self.disk.now
        self.vol.create_snapshot(name, writable=writable)
        self.snaps.append(SnapModel(name, writable, frozen, (start, self.disk.now), image=bytearray(frozen)))

    def delete(self, s: SnapModel) -> None:
        start = self.disk.now
        self.vol.delete_snapshot(s.name)
        s.deleted = (start, self.disk.now)

    def snapshot_write(self, s: SnapModel) -> None:
        rng, bs = self.rng, self.bs
        offset = rng.randrange(self.size)
        data = rng.randbytes(min(rng.randint(1, 2 * bs), self.size - offset))
        start = self.disk.now
        try:
            self.vol.snapshot(s.name).write(offset, data)
        except PreservationFull:
            return
        end = self.disk.now
        s.image[offset : offset + len(data)] = data
        for b in range(offset // bs, (offset + len(data) - 1) // bs + 1):
            block = bytes(s.image[b * bs : (b + 1) * bs])
            # `durable` holds the end of the write until `run` turns it into the sync that followed.
            s.versions.setdefault(b, []).append(Version(block, start, durable=end))
            self.private_blocks_written += 1

    def flush_snapshot_or_origin(self) -> None:
        writable = [s for s in self.snaps if s.writable and s.deleted is None and s.invalidated is None]
        if writable and self.rng.random() < 0.7:
            self.vol.snapshot(self.rng.choice(writable).name).flush()
        else:
            self.vol.flush()

    def check_live(self) -> None:
        """Before any crash: the origin and every valid snapshot read what the model says."""
        assert self.vol.read(0, self.size) == self.model, f"seed={self.seed} {self.config}: origin differs"
        for s in self.snaps:
            if s.deleted is None and s.invalidated is None:
                got = self.vol.snapshot(s.name).read(0, self.size)
                assert got == s.image, f"seed={self.seed} {self.config}: snapshot {s.name} differs (no crash)"

    # -- expectations at a cut

    def expected(self, s: SnapModel, cut: int) -> tuple[set[bool], set[bool]]:
        """(allowed presence, allowed validity) of snapshot `s` after a power loss before event `cut`."""
        present: set[bool]
        if cut <= s.created[0] or (s.deleted is not None and s.deleted[1] <= cut):
            present = {False}
        elif cut >= s.created[1] and (s.deleted is None or cut <= s.deleted[0]):
            present = {True}
        else:
            present = {True, False}
        if s.invalidated is None or cut <= s.invalidated[0]:
            valid = {True}
        elif s.invalidated[1] <= cut:
            valid = {False}
        else:
            valid = {True, False}
        return present, valid

    def acceptable(self, s: SnapModel, cut: int) -> tuple[bytearray, dict[int, list[bytes]]]:
        """The image `s` must read after a cut, and for blocks written to it the versions allowed."""
        image = bytearray(s.frozen)
        choices: dict[int, list[bytes]] = {}
        bs = self.bs
        for b, versions in s.versions.items():
            frozen_block = s.frozen[b * bs : (b + 1) * bs]
            durable = [v for v in versions if v.durable < cut]
            base = durable[-1].data if durable else frozen_block
            later = [v.data for v in versions[len(durable) :] if v.start < cut]
            image[b * bs : (b + 1) * bs] = base
            choices[b] = [base, *later]
        return image, choices


def roomy(config: Config) -> bool:
    """Whether the store can hold a full copy of the volume for each of 6 snapshots (no overflow)."""
    return config.capacity >= 6 * config.volume_size


def apply_ops(image: bytearray, ops: list[tuple[int, bytes | int]]) -> None:
    for offset, data in ops:
        if isinstance(data, int):
            image[offset : offset + data] = bytes(data)
        else:
            image[offset : offset + len(data)] = data


# ------------------------------------------------------------ the checks


class CutFailure(Exception):
    pass


def read_all(snap: Snapshot | Volume, size: int) -> bytes:
    return snap.read(0, size)


def check_image(w: Workload, s: SnapModel, got: bytes, cut: int, what: str) -> None:
    expected, choices = w.acceptable(s, cut)
    if got == expected:
        return
    bs = w.bs
    for b in range(w.size // bs):
        block = got[b * bs : (b + 1) * bs]
        if block == expected[b * bs : (b + 1) * bs] or block in choices.get(b, ()):
            continue
        if s.writable and b in choices:
            detail = f"none of the {len(choices[b])} acceptable versions of this block"
        elif block == bytes(bs):
            detail = "zeros instead of the frozen data"
        else:
            detail = "not the frozen data"
        raise CutFailure(
            f"{what}: snapshot {s.name} reads wrong data at block {b} (offset {b * bs}): {detail}"
        )


def open_images(
    w: Workload, store_image: bytes, origin_image: bytes, where: str = "reopen"
) -> tuple[PreservationStore, Volume]:
    """Open a store and attach the volume on new traced files holding the given images."""
    disk = Disk()
    try:
        store = PreservationStore.open_raw(disk.file("store", store_image), w.config.capacity)
    except Exception as e:
        raise CutFailure(f"{where}: the store does not open: {type(e).__name__}: {e}") from e
    try:
        vol = store.attach(VOLUME, Device(disk.file("origin", origin_image), w.size), block_size=w.bs)
    except Exception as e:
        raise CutFailure(f"{where}: the volume does not attach: {type(e).__name__}: {e}") from e
    return store, vol


def check_cut(w: Workload, cut: int, images: dict[str, bytearray]) -> None:
    store, vol = open_images(w, bytes(images["store"]), bytes(images["origin"]))
    listed = {s.name: s for s in vol.snapshots()}
    known = {s.name for s in w.snaps}
    strange = set(listed) - known
    if strange:
        raise CutFailure(f"snapshots never created appear: {sorted(strange)}")
    reads: dict[str, bytes] = {}
    for s in w.snaps:
        present, valid = w.expected(s, cut)
        snap = listed.get(s.name)
        if (snap is not None) not in present:
            state = "missing" if snap is None else "present"
            raise CutFailure(
                f"snapshot {s.name} is {state} (created in events {s.created}, deleted in {s.deleted})"
            )
        if snap is None:
            continue
        if snap.valid not in valid:
            raise CutFailure(
                f"snapshot {s.name} is {'valid' if snap.valid else 'invalid'} "
                f"(invalidated during events {s.invalidated}), reason {snap.info().reason!r}"
            )
        if snap.valid:
            reads[s.name] = read_all(snap, w.size)
            check_image(w, s, reads[s.name], cut, "after reopen")
        else:
            try:
                snap.read(0, w.bs)
            except SnapshotInvalid:
                pass
            else:
                raise CutFailure(f"invalid snapshot {s.name} serves reads")
    check_still_works(w, store, vol, reads)


def check_still_works(w: Workload, store: PreservationStore, vol: Volume, reads: dict[str, bytes]) -> None:
    """After recovery: COW, a new snapshot and a snapshot write work, and a second reopen reads the same."""
    rng = random.Random(f"{w.seed}-after-{len(reads)}")
    origin = bytearray(vol.read(0, w.size))
    ops = [(rng.randrange(w.size // w.bs) * w.bs, rng.randbytes(w.bs)), (rng.randrange(w.size - 100), 77)]
    vol.write_batch(ops)
    apply_ops(origin, ops)
    if vol.read(0, w.size) != origin:
        raise CutFailure("after reopen, the origin does not read what was just written")
    vol.create_snapshot("after-reopen")
    frozen = bytes(origin)
    ops = [(0, rng.randbytes(2 * w.bs + 3)), (w.size - w.bs, w.bs)]
    vol.write_batch(ops)
    apply_ops(origin, ops)
    expect = dict(reads)
    expect["after-reopen"] = frozen
    written: tuple[str, bytes] | None = None  # a writable snapshot written after reopen, and its new image
    writable = [s for s in vol.snapshots() if s.valid and s.name in reads and not s.readonly]
    if writable:
        target = rng.choice(writable)
        offset = rng.randrange(w.size - 3 * w.bs)
        data = rng.randbytes(2 * w.bs + 1)
        try:
            target.write(offset, data)
            target.flush()
        except PreservationFull:
            pass
        else:
            image = bytearray(expect[target.name])
            image[offset : offset + len(data)] = data
            expect[target.name] = bytes(image)
            written = (target.name, reads[target.name])
    current = {s.name: s for s in vol.snapshots() if s.valid}
    if roomy(w.config) and set(current) != set(expect):
        raise CutFailure(f"after reopen and new writes, {sorted(set(expect) - set(current))} became invalid")
    for name, image in expect.items():
        if name in current and read_all(current[name], w.size) != image:
            raise CutFailure(f"after reopen and new writes, snapshot {name} reads wrong data")
    check_second_power_loss(w, store.raw.disk, expect, written, rng)
    store_bytes = bytes(store.raw.data)
    origin_bytes = bytes(vol.device.raw.data)
    valid_before = set(current)
    store.close()

    store2, vol2 = open_images(w, store_bytes, origin_bytes, "second reopen")
    try:
        if vol2.read(0, w.size) != origin:
            raise CutFailure("second reopen: the origin differs from what was written after the first")
        current2 = {s.name: s for s in vol2.snapshots() if s.valid}
        if set(current2) != valid_before:
            raise CutFailure(
                f"second reopen: valid snapshots {sorted(current2)} instead of {sorted(valid_before)}"
            )
        for name, image in expect.items():
            if name in current2 and read_all(current2[name], w.size) != image:
                raise CutFailure(f"second reopen: snapshot {name} reads different data than before the close")
    finally:
        store2.close()


def check_second_power_loss(
    w: Workload,
    disk: Disk,
    expect: dict[str, bytes],
    written: tuple[str, bytes] | None,
    rng: random.Random,
) -> None:
    """A second power loss anywhere since the first reopen (recovery included) keeps the snapshots.

    `disk` traced the first reopen: its initial contents are the first crash's images, then come
    the recovery's writes and sync and the writes made after it. Every snapshot that was valid at
    the first reopen must be there again and, while valid, read the same (a writable snapshot
    written after reopen: per block its old or new contents); the snapshot created after reopen
    reads, if it is there and valid, the origin it froze.
    """
    cut = rng.randint(0, disk.now)
    mode = rng.choice(MODES)
    images = Replay(disk).images(cut, mode, rng)
    where = f"second power loss at event {cut}/{disk.now} of the reopened store ({mode})"
    store, vol = open_images(w, bytes(images["store"]), bytes(images["origin"]), where)
    try:
        listed = {s.name: s for s in vol.snapshots()}
        for name, image in expect.items():
            snap = listed.get(name)
            if snap is None:
                if name == "after-reopen":
                    continue
                raise CutFailure(f"{where}: snapshot {name} is gone")
            if not snap.valid:
                if roomy(w.config):
                    raise CutFailure(f"{where}: snapshot {name} became invalid: {snap.info().reason}")
                continue
            got = read_all(snap, w.size)
            if got == image:
                continue
            if written is None or written[0] != name:
                raise CutFailure(f"{where}: snapshot {name} reads wrong data")
            old, bs = written[1], w.bs
            for b in range(w.size // bs):
                block = got[b * bs : (b + 1) * bs]
                if block not in (old[b * bs : (b + 1) * bs], image[b * bs : (b + 1) * bs]):
                    raise CutFailure(f"{where}: writable snapshot {name} reads wrong data at block {b}")
    finally:
        store.close()


def choose_cuts(w: Workload, n: int, rng: random.Random) -> list[int]:
    """`n` cut points after the store's creation: around syncs (where ordering matters most) and anywhere.

    Cuts while the store is being created are `test_power_loss_while_creating_the_store`'s.
    """
    first, total = w.setup_end, w.disk.now
    syncs = [e.number for e in w.disk.events if e.kind == SYNC]
    cuts = {first, total}
    near = [c for s in syncs for c in (s, s + 1) if first <= c <= total]
    cuts.update(rng.sample(near, min(len(near), n // 3)))
    while len(cuts) < min(n, total - first + 1):
        cuts.add(rng.randint(first, total))
    return sorted(cuts)


def run_power_loss(seed: int, config: Config, ncuts: int, repro: str) -> str:
    """Run one workload and check `ncuts` crash points; return a summary line, fail with every bad cut.

    `repro` is the command that runs this workload again; each cut's mode and torn sectors depend
    only on the seed and the cut, so ``POWERLOSS_CUT=<cut>`` added to it replays one cut alone.
    """
    t0 = time.monotonic()
    w = Workload(seed, config)
    w.run()
    reused = w.store.cow_copies + w.private_blocks_written
    slots_in_file = sum(ENTRIES_PER_AREA for size in w.store.area_slot_sizes if size != ENTRY_AREA)
    holes = w.store.stats().cow_holes
    invalidated = sum(1 for s in w.snaps if s.invalidated)
    rng = random.Random(f"{seed}-cuts")
    one = os.environ.get(ONE_CUT_ENV, "").strip()
    cuts = [int(one)] if one else choose_cuts(w, ncuts, rng)
    replay = Replay(w.disk)
    failures: list[str] = []
    modes_seen = dict.fromkeys(MODES, 0)
    for cut in cuts:
        mode = random.Random(f"{seed}-{cut}").choices(MODES, weights=(1, 1, 2))[0]
        modes_seen[mode] += 1
        images = replay.images(cut, mode, random.Random(f"{seed}-{cut}-{mode}"))
        try:
            check_cut(w, cut, images)
        except CutFailure as e:
            failures.append(f"cut={cut}/{w.disk.now} mode={mode}: {e}")
        except Exception as e:
            failures.append(f"cut={cut}/{w.disk.now} mode={mode}: after reopen, {type(e).__name__}: {e}")
    summary = (
        f"seed={seed} {config}: {len(w.disk.events)} events, {len(w.snaps)} snapshots "
        f"({sum(s.writable for s in w.snaps)} writable, {invalidated} invalidated, "
        f"up to {w.most_valid} valid at once), "
        f"{w.store.cow_copies} copies + {w.private_blocks_written} snapshot blocks written into "
        f"{slots_in_file} slots, {holes} hole entries, {len(cuts)} cuts {modes_seen}, "
        f"{time.monotonic() - t0:.1f}s"
    )
    print(summary)
    assert reused > slots_in_file or one, f"{summary}: no slot was reused; the workload is too small"
    assert holes or one, f"{summary}: no block was preserved as a hole entry"
    assert w.most_valid >= 3, f"{summary}: never 3 valid snapshots at once; the workload is too small"
    if failures:
        shown = "\n  ".join(failures[:15])
        more = f"\n  ... and {len(failures) - 15} more" if len(failures) > 15 else ""
        pytest.fail(
            f"{summary}\n{len(failures)} of {len(cuts)} crash points broke the store "
            f"(reproduce: {repro}; one cut: {ONE_CUT_ENV}=<cut> {repro}):\n  {shown}{more}",
            pytrace=False,
        )
    return summary


CONFIGS = {
    "512B-blocks": Config(256 * KiB, 512, capacity=2 * MiB, ops=260),
    "4KiB-blocks": Config(1 * MiB, 4096, capacity=8 * MiB, ops=260),
    "4KiB-overflow": Config(512 * KiB, 4096, capacity=256 * KiB, ops=260),
    "512B-overflow": Config(256 * KiB, 512, capacity=64 * KiB, ops=260),
}
DEFAULT_CUTS = {"512B-blocks": 300, "4KiB-blocks": 300, "4KiB-overflow": 250, "512B-overflow": 250}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_power_loss_leaves_valid_snapshots_intact(name: str) -> None:
    seed = env_int(SEED_ENV, DEFAULT_SEED)
    repro = f"{SEED_ENV}={seed} pytest {os.path.relpath(__file__)} -k 'intact and {name}'"
    run_power_loss(seed, CONFIGS[name], env_int(CUTS_ENV, DEFAULT_CUTS[name]), repro)


@pytest.mark.soak
@pytest.mark.parametrize("name", list(CONFIGS))
def test_power_loss_soak(name: str) -> None:
    base = env_int(SEED_ENV, random.SystemRandom().randrange(1, 1 << 31))
    seeds = env_int("POWERLOSS_SEEDS", 8)
    print(f"soak base seed {base} ({SEED_ENV}={base} to repeat)")
    failures = []
    for i in range(seeds):
        config = CONFIGS[name]
        config = Config(config.volume_size, config.block_size, config.capacity, ops=config.ops * 2)
        try:
            here = os.path.relpath(__file__)
            repro = f"{SEED_ENV}={base + i} POWERLOSS_SEEDS=1 pytest -m soak {here} -k 'soak and {name}'"
            run_power_loss(base + i, config, env_int(CUTS_ENV, 1500), repro)
        except pytest.fail.Exception as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


# ------------------------------------------------------------ targeted cuts


def test_power_loss_while_creating_the_store() -> None:
    """A power loss while a new store is written and its volume registered: it reopens as a usable store.

    Nothing was ever preserved in it, so opening it again (with the capacity) must give a working
    store with the volume, whatever part of the creation reached the disk.
    """
    size, capacity = 64 * KiB, 1 * MiB
    disk = Disk()
    origin_raw = disk.file("origin", bytes(range(256)) * (size // 256))
    store = PreservationStore.open_raw(disk.file("store"), capacity)
    store.attach(VOLUME, Device(origin_raw, size))
    failures: dict[str, int] = {}
    for cut in range(disk.now + 1):
        for mode in MODES:
            for i in range(20 if mode == "subset" else 1):
                images = Replay(disk).images(cut, mode, random.Random(i))
                d = Disk()
                try:
                    reopened = PreservationStore.open_raw(d.file("store", images["store"]), capacity)
                    vol = reopened.attach(VOLUME, Device(d.file("origin", images["origin"]), size))
                    snap = vol.create_snapshot("first")
                    vol.write_batch([(0, b"x" * 4096)])
                    assert snap.read(0, size) == images["origin"]
                except Exception as e:
                    done = ", ".join(
                        f"{ev.kind}@{ev.offset}" for ev in disk.events[:cut] if ev.file == "store"
                    )
                    key = f"cut={cut} mode={mode} (store events done: {done}): {type(e).__name__}: {e}"
                    failures[key] = failures.get(key, 0) + 1
    shown = "\n  ".join(f"{key} [{n}x]" for key, n in failures.items())
    assert not failures, f"crash images of a store being created that do not reopen:\n  {shown}"


def test_power_loss_while_an_overflow_invalidates_several_snapshots() -> None:
    """One origin batch overflows three snapshots; the power fails before the batch's store sync.

    Every invalidation changes the table of snapshots, whose two copies alternate between commits. No
    write of the batch may touch the copy holding the last committed table; and for each table write
    of the batch, a crash image keeping only its first 512-byte sector (a torn write) must reopen with
    every snapshot whose creation completed (valid or invalidated), and a snapshot taken then must
    read the origin as it is.
    """
    bs = 4096
    size = 16 * bs
    disk = Disk()
    origin_raw = disk.file("origin", b"A" * size)
    store_raw = disk.file("store")
    store = PreservationStore.open_raw(store_raw, capacity=2 * bs)
    vol = store.attach(VOLUME, Device(origin_raw, size), block_size=bs)
    for i in range(3):
        vol.create_snapshot(f"nightly-{i}")
    vol.write_batch([(5 * bs, b"C" * bs)])  # preserved in the one slot of room left, then overwritten
    vol.flush()
    tables = [e.offset for e in disk.events if e.file == "store" and e.offset in TABLE_OFFSETS and e.data]
    committed_copy = tables[-1]
    start = disk.now
    vol.write_batch([(0, b"B" * 2 * bs)])  # two more copies needed, one slot free: all three overflow
    assert not any(s.valid for s in vol.snapshots()), "the batch did not overflow every snapshot"
    batch = disk.events[start:]
    sync = next(e for e in batch if e.file == "store" and e.kind == SYNC)
    before_sync = batch[: sync.number - start]
    onto_committed = [e for e in before_sync if e.data and e.offset == committed_copy]
    # The copy holding the last committed table must not be written before the batch's sync.
    assert not onto_committed, "a table write of the batch went to the copy holding the committed table"
    table_writes = [e for e in before_sync if e.data and e.offset in TABLE_OFFSETS]
    assert table_writes, "the invalidations were not written to the table"
    problems = []
    for torn in table_writes:
        # Power fails before the sync; of the batch only the first sector of a table write landed.
        images = Replay(disk).images(sync.number, "none")
        images["store"][torn.offset : torn.offset + SECTOR] = torn.data[:SECTOR]
        reopened, vol2 = open_images_plain(images, size, bs, capacity=2 * bs)
        names = [s.name for s in vol2.snapshots()]
        if names != ["nightly-0", "nightly-1", "nightly-2"]:
            problems.append(
                f"snapshots after reopen: {names}, though all three were created before the batch"
            )
        fresh = vol2.create_snapshot("fresh")
        if fresh.read(5 * bs, bs) != vol2.read(5 * bs, bs):
            problems.append(
                "a snapshot taken after reopen reads block 5 as "
                f"{fresh.read(5 * bs, 1)!r}... while the origin holds {vol2.read(5 * bs, 1)!r}..."
            )
    reopened.close()
    assert not problems, "; ".join(problems)


def test_power_loss_while_a_volume_is_forgotten() -> None:
    """A power loss at any point of `forget` (a volume's removal): the store reopens with the volume
    either still registered (without snapshots) or gone, and the other volume's snapshot intact."""
    bs, size = 4096, 16 * 4096
    disk = Disk()
    gone_raw = disk.file("gone", b"G" * size)
    kept_raw = disk.file("kept", b"K" * size)
    store = PreservationStore.open_raw(disk.file("store"), 1 * MiB)
    gone = store.attach("gone", Device(gone_raw, size), block_size=bs)
    kept = store.attach(VOLUME, Device(kept_raw, size), block_size=bs)
    gone.create_snapshot("s")
    gone.write_batch([(0, b"g" * 4 * bs)])
    frozen = kept.create_snapshot("s")
    kept.write_batch([(bs, b"k" * bs)])
    gone.delete_snapshot("s")
    gone.close()
    start = disk.now
    store.forget("gone")
    assert disk.now > start, "forget wrote nothing"
    problems: set[str] = set()
    seen: set[tuple[str, ...]] = set()
    for cut in range(start, disk.now + 1):
        for mode in MODES:
            for i in range(10 if mode == "subset" else 1):
                images = Replay(disk).images(cut, mode, random.Random(i))
                d = Disk()
                try:
                    reopened = PreservationStore.open_raw(d.file("store", images["store"]), 1 * MiB)
                    names = reopened.volume_names()
                    seen.add(tuple(names))
                    if names not in (["gone", VOLUME], [VOLUME]):
                        problems.add(f"cut={cut} {mode}: volumes {names}")
                    vol = reopened.attach(VOLUME, Device(d.file("kept", images["kept"]), size), block_size=bs)
                    if vol.snapshot("s").read(0, size) != b"K" * size or not frozen.info().valid:
                        problems.add(f"cut={cut} {mode}: the other volume's snapshot changed")
                    if reopened.stats().used_bytes != bs:
                        problems.add(f"cut={cut} {mode}: {reopened.stats().used_bytes} bytes used, not {bs}")
                    again = reopened.attach("new", Device(d.file("new", b"N" * size), size), block_size=bs)
                    again.create_snapshot("t")
                    reopened.close()
                except Exception as e:
                    problems.add(f"cut={cut} {mode}: {type(e).__name__}: {e}")
    assert not problems, "\n".join(sorted(problems))
    assert seen == {("gone", VOLUME), (VOLUME,)}, f"the cuts did not cover both outcomes: {seen}"


def open_images_plain(
    images: dict[str, bytearray], size: int, bs: int, capacity: int
) -> tuple[PreservationStore, Volume]:
    d = Disk()
    store = PreservationStore.open_raw(d.file("store", images["store"]), capacity)
    return store, store.attach(VOLUME, Device(d.file("origin", images["origin"]), size), block_size=bs)


# ------------------------------------------------------------ the fault model


def test_fault_model_loses_only_what_was_not_synced() -> None:
    """The crash images the tests rely on: synced data stays, pending writes go, tear or stay in order."""
    disk = Disk()
    f: FaultFile = disk.file("f", bytes(2048))
    f.pwrite(b"A" * 1024, 0)
    f.sync()
    synced = disk.now
    f.pwrite(b"B" * 1024, 512)  # sectors 1 and 2
    f.pwrite(b"C" * 100, 600)  # sector 1 again, after B
    f.punch(1536, 512)
    replay = Replay(disk)
    assert replay.images(synced, "none")["f"] == b"A" * 1024 + bytes(1024)
    assert replay.images(disk.now, "none")["f"] == b"A" * 1024 + bytes(1024)
    everything = bytearray(f.data)
    assert Replay(disk).images(disk.now, "all")["f"] == everything
    seen_torn = False
    for i in range(200):
        img = Replay(disk).images(disk.now, "subset", random.Random(i))["f"]
        assert img[:512] == b"A" * 512, "a synced sector changed"
        sector1 = bytes(img[512:1024])
        # Sector 1 keeps a prefix of (B, C): A, B, or B then C; never C over A.
        assert sector1 in (b"A" * 512, b"B" * 512, bytes(everything[512:1024])), (
            "a sector mixed writes out of order"
        )
        sector2 = bytes(img[1024:1536])
        assert sector2 in (bytes(512), b"B" * 512)
        seen_torn |= sector1 != b"A" * 512 and sector2 == bytes(512)
    assert seen_torn, "the subset mode never tore the write across its sectors"

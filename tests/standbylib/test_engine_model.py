"""The snapshot engine against a small reference model (bytearrays), driven by Hypothesis.

The model keeps the origin of two volumes sharing one store, and for every snapshot its frozen image, the
blocks written to the snapshot itself, and for each block overwritten on the origin since it was taken the
number of the batch whose copy serves it. From that it derives what the engine must report:

* an origin write copies a block when some valid snapshot has neither a copy of it nor its own version
  (a writable snapshot that wrote the block does not need the origin's old data), and that one copy
  serves every valid snapshot lacking one: snapshots taken between the same two writes of a block share
  one copy. A block that read as zeros then is preserved as a hole entry: no data, no slot;
* a snapshot's ``preserved_blocks`` is the number of distinct blocks it reads from data slots (blocks
  copied with their data since it was taken, and blocks written to the snapshot itself), its
  ``hole_blocks`` those it reads as hole entries (not written to the snapshot itself);
* the store holds the distinct copies serving valid snapshots, plus one slot per block written to a
  writable snapshot, and its hole entries take no bytes.

`TightStoreMachine` runs the same workload in a store too small for it, where snapshots get invalidated.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from standbylib.blockdev import Device, open_file_device, ram_device
from standbylib.errors import PreservationFull, ReadOnly, SnapshotInvalid
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Snapshot, Volume

BLOCK_SIZES = {"a": 512, "b": 4096}
SIZES = {"a": 32 * 1024, "b": 64 * 1024}
VOLUMES = sorted(BLOCK_SIZES)
MAX_SNAPSHOTS = 8


def payload(seed: int, length: int) -> bytes:
    """Deterministic bytes that differ at every position, so a misplaced byte shows."""
    return random.Random(seed).randbytes(length)


def blocks_of(offset: int, length: int, block_size: int) -> range:
    return range(offset // block_size, (offset + length - 1) // block_size + 1)


@dataclass
class SnapModel:
    volume: str
    name: str
    writable: bool
    capacity: int | None
    image: bytearray
    # block -> number of the origin batch whose copy of the block this snapshot reads
    served: dict[int, int] = field(default_factory=dict)
    # the blocks of `served` whose copy is a hole entry (they read as zeros when copied)
    holes: set[int] = field(default_factory=set)
    # blocks written to the snapshot itself
    private: set[int] = field(default_factory=set)
    valid: bool = True

    @property
    def touched(self) -> set[int]:
        return set(self.served) | self.private

    @property
    def with_data(self) -> set[int]:
        """The blocks it reads from data slots of the store (its `preserved_blocks`)."""
        return (set(self.served) - self.holes) | self.private

    @property
    def hole_blocks(self) -> set[int]:
        """The blocks it reads as hole entries."""
        return self.holes - self.private


@st.composite
def ranges(draw: st.DrawFn, volume: str) -> tuple[int, int]:
    """(offset, length) inside `volume`, biased towards block boundaries and multi-block spans."""
    bs, size = BLOCK_SIZES[volume], SIZES[volume]
    # Half the requests hit the first few blocks, so blocks get rewritten between and after snapshots.
    block = draw(st.one_of(st.integers(0, 3), st.integers(0, size // bs - 1)))
    inner = draw(st.one_of(st.just(0), st.just(bs - 1), st.integers(0, bs - 1)))
    offset = block * bs + inner
    length = draw(st.one_of(st.just(bs), st.integers(1, 3 * bs), st.just(1)))
    return offset, min(length, size - offset)


class EngineMachine(RuleBasedStateMachine):
    """Two volumes (512 B and 4 KiB blocks) sharing one store that never fills up."""

    capacity = 64 << 20
    use_files = False

    def __init__(self) -> None:
        super().__init__()
        self.tmpdir: str | None = None
        self.memfile = MemFile()  # the store's "disk" when not on files; kept across reopen
        if self.use_files:
            self.tmpdir = tempfile.mkdtemp(prefix="engine-model-")
            self.store_path = os.path.join(self.tmpdir, "preserve.store")
            self.devices: dict[str, Device] = {
                v: open_file_device(os.path.join(self.tmpdir, f"{v}.img"), SIZES[v]) for v in VOLUMES
            }
        else:
            self.devices = {v: ram_device(SIZES[v]) for v in VOLUMES}
        self.store = self._open_store(self.capacity)
        self.volumes: dict[str, Volume] = {}
        self._attach_all()
        self.origin = {v: bytearray(SIZES[v]) for v in VOLUMES}
        self.snaps: dict[tuple[str, str], SnapModel] = {}
        self.handles: dict[tuple[str, str], Snapshot] = {}
        self.batch_no = 0
        self.name_no = 0
        self.cow_copies = 0  # copies since the store was (re)opened
        self.cow_holes = 0  # hole entries since then
        # Bytes of writable-snapshot blocks replaced since the last store commit: their old slots are only
        # reused once the replacement is durable.
        self.pending_slots = 0
        self.pending_bytes = 0

    # ------------------------------------------------------------------ plumbing

    def _open_store(self, capacity: int | None) -> PreservationStore:
        if self.use_files:
            return PreservationStore.open(self.store_path, capacity)
        return PreservationStore.open_raw(self.memfile, capacity)

    def _attach_all(self) -> None:
        for v in VOLUMES:
            self.volumes[v] = self.store.attach(v, self.devices[v], block_size=BLOCK_SIZES[v])

    def teardown(self) -> None:
        self.store.close()
        for dev in self.devices.values():
            dev.close()
        if self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def live(self, volume: str) -> list[SnapModel]:
        """Valid snapshots of `volume`, oldest first (dicts keep creation order)."""
        return [s for s in self.snaps.values() if s.volume == volume and s.valid]

    def copies(
        self, without: frozenset[tuple[str, str]] = frozenset(), *, holes: bool = False
    ) -> set[tuple[str, int, int]]:
        """The distinct preserved copies with data (`holes`: the hole entries) the store must hold:
        (volume, block, batch that copied it).

        `without`: as if these snapshots were gone.
        """
        return {
            (s.volume, b, w)
            for key, s in self.snaps.items()
            if s.valid and key not in without
            for b, w in s.served.items()
            if (b in s.holes) == holes
        }

    def expected_slots(self, without: frozenset[tuple[str, str]] = frozenset()) -> tuple[int, int]:
        """(slots, bytes) the store must hold for the model's copies and private blocks (hole entries
        take neither)."""
        copies = self.copies(without)
        slots = len(copies)
        used = sum(BLOCK_SIZES[v] for v, _b, _w in copies)
        for key, s in self.snaps.items():
            if s.valid and key not in without:
                slots += len(s.private)
                used += len(s.private) * BLOCK_SIZES[s.volume]
        return slots, used

    def committed(self) -> None:
        """The store committed: slots of replaced blocks are free again."""
        self.pending_slots = 0
        self.pending_bytes = 0

    def apply_origin_batch(
        self, volume: str, ops: list[tuple[int, bytes | int]], single: bool = False
    ) -> None:
        """Run a batch on the engine (as `write`/`zero` calls when `single`) and on the model."""
        bs = BLOCK_SIZES[volume]
        touched: set[int] = set()
        for offset, data in ops:
            length = data if isinstance(data, int) else len(data)
            touched.update(blocks_of(offset, length, bs))
        had_live = bool(self.live(volume))
        zero_block = bytes(bs)
        old = self.origin[volume]
        zeros = {b for b in touched if old[b * bs : (b + 1) * bs] == zero_block}
        self.before_batch(volume, touched, zeros)
        vol = self.volumes[volume]
        if single:
            ((offset, data),) = ops
            if isinstance(data, int):
                vol.zero(offset, data)
            else:
                vol.write(offset, data)
        else:
            vol.write_batch(ops)
        self.batch_no += 1
        image = self.origin[volume]
        for offset, data in ops:
            if isinstance(data, int):
                image[offset : offset + data] = bytes(data)
            else:
                image[offset : offset + len(data)] = data
        self.after_batch(volume, touched)
        live = self.live(volume)
        copied = {b for b in touched if any(b not in s.touched for s in live)}
        for s in live:
            for b in copied:
                # (Also for a block the snapshot wrote itself: the copy's interval holds its epoch,
                # so the store keeps the copy while the snapshot lives.)
                if b not in s.served:
                    s.served[b] = self.batch_no
                    if b in zeros:
                        s.holes.add(b)
        self.cow_copies += len(copied - zeros)
        self.cow_holes += len(copied & zeros)
        if had_live:
            self.committed()

    def before_batch(self, volume: str, touched: set[int], zeros: set[int]) -> None:
        """Hook for the tight-store variant. `zeros`: the blocks of `touched` that read as zeros."""

    def after_batch(self, volume: str, touched: set[int]) -> None:
        """Hook for the tight-store variant."""

    # ------------------------------------------------------------------ origin writes

    @rule(volume=st.sampled_from(VOLUMES), data=st.data(), seed=st.integers(0, 2**32), zero=st.booleans())
    def origin_write(self, volume: str, data: st.DataObject, seed: int, zero: bool) -> None:
        offset, length = data.draw(ranges(volume))
        op: tuple[int, bytes | int] = (offset, length) if zero else (offset, payload(seed, length))
        self.apply_origin_batch(volume, [op], single=True)

    @rule(volume=st.sampled_from(VOLUMES), data=st.data(), seed=st.integers(0, 2**32))
    def origin_batch(self, volume: str, data: st.DataObject, seed: int) -> None:
        n = data.draw(st.integers(2, 6))
        ops: list[tuple[int, bytes | int]] = []
        for i in range(n):
            offset, length = data.draw(ranges(volume))
            overlap = data.draw(st.booleans())
            if ops and overlap:
                # Overlap the previous op on purpose: the later one must win.
                prev_off = ops[-1][0]
                offset = min(prev_off + data.draw(st.integers(0, 64)), SIZES[volume] - 1)
                length = min(length, SIZES[volume] - offset)
            if data.draw(st.integers(0, 3)) == 0:
                ops.append((offset, length))  # zero op
            else:
                ops.append((offset, payload(seed + i, length)))
        self.apply_origin_batch(volume, ops)

    @initialize(data=st.data(), seed=st.integers(0, 2**32))
    def initial_snapshots(self, data: st.DataObject, seed: int) -> None:
        """Start with a few snapshots taken between writes, so most runs have several live at once."""
        for volume in VOLUMES:
            for i in range(data.draw(st.integers(0, 3))):
                offset, length = data.draw(ranges(volume))
                self.apply_origin_batch(volume, [(offset, payload(seed + i, length))])
                self.create_snapshot(volume, data.draw(st.booleans()), False, data)

    # ------------------------------------------------------------------ snapshots

    def snapshot_capacities(self, volume: str) -> st.SearchStrategy[int | None]:
        return st.none()

    @precondition(lambda self: len(self.snaps) < MAX_SNAPSHOTS)
    @rule(
        volume=st.sampled_from(VOLUMES),
        writable=st.booleans(),
        auto_name=st.booleans(),
        data=st.data(),
    )
    def create_snapshot(self, volume: str, writable: bool, auto_name: bool, data: st.DataObject) -> None:
        capacity = data.draw(self.snapshot_capacities(volume))
        name = None
        if not auto_name:
            self.name_no += 1
            name = f"s{self.name_no}.{volume}"
        snap = self.volumes[volume].create_snapshot(name, writable=writable, capacity=capacity)
        if name is not None:
            assert snap.name == name
        key = (volume, snap.name)
        assert key not in self.snaps
        self.snaps[key] = SnapModel(volume, snap.name, writable, capacity, bytearray(self.origin[volume]))
        self.handles[key] = snap
        self.committed()

    def pick(self, data: st.DataObject, **want: bool) -> tuple[str, str] | None:
        keys = [
            k for k, s in self.snaps.items() if all(getattr(s, attr) == val for attr, val in want.items())
        ]
        if not keys:
            return None
        return data.draw(st.sampled_from(sorted(keys)))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data: st.DataObject) -> None:
        key = self.pick(data)
        assert key is not None
        volume, name = key
        self.volumes[volume].delete_snapshot(name)
        del self.snaps[key]
        del self.handles[key]
        assert name not in [s.name for s in self.volumes[volume].snapshots()]
        self.committed()

    @precondition(lambda self: any(s.valid for s in self.snaps.values()))
    @rule(data=st.data())
    def snapshot_read(self, data: st.DataObject) -> None:
        key = self.pick(data, valid=True)
        assert key is not None
        offset, length = data.draw(ranges(key[0]))
        got = self.handles[key].read(offset, length)
        assert got == self.snaps[key].image[offset : offset + length]

    @precondition(lambda self: any(s.valid and s.writable for s in self.snaps.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**32), zero=st.booleans())
    def snapshot_write(self, data: st.DataObject, seed: int, zero: bool) -> None:
        key = self.pick(data, valid=True, writable=True)
        assert key is not None
        self.write_snapshot(key, *data.draw(ranges(key[0])), seed, zero)

    @precondition(lambda self: any(s.valid and s.private for s in self.snaps.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**32), whole=st.booleans())
    def snapshot_rewrite(self, data: st.DataObject, seed: int, whole: bool) -> None:
        """Write again a block the snapshot already holds, as a filesystem rewrites its metadata."""
        key = data.draw(st.sampled_from(sorted(k for k, s in self.snaps.items() if s.valid and s.private)))
        bs = BLOCK_SIZES[key[0]]
        block = data.draw(st.sampled_from(sorted(self.snaps[key].private)))
        if whole:
            offset, length = block * bs, bs
        else:
            offset = block * bs + data.draw(st.integers(0, bs - 1))
            length = data.draw(st.integers(1, (block + 1) * bs - offset))
        self.write_snapshot(key, offset, length, seed, False)

    def write_snapshot(self, key: tuple[str, str], offset: int, length: int, seed: int, zero: bool) -> None:
        model = self.snaps[key]
        snap = self.handles[key]
        bs = BLOCK_SIZES[key[0]]
        blocks = set(blocks_of(offset, length, bs))
        stats = self.store.stats()
        if self.pending_bytes and len(blocks) * bs > stats.capacity_bytes - stats.used_bytes:
            # Short of space, the engine commits first so that replaced blocks free their slots.
            self.committed()
        _slots, used = self.expected_slots()
        gain = len(blocks - model.with_data)  # blocks served by a hole entry take a slot now
        fits = len(blocks) * bs <= self.capacity - used and (
            model.capacity is None or (len(model.with_data) + gain) * bs <= model.capacity
        )
        if not fits:
            with pytest.raises(PreservationFull):
                if zero:
                    snap.zero(offset, length)
                else:
                    snap.write(offset, payload(seed, length))
            return
        if zero:
            snap.zero(offset, length)
            model.image[offset : offset + length] = bytes(length)
        else:
            buf = payload(seed, length)
            snap.write(offset, buf)
            model.image[offset : offset + length] = buf
        self.pending_slots += len(blocks & model.private)
        self.pending_bytes += len(blocks & model.private) * bs
        model.private |= blocks

    @precondition(lambda self: any(s.valid and not s.writable for s in self.snaps.values()))
    @rule(data=st.data(), seed=st.integers(0, 2**32), zero=st.booleans())
    def snapshot_write_readonly(self, data: st.DataObject, seed: int, zero: bool) -> None:
        key = self.pick(data, valid=True, writable=False)
        assert key is not None
        snap = self.handles[key]
        offset, length = data.draw(ranges(key[0]))
        with pytest.raises(ReadOnly):
            if zero:
                snap.zero(offset, length)
            else:
                snap.write(offset, payload(seed, length))
        # The invariants check that neither the snapshot nor the store changed.

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def snapshot_flush(self, data: st.DataObject) -> None:
        key = self.pick(data)
        assert key is not None
        self.handles[key].flush()
        self.committed()

    @rule(give_capacity=st.booleans())
    def reopen(self, give_capacity: bool) -> None:
        self.store.close()
        self.store = self._open_store(self.capacity if give_capacity else None)
        self._attach_all()
        self.handles = {key: self.volumes[key[0]].snapshot(key[1]) for key in self.snaps}
        self.cow_copies = 0
        self.cow_holes = 0
        self.committed()

    # ------------------------------------------------------------------ invariants

    @invariant()
    def origin_matches_model(self) -> None:
        for v in VOLUMES:
            assert self.volumes[v].read(0, SIZES[v]) == self.origin[v], f"origin of volume {v}"

    @invariant()
    def snapshots_read_their_images(self) -> None:
        for key, model in self.snaps.items():
            snap = self.handles[key]
            info = snap.info()
            assert info.valid == model.valid, f"validity of snapshot {key}"
            assert info.writable == model.writable
            if model.valid:
                assert snap.read(0, SIZES[key[0]]) == model.image, f"image of snapshot {key}"
                assert info.preserved_blocks == len(model.with_data), f"preserved blocks of {key}"
                assert info.preserved_bytes == len(model.with_data) * BLOCK_SIZES[key[0]]
                assert info.hole_blocks == len(model.hole_blocks), f"hole blocks of {key}"
                self.check_extents(key, snap, model)
            else:
                with pytest.raises(SnapshotInvalid, match=key[1]):
                    snap.read(0, BLOCK_SIZES[key[0]])
                if model.writable:
                    with pytest.raises(SnapshotInvalid):
                        snap.write(0, b"x")
                assert info.reason

    def check_extents(self, key: tuple[str, str], snap: Snapshot, model: SnapModel) -> None:
        """Block status: every hole reads as zeros, blocks preserved as hole entries are holes, blocks
        read from data slots are data."""
        bs, size = BLOCK_SIZES[key[0]], SIZES[key[0]]
        hole_at: list[bool] = []
        pos = 0
        for n, hole in snap.extents(0, size):
            assert pos % bs == 0 and n % bs == 0, f"extents of {key} not in whole blocks"
            if hole:
                assert model.image[pos : pos + n] == bytes(n), f"a hole of {key} at {pos} is not zeros"
            hole_at += [hole] * (n // bs)
            pos += n
        assert pos == size, f"extents of {key} cover {pos} of {size} bytes"
        assert all(hole_at[b] for b in model.hole_blocks), f"hole entries of {key} reported as data"
        assert not any(hole_at[b] for b in model.with_data), f"data copies of {key} reported as holes"

    @invariant()
    def snapshot_lists_match(self) -> None:
        for v in VOLUMES:
            names = [s.name for s in self.volumes[v].snapshots()]
            assert names == [s.name for s in self.snaps.values() if s.volume == v]

    @invariant()
    def store_accounting(self) -> None:
        stats = self.store.stats()
        assert stats.used_bytes <= stats.capacity_bytes
        assert stats.snapshots == len(self.snaps)
        assert stats.invalid_snapshots == sum(1 for s in self.snaps.values() if not s.valid)
        slots, used = self.expected_slots()
        assert stats.cow_copies == self.cow_copies
        assert stats.cow_holes == self.cow_holes
        assert stats.hole_entries == len(self.copies(holes=True)), "hole entries held"
        if self.pending_bytes == 0:
            assert stats.preserved_blocks == slots
            assert stats.used_bytes == used
        else:
            # A replaced block of a writable snapshot keeps its slot until the next commit.
            assert slots <= stats.preserved_blocks <= slots + self.pending_slots
            assert used <= stats.used_bytes <= used + self.pending_bytes


class TightStoreMachine(EngineMachine):
    """The same workload in a store of 12 KiB, with per-snapshot capacities: snapshots get invalidated.

    The model's checks then cover the valid snapshots, while invalid ones must refuse to be read. Which
    snapshots a batch invalidates is predicted from the model: first those that would exceed their own
    capacity; then, if the copies the remaining snapshots need do not fit in the space left once those are
    gone, every remaining snapshot that needs a copy. In particular nothing is invalidated while there is
    room, and a batch on one volume never invalidates a snapshot of the other.
    """

    capacity = 12 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.expected_invalid: set[tuple[str, str]] = set()  # predicted before each origin batch

    def snapshot_capacities(self, volume: str) -> st.SearchStrategy[int | None]:
        bs = BLOCK_SIZES[volume]
        return st.one_of(st.none(), st.sampled_from([bs, 2 * bs, 5 * bs]))

    def before_batch(self, volume: str, touched: set[int], zeros: set[int]) -> None:
        bs = BLOCK_SIZES[volume]
        live = {(volume, s.name): s for s in self.live(volume)}
        # Blocks each snapshot gains a copy of with data (hole entries take no space).
        gains = {key: len(touched - zeros - s.touched) for key, s in live.items()}
        over_own = frozenset(
            key
            for key, s in live.items()
            if s.capacity is not None and gains[key] and (len(s.with_data) + gains[key]) * bs > s.capacity
        )
        if over_own:
            # Their invalidation is committed first, which frees what only they held.
            free = self.capacity - self.expected_slots(without=over_own)[1]
        else:
            stats = self.store.stats()
            free = stats.capacity_bytes - stats.used_bytes
        remaining = {key: s for key, s in live.items() if key not in over_own}
        needed = len({b for b in touched - zeros if any(b not in s.touched for s in remaining.values())}) * bs
        self.expected_invalid = set(over_own)
        if needed > free:
            self.expected_invalid |= {key for key in remaining if gains[key]}

    def after_batch(self, volume: str, touched: set[int]) -> None:
        invalidated = set()
        for key, model in self.snaps.items():
            if model.valid and not self.handles[key].valid:
                invalidated.add(key)
                model.valid = False
                model.served.clear()
                model.holes.clear()
                model.private.clear()
        assert invalidated == self.expected_invalid


class FileEngineMachine(EngineMachine):
    """The roomy-store workload on a store file and file volumes, reopened with `PreservationStore.open`."""

    use_files = True


_settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

TestEngineModel = EngineMachine.TestCase
TestEngineModel.settings = _settings
TestTightStore = TightStoreMachine.TestCase
TestTightStore.settings = settings(_settings, stateful_step_count=60)
TestEngineModelOnFiles = FileEngineMachine.TestCase
TestEngineModelOnFiles.settings = settings(_settings, max_examples=30)

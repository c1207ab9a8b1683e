"""I/O faults at random calls of a random workload: every failure is clean, and the workload goes on.

A seeded workload (origin batches with unaligned writes and zero requests, snapshots created and
deleted, writes to writable snapshots, flushes) runs on a store and an origin made of `FaultFile`s,
against a reference model (the origin's bytes, each snapshot's image). Before a share of the
operations a `Fault` is injected: EIO, ENOSPC or a short write, at the n-th call of one kind
(``pwrite``, ``copy_from``, ``sync`` (of the store: sometimes losing the unsynced pages), ``punch``,
``truncate``, ``pread``) of the store file or of the origin, for one call, a few, or until removed.
Some seeds copy through ``copy_from`` as the kernel path does.

After an operation that failed:

* it raised a library error (`DiskFull` for no space, `DeviceError` for EIO), never an OSError;
* nothing of it is visible: the origin is unchanged (unless the origin write itself failed, which a
  block device leaves undefined), the snapshots are those of the model and read their images, no
  snapshot was invalidated for it (only the store's capacity may have, durably, before the failure);
* the store's usage equals the slots its indexes reference (`storecheck.assert_accounting`), and a
  restart would see what the running store shows (when the failure let its clean-up write);
* a power loss right then leaves every read-only snapshot reading its image;
* with the fault removed, the same operation succeeds on the same store, as a client would retry it.

At the end, and after restarts (files as they are; a power loss once everything was flushed; a
clean close), every valid snapshot reads exactly its image, the origin equals the model, and the
invalidation listener heard each invalidation once.

Repeat a failure with the seed printed in its message: ``FAULT_SEED=<seed> pytest -k fault_injection``
(``FAULT_OPS`` sets the number of operations; the soak variant takes ``FAULT_SEEDS``).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from faultfile import MODES, Disk, Fault, Replay
from storecheck import assert_accounting, differences, observe, observe_reopened, reopened
from workload import random_ops

import standbylib.snapshot.volume as volume_module
from standbylib.blockdev import Device
from standbylib.errors import (
    DeviceError,
    DiskFull,
    PreservationDeferred,
    PreservationFull,
    StandbyError,
)
from standbylib.snapshot import PreservationStore

KiB = 1024
VOLUME = "vol"
SEED_ENV = "FAULT_SEED"
DEFAULT_SEEDS = (11, 12, 13, 14)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass(frozen=True)
class Config:
    block_size: int
    volume_size: int
    capacity: int
    on_full: str
    kernel_copy: bool
    ops: int

    @classmethod
    def for_seed(cls, seed: int, ops: int) -> Config:
        rng = random.Random(f"{seed}-config")
        bs = rng.choice([512, 4096])
        size = 64 * bs
        capacity = rng.choice([8 * size, size // 2])
        return cls(bs, size, capacity, rng.choice(["invalidate", "defer"]), rng.random() < 0.5, ops)

    def __str__(self) -> str:
        return (
            f"block={self.block_size} volume={self.volume_size // KiB}KiB capacity={self.capacity // KiB}KiB "
            f"on_full={self.on_full} kernel_copy={self.kernel_copy} ops={self.ops}"
        )


@dataclass
class SnapModel:
    name: str
    writable: bool
    image: bytearray
    valid: bool = True


@dataclass
class Op:
    """One operation of the workload: `run` it; `done` records its success in the model."""

    kind: str
    what: str
    run: Callable[[], object]
    done: Callable[[], None]


class FaultRun:
    def __init__(self, seed: int, config: Config) -> None:
        self.seed = seed
        self.config = config
        self.rng = random.Random(seed)
        self.frng = random.Random(f"{seed}-faults")
        self.bs = config.block_size
        self.size = config.volume_size
        self.disk = Disk()
        initial = self.rng.randbytes(self.size)
        self.origin = self.disk.file("origin", initial)
        self.store_raw = self.disk.file("store")
        self.heard: list[tuple[str, str, str]] = []
        self.store = PreservationStore.open_raw(
            self.store_raw, config.capacity, on_full=config.on_full, on_invalidated=self.hear
        )
        self.vol = self.store.attach(VOLUME, Device(self.origin, self.size), block_size=self.bs)
        self.model = bytearray(initial)
        self.snaps: dict[str, SnapModel] = {}
        self.created = 0
        self.step = 0
        self.fault: Fault | None = None
        self.deferred = False  # the last batch was deferred (the store is full under "defer")
        self.counts = {"faults injected": 0, "operations failed": 0, "retried": 0, "refused (full)": 0}

    def hear(self, volume: str, snapshot: str, reason: str) -> None:
        self.heard.append((volume, snapshot, reason))

    def fail(self, message: str) -> None:
        fault = f" (fault {self.fault}, fired at {self.fault.fired})" if self.fault else ""
        pytest.fail(f"{SEED_ENV}={self.seed} {self.config} step {self.step}: {message}{fault}", pytrace=False)

    # -- operations

    def pick(self) -> Op:
        rng = self.rng
        valid = [s for s in self.snaps.values() if s.valid]
        writable = [s for s in valid if s.writable]
        r = rng.random()
        if self.deferred and self.snaps and rng.random() < 0.3:  # as an operator would: make room
            return self.delete(rng.choice(list(self.snaps.values())))
        if r < 0.12 and len(valid) < 5:
            return self.create(writable=rng.random() < 0.4)
        if r < 0.2 and self.snaps:
            invalid = [s for s in self.snaps.values() if not s.valid]
            return self.delete(rng.choice(invalid or list(self.snaps.values())))
        if r < 0.38 and writable:
            return self.snapshot_write(rng.choice(writable))
        if r < 0.45:
            return self.flush(rng.choice(writable) if writable and rng.random() < 0.6 else None)
        return self.batch()

    def batch(self) -> Op:
        ops = random_ops(
            self.rng, self.size, self.bs, max_ops=4, max_blocks=6, aligned_share=0.4, zero_share=0.15
        )

        def done() -> None:
            for offset, data in ops:
                if isinstance(data, int):
                    self.model[offset : offset + data] = bytes(data)
                else:
                    self.model[offset : offset + len(data)] = data

        return Op("batch", f"batch of {len(ops)}", lambda: self.vol.write_batch(ops), done)

    def create(self, *, writable: bool) -> Op:
        name = f"s{self.created}"
        self.created += 1

        def done() -> None:
            self.snaps[name] = SnapModel(name, writable, bytearray(self.model))

        return Op("create", f"create {name}", lambda: self.vol.create_snapshot(name, writable=writable), done)

    def delete(self, s: SnapModel) -> Op:
        return Op(
            "delete",
            f"delete {s.name}",
            lambda: self.vol.delete_snapshot(s.name),
            lambda: self.snaps.pop(s.name),
        )

    def snapshot_write(self, s: SnapModel) -> Op:
        offset = self.rng.randrange(self.size)
        data = self.rng.randbytes(min(self.rng.randint(1, 3 * self.bs), self.size - offset))

        def done() -> None:
            s.image[offset : offset + len(data)] = data

        return Op(
            "snapshot-write",
            f"write {len(data)} bytes to {s.name}",
            lambda: self.vol.snapshot(s.name).write(offset, data),
            done,
        )

    def flush(self, s: SnapModel | None) -> Op:
        if s is None:
            return Op("flush", "flush the origin", self.vol.flush, lambda: None)
        return Op("flush", f"flush {s.name}", lambda: self.vol.snapshot(s.name).flush(), lambda: None)

    # -- faults

    def maybe_fault(self) -> Fault | None:
        frng = self.frng
        if frng.random() >= 0.4:
            return None
        file = frng.choice(["store", "store", "store", "origin"])
        ops = ["pwrite", "pwrite", "sync", "punch", "pread", "truncate"]
        if file == "store":
            ops.append("copy_from")
        op = frng.choice(ops)
        error = frng.choice(["EIO", "ENOSPC", "short"])
        if op == "pread":
            error = "EIO"
        elif error == "short" and op not in ("pwrite", "copy_from"):
            error = "ENOSPC"
        return Fault(
            frozenset({op}),
            frozenset({file}),
            error=error,
            skip=frng.choice([0, 0, 1, 2, 3, 5]),
            count=frng.choice([1, 1, 1, 1, 1, 1, 2, 3, 1000]),
            # Writes of the origin a failed sync dropped are lost for good: the engine does not keep
            # them (the daemon must resync them), so only the store's syncs lose pages here.
            drop=op == "sync" and file == "store" and frng.random() < 0.5,
        )

    # -- the run

    def run(self) -> str:
        t0 = time.monotonic()
        for step in range(self.config.ops):
            self.step = step
            self.attempt(self.pick(), self.maybe_fault())
            if self.step % 25 == 0:
                self.check_live("during the run")
        self.finish()
        return (
            f"{SEED_ENV}={self.seed} {self.config}: {self.counts}, {len(self.snaps)} snapshots at the end "
            f"({sum(not s.valid for s in self.snaps.values())} invalid), {len(self.heard)} invalidations, "
            f"{self.store.stats().cow_copies} copies, {self.store.stats().cow_holes} hole entries, "
            f"{time.monotonic() - t0:.1f}s"
        )

    def attempt(self, op: Op, fault: Fault | None) -> None:
        self.fault = fault
        if fault is not None:
            self.counts["faults injected"] += 1
            self.disk.inject(fault)
        self.deferred = False
        try:
            op.run()
        except (PreservationDeferred, PreservationFull) as e:
            self.disk.heal()
            self.counts["refused (full)"] += 1  # a refusal the model expects: nothing applied
            self.deferred = isinstance(e, PreservationDeferred)
        except StandbyError as e:
            self.disk.heal()
            if fault is None or not fault.fired:
                self.fail(f"{op.what} failed with no fault: {type(e).__name__}: {e}")
            assert fault is not None
            self.counts["operations failed"] += 1
            full = fault.error != "EIO"
            if isinstance(e, DiskFull) != full or not isinstance(e, DeviceError):
                self.fail(f"{op.what}: a {fault.error} fault raised {type(e).__name__}: {e}")
            self.check_failed(op, fault)
            self.retry(op)
        except Exception as e:
            self.disk.heal()
            self.fail(f"{op.what} raised {type(e).__name__}, not a library error: {e}")
        else:
            self.disk.heal()
            op.done()
        self.note_invalidations(op)
        assert_accounting(self.store, f"{SEED_ENV}={self.seed} step {self.step} after {op.what}")

    def retry(self, op: Op) -> None:
        """The client retries the operation once the fault is gone: it must go through."""
        self.counts["retried"] += 1
        self.fault = None
        try:
            op.run()
        except (PreservationDeferred, PreservationFull):
            return
        except Exception as e:
            self.fail(f"retrying {op.what} with the fault gone failed: {type(e).__name__}: {e}")
        op.done()
        self.note_invalidations(op)
        self.check_restart_sees_the_same("after the retry")

    def note_invalidations(self, op: Op) -> None:
        """Snapshots invalidated since the last look: only by an overflow, and told."""
        told = {s for _, s, _ in self.heard}
        for s in self.snaps.values():
            if s.valid and not self.vol.snapshot(s.name).valid:
                s.valid = False
                reason = self.vol.snapshot(s.name).info().reason
                if "full" not in reason and "capacity" not in reason:
                    self.fail(f"{op.what} invalidated {s.name}: {reason}")
                if s.name not in told:
                    self.fail(f"{op.what} invalidated {s.name} without telling the listener")

    # -- checks

    def check_failed(self, op: Op, fault: Fault) -> None:
        origin_written = op.kind == "batch" and any(
            f.startswith(("pwrite of origin", "punch of origin")) for f in fault.fired
        )
        assert_accounting(self.store, f"{SEED_ENV}={self.seed} step {self.step} after the failed {op.what}")
        names = {s.name for s in self.vol.snapshots()}
        if names != set(self.snaps):
            self.fail(
                f"after the failed {op.what}, snapshots {sorted(names)} instead of {sorted(self.snaps)}"
            )
        self.note_invalidations(op)
        self.check_snapshots(f"after the failed {op.what}")
        if not origin_written and self.vol.read(0, self.size) != self.model:
            self.fail(f"the failed {op.what} changed the origin")
        if fault.count == 1:  # its clean-up could write: a restart sees the same right away
            self.check_restart_sees_the_same(f"after the failed {op.what}")
        if self.frng.random() < 0.3:
            self.check_power_loss_now(f"a power loss after the failed {op.what}")

    def check_power_loss_now(self, where: str) -> None:
        """The failure and its clean-up never hurt what is durable: after a power loss now, every
        read-only snapshot still there and valid reads its image (writable ones may lose unflushed
        writes; the origin may lose unflushed writes)."""
        mode = self.frng.choice(MODES)
        images = Replay(self.disk).images(self.disk.now, mode, random.Random(f"{self.seed}-{self.step}"))
        try:
            vol = reopened(bytes(images["store"]), bytes(images["origin"]), VOLUME, self.bs)
        except StandbyError as e:
            self.fail(f"{where} ({mode}): the store does not open: {e}")
        try:
            for s in self.snaps.values():
                if not s.valid or s.writable:
                    continue
                found = [x for x in vol.snapshots() if x.name == s.name]
                if found and found[0].valid and found[0].read(0, self.size) != s.image:
                    self.fail(f"{where} ({mode}): snapshot {s.name} does not read its image")
        finally:
            vol.store.close()

    def check_snapshots(self, where: str) -> None:
        for s in self.snaps.values():
            if s.valid and self.vol.snapshot(s.name).read(0, self.size) != s.image:
                self.fail(f"{where}: snapshot {s.name} does not read its image")

    def check_live(self, where: str) -> None:
        if self.vol.read(0, self.size) != self.model:
            self.fail(f"{where}: the origin differs from the model")
        self.check_snapshots(where)

    def check_restart_sees_the_same(self, where: str) -> None:
        seen = observe_reopened(bytes(self.store_raw.data), bytes(self.origin.data), VOLUME, self.bs)
        diff = differences(observe(self.vol), seen)
        if diff:
            self.fail(f"{where}, a restart would see something else: {diff}")

    def check_model(self, seen: dict[str, object], where: str) -> None:
        if seen["origin"] != self.model:
            self.fail(f"{where}: the origin differs from the model")
        snaps = seen["snapshots"]
        assert isinstance(snaps, dict)
        if set(snaps) != set(self.snaps):
            self.fail(f"{where}: snapshots {sorted(snaps)} instead of {sorted(self.snaps)}")
        for s in self.snaps.values():
            valid, _reason, _blocks, image = snaps[s.name]
            if valid != s.valid or (valid and image != s.image):
                self.fail(f"{where}: snapshot {s.name} is not as the model says")

    def finish(self) -> None:
        self.check_live("at the end")
        names = [s for _, s, _ in self.heard]
        invalid = {s.name for s in self.snaps.values() if not s.valid}
        deleted = set(names) - set(self.snaps)  # invalidated, then deleted
        if len(names) != len(set(names)) or set(names) != invalid | deleted:
            self.fail(f"the listener heard {names}; invalid now: {sorted(invalid)}")
        for s in self.snaps.values():
            if s.valid and s.writable:
                self.vol.snapshot(s.name).flush()
        self.vol.flush()
        self.check_model(
            observe_reopened(bytes(self.store_raw.data), bytes(self.origin.data), VOLUME, self.bs),
            "after a restart",
        )
        images = Replay(self.disk).images(self.disk.now, "none")
        self.check_model(
            observe_reopened(bytes(images["store"]), bytes(images["origin"]), VOLUME, self.bs),
            "after a power loss once everything was flushed",
        )
        self.store.close()
        self.check_model(
            observe_reopened(bytes(self.store_raw.data), bytes(self.origin.data), VOLUME, self.bs),
            "after a clean close",
        )


def run_seed(seed: int, ops: int, monkeypatch: pytest.MonkeyPatch) -> str:
    config = Config.for_seed(seed, ops)
    with monkeypatch.context() as m:
        if config.kernel_copy:
            m.setattr(volume_module, "_CFR_MIN", 0)
        summary = FaultRun(seed, config).run()
    print(summary)
    return summary


@pytest.mark.parametrize("seed", [env_int(SEED_ENV, s) for s in DEFAULT_SEEDS])
def test_fault_injection(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    run_seed(seed, env_int("FAULT_OPS", 250), monkeypatch)


@pytest.mark.soak
def test_fault_injection_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    base = env_int(SEED_ENV, random.SystemRandom().randrange(1, 1 << 31))
    seeds = env_int("FAULT_SEEDS", 24)
    print(f"soak base seed {base} ({SEED_ENV}={base} FAULT_SEEDS={seeds} to repeat)")
    failures = []
    for seed in range(base, base + seeds):
        try:
            run_seed(seed, env_int("FAULT_OPS", 500), monkeypatch)
        except pytest.fail.Exception as e:
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)

"""The standby's disk really fills up: its --data-dir is a small ext4 image mounted with fuse2fs
(fullfs_support.py), and a filler file takes every block the filesystem still gives out.

Scenarios (each a short run in `make test`, and drawn with random sizes and timings by the seeded soak
run, which prints FULLFS_SEED=N; ``FULLFS_SEED=N .venv/bin/pytest -m soak tests/e2e/test_full_filesystem.py``
repeats one):

A. live: writes go on through the primary while the disk fills, then the filler is deleted;
B. copy: a snapshot's preservation copies are needed while the disk is full; space comes back by deleting
   the filler, by deleting a second snapshot, or by a trim on the primary (the replica punches holes);
C. create: `standbyctl snapshot create` while full: success, or a clear error that leaves nothing half
   made; after the space returns a snapshot can be taken, and a restart shows the same snapshots;
D. backup: `standby-backup run` while full: fails clearly leaving no snapshot, or succeeds; never a
   snapshot without its lease; after the space returns a backup restores the image;
E. resync: the standby is stopped, the primary written (and trimmed), the standby's disk filled, the
   standby restarted: the resync completes once the primary's trims make room or the filler is deleted;
F. A and B again under ``--on-full defer``.

After every scenario, with no restart of the standby (except where the scenario restarts it), the
recovery checks of `assert_recovered`: the replica equals the primary and the model, the standby reports
the volume uptodate and connected, the primary has nothing out of sync, no client write failed, no
refusal of the kind "already being mirrored" (ALREADY_EXISTS) once space came back, no stream dropped on
an unexpected error (INTERNAL, UNKNOWN), the standby alive, every snapshot that had room valid and
reading its frozen image, and the store's used bytes equal to the preserved bytes of its single
snapshot (0 with none).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    BS,
    VOLUME_SIZE,
    Daemon,
    Daemons,
    MiB,
    Model,
    Primary,
    Standby,
    Writer,
    backup_argv,
    first_difference,
    need,
    qemu_io,
    rand,
    run,
)
from faults_support import assert_snapshot
from fullfs_support import FullFs, mounted_fullfs, seeds, wait_until
from linkproxy import LinkProxy

from standbylib.snapshot import layout

pytestmark = pytest.mark.timeout(300)

#: Seconds the appliance gets to be back in sync once space returned (the primary's reconnect backoff is
#: at most 10 s; the resync of a few MiB takes a second or two).
RECOVER_TIMEOUT = 60.0
#: The preservation capacity: more than the disk can hold, so the disk, not the store, is what fills.
CAPACITY = "96MiB"
#: Marks of a stream dropped because of a bug rather than a full disk.
UNEXPECTED_CODES = ("INTERNAL", "UNKNOWN")
BUSY_MARKS = ("ALREADY_EXISTS", "already being mirrored")


# ------------------------------------------------------------------------------------------ the rig


@pytest.fixture
def fullfs(tmp_path: Path) -> Iterator[FullFs]:
    with mounted_fullfs(tmp_path / "fullfs") as fs:
        yield fs


@dataclass
class Env:
    """What a scenario starts its rig in. Set up after the mount and before `daemons`, so the daemons
    stop before the filesystem is unmounted."""

    fs: FullFs
    daemons: Daemons
    tmp: Path
    proxies: list[LinkProxy] = field(default_factory=list)


@pytest.fixture
def env(fullfs: FullFs, daemons: Daemons, tmp_path: Path) -> Iterator[Env]:
    need("qemu-io", "nbdcopy", "fuse2fs", "mkfs.ext4")
    e = Env(fullfs, daemons, tmp_path)
    try:
        yield e
    finally:
        # Space back before the daemons are stopped: on a full fuse2fs even the standby's last flush
        # fails (see fullfs_support), and a test that failed while full must not fail twice for it.
        with contextlib.suppress(OSError):
            fullfs.free()
        for p in e.proxies:
            p.close()


@dataclass
class Mark:
    """A point in the daemons' logs: how many lines and events each had then."""

    at: dict[int, tuple[int, int]]
    when: float

    def lines(self, daemons: Daemons) -> list[tuple[str, str]]:
        """``(daemon, line)`` logged since the mark, by every daemon of the test."""
        out = []
        for d in daemons.started:
            with d._cond:
                new = d.lines[self.at.get(id(d), (0, 0))[0] :]
            out += [(d.name, line) for line in new]
        return out


@dataclass
class Rig:
    """A standby whose --data-dir is on the full-able filesystem, a primary in sync mode joined to it
    through a `LinkProxy` (the standby can be restarted on a new port), and the model of vol0."""

    env: Env
    policy: str
    standby: Standby
    primary: Primary
    proxy: LinkProxy
    model: Model
    writer: Writer
    extra: tuple[str, ...]

    @property
    def fs(self) -> FullFs:
        return self.env.fs

    @property
    def tmp(self) -> Path:
        return self.env.tmp

    @property
    def data_dir(self) -> Path:
        return self.fs.mnt / "standby"

    def mark(self) -> Mark:
        at = {}
        for d in self.env.daemons.started:
            with d._cond:
                at[id(d)] = (len(d.lines), len(d.events))
        return Mark(at, time.monotonic())

    def events(self, daemon: Daemon, name: str, since: Mark | None = None) -> list[dict[str, Any]]:
        """The events `name` of `daemon`, all or since the mark."""
        start = since.at.get(id(daemon), (0, 0))[1] if since is not None else 0
        with daemon._cond:
            events = daemon.events[start:]
        return [e for e in events if e.get("event") == name]

    def standbys(self) -> list[Daemon]:
        return [d for d in self.env.daemons.started if d.name.endswith("-standby")]

    def restart_standby(self) -> None:
        """A clean stop (SIGTERM, exit 0) and a start on the same data directory."""
        rc = self.standby.daemon.stop()
        assert rc == 0, f"the standby exited {rc} on SIGTERM:\n{self.standby.daemon.tail()}"
        self.start_standby()

    def stop_standby(self) -> None:
        rc = self.standby.daemon.stop()
        assert rc == 0, f"the standby exited {rc} on SIGTERM:\n{self.standby.daemon.tail()}"

    def start_standby(self) -> None:
        self.standby = self.env.daemons.standby(self.data_dir, *self.extra)
        self.proxy.restore(self.standby)

    def save(self, name: str, image: bytes) -> Path:
        return self.model.save(self.tmp / f"{name}.expected.img", image)

    def flush(self) -> None:
        qemu_io(self.primary.uri("vol0"), "flush")

    def trim(self, offset: int, length: int) -> None:
        """A trim (NBD_CMD_TRIM) through the primary: its volume and, mirrored, the replica punch holes."""
        qemu_io(self.primary.uri("vol0"), f"discard {offset} {length}", "flush")
        self.model.zero(offset, length)


def start_rig(env: Env, policy: str = "invalidate", capacity: str = CAPACITY) -> Rig:
    extra = ("--on-full", policy, "--preservation-capacity", capacity)
    standby = env.daemons.standby(env.fs.mnt / "standby", *extra)
    proxy = LinkProxy(standby)
    env.proxies.append(proxy)
    vol = env.tmp / "primary" / "vol0.img"
    vol.parent.mkdir(exist_ok=True)
    primary = env.daemons.primary(
        proxy,
        {"vol0": f"{vol},size=32MiB,block-size=4096"},
        "--mode", "sync", "--ack-timeout", "5",
    )  # fmt: skip
    model = Model(VOLUME_SIZE)
    scratch = env.tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    writer = Writer(primary.uri("vol0"), model, scratch)
    return Rig(env, policy, standby, primary, proxy, model, writer, extra)


# ------------------------------------------------------------------------------------------ helpers


class Background:
    """Writes through the primary in a thread (one qemu-io call per write, 4 KiB to 1 MiB, half random
    data, half patterns) inside [lo, hi); mirrors each into the model; records every failed write."""

    def __init__(self, rig: Rig, rng: random.Random, lo: int, hi: int, max_len: int = MiB) -> None:
        self.rig, self.rng, self.lo, self.hi, self.max_len = rig, rng, lo, hi, max_len
        self.failures: list[str] = []
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-writer", daemon=True)
        self._src = rig.tmp / "scratch" / "background.bin"

    def start(self) -> Background:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the background writer did not stop"

    def _run(self) -> None:
        uri = self.rig.primary.uri("vol0")
        sizes = [n for n in (BS, 16 * BS, 64 * BS, 256 * BS) if n <= self.max_len]
        while not self._stop.is_set():
            length = self.rng.choice(sizes)
            offset = self.lo + self.rng.randrange((self.hi - self.lo - length) // BS + 1) * BS
            if self.rng.random() < 0.5:
                data = rand(length, seed=self.rng.randrange(1 << 30))
                self._src.write_bytes(data)
                cmd = f"write -s {self._src} {offset} {length}"
            else:
                byte = self.rng.randrange(1, 256)
                data = bytes([byte]) * length
                cmd = f"write -P 0x{byte:02x} {offset} {length}"
            cp = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", cmd, uri], capture_output=True, text=True, timeout=120
            )
            if cp.returncode != 0 or "failed" in cp.stdout + cp.stderr:
                self.failures.append(f"{cmd}: exit {cp.returncode}: {cp.stdout}{cp.stderr}".strip())
                time.sleep(0.2)  # a pause after a failed write (asserted at the end), not a busy loop
                continue
            self.rig.model.write(offset, data)
            self.writes += 1

    @property
    def tried(self) -> int:
        """Writes done or failed so far."""
        return self.writes + len(self.failures)

    def wait_writes(self, n: int, what: str) -> None:
        """Until `n` more writes were done (or failed: asserted at the end)."""
        target = self.tried + n
        wait_until(lambda: self.tried >= target, 60, f"{what}: the background writer wrote nothing", 0.02)


def refusals(rig: Rig, since: Mark | None = None) -> list[str]:
    """What shows the standby could not apply (the evidence that the disk was really full)."""
    out = []
    for d in rig.standbys():
        for e in rig.events(d, "batch_refused", since):
            out.append(f"{d.name} batch_refused: {e.get('error')}")
        for e in rig.events(d, "replication_deferred", since):
            out.append(f"{d.name} replication_deferred: {e.get('reason')}")
    for e in rig.events(rig.primary.daemon, "mirror_disconnected", since):
        if "RESOURCE_EXHAUSTED" in str(e.get("error")):
            out.append(f"primary mirror_disconnected: {e.get('error')}")
    return out


def in_sync(rig: Rig) -> bool:
    m = rig.primary.metrics()
    return (
        m.find("standby_replication_connected", volume="vol0") == 1
        and m.find("standby_resync_remaining_bytes", volume="vol0") == 0
        and m.find("standby_out_of_sync_bytes", volume="vol0") == 0
    )


def wait_refused(rig: Rig, since: Mark, required: bool, timeout: float = 30.0) -> list[str]:
    """Until the standby refused (or deferred) a batch since `since`: the evidence that the writes met
    the full disk. Unless `required`, the standby may instead have applied everything (the writes fitted
    in the space it keeps in reserve): then [] once the primary is in sync."""
    rig.flush()

    def outcome() -> list[str] | None:
        found = refusals(rig, since)
        if found or required or not in_sync(rig):
            return found or None
        return []

    wait_until(
        lambda: outcome() is not None,
        timeout,
        f"the standby never refused a batch although its disk is full; {rig.fs.usage()}; standby log "
        f"tail:\n{rig.standby.daemon.tail(15)}",
    )
    got = outcome() or []
    if got:
        print("evidence of the full disk:\n  " + "\n  ".join(got[:4]))
    else:
        print(f"no refusal: the standby applied every write on the full disk ({rig.fs.usage()})")
    return got


def recovery_report(rig: Rig) -> str:
    m = rig.primary.metrics()
    lines = [
        "primary: connected={} out_of_sync={} resync_remaining={}".format(
            m.find("standby_replication_connected", volume="vol0"),
            m.find("standby_out_of_sync_bytes", volume="vol0"),
            m.find("standby_resync_remaining_bytes", volume="vol0"),
        ),
        f"filesystem: {rig.fs.free_inodes()} inodes free, {rig.fs.usage()}",
    ]
    for e in rig.events(rig.primary.daemon, "mirror_disconnected")[-4:]:
        lines.append(f"primary mirror_disconnected: {e.get('error')}")
    for d in rig.standbys():
        for e in rig.events(d, "batch_refused")[-3:]:
            lines.append(f"{d.name} batch_refused: {e.get('error')}")
    lines.append(f"standby log tail:\n{rig.standby.daemon.tail(12)}")
    return "\n".join(lines)


def wait_recovered(rig: Rig, timeout: float = RECOVER_TIMEOUT) -> float:
    """Until the primary is connected with nothing out of sync; the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        m = rig.primary.metrics()
        if (
            m.find("standby_replication_connected", volume="vol0") == 1
            and m.find("standby_resync_remaining_bytes", volume="vol0") == 0
            and m.find("standby_out_of_sync_bytes", volume="vol0") == 0
        ):
            return time.monotonic() - start
        if time.monotonic() > deadline:
            pytest.fail(
                f"the appliance did not get back in sync within {timeout:.0f} s of space returning\n"
                + recovery_report(rig),
                pytrace=False,
            )
        time.sleep(0.2)


def assert_recovered(rig: Rig, freed: Mark, snapshots: dict[str, bytes]) -> None:
    """The checks after space came back at `freed`; `snapshots`: name -> the image it must read (every
    snapshot that had room)."""
    rig.flush()
    took = wait_recovered(rig)
    since = time.monotonic() - freed.when
    print(f"back in sync after {took:.1f} s of waiting ({since:.1f} s after space returned)")
    s, p = rig.standby, rig.primary
    assert s.daemon.alive(), f"the standby died:\n{s.daemon.tail()}"
    want = rig.model.freeze()
    primary_file = p.volumes["vol0"].read_bytes()
    assert primary_file == want, f"the primary's volume != the model: {first_difference(primary_file, want)}"
    replica = s.replica("vol0").read_bytes()
    assert replica == want, f"the replica differs from the primary: {first_difference(replica, want)}"
    vol = s.status()["volumes"][0]
    assert vol["state"] == "uptodate" and vol["connected"], f"standbyctl status: {vol}"
    assert p.metrics().get("standby_out_of_sync_bytes", volume="vol0") == 0
    busy = [f"{n}: {ln}" for n, ln in freed.lines(rig.env.daemons) if any(b in ln for b in BUSY_MARKS)]
    assert not busy, "refused as already being mirrored after space came back:\n" + "\n".join(busy[:5])
    unexpected = [
        str(e.get("error"))
        for e in rig.events(p.daemon, "mirror_disconnected")
        if str(e.get("error", "")).startswith(UNEXPECTED_CODES)
    ]
    assert not unexpected, "the stream was dropped on unexpected errors:\n" + "\n".join(unexpected[:5])
    listed = {x["name"]: x for x in s.snapshots("vol0")}
    for name, image in snapshots.items():
        assert name in listed, f"snapshot {name} is gone: listed {sorted(listed)}"
        assert listed[name]["valid"], f"snapshot {name} had room but was invalidated: {listed[name]}"
        assert_snapshot(s, name, rig.save(name, image), rig.tmp)
    m = s.metrics()
    used = m.get("standby_preservation_used_bytes")
    live = [x for x in listed.values() if x["valid"]]
    preserved = sum(m.get("standby_preservation_used_bytes", volume="vol0", snapshot=x["name"]) for x in live)
    if len(listed) == 1 and live:
        assert used == preserved, (
            f"the store uses {used:.0f} bytes but its one snapshot preserves {preserved:.0f} "
            f"(a leak of {used - preserved:.0f} bytes)"
        )
    elif not listed:
        assert used == 0, f"the store uses {used:.0f} bytes with no snapshot"
    assert s.status()["store"]["used_bytes"] == used, "status and metrics disagree on the store's used bytes"
    store = rig.data_dir / "preservation.store"
    allocated, allowed = store.stat().st_blocks * 512, store_allowance(store, int(used))
    assert allocated <= allowed, (
        f"the store file holds {allocated} bytes of disk for {used:.0f} bytes of preserved blocks "
        f"(at most {allowed} with its metadata): slots of failed copies were not given back to the filesystem"
    )


#: The store's layout (docs/STORE-FORMAT.md): areas from 4 MiB on, each a 4 KiB entry block and 127 slots.


def store_allowance(store: Path, used: int) -> int:
    """The most disk the store file may take for `used` bytes of preserved blocks: those, the superblock,
    the allocated part of the two table copies and the file's extent blocks (64 KiB for both), and one
    entry block per area (data areas, and entry areas of hole entries, which have no slots): the areas
    are counted by walking their headers."""
    areas = 0
    with open(store, "rb") as f:
        size, offset = os.fstat(f.fileno()).st_size, layout.AREAS_OFFSET
        while offset < size:
            slot_size = layout.unpack_area_header(os.pread(f.fileno(), layout.AREA_HEADER, offset), areas)
            if slot_size is None:
                break
            areas += 1
            offset += layout.area_size(slot_size)
    return used + BS + 64 * 1024 + areas * BS


def assert_clear_error(cp: subprocess.CompletedProcess[str], what: str) -> None:
    """A failure a person can act on: exit 1, one line naming the lack of space, no traceback."""
    err = cp.stderr.strip()
    assert cp.returncode == 1, f"{what} exited {cp.returncode}, expected 1:\n{cp.stdout}{err}"
    assert "Traceback" not in err, f"{what} printed a traceback:\n{err}"
    words = " ".join(w for w in err.lower().split() if "/" not in w)  # not the paths (".../fullfs/...")
    assert "space" in words or "full" in words, f"{what}: the message does not say the disk is full: {err!r}"


# ------------------------------------------------------------------------------------------ parameters


@dataclass
class Params:
    """Sizes and timings of one run; the defaults are the short runs', the soak draws them."""

    seed: int = 1
    fill_mode: str = "blocks"  # blocks, inodes or both
    data: int = 8 * MiB  # written before the snapshot
    overwrite: int = 6 * MiB  # of the snapshot's data, overwritten while full (copies needed)
    fresh: int = 6 * MiB  # never written before, written while full (replica blocks needed)
    trim: int = 12 * MiB  # written, then trimmed to make room
    full_seconds: float = 1.5  # the disk stays full this long after the first refusal
    max_write: int = MiB
    extra_snapshots: int = 0  # taken before the disk fills (scenario C)
    # The short runs write more than the standby keeps in reserve (4 MiB, given up when the disk is full)
    # and require a refusal; the soak draws any size and accepts that the reserve took it all.
    require_refusal: bool = True

    @classmethod
    def draw(cls, seed: int) -> Params:
        rng = random.Random(seed)
        data = rng.randrange(2, 17) * MiB
        return cls(
            seed=seed,
            fill_mode=rng.choice(("blocks", "blocks", "both")),
            data=data,
            overwrite=rng.randrange(1, data // MiB + 1) * MiB // 2,
            fresh=rng.randrange(1, 17) * MiB // 2,
            trim=rng.randrange(8, 15) * MiB,
            full_seconds=rng.uniform(0.2, 4.0),
            max_write=rng.choice((64 * 1024, 256 * 1024, MiB)),
            extra_snapshots=rng.choice((0, 1, 3, 12, 24)),
            require_refusal=False,
        )


def write_data(rig: Rig, offset: int, length: int, seed: int) -> None:
    """Random data in pieces of up to 1 MiB, in one qemu-io session."""
    pieces = [(o, rand(min(MiB, offset + length - o), seed=seed * 1000 + i)) for i, o in
              enumerate(range(offset, offset + length, MiB))]  # fmt: skip
    rig.writer.many(pieces)


def write_in_pieces(rig: Rig, rng: random.Random, offset: int, length: int, max_write: int) -> None:
    """Overwrite [offset, offset+length) with random data in writes of up to `max_write` (each one client
    write that must succeed)."""
    pos = offset
    writes = []
    sizes = [BS * k for k in (1, 4, 16, 64, 256) if BS * k <= max_write]
    while pos < offset + length:
        n = min(offset + length - pos, rng.choice(sizes))
        writes.append((pos, rand(n, seed=rng.randrange(1 << 30))))
        pos += n
    rig.writer.many(writes)


def start_rig_with_data(env: Env, policy: str, p: Params) -> Rig:
    """`start_rig`, then the first `p.data` bytes of vol0 written with random data and mirrored."""
    rig = start_rig(env, policy)
    write_data(rig, 0, p.data, p.seed)
    rig.primary.wait_in_sync()
    return rig


# ------------------------------------------------------------------------------------------ scenarios


def scenario_live(env: Env, policy: str, p: Params) -> None:
    """A: writes go on through the primary while the disk fills; then the filler is deleted."""
    rig = start_rig_with_data(env, policy, p)
    rng = random.Random(p.seed)
    snap = rig.standby.snapshot("vol0", "live")
    image = rig.model.freeze()
    bg = Background(rig, rng, 0, p.data, p.max_write).start()
    try:
        bg.wait_writes(1, "before the disk fills")  # writes are going on when it fills
        before = rig.mark()
        taken = rig.fs.fill(p.fill_mode)
        print(f"filled: {taken} taken, {rig.fs.available()} bytes available")
        # blocks the replica never had: these need new blocks of the filesystem whatever the copies do
        rig.writer.fill(p.data, p.fresh, 0x77)
        wait_refused(rig, before, p.require_refusal)
        time.sleep(p.full_seconds)  # the disk stays full a while: the background writes go on meanwhile
        freed = rig.mark()
        rig.fs.free()
        rig.writer.fill(p.data + p.fresh, 64 * 1024, 0x78)
        bg.wait_writes(2, "after space returned")  # and go on once it is back
    finally:
        bg.stop()
    assert not bg.failures, f"{len(bg.failures)} client writes failed, first: {bg.failures[0]}"
    assert bg.writes > 0, "the background writer got no write done"
    assert_recovered(rig, freed, {snap: image})


def scenario_copy(env: Env, policy: str, p: Params, free_by: str) -> None:
    """B: preservation copies needed while the disk is full; space back by deleting the filler, a
    second snapshot, or by a trim on the primary."""
    rig = start_rig_with_data(env, policy, p)
    rng = random.Random(p.seed)
    snap = rig.standby.snapshot("vol0", "keep")
    images = {snap: rig.model.freeze()}
    overwrite = min(p.overwrite, p.data)
    target = 0  # the region overwritten while full
    if free_by == "snapshot":
        # a second snapshot that alone holds copies of `region` (the first one's copies were made before it)
        region = max(overwrite, p.data // 2)
        write_in_pieces(rig, rng, 0, region, p.max_write)
        second = rig.standby.snapshot("vol0", "second")
        write_in_pieces(rig, rng, 0, region, p.max_write)
        rig.primary.wait_in_sync()
        # overwritten while full: blocks neither snapshot has a copy of yet, half as many as the second
        # snapshot's own copies (room for the store's entries, a new area, the state file)
        target = region
        overwrite = min(overwrite, region // 2, p.data - region)
        if overwrite <= 0:  # no such block in the data: take never-written blocks (hole entries, which
            # need no space: the store then refuses only for want of room for its entries or state)
            target, overwrite = p.data, min(region // 2, 2 * MiB)
    elif free_by == "trim":
        # written after the snapshot, so preserved already: trimming it needs no copy and frees blocks
        trim_at = 16 * MiB
        rig.writer.fill(trim_at, min(p.trim, VOLUME_SIZE - trim_at), 0x5E)
        rig.primary.wait_in_sync()
    before = rig.mark()
    print(f"before the fill: {rig.fs.usage()}")
    taken = rig.fs.fill(p.fill_mode)
    print(f"filled: {taken} taken, {rig.fs.available()} bytes available")
    write_in_pieces(rig, rng, target, overwrite, p.max_write)
    wait_refused(rig, before, p.require_refusal)
    time.sleep(p.full_seconds)  # the disk stays full a while: the primary's retries meet it too
    freed = rig.mark()
    if free_by == "filler":
        rig.fs.free()
    elif free_by == "snapshot":
        rig.standby.ctl("snapshot", "delete", "vol0", second)
    else:
        rig.trim(16 * MiB, min(p.trim, VOLUME_SIZE - 16 * MiB))
    assert_recovered(rig, freed, images)
    rig.fs.free()  # the same again with space to spare: nothing was left wedged
    write_in_pieces(rig, rng, 0, min(MiB, p.data), p.max_write)
    assert_recovered(rig, freed, images)


def scenario_create(env: Env, policy: str, p: Params) -> None:
    """C: `standbyctl snapshot create` while the disk is full."""
    rig = start_rig_with_data(env, policy, p)
    image = rig.model.freeze()
    images = {rig.standby.snapshot("vol0", f"pre{i}"): image for i in range(p.extra_snapshots)}
    rig.fs.fill(p.fill_mode)
    assert rig.fs.is_full() or p.fill_mode == "inodes", "the filesystem is not full"
    cp = rig.standby.ctl("snapshot", "create", "vol0", "full1", check=False)
    print(f"snapshot create while full: exit {cp.returncode} {cp.stdout.strip()} {cp.stderr.strip()}")
    assert rig.standby.daemon.alive(), f"the standby died:\n{rig.standby.daemon.tail()}"
    listed = {s["name"]: s for s in rig.standby.snapshots("vol0")}
    if cp.returncode == 0:
        assert "full1" in listed and listed["full1"]["valid"], f"created but not listed valid: {listed}"
        images["full1"] = image
    else:
        assert_clear_error(cp, "snapshot create on a full disk")
        assert "full1" not in listed, f"a failed create left the snapshot behind: {listed.get('full1')}"
    assert set(listed) == set(images), f"snapshots {sorted(listed)}, expected {sorted(images)}"
    for name in listed:
        assert listed[name]["valid"], f"{name} is invalid: {listed[name]}"
        assert_snapshot(rig.standby, name, rig.save(name, image), rig.tmp)
    freed = rig.mark()
    rig.fs.free()
    images[rig.standby.snapshot("vol0", "after")] = image
    # what a restart finds on disk is what was reported: nothing half made survives, nothing made is lost
    rig.restart_standby()
    after = {s["name"]: s for s in rig.standby.snapshots("vol0")}
    assert set(after) == set(images), f"after a restart: {sorted(after)}, expected {sorted(images)}"
    assert all(s["valid"] for s in after.values()), f"after a restart: {after}"
    assert_recovered(rig, freed, images)


def scenario_backup(env: Env, policy: str, p: Params) -> None:
    """D: a backup's snapshot and lease while the disk is full."""
    rig = start_rig_with_data(env, policy, p)
    image = rig.model.freeze()
    rig.fs.fill(p.fill_mode)
    out = rig.tmp / "full.arc"
    cp = run(*backup_argv("run", "vol0", "--standby", rig.standby.grpc, "--output", str(out),
                          "--lease", "30", "--metrics-listen", "off"), check=False, timeout=120)  # fmt: skip
    print(f"backup while full: exit {cp.returncode}: {cp.stderr.strip()[-400:]}")
    assert rig.standby.daemon.alive(), f"the standby died:\n{rig.standby.daemon.tail()}"
    left = rig.standby.snapshots("vol0")
    if cp.returncode == 0:
        check_archive(rig, out, image)
    else:
        assert_clear_error(cp, "standby-backup run on a full disk")
    if left:
        leases = rig.data_dir / "leases.json"
        held = leases.read_text() if leases.exists() else "(no leases.json)"
        names = [s["name"] for s in left]
        pytest.fail(f"the backup left snapshots behind: {names}; leases.json: {held}", pytrace=False)
    freed = rig.mark()
    rig.fs.free()
    out2 = rig.tmp / "after.arc"
    run(*backup_argv("run", "vol0", "--standby", rig.standby.grpc, "--output", str(out2),
                     "--lease", "30", "--metrics-listen", "off"), timeout=120)  # fmt: skip
    check_archive(rig, out2, image)
    assert not rig.standby.snapshots("vol0"), "the backup did not release its snapshot"
    assert_recovered(rig, freed, {})


def check_archive(rig: Rig, archive: Path, image: bytes) -> None:
    run(*backup_argv("verify", str(archive)))
    restored = rig.tmp / "restored.img"
    restored.unlink(missing_ok=True)
    run(*backup_argv("restore", str(archive), "--output", str(restored)))
    got = restored.read_bytes()
    restored.unlink()
    assert got == image, f"the archive restores another image: {first_difference(got, image)}"


def scenario_resync(env: Env, policy: str, p: Params, free_by: str) -> None:
    """E: the standby comes back to a full disk and a resync to apply."""
    rig = start_rig(env, policy)
    rng = random.Random(p.seed)
    write_data(rig, 0, min(p.data, 6 * MiB), p.seed)
    trim_at, trim = 8 * MiB, min(p.trim, 12 * MiB)
    rig.writer.fill(trim_at, trim, 0x3D)  # on the replica too: trimming it later frees its blocks
    rig.primary.wait_in_sync()
    rig.stop_standby()
    # the primary goes on alone: new data, data written and trimmed again, and (free_by=trim) a trim
    fresh = min(p.fresh, trim - 2 * MiB) if free_by == "trim" else p.fresh
    write_in_pieces(rig, rng, 20 * MiB, fresh, p.max_write)
    rig.writer.fill(26 * MiB, 4 * MiB, 0x4E)
    rig.trim(26 * MiB, 4 * MiB)
    if free_by == "trim":
        rig.trim(trim_at, trim)
    rig.flush()
    taken = rig.fs.fill(p.fill_mode)
    print(f"filled: {taken} taken, {rig.fs.available()} bytes available")
    before = rig.mark()
    rig.start_standby()
    if free_by == "filler":
        wait_refused(rig, before, p.require_refusal, timeout=45)
        time.sleep(p.full_seconds)  # the disk stays full a while: the primary's retries meet it too
        freed = rig.mark()
        rig.fs.free()
    else:
        freed = before
    assert_recovered(rig, freed, {})
    print("what the full disk did:\n  " + ("\n  ".join(refusals(rig, before)[:4]) or "no refusal"))


# ------------------------------------------------------------------------------------------ short runs


@pytest.mark.parametrize("policy", ["invalidate", "defer"])
def test_a_disk_fills_during_live_mirroring(env: Env, policy: str) -> None:
    scenario_live(env, policy, Params())


@pytest.mark.parametrize("policy", ["invalidate", "defer"])
def test_b_disk_fills_during_a_preservation_copy_freed_by_deleting_the_filler(env: Env, policy: str) -> None:
    scenario_copy(env, policy, Params(), "filler")


def test_b_disk_fills_during_a_preservation_copy_freed_by_deleting_a_snapshot(env: Env) -> None:
    # the second snapshot holds copies of 12 MiB; 6 MiB of copies are needed while full
    scenario_copy(env, "invalidate", Params(data=24 * MiB), "snapshot")


def test_b_disk_fills_during_a_preservation_copy_freed_by_a_trim_on_the_primary(env: Env) -> None:
    scenario_copy(env, "invalidate", Params(), "trim")


@pytest.mark.parametrize("fill_mode", ["blocks", "inodes"])
def test_c_snapshot_create_on_a_full_disk(env: Env, fill_mode: str) -> None:
    scenario_create(env, "invalidate", Params(fill_mode=fill_mode, extra_snapshots=1))


@pytest.mark.parametrize("fill_mode", ["blocks", "inodes"])
def test_d_backup_on_a_full_disk_leaves_no_snapshot_without_a_lease(env: Env, fill_mode: str) -> None:
    scenario_backup(env, "invalidate", Params(fill_mode=fill_mode))


def test_e_resync_onto_a_full_disk_completes_once_the_primary_trims(env: Env) -> None:
    scenario_resync(env, "invalidate", Params(), "trim")


def test_e_resync_onto_a_full_disk_completes_once_the_filler_is_deleted(env: Env) -> None:
    scenario_resync(env, "invalidate", Params(), "filler")


# ------------------------------------------------------------------------------------------ soak

SCENARIOS = (
    "live", "copy-filler", "copy-snapshot", "copy-trim", "create", "backup", "resync-trim", "resync-filler",
)  # fmt: skip


def run_seed(env: Env, seed: int) -> str:
    rng = random.Random(seed)
    scenario = rng.choice(SCENARIOS)
    policy = rng.choice(("invalidate", "defer"))
    p = Params.draw(rng.randrange(1 << 31))
    if scenario in ("create", "backup"):
        p.fill_mode = rng.choice(("blocks", "inodes", "both"))
    print(f"FULLFS_SEED={seed}: {scenario}, on-full {policy}, {p}")
    kind, _, how = scenario.partition("-")
    if kind == "live":
        scenario_live(env, policy, p)
    elif kind == "copy":
        scenario_copy(env, policy, p, how)
    elif kind == "create":
        scenario_create(env, policy, p)
    elif kind == "backup":
        scenario_backup(env, policy, p)
    else:
        scenario_resync(env, policy, p, how)
    return scenario


@pytest.mark.soak
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", seeds(24))
def test_full_filesystem_soak(env: Env, seed: int) -> None:
    print(f"full filesystem soak (repeat: FULLFS_SEED={seed} .venv/bin/pytest -m soak {__file__})")
    run_seed(env, seed)

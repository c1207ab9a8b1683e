"""The fault matrix: seeded random sequences of faults while a client writes through the primary in sync
mode and snapshots come and go. After every run: no write the primary acknowledged is missing on the
standby at any kill of the primary, the replica equals the primary, the snapshot taken before the faults
reads its frozen image, and nothing is left out of sync.

Each run prints its seed; ``FAULT_SEED=N`` repeats one run exactly (same faults, same order, same
draws). `make test` runs two short runs; `make soak` runs many long ones.

Faults are placed on what they must hit, never by fixed pauses: a link is cut once the primary mirrors,
and restored once it noticed and the writer got writes through meanwhile; a stall holds bytes in transit
(and, drawn longer than the --ack-timeout, until the primary gave up on the stream); a full disk stays
full for a number of the writer's writes. Each drawn duration becomes that many of the writer's writes
(`WRITES_PER_SECOND`), so the draws, and the faults of a seed, are what they were.

The full-filesystem runs put the standby's --data-dir on a small ext4 image mounted with fuse2fs
(fullfs_support.py) and add the fault `fill_disk`: a filler file takes every block (or every inode) the
filesystem still gives out for a while, then is deleted; the file-size limit of `disk_full` emulates the
same from outside, this one is the real thing (ENOSPC from the filesystem, on every file of the standby).
`make test` runs one short such run, `make soak` 20 long ones.
"""

from __future__ import annotations

import os
import random
import resource
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from e2e_support import VOLUME_SIZE, Daemons, MiB, Primary, Standby, backup_argv, need, rand
from faults_support import assert_in_sync, assert_snapshot, frozen_snapshot, link_lost, start_pair, wait_for
from fullfs_support import FullFs, mounted_fullfs
from fullfs_support import seeds as drawn_seeds
from linkproxy import LinkProxy

pytestmark = pytest.mark.both_transports(grpc_soak=True)

FAULTS = (
    "cut_link", "stall_link", "kill_standby", "kill_primary", "snapshot_churn", "disk_full", "small_snapshot",
    "kill_backup",
)  # fmt: skip
BLOCK = 64 * 1024
#: The full-filesystem runs: the chance that a fault is `fill_disk`, the image's size (room for the 32 MiB
#: replica and the preservation capacity below, so that only the filler fills it) and that capacity.
FILL_DISK_CHANCE = 0.4
FULLFS_SIZE = 256 * MiB
FULLFS_CAPACITY = "160MiB"
#: The primary's --ack-timeout in these runs (`start_pair`, `restart_primary`): a longer stall drops
#: the stream.
ACK_TIMEOUT = 3.0
#: How many of the writer's writes a drawn second of a fault stands for.
WRITES_PER_SECOND = 10


def writes_for(seconds: float) -> int:
    return max(1, round(seconds * WRITES_PER_SECOND))


@dataclass
class AckedWriter:
    """Writes 64 KiB blocks of distinct content through the primary, one qemu-io call each (sync mode:
    a call that succeeds was applied by the standby); remembers what was acknowledged."""

    uri: str
    scratch: Path
    seed: int
    acked: dict[int, bytes] = field(default_factory=dict)  # block offset -> content, latest wins
    unsure: set[int] = field(default_factory=set)  # blocks of writes that failed (killed mid-write)
    writes: int = 0
    attempts: int = 0  # writes tried, acknowledged or not
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        src = self.scratch / f"acked-{self.seed}.bin"
        while not self._stop.is_set():
            offset = rng.randrange(VOLUME_SIZE // BLOCK) * BLOCK
            data = rand(BLOCK, seed=rng.randrange(1 << 30))
            src.write_bytes(data)
            cp = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -s {src} {offset} {BLOCK}", self.uri],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr:
                self.acked[offset] = data
                self.unsure.discard(offset)
                self.writes += 1
            else:
                self.unsure.add(offset)  # may or may not have reached either side
                time.sleep(0.2)  # a pause before the next try: the primary may be restarting
            with self._progress:
                self.attempts += 1
                self._progress.notify_all()

    def wait_writes(self, n: int, what: str, timeout: float = 120.0) -> None:
        """Until the writer tried `n` more writes (what a fault of `what` is kept up for)."""
        with self._progress:
            target = self.attempts + n
            if not self._progress.wait_for(lambda: self.attempts >= target, timeout):
                pytest.fail(
                    f"{what}: the writer did {n - (target - self.attempts)} of {n} writes in {timeout:.0f} s",
                    pytrace=False,
                )

    def check(self, image: Path, what: str) -> int:
        """Every acknowledged block is in `image`; the number checked."""
        checked = 0
        with open(image, "rb") as f:
            for offset, data in self.acked.items():
                if offset in self.unsure:
                    continue
                f.seek(offset)
                assert f.read(BLOCK) == data, f"{what}: the acknowledged write at {offset} is missing"
                checked += 1
        return checked


def run_matrix(
    daemons: Daemons, tmp: Path, seed: int, events: int, fullfs: FullFs | None = None
) -> list[str]:
    """One seeded run of `events` random faults; the faults done, in order. With `fullfs` the standby's
    data directory is on that filesystem and `fill_disk` faults fill it (at least one per run)."""
    rng = random.Random(seed)
    policy = rng.choice(("invalidate", "defer"))
    standby_extra: tuple[str, ...] = ("--on-full", policy)
    data_dir = None
    if fullfs is not None:
        data_dir = fullfs.mnt / "standby"
        standby_extra += ("--preservation-capacity", FULLFS_CAPACITY)
    standby, primary, proxy = start_pair(daemons, tmp, standby_extra=standby_extra, data_dir=data_dir)
    done: list[str] = [f"on-full {policy}"]
    fills = 0
    try:
        name, expected = frozen_snapshot(standby, primary, tmp)
        writer = AckedWriter(primary.uri("vol0"), tmp, seed)
        writer.start()
        churn = 0
        kept: dict[str, Path] = {}  # snapshots left in place -> the image each must keep
        for event in range(events):
            if fullfs is not None and (
                rng.random() < FILL_DISK_CHANCE or (event == events - 1 and not fills)
            ):
                fault = "fill_disk"
            else:
                fault = rng.choice(FAULTS)
            writer.wait_writes(writes_for(rng.uniform(0.3, 1.5)), "writes between faults")
            if fault == "fill_disk":
                # the standby's filesystem really runs out of blocks (or inodes) for a while: its writes
                # fail with ENOSPC, the primary tracks them until the filler is deleted
                assert fullfs is not None
                mode = rng.choice(("blocks", "blocks", "inodes", "both"))
                refused = _refusals(standby)
                fullfs.fill(mode)
                try:
                    writer.wait_writes(writes_for(rng.uniform(0.5, 3.0)), "writes meeting the full disk")
                finally:
                    fullfs.free()
                fills += 1
                done.append(f"fill_disk({mode}, {_refusals(standby) - refused} batches refused)")
                continue
            if fault == "cut_link":
                proxy.cut()
                outage = writes_for(rng.uniform(0.5, 2.0))
                noticed(primary, "the primary noticing the cut")
                writer.wait_writes(outage, "writes while the link is cut")
                proxy.restore()
            elif fault == "stall_link":
                # Longer than the primary's --ack-timeout (3 s) or shorter: dropped and resynced, or held.
                # Either way it holds traffic; a long one holds a healthy stream (its batches go unanswered)
                # until the primary drops it.
                long = rng.uniform(0.5, 4.5) > ACK_TIMEOUT
                if long:
                    mirroring(primary)
                held = proxy.held
                proxy.stall()
                holding(proxy, held)
                if long:
                    noticed(primary, "the primary giving up on the stalled stream")
                proxy.unstall()
            elif fault == "kill_standby":
                standby.daemon.kill()
                down = writes_for(rng.uniform(0.2, 1.0))
                noticed(primary, "the primary noticing the standby's death")
                writer.wait_writes(down, "writes while the standby is down")
                standby = daemons.standby(standby.data_dir, *standby_extra)
                proxy.restore(standby)
            elif fault == "kill_primary":
                # Sync mode guarantees acknowledged writes on the standby while connected and in sync
                # (during an outage the primary acknowledges local writes and tracks them, as DRBD does).
                primary.wait_in_sync(timeout=120)
                primary.daemon.kill()
                writer.stop()
                # sync mode: everything the primary acknowledged is on the standby already
                checked = writer.check(
                    standby.replica("vol0"), f"seed {seed}: standby after the primary died"
                )
                done.append(f"kill_primary({checked} acked blocks checked)")
                primary = restart_primary(daemons, primary, proxy)
                writer.uri = primary.uri("vol0")
                writer.start()
                continue
            elif fault == "disk_full":
                # the standby's files cannot grow past 8 MiB for a while (a full disk); its writes
                # there fail and the primary tracks them until space returns
                pid = standby.daemon.proc.pid
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (8 << 20, resource.RLIM_INFINITY))
                try:
                    writer.wait_writes(writes_for(rng.uniform(0.5, 3.0)), "writes meeting the full disk")
                finally:
                    resource.prlimit(
                        pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                    )
            elif fault == "small_snapshot":
                # a snapshot with room for 64 blocks fills up: invalidated, or (defer) the volume's
                # writes held back until it is deleted
                churn += 1
                deferred = _deferrals(standby)
                made = snapshot_when_uptodate(standby, f"small{churn}", "--capacity", "256KiB")
                after = writes_for(rng.uniform(0.5, 2.5))
                wait_for(partial(_overflowed, standby, made, deferred), f"snapshot {made} filled up")
                writer.wait_writes(after, "writes after the snapshot filled up")
                standby.ctl("snapshot", "delete", "vol0", made)
            elif fault == "kill_backup":
                kill_a_backup(standby, tmp / f"backup{churn}.fifo")
                churn += 1
            else:
                # a snapshot of a known image (the writer paused, the replica in sync), kept or not
                churn += 1
                writer.stop()
                primary.wait_in_sync(timeout=120)
                image = tmp / f"churn{churn}.img"
                shutil.copyfile(primary.volumes["vol0"], image)
                made = standby.snapshot("vol0", f"churn{churn}")
                writer.start()
                if rng.random() < 0.6:
                    standby.ctl("snapshot", "delete", "vol0", made)
                    image.unlink()
                else:
                    kept[made] = image
            done.append(fault)
        writer.stop()
        proxy.restore(standby)
        assert_in_sync(standby, primary)
        writer.check(standby.replica("vol0"), f"seed {seed}: the replica at the end")
        assert_snapshot(standby, name, expected, tmp)
        assert primary.metrics().get("standby_out_of_sync_bytes", volume="vol0") == 0
        names = {s["name"] for s in standby.snapshots("vol0") if s["valid"]}
        assert name in names, f"seed {seed}: the snapshot taken before the faults is gone or invalid"
        still_valid = [snap for snap in kept if snap in names]
        for snap in still_valid:  # every snapshot still valid reads its frozen image
            assert_snapshot(standby, snap, kept[snap], tmp)
        done.append(f"{len(still_valid) + 1} valid snapshots checked")
        assert writer.writes > 0, "the writer never got a write acknowledged"
    finally:
        proxy.close()
    return done


def noticed(primary: Primary, what: str) -> None:
    """Until the primary has no stream: it noticed the fault."""
    wait_for(lambda: link_lost(primary), what)


def mirroring(primary: Primary) -> None:
    """Until the primary mirrors on a healthy stream again (after the last fault: its backoff, the
    reconnect, the resync)."""
    wait_for(
        lambda: primary.metrics().find("standby_replication_connected", volume="vol0") == 1,
        "the primary connected again",
    )


def holding(proxy: LinkProxy, held: int) -> None:
    """Until the stalled proxy holds data that came after its count was `held`: the stall hit traffic."""
    wait_for(lambda: proxy.held > held, "bytes held by the stalled link")


def _deferrals(standby: Standby) -> float:
    """Batches the standby held back so far (--on-full defer)."""
    m = standby.metrics()
    return m.find("standby_replication_refusals_total", volume="vol0", reason="deferred") or 0.0


def _overflowed(standby: Standby, snapshot: str, deferred: float) -> bool:
    """The snapshot ran out of room: invalidated (--on-full invalidate), or a batch held back since
    `deferred` was read (defer)."""
    m = standby.metrics()
    if m.find("standby_snapshot_valid", volume="vol0", snapshot=snapshot) == 0:
        return True
    return (m.find("standby_replication_refusals_total", volume="vol0", reason="deferred") or 0.0) > deferred


def _refusals(standby: Standby) -> int:
    """Batches the standby refused so far (a full disk shows as refusals with ENOSPC)."""
    return sum(1 for e in list(standby.daemon.events) if e.get("event") == "batch_refused")


#: How long a fault waits for the replica to be up to date before it takes a snapshot: a standby whose
#: disk was full catches up at the primary's next retry, which backs off up to 30 s, then resyncs.
UPTODATE_TIMEOUT = 120.0


def wait_uptodate(standby: Standby, timeout: float = UPTODATE_TIMEOUT) -> None:
    """Wait until vol0 is `uptodate` (snapshots are refused while a resync is under way), as an operator
    is told to (`standbyctl status`)."""
    deadline = time.monotonic() + timeout
    while standby.status()["volumes"][0]["state"] != "uptodate":
        assert time.monotonic() < deadline, f"vol0 not uptodate within {timeout:.0f} s"
        time.sleep(0.3)


def snapshot_when_uptodate(standby: Standby, name: str, *extra: str) -> str:
    """`standbyctl snapshot create` once vol0 is uptodate, again if a fault made it inconsistent between
    the check and the creation."""
    for _attempt in range(10):
        wait_uptodate(standby)
        made = standby.ctl("snapshot", "create", "vol0", name, *extra, check=False)
        if made.returncode == 0:
            return made.stdout.strip()
        assert "inconsistent" in made.stderr, made.stderr
    pytest.fail(f"snapshot {name} refused 10 times: {made.stderr.strip()}", pytrace=False)


def kill_a_backup(standby: Standby, fifo: Path) -> None:
    """A backup node killed (-9) mid-run: the lease (2 s) of the snapshot it made frees it.

    A backup that ends before writing anything (refused: e.g. a resync after a link fault makes the
    replica inconsistent for a moment) is started again, up to 10 times, instead of leaving the reader
    of the FIFO blocked forever."""
    os.mkfifo(fifo)
    before = {s["name"] for s in standby.snapshots("vol0")}
    errors: list[str] = []
    for _attempt in range(10):
        wait_uptodate(standby)
        err = fifo.with_suffix(".stderr")
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(
                backup_argv("run", "vol0", "--standby", standby.grpc, "--output", str(fifo), "--lease", "2",
                            "--metrics-listen", "off"),
                stdout=subprocess.DEVNULL, stderr=err_file,
            )  # fmt: skip
        if _first_bytes(fifo, proc):  # it made its snapshot and writes
            proc.kill()
            proc.wait()
            break
        proc.wait()
        errors.append(err.read_text().strip())
        time.sleep(1.0)  # a pause between attempts: what refused it may not show in the status yet
    else:
        pytest.fail(f"the backup never started writing: {errors}", pytrace=False)
    deadline = time.monotonic() + 20
    while {s["name"] for s in standby.snapshots("vol0")} - before:
        assert time.monotonic() < deadline, "the lease did not free a dead backup's snapshot"
        time.sleep(0.2)


def _first_bytes(fifo: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """True once `proc` wrote into `fifo`; False when it ended without writing."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, whether a writer comes or not
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([fd], [], [], 0.2)
            if readable:
                try:
                    if os.read(fd, 1024):
                        return True
                except BlockingIOError:
                    pass
            if proc.poll() is not None:
                return False
        pytest.fail(f"the backup wrote nothing to {fifo} within {timeout:.0f} s", pytrace=False)
    finally:
        os.close(fd)


def restart_primary(daemons: Daemons, old: Primary, proxy: LinkProxy) -> Primary:
    vol = old.volumes["vol0"]
    return daemons.primary(proxy, {"vol0": f"{vol},size=32MiB"}, "--ack-timeout", "3")


def seeds(count: int) -> list[int]:
    return drawn_seeds(count, "FAULT_SEED")


def play(daemons: Daemons, tmp: Path, seed: int, events: int, fullfs: FullFs | None = None) -> None:
    """One seeded run of the matrix (`run_matrix`): its seed printed first (to repeat it), its faults last."""
    if fullfs is None:
        need("qemu-io", "nbdcopy")
        print(f"fault matrix seed {seed} (repeat: FAULT_SEED={seed})")
    else:
        need("qemu-io", "nbdcopy", "fuse2fs")
        print(f"fault matrix (full filesystem) seed {seed} (repeat: FAULT_SEED={seed} -k full_filesystem)")
    done = run_matrix(daemons, tmp, seed, events=events, fullfs=fullfs)
    print(f"fault matrix seed {seed}: {', '.join(done)}  (repeat: FAULT_SEED={seed})")


def runs(short: int, long: int) -> list[Any]:
    """The seeded runs of a matrix, as (seed, faults): `short` runs of 4 faults (`make test`) and `long`
    runs of 12 (`make soak`)."""
    return [
        *(pytest.param(seed, 4, marks=pytest.mark.timeout(300), id=f"short-{seed}") for seed in seeds(short)),
        *(
            pytest.param(seed, 12, marks=[pytest.mark.soak, pytest.mark.timeout(1800)], id=f"long-{seed}")
            for seed in seeds(long)
        ),
    ]


@pytest.mark.parametrize(("seed", "events"), runs(2, 12))
def test_fault_matrix(daemons: Daemons, tmp_path: Path, seed: int, events: int) -> None:
    play(daemons, tmp_path, seed, events)


@pytest.fixture
def matrix_fs(tmp_path: Path) -> Iterator[FullFs]:
    """The standby's filesystem of a full-filesystem run; requested before `daemons`, so it is unmounted
    only after every daemon stopped."""
    with mounted_fullfs(tmp_path / "fullfs", size=FULLFS_SIZE) as fs:
        yield fs


@pytest.mark.parametrize(("seed", "events"), runs(1, 20))
def test_fault_matrix_full_filesystem(
    matrix_fs: FullFs, daemons: Daemons, tmp_path: Path, seed: int, events: int
) -> None:
    play(daemons, tmp_path, seed, events, fullfs=matrix_fs)

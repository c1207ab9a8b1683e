"""``kill -9`` during a write storm: every snapshot recorded before the kill reads what it read then.

`kill9_child.py` runs in a separate process on a real file store and file volume: it writes a
pattern, then random batches forever (their zero requests make blocks that later overwrites preserve
as hole entries), creating three snapshots on the way and recording the
SHA-256 of each snapshot's image (read through the engine) right after creating it. The test
kills it with SIGKILL at a random moment (sometimes before the three snapshots exist, mostly
after), reopens the store and volume in this process and checks that every recorded snapshot is
there, valid and reads the same bytes; that the origin reads in full; and that the reopened store
keeps preserving: after new origin writes, the snapshots still read the same.

Reproduce a failure with the seed printed in its message: ``KILL9_SEED=<seed> pytest -k kill9``
(``KILL9_ROUNDS`` sets the number of kills).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from standbylib.blockdev import open_file_device
from standbylib.snapshot import PreservationStore, Snapshot

CHILD = Path(__file__).with_name("kill9_child.py")
SIZE = 32 << 20
BLOCK_SIZE = 4096
CHUNK = 1 << 20
DEFAULT_SEED = 7319
# Only to stop waiting for a child that hangs or died; never a pass/fail criterion on speed.
STUCK_AFTER = 120.0


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def sha256_of(dev: Snapshot, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(dev.read(offset, min(CHUNK, size - offset)))
    return digest.hexdigest()


def recorded(log: Path) -> dict[str, str]:
    """Snapshots whose hash the child finished recording (complete lines only)."""
    if not log.exists():
        return {}
    found: dict[str, str] = {}
    for line in log.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            found.update(json.loads(line))
    return found


def kill_at_random_moment(workdir: Path, seed: int, wait_for: int, delay: float) -> None:
    """Start the writer; once it recorded `wait_for` snapshots (0: at once), wait `delay` s and kill it."""
    log = workdir / "snapshots.jsonl"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), str(workdir), str(seed), str(SIZE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + STUCK_AFTER
        while len(recorded(log)) < wait_for:
            if child.poll() is not None:
                pytest.fail(f"seed={seed}: the writer exited with {child.returncode}:\n{child.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"seed={seed}: the writer recorded {len(recorded(log))} snapshots in {STUCK_AFTER}s"
                )
            time.sleep(0.01)
        time.sleep(delay)  # a random moment of the writer's work: where the kill lands is the point
        if child.poll() is not None:
            pytest.fail(f"seed={seed}: the writer exited with {child.returncode}:\n{child.stderr.read()}")
        child.send_signal(signal.SIGKILL)
        _out, err = child.communicate()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, f"seed={seed}: the writer ended by itself:\n{err}"


def check_after_kill(workdir: Path, prefix: str) -> str:
    """Reopen the store the killed writer left; check it and return a summary."""
    expected = recorded(workdir / "snapshots.jsonl")
    try:
        # With the capacity the writer used: a kill before the store's first write leaves an empty file.
        store = PreservationStore.open(str(workdir / "preserve.store"), capacity=4 * SIZE)
    except Exception as e:
        pytest.fail(f"{prefix}: the store does not reopen after kill -9: {type(e).__name__}: {e}")
    with store:
        dev = open_file_device(str(workdir / "vol.img"), SIZE)
        try:
            vol = store.attach("vol", dev, block_size=BLOCK_SIZE)
            snaps = {s.name: s for s in vol.snapshots()}
            assert set(expected) <= set(snaps), (
                f"{prefix}: recorded snapshots {sorted(set(expected) - set(snaps))} lost"
            )
            assert set(snaps) <= {"snap1", "snap2", "snap3"}, f"{prefix}: unknown snapshots {sorted(snaps)}"
            for name, snap in snaps.items():
                assert snap.valid, f"{prefix}: snapshot {name} invalid after kill -9: {snap.info().reason}"
            for name, sha in expected.items():
                assert sha256_of(snaps[name], SIZE) == sha, f"{prefix}: snapshot {name} reads other data"
            stats = store.stats()
            preserved, holes = stats.preserved_blocks, stats.hole_entries
            origin = sha256_of(vol, SIZE)  # the origin reads in full
            # The recovered store still preserves: overwrite a spread of blocks, snapshots hold.
            rng = random.Random(prefix)
            ops = [
                (rng.randrange(SIZE // BLOCK_SIZE) * BLOCK_SIZE, rng.randbytes(3 * BLOCK_SIZE))
                for _ in range(64)
            ]
            vol.write_batch(ops)
            assert sha256_of(vol, SIZE) != origin, f"{prefix}: origin writes after reopen had no effect"
            for name, sha in expected.items():
                assert sha256_of(snaps[name], SIZE) == sha, (
                    f"{prefix}: snapshot {name} changed after new writes"
                )
        finally:
            dev.close()
    return (
        f"{len(expected)} recorded, {len(snaps)} present, {preserved} blocks and {holes} hole entries "
        "preserved before the kill"
    )


def run_kills(base_seed: int, rounds: int, tmp_path: Path) -> None:
    rng = random.Random(base_seed)
    # Mostly after the three snapshots exist; some while they are being taken or before.
    plans = [0, 1, 2] + [3] * max(0, rounds - 3)
    rng.shuffle(plans)
    print(f"kill -9 base seed {base_seed} (KILL9_SEED={base_seed} to repeat)")
    for i, wait_for in enumerate(plans[:rounds]):
        seed = base_seed * 1000 + i
        workdir = tmp_path / f"round{i}"
        workdir.mkdir()
        delay = rng.uniform(0.0, 1.5) if wait_for in (0, 3) else rng.uniform(0.0, 0.3)
        what = f"KILL9_SEED={base_seed} round {i} (writer seed {seed})"
        what += f": killed {delay:.2f}s after snapshot {wait_for}"
        kill_at_random_moment(workdir, seed, wait_for, delay)
        print(f"{what}: {check_after_kill(workdir, what)}")
        shutil.rmtree(workdir)


def test_kill9_during_write_storm_keeps_recorded_snapshots(tmp_path: Path) -> None:
    run_kills(env_int("KILL9_SEED", DEFAULT_SEED), env_int("KILL9_ROUNDS", 6), tmp_path)


@pytest.mark.soak
def test_kill9_soak(tmp_path: Path) -> None:
    seed = env_int("KILL9_SEED", random.SystemRandom().randrange(1, 1 << 20))
    run_kills(seed, env_int("KILL9_ROUNDS", 40), tmp_path)

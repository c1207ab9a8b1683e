"""Benchmark of the copy-on-write snapshot engine against its targets.

Every figure is measured in one run, each on its own sparse file volume(s) and
file store (all in the work directory, so on the same filesystem), and is
reported with its measured values, the ratio to the peer it is measured
against, its target and whether the target is met::

    .venv/bin/python bench/engine_bench.py --output bench/results/engine.json
    .venv/bin/python bench/engine_bench.py --quick          # small smoke variant

Figures:

1. ``first_write_4k`` / ``first_write_64k``: first writes with an active snapshot
   vs without any snapshot (target ratio >= 0.5).
2. ``rewrite_4k`` / ``rewrite_64k``: rewrites of already-preserved blocks with an
   active snapshot vs without a snapshot (target ratio >= 0.9).
3. ``backend_bytes_per_first_write``: (store + origin bytes written) per first
   write, in blocks, with 1, 4 and 16 snapshots (target <= 2 and flat in N).
4. ``store_syncs_per_1000_first_writes``: batches of 32 (target <= 32).
5. ``snapshot_create``: on a 1 GiB and a 1 TiB volume (target <= 10 ms each).
6. ``reopen_and_index_ram``: `PreservationStore.open` + attach and index RAM with
   1,000,000 preserved blocks (targets < 1 s and <= 32 bytes per entry). The blocks
   were holes, so since store format 2 they are hole entries (entries without data):
   the index holds one entry per block either way.

Throughput runs issue `Volume.write_batch` batches of 256 writes and call
`Volume.flush` after each batch in both runs, so both make the origin durable
per batch; with a snapshot the engine also syncs the store once per batch.
Runs are alternated A/B (snapshot / no snapshot) and the median of the
pairwise ratios is reported. Before each timed run the work filesystem is
synced (syncfs), so that untimed work such as deleting a snapshot (hole
punching) is not billed to it; nothing is dropped from the page cache.

The JSON document goes to stdout (and to ``--output``); progress goes to stderr.
The exit status is 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import emit, filesystem_of, source_revision
from benchlib import machine as host_machine

from standbylib.blockdev import Device, open_file_device
from standbylib.snapshot import PreservationStore, Volume

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
MB = 1_000_000  # throughput unit: MB/s = 10^6 bytes per second

VOLUME_SIZE = 1 * GiB
BLOCK_SIZE = 4 * KiB
BATCH = 256
STORE_CAPACITY = 8 * GiB  # a limit only: the store file grows with what is preserved

Batches = list[list[tuple[int, bytes]]]


@dataclass(frozen=True)
class Plan:
    """How much each figure measures; `--quick` shrinks everything."""

    pairs: int  # A/B pairs of the throughput figures
    first_write_bytes_4k: int  # data written per run, 4 KiB writes
    first_write_bytes_64k: int  # data written per run, 64 KiB writes
    rewrite_bytes_4k: int
    rewrite_bytes_64k: int
    bytes_per_write_region: int  # data written per snapshot count in figure 3
    snapshot_counts: tuple[int, ...]
    sync_writes: int  # first writes of figure 4
    sync_batch: int
    creates: int  # timed snapshot creates per volume in figure 5
    preserved_blocks: int  # figure 6
    reopen_block_size: int
    reopen_batch_blocks: int
    reopens: int


FULL = Plan(
    pairs=11,
    first_write_bytes_4k=64 * MiB,
    first_write_bytes_64k=256 * MiB,
    rewrite_bytes_4k=64 * MiB,
    rewrite_bytes_64k=256 * MiB,
    bytes_per_write_region=64 * MiB,
    snapshot_counts=(1, 4, 16),
    sync_writes=1000,
    sync_batch=32,
    creates=20,
    preserved_blocks=1_000_000,
    reopen_block_size=4 * KiB,
    reopen_batch_blocks=4096,
    reopens=3,
)

# The same runs, smaller: a smoke test of the benchmark itself (`--quick`).
QUICK = replace(
    FULL,
    pairs=3,
    first_write_bytes_4k=8 * MiB,
    first_write_bytes_64k=32 * MiB,
    rewrite_bytes_4k=8 * MiB,
    rewrite_bytes_64k=32 * MiB,
    bytes_per_write_region=8 * MiB,
    creates=5,
    preserved_blocks=65_536,
)


try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _libc = None


def log(msg: str) -> None:
    print(f"[engine_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- rigs


class Origin:
    """One sparse file volume attached to a rig's store."""

    def __init__(self, store: PreservationStore, path: str, name: str, size: int, block_size: int) -> None:
        self.path = path
        self.device: Device = open_file_device(path, size=size)
        self.vol: Volume = store.attach(name, self.device, block_size=block_size)

    def prefill(self, length: int) -> None:
        """Write real data to [0, length) and make it durable, so COW reads real data."""
        rng = random.Random(length)
        chunks = [rng.randbytes(MiB) for _ in range(4)]
        for i, off in enumerate(range(0, length, MiB)):
            self.device.write(off, chunks[i % len(chunks)][: min(MiB, length - off)])
        self.device.flush()


class Rig:
    """A fresh file store and `volumes` sparse file volumes attached to it, in a directory of its own."""

    def __init__(
        self,
        root: str,
        name: str,
        size: int,
        *,
        block_size: int = BLOCK_SIZE,
        capacity: int = STORE_CAPACITY,
        volumes: int = 1,
    ) -> None:
        self.dir = os.path.join(root, name)
        os.mkdir(self.dir)
        self.store_path = os.path.join(self.dir, "preserve.store")
        self.store = PreservationStore.open(self.store_path, capacity=capacity)
        self.origins = [
            Origin(self.store, os.path.join(self.dir, f"volume{i}.img"), f"vol{i}", size, block_size)
            for i in range(volumes)
        ]

    @property
    def vol(self) -> Volume:
        return self.origins[0].vol

    @property
    def device(self) -> Device:
        return self.origins[0].device

    @property
    def volume_path(self) -> str:
        return self.origins[0].path

    def prefill(self, length: int) -> None:
        for origin in self.origins:
            origin.prefill(length)

    def counters(self, origin: Origin) -> dict[str, int]:
        s, o = self.store.raw.counters, origin.device.raw.counters
        return {
            "store_bytes_written": s.bytes_written,
            "store_syncs": s.syncs,
            "origin_bytes_written": o.bytes_written,
            "origin_syncs": o.syncs,
            "cow_copies": origin.vol.cow_copies,
        }

    def settle(self) -> None:
        """Let the filesystem finish what earlier (untimed) work left pending, e.g. the journal commit
        and discards of punched store slots, so that it is not billed to the next timed run."""
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            if _libc is None or _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)

    def close(self) -> None:
        self.store.close()
        for origin in self.origins:
            origin.device.close()
        shutil.rmtree(self.dir)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def distinct_offsets(region: int, write_size: int, count: int | None = None, seed: int = 1) -> list[int]:
    """`count` (default: all) distinct write-aligned offsets of [0, region), in random order."""
    offsets = list(range(0, region, write_size))
    random.Random(seed).shuffle(offsets)
    return offsets if count is None else offsets[:count]


def make_batches(offsets: Sequence[int], payload: bytes, batch: int) -> Batches:
    return [[(off, payload) for off in offsets[i : i + batch]] for i in range(0, len(offsets), batch)]


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def timed_pass(
    rig: Rig, batches: Batches, *, origin: Origin | None = None, flush: bool = True
) -> dict[str, Any]:
    """Apply `batches` to `origin` (default: the rig's first), write_batch then flush after each batch.

    Returns the time and the backend counters of the run.
    """
    origin = origin or rig.origins[0]
    vol = origin.vol
    nbytes = sum(len(data) for batch in batches for _off, data in batch)
    rig.settle()
    gc.collect()
    before = rig.counters(origin)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for batch in batches:
        vol.write_batch(batch)
        if flush:
            vol.flush()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {
        "seconds": round(seconds, 6),
        "cpu_seconds": round(cpu, 6),
        "mb_per_s": round(nbytes / seconds / MB, 2),
        **delta(rig.counters(origin), before),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def check(name: str, value: float, op: str, limit: float) -> dict[str, Any]:
    ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit, ">": value > limit}[op]
    return {"metric": name, "value": value, "op": op, "limit": limit, "pass": bool(ok)}


def figure(
    fig_id: str,
    title: str,
    method: str,
    measured: dict[str, Any],
    ratio: float,
    ratio_of: str,
    targets: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "id": fig_id,
        "title": title,
        "method": method,
        "measured": measured,
        "ratio": round(ratio, 4),
        "ratio_of": ratio_of,
        "targets": targets,
        "pass": all(t["pass"] for t in targets),
    }


def ab_summary(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[dict[str, Any], float]:
    snap = [a["mb_per_s"] for a, _b in pairs]
    plain = [b["mb_per_s"] for _a, b in pairs]
    ratios = [b["seconds"] / a["seconds"] for a, b in pairs]  # same bytes in both runs
    measured = {
        "snapshot_mb_per_s_median": round(median(snap), 2),
        "no_snapshot_mb_per_s_median": round(median(plain), 2),
        "pair_ratios": [round(r, 4) for r in ratios],
        "snapshot_mb_per_s": snap,
        "no_snapshot_mb_per_s": plain,
        # CPU time of this process (user + system, syscalls included): less disturbed by other
        # tenants of the disk than wall time, it shows what the engine itself adds.
        "cpu_seconds_snapshot_median": round(median([a["cpu_seconds"] for a, _b in pairs]), 4),
        "cpu_seconds_no_snapshot_median": round(median([b["cpu_seconds"] for _a, b in pairs]), 4),
    }
    # Backend counters of every run, in pair order: both runs sync the origin once per batch.
    for key in ("cow_copies", "store_syncs", "store_bytes_written", "origin_syncs", "origin_bytes_written"):
        measured[f"{key}_snapshot_runs"] = [a[key] for a, _b in pairs]
        measured[f"{key}_no_snapshot_runs"] = [b[key] for _a, b in pairs]
    return measured, median(ratios)


# ---------------------------------------------------------------------------- figures 1 and 2


def first_write_figure(root: str, plan: Plan, write_size: int, region: int) -> dict[str, Any]:
    label = f"{write_size // KiB}k"
    offsets = distinct_offsets(region, write_size, seed=write_size)
    batches = make_batches(offsets, random.Random(7).randbytes(write_size), BATCH)
    pairs = []
    with Rig(root, f"first-write-{label}", VOLUME_SIZE) as rig:
        rig.prefill(region)
        for i in range(plan.pairs):
            rig.vol.create_snapshot("bench")
            with_snap = timed_pass(rig, batches)
            rig.vol.delete_snapshot("bench")  # frees the copies: the next snapshot run makes first writes
            without = timed_pass(rig, batches)
            pairs.append((with_snap, without))
            log(
                f"first_write_{label} pair {i}: snapshot {with_snap['mb_per_s']} MB/s, "
                f"none {without['mb_per_s']} MB/s"
            )
    measured, ratio = ab_summary(pairs)
    measured.update(write_size=write_size, writes_per_run=len(offsets), bytes_per_run=region)
    return figure(
        f"first_write_{label}",
        f"First-write throughput, {write_size // KiB} KiB writes, active snapshot vs no snapshot",
        f"{len(offsets)} distinct {write_size // KiB} KiB writes at random offsets of a prefilled "
        f"{region // MiB} MiB region of a 1 GiB sparse file volume (4 KiB blocks); write_batch of {BATCH} "
        "writes, Volume.flush after each batch in both runs; a fresh snapshot before each snapshot run "
        "(deleted after it, untimed); runs alternated snapshot/no-snapshot, each after a syncfs of the "
        "work filesystem; medians over pairs",
        measured,
        ratio,
        "median over pairs of snapshot MB/s / no-snapshot MB/s",
        [check("ratio", round(ratio, 4), ">=", 0.5)],
    )


def rewrite_figure(root: str, plan: Plan, write_size: int, region: int) -> dict[str, Any]:
    label = f"{write_size // KiB}k"
    offsets = distinct_offsets(region, write_size, seed=write_size + 1)
    rng = random.Random(11)
    first = make_batches(offsets, rng.randbytes(write_size), BATCH)
    again = make_batches(offsets, rng.randbytes(write_size), BATCH)
    pairs = []
    # One volume for both runs of a pair: two files on the same disk differ by more than the engine does
    # (two volumes without any snapshot measured 0.88-0.98 against each other).
    with Rig(root, f"rewrite-{label}", VOLUME_SIZE) as rig:
        rig.prefill(region)

        def with_snapshot() -> dict[str, Any]:
            rig.vol.create_snapshot("bench")
            timed_pass(rig, first)  # untimed for the figure: preserves every block of the region
            result = timed_pass(rig, again)
            rig.vol.delete_snapshot("bench")
            return result

        for i in range(plan.pairs):
            if i % 2:  # alternate which run of the pair goes first
                without = timed_pass(rig, again)
                with_snap = with_snapshot()
            else:
                with_snap = with_snapshot()
                without = timed_pass(rig, again)
            pairs.append((with_snap, without))
            log(
                f"rewrite_{label} pair {i}: snapshot {with_snap['mb_per_s']} MB/s, "
                f"none {without['mb_per_s']} MB/s"
            )
    measured, ratio = ab_summary(pairs)
    measured.update(write_size=write_size, writes_per_run=len(offsets), bytes_per_run=region)
    return figure(
        f"rewrite_{label}",
        f"Rewrite of already-preserved blocks, {write_size // KiB} KiB writes, "
        "active snapshot vs no snapshot",
        f"one 1 GiB sparse file volume (4 KiB blocks) with a prefilled {region // MiB} MiB region; each pair "
        f"rewrites the same {len(offsets)} distinct {write_size // KiB} KiB writes at random offsets of the "
        "region once with a snapshot whose blocks an untimed pass preserved (so cow_copies of the timed run "
        "is 0; the snapshot is deleted after it) and once without any snapshot, alternating which goes "
        f"first; write_batch of {BATCH} writes, Volume.flush after each batch; medians over pairs",
        measured,
        ratio,
        "median over pairs of snapshot MB/s / no-snapshot MB/s",
        [check("ratio", round(ratio, 4), ">=", 0.9)],
    )


# ---------------------------------------------------------------------------- figure 3


def bytes_per_write_figure(root: str, plan: Plan) -> dict[str, Any]:
    region = plan.bytes_per_write_region
    offsets = distinct_offsets(region, BLOCK_SIZE, seed=3)
    batches = make_batches(offsets, random.Random(5).randbytes(BLOCK_SIZE), BATCH)
    per_n: dict[str, dict[str, Any]] = {}
    for n in plan.snapshot_counts:
        with Rig(root, f"bytes-per-write-{n}", VOLUME_SIZE) as rig:
            rig.prefill(region)
            for k in range(n):
                rig.vol.create_snapshot(f"s{k}")
            run = timed_pass(rig, batches)
        writes = len(offsets)
        total = run["store_bytes_written"] + run["origin_bytes_written"]
        slot_bytes = run["cow_copies"] * BLOCK_SIZE
        per_n[str(n)] = {
            "snapshots": n,
            "first_writes": writes,
            "cow_copies": run["cow_copies"],
            "store_bytes_written": run["store_bytes_written"],
            "origin_bytes_written": run["origin_bytes_written"],
            "blocks_per_first_write": round(total / writes / BLOCK_SIZE, 5),
            "store_data_blocks_per_first_write": round(slot_bytes / writes / BLOCK_SIZE, 5),
            "store_metadata_bytes_per_first_write": round(
                (run["store_bytes_written"] - slot_bytes) / writes, 2
            ),
        }
        log(f"bytes_per_write N={n}: {per_n[str(n)]['blocks_per_first_write']} blocks per first write")
    values = [v["blocks_per_first_write"] for v in per_n.values()]
    flatness = max(values) / min(values)
    targets = [check(f"blocks_per_first_write_N{k}", v, "<=", 2) for k, v in zip(per_n, values, strict=True)]
    targets.append(check("max_over_min", round(flatness, 5), "<=", 1.05))
    return figure(
        "backend_bytes_per_first_write",
        "Backend bytes written per first write with 1, 4 and 16 active snapshots (4 KiB blocks)",
        f"{len(offsets)} distinct 4 KiB first writes at random offsets of a prefilled {region // MiB} MiB "
        "region of a 1 GiB volume, all snapshots created before the writes, write_batch of "
        f"{BATCH} + flush; (store bytes written + origin bytes written) / first writes / 4096; "
        "a fresh volume and store for each N; 'flat in N' is read as max/min <= 1.05",
        {"per_snapshot_count": per_n, "max_over_min": round(flatness, 5)},
        flatness,
        "max / min over N of blocks per first write",
        targets,
    )


# ---------------------------------------------------------------------------- figure 4


def syncs_figure(root: str, plan: Plan) -> dict[str, Any]:
    writes = plan.sync_writes
    region = 16 * MiB
    offsets = distinct_offsets(region, BLOCK_SIZE, writes, seed=4)
    batches = make_batches(offsets, random.Random(9).randbytes(BLOCK_SIZE), plan.sync_batch)
    with Rig(root, "syncs", VOLUME_SIZE) as rig:
        rig.prefill(region)
        rig.vol.create_snapshot("bench")
        run = timed_pass(rig, batches, flush=False)
    per_1000 = run["store_syncs"] * 1000 / writes
    per_batch = run["store_syncs"] / len(batches)
    log(f"syncs: {run['store_syncs']} store syncs for {writes} first writes in {len(batches)} batches")
    return figure(
        "store_syncs_per_1000_first_writes",
        f"Store fdatasyncs per 1000 first writes issued in batches of {plan.sync_batch}",
        f"{writes} distinct 4 KiB first writes at random offsets, one snapshot, write_batch of "
        f"{plan.sync_batch} (no origin flush); delta of store.raw.counters.syncs",
        {
            "first_writes": writes,
            "batches": len(batches),
            "store_syncs": run["store_syncs"],
            "origin_syncs": run["origin_syncs"],
            "cow_copies": run["cow_copies"],
            "store_syncs_per_1000_first_writes": round(per_1000, 3),
            "seconds": run["seconds"],
        },
        per_batch,
        "store syncs / batches",
        [check("store_syncs_per_1000_first_writes", round(per_1000, 3), "<=", 32)],
    )


# ---------------------------------------------------------------------------- figure 5


def create_figure(root: str, plan: Plan) -> dict[str, Any]:
    sizes = {"1GiB": GiB, "1TiB": TiB}
    times: dict[str, list[float]] = {k: [] for k in sizes}
    rigs = {k: Rig(root, f"create-{k}", size) for k, size in sizes.items()}
    try:
        for rig in rigs.values():  # warm-up, untimed
            rig.vol.create_snapshot("warmup")
            rig.vol.delete_snapshot("warmup")
        for i in range(plan.creates):
            for key, rig in rigs.items():  # interleaved, so drift hits both volumes alike
                rig.settle()  # the previous delete's hole punching is committed before the timer starts
                gc.collect()
                t0 = time.perf_counter()
                rig.vol.create_snapshot(f"s{i}")
                times[key].append(time.perf_counter() - t0)
                rig.vol.delete_snapshot(f"s{i}")
    finally:
        for rig in rigs.values():
            rig.close()
    ms = {k: [round(t * 1000, 3) for t in v] for k, v in times.items()}
    med = {k: median(v) for k, v in ms.items()}
    log(f"snapshot_create: median {med['1GiB']:.3f} ms (1 GiB), {med['1TiB']:.3f} ms (1 TiB)")
    ratio = med["1TiB"] / med["1GiB"]
    return figure(
        "snapshot_create",
        "Snapshot create time on a 1 GiB and on a 1 TiB sparse file volume",
        f"median of {plan.creates} creates per volume (after one untimed warm-up), each followed by an "
        "untimed delete and a syncfs of the work filesystem; creates alternate between the two volumes, "
        "each with its own file store",
        {
            "create_ms_median_1GiB": round(med["1GiB"], 3),
            "create_ms_median_1TiB": round(med["1TiB"], 3),
            "create_ms_max_1GiB": max(ms["1GiB"]),
            "create_ms_max_1TiB": max(ms["1TiB"]),
            "create_ms_1GiB": ms["1GiB"],
            "create_ms_1TiB": ms["1TiB"],
        },
        ratio,
        "median create time 1 TiB / 1 GiB",
        [
            check("create_ms_median_1GiB", round(med["1GiB"], 3), "<=", 10),
            check("create_ms_median_1TiB", round(med["1TiB"], 3), "<=", 10),
        ],
    )


# ---------------------------------------------------------------------------- figure 6


def proc_status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reopen_probe(store_path: str, volume_path: str, block_size: int) -> dict[str, Any]:
    """Runs in a fresh child process: time open + attach and the RSS it adds."""
    device = open_file_device(volume_path)
    gc.collect()
    try:  # reset VmHWM so that it shows the peak of the reopen itself
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss0 = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    store = PreservationStore.open(store_path)
    store.attach("vol0", device, block_size=block_size)
    seconds = time.perf_counter() - t0
    rss1 = proc_status_kib("VmRSS")
    hwm = proc_status_kib("VmHWM")
    # Freed but retained heap (the allocator keeps it) vs what the open store really holds:
    rss_trimmed: int | None = None
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
        rss_trimmed = (proc_status_kib("VmRSS") - rss0) * KiB
    result = {
        "seconds": seconds,
        "rss_before_kib": rss0,
        "rss_growth_bytes": (rss1 - rss0) * KiB,
        "rss_growth_after_malloc_trim_bytes": rss_trimmed,
        "peak_rss_growth_bytes": max(0, hwm - rss0) * KiB,
        "index_bytes": store.index_bytes(),
        "preserved_blocks": store.stats().preserved_blocks,
        "hole_entries": store.stats().hole_entries,
    }
    store.close()
    device.close()
    return result


def reopen_figure(root: str, plan: Plan) -> dict[str, Any]:
    bs = plan.reopen_block_size
    per_batch = plan.reopen_batch_blocks
    n = plan.preserved_blocks
    size = -(-n // per_batch) * per_batch * bs
    with Rig(root, "reopen", size, block_size=bs, capacity=2 * size) as rig:
        rig.vol.create_snapshot("bench")
        t0 = time.perf_counter()
        for first in range(0, n, per_batch):
            count = min(per_batch, n - first)
            # One zero request over `count` blocks: every block is a first write, so each is preserved
            # (the blocks are holes: as hole entries, no data); the origin stays sparse.
            rig.vol.write_batch([(first * bs, count * bs)])
        build_seconds = time.perf_counter() - t0
        preserved = rig.store.stats().preserved_blocks + rig.store.stats().hole_entries
        store_file_bytes = os.path.getsize(rig.store_path)
        rig.store.close()
        rig.settle()
        log(f"reopen: built {preserved} preserved blocks in {build_seconds:.1f} s")
        probes = []
        for i in range(plan.reopens):
            proc = subprocess.run(
                [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--reopen-probe",
                    rig.store_path,
                    rig.volume_path,
                    str(bs),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"reopen probe failed ({proc.returncode}): {proc.stderr.strip()}")
            probe = json.loads(proc.stdout)
            probes.append(probe)
            growth = probe["rss_growth_bytes"] / MiB
            log(f"reopen {i}: {probe['seconds'] * 1000:.1f} ms, RSS +{growth:.1f} MiB")
    seconds = median([p["seconds"] for p in probes])
    index_bytes = probes[-1]["index_bytes"]
    entries = probes[-1]["preserved_blocks"] + probes[-1]["hole_entries"]
    per_entry = index_bytes / entries
    rss_growth = int(median([p["rss_growth_bytes"] for p in probes]))
    return figure(
        "reopen_and_index_ram",
        f"Reopen time and index RAM with {n:,} preserved blocks",
        f"one snapshot on a {size // MiB} MiB sparse file volume with {bs} B blocks, preserved by "
        f"write_batch zero requests of {per_batch} distinct blocks each (the origin stays sparse: the "
        "blocks are preserved as hole entries, an index entry without data each); "
        "store closed, then PreservationStore.open + attach timed in a fresh process each time (median of "
        f"{plan.reopens}); RSS from /proc/self/status VmRSS across the reopen",
        {
            "block_size": bs,
            "preserved_blocks": entries,
            "hole_entries": probes[-1]["hole_entries"],
            "build_seconds": round(build_seconds, 2),
            "store_file_bytes": store_file_bytes,
            "reopen_seconds_median": round(seconds, 4),
            "reopen_seconds": [round(p["seconds"], 4) for p in probes],
            "index_bytes": index_bytes,
            "index_bytes_per_entry": round(per_entry, 3),
            "rss_growth_bytes_median": rss_growth,
            "rss_growth_bytes_per_entry": round(rss_growth / entries, 3),
            "rss_growth_after_malloc_trim_bytes": [p["rss_growth_after_malloc_trim_bytes"] for p in probes],
            "peak_rss_growth_bytes": [p["peak_rss_growth_bytes"] for p in probes],
        },
        rss_growth / max(index_bytes, 1),
        "RSS growth across the reopen / index_bytes",
        [
            check("reopen_seconds_median", round(seconds, 4), "<", 1.0),
            check("index_bytes_per_entry", round(per_entry, 3), "<=", 32),
        ],
    )


# ---------------------------------------------------------------------------- main


def run(work: str, plan: Plan, only: set[str] | None = None) -> list[dict[str, Any]]:
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("first_write_4k", lambda: first_write_figure(work, plan, 4 * KiB, plan.first_write_bytes_4k)),
        ("first_write_64k", lambda: first_write_figure(work, plan, 64 * KiB, plan.first_write_bytes_64k)),
        ("rewrite_4k", lambda: rewrite_figure(work, plan, 4 * KiB, plan.rewrite_bytes_4k)),
        ("rewrite_64k", lambda: rewrite_figure(work, plan, 64 * KiB, plan.rewrite_bytes_64k)),
        ("backend_bytes_per_first_write", lambda: bytes_per_write_figure(work, plan)),
        ("store_syncs_per_1000_first_writes", lambda: syncs_figure(work, plan)),
        ("snapshot_create", lambda: create_figure(work, plan)),
        ("reopen_and_index_ram", lambda: reopen_figure(work, plan)),
    ]
    figures = []
    for name, step in steps:
        if only and name not in only:
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        fig = step()
        fig["wall_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{name}: ratio {fig['ratio']}, {'pass' if fig['pass'] else 'FAIL'} ({fig['wall_seconds']} s)")
        figures.append(fig)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds; not figures to quote)")
    parser.add_argument(
        "--dir",
        help="directory for the work files (a fresh subdirectory is made there and removed at the end; "
        "default: under /var/tmp)",
    )
    parser.add_argument("--only", help="comma-separated figure ids to run (default: all)")
    parser.add_argument(
        "--reopen-probe", nargs=3, metavar=("STORE", "VOLUME", "BLOCK_SIZE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.reopen_probe:
        store_path, volume_path, block_size = args.reopen_probe
        print(json.dumps(reopen_probe(store_path, volume_path, int(block_size))))
        return 0

    plan = QUICK if args.quick else FULL
    parent = args.dir or "/var/tmp"
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="engine-bench-", dir=parent)
    started = datetime.now(UTC)
    host = host_machine(numpy=np.__version__)
    revision = source_revision()
    t0 = time.perf_counter()
    try:
        figures = run(work, plan, set(args.only.split(",")) if args.only else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "benchmark": "standbylib snapshot engine",
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "variant": "quick" if args.quick else "full",
        "revision": revision,
        "machine": host,
        "setup": {
            "work_filesystem": filesystem_of(parent),
            "volume": "sparse file, 1 GiB unless stated; file store in the same directory",
            "volume_block_size": BLOCK_SIZE,
            "batch_writes": BATCH,
            "throughput_unit": "MB/s = 10^6 bytes/s",
            "plan": asdict(plan),
        },
        "figures": figures,
        "summary": {
            "passed": [f["id"] for f in figures if f["pass"]],
            "failed": [f["id"] for f in figures if not f["pass"]],
        },
        "runtime_seconds": round(time.perf_counter() - t0, 1),
    }
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

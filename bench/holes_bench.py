"""Benchmark of hole entries (store format 2): a snapshot of a half-hole volume, then its holes written.

A block that reads as zeros when a snapshot first needs it preserved is kept as a hole entry: a 32-byte
entry, no data, no slot. The figures, each on its own sparse file volume and file store in the work
directory::

    .venv/bin/python bench/holes_bench.py --output bench/results/holes.json
    .venv/bin/python bench/holes_bench.py --quick          # small smoke variant

1. ``half_hole_volume``: a volume whose first half holds data and second half holes; one snapshot;
   every block of the hole half overwritten (`Volume.write_batch` of 256 writes of 4 KiB, then
   `Volume.flush`). What the store holds for the holes: its used bytes and the snapshot's preserved
   bytes (target: 0 each), hole entries (one per block), and the bytes written to and allocated in
   the store file for them (entries only: target <= 64 bytes written per hole block), against a copy
   of every block (what store format 1 kept). Then the data half overwritten: one copy per block.
2. ``hole_overwrite_throughput``: the same overwrite of the holes with the snapshot vs without any
   snapshot, alternated, median of the pairwise ratios (target >= 0.5, the first-write target of
   `engine_bench.py`: with a snapshot each batch also syncs the store once).
3. ``zero_check``: the CPU time of the zero check on the old data of a batch (`zero_blocks`, in the
   copy-on-write path of every first write), per 4 KiB block, for blocks of data and blocks of zeros,
   against the CPU time of a first write of a data block with a snapshot (target: data blocks <= 1 %).

The JSON document goes to stdout (and to ``--output``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import emit, header, log, machine

from standbylib.blockdev import Device, open_file_device
from standbylib.snapshot import PreservationStore, Volume
from standbylib.snapshot.volume import zero_blocks

KiB = 1 << 10
MiB = 1 << 20
BS = 4 * KiB
BATCH = 256


@dataclass(frozen=True)
class Plan:
    volume_size: int  # the first half data, the second holes
    pairs: int  # figure 2
    zero_check_batches: int  # figure 3


FULL = Plan(volume_size=256 * MiB, pairs=5, zero_check_batches=2000)
QUICK = replace(FULL, volume_size=64 * MiB, pairs=3, zero_check_batches=200)


class Rig:
    """A file store and a sparse file volume whose first half holds data, in a directory of its own."""

    def __init__(self, root: Path, name: str, size: int) -> None:
        self.dir = root / name
        self.dir.mkdir()
        self.size = size
        self.store_path = self.dir / "preserve.store"
        self.store = PreservationStore.open(str(self.store_path), capacity=2 * size)
        self.device: Device = open_file_device(str(self.dir / "volume.img"), size=size)
        self.vol: Volume = self.store.attach("vol0", self.device, block_size=BS)
        chunk = random.Random(1).randbytes(MiB)
        for offset in range(0, size // 2, MiB):
            self.device.write(offset, chunk)
        self.device.flush()

    def batches(self, first: int, end: int, seed: int) -> list[list[tuple[int, bytes]]]:
        """Batches of 4 KiB writes (random data) over [first, end), in random order."""
        offsets = list(range(first, end, BS))
        random.Random(seed).shuffle(offsets)
        data = random.Random(seed).randbytes(BS)
        return [[(off, data) for off in offsets[i : i + BATCH]] for i in range(0, len(offsets), BATCH)]

    def overwrite(self, batches: list[list[tuple[int, bytes]]]) -> dict[str, float]:
        os.sync()  # untimed work (hole punching of the previous pass) is not billed to this one
        cpu0, t0 = time.process_time(), time.perf_counter()
        for batch in batches:
            self.vol.write_batch(batch)
            self.vol.flush()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        nbytes = sum(len(d) for b in batches for _o, d in b)
        return {
            "seconds": round(seconds, 4),
            "cpu_seconds": round(cpu, 4),
            "mb_per_s": round(nbytes / seconds / 1e6, 1),
        }

    def punch_holes(self) -> None:
        """The second half a hole again (no snapshot: the origin is punched)."""
        self.vol.zero(self.size // 2, self.size // 2)
        self.vol.flush()

    def close(self) -> None:
        self.store.close()
        self.device.close()
        shutil.rmtree(self.dir)


def check(name: str, value: float, op: str, limit: float) -> dict[str, Any]:
    ok = {"<=": value <= limit, ">=": value >= limit, "==": value == limit}[op]
    return {"metric": name, "value": value, "op": op, "limit": limit, "pass": bool(ok)}


def figure(
    fig_id: str, title: str, method: str, measured: dict[str, Any], targets: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": fig_id,
        "title": title,
        "method": method,
        "measured": measured,
        "targets": targets,
        "pass": all(t["pass"] for t in targets),
    }


def half_hole_figure(root: Path, plan: Plan) -> dict[str, Any]:
    rig = Rig(root, "half-hole", plan.volume_size)
    try:
        half = plan.volume_size // 2
        snap = rig.vol.create_snapshot("bench")
        stats0, written0 = rig.store.stats(), rig.store.raw.counters.bytes_written
        allocated0 = os.stat(rig.store_path).st_blocks * 512
        run = rig.overwrite(rig.batches(half, plan.volume_size, seed=2))
        stats, info = rig.store.stats(), snap.info()
        written = rig.store.raw.counters.bytes_written - written0
        allocated = os.stat(rig.store_path).st_blocks * 512 - allocated0
        blocks = half // BS
        holes = {
            "hole_blocks_overwritten": blocks,
            "store_used_bytes": stats.used_bytes - stats0.used_bytes,
            "snapshot_preserved_bytes": info.preserved_bytes,
            "snapshot_hole_blocks": info.hole_blocks,
            "hole_entries": stats.hole_entries,
            "store_bytes_written": written,
            "store_bytes_written_per_hole_block": round(written / blocks, 2),
            "store_bytes_allocated": allocated,
            "store_syncs": stats.syncs - stats0.syncs,
            "format_1_store_bytes": blocks * BS,  # a copy of every block, zeros included
            **run,
        }
        log(f"half_hole_volume: holes written, store used {holes['store_used_bytes']} B, "
            f"{written} B written ({holes['store_bytes_written_per_hole_block']} per block)")  # fmt: skip
        run = rig.overwrite(rig.batches(0, half, seed=3))
        stats, info = rig.store.stats(), snap.info()
        data = {
            "data_blocks_overwritten": blocks,
            "store_used_bytes": stats.used_bytes,
            "snapshot_preserved_bytes": info.preserved_bytes,
            "cow_copies": stats.cow_copies,
            **run,
        }
        log(f"half_hole_volume: data written, store used {stats.used_bytes} B")
    finally:
        rig.close()
    size_mib = plan.volume_size // MiB
    return figure(
        "half_hole_volume",
        f"Snapshot of a half-hole {size_mib} MiB volume, then the holes written: store bytes used for them",
        f"a sparse file volume of {size_mib} MiB (4 KiB blocks), its first half written with data and "
        "synced, the rest holes; one snapshot; every 4 KiB block of the hole half overwritten in random "
        f"order (write_batch of {BATCH} writes, Volume.flush after each); then the same for the data half. "
        "Store counters (StoreStats, the store file's I/O counters) and st_blocks of the store file "
        "before and after; format_1_store_bytes: a copy of every block, what store format 1 kept",
        {"holes_written": holes, "data_written": data},
        [
            check("store_used_bytes_for_holes", holes["store_used_bytes"], "==", 0),
            check("snapshot_preserved_bytes_for_holes", holes["snapshot_preserved_bytes"], "==", 0),
            check(
                "store_bytes_written_per_hole_block", holes["store_bytes_written_per_hole_block"], "<=", 64
            ),
            check("store_used_bytes_for_data", data["store_used_bytes"], "==", half),
        ],
    )


def throughput_figure(root: Path, plan: Plan) -> dict[str, Any]:
    rig = Rig(root, "throughput", plan.volume_size)
    half = plan.volume_size // 2
    batches = rig.batches(half, plan.volume_size, seed=4)
    pairs = []
    try:
        for i in range(plan.pairs):
            runs: dict[str, dict[str, float]] = {}
            for kind in ("snapshot", "none") if i % 2 == 0 else ("none", "snapshot"):
                if kind == "snapshot":
                    rig.vol.create_snapshot("bench")
                runs[kind] = rig.overwrite(batches)
                if kind == "snapshot":
                    assert rig.store.stats().used_bytes == 0
                    rig.vol.delete_snapshot("bench")
                rig.punch_holes()
            pairs.append(runs)
            log(f"hole_overwrite_throughput pair {i}: snapshot {runs['snapshot']['mb_per_s']} MB/s, "
                f"none {runs['none']['mb_per_s']} MB/s")  # fmt: skip
    finally:
        rig.close()
    ratios = [p["none"]["seconds"] / p["snapshot"]["seconds"] for p in pairs]
    ratio = statistics.median(ratios)
    return figure(
        "hole_overwrite_throughput",
        "Overwriting the holes of a half-hole volume, with a snapshot vs without any snapshot",
        f"the hole half ({half // MiB} MiB) of the volume of figure half_hole_volume overwritten as there "
        "(4 KiB writes, random order), once with a fresh snapshot (deleted after) and once without, the "
        "order alternating; the holes punched again (untimed) after each run; os.sync before each run; "
        "ratio = median over pairs of seconds without / seconds with the snapshot",
        {
            "pair_ratios": [round(r, 4) for r in ratios],
            "snapshot_mb_per_s_median": statistics.median(p["snapshot"]["mb_per_s"] for p in pairs),
            "no_snapshot_mb_per_s_median": statistics.median(p["none"]["mb_per_s"] for p in pairs),
            "cpu_seconds_snapshot_median": statistics.median(p["snapshot"]["cpu_seconds"] for p in pairs),
            "cpu_seconds_no_snapshot_median": statistics.median(p["none"]["cpu_seconds"] for p in pairs),
            "ratio": round(ratio, 4),
        },
        [check("ratio", round(ratio, 4), ">=", 0.5)],
    )


def zero_check_figure(root: Path, plan: Plan) -> dict[str, Any]:
    n = plan.zero_check_batches
    data = memoryview(bytearray(random.Random(5).randbytes(BATCH * BS)))
    zeros = memoryview(bytearray(BATCH * BS))
    per_block = {}
    for name, view in (("data", data), ("zeros", zeros)):
        best = min(timeit.repeat(lambda v=view: zero_blocks(v, BS), number=n, repeat=5))
        per_block[name] = best / n / BATCH
    # The CPU of a first write of a data block with a snapshot: batches of 4 KiB first writes.
    rig = Rig(root, "first-writes", 64 * MiB)
    try:
        rig.vol.create_snapshot("bench")
        run = rig.overwrite(rig.batches(0, 32 * MiB, seed=6))
    finally:
        rig.close()
    first_write_cpu = run["cpu_seconds"] / (32 * MiB // BS)
    share = per_block["data"] / first_write_cpu
    log(f"zero_check: {per_block['data'] * 1e9:.1f} ns per data block, {per_block['zeros'] * 1e9:.1f} ns per "
        f"zero block; a first write costs {first_write_cpu * 1e6:.1f} us of CPU")  # fmt: skip
    return figure(
        "zero_check",
        "CPU of the zero check of the copy-on-write path, per 4 KiB block",
        f"zero_blocks on a batch of {BATCH} blocks of 4 KiB (random data, then zeros), best of 5 runs of "
        f"{n} batches; first_write_cpu: process CPU time per block of {32 * MiB // BS} first writes of data "
        f"blocks with a snapshot (write_batch of {BATCH}, Volume.flush after each)",
        {
            "ns_per_data_block": round(per_block["data"] * 1e9, 1),
            "ns_per_zero_block": round(per_block["zeros"] * 1e9, 1),
            "first_write_cpu_us_per_block": round(first_write_cpu * 1e6, 2),
            "share_of_a_first_write": round(share, 5),
        },
        [check("share_of_a_first_write", round(share, 5), "<=", 0.01)],
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="a smoke run (seconds; not figures to quote)")
    parser.add_argument(
        "--dir", default="/var/tmp", help="where the work directory is made (default /var/tmp)"
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="holes-bench-", dir=args.dir))
    t0 = time.perf_counter()
    try:
        doc = header("hole entries of the snapshot engine", work)
        figures = [half_hole_figure(work, plan), throughput_figure(work, plan), zero_check_figure(work, plan)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc.update(
        variant="quick" if args.quick else "full",
        machine=machine(),
        setup={"plan": asdict(plan), "block_size": BS, "batch_writes": BATCH},
        figures=figures,
        summary={
            "passed": [f["id"] for f in figures if f["pass"]],
            "failed": [f["id"] for f in figures if not f["pass"]],
        },
        runtime_seconds=round(time.perf_counter() - t0, 1),
    )
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

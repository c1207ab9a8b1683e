"""Benchmark of incremental archives: their cost follows the changed data, not the volume.

A primary mirrors two volumes to a standby: ``vol0``, 1 GiB of random data, and ``vol1``, a 16 GiB
sparse volume. On each, 1 % of 1 GiB (10 MiB, 2,560 distinct random 4 KiB blocks of random data) is
written through the primary between two snapshots, with fio's NBD engine. Timed, in alternating
pairs (medians of the pairwise ratios):

* ``incremental_1pct_vs_full``: ``standby-backup run vol0 --snapshot s1 --since s0`` against the full
  archive of s1 (``run vol0 --snapshot s1``): time and archive bytes, incremental over full (targets
  <= 0.05 and <= 0.02);
* ``incremental_16g_vs_1g``: the same incremental on the 16 GiB volume against the 1 GiB one, the
  same changed bytes spread over each (target <= 1.2: it does not grow with the volume);
* ``chain_restore_vs_full``: ``restore FULL INC1 ... INC7`` (seven rounds of 1 % changes) against
  restoring a full archive of the same newest snapshot alone (target <= 1.3).

Every restore is compared with the snapshot's image::

    .venv/bin/python bench/incremental_bench.py --output bench/results/incremental.json
    .venv/bin/python bench/incremental_bench.py --quick      # 256 MiB and 4 GiB volumes, 3 pairs
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BIN,
    emit,
    header,
    log,
    machine,
    median,
    random_volume,
    sha256_file,
    start_primary,
    start_standby,
    tool_version,
)

MiB = 1 << 20
GiB = 1 << 30
CHANGED = 10 * MiB  # 1 % of 1 GiB


def backup_cmd(grpc: str, volume: str, snapshot: str, output: Path, *extra: str) -> list[str]:
    return [str(BIN / "standby-backup"), "run", volume, "--standby", grpc, "--snapshot", snapshot,
            "--output", str(output), "--force", "--metrics-listen", "off", "--log-format", "json",
            *extra]  # fmt: skip


#: The seconds each backup itself logged (its ``backup_done`` event: from the start of its work, so
#: without the interpreter's start and imports), by the command's wall time measured with it.
IN_PROCESS: dict[float, float] = {}


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    cp = subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    for line in cp.stderr.splitlines():
        if '"backup_done"' in line:
            IN_PROCESS[seconds] = float(json.loads(line)["seconds"])
    return seconds


def ctl(grpc: str, *args: str) -> None:
    subprocess.run([str(BIN / "standbyctl"), "--standby", grpc, *args], check=True, stdout=subprocess.DEVNULL)


def change(uri: str, span: int, seed: int) -> None:
    """CHANGED bytes of distinct random 4 KiB blocks of random data over [0, span), through the primary."""
    subprocess.run(
        ["fio", "--name=changes", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         f"--size={span}", f"--io_size={CHANGED}", "--iodepth=16", f"--randseed={seed}",
         "--refill_buffers", "--end_fsync=1"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def alternate(
    pairs: int, a: tuple[str, Callable[[], float]], b: tuple[str, Callable[[], float]]
) -> tuple[list[float], list[float]]:
    """`pairs` timings of each of two runs, alternating which goes first; (a's, b's)."""
    times: dict[str, list[float]] = {a[0]: [], b[0]: []}
    for i in range(pairs):
        for name, run in (a, b) if i % 2 == 0 else (b, a):
            times[name].append(run())
        log(f"pair {i + 1}/{pairs}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()))
    return times[a[0]], times[b[0]]


def ratio_figure(fid: str, what: str, ours: list[float], peer: list[float], target: float) -> dict[str, Any]:
    """`ours` over `peer`, pair by pair; the median against a `<= target` goal."""
    ratios = [o / p for o, p in zip(ours, peer, strict=True)]
    r = round(median(ratios), 4)
    return {
        "id": fid,
        "what": what,
        "ours_median": round(median(ours), 4),
        "peer_median": round(median(peer), 4),
        "ratio": r,
        "pair_ratios": [round(x, 4) for x in ratios],
        "target": f"<= {target}",
        "pass": r <= target,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="256 MiB and 4 GiB volumes, 3 pairs")
    parser.add_argument("--pairs", type=int, help="timed pairs (default 5, quick 3)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    args = parser.parse_args()
    small = (256 if args.quick else 1024) * MiB
    large = (4 if args.quick else 16) * GiB
    pairs = args.pairs or (3 if args.quick else 5)
    for tool in ("fio", "zstd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="incremental-bench-", dir=args.dir or "/var/tmp"))
    started = time.monotonic()
    standby = primary = None
    figures: list[dict[str, Any]] = []
    try:
        vol0 = work / "vol0.img"
        random_volume(vol0, small, small)  # random data, mirrored by the initial full sync
        standby = start_standby(work / "standby", "--preservation-capacity", "2GiB")
        grpc = standby.addresses["grpc"]
        primary = start_primary(
            [f"vol0={vol0},size={small}", f"vol1={work / 'vol1.img'},size={large}"],
            grpc,
            work / "primary.log",
        )
        uri = {v: f"nbd://{primary.addresses['nbd']}/{v}" for v in ("vol0", "vol1")}
        replica = work / "standby" / "replicas" / "vol0.img"
        deadline = time.monotonic() + 600
        while sha256_file(replica) != sha256_file(vol0):
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not get in sync")
            time.sleep(1)
        out = work / "archives"
        out.mkdir()
        for v in ("vol0", "vol1"):
            ctl(grpc, "snapshot", "create", v, "s0")
            subprocess.run(backup_cmd(grpc, v, "s0", out / f"{v}-s0.tar.zst"), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            change(uri[v], small if v == "vol0" else large, 1)
            ctl(grpc, "snapshot", "create", v, "s1")

        def incremental(v: str, target: Path) -> float:
            return timed(backup_cmd(grpc, v, "s1", target, "--since", "s0", "--base-archive",
                                    str(out / f"{v}-s0.tar.zst")))  # fmt: skip

        # 1. incremental vs full, vol0
        log("untimed first pass")
        full_s1, inc_s1 = out / "vol0-s1-full.tar.zst", out / "vol0-s1-inc.tar.zst"
        timed(backup_cmd(grpc, "vol0", "s1", full_s1))
        incremental("vol0", inc_s1)
        inc_t, full_t = alternate(
            pairs,
            ("incremental", lambda: incremental("vol0", inc_s1)),
            ("full", lambda: timed(backup_cmd(grpc, "vol0", "s1", full_s1))),
        )
        fig = ratio_figure(
            "incremental_1pct_vs_full",
            f"{small // MiB} MiB volume of random data, {CHANGED // MiB} MiB changed in random 4 KiB blocks: "
            "standby-backup run --since (incremental) vs a full archive of the same snapshot; time ratio",
            inc_t, full_t, 0.05,
        )  # fmt: skip
        inner = [IN_PROCESS[i] / IN_PROCESS[f] for i, f in zip(inc_t, full_t, strict=True)]
        fig.update(
            in_process_ratio=round(median(inner), 4),
            in_process_seconds={"incremental": median([IN_PROCESS[i] for i in inc_t]),
                                "full": median([IN_PROCESS[f] for f in full_t])},
            in_process_note="the seconds each run logged for its own work (backup_done), without the "
            "interpreter's start and imports that every run of the command pays",
        )  # fmt: skip
        bytes_ratio = inc_s1.stat().st_size / full_s1.stat().st_size
        fig.update(
            incremental_bytes=inc_s1.stat().st_size,
            full_bytes=full_s1.stat().st_size,
            bytes_ratio=round(bytes_ratio, 4),
            bytes_target="<= 0.02",
        )
        restored = work / "restored.img"
        restore = [str(BIN / "standby-backup"), "restore"]
        subprocess.run([*restore, str(out / "vol0-s0.tar.zst"), str(inc_s1), "--output", str(restored),
                        "--force"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        fig["restored_identical"] = sha256_file(restored) == sha256_file(full_restore(work, full_s1))
        fig["pass"] = fig["pass"] and bytes_ratio <= 0.02 and fig["restored_identical"]
        figures.append(fig)

        # 2. the same changed bytes on a 16 GiB volume vs the 1 GiB one
        inc_large = out / "vol1-s1-inc.tar.zst"
        incremental("vol1", inc_large)
        large_t, small_t = alternate(
            pairs,
            (f"{large // GiB} GiB", lambda: incremental("vol1", inc_large)),
            (f"{small // MiB} MiB", lambda: incremental("vol0", inc_s1)),
        )
        figures.append(
            ratio_figure(
                "incremental_16g_vs_1g",
                f"incremental of {CHANGED // MiB} MiB of random 4 KiB changes spread over a "
                f"{large // GiB} GiB sparse volume vs over a {small // MiB} MiB one; time ratio",
                large_t,
                small_t,
                1.2,
            )
        )

        # 3. a chain of a full and 7 incrementals vs the full archive of the newest snapshot alone
        chain = [out / "vol0-s0.tar.zst", inc_s1]
        for n in range(2, 8):
            change(uri["vol0"], small, n)
            ctl(grpc, "snapshot", "create", "vol0", f"s{n}")
            inc = out / f"vol0-s{n}-inc.tar.zst"
            subprocess.run(backup_cmd(grpc, "vol0", f"s{n}", inc, "--since", f"s{n - 1}", "--base-archive",
                                      str(chain[-1])), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
            chain.append(inc)
        newest_full = out / "vol0-s7-full.tar.zst"
        timed(backup_cmd(grpc, "vol0", "s7", newest_full))
        a_img, b_img = work / "chain.img", work / "alone.img"
        chain_t, alone_t = alternate(
            pairs,
            ("chain", lambda: timed([*restore, *map(str, chain), "--output", str(a_img), "--force"])),
            ("full alone", lambda: timed([*restore, str(newest_full), "--output", str(b_img), "--force"])),
        )
        fig = ratio_figure(
            "chain_restore_vs_full",
            f"restore of a full archive + {len(chain) - 1} incrementals ({CHANGED // MiB} MiB changed "
            f"each) vs of a full archive of the newest snapshot alone, {small // MiB} MiB volume; time ratio",
            chain_t, alone_t, 1.3,
        )  # fmt: skip
        fig["restored_identical"] = sha256_file(a_img) == sha256_file(b_img)
        fig["pass"] = fig["pass"] and fig["restored_identical"]
        figures.append(fig)
    finally:
        for d in (primary, standby):
            if d is not None:
                d.stop()
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("incremental", work),
        "settings": {"small_bytes": small, "large_bytes": large, "changed_bytes": CHANGED, "pairs": pairs},
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine(fio=tool_version(["fio", "--version"]), zstd=tool_version(["zstd", "--version"])),
        "figures": figures,
    }
    emit(doc, args.output)
    return 0


def full_restore(work: Path, archive: Path) -> Path:
    """The image a full archive restores (to compare an incremental chain's with)."""
    out = work / "full.img"
    subprocess.run([str(BIN / "standby-backup"), "restore", str(archive), "--output", str(out), "--force"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of mirrored writes through the primary against `nbdkit file`, same client (fio's nbd
engine), same run, and of resync after an outage.

Figures:

1. ``sequential_1m_writes_sync``: ``fio --rw=write --bs=1M --iodepth=8 --end_fsync=1`` over the whole
   volume, through the primary in sync mode (standby on loopback) vs into nbdkit file (target >= 0.5).
2. ``random_4k_writes_sync``: ``fio --rw=randwrite --bs=4k --iodepth=32`` for a fixed time: IOPS
   through the primary vs nbdkit file (target >= 0.3).
3. ``write_latency_by_mode``: ``fio --rw=randwrite --bs=4k --iodepth=1``: completion latency p50/p99 in
   each mode (sync, received, async) and for nbdkit file; the modes must differ measurably.
4. ``resync``: the standby is stopped, the same set of 4 KiB writes (spread over the first GiB) is made
   through the primary of a 1 GiB and of an 8 GiB sparse volume, the standby restarted; the bytes
   resent / (dirty regions x granularity) (target <= 1.1) and resync times (8 GiB / 1 GiB: flat).

Every target first takes one untimed pass, so timed passes overwrite allocated blocks on both sides;
passes then alternate ours/nbdkit (order flipping every pair) and the median of the pairwise ratios is
reported::

    .venv/bin/python bench/replication_bench.py --output bench/results/replication.json
    .venv/bin/python bench/replication_bench.py --quick      # 256 MiB, 3 pairs, short runs

The JSON document goes to stdout (and to ``--output``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    Daemon,
    filesystem_of,
    free_port,
    log,
    machine,
    paired,
    sha256_file,
    source_revision,
    start_nbdkit_file,
    start_primary,
    start_standby,
    to_json,
    tool_version,
)

MiB = 1 << 20
GiB = 1 << 30
GRANULARITY = 64 * 1024


def fio(uri: str, *args: str) -> dict[str, Any]:
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio failed on {uri}: error {job['error']}")
    write = job["write"]
    clat = write.get("clat_ns", {}).get("percentile", {})
    return {
        "seconds": round(seconds, 3),
        "mb_per_s": round(write["bw_bytes"] / 1e6, 1),
        "iops": round(write["iops"], 1),
        "clat_p50_ms": round(clat.get("50.000000", 0) / 1e6, 3),
        "clat_p99_ms": round(clat.get("99.000000", 0) / 1e6, 3),
    }


def seq_write(uri: str, size: int) -> dict[str, Any]:
    return fio(uri, "--rw=write", "--bs=1M", f"--size={size}", "--iodepth=8", "--end_fsync=1")


def rand_write(uri: str, size: int, seconds: int, iodepth: int) -> dict[str, Any]:
    return fio(
        uri, "--rw=randwrite", "--bs=4k", f"--size={size}", f"--iodepth={iodepth}", "--time_based",
        f"--runtime={seconds}", "--randrepeat=0", "--norandommap",
    )  # fmt: skip


def same_image(work: Path) -> bool:
    """The primary's volume and the standby's replica hold the same bytes."""
    return sha256_file(work / "primary.img") == sha256_file(work / "standby" / "replicas" / "vol0.img")


def scrape(daemon: Daemon, name: str, volume: str = "vol0") -> float:
    text = urllib.request.urlopen(f"http://{daemon.addresses['metrics']}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'volume="{volume}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no metric {name}")


def wait_in_sync(primary: Daemon, timeout: float = 600) -> float:
    """Seconds until the primary is connected with nothing left to resync."""
    t0 = time.perf_counter()
    while not (
        scrape(primary, "standby_replication_connected") == 1
        and scrape(primary, "standby_resync_remaining_bytes") == 0
        and scrape(primary, "standby_out_of_sync_bytes") == 0
    ):
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("the primary did not get in sync")
        time.sleep(0.02)
    return time.perf_counter() - t0


class Rig:
    """A standby and a primary (one volume), and nbdkit file on a file of the same size."""

    def __init__(self, work: Path, size: int, mode: str = "sync") -> None:
        self.work, self.size = work, size
        work.mkdir(parents=True, exist_ok=True)
        self.standby = start_standby(work / "standby", "--preservation-capacity", "1GiB")
        self.primary = self.start_primary(mode)
        peer_path = work / "nbdkit.img"
        with open(peer_path, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.nbdkit = start_nbdkit_file(peer_path, self.port)
        self.peer_uri = f"nbd://127.0.0.1:{self.port}"

    def start_primary(self, mode: str) -> Daemon:
        primary = start_primary(
            [f"vol0={self.work / 'primary.img'},size={self.size}"],
            self.standby.addresses["grpc"],
            self.work / f"primary-{mode}.log",
            "--mode",
            mode,
        )
        wait_in_sync(primary)
        return primary

    @property
    def uri(self) -> str:
        return f"nbd://{self.primary.addresses['nbd']}/vol0"

    def replica_identical(self) -> bool:
        wait_in_sync(self.primary)
        return sha256_file(self.work / "primary.img") == sha256_file(
            self.work / "standby" / "replicas" / "vol0.img"
        )

    def stop(self) -> None:
        self.primary.stop()
        self.standby.stop()
        self.nbdkit.terminate()
        self.nbdkit.wait()


def throughput_figures(work: Path, size: int, pairs: int, seconds: int) -> list[dict[str, Any]]:
    rig = Rig(work, size)
    try:
        log("untimed first pass on each target")
        seq_write(rig.uri, size)
        seq_write(rig.peer_uri, size)
        seq = paired("seq 1M", pairs, lambda: seq_write(rig.uri, size), lambda: seq_write(rig.peer_uri, size),
                     "mb_per_s", True)  # fmt: skip
        seq.update(
            id="sequential_1m_writes_sync",
            what=f"fio seq write bs=1M iodepth=8 end_fsync=1, {size // MiB} MiB: through the primary (sync, "
            "standby on loopback) vs nbdkit file",
            target=">= 0.5",
            replica_identical=rig.replica_identical(),
        )
        seq["pass"] = seq["ratio"] >= 0.5 and seq["replica_identical"]
        rnd = paired(
            "rand 4k", pairs, lambda: rand_write(rig.uri, size, seconds, 32),
            lambda: rand_write(rig.peer_uri, size, seconds, 32), "iops", True,
        )  # fmt: skip
        rnd.update(
            id="random_4k_writes_sync",
            what=f"fio randwrite bs=4k iodepth=32 for {seconds} s over {size // MiB} MiB: IOPS through the "
            "primary (sync) vs nbdkit file",
            target=">= 0.3",
            replica_identical=rig.replica_identical(),
        )
        rnd["pass"] = rnd["ratio"] >= 0.3 and rnd["replica_identical"]
        latency: dict[str, Any] = {"nbdkit": rand_write(rig.peer_uri, size, seconds, 1)}
        for mode in ("sync", "received", "async"):
            rig.primary.stop()
            rig.primary = rig.start_primary(mode)
            latency[mode] = rand_write(rig.uri, size, seconds, 1)
            p50, p99 = latency[mode]["clat_p50_ms"], latency[mode]["clat_p99_ms"]
            log(f"latency {mode}: p50 {p50} ms, p99 {p99} ms")
        distinct = latency["sync"]["clat_p50_ms"] > latency["async"]["clat_p50_ms"]
        lat = {
            "id": "write_latency_by_mode",
            "what": f"fio randwrite bs=4k iodepth=1 for {seconds} s: completion latency per mode",
            "modes": latency,
            "target": "the modes differ measurably (sync p50 > async p50)",
            "pass": distinct,
        }
        return [seq, rnd, lat]
    finally:
        rig.stop()


def resync_once(work: Path, size: int, writes: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    standby = start_standby(work / "standby", "--preservation-capacity", "64MiB")
    primary = start_primary(
        [f"vol0={work / 'primary.img'},size={size}"], standby.addresses["grpc"], work / "p.log"
    )
    try:
        wait_in_sync(primary)
        grpc_address = standby.addresses["grpc"]
        standby.stop()
        # The same dirty set whatever the volume size: `writes` 4 KiB writes, one per 64 KiB region
        # (bits), spread over the first GiB.
        stride = GiB // writes // GRANULARITY * GRANULARITY
        script = [f"write -P 0x{(i % 250) + 1:x} {i * stride} 4k" for i in range(writes)]
        args = ["qemu-io", "-f", "raw"]
        for c in script:
            args += ["-c", c]
        subprocess.run([*args, f"nbd://{primary.addresses['nbd']}/vol0"], check=True, capture_output=True)
        dirty = scrape(primary, "standby_out_of_sync_bytes")
        before = scrape(primary, "standby_resync_bytes_total")
        # Same gRPC address: the primary reconnects by itself.
        standby = start_standby(
            work / "standby", "--preservation-capacity", "64MiB", "--listen", grpc_address
        )
        # The primary reconnects by itself (backoff up to 10 s); time from its reconnection.
        while scrape(primary, "standby_replication_connected") != 1:
            time.sleep(0.02)
        seconds = wait_in_sync(primary)
        sent = scrape(primary, "standby_resync_bytes_total") - before
        identical = sha256_file(work / "primary.img") == sha256_file(
            work / "standby" / "replicas" / "vol0.img"
        )
        return {
            "volume_bytes": size,
            "dirty_bytes": dirty,
            "resent_bytes": sent,
            "seconds": round(seconds, 3),
            "replica_identical": identical,
        }
    finally:
        primary.stop()
        standby.stop()


def resync_figure(work: Path, writes: int) -> dict[str, Any]:
    small = resync_once(work / "1g", GiB, writes)
    large = resync_once(work / "8g", 8 * GiB, writes)
    ratio = max(r["resent_bytes"] / r["dirty_bytes"] for r in (small, large))
    flat = large["seconds"] / small["seconds"]
    return {
        "id": "resync",
        "what": f"{writes} 4 KiB writes (one per 64 KiB region) made while the standby was down, then "
        "resynced: 1 GiB vs 8 GiB sparse volume",
        "runs": [small, large],
        "resent_over_dirty": round(ratio, 3),
        "time_8g_over_1g": round(flat, 2),
        "target": "resent / dirty <= 1.1; time flat in the volume size",
        "pass": ratio <= 1.1 and small["replica_identical"] and large["replica_identical"] and flat < 2.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 3 pairs, short runs")
    parser.add_argument("--pairs", type=int, help="timed pairs (default 5, quick 3)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    parser.add_argument("--only", help="comma-separated: throughput, resync (default: both)")
    args = parser.parse_args()
    size = (256 if args.quick else 1024) * MiB
    pairs = args.pairs or (3 if args.quick else 5)
    seconds = 3 if args.quick else 8
    only = set(args.only.split(",")) if args.only else {"throughput", "resync"}
    for tool in ("fio", "nbdkit", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="replication-bench-", dir=args.dir or "/var/tmp"))
    figures: list[dict[str, Any]] = []
    try:
        if "throughput" in only:
            figures += throughput_figures(work / "throughput", size, pairs, seconds)
        if "resync" in only:
            figures.append(resync_figure(work / "resync", 256 if args.quick else 1024))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "benchmark": "replication",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "revision": source_revision(),
        "filesystem": filesystem_of(str(work.parent)),
        "machine": machine(
            fio=tool_version(["fio", "--version"]), nbdkit=tool_version(["nbdkit", "--version"])
        ),
        "figures": figures,
    }
    text = to_json(doc)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

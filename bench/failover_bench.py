"""Benchmark of point-in-time failover and failback: what `promote --at` and `demote` cost.

A primary mirrors a volume of random data to a standby. Snapshot ``s0``; then 10 % of the volume is
overwritten in distinct random 4 KiB blocks through the primary (fio's NBD engine, synced); the
primary is killed. Measured, for two volume sizes (the changed fraction the same, so the second has
twice the changed blocks):

* ``promote_at_seconds``: ``standbyctl promote vol0 --at s0``, the whole command, until the export
  serves (the rollback rewrites the changed blocks through the engine), and the rollback's own seconds
  (its ``volume_rolled_back`` event); against the peer, ``nbdcopy`` of the whole snapshot export to a
  file (getting the old image back without a rollback), median of 3. Target: time proportional to the
  changed blocks (the two sizes' ratio about 2), the rollback's bytes = the changed bytes;
* ``failback_sent_over_tracked``: clients write 16 MiB of random 4 KiB blocks to the promoted export;
  ``demote``; the old primary restarted on its volume pulls what the standby tracked (the rollback's
  blocks and the clients') plus its own unmirrored regions; bytes sent over bytes tracked (target
  <= 1.1), and the primary's volume compared with the replica.

    .venv/bin/python bench/failover_bench.py --output bench/results/failover.json
    .venv/bin/python bench/failover_bench.py --quick      # 256 MiB and 512 MiB
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
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
FRACTION = 0.10
CLIENT_WRITES = 16 * MiB


def ctl(grpc: str, *args: str) -> str:
    cp = subprocess.run([str(BIN / "standbyctl"), "--standby", grpc, *args], check=True, capture_output=True,
                        text=True)  # fmt: skip
    return cp.stdout


def fio_random(uri: str, span: int, nbytes: int) -> None:
    """`nbytes` of distinct random 4 KiB blocks of random data over [0, span), synced at the end (each
    run its own offsets: with fio's default randrepeat, two runs picked the same blocks)."""
    subprocess.run(
        ["fio", "--name=changes", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         f"--size={span}", f"--io_size={nbytes}", "--iodepth=16", "--randrepeat=0",
         "--refill_buffers", "--end_fsync=1"],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def nbdcopy_seconds(uri: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    return time.perf_counter() - t0


def one_size(work: Path, size: int) -> dict[str, Any]:
    """Set up, roll back and fail back one volume of `size` bytes; its figures."""
    vol = work / "vol0.img"
    random_volume(vol, size, size)
    standby = start_standby(work / "standby", "--preservation-capacity", "4GiB")
    grpc, nbd = standby.addresses["grpc"], standby.addresses["nbd"]
    primary = start_primary([f"vol0={vol}"], grpc, work / "primary.log")
    try:
        replica = work / "standby" / "replicas" / "vol0.img"
        deadline = time.monotonic() + 900
        while sha256_file(replica) != sha256_file(vol):
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not get in sync")
            time.sleep(1)
        ctl(grpc, "snapshot", "create", "vol0", "s0")
        changed = int(size * FRACTION) // 4096 * 4096
        log(f"{size // MiB} MiB: changing {changed // MiB} MiB in random 4 KiB blocks")
        fio_random(f"nbd://{primary.addresses['nbd']}/vol0", size, changed)
        primary.kill()
        s0 = f"nbd://{nbd}/vol0@s0"
        t0 = time.perf_counter()
        out = ctl(grpc, "promote", "vol0", "--at", "s0")
        promote_s = time.perf_counter() - t0
        rolled = standby.wait_for("volume_rolled_back")
        log(f"promote --at: {promote_s:.2f} s (rollback {rolled['seconds']} s, {rolled['bytes'] // MiB} MiB)")
        peer = [nbdcopy_seconds(s0, work / "copy.img") for _ in range(3)]
        promoted_img = work / "promoted.img"
        subprocess.run(["nbdcopy", f"nbd://{nbd}/vol0", str(promoted_img)], check=True)
        identical = sha256_file(promoted_img) == sha256_file(work / "copy.img")
        for p in (promoted_img, work / "copy.img"):
            p.unlink()

        fio_random(f"nbd://{nbd}/vol0", size, CLIENT_WRITES)
        status = json.loads(ctl(grpc, "status", "--json"))["volumes"][0]
        tracked = status["tracked_bytes"]
        ctl(grpc, "demote", "vol0")
        primary = start_primary([f"vol0={vol}"], grpc, work / "primary2.log")
        started = primary.wait_for("failback_started", timeout=120)
        pulled = primary.wait_for("failback_pulled", timeout=600)
        primary.wait_for("mirror_connected", timeout=120)
        same = sha256_file(vol) == sha256_file(replica)
        return {
            "volume_bytes": size,
            "changed_bytes": changed,
            "promote_at_command_seconds": round(promote_s, 3),
            "rollback_seconds": rolled["seconds"],
            "rollback_bytes": rolled["bytes"],
            "peer_nbdcopy_whole_snapshot_seconds": round(median(peer), 3),
            "ratio_to_peer": round(promote_s / median(peer), 4),
            "promoted_equals_snapshot": identical,
            "client_written_bytes": CLIENT_WRITES,
            "tracked_bytes": tracked,
            "primary_regions_bytes": started["primary_regions_bytes"],
            "primary_regions_differing_bytes": pulled["differing_bytes"],
            "sent_bytes": pulled["sent_bytes"],
            "failback_seconds": pulled["seconds"],
            "sent_over_tracked": round(pulled["sent_bytes"] / tracked, 4),
            "primary_equals_replica": same,
            "promote_output": out.strip().splitlines(),
        }
    finally:
        for d in (primary, standby):
            d.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="256 MiB and 512 MiB volumes")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    args = parser.parse_args()
    sizes = [256 * MiB, 512 * MiB] if args.quick else [GiB, 2 * GiB]
    for tool in ("fio", "nbdcopy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="failover-bench-", dir=args.dir or "/var/tmp"))
    started = time.monotonic()
    runs = []
    try:
        for size in sizes:
            sub = work / f"{size // MiB}M"
            sub.mkdir()
            runs.append(one_size(sub, size))
            shutil.rmtree(sub, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = runs
    growth = large["promote_at_command_seconds"] / small["promote_at_command_seconds"]
    figures = [
        {
            "id": "promote_at_seconds",
            "what": f"standbyctl promote --at after {FRACTION:.0%} of the volume changed in random 4 KiB "
            "blocks, until the export serves; the peer is nbdcopy of the whole snapshot to a file",
            "runs": [{k: r[k] for k in r if not k.startswith(("client", "tracked", "sent", "failback",
                                                              "primary_"))} for r in runs],
            "larger_over_smaller": round(growth, 3),
            "changed_ratio": round(large["changed_bytes"] / small["changed_bytes"], 3),
            "target": "<= 2 s for 1 GiB, or proportional to the changed blocks (rollback)",
            "pass": all(r["promoted_equals_snapshot"] and r["rollback_bytes"] == r["changed_bytes"]
                        for r in runs) and growth <= 2.6,
        },
        {
            "id": "failback_sent_over_tracked",
            "what": f"after {CLIENT_WRITES // MiB} MiB of random 4 KiB client writes to the promoted volume: "
            "bytes the failback sent over bytes the standby tracked (rollback + client writes); the old "
            "primary's own set bitmap regions are compared by checksum and only differing blocks sent",
            "runs": [{k: r[k] for k in ("volume_bytes", "client_written_bytes", "tracked_bytes",
                                        "primary_regions_bytes", "primary_regions_differing_bytes",
                                        "sent_bytes", "sent_over_tracked", "failback_seconds",
                                        "primary_equals_replica")} for r in runs],
            "ratio": max(r["sent_over_tracked"] for r in runs),
            "target": "<= 1.1",
            "pass": all(r["sent_over_tracked"] <= 1.1 and r["primary_equals_replica"] for r in runs),
        },
    ]  # fmt: skip
    doc = {
        **header("failover", work),
        "settings": {"sizes": sizes, "changed_fraction": FRACTION, "client_writes": CLIENT_WRITES},
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine(
            fio=tool_version(["fio", "--version"]), nbdcopy=tool_version(["nbdcopy", "--version"])
        ),
        "figures": figures,
    }
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

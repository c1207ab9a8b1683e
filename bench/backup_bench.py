"""Benchmark of the backup node: `standby-backup run` against `nbdcopy ... - | zstd -T0`, same run.

A 1 GiB volume, half data (in 16 MiB extents, moderately compressible: half random bytes, half text)
and half holes, is mirrored to a standby. Timed, in alternating pairs:

* ours: ``standby-backup run vol0`` (a snapshot on the standby, its data extents read over NBD with 4
  connections, the zstd-compressed pax archive written to a file, the snapshot deleted);
* the peer: ``nbdcopy nbd://... - | zstd -T0 -3 > file``, reading the same bytes (the replica's image)
  from ``nbdkit file``.

The figure is the peer's time over ours (target >= 0.9). Once, untimed, our archive is verified and
restored, and the image compared with the primary's volume::

    .venv/bin/python bench/backup_bench.py --output bench/results/backup.json
    .venv/bin/python bench/backup_bench.py --quick      # 256 MiB, 3 pairs
"""

from __future__ import annotations

import argparse
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
    free_port,
    header,
    log,
    machine,
    paired,
    sha256_file,
    start_nbdkit_file,
    start_primary,
    start_standby,
    text_and_random_volume,
    tool_version,
)

MiB = 1 << 20
EXTENT = 16 * MiB


def timed(argv: list[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="256 MiB, 3 pairs")
    parser.add_argument("--pairs", type=int, help="timed pairs (default 5, quick 3)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    args = parser.parse_args()
    size = (256 if args.quick else 1024) * MiB
    pairs = args.pairs or (3 if args.quick else 5)
    for tool in ("nbdkit", "nbdcopy", "zstd"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="backup-bench-", dir=args.dir or "/var/tmp"))
    standby = primary = nbdkit = None
    try:
        volume = work / "primary.img"
        data = size // 2
        text_and_random_volume(volume, size, data)
        standby = start_standby(work / "standby", "--preservation-capacity", "1GiB")
        grpc = standby.addresses["grpc"]
        primary = start_primary([f"vol0={volume},size={size}"], grpc, work / "primary.log")
        replica = work / "standby" / "replicas" / "vol0.img"
        deadline = time.monotonic() + 600
        while sha256_file(replica) != sha256_file(volume):  # the initial full sync
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not get in sync")
            time.sleep(1)
        port = free_port()
        nbdkit = start_nbdkit_file(replica, port)
        ours_out, peer_out = work / "ours.tar.zst", work / "peer.zst"
        backup = [
            str(BIN / "standby-backup"), "run", "vol0", "--standby", grpc, "--output", str(ours_out),
            "--force", "--metrics-listen", "off", "--log-format", "json",
        ]  # fmt: skip
        peer = f"set -o pipefail; nbdcopy nbd://127.0.0.1:{port} - | zstd -T0 -3 -q -f -o {peer_out}"

        def ours() -> dict[str, Any]:
            seconds = timed(backup, stderr=subprocess.DEVNULL)
            return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1)}

        def theirs() -> dict[str, Any]:
            seconds = timed(["bash", "-c", peer])
            return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1)}

        log("untimed first pass of each")
        ours()
        theirs()
        figure = paired("backup", pairs, ours, theirs, "seconds", False, peer_name="nbdcopy_zstd")
        restored = work / "restored.img"
        subprocess.run(
            [str(BIN / "standby-backup"), "verify", str(ours_out)], check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            [str(BIN / "standby-backup"), "restore", str(ours_out), "--output", str(restored)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        figure.update(
            id="backup_1gib_half_holes",
            what=f"{size // MiB} MiB volume, {data // MiB} MiB of data: standby-backup run (snapshot, NBD, "
            "zstd pax archive to a file) vs nbdcopy nbd://nbdkit-file - | zstd -T0 -3 > file; ratio = "
            "their time / ours",
            target=">= 0.9",
            archive_bytes=ours_out.stat().st_size,
            peer_bytes=peer_out.stat().st_size,
            restored_identical=sha256_file(restored) == sha256_file(volume),
        )
        figure["pass"] = figure["ratio"] >= 0.9 and figure["restored_identical"]
    finally:
        for d in (primary, standby):
            if d is not None:
                d.stop()
        if nbdkit is not None:
            nbdkit.terminate()
            nbdkit.wait()
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("backup", work),
        "machine": machine(
            nbdkit=tool_version(["nbdkit", "--version"]),
            nbdcopy=tool_version(["nbdcopy", "--version"]),
            zstd=tool_version(["zstd", "--version"]),
        ),
        "figures": [figure],
    }
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

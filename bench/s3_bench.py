"""Benchmark of archives on S3: `standby-backup run --output s3://...` against nbdcopy | zstd | boto3.

A real S3 server (SeaweedFS's ``weed mini``, as in the tests) on loopback. A 1 GiB volume, half data
(16 MiB extents, half random bytes, half text) and half holes, is mirrored to a standby. Timed, in
alternating pairs:

* ours: ``standby-backup run vol0 --output s3://bench/KEY`` (a snapshot, its data extents read over
  NBD, the archive streamed as one multipart upload with Content-MD5 on every part, its index written);
* the peer: ``nbdcopy nbd://nbdkit-file - | zstd -T0 -3 | upload_fileobj`` (boto3's managed upload of
  a stream, its defaults), reading the same bytes from ``nbdkit file`` on the replica.

The figure is the peer's time over ours (target >= 0.9). Then the memory of one upload of a 16 GiB
sparse volume holding 2 GiB of random data (128 parts): the backup node's peak RSS, against the same
backup written to a local file and the bound the upload keeps ((parts in flight + 1) x part size, plus
the S3 client's own footprint), and against an upload of a quarter of the data (it must not grow)::

    .venv/bin/python bench/s3_bench.py --output bench/results/s3.json
    .venv/bin/python bench/s3_bench.py --quick      # 256 MiB and a 4 GiB volume with 512 MiB, 3 pairs
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the S3 server of the tests

from benchlib import (  # noqa: E402
    BIN,
    emit,
    free_port,
    header,
    log,
    machine,
    paired,
    random_volume,
    sha256_file,
    start_nbdkit_file,
    start_primary,
    start_standby,
    text_and_random_volume,
    tool_version,
)
from s3server import running_s3  # noqa: E402

from backupnode import s3 as ours_s3  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
EXTENT = 16 * MiB

UPLOAD = """
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"},
                  request_checksum_calculation="when_required", response_checksum_validation="when_required"))
s3.upload_fileobj(sys.stdin.buffer, sys.argv[1], sys.argv[2])
"""


def wait_synced(replica: Path, volume: Path) -> None:
    deadline = time.monotonic() + 1200
    while replica.stat().st_size != volume.stat().st_size or sha256_file(replica) != sha256_file(volume):
        if time.monotonic() > deadline:
            raise RuntimeError("the standby did not get in sync")
        time.sleep(1)


def peak_rss(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of `argv`, by GNU time."""
    t0 = time.perf_counter()
    cp = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", *argv], env=env, check=True,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    m = re.search(r"maxrss=(\d+)", cp.stderr)
    assert m, cp.stderr
    return seconds, int(m.group(1)) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="smaller volumes, 3 pairs")
    parser.add_argument("--pairs", type=int, help="timed pairs (default 5, quick 3)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    args = parser.parse_args()
    size = (256 if args.quick else 1024) * MiB
    big, big_data = (4 * GiB, 512 * MiB) if args.quick else (16 * GiB, 2 * GiB)
    pairs = args.pairs or (3 if args.quick else 5)
    for tool in ("nbdkit", "nbdcopy", "zstd", "/usr/bin/time"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="s3-bench-", dir=args.dir or "/var/tmp"))
    started = time.monotonic()
    standby = primary = nbdkit = None
    figures: list[dict[str, Any]] = []
    try:
        with running_s3(work / "s3") as server:
            env = {**os.environ, **server.env()}
            os.environ.update(server.env())  # for this process's checks
            bucket = server.make_bucket("bench")
            volume, large, medium = work / "vol0.img", work / "vol1.img", work / "vol2.img"
            text_and_random_volume(volume, size, size // 2)
            random_volume(large, big, big_data)
            random_volume(medium, big, big_data // 4)
            standby = start_standby(work / "standby", "--preservation-capacity", "1GiB")
            grpc = standby.addresses["grpc"]
            vols = [f"vol0={volume},size={size}", f"vol1={large},size={big}", f"vol2={medium},size={big}"]
            primary = start_primary(vols, grpc, work / "primary.log")
            replicas = work / "standby" / "replicas"
            wait_synced(replicas / "vol0.img", volume)
            wait_synced(replicas / "vol1.img", large)
            wait_synced(replicas / "vol2.img", medium)
            port = free_port()
            nbdkit = start_nbdkit_file(replicas / "vol0.img", port)
            runs = {"n": 0}

            def ours() -> dict[str, Any]:
                runs["n"] += 1
                key = f"ours-{runs['n']}.tar.zst"
                argv = [str(BIN / "standby-backup"), "run", "vol0", "--standby", grpc, "--output",
                        f"s3://{bucket}/{key}", "--metrics-listen", "off"]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(
                    argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                seconds = time.perf_counter() - t0
                return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1), "key": key}

            def theirs() -> dict[str, Any]:
                runs["n"] += 1
                key = f"peer-{runs['n']}.zst"
                pipe = (f"set -o pipefail; nbdcopy nbd://127.0.0.1:{port} - | zstd -T0 -3 -q -c | "
                        f"{sys.executable} -c '{UPLOAD}' {bucket} {key}")  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(["bash", "-c", pipe], env=env, check=True)
                seconds = time.perf_counter() - t0
                return {"seconds": round(seconds, 3), "mb_per_s": round(size / seconds / 1e6, 1), "key": key}

            log("untimed first pass of each")
            ours()
            theirs()
            fig = paired("s3 upload", pairs, ours, theirs, "seconds", False, peer_name="nbdcopy_zstd_boto3")
            client = server.client()
            last = fig["pairs"][-1]["ours"]["key"]
            restored = work / "restored.img"
            subprocess.run([str(BIN / "standby-backup"), "restore", f"s3://{bucket}/{last}", "--output",
                            str(restored)], env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            fig.update(
                id="s3_upload_vs_nbdcopy_zstd_upload_fileobj",
                what=f"{size // MiB} MiB volume, {size // 2 // MiB} MiB of data, to a local SeaweedFS S3 "
                "server: standby-backup run --output s3:// vs nbdcopy nbd://nbdkit-file - | zstd -T0 -3 | "
                "boto3 upload_fileobj; ratio = their time / ours",
                target=">= 0.9",
                archive_bytes=client.head_object(Bucket=bucket, Key=last)["ContentLength"],
                restored_identical=sha256_file(restored) == sha256_file(volume),
            )
            fig["pass"] = fig["ratio"] >= 0.9 and fig["restored_identical"]
            figures.append(fig)
            restored.unlink()

            # Memory of one upload of the large volume, and of the same backup to a local file.
            node = [str(BIN / "standby-backup"), "run", "vol1", "--standby", grpc, "--metrics-listen", "off",
                    "--log-format", "json", "--output"]  # fmt: skip
            s3_seconds, s3_rss = peak_rss([*node, f"s3://{bucket}/vol1.tar.zst"], env)
            file_seconds, file_rss = peak_rss([*node, str(work / "vol1.tar.zst")], env)
            archive = client.head_object(Bucket=bucket, Key="vol1.tar.zst")["ContentLength"]
            part = ours_s3.part_size_for(big_data + big // 64 + 64 * MiB)
            bound = (4 + 1) * part
            # What the S3 client itself costs (botocore's service model), apart from the part buffers.
            py = [sys.executable, "-c"]
            _, bare = peak_rss([*py, "import backupnode.main, backupnode.backup"], env)
            _, with_client = peak_rss(
                [*py, "import backupnode.main, backupnode.backup; from backupnode import s3; s3.client()"],
                env,
            )
            medium_seconds, medium_rss = peak_rss(
                [*node[:2], "vol2", *node[3:], f"s3://{bucket}/vol2.tar.zst"], env
            )
            extra = s3_rss - file_rss
            figures.append(
                {
                    "id": "s3_upload_memory",
                    "what": f"peak RSS of standby-backup run to s3:// of a {big // GiB} GiB sparse volume "
                    f"with {big_data // MiB} MiB of random data, vs the same backup to a local file, and vs "
                    "the upload of a volume of the same size with a quarter of the data",
                    "archive_bytes": archive,
                    "parts": -(-archive // part),
                    "part_bytes": part,
                    "parts_in_flight": 4,
                    "upload_buffers_bound_bytes": bound,
                    "s3_client_bytes": with_client - bare,
                    "s3_peak_rss_bytes": s3_rss,
                    "file_peak_rss_bytes": file_rss,
                    "quarter_data_s3_peak_rss_bytes": medium_rss,
                    "s3_extra_rss_bytes": extra,
                    "s3_seconds": round(s3_seconds, 2),
                    "file_seconds": round(file_seconds, 2),
                    "quarter_data_s3_seconds": round(medium_seconds, 2),
                    "target": "S3 peak RSS - local-file peak RSS <= (parts in flight + 1) x part size + the "
                    "S3 client's own + 16 MiB (threads, HTTP buffers); and no growth with the archive (vs "
                    "an upload of a quarter of the data: < one part)",
                    "pass": extra <= bound + (with_client - bare) + 16 * MiB and s3_rss - medium_rss < part,
                }
            )
    finally:
        for d in (primary, standby):
            if d is not None:
                d.stop()
        if nbdkit is not None:
            nbdkit.terminate()
            nbdkit.wait()
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("s3", work),
        "settings": {"volume_bytes": size, "large_bytes": big, "large_data_bytes": big_data, "pairs": pairs},
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine(
            nbdkit=tool_version(["nbdkit", "--version"]),
            nbdcopy=tool_version(["nbdcopy", "--version"]),
            zstd=tool_version(["zstd", "--version"]),
        ),
        "figures": figures,
    }
    emit(doc, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

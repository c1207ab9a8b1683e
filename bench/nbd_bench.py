"""Benchmark of the standby's NBD snapshot export against nbdkit's file plugin serving the same bytes.

Scenario (the issue's target): a volume filled with incompressible data (no holes), one snapshot, then a
quarter of its blocks overwritten in scattered 64 KiB runs, so that a quarter of the snapshot's blocks
are read from the preservation store and the rest from the replica file. The data directory is laid out
as ``standby-daemon --data-dir DIR`` opens it::

    DIR/preservation.store        the preservation store
    DIR/replicas/vol0.img         the replica (origin) of volume vol0, 4 KiB blocks; snapshot s1

and the snapshot's frozen image is also written to a plain file, served by ``nbdkit file``. Both servers
run as long-lived processes on loopback TCP; each timed run is one::

    nbdcopy --connections=4 --threads=4 nbd://127.0.0.1:PORT/vol0@s1 null:     (ours)
    nbdcopy --connections=4 --threads=4 nbd://127.0.0.1:PORT2 null:            (nbdkit file FILE)

``--threads=4`` is needed too: nbdcopy caps the connections at its thread count, which defaults to the
number of cores (2 here). Requests in flight (64 per connection) and request size (256 KiB) are
nbdcopy's defaults. Before timing, one copy of our export to a file must hash (SHA-256) like the frozen
image, and one untimed copy from each server warms the page cache. Runs then alternate ours/nbdkit, the
order flipping every pair; the ratio of a pair is nbdkit seconds / our seconds (our throughput relative
to nbdkit's, same bytes, same client) and the median over pairs is reported (target >= 0.9)::

    .venv/bin/python bench/nbd_bench.py --output bench/results/nbd.json
    .venv/bin/python bench/nbd_bench.py --quick                 # 256 MiB, 3 pairs
    .venv/bin/python bench/nbd_bench.py --data-dir /var/tmp/nbd-bench   # keep and reuse the scenario

The JSON document goes to stdout (and to ``--output``); progress goes to stderr. The exit status is 0
whether or not the target is met.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    Daemon,
    emit,
    filesystem_of,
    machine,
    median,
    sha256_file,
    source_revision,
    start_standby,
    tool_version,
)

from standbylib.blockdev import open_file_device
from standbylib.snapshot import PreservationStore

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # throughput unit: MB/s = 10^6 bytes per second

BLOCK_SIZE = 4 * KiB
RUN = 64 * KiB  # overwritten runs
BATCH_RUNS = 64  # runs per write_batch while preparing
EXPORT = "vol0@s1"
NBDCOPY = ["nbdcopy", "--connections=4", "--threads=4"]
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Plan:
    size: int  # volume size
    preserved_fraction: float  # of the snapshot's blocks, preserved by overwriting the origin
    pairs: int  # timed A/B pairs
    seed: int = 1


FULL = Plan(size=1 * GiB, preserved_fraction=0.25, pairs=7)
QUICK = Plan(size=256 * MiB, preserved_fraction=0.25, pairs=3)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] nbd_bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- scenario


def prepare(data_dir: str, frozen_path: str, plan: Plan) -> dict[str, Any]:
    """Build the data directory and the frozen image file, or reuse them if `plan` built them already."""
    marker = os.path.join(data_dir, "bench-scenario.json")
    wanted = {"size": plan.size, "preserved_fraction": plan.preserved_fraction, "seed": plan.seed}
    if os.path.exists(marker) and os.path.exists(frozen_path):
        with open(marker) as f:
            done: dict[str, Any] = json.load(f)
        if done.get("plan") == wanted:
            log(f"reusing the scenario in {data_dir}")
            return done
        shutil.rmtree(data_dir)
    os.makedirs(os.path.join(data_dir, "replicas"), exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(plan.seed))
    store_path = os.path.join(data_dir, "preservation.store")
    for stale in (store_path, os.path.join(data_dir, "replicas", "vol0.img")):
        if os.path.exists(stale):
            os.unlink(stale)
    store = PreservationStore.open(store_path, capacity=plan.size)
    device = open_file_device(os.path.join(data_dir, "replicas", "vol0.img"), plan.size)
    digest = hashlib.sha256()
    try:
        vol = store.attach("vol0", device, block_size=BLOCK_SIZE)
        chunk = 8 * MiB
        with open(frozen_path, "wb") as frozen:
            for off in range(0, plan.size, chunk):
                data = rng.bytes(min(chunk, plan.size - off))
                vol.write_batch([(off, data)])  # no snapshot yet: a plain origin write
                frozen.write(data)
                digest.update(data)
            frozen.flush()
            os.fsync(frozen.fileno())
        vol.flush()
        vol.create_snapshot(EXPORT.split("@")[1])
        runs = plan.size // RUN
        chosen = rng.choice(runs, int(runs * plan.preserved_fraction), replace=False)
        for i in range(0, len(chosen), BATCH_RUNS):
            batch = [(int(r) * RUN, rng.bytes(RUN)) for r in chosen[i : i + BATCH_RUNS]]
            vol.write_batch(batch)  # preserves the old blocks first, then overwrites the origin
        vol.flush()
        stats = store.stats()
    finally:
        store.close()
        device.close()
    done = {
        "plan": wanted,
        "frozen_sha256": digest.hexdigest(),
        "overwritten_runs": len(chosen),
        "preserved_blocks": stats.preserved_blocks,
        "preserved_bytes": stats.used_bytes,
        "store_file_bytes": os.path.getsize(store_path),
        "prepare_seconds": round(time.perf_counter() - t0, 2),
    }
    with open(marker, "w") as f:
        json.dump(done, f)
    log(f"prepared {plan.size // MiB} MiB, {stats.preserved_blocks} preserved blocks in {data_dir}")
    return done


# ---------------------------------------------------------------------------- servers


def daemon_available() -> bool:
    return importlib.util.find_spec("standby.main") is not None


def start_server(data_dir: str, kind: str = "daemon") -> tuple[subprocess.Popen[bytes], int]:
    """Start the export under test on `data_dir`; return the process and its NBD port.

    ``daemon``: ``standby-daemon --data-dir DIR`` with every listener on a free loopback port (the
    port comes from its ``listening`` log event). ``stand-in``: ``bench/serve_snapshot.py``, which
    opens the data directory the same way and logs the same event (for checkouts without the daemon).
    """
    if kind == "daemon":
        size = os.path.getsize(os.path.join(data_dir, "replicas", "vol0.img"))
        # The capacity the store was made with, so that opening it changes nothing.
        daemon = start_standby(Path(data_dir), "--preservation-capacity", str(size))
        return daemon.proc, int(daemon.addresses["nbd"].rsplit(":", 1)[1])
    cmd = [sys.executable, os.path.join(HERE, "serve_snapshot.py"), "--data-dir", data_dir]
    server = Daemon("serve_snapshot.py", cmd, Path(data_dir.rstrip("/") + ".server.log"), ready=False)
    return server.proc, int(server.address("nbd").rsplit(":", 1)[1])


def start_nbdkit(path: str) -> tuple[subprocess.Popen[bytes], int]:
    """``nbdkit -f file PATH`` on a loopback socket bound here and handed over by socket activation
    (nbdkit cannot report an ephemeral port it bound itself)."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    fd = sock.fileno()
    script = 'if [ "$0" != 3 ]; then eval "exec 3<&$0 $0<&-"; fi; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    proc = subprocess.Popen(
        ["sh", "-c", script, str(fd), "nbdkit", "-f", "file", path], pass_fds=(fd,), stderr=subprocess.PIPE
    )
    sock.close()
    deadline = time.monotonic() + 30
    while subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"], capture_output=True).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nbdkit did not start: {proc.stderr.read() if proc.stderr else ''!r}")
        time.sleep(0.05)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------- runs


def copy_run(url: str, server_pid: int, size: int) -> dict[str, Any]:
    """One timed ``nbdcopy URL null:``; wall time and the CPU time of the server and of nbdcopy."""
    children0 = os.times()
    server0 = cpu_seconds(server_pid)
    t0 = time.perf_counter()
    subprocess.run([*NBDCOPY, url, "null:"], check=True)
    seconds = time.perf_counter() - t0
    children1 = os.times()
    return {
        "seconds": round(seconds, 4),
        "mb_per_s": round(size / seconds / MB, 1),
        "server_cpu_seconds": round(cpu_seconds(server_pid) - server0, 3),
        "client_cpu_seconds": round(
            children1.children_user + children1.children_system
            - children0.children_user - children0.children_system, 3
        ),
    }  # fmt: skip


def verify(url: str, work: str, expected: str) -> None:
    """Copy `url` to a file and require its SHA-256 to be the frozen image's."""
    out = os.path.join(work, "verify.img")
    try:
        subprocess.run([*NBDCOPY, url, out], check=True)
        got = sha256_file(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)
    if got != expected:
        raise RuntimeError(f"{url} does not read as the frozen image: sha256 {got}, expected {expected}")


def profile_run(url: str, server_pid: int, out: str) -> None:
    """One extra copy with py-spy sampling the server, written to `out` (flame graph SVG)."""
    spy = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(server_pid),
         "--rate", "250", "--threads", "--idle", "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1)
    subprocess.run([*NBDCOPY, url, "null:"], check=True)
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    log(f"profile written to {out} ({err.decode().strip().splitlines()[-1:]})")


def measure(work: str, data_dir: str, frozen: str, scenario: dict[str, Any], plan: Plan, args: Any) -> Any:
    ours, our_port = start_server(data_dir, args.server)
    kit, kit_port = start_nbdkit(frozen)
    try:
        our_url = f"nbd://127.0.0.1:{our_port}/{EXPORT}"
        kit_url = f"nbd://127.0.0.1:{kit_port}"
        verify(our_url, work, scenario["frozen_sha256"])
        log("our export reads as the frozen image (sha256)")
        copy_run(our_url, ours.pid, plan.size)  # warm-up, untimed
        copy_run(kit_url, kit.pid, plan.size)
        pairs = []
        for i in range(plan.pairs):
            if i % 2:
                k = copy_run(kit_url, kit.pid, plan.size)
                o = copy_run(our_url, ours.pid, plan.size)
            else:
                o = copy_run(our_url, ours.pid, plan.size)
                k = copy_run(kit_url, kit.pid, plan.size)
            ratio = k["seconds"] / o["seconds"]
            pairs.append((o, k, ratio))
            log(f"pair {i}: ours {o['mb_per_s']} MB/s, nbdkit {k['mb_per_s']} MB/s, ratio {ratio:.3f}")
        if args.profile:
            profile_run(our_url, ours.pid, args.profile)
        return pairs
    finally:
        stop(ours)
        stop(kit)


# ---------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="256 MiB volume, 3 pairs")
    parser.add_argument("--pairs", type=int, help="timed pairs (default: 7, or 3 with --quick)")
    parser.add_argument(
        "--data-dir",
        help="keep the scenario here (DIR and DIR.frozen.img) and reuse it on later runs; "
        "default: a fresh directory under /var/tmp, removed at the end",
    )
    parser.add_argument(
        "--server",
        choices=("auto", "daemon", "stand-in"),
        default="auto",
        help="export under test: standby-daemon, bench/serve_snapshot.py, or the daemon when "
        "standby.main is installed (default)",
    )
    parser.add_argument("--profile", metavar="SVG", help="after timing, profile one more copy with py-spy")
    args = parser.parse_args(argv)
    if args.server == "auto":
        args.server = "daemon" if daemon_available() else "stand-in"
    for tool in ("nbdcopy", "nbdkit", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/install-debian-tools.sh")

    plan = QUICK if args.quick else FULL
    if args.pairs:
        plan = Plan(plan.size, plan.preserved_fraction, args.pairs, plan.seed)
    started = datetime.now(UTC)
    host = machine()
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix="nbd-bench-", dir="/var/tmp")
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else os.path.join(work, "data")
    frozen = data_dir + ".frozen.img"
    try:
        scenario = prepare(data_dir, frozen, plan)
        pairs = measure(work, data_dir, frozen, scenario, plan, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = median([r for _o, _k, r in pairs])
    doc = {
        "benchmark": "standby NBD snapshot export vs nbdkit file",
        "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "variant": "quick" if args.quick else "full",
        "revision": source_revision(),
        "machine": host,
        "setup": {
            "server": args.server,
            "client": " ".join(NBDCOPY) + " URL null:",
            "nbdcopy": tool_version(["nbdcopy", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "work_filesystem": filesystem_of(data_dir),
            "volume_bytes": plan.size,
            "block_size": BLOCK_SIZE,
            "overwritten_run_bytes": RUN,
            "data": "incompressible (PCG64), no holes; files in the page cache (warm-up copy first)",
            "plan": asdict(plan),
            "scenario": scenario,
        },
        "pairs": [{"ours": o, "nbdkit": k, "ratio": round(r, 4)} for o, k, r in pairs],
        "ours_mb_per_s_median": median([o["mb_per_s"] for o, _k, _r in pairs]),
        "nbdkit_mb_per_s_median": median([k["mb_per_s"] for _o, k, _r in pairs]),
        "ours_server_cpu_seconds_median": median([o["server_cpu_seconds"] for o, _k, _r in pairs]),
        "nbdkit_server_cpu_seconds_median": median([k["server_cpu_seconds"] for _o, k, _r in pairs]),
        "ratio": round(ratio, 4),
        "ratio_of": "median over pairs of nbdkit seconds / our seconds (= our MB/s / nbdkit MB/s)",
        "target": {"metric": "ratio", "op": ">=", "limit": 0.9, "pass": ratio >= 0.9},
        "runtime_seconds": round(time.perf_counter() - t0, 1),
    }
    emit(doc, args.output)
    log(f"ratio {ratio:.3f} ({'pass' if ratio >= 0.9 else 'FAIL'}, target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

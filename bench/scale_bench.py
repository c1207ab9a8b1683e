"""Benchmark of one standby under many volumes: 16 volumes from 8 primaries mirrored at once while fio
writes to every one of them, against `nbdkit file` exports under the same load, and 4 volumes from 2
primaries to see how the standby's memory grows with the volumes it holds.

Parties of every round, the order rotating each round:

- ours_16: one ``standby-daemon``, 8 ``standby-primary`` agents (sync mode, the default transport) with
  2 volumes each, all on loopback;
- nbdkit_16: one ``nbdkit file`` per volume (no mirroring: the machine's single-copy speed);
- ours_4: the same as ours_16 with 2 primaries (4 volumes), for the memory per volume.

The load: one fio process with one job per volume (``--ioengine=nbd``, each job its own connection),
``--rw=randwrite --bssplit=4k/50:64k/50 --iodepth=8`` for a fixed time, ``--end_fsync=1``; the volumes
start sparse on every party. Figures (ratios are medians over the rounds):

1. ``per_volume_throughput``: bytes fio wrote to each volume (its JSON's ``io_bytes``) and the bytes the
   standby applied to it over the run (``standby_applied_bytes_total{volume}``), MiB/s; the smallest
   volume's over the largest's (target >= 0.5: no volume starves).
2. ``aggregate_vs_nbdkit``: the volumes' sum, ours over nbdkit file (context: a mirror writes two
   copies, on the same disk here).
3. ``memory_per_volume``: the standby's RSS (``VmRSS``) idle (before any primary connects), with its
   volumes connected and after the load, (after - idle) / volumes for 4 and 16 volumes, and the
   marginal cost of the 12 more (target: the figure at 16 no more than 1.25 x the one at 4 plus 1 MiB;
   it must not grow with the count); each primary's RSS before and after the load.
4. ``cpu``: utime + stime (/proc) of the standby, of the primaries and of the nbdkit processes over the
   load, in cores and in CPU milliseconds per MiB written (cores per MiB/s, x 1000); fio's own; the
   mean bytes per batch the standby applied (``standby_applied_batches_total``).
5. ``correctness``: after the load every primary reports each volume connected, nothing to resync and
   nothing out of sync; each volume file's sha256 equals its replica's; the standby lists every volume;
   per volume, the primary's ``standby_written_bytes_total`` grew by exactly fio's bytes and the
   standby's applied bytes by at least as much; no data channel connection refused at a limit.
6. ``memory_after_full_sync`` (once, after the rounds): a fresh standby's RSS after the first full sync
   of 4 and of 16 volumes whose first 64 MiB are random (batches of up to 4 MiB, where the load's are
   small), per volume (target: the figure at 16 no more than 1.5 x the one at 4 plus 2 MiB), and every
   replica equal to its volume.

::

    .venv/bin/python bench/scale_bench.py --output bench/results/scale.json
    .venv/bin/python bench/scale_bench.py --quick      # 64 MiB volumes, 10 s runs, 1 round

The JSON document goes to stdout (and to ``--output``); progress goes to stderr. The exit status is 0
whether or not the targets are met, 1 when a part failed (its figure then holds the ``error``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    CpuMeter,
    Daemon,
    emit,
    free_port,
    header,
    log,
    machine,
    median,
    random_volume,
    rotated,
    sha256_file,
    start_nbdkit_file,
    start_standby,
    tool_version,
)
from daemons import primary_argv  # scripts/, put on the path by benchlib

MiB = 1 << 20
VOLUMES_PER_PRIMARY = 2
PRIMARIES = 8
SMALL_PRIMARIES = 2
IODEPTH = 8
BSSPLIT = "4k/50:64k/50"

Samples = dict[str, list[tuple[dict[str, str], float]]]  # one scrape: name -> [(labels, value)]

# targets
MIN_OVER_MAX = 0.5
MEMORY_SLACK = 1.25
MEMORY_SLACK_BYTES = MiB
SYNC_MEMORY_SLACK = 1.5  # the allocator keeps what a sync's 4 MiB batches used: noisier
SYNC_MEMORY_SLACK_BYTES = 2 * MiB
SYNC_DATA = 64 * MiB


# ---------------------------------------------------------------------------- processes and metrics


def rss(pid: int) -> int:
    """Resident set size of `pid` in bytes (``VmRSS`` of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def scrape(daemon: Daemon) -> Samples:
    """One scrape of a daemon's metrics: samples by name, each a list of (labels, value)."""
    url = f"http://{daemon.addresses['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def by_volume(samples: Samples, name: str) -> dict[str, float]:
    """Volume -> value of the series `name` labelled only by volume."""
    return {lab["volume"]: v for lab, v in samples.get(name, []) if set(lab) == {"volume"} and lab["volume"]}


def total(samples: Samples, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


# ---------------------------------------------------------------------------- fio


def fio_all(targets: dict[str, str], size: int, seconds: int, cwd: Path) -> dict[str, Any]:
    """One fio process, one job per volume (`targets`: volume -> NBD URI), all at once for `seconds`:
    per volume its bytes and MiB/s, and fio's own CPU seconds."""
    argv = [
        "fio", "--ioengine=nbd", "--rw=randwrite", f"--bssplit={BSSPLIT}", f"--iodepth={IODEPTH}",
        f"--size={size}", "--time_based", f"--runtime={seconds}", "--randrepeat=0", "--norandommap",
        "--end_fsync=1", "--output-format=json",
    ]  # fmt: skip
    for name, uri in targets.items():
        argv += [f"--name={name}", f"--uri={uri}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 600, cwd=cwd)
    jobs = json.loads(out.stdout[out.stdout.index("{") :])["jobs"]
    volumes: dict[str, dict[str, Any]] = {}
    cpu_s = 0.0
    for job in jobs:
        if job["error"]:
            raise RuntimeError(f"fio failed on {job['jobname']}: error {job['error']}")
        runtime = job["job_runtime"] / 1000
        volumes[job["jobname"]] = {
            "fio_bytes": int(job["write"]["io_bytes"]),
            "fio_mib_s": round(job["write"]["io_bytes"] / MiB / runtime, 2),
            "runtime_s": runtime,
        }
        cpu_s += (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime
    return {"volumes": volumes, "fio_cpu_s": round(cpu_s, 2)}


def spread(volumes: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The load's aggregate and how evenly it was served."""
    rates = [v["fio_mib_s"] for v in volumes.values()]
    written = sum(v["fio_bytes"] for v in volumes.values())
    return {
        "aggregate_mib_s": round(written / MiB / seconds, 1),
        "written_bytes": written,
        "min_mib_s": min(rates),
        "max_mib_s": max(rates),
        "min_over_max": round(min(rates) / max(rates), 3),
    }


# ---------------------------------------------------------------------------- ours


@dataclass
class Fleet:
    """One standby and `primaries` primaries with `VOLUMES_PER_PRIMARY` new sparse volumes each, the first
    `data` bytes of each random, all files in `work`."""

    work: Path
    primaries: int
    size: int
    data: int = 0
    standby: Daemon | None = None
    agents: list[Daemon] = field(default_factory=list)
    volumes: dict[str, tuple[int, Path]] = field(default_factory=dict)  # name -> (primary, file)

    def start(self) -> int:
        """Start the standby, then every primary at once; the standby's idle RSS (before any primary)."""
        (self.work / "primaries").mkdir(parents=True, exist_ok=True)
        self.standby = start_standby(self.work / "standby", "--preservation-capacity", "256MiB")
        time.sleep(1)  # let the daemon settle before reading its idle size
        idle = rss(self.standby.proc.pid)
        grpc = self.standby.addresses["grpc"]
        for i in range(self.primaries):
            specs = []
            for j in range(VOLUMES_PER_PRIMARY):
                name = f"p{i}v{j}"
                path = self.work / "primaries" / f"{name}.img"
                self.volumes[name] = (i, path)
                if self.data:
                    random_volume(path, self.size, self.data)
                specs.append(f"{name}={path},size={self.size}")
            log_path = self.work / f"primary-{i}.log"
            self.agents.append(Daemon(f"primary-{i}", primary_argv(specs, grpc), log_path, ready=False))
        for agent in self.agents:
            agent.wait_for("ready")
        self.wait_in_sync()
        return idle

    def uris(self) -> dict[str, str]:
        return {
            name: f"nbd://{self.agents[i].addresses['nbd']}/{name}" for name, (i, _) in self.volumes.items()
        }

    def pids(self) -> dict[str, int]:
        assert self.standby is not None
        primaries = {f"primary-{i}": a.proc.pid for i, a in enumerate(self.agents)}
        return {"standby": self.standby.proc.pid, **primaries}

    def in_sync(self) -> bool:
        for i, agent in enumerate(self.agents):
            m = scrape(agent)
            mine = [name for name, (p, _) in self.volumes.items() if p == i]
            connected = by_volume(m, "standby_replication_connected")
            remaining = by_volume(m, "standby_resync_remaining_bytes")
            dirty = by_volume(m, "standby_out_of_sync_bytes")
            if not all(connected.get(v) == 1 and remaining.get(v) == 0 and dirty.get(v) == 0 for v in mine):
                return False
        return True

    def wait_in_sync(self, timeout: float = 600) -> float:
        """Seconds until every primary reports each of its volumes connected and in sync."""
        t0 = time.perf_counter()
        while not self.in_sync():
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"the primaries did not get in sync within {timeout:g} s")
            time.sleep(0.1)
        return time.perf_counter() - t0

    def counters(self) -> tuple[dict[str, float], dict[str, float], Samples]:
        """Per volume: the primaries' written bytes and the standby's applied bytes; the standby's scrape."""
        assert self.standby is not None
        written: dict[str, float] = {}
        for agent in self.agents:
            written |= by_volume(scrape(agent), "standby_written_bytes_total")
        standby = scrape(self.standby)
        return written, by_volume(standby, "standby_applied_bytes_total"), standby

    def differing_replicas(self) -> list[str]:
        """The volumes whose replica differs from the volume file."""
        return [
            name
            for name, (_, path) in self.volumes.items()
            if sha256_file(path) != sha256_file(self.work / "standby" / "replicas" / f"{name}.img")
        ]

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
            agent.close()
        if self.standby is not None:
            self.standby.stop()
            self.standby.close()


def run_ours(work: Path, primaries: int, size: int, seconds: int) -> dict[str, Any]:
    """The load on a fresh fleet of `primaries` primaries, its figures and its checks."""
    fleet = Fleet(work, primaries, size)
    try:
        log(f"{primaries} primaries, {primaries * VOLUMES_PER_PRIMARY} volumes: starting")
        idle = fleet.start()
        assert fleet.standby is not None
        pids = fleet.pids()
        connected_rss = {label: rss(pid) for label, pid in pids.items()}
        written0, applied0, standby0 = fleet.counters()
        batches0 = by_volume(standby0, "standby_applied_batches_total")
        os.sync()
        meter = CpuMeter(pids, interval=2.0).start()
        try:
            load = fio_all(fleet.uris(), size, seconds, work)
        finally:
            cpu = meter.stop()
        loaded_rss = {label: rss(pid) for label, pid in pids.items()}
        sync_s = fleet.wait_in_sync()
        written1, applied1, standby_m = fleet.counters()
        batches1 = by_volume(standby_m, "standby_applied_batches_total")
        n = len(fleet.volumes)
        volumes = load["volumes"]
        runtime = max(v["runtime_s"] for v in volumes.values())
        bad: list[str] = []
        for name, (i, path) in fleet.volumes.items():
            v = volumes[name]
            v["primary"] = i
            v["primary_written_bytes"] = int(written1.get(name, 0) - written0.get(name, 0))
            v["applied_bytes"] = int(applied1.get(name, 0) - applied0.get(name, 0))
            v["applied_mib_s"] = round(v["applied_bytes"] / MiB / v["runtime_s"], 2)
            v["applied_batches"] = int(batches1.get(name, 0) - batches0.get(name, 0))
            v["bytes_per_batch"] = v["applied_bytes"] // max(v["applied_batches"], 1)
            v["replica_identical"] = sha256_file(path) == sha256_file(
                fleet.work / "standby" / "replicas" / f"{name}.img"
            )
            fio_bytes = v["fio_bytes"]
            if v["primary_written_bytes"] != fio_bytes:
                bad.append(
                    f"{name}: the primary counted {v['primary_written_bytes']} written, fio {fio_bytes}"
                )
            if v["applied_bytes"] < fio_bytes:
                bad.append(f"{name}: the standby applied {v['applied_bytes']}, fio wrote {fio_bytes}")
            if not v["replica_identical"]:
                bad.append(f"{name}: the replica differs from the volume")
        listed = sorted(by_volume(standby_m, "standby_volume_size_bytes"))
        if listed != sorted(fleet.volumes):
            bad.append(f"the standby lists {listed}, expected {sorted(fleet.volumes)}")
        limits = total(standby_m, "standby_limit_reached_total")
        if limits:
            bad.append(f"the standby refused work at a limit {limits:g} times")
        refusals = total(standby_m, "standby_replication_refusals_total")
        errors = [
            f"{d.name}: {e.get('event')}"
            for d in [fleet.standby, *fleet.agents]
            for e in d.events
            if e.get("level") in ("error", "critical")
        ]
        primaries_cpu = sum(c["cpu_s"] for label, c in cpu.items() if label != "standby")
        standby_cpu = cpu["standby"]["cpu_s"]
        written = sum(v["fio_bytes"] for v in volumes.values())
        result: dict[str, Any] = {
            "volumes_count": n,
            **spread(volumes, runtime),
            "seconds": runtime,
            "in_sync_after_s": round(sync_s, 2),
            "bytes_per_batch": sum(v["applied_bytes"] for v in volumes.values())
            // max(sum(v["applied_batches"] for v in volumes.values()), 1),
            "memory": {
                "standby_idle_bytes": idle,
                "standby_connected_bytes": connected_rss["standby"],
                "standby_after_load_bytes": loaded_rss["standby"],
                "standby_per_volume_connected_bytes": (connected_rss["standby"] - idle) // n,
                "standby_per_volume_after_load_bytes": (loaded_rss["standby"] - idle) // n,
                "primaries_connected_bytes": [connected_rss[f"primary-{i}"] for i in range(primaries)],
                "primaries_after_load_bytes": [loaded_rss[f"primary-{i}"] for i in range(primaries)],
            },
            "cpu": {
                "standby_s": round(standby_cpu, 2),
                "primaries_s": round(primaries_cpu, 2),
                "per_primary_s": [round(cpu[f"primary-{i}"]["cpu_s"], 2) for i in range(primaries)],
                "fio_s": load["fio_cpu_s"],
                "standby_cores": round(standby_cpu / runtime, 2),
                "primaries_cores": round(primaries_cpu / runtime, 2),
                "standby_ms_per_mib": round(standby_cpu * 1000 / (written / MiB), 2),
                "primaries_ms_per_mib": round(primaries_cpu * 1000 / (written / MiB), 2),
            },
            "checks": {
                "ok": not bad,
                "problems": bad,
                "standby_lists": len(listed),
                "limit_reached": limits,
                "refusals": refusals,
                "error_events": errors[:10],
            },
            "volumes": volumes,
        }
        log(
            f"ours {n} volumes: {result['aggregate_mib_s']} MiB/s, min/max {result['min_over_max']}, "
            f"standby {result['memory']['standby_per_volume_after_load_bytes'] / MiB:.2f} MiB per volume, "
            f"checks {bad or 'ok'}"
        )
        return result
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


def run_full_sync(work: Path, primaries: int, size: int, data: int) -> dict[str, Any]:
    """The standby's RSS before and after the first full sync of `primaries` x `VOLUMES_PER_PRIMARY`
    volumes whose first `data` bytes are random (the sync sends them in batches of up to 4 MiB)."""
    fleet = Fleet(work, primaries, size, data)
    try:
        log(f"full sync of {primaries * VOLUMES_PER_PRIMARY} volumes with {data // MiB} MiB of data each")
        t0 = time.perf_counter()
        idle = fleet.start()
        seconds = time.perf_counter() - t0
        assert fleet.standby is not None
        synced = rss(fleet.standby.proc.pid)
        n = len(fleet.volumes)
        differ = fleet.differing_replicas()
        result: dict[str, Any] = {
            "volumes_count": n,
            "standby_idle_bytes": idle,
            "standby_after_sync_bytes": synced,
            "standby_per_volume_bytes": (synced - idle) // n,
            "primaries_after_sync_bytes": [rss(a.proc.pid) for a in fleet.agents],
            "start_and_sync_s": round(seconds, 2),
            "replicas_differ": differ,
        }
        log(
            f"full sync of {n} volumes: standby {result['standby_per_volume_bytes'] / MiB:.2f} MiB per volume"
        )
        return result
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- the peer


def run_nbdkit(work: Path, volumes: int, size: int, seconds: int) -> dict[str, Any]:
    """The same load on `volumes` ``nbdkit file`` exports (one nbdkit per file) of `size` new sparse
    files."""
    work.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    uris: dict[str, str] = {}
    try:
        for k in range(volumes):
            name = f"p{k // VOLUMES_PER_PRIMARY}v{k % VOLUMES_PER_PRIMARY}"
            path = work / f"{name}.img"
            with open(path, "wb") as f:
                f.truncate(size)
            port = free_port()
            procs[name] = start_nbdkit_file(path, port)
            uris[name] = f"nbd://127.0.0.1:{port}"
        os.sync()
        meter = CpuMeter({name: p.pid for name, p in procs.items()}, interval=2.0).start()
        try:
            load = fio_all(uris, size, seconds, work)
        finally:
            cpu = meter.stop()
        runtime = max(v["runtime_s"] for v in load["volumes"].values())
        result: dict[str, Any] = {"volumes_count": volumes, **spread(load["volumes"], runtime)}
        nbdkit_cpu = sum(c["cpu_s"] for c in cpu.values())
        result["seconds"] = runtime
        result["cpu"] = {
            "nbdkit_s": round(nbdkit_cpu, 2),
            "fio_s": load["fio_cpu_s"],
            "nbdkit_cores": round(nbdkit_cpu / runtime, 2),
            "nbdkit_ms_per_mib": round(nbdkit_cpu * 1000 / (result["written_bytes"] / MiB), 2),
        }
        result["volumes"] = load["volumes"]
        log(f"nbdkit {volumes} volumes: {result['aggregate_mib_s']} MiB/s, min/max {result['min_over_max']}")
        return result
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- figures


def med(rounds: list[dict[str, Any]], who: str, get: Callable[[dict[str, Any]], float]) -> float:
    return round(median([get(r[who]) for r in rounds]), 3)


def figures_of(rounds: list[dict[str, Any]], seconds: int, size: int) -> list[dict[str, Any]]:
    big = f"ours_{PRIMARIES * VOLUMES_PER_PRIMARY}"
    small = f"ours_{SMALL_PRIMARIES * VOLUMES_PER_PRIMARY}"
    peer = f"nbdkit_{PRIMARIES * VOLUMES_PER_PRIMARY}"
    n_big, n_small = PRIMARIES * VOLUMES_PER_PRIMARY, SMALL_PRIMARIES * VOLUMES_PER_PRIMARY
    load = (
        f"fio randwrite bssplit={BSSPLIT} iodepth={IODEPTH} for {seconds} s on every volume at once "
        f"({size // MiB} MiB each)"
    )
    figures: list[dict[str, Any]] = []

    worst = min(r[big]["min_over_max"] for r in rounds)
    figures.append({
        "id": "per_volume_throughput",
        "what": f"{load}, {n_big} volumes from {PRIMARIES} primaries on one standby: MiB/s per volume "
        "(fio's bytes; the standby's applied bytes), smallest over largest",
        "unit": "MiB/s",
        "ours": med(rounds, big, lambda r: r["min_over_max"]),
        "worst_round": worst,
        "peer": med(rounds, peer, lambda r: r["min_over_max"]),
        "peer_name": "nbdkit file",
        "target": f"min / max >= {MIN_OVER_MAX} in every round",
        "met": worst >= MIN_OVER_MAX,
        "runs": [
            {
                "order": r["order"],
                "min_over_max": r[big]["min_over_max"],
                "fio_mib_s": {v: x["fio_mib_s"] for v, x in r[big]["volumes"].items()},
                "applied_mib_s": {v: x["applied_mib_s"] for v, x in r[big]["volumes"].items()},
            }
            for r in rounds
        ],
    })  # fmt: skip

    figures.append({
        "id": "aggregate_vs_nbdkit",
        "what": f"{load}: the volumes' sum through the primaries (sync mode, mirrored to one standby) vs "
        f"{n_big} nbdkit file exports (one copy, no mirror); scaling: {n_big} volumes over {n_small}",
        "unit": "MiB/s",
        "ours": med(rounds, big, lambda r: r["aggregate_mib_s"]),
        "ours_4_volumes": med(rounds, small, lambda r: r["aggregate_mib_s"]),
        "peer": med(rounds, peer, lambda r: r["aggregate_mib_s"]),
        "peer_name": "nbdkit file",
        "ratio": round(median([r[f"ratio_{peer}"] for r in rounds]), 3),
        "scaling_16_over_4": round(median([r[f"ratio_{small}"] for r in rounds]), 3),
        "target": "context (a mirror writes two copies on this one disk)",
        "met": None,
        "runs": [
            {"order": r["order"], big: r[big]["aggregate_mib_s"], small: r[small]["aggregate_mib_s"],
             peer: r[peer]["aggregate_mib_s"], "ratio": r[f"ratio_{peer}"]}
            for r in rounds
        ],
    })  # fmt: skip

    per16 = median([r[big]["memory"]["standby_per_volume_after_load_bytes"] for r in rounds])
    per4 = median([r[small]["memory"]["standby_per_volume_after_load_bytes"] for r in rounds])
    marginal = median(
        [
            (r[big]["memory"]["standby_after_load_bytes"] - r[small]["memory"]["standby_after_load_bytes"])
            / (n_big - n_small)
            for r in rounds
        ]
    )
    figures.append({
        "id": "memory_per_volume",
        "what": "the standby's RSS after the load minus its idle RSS (before any primary), per volume, with "
        f"{n_small} and {n_big} volumes; marginal: (RSS with {n_big} - RSS with {n_small}) / "
        f"{n_big - n_small}; the primaries' RSS ({VOLUMES_PER_PRIMARY} volumes each)",
        "unit": "bytes",
        "standby_per_volume_16": int(per16),
        "standby_per_volume_4": int(per4),
        "standby_marginal_per_volume": int(marginal),
        "standby_idle": int(median([r[big]["memory"]["standby_idle_bytes"] for r in rounds])),
        "standby_16_connected": int(median([r[big]["memory"]["standby_connected_bytes"] for r in rounds])),
        "standby_16_after_load": int(median([r[big]["memory"]["standby_after_load_bytes"] for r in rounds])),
        "standby_4_after_load": int(median([r[small]["memory"]["standby_after_load_bytes"] for r in rounds])),
        "primary_connected_max": max(max(r[big]["memory"]["primaries_connected_bytes"]) for r in rounds),
        "primary_after_load_max": max(max(r[big]["memory"]["primaries_after_load_bytes"]) for r in rounds),
        "target": f"per volume at {n_big} <= {MEMORY_SLACK} x per volume at {n_small} + "
        f"{MEMORY_SLACK_BYTES // MiB} MiB",
        "met": per16 <= MEMORY_SLACK * per4 + MEMORY_SLACK_BYTES,
        "runs": [{"order": r["order"], big: r[big]["memory"], small: r[small]["memory"]} for r in rounds],
    })  # fmt: skip

    figures.append({
        "id": "cpu",
        "what": f"utime+stime (/proc) over the load of {n_big} volumes: cores used (CPU s / s) and CPU ms "
        f"per MiB written (= cores per MiB/s x 1000), the standby, the {PRIMARIES} primaries together, "
        f"nbdkit's; fio's own CPU seconds; the mean bytes per batch the standby applied ({n_big} and "
        f"{n_small} volumes)",
        "unit": "ms per MiB",
        "standby_ms_per_mib": med(rounds, big, lambda r: r["cpu"]["standby_ms_per_mib"]),
        "primaries_ms_per_mib": med(rounds, big, lambda r: r["cpu"]["primaries_ms_per_mib"]),
        "standby_cores": med(rounds, big, lambda r: r["cpu"]["standby_cores"]),
        "primaries_cores": med(rounds, big, lambda r: r["cpu"]["primaries_cores"]),
        "nbdkit_ms_per_mib": med(rounds, peer, lambda r: r["cpu"]["nbdkit_ms_per_mib"]),
        "nbdkit_cores": med(rounds, peer, lambda r: r["cpu"]["nbdkit_cores"]),
        "standby_ms_per_mib_4_volumes": med(rounds, small, lambda r: r["cpu"]["standby_ms_per_mib"]),
        "primaries_ms_per_mib_4_volumes": med(rounds, small, lambda r: r["cpu"]["primaries_ms_per_mib"]),
        "bytes_per_batch": int(med(rounds, big, lambda r: r["bytes_per_batch"])),
        "bytes_per_batch_4_volumes": int(med(rounds, small, lambda r: r["bytes_per_batch"])),
        "runs": [
            {"order": r["order"], big: r[big]["cpu"], small: r[small]["cpu"], peer: r[peer]["cpu"]}
            for r in rounds
        ],
    })  # fmt: skip

    ok = all(r[who]["checks"]["ok"] for r in rounds for who in (big, small))
    figures.append({
        "id": "correctness",
        "what": "after each load: every volume connected and in sync, equal to its replica (sha256), listed "
        "by the standby; per volume the primary's written bytes = fio's and the standby's applied bytes >= "
        "fio's; no limit reached",
        "target": "every check passes",
        "met": ok,
        "runs": [
            {"order": r["order"], big: r[big]["checks"], small: r[small]["checks"],
             "in_sync_after_s": {big: r[big]["in_sync_after_s"], small: r[small]["in_sync_after_s"]}}
            for r in rounds
        ],
    })  # fmt: skip
    return figures


def full_sync_figure(small: dict[str, Any], big: dict[str, Any], data: int) -> dict[str, Any]:
    per4, per16 = small["standby_per_volume_bytes"], big["standby_per_volume_bytes"]
    n_small, n_big = small["volumes_count"], big["volumes_count"]
    return {
        "id": "memory_after_full_sync",
        "what": f"the standby's RSS after the first full sync of {n_small} and {n_big} volumes holding "
        f"{data // MiB} MiB of random data each, minus its idle RSS, per volume (one run each)",
        "unit": "bytes",
        f"standby_per_volume_{n_big}": per16,
        f"standby_per_volume_{n_small}": per4,
        "standby_marginal_per_volume": (big["standby_after_sync_bytes"] - small["standby_after_sync_bytes"])
        // (n_big - n_small),
        "target": f"per volume at {n_big} <= {SYNC_MEMORY_SLACK} x per volume at {n_small} + "
        f"{SYNC_MEMORY_SLACK_BYTES // MiB} MiB; every replica equals its volume",
        "met": per16 <= SYNC_MEMORY_SLACK * per4 + SYNC_MEMORY_SLACK_BYTES
        and not small["replicas_differ"]
        and not big["replicas_differ"],
        "runs": {f"ours_{n_small}": small, f"ours_{n_big}": big},
    }


# ---------------------------------------------------------------------------- main


def error_text(e: BaseException) -> str:
    """One line for the JSON document: a command's name, not its whole argument list."""
    if isinstance(e, subprocess.TimeoutExpired):
        return f"{Path(str(e.cmd[0])).name} timed out after {e.timeout:g} s"
    if isinstance(e, subprocess.CalledProcessError):
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr or "")
        last = err.strip().splitlines()[-1:] or [""]
        return f"{Path(str(e.cmd[0])).name} exited with {e.returncode}: {last[0]}"
    return str(e)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the JSON document to this file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 64 MiB volumes, 10 s, 1 round")
    parser.add_argument("--rounds", type=int, help="rounds of the three parties (default 2, quick 1)")
    parser.add_argument("--seconds", type=int, help="seconds of each load (default 30, quick 10)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    args = parser.parse_args()
    started = time.monotonic()
    size = (64 if args.quick else 256) * MiB
    rounds = args.rounds or (1 if args.quick else 2)
    seconds = args.seconds or (10 if args.quick else 30)
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    work = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.dir or "/var/tmp"))
    n_big, n_small = PRIMARIES * VOLUMES_PER_PRIMARY, SMALL_PRIMARIES * VOLUMES_PER_PRIMARY
    runs = 0

    def party(kind: str, primaries: int) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            nonlocal runs
            runs += 1
            where = work / f"{runs:02d}-{kind}"
            if kind == "nbdkit":
                return run_nbdkit(where, primaries * VOLUMES_PER_PRIMARY, size, seconds)
            return run_ours(where, primaries, size, seconds)

        return go

    runners = {
        f"ours_{n_big}": party("ours", PRIMARIES),
        f"nbdkit_{n_big}": party("nbdkit", PRIMARIES),
        f"ours_{n_small}": party("ours", SMALL_PRIMARIES),
    }
    figures: list[dict[str, Any]] = []
    failed = False
    try:
        results = rotated("scale", rounds, runners, "aggregate_mib_s", True, ours=f"ours_{n_big}")
        figures = figures_of(results, seconds, size)
        synced = {
            n: run_full_sync(work / f"sync-{n}", n, size, SYNC_DATA) for n in (SMALL_PRIMARIES, PRIMARIES)
        }
        figures.append(full_sync_figure(synced[SMALL_PRIMARIES], synced[PRIMARIES], SYNC_DATA))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log(f"failed: {error_text(e)}")
        figures.append({"id": "scale", "error": error_text(e), "met": False})
        failed = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("scale", work),
        "settings": {
            "volume_bytes": size,
            "primaries": PRIMARIES,
            "volumes_per_primary": VOLUMES_PER_PRIMARY,
            "small_primaries": SMALL_PRIMARIES,
            "seconds": seconds,
            "rounds": rounds,
            "fio": f"--rw=randwrite --bssplit={BSSPLIT} --iodepth={IODEPTH} --end_fsync=1, a job per volume",
            "mode": "sync",
            "quick": args.quick,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine(
            fio=tool_version(["fio", "--version"]), nbdkit=tool_version(["nbdkit", "--version"])
        ),
        "figures": figures,
    }
    emit(doc, args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of mirrored writes through the primary against `nbdkit file` and the C mirror (a measuring
stick: a mirroring nbdkit plugin in C), same client (fio's nbd engine), same run, and of resync after an
outage.

Parties of every timed round, the order rotating each round (ours first, then nbdkit first, ...):

- ours: ``standby-primary`` (sync mode) mirroring to ``standby-daemon``, both on loopback;
- nbdkit: ``nbdkit file`` on a file of the same size (no mirroring: the machine's single-copy speed);
- c_mirror (with ``--c-mirror DIR``, the folder holding ``mirrorplugin.c`` and ``sink.c``): the plugin,
  built with gcc into the work directory, writes locally and forwards each write to the sink over TCP,
  answering after the sink's acknowledgement (see ``bench/c_mirror.py``). Without the folder, or without
  nbdkit's plugin header (Debian: nbdkit-plugin-dev), the figures against it are null, with the reason.

All files are in one work directory (one filesystem). Every target first takes one untimed sequential
pass, so timed passes overwrite allocated blocks; dirty pages are synced (untimed) before every timed run.
Figures (each: ``ours``, ``peer``, ``ratio`` (above 1: ours did better), ``target``, ``met``, ``pairs``
and the rounds in ``runs``; ratios are medians of the per-round ratios):

1. ``sequential_1m_writes_sync_vs_nbdkit`` / ``_vs_c_mirror``: ``fio --rw=write --bs=1M --iodepth=8
   --end_fsync=1`` over the whole volume: MB/s (targets >= 0.4 / >= 1.0).
2. ``random_4k_writes_sync_vs_nbdkit`` / ``_vs_c_mirror``: ``fio --rw=randwrite --bs=4k --iodepth=32``
   for a fixed time: IOPS (targets >= 0.4 / >= 1.0).
3. ``cpu_per_mirrored_4k_write``: over the runs of 2., utime + stime (from /proc) of the primary and of
   the standby / writes done, in microseconds (target: primary <= 60, standby <= 25), with the C mirror's
   (nbdkit + sink) as the peer, and per thread (``/proc/PID/task/TID``, names from ``comm``).
4. ``sync_latency_4k_iodepth1``: ``fio --rw=randwrite --bs=4k --iodepth=1``: latency p50 and p99 (fio's
   ``lat``, submission to completion), ours vs nbdkit vs the C mirror (target: our p50 <= 0.35 ms).
5. ``random_4k_reads_vs_nbdkit``: ``fio --rw=randread --bs=4k --iodepth=32`` through the primary vs
   nbdkit file: IOPS (target >= 0.8).
6. ``write_latency_by_mode``: p50/p99 of 4.'s job in the received and async modes (one run each; sync's
   from 4.): the modes must differ measurably.
7. ``resync``: the standby is stopped, the same set of 4 KiB writes (spread over the first GiB) is made
   through the primary of a 1 GiB and of an 8 GiB sparse volume, the standby restarted; the bytes
   resent / (dirty regions x granularity) (target <= 1.1) and resync times, as the primary logs them in
   its ``resync_sent`` event (8 GiB / 1 GiB: flat).

``--transport auto|channel|grpc`` is passed to the primary when ``standby-primary --help`` lists it, and
the standby gets ``--data-listen 127.0.0.1:0`` when ``standby-daemon --help`` lists that::

    .venv/bin/python bench/replication_bench.py --output bench/results/replication.json --c-mirror DIR
    .venv/bin/python bench/replication_bench.py --quick      # 256 MiB, 3 rounds, 3 s runs

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
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import c_mirror
from benchlib import (
    BIN,
    CpuMeter,
    Daemon,
    emit,
    free_port,
    header,
    help_lists,
    log,
    machine,
    median,
    rotated,
    sha256_file,
    start_nbdkit_file,
    start_primary,
    start_standby,
    tool_version,
)

MiB = 1 << 20
GiB = 1 << 30
GRANULARITY = 64 * 1024

# targets
SEQ_VS_NBDKIT = 0.4
RAND_VS_NBDKIT = 0.4
VS_C_MIRROR = 1.0
CPU_PRIMARY_US = 60.0
CPU_STANDBY_US = 25.0
SYNC_P50_MS = 0.35
READS_VS_NBDKIT = 0.8

Job = Callable[[str], dict[str, Any]]


def rmedian(values: list[float]) -> float:
    return round(median(values), 3)


# ---------------------------------------------------------------------------- fio


def fio(uri: str, *args: str, direction: str = "write", timeout: float = 900) -> dict[str, Any]:
    """One fio job on `uri`. Latencies are fio's ``lat`` (submission to completion): with the nbd engine
    the submission itself sends the request and often reads the reply, so ``clat`` alone understates."""
    argv = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--output-format=json"]
    argv += ["--lat_percentiles=1", *args]
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio failed on {uri}: error {job['error']}")
    side = job[direction]
    lat = side.get("lat_ns", {}).get("percentile", {})
    return {
        "seconds": round(seconds, 3),
        "mb_per_s": round(side["bw_bytes"] / 1e6, 1),
        "iops": round(side["iops"], 1),
        "ios": int(side["total_ios"]),
        "lat_p50_ms": round(lat.get("50.000000", 0) / 1e6, 3),
        "lat_p99_ms": round(lat.get("99.000000", 0) / 1e6, 3),
    }


def seq_write(uri: str, size: int) -> dict[str, Any]:
    return fio(uri, "--rw=write", "--bs=1M", f"--size={size}", "--iodepth=8", "--end_fsync=1")


def rand_write(uri: str, size: int, seconds: int, iodepth: int) -> dict[str, Any]:
    return fio(
        uri, "--rw=randwrite", "--bs=4k", f"--size={size}", f"--iodepth={iodepth}", "--time_based",
        f"--runtime={seconds}", "--randrepeat=0", "--norandommap", timeout=seconds + 300,
    )  # fmt: skip


def rand_read(uri: str, size: int, seconds: int, iodepth: int) -> dict[str, Any]:
    return fio(
        uri, "--rw=randread", "--bs=4k", f"--size={size}", f"--iodepth={iodepth}", "--time_based",
        f"--runtime={seconds}", "--randrepeat=0", "--norandommap", direction="read", timeout=seconds + 300,
    )  # fmt: skip


# ---------------------------------------------------------------------------- the daemons


@dataclass(frozen=True)
class Launch:
    """Flags of this revision's daemons: `--transport` and `--data-listen` where they exist."""

    primary_extra: tuple[str, ...]
    standby_extra: tuple[str, ...]
    info: dict[str, Any]


def launch_options(transport: str) -> Launch:
    primary_has = help_lists([str(BIN / "standby-primary")], "--transport")
    standby_has = help_lists([str(BIN / "standby-daemon")], "--data-listen")
    if not primary_has and transport != "auto":
        log(f"standby-primary has no --transport: --transport {transport} not passed (gRPC stream)")
    return Launch(
        primary_extra=("--transport", transport) if primary_has else (),
        standby_extra=("--data-listen", "127.0.0.1:0") if standby_has else (),
        info={
            "requested": transport,
            "primary_has_transport": primary_has,
            "standby_has_data_listen": standby_has,
            "primary_args": ["--transport", transport] if primary_has else [],
            "standby_args": ["--data-listen", "127.0.0.1:0"] if standby_has else [],
        },
    )


def logged_transport(daemon: Daemon) -> str | None:
    """The last ``transport`` a daemon's JSON log lines named, if any."""
    named = [e["transport"] for e in daemon.events if isinstance(e.get("transport"), str)]
    return named[-1] if named else None


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
    """A standby and a primary (one volume), nbdkit file on a file of the same size, and the C mirror
    when it was built; all files in `work`."""

    def __init__(self, work: Path, size: int, launch: Launch, built: c_mirror.Build | None) -> None:
        self.work, self.size, self.launch = work, size, launch
        work.mkdir(parents=True, exist_ok=True)
        self.standby = start_standby(
            work / "standby", "--preservation-capacity", "1GiB", *launch.standby_extra
        )
        self.primary = self.start_primary("sync")
        peer_path = work / "nbdkit.img"
        with open(peer_path, "wb") as f:
            f.truncate(size)
        self.port = free_port()
        self.nbdkit = start_nbdkit_file(peer_path, self.port)
        self.cmirror = c_mirror.CMirror(built, work / "c-mirror", size) if built else None

    def start_primary(self, mode: str) -> Daemon:
        primary = start_primary(
            [f"vol0={self.work / 'primary.img'},size={self.size}"],
            self.standby.addresses["grpc"],
            self.work / f"primary-{mode}.log",
            "--mode",
            mode,
            *self.launch.primary_extra,
        )
        wait_in_sync(primary)
        return primary

    @property
    def uri(self) -> str:
        return f"nbd://{self.primary.addresses['nbd']}/vol0"

    def targets(self) -> dict[str, tuple[str, dict[str, int]]]:
        """Party -> (NBD URI, its processes by label)."""
        out = {
            "ours": (self.uri, {"primary": self.primary.proc.pid, "standby": self.standby.proc.pid}),
            "nbdkit": (f"nbd://127.0.0.1:{self.port}", {"nbdkit": self.nbdkit.pid}),
        }
        if self.cmirror is not None:
            out["c_mirror"] = (self.cmirror.uri, self.cmirror.pids)
        return out

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
        if self.cmirror is not None:
            self.cmirror.stop()


def timed(rig: Rig, who: str, job: Job) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`job` on `who`'s URI after syncing dirty pages, with the CPU time of `who`'s processes: the
    result (with ``cpu_us_per_io`` per process and in total) and the meter's detail."""
    uri, pids = rig.targets()[who]
    os.sync()
    meter = CpuMeter(pids).start()
    try:
        result = job(uri)
    finally:
        cpu = meter.stop()
    ios = max(result["ios"], 1)
    per_io = {label: round(c["cpu_s"] / ios * 1e6, 1) for label, c in cpu.items()}
    per_io["total"] = round(sum(c["cpu_s"] for c in cpu.values()) / ios * 1e6, 1)
    result["cpu_us_per_io"] = per_io
    return result, cpu


class ThreadTally:
    """CPU per thread over several runs of ours, per write: pre-existing threads by TID, threads started
    during a run (connections) together by name; with where each waited in the kernel (wchan)."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.waits: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        self.unsampled: dict[str, float] = defaultdict(float)
        self.total: dict[str, float] = defaultdict(float)
        self.ios = 0

    def add(self, cpu: dict[str, dict[str, Any]], ios: int) -> None:
        self.ios += ios
        for label, c in cpu.items():
            self.total[label] += c["cpu_s"]
            self.unsampled[label] += c["unsampled_s"]
            for t in c["threads"]:
                if t["new"]:
                    name = f"{t['name']} (started during the run)"
                else:
                    name = f"{t['name']} [{t['tid']}{', main' if t['main'] else ''}]"
                self.cpu[(label, name)] += t["cpu_s"]
                for wait, share in t["waits"].items():
                    self.waits[(label, name)][wait] += share * t["cpu_s"]

    def report(self) -> dict[str, Any]:
        ios = max(self.ios, 1)
        out: dict[str, Any] = {}
        for label in self.total:
            rows = sorted(((n, s) for (lab, n), s in self.cpu.items() if lab == label), key=lambda r: -r[1])
            out[label] = {
                "us_per_write": round(self.total[label] / ios * 1e6, 1),
                "threads": [
                    {
                        "thread": n,
                        "us_per_write": round(s / ios * 1e6, 1),
                        "waits": [w for w, _ in self.waits[(label, n)].most_common(2)],
                    }
                    for n, s in rows
                    if s / ios * 1e6 >= 0.5
                ],
                "other_threads_us_per_write": round(
                    sum(s for n, s in rows if s / ios * 1e6 < 0.5) / ios * 1e6, 1
                ),
                "exited_threads_after_last_sample_us_per_write": round(self.unsampled[label] / ios * 1e6, 1),
            }
        return out


# ---------------------------------------------------------------------------- figures


def versus(rounds: list[dict[str, Any]], peer: str, key: str) -> dict[str, Any]:
    """Ours against one peer over `rounds` (from `rotated`): medians and the rounds, compactly."""
    runs = [
        {"order": r["order"], "ours": r["ours"][key], "peer": r[peer][key], "ratio": r[f"ratio_{peer}"]}
        for r in rounds
    ]
    return {
        "ours": rmedian([r["ours"] for r in runs]),
        "peer": rmedian([r["peer"] for r in runs]),
        "ratio": rmedian([r["ratio"] for r in runs]),
        "pairs": len(runs),
        "runs": runs,
    }


def figure(
    fid: str,
    what: str,
    unit: str,
    peer_name: str,
    target: str,
    data: dict[str, Any] | None,
    met: bool | None,
    absent: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One figure; `data` None means the peer is absent (``peer``, ``ratio`` and ``met`` null)."""
    doc: dict[str, Any] = {"id": fid, "what": what, "unit": unit, "peer_name": peer_name}
    if data is None:
        doc.update(ours=None, peer=None, ratio=None, target=target, met=None, pairs=0, absent=absent)
    else:
        doc.update(
            ours=data["ours"],
            peer=data["peer"],
            ratio=data["ratio"],
            target=target,
            met=met,
            pairs=data["pairs"],
            **extra,
            runs=data["runs"],
        )
    return doc


def throughput_figures(
    work: Path, size: int, pairs: int, seconds: int, launch: Launch, built: c_mirror.Build | None, absent: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rig = Rig(work, size, launch, built)
    c = rig.cmirror is not None
    notes: dict[str, Any] = {"primary_logged_transport": logged_transport(rig.primary)}
    try:
        log("untimed first pass on each target")
        for uri, _ in rig.targets().values():
            seq_write(uri, size)

        def runners(
            job: Job, each: Callable[[str, dict[str, Any], Any], None] | None = None
        ) -> dict[str, Callable[[], dict[str, Any]]]:
            def run(who: str) -> Callable[[], dict[str, Any]]:
                def go() -> dict[str, Any]:
                    result, cpu = timed(rig, who, job)
                    if each is not None:
                        each(who, result, cpu)
                    return result

                return go

            return {who: run(who) for who in rig.targets()}

        figures: list[dict[str, Any]] = []
        mb = f"{size // MiB} MiB"

        def against_peers(
            rounds: list[dict[str, Any]], fid: str, what: str, unit: str, key: str, nbdkit_target: float
        ) -> list[dict[str, Any]]:
            """The figures of `rounds` against nbdkit file and the C mirror, each with whether the
            replicas equal their volumes after the rounds."""
            identical = rig.replica_identical()
            c_identical = rig.cmirror.replica_identical() if rig.cmirror is not None else None
            data = versus(rounds, "nbdkit", key)
            data_c = versus(rounds, "c_mirror", key) if c else None
            met_c = data_c is not None and data_c["ratio"] >= VS_C_MIRROR and identical
            return [
                figure(
                    f"{fid}_vs_nbdkit",
                    f"{what} vs nbdkit file",
                    unit,
                    "nbdkit file",
                    f">= {nbdkit_target}",
                    data,
                    data["ratio"] >= nbdkit_target and identical,
                    replica_identical=identical,
                ),
                figure(
                    f"{fid}_vs_c_mirror",
                    f"{what} vs the C mirror (sync)",
                    unit,
                    "c_mirror",
                    f">= {VS_C_MIRROR}",
                    data_c,
                    met_c,
                    absent,
                    replica_identical=identical,
                    c_mirror_replica_identical=c_identical,
                ),
            ]

        # 1. sequential 1 MiB writes
        seq = rotated("seq 1M", pairs, runners(lambda uri: seq_write(uri, size)), "mb_per_s", True)
        what = f"fio seq write bs=1M iodepth=8 end_fsync=1, {mb}, through the primary (sync, standby local)"
        figures += against_peers(seq, "sequential_1m_writes_sync", what, "MB/s", "mb_per_s", SEQ_VS_NBDKIT)

        # 2. random 4 KiB writes, iodepth 32, with the CPU time of every party
        tally = ThreadTally()

        def record(who: str, result: dict[str, Any], cpu: dict[str, dict[str, Any]]) -> None:
            if who == "ours":
                tally.add(cpu, result["ios"])

        job: Job = lambda uri: rand_write(uri, size, seconds, 32)  # noqa: E731
        rnd = rotated("rand 4k", pairs, runners(job, record), "iops", True)
        what = f"fio randwrite bs=4k iodepth=32 for {seconds} s over {mb}: IOPS through the primary (sync)"
        figures += against_peers(rnd, "random_4k_writes_sync", what, "IOPS", "iops", RAND_VS_NBDKIT)
        figures.append(cpu_figure(rnd, tally, seconds, mb, absent))

        # 4. sync latency at iodepth 1
        lat = rotated(
            "latency 4k qd1",
            pairs,
            runners(lambda uri: rand_write(uri, size, seconds, 1)),
            "lat_p50_ms",
            False,
        )
        figures.append(latency_figure(lat, seconds, absent))

        # 5. random 4 KiB reads through the primary
        read_job: Job = lambda uri: rand_read(uri, size, seconds, 32)  # noqa: E731
        two = {k: v for k, v in runners(read_job).items() if k != "c_mirror"}
        reads = rotated("rand read 4k", pairs, two, "iops", True)
        data = versus(reads, "nbdkit", "iops")
        figures.append(
            figure(
                "random_4k_reads_vs_nbdkit",
                f"fio randread bs=4k iodepth=32 for {seconds} s over {mb}: IOPS "
                "through the primary (sync mode, standby connected) vs nbdkit file",
                "IOPS",
                "nbdkit file",
                f">= {READS_VS_NBDKIT}",
                data,
                data["ratio"] >= READS_VS_NBDKIT,
            )
        )

        # 6. the other modes
        modes: dict[str, Any] = {
            "sync": {k: rmedian([r["ours"][k] for r in lat]) for k in ("lat_p50_ms", "lat_p99_ms")},
            "nbdkit": {k: rmedian([r["nbdkit"][k] for r in lat]) for k in ("lat_p50_ms", "lat_p99_ms")},
        }
        for mode in ("received", "async"):
            rig.primary.stop()
            rig.primary = rig.start_primary(mode)
            result, _ = timed(rig, "ours", lambda uri: rand_write(uri, size, seconds, 1))
            modes[mode] = {k: result[k] for k in ("lat_p50_ms", "lat_p99_ms")}
            log(f"latency {mode}: p50 {result['lat_p50_ms']} ms, p99 {result['lat_p99_ms']} ms")
        figures.append(
            {
                "id": "write_latency_by_mode",
                "what": f"fio randwrite bs=4k iodepth=1 for {seconds} s: latency (fio lat) per mode "
                "(sync and nbdkit: medians of sync_latency_4k_iodepth1; received, async: one run each)",
                "modes": modes,
                "target": "the modes differ measurably (sync p50 > async p50)",
                "met": modes["sync"]["lat_p50_ms"] > modes["async"]["lat_p50_ms"],
            }
        )
        return figures, notes
    finally:
        rig.stop()


def cpu_figure(
    rnd: list[dict[str, Any]], tally: ThreadTally, seconds: int, mb: str, absent: str
) -> dict[str, Any]:
    primary = rmedian([r["ours"]["cpu_us_per_io"]["primary"] for r in rnd])
    standby = rmedian([r["ours"]["cpu_us_per_io"]["standby"] for r in rnd])
    runs = []
    for r in rnd:
        run: dict[str, Any] = {"order": r["order"], "ours": r["ours"]["cpu_us_per_io"]}
        run["nbdkit_file"] = r["nbdkit"]["cpu_us_per_io"]["total"]
        if "c_mirror" in r:
            run["peer"] = r["c_mirror"]["cpu_us_per_io"]
            run["ratio"] = round(
                r["c_mirror"]["cpu_us_per_io"]["total"] / r["ours"]["cpu_us_per_io"]["total"], 3
            )
        runs.append(run)
    c = "c_mirror" in rnd[0]
    return {
        "id": "cpu_per_mirrored_4k_write",
        "what": "utime+stime from /proc of each process over each timed run of random_4k_writes_sync "
        f"({seconds} s, {mb}, iodepth 32) / writes done, microseconds; peer: the C mirror (nbdkit plugin + "
        "sink); ratio: peer / ours (above 1: ours uses less)",
        "unit": "us per write",
        "peer_name": "c_mirror",
        "ours": rmedian([r["ours"]["cpu_us_per_io"]["total"] for r in rnd]),
        "ours_primary": primary,
        "ours_standby": standby,
        "peer": rmedian([r["c_mirror"]["cpu_us_per_io"]["total"] for r in rnd]) if c else None,
        "peer_by_process": {
            k: rmedian([r["c_mirror"]["cpu_us_per_io"][k] for r in rnd]) for k in ("nbdkit-mirror", "sink")
        }
        if c
        else None,
        "nbdkit_file": rmedian([r["nbdkit"]["cpu_us_per_io"]["total"] for r in rnd]),
        "ratio": rmedian([run["ratio"] for run in runs]) if c else None,
        "absent": None if c else absent,
        "target": f"primary <= {CPU_PRIMARY_US:g} + standby <= {CPU_STANDBY_US:g}",
        "met": primary <= CPU_PRIMARY_US and standby <= CPU_STANDBY_US,
        "pairs": len(rnd),
        "per_thread": tally.report(),
        "runs": runs,
    }


def latency_figure(lat: list[dict[str, Any]], seconds: int, absent: str) -> dict[str, Any]:
    def med(who: str, key: str) -> float:
        return rmedian([r[who][key] for r in lat])

    c = "c_mirror" in lat[0]
    p50 = med("ours", "lat_p50_ms")
    runs = []
    for r in lat:
        run: dict[str, Any] = {"order": r["order"]}
        for who in ("ours", "nbdkit", "c_mirror"):
            if who in r:
                run[who] = [r[who]["lat_p50_ms"], r[who]["lat_p99_ms"]]
        run["ratio"] = r["ratio_nbdkit"]
        if c:
            run["ratio_c_mirror"] = r["ratio_c_mirror"]
        runs.append(run)
    return {
        "id": "sync_latency_4k_iodepth1",
        "what": f"fio randwrite bs=4k iodepth=1 for {seconds} s: latency p50 (fio lat: submission to "
        "completion; runs: [p50, p99]) through the primary (sync) vs nbdkit file vs the C mirror (sync); "
        "ratio: peer p50 / our p50",
        "unit": "ms",
        "peer_name": "nbdkit file",
        "ours": p50,
        "ours_p99": med("ours", "lat_p99_ms"),
        "peer": med("nbdkit", "lat_p50_ms"),
        "peer_p99": med("nbdkit", "lat_p99_ms"),
        "ratio": rmedian([r["ratio_nbdkit"] for r in lat]),
        "c_mirror": {
            "p50": med("c_mirror", "lat_p50_ms"),
            "p99": med("c_mirror", "lat_p99_ms"),
            "ratio": rmedian([r["ratio_c_mirror"] for r in lat]),
        }
        if c
        else None,
        "absent": None if c else absent,
        "target": f"ours p50 <= {SYNC_P50_MS} ms",
        "met": p50 <= SYNC_P50_MS,
        "pairs": len(lat),
        "runs": runs,
    }


# ---------------------------------------------------------------------------- resync


def resync_once(work: Path, size: int, writes: int, launch: Launch) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    standby = start_standby(work / "standby", "--preservation-capacity", "64MiB", *launch.standby_extra)
    primary = start_primary(
        [f"vol0={work / 'primary.img'},size={size}"], standby.addresses["grpc"], work / "p.log",
        *launch.primary_extra,
    )  # fmt: skip
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
        uri = f"nbd://{primary.addresses['nbd']}/vol0"
        try:
            subprocess.run([*args, uri], check=True, capture_output=True, timeout=300)
        except subprocess.TimeoutExpired:
            errors = [line for line in primary.tail(200).splitlines() if "Error" in line]
            raise RuntimeError(
                f"{writes} writes through the primary with the standby down did not complete in 300 s"
                + (f" (primary log: {errors[-1].strip()})" if errors else "")
            ) from None
        dirty = scrape(primary, "standby_out_of_sync_bytes")
        before = scrape(primary, "standby_resync_bytes_total")
        # Same gRPC address: the primary reconnects by itself.
        logged_before = len(primary.logged("resync_sent"))
        standby = start_standby(
            work / "standby",
            "--preservation-capacity",
            "64MiB",
            *launch.standby_extra,
            "--listen",
            grpc_address,
        )
        # The primary reconnects by itself (backoff up to 10 s); time from its reconnection.
        while scrape(primary, "standby_replication_connected") != 1:
            time.sleep(0.02)
        after_connected = wait_in_sync(primary)
        sent = scrape(primary, "standby_resync_bytes_total") - before
        # The primary reports `connected` once the resync is applied, so the wait above is no measure
        # of it: the duration is the primary's own, from its `resync_sent` event.
        logged = [e["seconds"] for e in primary.logged("resync_sent")[logged_before:]]
        seconds = logged[-1] if logged else after_connected
        identical = sha256_file(work / "primary.img") == sha256_file(
            work / "standby" / "replicas" / "vol0.img"
        )
        return {
            "volume_bytes": size,
            "dirty_bytes": dirty,
            "resent_bytes": sent,
            "seconds": round(seconds, 3),
            "seconds_from": "the primary's resync_sent event" if logged else "reconnection",
            "replica_identical": identical,
        }
    finally:
        primary.stop()
        standby.stop()


def resync_figure(work: Path, writes: int, launch: Launch) -> dict[str, Any]:
    small = resync_once(work / "1g", GiB, writes, launch)
    large = resync_once(work / "8g", 8 * GiB, writes, launch)
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
        "met": ratio <= 1.1 and small["replica_identical"] and large["replica_identical"] and flat < 2.0,
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
    parser.add_argument("--quick", action="store_true", help="a smoke run: 256 MiB, 3 rounds, 3 s runs")
    parser.add_argument("--pairs", type=int, help="timed rounds (default 5, quick 3)")
    parser.add_argument("--seconds", type=int, help="seconds of each time-based run (default 8, quick 3)")
    parser.add_argument("--dir", help="work directory (default: under /var/tmp)")
    parser.add_argument("--only", help="comma-separated: throughput, resync (default: both)")
    parser.add_argument(
        "--transport", choices=("auto", "channel", "grpc"), default="auto",
        help="the primary's data transport, passed when standby-primary has --transport (default: auto)",
    )  # fmt: skip
    parser.add_argument(
        "--c-mirror", metavar="DIR", type=Path,
        help="folder holding the C mirror's mirrorplugin.c and sink.c: built and run as a third party",
    )  # fmt: skip
    args = parser.parse_args()
    started = time.monotonic()
    size = (256 if args.quick else 1024) * MiB
    pairs = args.pairs or (3 if args.quick else 5)
    seconds = args.seconds or (3 if args.quick else 8)
    only = set(args.only.split(",")) if args.only else {"throughput", "resync"}
    for tool in ("fio", "nbdkit", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/install-debian-tools.sh (make test does)")
    launch = launch_options(args.transport)
    work = Path(tempfile.mkdtemp(prefix="replication-bench-", dir=args.dir or "/var/tmp"))
    built: c_mirror.Build | None = None
    absent = "not requested (--c-mirror DIR)"
    figures: list[dict[str, Any]] = []
    notes: dict[str, Any] = {}
    failed = False
    try:
        if args.c_mirror is not None and "throughput" in only:
            try:
                built = c_mirror.build(args.c_mirror, work / "c-mirror-build")
                log("built the C mirror")
            except c_mirror.Unavailable as e:
                absent = str(e)
                log(f"the C mirror is absent: {absent}")
        if "throughput" in only:
            try:
                found, notes = throughput_figures(
                    work / "throughput", size, pairs, seconds, launch, built, absent
                )
                figures += found
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                log(f"throughput failed: {error_text(e)}")
                figures.append({"id": "throughput", "error": error_text(e), "met": False})
                failed = True
        if "resync" in only:
            try:
                figures.append(resync_figure(work / "resync", 256 if args.quick else 1024, launch))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                log(f"resync failed: {error_text(e)}")
                figures.append({"id": "resync", "error": error_text(e), "met": False})
                failed = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        **header("replication", work),
        "settings": {"volume_bytes": size, "rounds": pairs, "seconds": seconds, "quick": args.quick},
        "transport": {**launch.info, **notes},
        "c_mirror": c_mirror.describe(built, absent),
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

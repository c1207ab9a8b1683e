"""What the benchmarks share: provenance (revision, machine), JSON rendering, starting the daemons.

Each benchmark measures our component and its peer in the same run, alternating them, and reports the
median of the pairwise ratios, because this machine is shared and absolute times drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the daemons' launcher, shared with the demo and the tests

from daemons import BIN, Daemon, start_primary, start_standby  # noqa: E402

__all__ = ["BIN", "Daemon", "start_primary", "start_standby"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def filesystem_of(path: str) -> str:
    """Filesystem type of the mount holding `path`, from /proc/mounts."""
    path = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                mnt = fields[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def source_revision() -> str:
    """Commit of the checkout being measured, with ``-dirty`` when it has local changes."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def machine(**extra: Any) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


def to_json(doc: dict[str, Any]) -> str:
    """Indented JSON, with each list of numbers on one line."""
    flat = re.compile(r"\[([^\[\]{}\"]*)\]")
    return flat.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", json.dumps(doc, indent=2))


def header(benchmark: str, work: Path) -> dict[str, Any]:
    """The fields every benchmark document starts with: its name, the date, the source revision and
    the filesystem `work` (the benchmark's work directory) is on."""
    return {
        "benchmark": benchmark,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "revision": source_revision(),
        "filesystem": filesystem_of(str(work.parent)),
    }


def emit(doc: dict[str, Any], output: str | None) -> None:
    """The benchmark's JSON document to stdout, and to `output` when given."""
    text = to_json(doc)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")


def text_and_random_volume(path: Path, size: int, data: int) -> None:
    """A sparse `size`-byte volume file holding `data` bytes in 16 MiB extents spread evenly (every other
    extent when `data` is half the size), each half random bytes and half repeated text (moderately
    compressible); holes elsewhere. The same bytes on every call."""
    extent = 16 << 20
    rng = random.Random(5)
    text = b"".join(
        f"block {i} of the protected volume, written by the benchmark\n".encode() for i in range(20000)
    )
    stride = max(2 * extent, size // max(data // extent, 1) // extent * extent)
    with open(path, "wb") as f:
        f.truncate(size)
        written = 0
        for offset in range(0, size, stride):
            if written >= data:
                break
            f.seek(offset)
            for piece in range(0, extent, 1 << 20):
                half = text[piece % len(text) :][: 1 << 19].ljust(1 << 19, b".")
                f.write(rng.randbytes(1 << 19) + half)
            written += extent


def random_volume(path: Path, size: int, data: int) -> None:
    """A sparse `size`-byte volume file whose first `data` bytes are random (incompressible)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(data // (64 << 20)):
            f.write(os.urandom(64 << 20))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def start_nbdkit_file(path: Path, port: int) -> subprocess.Popen[bytes]:
    """`nbdkit file PATH` on 127.0.0.1:PORT in the foreground (so it can be stopped)."""
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("nbdkit did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def paired(
    label: str, pairs: int, ours: Any, peer: Any, key: str, higher_is_better: bool, peer_name: str = "nbdkit"
) -> dict[str, Any]:
    """`pairs` runs of `ours()` and `peer()` (each a dict holding `key`), alternating which goes first;
    the median of the pairwise ratios, ours over the peer's (inverted when lower is better)."""
    runs: list[dict[str, Any]] = []
    for i in range(pairs):
        order = ("ours", peer_name) if i % 2 == 0 else (peer_name, "ours")
        pair: dict[str, Any] = {}
        for who in order:
            pair[who] = ours() if who == "ours" else peer()
        a, b = pair["ours"][key], pair[peer_name][key]
        pair["ratio"] = round(a / b if higher_is_better else b / a, 3)
        log(f"{label} pair {i + 1}/{pairs}: ours {a} {key}, {peer_name} {b} {key}")
        runs.append(pair)
    return {
        f"ours_{key}": median([r["ours"][key] for r in runs]),
        f"{peer_name}_{key}": median([r[peer_name][key] for r in runs]),
        "ratio": round(median([r["ratio"] for r in runs]), 3),
        "pairs": runs,
    }


# ---------------------------------------------------------------------------- peers, flags, CPU time


def start_nbdkit(port: int, *plugin_args: str) -> subprocess.Popen[bytes]:
    """`nbdkit PLUGIN [KEY=VALUE...]` on 127.0.0.1:PORT in the foreground, once it accepts connections."""
    import socket

    proc = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *plugin_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nbdkit {plugin_args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"nbdkit {plugin_args[0]} did not start")


def help_lists(argv: Sequence[str], option: str) -> bool:
    """Whether `argv --help` lists `option` (for flags a program gains in a later revision)."""
    try:
        out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(rf"(^|[\s\[,]){re.escape(option)}([\s=\],]|$)", out.stdout, re.MULTILINE) is not None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(stat_path: str) -> int | None:
    """utime + stime of a /proc/.../stat file, in clock ticks (None when the task is gone)."""
    try:
        with open(stat_path) as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # fields from the 3rd on; the name may hold spaces
    return int(fields[11]) + int(fields[12])


def _thread_file(pid: int, tid: int, name: str) -> str:
    """/proc/PID/task/TID/NAME stripped ("?" when the thread is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


class CpuMeter:
    """CPU time (utime + stime, from /proc) of named processes over a timed run, in total and per thread.

    `start()` reads every process and its threads; a sampler then re-reads the threads every `interval`
    seconds, so a thread that exits before `stop()` (a connection's thread) is counted up to its last
    sample. The process totals are exact (the kernel keeps exited threads' time in the process's stat);
    per thread, ``unsampled_s`` is the total's remainder (exited threads since their last sample). Each
    sample also notes where each thread waits in the kernel (``wchan``; ``running`` when it is on a CPU,
    ``wait_woken`` a socket read, ``futex_do_wait`` a lock or condition, Python's interpreter lock
    included), which tells apart threads that share a name."""

    def __init__(self, processes: dict[str, int], interval: float = 0.25) -> None:
        self.processes = processes
        self.interval = interval
        self._total0: dict[str, int] = {}
        self._first: dict[tuple[str, int], int] = {}
        self._last: dict[tuple[str, int], int] = {}
        self._names: dict[tuple[str, int], str] = {}
        self._waits: dict[tuple[str, int], Counter[str]] = defaultdict(Counter)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def _sample(self, first: bool) -> None:
        for label, pid in self.processes.items():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                ticks = _cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
                if ticks is None:
                    continue
                key = (label, tid)
                if key not in self._names:
                    self._names[key] = _thread_file(pid, tid, "comm")
                    if first:
                        self._first[key] = ticks
                self._last[key] = ticks
                wchan = _thread_file(pid, tid, "wchan")
                self._waits[key]["running" if wchan == "0" else wchan] += 1

    def start(self) -> CpuMeter:
        for label, pid in self.processes.items():
            self._total0[label] = _cpu_ticks(f"/proc/{pid}/stat") or 0
        self._sample(first=True)
        self._sampler = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._sampler.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(first=False)

    def stop(self) -> dict[str, dict[str, Any]]:
        """Per process: ``cpu_s`` and ``threads`` [{tid, name, main, new, cpu_s, waits}] (threads that used
        CPU; ``waits``: the kernel functions it was seen waiting in, by share of the samples)."""
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        self._sample(first=False)
        out: dict[str, dict[str, Any]] = {}
        for label, pid in self.processes.items():
            total = ((_cpu_ticks(f"/proc/{pid}/stat") or 0) - self._total0.get(label, 0)) / CLOCK_TICKS
            threads: list[dict[str, Any]] = []
            for (who, tid), ticks in self._last.items():
                if who != label:
                    continue
                used = (ticks - self._first.get((who, tid), 0)) / CLOCK_TICKS
                if used > 0:
                    waits = self._waits[(who, tid)]
                    samples = sum(waits.values())
                    threads.append({
                        "tid": tid,
                        "name": self._names[(who, tid)],
                        "main": tid == pid,
                        "new": (who, tid) not in self._first,
                        "cpu_s": used,
                        "waits": {w: round(n / samples, 2) for w, n in waits.most_common(2)},
                    })  # fmt: skip
            threads.sort(key=lambda t: -float(t["cpu_s"]))
            seen = sum(float(t["cpu_s"]) for t in threads)
            out[label] = {"cpu_s": total, "threads": threads, "unsampled_s": round(max(total - seen, 0.0), 3)}
        return out


def rotated(
    label: str,
    rounds: int,
    runners: dict[str, Callable[[], dict[str, Any]]],
    key: str,
    higher_is_better: bool,
    ours: str = "ours",
) -> list[dict[str, Any]]:
    """`rounds` rounds in which each of `runners` runs once (each returns a dict holding `key`), the
    order rotating every round, so each party runs first, middle and last in turn. Each round is
    ``{"order": [...], NAME: result, ..., "ratio_" + PEER: ours relative to PEER}``, the ratio being ours
    over the peer's (the peer's over ours when lower is better): above 1, ours did better."""
    parties = list(runners)
    out: list[dict[str, Any]] = []
    for i in range(rounds):
        k = i % len(parties)
        order = parties[k:] + parties[:k]
        result: dict[str, Any] = {"order": order}
        for who in order:
            result[who] = runners[who]()
        mine = result[ours][key]
        for who in parties:
            if who != ours:
                theirs = result[who][key]
                ratio = mine / theirs if higher_is_better else theirs / mine
                result[f"ratio_{who}"] = round(ratio, 3)
        values = ", ".join(f"{who} {result[who][key]}" for who in parties)
        log(f"{label} round {i + 1}/{rounds} ({key}): {values}")
        out.append(result)
    return out

"""What the benchmarks share: provenance (revision, machine), JSON rendering, and running the daemons.

Each benchmark measures our component and its peer in the same run, alternating them, and reports the
median of the pairwise ratios, because this machine is shared and absolute times drift.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from standbylib.runtime.launch import Daemon, start_primary, start_standby

__all__ = ["Daemon", "start_primary", "start_standby"]

ROOT = Path(__file__).resolve().parent.parent


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

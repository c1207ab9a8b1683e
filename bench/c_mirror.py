"""The C mirror, a measuring stick for mirrored writes: an nbdkit plugin (``mirrorplugin.c``) that writes
each request to a local file and forwards it over one TCP connection to a sink (``sink.c``), which applies
it and acknowledges; in sync mode (``wait=1``) the NBD reply waits for the acknowledgement. It is not
part of the product: it shows what this machine allows for the same job, in the same run as our primary.

The benchmark is given the folder holding the two sources (``--c-mirror DIR``); they are built with gcc
into a temporary directory, which needs nbdkit's plugin header (Debian: nbdkit-plugin-dev)::

    gcc -O2 -fPIC -shared -o mirrorplugin.so mirrorplugin.c -lpthread
    gcc -O2 -o sink sink.c

and run as::

    sink PORT2 s.img                                   # prints "ready" when listening
    nbdkit -f -i 127.0.0.1 -p PORT mirrorplugin.so file=m.img standby=PORT2 wait=1
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import free_port, sha256_file, start_nbdkit

SOURCES = ("mirrorplugin.c", "sink.c")


class Unavailable(Exception):
    """The C mirror cannot be built here (the reason is the message)."""


@dataclass(frozen=True)
class Build:
    plugin: Path
    sink: Path
    sources_sha256: dict[str, str]
    gcc: str


def _gcc(args: list[str]) -> None:
    out = subprocess.run(["gcc", *args], capture_output=True, text=True)
    if out.returncode != 0:
        first = next((line for line in out.stderr.splitlines() if "error" in line), out.stderr.strip())
        if "nbdkit-plugin.h" in out.stderr:
            raise Unavailable("nbdkit's plugin header is missing (Debian: apt-get install nbdkit-plugin-dev)")
        raise Unavailable(f"gcc failed: {first}")


def build(src: Path, out: Path) -> Build:
    """Build the plugin and the sink from `src` into `out`; `Unavailable` if that cannot be done here."""
    missing = [name for name in SOURCES if not (src / name).is_file()]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not found in the --c-mirror folder")
    for tool in ("gcc", "nbdkit"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is missing")
    out.mkdir(parents=True, exist_ok=True)
    plugin, sink = out / "mirrorplugin.so", out / "sink"
    _gcc(["-O2", "-fPIC", "-shared", "-o", str(plugin), str(src / "mirrorplugin.c"), "-lpthread"])
    _gcc(["-O2", "-o", str(sink), str(src / "sink.c")])
    version = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()
    return Build(
        plugin=plugin,
        sink=sink,
        sources_sha256={name: sha256_file(src / name) for name in SOURCES},
        gcc=version[0] if version else "unknown",
    )


class CMirror:
    """The sink and the mirroring nbdkit on two files of `size` bytes in `work` (sync: ``wait=1``)."""

    def __init__(self, built: Build, work: Path, size: int) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.local, self.replica = work / "c-mirror-local.img", work / "c-mirror-replica.img"
        for path in (self.local, self.replica):
            with open(path, "wb") as f:
                f.truncate(size)
        sink_port = free_port()
        self.sink = subprocess.Popen(
            [str(built.sink), str(sink_port), str(self.replica)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.sink.stdout is not None
        if self.sink.stdout.readline().strip() != "ready":
            self.sink.kill()
            self.sink.wait()
            raise RuntimeError("the C mirror's sink did not start")
        self.port = free_port()
        try:
            self.nbdkit = start_nbdkit(
                self.port, str(built.plugin), f"file={self.local}", f"standby={sink_port}", "wait=1"
            )
        except RuntimeError:
            self.sink.kill()
            self.sink.wait()
            raise

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}"

    @property
    def pids(self) -> dict[str, int]:
        return {"nbdkit-mirror": self.nbdkit.pid, "sink": self.sink.pid}

    def replica_identical(self) -> bool:
        """The sink's file holds the local file's bytes (every write is applied before it is answered)."""
        return sha256_file(self.local) == sha256_file(self.replica)

    def stop(self) -> None:
        for proc in (self.nbdkit, self.sink):
            proc.terminate()
        for proc in (self.nbdkit, self.sink):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.sink.stdout is not None:
            self.sink.stdout.close()


def describe(built: Build | None, reason: str | None) -> dict[str, Any]:
    """The JSON description of the measuring stick of a run (sources by hash, not by path)."""
    if built is None:
        return {"present": False, "reason": reason}
    return {
        "present": True,
        "mode": "sync (wait=1)",
        "sources_sha256": built.sources_sha256,
        "gcc": built.gcc,
        "build": "gcc -O2 -fPIC -shared mirrorplugin.c -lpthread; gcc -O2 sink.c",
    }

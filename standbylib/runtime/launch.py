"""Start the appliance's daemons as processes and learn where they listen (for the demo and benchmarks).

A daemon logs a JSON line ``{"event": "listening", "service": ..., "address": "H:P"}`` for every
listener and ``{"event": "ready"}`` once started; `Daemon` waits for the latter, so callers can bind
port 0 everywhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


class DaemonFailed(RuntimeError):
    pass


class Daemon:
    """`argv` started with its stderr in `log_path`; ready when it logged ``ready``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, *, timeout: float = 60.0) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log)
        self.addresses: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                self._log.close()
                raise DaemonFailed(f"{name} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise DaemonFailed(f"{name} not ready after {timeout} s:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _ready(self) -> bool:
        ready = False
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                self.addresses[event["service"]] = event["address"]
            ready = ready or event.get("event") == "ready"
        return ready

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 30 s; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def standby_argv(data_dir: Path, *extra: str) -> list[str]:
    """The command line of `standby-daemon` on `data_dir`: every listener on a free loopback port (the
    ``listening`` events tell which), JSON logs, then `extra`. The demo, the benchmarks and the tests
    all start the daemon with it."""
    return [
        str(BIN / "standby-daemon"),
        "--data-dir", str(data_dir),
        "--listen", "127.0.0.1:0",
        "--data-listen", "127.0.0.1:0",
        "--nbd-listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0",
        "--log-format", "json",
        *extra,
    ]  # fmt: skip


def primary_argv(volumes: list[str], standby: str, *extra: str) -> list[str]:
    """The command line of `standby-primary` for `volumes` (``NAME=PATH,...`` specs) mirroring to
    `standby`: listeners on free loopback ports, JSON logs, then `extra`."""
    argv = [str(BIN / "standby-primary"), "--standby", standby]
    for v in volumes:
        argv += ["--volume", v]
    argv += ["--nbd-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"]
    return [*argv, *extra]


def start_standby(data_dir: Path, *extra: str, log_path: Path | None = None) -> Daemon:
    """`standby-daemon` on `data_dir` (`standby_argv`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
    return Daemon("standby-daemon", standby_argv(data_dir, *extra), log_path)


def start_primary(volumes: list[str], standby: str, log_path: Path, *extra: str) -> Daemon:
    """`standby-primary` for `volumes`, mirroring to `standby` (`primary_argv`)."""
    return Daemon("standby-primary", primary_argv(volumes, standby, *extra), log_path)

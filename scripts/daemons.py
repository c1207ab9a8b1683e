"""Start the appliance's daemons as processes and follow what they log (the demo, benchmarks and tests).

One launcher for everything that starts a daemon outside systemd: `make demo` (scripts/demo.py), the
benchmarks (bench/) and the end-to-end, fuzz and deployment tests (their ``pytest.ini_options``
``pythonpath`` names this folder). It is not part of the installed appliance.

A daemon logs one JSON line per event on stderr: ``{"event": "listening", "service": ..., "address":
"H:P"}`` for every listener and ``{"event": "ready"}`` once started. `Daemon` reads them as they come
(a thread per daemon), keeps them in order, and copies every line to its log file, so callers can bind
port 0 everywhere, wait for an event instead of sleeping, and read the log after the daemon is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

BIN = Path(sys.executable).parent  # the console scripts of the environment this runs in
START_TIMEOUT = 60.0  # the machine may be shared and busy: generous, and never a measurement
STOP_TIMEOUT = 30.0


class DaemonFailed(RuntimeError):
    """A daemon exited, or did not log what was waited for in time; the message has its log's tail."""


class Daemon:
    """`argv` started in its own process group, its stderr read line by line into `events`.

    With `ready` (the default) the constructor returns once the daemon logged ``ready`` and raises
    `DaemonFailed` when it exits or takes longer than `START_TIMEOUT`.
    """

    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, cwd: Path | None = None, ready: bool = True
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[str] = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the reader)
        self._log.write(f"# {shlex.join(argv)}\n")
        self._log.flush()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a leftover child can be found and ended
            cwd=cwd,
        )
        self.pgid = self.proc.pid
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()
        if ready:
            try:
                self.wait_for("ready")
            except DaemonFailed:
                self.stop()
                self.close()
                raise

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._log.write(line + "\n")
            self._log.flush()
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            with self._cond:
                self.lines.append(line)
                if isinstance(obj, dict):
                    self.events.append(obj)
                self._cond.notify_all()
        self.proc.stderr.close()
        with self._cond:
            self._cond.notify_all()

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Every event named `event` logged so far whose fields include `fields`, oldest first."""
        with self._cond:
            return [e for e in self.events if e.get("event") == event and _has(e, fields)]

    def wait_for(self, event: str, timeout: float = START_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The first event named `event` whose fields include `fields`; `DaemonFailed` if the daemon
        exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if ev.get("event") == event and _has(ev, fields):
                        return ev
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise DaemonFailed(
                        self._failure(f"exited with {self.proc.returncode} before logging", event, fields)
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonFailed(self._failure(f"did not within {timeout:.0f} s log", event, fields))
                self._cond.wait(min(left, 0.5))

    def _failure(self, what: str, event: str, fields: dict[str, Any]) -> str:
        lines = "\n".join(self.lines[-40:])
        command = shlex.join(self.argv)
        return f"{self.name} {what} {event!r} {fields or ''}\ncommand: {command}\nlog tail:\n{lines}"

    @property
    def addresses(self) -> dict[str, str]:
        """Service name -> ``H:P``, from the ``listening`` events logged so far."""
        return {e["service"]: e["address"] for e in self.logged("listening")}

    def address(self, service: str) -> str:
        """Where `service` listens (waits for its ``listening`` event)."""
        addr = self.wait_for("listening", service=service).get("address")
        if not isinstance(addr, str) or int(addr.rsplit(":", 1)[1]) == 0:
            raise DaemonFailed(f"{self.name}: the listening event of {service} has no port: {addr!r}")
        return addr

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; the exit status, or None when it had to be killed (after SIGUSR1, which
        makes the appliance's programs write every thread's stack to their log: what it hung on)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(1)
                self.kill()
                return None
        self._reader.join(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to its whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def leftovers(self) -> bool:
        """True when some process of its group is still there (it is then killed)."""
        try:
            os.killpg(self.pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        os.killpg(self.pgid, signal.SIGKILL)
        return True

    def close(self) -> None:
        """Close the log file once the reader has seen the end of stderr."""
        self._reader.join(5)
        if not self._reader.is_alive() and not self._log.closed:
            self._log.close()


def _has(event: dict[str, Any], fields: dict[str, Any]) -> bool:
    return all(event.get(k) == v for k, v in fields.items())


def standby_argv(data_dir: Path, *extra: str) -> list[str]:
    """The command line of `standby-daemon` on `data_dir`: every listener on a free loopback port (the
    ``listening`` events tell which), JSON logs, then `extra`."""
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
    """`standby-daemon` on `data_dir` (`standby_argv`), started and ready; its log beside `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir.parent / f"{data_dir.name}.log"
    return Daemon("standby-daemon", standby_argv(data_dir, *extra), log_path)


def start_primary(volumes: list[str], standby: str, log_path: Path, *extra: str) -> Daemon:
    """`standby-primary` for `volumes`, mirroring to `standby` (`primary_argv`), started and ready."""
    return Daemon("standby-primary", primary_argv(volumes, standby, *extra), log_path)

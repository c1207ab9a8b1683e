"""Support of the deployment tests: the files under deploy/, the tools that check them, the daemons.

A test that needs a tool fails (never skips) when the tool is missing, naming its Debian package;
`make test` installs them (scripts/install-debian-tools.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import BIN, Daemon, DaemonFailed, primary_argv, standby_argv
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
SYSTEMD_DIR = DEPLOY / "systemd"
CONFIG_DIR = DEPLOY / "config"
HARDENED_EXEC = Path(__file__).resolve().parent / "deploy_hardened_exec.py"

# command -> Debian package
TOOLS = {
    "promtool": "prometheus",
    "prometheus": "prometheus",
    "systemd-analyze": "systemd",
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "nbdcopy": "libnbd-bin",
    "nbdinfo": "libnbd-bin",
    "openssl": "openssl",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ip": "iproute2",
}


def need(tool: str) -> str:
    """The tool's path; fails (never skips) when it is missing."""
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin", "/usr/bin"]:
        p = os.path.join(d, tool)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    pytest.fail(
        f"{tool} is missing: install the Debian package {TOOLS.get(tool, '?')} "
        "(`make system-deps`, scripts/install-debian-tools.sh)",
        pytrace=False,
    )


def run(
    *argv: str | os.PathLike[str], timeout: float = 60, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a program (with `env` over this process's environment); fail with its output if it fails."""
    args = [os.fspath(a) for a in argv]
    full_env = {**os.environ, **env} if env else None
    cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, env=full_env)
    if check and cp.returncode != 0:
        pytest.fail(
            f"`{shlex.join(args)}` exited {cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}",
            pytrace=False,
        )
    return cp


def directives(name: str) -> dict[str, list[str]]:
    """KEY -> its values, in order (a key may repeat), from the text of the unit `name` in deploy/systemd."""
    return unit_directives((SYSTEMD_DIR / name).read_text())


def unit_directives(text: str) -> dict[str, list[str]]:
    """KEY -> its values, in order, of the unit file `text` (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------ alert rules


def alert_names(rules_text: str) -> list[str]:
    """The alerts of a rules file, in order (`- alert: NAME` lines)."""
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", rules_text, re.MULTILINE)


def alert_cases(tests_text: str) -> list[tuple[str, bool]]:
    """(alertname, fires) for every alert_rule_test of a promtool test file: `fires` is False for
    `exp_alerts: []` (the convention of deploy/prometheus/alerts_test.yml), True for a list of alerts."""
    cases = []
    for block in re.split(r"^\s*- eval_time:", tests_text, flags=re.MULTILINE)[1:]:
        name = re.search(r"^\s*alertname:\s*(\S+)\s*$", block, re.MULTILINE)
        exp = re.search(r"^\s*exp_alerts:(.*)$", block, re.MULTILINE)
        assert name and exp, f"alert_rule_test without alertname or exp_alerts:\n{block}"
        rest = exp.group(1).strip()
        assert rest in ("[]", ""), f"write exp_alerts as `[]` or as a list:\n{block}"
        cases.append((name.group(1), rest == ""))
    return cases


def metric_names_in(rules_text: str) -> set[str]:
    """The standby_* metric names the rules' expressions use."""
    exprs = re.findall(r"^\s*expr:(.*(?:\n\s{10,}.*)*)", rules_text, re.MULTILINE)
    return {m for e in exprs for m in re.findall(r"\bstandby_[a-z0-9_]+", e)}


# ------------------------------------------------------------------------------------------ metrics


def scrape(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One scrape of http://ADDRESS/metrics: samples by name, labels without empty values (as
    Prometheus stores them)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        return parse_metrics(r.read().decode())


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if v != ""}
            out.setdefault(s.name, []).append((labels, s.value))
    return out


def series_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# ------------------------------------------------------------------------------------------ prometheus


class Prometheus:
    """The real Prometheus server on a loopback port, its TSDB in a temporary directory."""

    def __init__(self, config: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        argv = [
            need("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.wait(lambda: self._ready(), "ready", 60)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait(self, check: Any, what: str, timeout: float = 30) -> Any:
        """Until `check()` returns something true; fails with the server's log after `timeout`."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.tail()}", pytrace=False)
            last = check()
            if last:
                return last
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus: not {what} within {timeout} s\nlog:\n{self.tail()}", pytrace=False)
            time.sleep(0.25)

    def tail(self) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------------------ daemons


class Daemons:
    """The appliance's daemons of one test (scripts/daemons.py), all stopped at the end."""

    def __init__(self, tmp: Path, wrapper: list[str] | None = None) -> None:
        self.tmp = tmp
        self.wrapper = wrapper or []
        self.started: list[Daemon] = []

    def start(self, name: str, argv: list[str]) -> Daemon:
        try:
            d = Daemon(name, [*self.wrapper, *argv], self.tmp / f"{name}.log")
        except DaemonFailed as e:
            pytest.fail(str(e), pytrace=False)
        self.started.append(d)
        return d

    def standby(self, data_dir: Path, *extra: str) -> Daemon:
        data_dir.mkdir(parents=True, exist_ok=True)
        return self.start("standby-daemon", standby_argv(data_dir, *extra))

    def primary(self, volumes: list[str], standby: str, *extra: str) -> Daemon:
        return self.start("standby-primary", primary_argv(volumes, standby, *extra))

    def stop(self, d: Daemon) -> None:
        rc = d.stop()
        assert rc == 0, f"{d.name} exited with {rc} on SIGTERM, expected 0\n{d.tail()}"

    def finish(self) -> None:
        codes = [(d, d.stop()) for d in reversed(self.started)]
        bad = [f"{d.name} exited with {rc} on SIGTERM, expected 0\n{d.tail()}" for d, rc in codes if rc != 0]
        if bad:
            pytest.fail("\n".join(bad), pytrace=False)


@contextlib.contextmanager
def daemons(tmp: Path, wrapper: list[str] | None = None) -> Iterator[Daemons]:
    ds = Daemons(tmp, wrapper)
    try:
        yield ds
    finally:
        ds.finish()


def wait_in_sync(metrics_address: str, volume: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(metrics_address)
        values = {
            name: next((v for lab, v in m.get(name, []) if lab == {"volume": volume}), None)
            for name in ("standby_replication_connected", "standby_out_of_sync_bytes")
        }
        if values == {"standby_replication_connected": 1.0, "standby_out_of_sync_bytes": 0.0}:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"the primary did not get {volume} in sync within {timeout} s: {values}", pytrace=False
            )
        time.sleep(0.1)


def ctl(standby_grpc: str, *args: str) -> str:
    return run(BIN / "standbyctl", "--standby", standby_grpc, *args).stdout


def qemu_write(nbd: str, volume: str, *commands: str) -> None:
    argv = [need("qemu-io"), "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    cp = run(*argv, f"nbd://{nbd}/{volume}")
    assert "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr

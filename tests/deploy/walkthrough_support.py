"""The simulated site of the administrator's walk-through (test_walkthrough.py).

Three hosts on loopback addresses, one file tree standing for their root directories, and the commands
of the documents run as written: a documented path (/etc/standby, /opt/standby, /var/lib/...) becomes
the same path under the site's root, a host name of the documents (A, B, 192.0.2.10, standby.example)
its loopback address. `systemctl` is played by the site: it starts a unit's ExecStart as the service
would, after creating its StateDirectory, and stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemons import Daemon, DaemonFailed
from deploy_support import unit_directives

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"

# The hosts of the documents and their addresses here: B runs the standby daemon, A the primary agent,
# C the backup node.
B, A, C = "127.0.10.2", "127.0.10.3", "127.0.10.4"
HOSTS = {"B": B, "A": A}
NAMES = {"192.0.2.10": B, "192.0.2.20": A, "standby.example": B, "primary.example": A}
# The first word of a command in a documented block; other lines of a block are what it prints.
PROGRAMS = (
    "standbyctl", "standby-backup", "standby-daemon", "standby-primary", "systemctl", "python3",
    "install", "export", "nbdinfo", "nbdcopy", "qemu-img", "tar", "ssh", "promtool",
)  # fmt: skip
# Documented directories, longest first (/var/lib/standby-primary before /var/lib/standby).
ROOTED = (
    "/etc/standby", "/etc/systemd/system", "/etc/prometheus", "/opt/standby", "/var/lib/standby-backup",
    "/var/lib/standby-primary", "/var/lib/standby", "/var/lib/node_exporter", "/srv/", "/backup/",
)  # fmt: skip


def doc_block(doc: str, after: str, nth: int = 0) -> str:
    """The `nth` fenced block that follows the text `after` in docs/`doc` (or README.md)."""
    path = REPO / doc if doc == "README.md" else DOCS / doc
    text = path.read_text()
    assert after in text, f"{doc} no longer says {after!r}: the walk-through follows it"
    rest = text.split(after, 1)[1]
    blocks = re.findall(r"^ *```[a-z]*\n(.*?)^ *```", rest, re.MULTILINE | re.DOTALL)
    assert len(blocks) > nth, f"{doc}: no block {nth} after {after!r}"
    return "\n".join(line.strip() for line in blocks[nth].splitlines())


@dataclass
class Step:
    command: str
    prints: list[str] = field(default_factory=list)


def steps(block: str) -> list[Step]:
    """A documented block as commands (continuation lines joined), each with the lines the document
    shows it printing."""
    out: list[Step] = []
    for line in block.replace("\\\n", " ").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line.split()[0] in PROGRAMS:
            out.append(Step(line))
        else:
            assert out, f"output before any command in:\n{block}"
            out[-1].prints.append(line)
    return out


def shown(text: str, documented: str) -> bool:
    """Whether `text` has a line like the documented one, where a size (1.0 MiB), a count or a time stamp
    may differ."""
    fuzzy = re.escape(documented)
    fuzzy = re.sub(r"\d+(?:\\\.\d+)?\\ (?:B|KiB|MiB|GiB)", r"[0-9.]+ (?:B|KiB|MiB|GiB)", fuzzy)
    fuzzy = re.sub(r"\d{8}T\d{6}Z", r"\\d{8}T\\d{6}Z", fuzzy)
    fuzzy = re.sub(r"(?<![\w.\\-])\d+(?=\\ snapshots)", r"\\d+", fuzzy)
    return any(re.fullmatch(fuzzy, line.strip()) for line in text.splitlines())


class Site:
    """The deployment under `root`: files, the administrator's shell, the services."""

    def __init__(self, root: Path, wrapper: list[str] | None = None) -> None:
        self.root = root
        # Every command and service runs through it (nsenter into a network namespace, say).
        self.wrapper = wrapper or []
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        # What every host has before the administrator starts.
        for d in ("root", "etc/systemd/system", "var/lib", "opt", "srv"):
            (root / d).mkdir(parents=True)
        self.exported: dict[str, str] = {}
        self.services: dict[str, Daemon] = {}
        self.timers: set[str] = set()
        # The machine's python3 and tools, not the test run's virtual environment.
        system_path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p]
        self.path = os.pathsep.join([str(root / "opt/standby/bin"), *system_path, "/usr/sbin", "/sbin"])

    def literal(self, text: str) -> str:
        """`text` of a document with this site's paths and addresses."""
        for name, address in NAMES.items():
            text = text.replace(name, address)
        text = re.sub(r"\b([AB]):(\d+)", lambda m: f"{HOSTS[m.group(1)]}:{m.group(2)}", text)
        for d in ROOTED:
            text = re.sub(rf"(?<![\w./-]){re.escape(d)}", str(self.root) + d, text)
        return text.replace("~/", f"{self.root / 'root'}/")

    def env(self) -> dict[str, str]:
        return {"PATH": self.path, "HOME": str(self.root / "root"), "LANG": "C.UTF-8", **self.exported}

    def sh(
        self, command: str, *, cwd: Path | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """One documented command in bash, as the administrator types it (after `literal`)."""
        cmd = self.literal(command)
        if cmd.startswith("systemctl"):
            self.systemctl(cmd)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd.startswith("export "):
            # The administrator's shell keeps the variables for the next commands.
            out = subprocess.run(
                ["bash", "-c", f"{cmd} && env -0"], env=self.env(), capture_output=True, text=True, check=True
            )
            names = re.findall(r"\b([A-Z_]+)=", cmd)
            pairs = dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
            self.exported.update({n: pairs[n] for n in names})
            return out
        cp = subprocess.run(
            [*self.wrapper, "bash", "-c", cmd],
            cwd=cwd or self.root / "root",
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and cp.returncode != 0:
            pytest.fail(
                f"documented command failed (exit {cp.returncode}):\n  {command}\nrun as:\n  {cmd}\n"
                f"stdout:\n{cp.stdout}\nstderr:\n{cp.stderr}",
                pytrace=False,
            )
        return cp

    def run_block(self, block: str, *, cwd: Path | None = None) -> list[subprocess.CompletedProcess[str]]:
        """Every command of a documented block; what the document shows each printing must be there."""
        done = []
        for step in steps(block):
            cp = self.sh(step.command, cwd=cwd)
            for line in step.prints:
                assert shown(cp.stdout, self.literal(line)), (
                    f"`{step.command}` printed\n{cp.stdout}\nwhere the document shows\n{line}"
                )
            done.append(cp)
        return done

    # ---------------------------------------------------------------------------------- systemd

    def systemctl(self, command: str) -> None:
        for part in command.split(" #")[0].split("&&"):
            words = part.split()
            assert words[0] == "systemctl", command
            verb, names = words[1], [w for w in words[2:] if not w.startswith("-")]
            if verb == "daemon-reload":
                continue
            for name in names:
                if name.endswith(".timer"):
                    assert verb == "enable" and "--now" in words, command
                    self.unit(name)
                    self.timers.add(name)
                elif verb in ("start", "restart") or (verb == "enable" and "--now" in words):
                    if verb == "restart":
                        self.stop(name)
                    self.start(name)
                elif verb == "stop":
                    self.stop(name)
                else:
                    raise AssertionError(f"the site plays no `systemctl {verb}`")

    def unit(self, name: str) -> dict[str, list[str]]:
        """The directives of an installed unit (`NAME@INSTANCE.KIND` from its template, %i replaced)."""
        if "." not in name:
            name += ".service"
        stem, kind = name.rsplit(".", 1)
        template, at, instance = stem.partition("@")
        path = self.root / "etc/systemd/system" / f"{template}{at}.{kind}"
        assert path.exists(), f"unit {path.name} not installed (the document's install step is missing)"
        return unit_directives(path.read_text().replace("%i", instance))

    def start(self, name: str) -> Daemon:
        unit = self.unit(name)
        for d in unit.get("StateDirectory", []):
            (self.root / "var/lib" / d).mkdir(parents=True, exist_ok=True)
        return self.background(name, unit["ExecStart"][0])

    def background(self, name: str, command: str) -> Daemon:
        """A documented daemon's command, running until stopped (a service, or a terminal of its own);
        returns once it logged `ready`."""
        argv = shlex.split(self.literal(command))
        assert name not in self.services or not self.services[name].alive(), f"{name} runs already"
        env = [f"{k}={v}" for k, v in self.env().items()]
        try:
            d = Daemon(
                name, [*self.wrapper, "env", *env, *argv], self.logs / f"{name}.log", cwd=self.root / "root"
            )
        except DaemonFailed as e:
            pytest.fail(str(e), pytrace=False)
        self.services[name] = d
        return d

    def timer_fires(self, timer: str) -> None:
        """The night comes: the enabled timer starts its oneshot service, whose ExecStart and
        ExecStartPost run in order with its Environment (systemd's ${VAR} expansion), each to exit 0."""
        assert timer in self.timers, f"{timer} is not enabled"
        unit = self.unit(timer.removesuffix(".timer") + ".service")
        assert unit["Type"] == ["oneshot"], unit["Type"]
        for d in unit.get("StateDirectory", []):
            (self.root / "var/lib" / d).mkdir(parents=True, exist_ok=True)
        env = self.env()
        for assignment in unit.get("Environment", []):
            for word in shlex.split(self.literal(assignment)):
                key, _, value = word.partition("=")
                env[key] = value
        for line in unit["ExecStart"] + unit.get("ExecStartPost", []):
            text = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], self.literal(line))
            cp = subprocess.run(shlex.split(text), env=env, capture_output=True, text=True, timeout=120)
            assert cp.returncode == 0, f"{timer}: `{text}` exited {cp.returncode}\n{cp.stderr}"

    def stop(self, name: str) -> None:
        d = self.services[name]
        rc = d.stop()
        assert rc == 0, f"{name} exited with {rc} on SIGTERM (systemctl stop)\n{d.tail()}"
        d.close()

    def finish(self) -> None:
        for d in self.services.values():
            if d.alive():
                d.stop()
            d.close()

    def not_json(self) -> list[str]:
        """Lines of the services' logs that are not JSON objects."""
        bad = []
        for name, d in self.services.items():
            for line in d.lines:
                try:
                    ok = isinstance(json.loads(line), dict)
                except ValueError:
                    ok = False
                if not ok:
                    bad.append(f"{name}: {line}")
        return bad


def install_file(site: Site, source: Path, directory: str, **changes: str | None) -> Path:
    """Install a file of the repository under a documented directory, as `install -m 0644` does, the
    documented paths in it being this site's, then edit it as the administrator would: for each key, its
    `key = ...` line gets the value, and a commented `# key = ...` line is uncommented (keeping its value
    when the value given is None)."""
    target = site.root / directory.lstrip("/") / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    text = site.literal(source.read_text())
    for key, value in changes.items():
        pattern = re.compile(rf"^(?:# )?{key} = (.*)$", re.MULTILINE)
        m = pattern.search(text)
        assert m, f"{source.name} has no line for {key}: the walk-through edits it"
        line = f"{key} = {m.group(1) if value is None else value}"
        text = text[: m.start()] + line + text[m.end() :]
    target.write_text(text)
    return target


def copy_tree(source: Path, target: Path) -> None:
    """The project's files as a user gets them (a clean checkout: no virtual environment or build)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode == 0 and listed.stdout:
        for rel in listed.stdout.split("\0"):
            if rel and (source / rel).is_file():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / rel, target / rel)
        return
    shutil.copytree(
        source, target, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__")
    )

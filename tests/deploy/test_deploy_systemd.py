"""deploy/systemd: `systemd-analyze verify` accepts every unit, the units carry the hardening the issue
asks for, and the programs really run under that hardening's kernel side (syscall filter, address
families, no writable+executable memory, no new privileges)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import (
    BIN,
    HARDENED_EXEC,
    SYSTEMD_DIR,
    ctl,
    daemons,
    directives,
    need,
    parse_metrics,
    qemu_write,
    run,
    wait_in_sync,
)

DAEMONS = ["standby-daemon.service", "standby-primary.service"]
SERVICES = [*DAEMONS, "standby-backup@.service"]
UNITS = [*SERVICES, "standby-backup@.timer"]
INSTALL_PREFIX = "/opt/standby/bin/"

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "User": "standby",
}


def test_every_unit_is_checked() -> None:
    assert sorted(p.name for p in SYSTEMD_DIR.glob("*.service")) == sorted(SERVICES)
    assert sorted(p.name for p in SYSTEMD_DIR.glob("*.timer")) == ["standby-backup@.timer"]


def _installed_copies(tmp: Path) -> list[Path]:
    """The units as installed: the programs' paths pointed at this venv's console scripts (the units
    expect them in /opt/standby/bin), templates as the instance @vol0 (verify needs an instance)."""
    copies = []
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text()
        assert INSTALL_PREFIX in text or name.endswith(".timer"), name
        for program in ("standby-daemon", "standby-primary", "standby-backup"):
            if INSTALL_PREFIX + program in text:
                assert (BIN / program).exists(), BIN / program
        path = tmp / name.replace("@.", "@vol0.")
        path.write_text(text.replace(INSTALL_PREFIX, f"{BIN}/"))
        copies.append(path)
    return copies


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    copies = _installed_copies(tmp_path)
    cp = run(tool, "verify", "--man=no", *copies, check=False)
    assert cp.returncode == 0 and cp.stderr.strip() == "", f"systemd-analyze verify:\n{cp.stderr}{cp.stdout}"
    # The files as shipped: nothing to say but that /opt/standby/bin/... is not installed here.
    cp = run(tool, "verify", "--man=no", *(SYSTEMD_DIR / n for n in DAEMONS), check=False)
    for line in cp.stderr.strip().splitlines():
        assert f"Command {INSTALL_PREFIX}" in line and "is not executable" in line, cp.stderr


def test_systemd_analyze_security(tmp_path: Path) -> None:
    tool = need("systemd-analyze")
    for path in _installed_copies(tmp_path):
        if path.suffix != ".service":
            continue
        out = run(tool, "security", "--offline=yes", "--no-pager", path).stdout
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
        assert m and float(m.group(1)) <= 2.0, f"{path.name}: exposure too high\n{out[-300:]}"


@pytest.mark.parametrize("name", SERVICES)
def test_unit_hardening(name: str) -> None:
    d = directives(name)
    for key, value in HARDENING.items():
        assert d.get(key) == [value], f"{name}: {key}={d.get(key)}, expected {value}"
    assert d["SystemCallFilter"] == ["@system-service", "~@privileged"], d["SystemCallFilter"]
    [exec_start] = d["ExecStart"]
    assert "--config /etc/standby/" in exec_start, exec_start
    assert d.get("ReadWritePaths") or d.get("StateDirectory"), f"{name}: writes nowhere"
    if name in DAEMONS:
        assert d["Restart"] == ["on-failure"], name
    else:
        assert d["Type"] == ["oneshot"], name
        assert "%i" in exec_start and "--metrics-textfile" in exec_start, exec_start
    if name == "standby-daemon.service":
        assert d["DynamicUser"] == ["yes"] and d["StateDirectory"] == ["standby"]


def test_timer_is_daily() -> None:
    d = directives("standby-backup@.timer")
    assert d["OnCalendar"] == ["daily"] and d["Persistent"] == ["true"], d
    assert d["WantedBy"] == ["timers.target"]


# ------------------------------------------------------------------------------------------ hardening


def _syscall_groups(tool: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    current = ""
    for line in run(tool, "syscall-filter", "--no-pager").stdout.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = []
        elif line.strip() and not line.strip().startswith("#") and current:
            groups[current].append(line.strip())
    return groups


def _expand(item: str, groups: dict[str, list[str]]) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return {s for member in groups[item] for s in _expand(member, groups)}


def allowed_syscalls(tool: str, unit: str) -> set[str]:
    """The allow list systemd builds from the unit's SystemCallFilter= lines."""
    groups = _syscall_groups(tool)
    allowed: set[str] = set()
    for value in directives(unit)["SystemCallFilter"]:
        if value.startswith("~"):
            for item in value[1:].split():
                allowed -= _expand(item, groups)
        else:
            for item in value.split():
                allowed |= _expand(item, groups)
    assert "read" in allowed and "chroot" not in allowed
    return allowed


def _wrapper(tmp: Path, unit: str) -> list[str]:
    allowed = tmp / f"{unit}.syscalls"
    allowed.write_text("\n".join(sorted(allowed_syscalls(need("systemd-analyze"), unit))) + "\n")
    return [sys.executable, str(HARDENED_EXEC), str(allowed), "--"]


def test_hardening_wrapper_enforces(tmp_path: Path) -> None:
    """The wrapper used below really restricts: W+X memory, a privileged syscall, a packet socket."""
    wrap = _wrapper(tmp_path, "standby-daemon.service")
    probe = (
        "import mmap, socket\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    print('wx-allowed')\n"
        "except OSError:\n"
        "    print('wx-denied')\n"
        "try:\n"
        "    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "    print('packet-allowed')\n"
        "except OSError as e:\n"
        "    print('packet-denied', e.errno)\n"
        "socket.socket(socket.AF_INET6).close()\n"
        "print('inet-ok', flush=True)\n"
        "import os\n"
        "os.chroot('/')\n"
        "print('chroot-allowed')\n"
    )
    cp = subprocess.run([*wrap, sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert cp.stdout.split("\n")[:3] == ["wx-denied", "packet-denied 97", "inet-ok"], cp.stdout + cp.stderr
    assert cp.returncode == -signal.SIGSYS, (cp.returncode, cp.stdout, cp.stderr)


def test_programs_run_under_the_units_hardening(tmp_path: Path) -> None:
    """Replication, a snapshot with copy-on-write, a backup: all under MemoryDenyWriteExecute, the
    syscall filter and the address families of the units; the daemons then stop cleanly on SIGTERM."""
    need("qemu-io")
    with daemons(tmp_path, _wrapper(tmp_path, "standby-daemon.service")) as sds:
        standby = sds.standby(tmp_path / "standby", "--preservation-capacity", "64MiB")
        grpc = standby.addresses["grpc"]
        with daemons(tmp_path, _wrapper(tmp_path, "standby-primary.service")) as pds:
            primary = pds.primary([f"vol0={tmp_path / 'vol0.img'},size=8MiB"], grpc)
            wait_in_sync(primary.addresses["metrics"], "vol0")
            for d in (standby, primary):
                status = Path(f"/proc/{d.proc.pid}/status").read_text()
                assert "\nSeccomp:\t2\n" in status and "\nNoNewPrivs:\t1\n" in status, (
                    f"{d.name} not filtered"
                )
            qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x33 0 2M")
            assert ctl(grpc, "snapshot", "create", "vol0", "s1").strip() == "s1"
            qemu_write(primary.addresses["nbd"], "vol0", "write -P 0x44 0 1M")
            wait_in_sync(primary.addresses["metrics"], "vol0")
            prom = tmp_path / "standby_backup_vol0.prom"
            archive = tmp_path / "vol0.tar.zst"
            backup: list[str | Path] = [
                BIN / "standby-backup", "run", "vol0", "--standby", grpc, "--output", archive,
                "--metrics-listen", "127.0.0.1:0", "--metrics-textfile", prom, "--log-format", "json",
            ]  # fmt: skip
            cp = run(*_wrapper(tmp_path, "standby-backup@.service"), *backup, check=False, timeout=120)
            assert cp.returncode == 0, (
                f"backup under the unit's hardening exited {cp.returncode}:\n{cp.stderr}"
            )
            [(_labels, last_success)] = parse_metrics(prom.read_text())[
                "standby_backup_last_success_timestamp_seconds"
            ]
            assert last_success > 0
            run(BIN / "standby-backup", "verify", archive)
            snaps = ctl(grpc, "snapshot", "list", "vol0")
            assert "s1" in snaps, snaps

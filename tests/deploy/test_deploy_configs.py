"""deploy/config: each example TOML config is accepted by its program (`--show-config --config FILE`
exits 0) and means what it says (every key it sets comes out of --show-config with the same value); the
example authorization policy is loaded by standby-daemon (`--show-config --policy FILE` reads and
checks it; tests/roles/test_authorization.py checks what it grants)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from deploy_support import BIN, CONFIG_DIR, SYSTEMD_DIR, run

# example -> the command that reads it (the backup's `run` needs a volume)
PROGRAMS = {
    "standby.toml": ["standby-daemon"],
    "primary.toml": ["standby-primary"],
    "backup.toml": ["standby-backup", "run"],
}
# example policies (standby-daemon --policy FILE), not configs of a program
POLICIES = ["policy.toml"]
UNITS = {
    "standby.toml": "standby-daemon.service",
    "primary.toml": "standby-primary.service",
    "backup.toml": "standby-backup@.service",
}


def test_every_example_is_checked() -> None:
    assert sorted(p.name for p in CONFIG_DIR.glob("*.toml")) == sorted([*PROGRAMS, *POLICIES])


@pytest.mark.parametrize("name", POLICIES)
def test_example_policy_loads(name: str, tmp_path: Path) -> None:
    path = CONFIG_DIR / name
    shown = tomllib.loads(run(BIN / "standby-daemon", "--show-config", "--policy", path).stdout)
    assert shown.get("policy") == str(path), shown
    # ... and the same file with a typo in a role is refused, naming the file
    bad = tmp_path / name
    bad.write_text(path.read_text() + '\n[identity."CN=typo.example"]\nsnapshot = ["*"]\n')
    cp = run(BIN / "standby-daemon", "--show-config", "--policy", bad, check=False)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert f"policy file {bad}" in cp.stderr and "'snapshot': unknown role" in cp.stderr, cp.stderr


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_example_config_accepted(name: str) -> None:
    path = CONFIG_DIR / name
    program, *sub = PROGRAMS[name]
    argv: list[str | Path] = [BIN / program, *sub, "--show-config", "--config", path]
    if sub:
        argv += ["--", "vol0"]
    shown = tomllib.loads(run(*argv).stdout)
    example = tomllib.loads(path.read_text())
    assert example, f"{name} sets nothing"
    for key, value in example.items():
        assert shown.get(key) == value, f"{name}: {key} = {value!r}, but the program reads {shown.get(key)!r}"


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_example_config_rejects_unknown_keys(name: str, tmp_path: Path) -> None:
    """The acceptance above means something: the same program refuses a config with a typo."""
    bad = tmp_path / name
    bad.write_text((CONFIG_DIR / name).read_text() + "\nno_such_setting = 1\n")
    program, *sub = PROGRAMS[name]
    argv: list[str | Path] = [BIN / program, *sub, "--show-config", "--config", bad]
    argv += ["--", "vol0"] if sub else []
    cp = run(*argv, check=False)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "no_such_setting" in cp.stderr, cp.stderr


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_reads_the_example_path(name: str) -> None:
    """The unit's ExecStart reads /etc/standby/NAME, the path the example is meant to be installed at."""
    unit = (SYSTEMD_DIR / UNITS[name]).read_text()
    assert f"--config /etc/standby/{name}" in unit, UNITS[name]

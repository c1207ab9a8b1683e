"""Command lines of the three programs: help, configuration files, usage errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAMS = {
    "standby-daemon": "standby.main",
    "standby-primary": "primary.main",
    "standbyctl": "standby.ctl",
    "standby-backup": "backupnode.main",
}


def run(program, *args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_names_every_contract_flag(program):
    out = run(program, "--help")
    assert out.returncode == 0
    expected = {
        "standby-daemon": ["--data-dir", "--listen", "--nbd-listen", "--metrics-listen",
                           "--preservation-capacity", "--on-full", "--config", "--show-config", "--adopt",
                           "127.0.0.1:7700", "127.0.0.1:10809"],
        "standby-primary": ["--volume", "--standby", "--nbd-listen", "--metrics-listen", "--mode",
                            "127.0.0.1:10810"],
        "standbyctl": ["--standby", "status", "snapshot", "verify", "promote", "demote", "takeover"],
        "standby-backup": ["run", "restore", "verify", "list", "tar --zstd -xSf"],
    }[program]  # fmt: skip
    for flag in expected:
        assert flag in out.stdout, flag


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_program_tells_its_version(program):
    out = run(program, "--version")
    assert out.returncode == 0, out.stderr
    name, version = out.stdout.split()
    assert name == program and version[0].isdigit(), out.stdout


@pytest.mark.parametrize(
    ("args", "wanted"),
    [
        (["promote", "--help"], ["--at SNAPSHOT", "--force", "rolled back"]),
        (["demote", "--help"], ["failback"]),
    ],
)
def test_standbyctl_failover_help_answers_what_a_failover_does(args, wanted):
    out = run("standbyctl", *args)
    assert out.returncode == 0
    for text in wanted:
        assert text in " ".join(out.stdout.split()), text


def test_show_config_round_trips_through_a_config_file(tmp_path):
    first = run("standby-daemon", "--show-config", "--data-dir", str(tmp_path), "--on-full", "defer")
    assert first.returncode == 0
    conf = tmp_path / "standby.toml"
    conf.write_text(first.stdout)
    again = run("standby-daemon", "--show-config", "--config", str(conf))
    assert again.returncode == 0 and again.stdout == first.stdout
    assert 'on_full = "defer"' in again.stdout and 'listen = "127.0.0.1:7700"' in again.stdout
    # A flag wins over the file.
    flagged = run("standby-daemon", "--show-config", "--config", str(conf), "--listen", "127.0.0.1:9")
    assert 'listen = "127.0.0.1:9"' in flagged.stdout


@pytest.mark.parametrize(
    ("program", "args", "message"),
    [
        ("standby-daemon", [], "--data-dir is required"),
        ("standby-daemon", ["--data-dir", "d", "--listen", "nope"], "must be HOST:PORT"),
        ("standby-daemon", ["--data-dir", "d", "--on-full", "panic"], "invalid choice"),
        ("standby-primary", ["--standby", "127.0.0.1:1"], "at least one --volume"),
        ("standby-primary", ["--volume", "v=/x"], "--standby H:P is required"),
        ("standby-primary", ["--standby", "h:1", "--volume", "v=/x,size=12"], "multiple of the block size"),
        ("standby-primary", ["--standby", "h:1", "--volume", "v=/x", "--volume", "v=/y"], "must be unique"),
        ("standbyctl", ["snapshot"], "ACTION"),
        ("standbyctl", ["--standby", "nope", "status"], "HOST:PORT"),
        ("standbyctl", ["snapshot", "create", "v", "--capacity", "huge"], "--capacity"),
        ("standby-daemon", ["--data-dir", "d", "--adopt", "vol0"], "NAME=PATH"),
        ("standby-daemon", ["--data-dir", "d", "--adopt", "vol0=/nonexistent.img"], "is not a file"),
        ("standby-backup", [], "COMMAND"),
        ("standby-backup", ["run", "vol0"], "--output is required"),
        ("standby-backup", ["run", "vol0", "--output", "a", "--standby", "nope"], "HOST:PORT"),
        ("standby-backup", ["run", "vol0", "--output", "a", "--connections", "many"], "--connections"),
        ("standby-backup", ["restore", "a.tar.zst"], "--output"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, program, args, message):
    out = run(program, *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_config_files_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('data_dir = "d"\nbogus = 1\n', "unknown setting 'bogus'"),
        ('data_dir = "d"\non_full = "panic"\n', "not one of invalidate, defer"),
        ("data_dir = [\n", "not valid TOML"),
        # Every value is checked against its setting's type, --show-config included.
        ("data_dir = 5\n", "--data-dir: 5 is not a string (in --config"),
        (
            'data_dir = "d"\nrequire_client_cert = "yes"\n',
            "--require-client-cert: 'yes' is not true or false",
        ),
        ('data_dir = "d"\nadopt = "vol0=/x"\n', "--adopt: 'vol0=/x' is not a list of"),
    ]:
        bad.write_text(text)
        for extra in ([], ["--show-config"]):
            out = run("standby-daemon", "--config", str(bad), *extra)
            assert out.returncode == 2 and message in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
    out = run("standby-daemon", "--config", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_the_shared_settings_are_typed_the_same_in_every_program(tmp_path):
    """Logs and client TLS are declared once; each program checks them the same way."""
    bad = tmp_path / "bad.toml"
    bad.write_text('standby = "127.0.0.1:1"\nvolume = ["v=/x"]\nlog_format = 1\ntls_ca = 2\n')
    out = run("standby-primary", "--config", str(bad), "--show-config")
    assert out.returncode == 2 and "--log-format (in --config" in out.stderr
    assert "1 is not one of auto, json, console" in out.stderr
    bad.write_text('standby = "127.0.0.1:1"\nvolume = ["v=/x"]\ntls_ca = 2\n')
    out = run("standby-primary", "--config", str(bad), "--show-config")
    assert out.returncode == 2 and "--tls-ca: 2 is not a string" in out.stderr, out.stderr
    bad.write_text('output = "a"\ntls_server_name = ["x"]\n')
    out = run("standby-backup", "run", "vol0", "--config", str(bad), "--show-config")
    assert out.returncode == 2 and "--tls-server-name: ['x'] is not a string" in out.stderr, out.stderr
    # standbyctl takes the same TLS settings, from flags: a certificate without its key is refused.
    out = run("standbyctl", "--tls-ca", str(bad), "--tls-cert", str(bad), "status")
    assert out.returncode == 2 and "--tls-key" in out.stderr, out.stderr


def test_backup_run_help_answers_the_operator_questions():
    out = run("standby-backup", "run", "--help")
    assert out.returncode == 0
    for flag in ["--standby", "--output", "--snapshot", "--keep-snapshot", "--lease", "--connections",
                 "--metrics-listen", "127.0.0.1:9702", "--config"]:  # fmt: skip
        assert flag in out.stdout, flag


def test_standbyctl_reports_an_unreachable_standby_in_one_line():
    out = run("standbyctl", "--standby", "127.0.0.1:1", "--timeout", "3", "status")
    assert out.returncode == 1
    assert out.stderr.startswith("standbyctl: cannot reach 127.0.0.1:1")
    assert len(out.stderr.strip().splitlines()) == 1


def test_standbyctl_reads_a_config_file_and_standby_variables_and_flags_win(tmp_path):
    conf = tmp_path / "ctl.toml"
    conf.write_text('standby = "10.0.0.9:7700"\ntimeout = 5\ntls_ca = "/etc/standby/tls/ca-cert.pem"\n')
    clean = {k: "" for k in ("STANDBY_ADDRESS", "STANDBY_TIMEOUT", "STANDBY_TLS_CA", "STANDBY_TLS_CERT")}
    shown = run("standbyctl", "--config", str(conf), "--show-config", env=clean)
    assert shown.returncode == 0, shown.stderr
    assert 'standby = "10.0.0.9:7700"' in shown.stdout and "timeout = 5.0" in shown.stdout
    env = {**clean, "STANDBY_ADDRESS": "10.1.1.1:7000", "STANDBY_TLS_CERT": "/c.pem"}
    shown = run("standbyctl", "--config", str(conf), "--show-config", env=env)
    assert 'standby = "10.1.1.1:7000"' in shown.stdout and 'tls_cert = "/c.pem"' in shown.stdout
    assert 'tls_ca = "/etc/standby/tls/ca-cert.pem"' in shown.stdout  # the file, where no variable is set
    shown = run("standbyctl", "--config", str(conf), "--standby", "h:1", "--show-config", env=env)
    assert 'standby = "h:1"' in shown.stdout
    # The shown configuration is a config file standbyctl reads back.
    again = tmp_path / "again.toml"
    again.write_text(shown.stdout)
    assert run("standbyctl", "--config", str(again), "--show-config", env=clean).stdout == shown.stdout


def test_a_bad_standby_variable_is_a_usage_error_naming_it():
    cp = run("standbyctl", "status", env={"STANDBY_TIMEOUT": "soon"})
    assert cp.returncode == 2
    assert (
        cp.stderr.strip()
        == "standbyctl: --timeout (from $STANDBY_TIMEOUT): could not convert string to float: 'soon'"
    )
    cp = run("standbyctl", env={})
    assert cp.returncode == 2 and "COMMAND" in cp.stderr


def test_check_config_lists_every_problem_of_a_standby_configuration(tmp_path):
    data = tmp_path / "not-a-dir"
    data.write_text("a file where the data directory should be")
    conf = tmp_path / "standby.toml"
    conf.write_text(
        f'data_dir = "{data}"\n'
        f'tls_cert = "{tmp_path / "missing-cert.pem"}"\ntls_key = "{tmp_path / "missing-key.pem"}"\n'
        'preservation_capacity = "100PiB"\n'
        f'adopt = ["vol0={tmp_path / "gone.img"}"]\n'
    )
    shown = run("standby-daemon", "--config", str(conf), "--show-config")
    assert shown.returncode == 0  # showing it does not check it
    cp = run("standby-daemon", "--config", str(conf), "--check-config")
    assert cp.returncode == 1, cp.stdout + cp.stderr
    lines = cp.stdout.splitlines()
    assert any("--data-dir" in line and "is not a directory" in line for line in lines), lines
    assert any("--tls-cert" in line and "missing-cert.pem" in line for line in lines), lines
    assert any("--preservation-capacity 100PiB" in line for line in lines), lines
    assert any("--adopt" in line and "gone.img" in line for line in lines), lines
    assert lines[-1] == "standby-daemon: 4 problems in the configuration", lines
    assert not any(tmp_path.glob("*/standby.json")), "a check created a data directory"

    good = run("standby-daemon", "--data-dir", str(tmp_path / "fresh"), "--check-config")
    assert good.returncode == 0 and good.stdout.strip() == "standby-daemon: configuration OK", good.stdout
    assert not (tmp_path / "fresh").exists()


def test_check_config_lists_every_problem_of_a_primary_configuration(tmp_path):
    cp = run(
        "standby-primary",
        "--volume", f"v={tmp_path / 'missing.img'}",
        "--volume", f"w={tmp_path / 'w.img'},size=1MiB",
        "--standby", "127.0.0.1:7700",
        "--tls-ca", str(tmp_path / "no-ca.pem"),
        "--check-config",
    )  # fmt: skip
    assert cp.returncode == 1, cp.stdout + cp.stderr
    lines = cp.stdout.splitlines()
    assert any("'v'" in line and "give size=" in line for line in lines), lines
    assert any("--tls-ca" in line and "no-ca.pem" in line for line in lines), lines
    assert lines[-1] == "standby-primary: 2 problems in the configuration", lines
    assert not (tmp_path / "w.img").exists(), "a check created a volume"


def complete(program: str, *words: str) -> list[str]:
    """What the committed bash completion offers for `program WORDS...` (the last word being typed)."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "completion" / f"{program}.bash"
    function = "_shtab_" + program.replace("-", "_")
    line = " ".join((program, *words))
    cmd = (
        f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; COMP_LINE='{line}'; "
        f'COMP_POINT=${{#COMP_LINE}}; {function}; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    cp = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout.split()


def test_shell_completion_offers_the_commands_and_their_options():
    assert complete("standbyctl", "de") == ["demote"]
    assert {"--at", "--force"} <= set(complete("standbyctl", "promote", "--"))
    assert "--check-config" in complete("standby-daemon", "--check")
    assert {"restore", "run"} <= set(complete("standby-backup", "r"))


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_the_man_page_names_every_option_of_the_help(program):
    page = (Path(__file__).resolve().parents[2] / "docs" / "man" / f"{program}.1").read_text()
    flags = {w.rstrip(",") for w in run(program, "--help").stdout.split() if w.startswith("--")}
    flags = {f.split("=")[0].rstrip("]") for f in flags}
    missing = [f for f in flags - {"--help"} if f.replace("-", "\\-") not in page]
    assert not missing, missing

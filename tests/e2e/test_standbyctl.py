"""standbyctl as an operator types it: status and snapshot create/list/delete, human and --json, and the
exit codes of section 6 (0 ok, 1 operation failed with one clear line, 2 usage error)."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from e2e_support import (
    CTL_CMD,
    PRIMARY_CMD,
    STANDBY_CMD,
    VOLUME_SIZE,
    Appliance,
    Daemons,
    _console,
    assert_one_clear_line,
    backup_argv,
    need,
    run,
)

from standbylib.runtime import config as cfg

pytestmark = pytest.mark.timeout(180)


def test_status_json_has_the_shape_of_section_6(appliance: Appliance) -> None:
    a = appliance
    a.writer.fill(0, 4096, 0x01)
    a.standby.snapshot("vol0", "s1")
    status = a.standby.status()
    assert status["nbd"] == a.standby.nbd, (
        f"status nbd {status['nbd']!r}, the daemon listens on {a.standby.nbd}"
    )
    vols = {v["name"]: v for v in status["volumes"]}
    assert set(vols) == {"vol0"}
    v = vols["vol0"]
    assert (v["size"], v["block_size"], v["state"], v["connected"]) == (
        VOLUME_SIZE,
        4096,
        "uptodate",
        True,
    ), v
    snaps = v["snapshots"]
    assert [s["name"] for s in snaps] == ["s1"]
    s = snaps[0]
    assert (s["valid"], s["writable"], s["preserved_bytes"]) == (True, False, 0), s
    assert s["capacity_bytes"] > 0, s
    assert datetime.fromisoformat(s["created"].replace("Z", "+00:00")).tzinfo is not None, s


def test_status_human_names_the_volume_its_state_and_snapshots(appliance: Appliance) -> None:
    a = appliance
    a.standby.snapshot("vol0", "nightly")
    out = a.standby.ctl("status").stdout
    for word in ("vol0", "uptodate", "nightly"):
        assert word in out, f"status does not show {word!r}:\n{out}"
    with pytest.raises(ValueError):
        json.loads(out)  # human-readable by default


def test_snapshot_create_with_and_without_a_name_list_and_delete(appliance: Appliance) -> None:
    need("nbdinfo")
    a = appliance
    assert a.standby.snapshot("vol0", "named") == "named"
    auto = a.standby.snapshot("vol0")  # prints the name the standby picked
    assert auto != "named" and re.fullmatch(r"[\w.:-]+", auto), f"odd auto name {auto!r}"
    w = a.standby.snapshot("vol0", "rw", "--writable", "--capacity", "4MiB")

    listed = {s["name"]: s for s in a.standby.snapshots()}
    assert set(listed) == {"named", auto, w}
    for name, s in listed.items():
        assert s["volume"] == "vol0" and s["export"] == f"vol0@{name}" and s["valid"] is True, s
        assert s["writable"] is (name == w), s
        assert {"created", "preserved_bytes", "capacity_bytes"} <= set(s), s
    assert listed[w]["capacity_bytes"] == 4 << 20
    assert {s["name"] for s in a.standby.snapshots("vol0")} == set(listed)

    human = a.standby.ctl("snapshot", "list").stdout
    for name in listed:
        assert name in human, f"snapshot list does not show {name!r}:\n{human}"

    a.standby.ctl("snapshot", "delete", "vol0", auto)
    assert {s["name"] for s in a.standby.snapshots("vol0")} == {"named", w}
    exports = run("nbdinfo", "--list", a.standby.uri()).stdout
    assert f'"vol0@{auto}"' not in exports and '"vol0@named"' in exports, exports


# Operations that fail: what each is, its arguments, and the name its error must give.
OPERATION_FAILURES = [
    ("duplicate name", ("snapshot", "create", "vol0", "dup"), "dup"),
    ("unknown volume", ("snapshot", "create", "nosuchvol", "x"), "nosuchvol"),
    ("delete unknown snapshot", ("snapshot", "delete", "vol0", "nosuchsnap"), "nosuchsnap"),
    ("delete in unknown volume", ("snapshot", "delete", "nosuchvol", "dup"), "nosuchvol"),
    ("list of an unknown volume", ("snapshot", "list", "nosuchvol", "--json"), "nosuchvol"),
]


def test_operation_failures_exit_1_with_one_line_naming_the_thing(appliance: Appliance) -> None:
    a = appliance
    a.standby.snapshot("vol0", "dup")

    for what, args, name in OPERATION_FAILURES:
        assert_one_clear_line(a.standby.ctl(*args, check=False), 1, what, name)

    assert [s["name"] for s in a.standby.snapshots("vol0")] == ["dup"], "a failed operation changed the list"


def test_unreachable_standby_is_exit_1_not_a_hang() -> None:
    cp = run(*_console(*CTL_CMD), "--standby", "127.0.0.1:1", "status", check=False, timeout=90)
    assert_one_clear_line(cp, 1, "status of an unreachable standby", "127.0.0.1:1")


@pytest.mark.parametrize("cmd", [CTL_CMD, STANDBY_CMD, PRIMARY_CMD], ids=lambda c: c[0])
def test_help_exits_0(cmd: tuple[str, str]) -> None:
    cp = run(*_console(*cmd), "--help", check=False)
    assert cp.returncode == 0, f"{cmd[0]} --help exited {cp.returncode}\n{cp.stderr}"
    assert "usage" in cp.stdout.lower(), cp.stdout


@pytest.mark.parametrize(
    "args",
    [
        [*CTL_CMD[:1], "--standby", "127.0.0.1:1", "snapshot", "frobnicate"],
        [*CTL_CMD[:1], "--standby", "127.0.0.1:1", "snapshot", "create"],
        [*CTL_CMD[:1], "--standby", "127.0.0.1:1", "snapshot", "create", "vol0", "--capacity", "lots"],
        [*CTL_CMD[:1], "--no-such-flag"],
        [*STANDBY_CMD[:1], "--data-dir", "{tmp}/data", "--preservation-capacity", "banana"],
        [*STANDBY_CMD[:1], "--data-dir", "{tmp}/data", "--on-full", "explode"],
        [*PRIMARY_CMD[:1], "--volume", "vol0", "--standby", "127.0.0.1:1"],
    ],
    ids=["ctl-unknown-subcommand", "ctl-missing-volume", "ctl-bad-size", "ctl-unknown-flag",
         "standby-bad-capacity", "standby-bad-on-full", "primary-bad-volume"],
)  # fmt: skip
def test_bad_usage_exits_2(args: list[str], tmp_path: Path) -> None:
    cmd = {c[0]: c for c in (CTL_CMD, STANDBY_CMD, PRIMARY_CMD)}[args[0]]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args[1:]]
    cp = run(*_console(*cmd), *argv, check=False, timeout=60)
    assert cp.returncode == 2, f"{args}: exit {cp.returncode}, expected 2\n{cp.stdout}{cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr


def test_status_shows_both_roles_and_the_progress_of_a_resync(daemons: Daemons, tmp_path: Path) -> None:
    """A new standby's first sync of a volume full of data: `status` shows the replica's role and its
    primary, and the resync's progress; once done, neither."""
    vol = tmp_path / "vol0.img"
    with open(vol, "wb") as f:
        for _ in range(512):
            f.write(os.urandom(1 << 20))
    standby = daemons.standby(tmp_path / "b")
    primary = daemons.primary(standby, {"vol0": str(vol)}, in_sync=False)
    progress: list[int] = []
    roles = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = standby.ctl("status").stdout
        found = re.search(r"vol0: resync (\d+)% done \(.* of [\d.]+ MiB to send", text)
        if found:
            progress.append(int(found.group(1)))
            roles = text
        elif "vol0" in text and "uptodate" in text and progress:
            break
        time.sleep(0.05)
    assert progress, "no status showed the resync's progress"
    assert all(0 <= p <= 100 for p in progress), progress
    assert "vol0: this standby holds the replica (inconsistent); primary" in roles, roles
    primary.wait_in_sync()
    done = standby.status()["volumes"][0]
    assert (done["state"], done["resync_total_bytes"], done["resync_remaining_bytes"]) == ("uptodate", 0, 0)
    text = standby.ctl("status").stdout
    assert "connected, mirroring" in text and "resync" not in text, text


@pytest.mark.parametrize(
    ("reported", "via", "usable"),
    [
        ("0.0.0.0:10809", "192.0.2.10:7700", "192.0.2.10:10809"),
        ("0.0.0.0:10809", "standby.example:7700", "standby.example:10809"),
        ("[::]:10809", "[2001:db8::10]:7700", "[2001:db8::10]:10809"),
        ("192.0.2.11:10809", "192.0.2.10:7700", "192.0.2.11:10809"),
    ],
)
def test_a_wildcard_listener_is_given_as_the_host_the_client_reached(
    reported: str, via: str, usable: str
) -> None:
    assert cfg.reachable(reported, via) == usable


def test_a_standby_listening_on_every_address_gives_nbd_addresses_clients_can_use(
    daemons: Daemons, tmp_path: Path
) -> None:
    """docs/OPERATIONS.md binds B's listeners to 0.0.0.0: the status, promote and the backup node then
    name the address the client reached the standby at, not 0.0.0.0 (a remote backup node would connect
    to itself)."""
    standby = daemons.standby(tmp_path / "b", "--nbd-listen", "0.0.0.0:0")
    assert standby.nbd.startswith("0.0.0.0:")
    port = standby.nbd.rsplit(":", 1)[1]
    daemons.primary(standby, {"vol0": f"{tmp_path / 'vol0.img'},size=8MiB"})
    assert standby.status()["nbd"] == f"127.0.0.1:{port}"
    assert f"snapshot exports: nbd://127.0.0.1:{port}/VOLUME@SNAPSHOT" in standby.ctl("status").stdout
    archive = tmp_path / "vol0.tar.zst"
    run(*backup_argv("run", "vol0", "--standby", standby.grpc, "--output", str(archive)))
    assert archive.stat().st_size > 0
    out = standby.ctl("promote", "vol0", "--force").stdout
    assert f"vol0: promoted; read-write at nbd://127.0.0.1:{port}/vol0" in out, out


def test_remove_says_what_it_would_delete_refuses_a_connected_volume_then_removes_it(
    daemons: Daemons, tmp_path: Path
) -> None:
    """`standbyctl remove`: without --yes it only says what would go; with a primary connected it is
    refused; once that primary is stopped the volume, its snapshot and its replica file go, and a primary
    started again later gets a new replica by a full copy."""
    standby = daemons.standby(tmp_path / "b")
    volume = tmp_path / "vol0.img"
    volume.write_bytes(os.urandom(4 << 20))
    primary = daemons.primary(standby, {"vol0": str(volume)})
    standby.snapshot("vol0", "nightly")
    replica = standby.replica("vol0")

    dry = standby.ctl("remove", "vol0", check=False)
    assert (
        dry.returncode == 1
        and "would delete its replica (4.0 MiB, uptodate) and its 1 snapshots (nightly)" in (dry.stderr)
    ), dry
    assert_one_clear_line(
        standby.ctl("remove", "vol0", "--yes", check=False), 1, "remove while mirrored", "vol0"
    )
    assert_one_clear_line(standby.ctl("remove", "nosuchvol", "--yes", check=False), 1, "unknown", "nosuchvol")
    assert replica.exists() and [s["name"] for s in standby.snapshots("vol0")] == ["nightly"]

    assert primary.daemon.stop() == 0
    out = standby.ctl("remove", "vol0", "--yes").stdout
    assert re.fullmatch(r"vol0: removed; 1 snapshots deleted, [\d.]+ MiB of replica freed\n", out), out
    assert not replica.exists()
    assert [v["name"] for v in standby.status()["volumes"]] == []

    again = daemons.primary(standby, {"vol0": str(volume)})
    again.wait_in_sync()
    assert replica.read_bytes() == volume.read_bytes()

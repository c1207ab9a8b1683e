"""A generation belongs to the data it describes: a primary restarted with its state directory on an older
copy of its volume file (a new file, or the same file overwritten in place) is refused with the cause
and the fix, never reported up to date with stale data, and the standby's replica is left alone; the
same file restarted after a clean stop or a kill -9 resumes without a full sync; a volume file another
process holds is refused at start. Real daemons on loopback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_support import PRIMARY_CMD, Daemon, Daemons, MiB, _console, mirrored_pair, rand, run
from faults_support import sha

pytestmark = pytest.mark.timeout(240)


def write(primary, offset: int, length: int, pattern: int) -> None:
    run(
        "qemu-io",
        "-f",
        "raw",
        "-c",
        f"write -P 0x{pattern:02x} {offset} {length}",
        "-c",
        "flush",
        primary.uri(),
    )


def events(daemon: Daemon, name: str, **fields) -> list[dict]:
    return [
        e
        for e in list(daemon.events)
        if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
    ]


def start_primary(daemons: Daemons, standby, vol: Path, state: Path, *extra: str, in_sync: bool = True):
    return daemons.primary(
        standby, {"vol0": f"{vol},size=32MiB"}, "--state-dir", str(state), *extra, in_sync=in_sync
    )


@pytest.mark.parametrize("how", ["new-file", "in-place"])
def test_an_older_copy_of_the_volume_file_is_refused_not_served_as_up_to_date(
    daemons: Daemons, tmp_path: Path, how: str
) -> None:
    state = tmp_path / "a-state"
    standby, first = mirrored_pair(daemons, tmp_path, "--state-dir", str(state), folder="a")
    vol = first.volumes["vol0"]
    earlier = tmp_path / "earlier.img"
    shutil.copyfile(vol, earlier)  # a copy saved at this time
    write(first, 0, MiB, 0x22)  # the newest data, replicated
    first.wait_in_sync()
    assert first.daemon.stop() == 0  # a clean stop
    newest = sha(vol)
    assert sha(standby.replica("vol0")) == newest
    handshakes = len(events(standby.daemon, "handshake"))

    # The volume file is replaced by the earlier copy (the newest data now lives only on the standby).
    if how == "new-file":
        run("cp", earlier, vol.with_name("vol0.img.new"))
        vol.with_name("vol0.img.new").rename(vol)
    else:
        run("cp", earlier, vol)  # overwrites the same inode; its attributes stay
    stale = sha(vol)
    assert stale != newest

    again = start_primary(daemons, standby, vol, state, in_sync=False)
    refused = again.daemon.wait_for("volume_file_mismatch", timeout=30)
    message = refused["error"]
    assert f"{vol} is not the file generation" in message, message
    cause = "inode changed" if how == "new-file" else "modified after the clean stop"
    assert cause in message, message
    assert "--discard-standby-data" in message and "point --volume at the right file" in message, message
    m = again.metrics()
    assert m.get("standby_replication_connected", volume="vol0") == 0
    assert m.get("standby_replication_state", volume="vol0", state="blocked") == 1
    # The standby never heard of it: no handshake, not connected, its replica holds the newest data.
    assert len(events(standby.daemon, "handshake")) == handshakes
    volume = standby.status()["volumes"][0]
    assert not volume["connected"], volume
    assert sha(standby.replica("vol0")) == newest
    # The primary still serves its clients (its writes tracked), but reports nothing as in sync.
    write(again, 4 * MiB, 64 * 1024, 0x33)
    assert again.metrics().get("standby_replication_connected", volume="vol0") == 0
    assert len(events(standby.daemon, "handshake")) == handshakes
    assert again.daemon.stop() == 0
    assert sha(standby.replica("vol0")) == newest

    # Still refused at the next start (the stop recorded nothing for that file) ...
    third = start_primary(daemons, standby, vol, state, in_sync=False)
    third.daemon.wait_for("volume_file_mismatch", timeout=30)
    assert third.daemon.stop() == 0
    # ... until the operator says this file holds the data to keep: a checksummed full resync.
    kept = start_primary(daemons, standby, vol, state, "--discard-standby-data")
    assert kept.daemon.wait_for("volume_file_bound", timeout=10)["reason"] == "discard"
    handshake = kept.daemon.wait_for("handshake")
    assert handshake["full_sync"] and not handshake["created"], handshake
    run("qemu-io", "-f", "raw", "-c", "flush", kept.uri())
    kept.wait_in_sync()
    assert sha(standby.replica("vol0")) == sha(vol)
    assert standby.status()["volumes"][0]["state"] == "uptodate"


def test_the_same_file_resumes_without_a_full_sync_after_a_clean_stop_and_after_kill_9(
    daemons: Daemons, tmp_path: Path
) -> None:
    state = tmp_path / "a-state"
    standby, first = mirrored_pair(daemons, tmp_path, "--state-dir", str(state), folder="a")
    vol = first.volumes["vol0"]
    assert first.daemon.stop() == 0

    second = start_primary(daemons, standby, vol, state)  # waits until connected and in sync
    assert not events(second.daemon, "volume_file_mismatch")
    assert not events(second.daemon, "volume_file_bound")
    assert not second.daemon.wait_for("handshake")["full_sync"]
    assert second.metrics().get("standby_resync_bytes_total", volume="vol0") == 0
    write(second, MiB, MiB, 0x22)
    second.wait_in_sync()
    second.daemon.kill()  # kill -9: an unclean stop
    # A change of the file in place after a crash is not noticed (only the file's identity, size and
    # generation attribute are checked then: there is no clean record to compare with).
    with open(vol, "r+b") as f:
        f.seek(8 * MiB)
        f.write(rand(64 * 1024, seed=5))

    third = start_primary(daemons, standby, vol, state)
    assert not events(third.daemon, "volume_file_mismatch")
    assert not third.daemon.wait_for("handshake")["full_sync"]
    write(third, 0, 64 * 1024, 0x44)
    third.wait_in_sync()
    # The crash left the regions the primary had marked: resent, far less than the volume.
    assert third.metrics().get("standby_resync_bytes_total", volume="vol0") <= 16 * MiB


def primary_argv(vol: Path, standby: str, state: Path) -> list[str]:
    return [
        *_console(*PRIMARY_CMD), "--volume", f"vol0={vol},size=32MiB", "--standby", standby,
        "--state-dir", str(state), "--nbd-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
    ]  # fmt: skip


def refused_at_start(argv: list[str]) -> str:
    """Run a primary that must refuse to start: its one line on stderr."""
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert cp.returncode == 1, f"exit {cp.returncode}\n{cp.stderr}"
    lines = [line for line in cp.stderr.splitlines() if line.startswith("standby-primary:")]
    assert len(lines) == 1, cp.stderr
    return lines[0]


def test_a_volume_file_another_process_holds_is_refused(daemons: Daemons, tmp_path: Path) -> None:
    standby = daemons.standby()
    vol = tmp_path / "a" / "vol0.img"
    vol.parent.mkdir()
    primary = start_primary(daemons, standby, vol, tmp_path / "a-state")
    line = refused_at_start(primary_argv(vol, standby.grpc, tmp_path / "b-state"))
    assert "volume 'vol0'" in line and f"{vol} is in use by another process" in line, line
    # The standby daemon's replica (it holds its replicas open) is refused too.
    line = refused_at_start(primary_argv(standby.replica("vol0"), standby.grpc, tmp_path / "c-state"))
    assert "is in use by another process" in line, line
    assert (
        primary.daemon.alive() and primary.metrics().get("standby_replication_connected", volume="vol0") == 1
    )

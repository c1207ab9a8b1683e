"""The backup node against real daemons: a frozen snapshot streamed over NBD into an archive while the
primary keeps writing; restored with GNU tar and with `standby-backup restore`; failures that leave no
snapshot behind and no archive that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import (
    VOLUME_SIZE,
    Appliance,
    Daemons,
    MiB,
    backup_argv,
    need,
    rand,
    run,
)
from faults_support import writes_reach

pytestmark = pytest.mark.timeout(240)


def populate(a: Appliance) -> None:
    """Data in three places, holes elsewhere."""
    a.writer.write(0, rand(3 * MiB, seed=11))
    a.writer.write(12 * MiB, rand(MiB, seed=12))
    a.writer.fill(30 * MiB, MiB, 0x5A)


def storm(a: Appliance, seconds: float) -> subprocess.Popen[str]:
    """fio random writes through the primary for `seconds` into [16 MiB, 24 MiB) (the rest keeps its
    holes), so the origin moves during the backup."""
    need("fio")
    return subprocess.Popen(
        [
            "fio", "--name=during", "--ioengine=nbd", f"--uri={a.primary.uri('vol0')}", "--rw=randwrite",
            "--bs=64k", "--offset=16M", "--size=8M", "--iodepth=4", "--time_based", f"--runtime={seconds}",
            "--randrepeat=0",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=a.tmp,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "err= 0" in out, f"a client write failed:\n{out}"


def backup(a: Appliance, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(
        *backup_argv("run", "vol0", "--standby", a.standby.grpc, "--metrics-listen", "off", *args),
        check=check,
        timeout=120,
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def untar(archive: Path, into: Path) -> Path:
    need("tar", "zstd")
    into.mkdir()
    run("tar", "--zstd", "-xSf", archive, "-C", into)
    return into / "vol0.img"


def test_backup_while_writing_restores_the_snapshot_image_with_tar_and_restore(appliance: Appliance) -> None:
    need("fio", "nbdcopy")
    a = appliance
    populate(a)
    writes = storm(a, 6)
    writes_reach(a.standby, writes)  # the origin moves before the backup starts, and during it
    archive = a.tmp / "vol0.tar.zst"
    textfile = a.tmp / "backup.prom"
    out = backup(a, "--output", str(archive), "--keep-snapshot", "--metrics-textfile", str(textfile))
    assert "backed up vol0@" in out.stderr
    [snap] = a.standby.snapshots("vol0")
    # the image of snapshot time, read from the kept snapshot with nbdcopy while writes go on
    frozen = a.read_export(a.standby.uri(f"vol0@{snap['name']}"), "frozen.img")
    finish(writes)
    assert hashlib.sha256(frozen).hexdigest() != sha(a.volume_path), "the origin did not move on"

    restored = untar(archive, a.tmp / "tar")
    assert restored.read_bytes() == frozen, "GNU tar restored another image than the snapshot's"
    assert restored.stat().st_blocks * 512 < VOLUME_SIZE, "GNU tar did not restore the image sparse"
    ours = a.tmp / "ours.img"
    run(*backup_argv("restore", str(archive), "--output", str(ours)))
    assert ours.read_bytes() == frozen, "standby-backup restore gave another image than the snapshot's"
    assert ours.stat().st_blocks * 512 <= restored.stat().st_blocks * 512 + MiB
    assert "complete" in run(*backup_argv("verify", str(archive))).stdout

    metrics = textfile.read_text()
    series = 'standby_backup_last_success_timestamp_seconds{kind="full",volume="vol0"}'
    assert series in metrics
    last = float(metrics.split(series + " ")[1].split()[0])
    assert abs(last - time.time()) < 120
    a.standby.ctl("snapshot", "delete", "vol0", snap["name"])


def test_an_existing_snapshot_into_a_pipe_is_left_in_place(appliance: Appliance) -> None:
    need("nbdcopy")
    a = appliance
    populate(a)
    name = a.standby.snapshot("vol0", "nightly")
    frozen = a.model.freeze()
    a.writer.write(0, rand(MiB, seed=13))  # the origin moves on before the backup
    archive = a.tmp / "piped.tar.zst"
    with open(archive, "wb") as sink:
        proc = subprocess.Popen(
            backup_argv("run", "vol0", "--standby", a.standby.grpc, "--snapshot", name, "--output", "-",
                        "--metrics-listen", "off"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        cat = subprocess.run(["cat"], stdin=proc.stdout, stdout=sink, check=True)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        assert cat.returncode == 0
    kept = [s["name"] for s in a.standby.snapshots("vol0")]
    assert kept == [name], "the snapshot given was not left in place"
    restored = a.tmp / "r.img"
    run(*backup_argv("restore", str(archive), "--output", str(restored)))
    assert restored.read_bytes() == frozen


def test_no_snapshot_is_left_behind_and_bad_requests_fail_clearly(
    appliance: Appliance, tmp_path: Path
) -> None:
    a = appliance
    populate(a)
    archive = tmp_path / "a.tar.zst"
    backup(a, "--output", str(archive))
    assert a.standby.snapshots("vol0") == [], "the snapshot made for the backup was not deleted"
    # the output exists: refused without --force, left untouched
    before = sha(archive)
    cp = backup(a, "--output", str(archive), check=False)
    assert cp.returncode == 1 and "give --force" in cp.stderr and sha(archive) == before
    # unknown volume
    cp = run(*backup_argv("run", "nope", "--standby", a.standby.grpc, "--output", str(tmp_path / "x"),
                          "--metrics-listen", "off"), check=False)  # fmt: skip
    assert cp.returncode == 1 and "no volume 'nope'" in cp.stderr and len(cp.stderr.strip().splitlines()) == 1
    # unknown snapshot
    cp = backup(a, "--output", str(tmp_path / "y"), "--snapshot", "missing", check=False)
    assert cp.returncode == 1 and "no snapshot 'missing'" in cp.stderr
    # unreachable standby
    cp = run(*backup_argv("run", "vol0", "--standby", "127.0.0.1:1", "--output", str(tmp_path / "z"),
                          "--timeout", "3", "--metrics-listen", "off"), check=False)  # fmt: skip
    assert cp.returncode == 1 and "cannot reach 127.0.0.1:1" in cp.stderr
    # the output's disk is full: a clear line, and the snapshot released
    cp = backup(a, "--output", "/dev/full", check=False)
    assert cp.returncode == 1 and "No space left on device" in cp.stderr, cp.stderr
    assert a.standby.snapshots("vol0") == []


def test_a_snapshot_invalidated_during_the_backup_fails_it_and_the_archive_stays_incomplete(
    daemons: Daemons, tmp_path: Path
) -> None:
    standby = daemons.standby(None, "--preservation-capacity", "2MiB")
    vol = tmp_path / "vol0.img"
    with open(vol, "wb") as f:
        f.truncate(VOLUME_SIZE)
        f.write(rand(16 * MiB, seed=21))
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"})
    fifo = tmp_path / "archive.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        backup_argv("run", "vol0", "--standby", standby.grpc, "--output", str(fifo),
                    "--metrics-listen", "off", "--connections", "1", "--request-size", "256KiB"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with open(fifo, "rb") as reader:
        first = reader.read(64 * 1024)  # the backup is under way and blocked on its output
        assert first
        # overwrite more than the store holds: the snapshot is invalidated
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "flush", primary.uri("vol0"))
        rest = reader.read()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]  # the one error line, after the JSON log lines
    assert last.startswith("standby-backup: ") and "is invalid" in last, err
    partial = tmp_path / "partial.tar.zst"
    partial.write_bytes(first + rest)
    cp = run(*backup_argv("verify", str(partial)), check=False)
    assert cp.returncode == 1 and ("did not finish" in cp.stderr or "ends early" in cp.stderr), cp.stderr
    assert [s for s in standby.snapshots("vol0")] == [], "the invalidated snapshot was not released"


def test_the_lease_frees_the_snapshot_of_a_backup_node_that_died(appliance: Appliance) -> None:
    a = appliance
    populate(a)
    fifo = a.tmp / "stuck.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        backup_argv("run", "vol0", "--standby", a.standby.grpc, "--output", str(fifo), "--lease", "2",
                    "--metrics-listen", "off"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with open(fifo, "rb") as reader:
        assert reader.read(1024)  # it made its snapshot and started writing
        deadline = time.monotonic() + 10
        while not a.standby.snapshots("vol0") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(a.standby.snapshots("vol0")) == 1
        proc.kill()  # kill -9: no cleanup runs
        proc.wait()
    deadline = time.monotonic() + 15
    while a.standby.snapshots("vol0") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.standby.snapshots("vol0") == [], "the lease did not release the dead backup's snapshot"
    expired = a.standby.daemon.wait_for("snapshot_lease_expired", timeout=10)
    assert expired["volume"] == "vol0"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_releases_the_snapshot(appliance: Appliance, sig: signal.Signals) -> None:
    a = appliance
    populate(a)
    fifo = a.tmp / "slow.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        backup_argv("run", "vol0", "--standby", a.standby.grpc, "--output", str(fifo),
                    "--metrics-listen", "off"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    with open(fifo, "rb") as reader:
        assert reader.read(1024)  # under way: its snapshot exists
        assert len(a.standby.snapshots("vol0")) == 1
        proc.send_signal(sig)
        reader.read()  # let it unwind
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip().endswith("standby-backup: interrupted"), err
    assert a.standby.snapshots("vol0") == [], "the interrupted backup left its snapshot behind"


def test_a_failed_run_keeps_the_last_success_in_the_metrics_textfile(appliance: Appliance) -> None:
    a = appliance
    populate(a)
    textfile = a.tmp / "standby_backup_vol0.prom"

    def value(name: str) -> float:
        labels = '{kind="full",volume="vol0"}' if "last_success" in name else '{volume="vol0"}'
        line = next(x for x in textfile.read_text().splitlines() if x.startswith(name + labels))
        return float(line.split()[-1])

    backup(a, "--output", str(a.tmp / "ok.tar.zst"), "--metrics-textfile", str(textfile))
    first = value("standby_backup_last_success_timestamp_seconds")
    assert abs(first - time.time()) < 120 and value("standby_backup_last_run_success") == 1
    cp = backup(a, "--output", "/dev/full", "--metrics-textfile", str(textfile), check=False)
    assert cp.returncode == 1
    assert value("standby_backup_last_success_timestamp_seconds") == first, (
        "a failed run erased the last success"
    )
    assert value("standby_backup_last_run_success") == 0


def test_an_archive_of_a_replica_behind_its_primary_says_so(appliance: Appliance) -> None:
    """Snapshots of a replica whose primary is away are allowed (backups go on during an outage), and
    the archive records the replica's state at the snapshot: `list` shows it."""
    a = appliance
    populate(a)
    a.primary.wait_in_sync()
    following = a.tmp / "following.tar.zst"
    backup(a, "--output", str(following))
    m = json.loads(run(*backup_argv("list", str(following), "--json")).stdout)
    assert m["replica"]["state"] == "uptodate" and m["replica"]["connected"] is True, m["replica"]
    assert m["replica"]["lag_seconds"] == 0, m["replica"]
    assert "following its primary" in run(*backup_argv("list", str(following))).stdout

    assert a.primary.daemon.stop() == 0
    deadline = time.monotonic() + 30
    while a.standby.status()["volumes"][0]["connected"]:
        assert time.monotonic() < deadline, "the standby did not see its primary go"
        time.sleep(0.1)
    time.sleep(1.5)
    behind = a.tmp / "behind.tar.zst"
    backup(a, "--output", str(behind))
    m = json.loads(run(*backup_argv("list", str(behind), "--json")).stdout)
    assert m["replica"]["connected"] is False and m["replica"]["lag_seconds"] >= 1.0, m["replica"]
    assert m["replica"]["in_sync_at"].endswith("Z"), m["replica"]
    text = run(*backup_argv("list", str(behind))).stdout
    assert "disconnected when the snapshot was taken" in text and "older image" in text, text


def test_pre_and_post_snapshot_commands_bracket_the_snapshot(appliance: Appliance) -> None:
    """--pre-snapshot / --post-snapshot (fsfreeze -f / -u on the primary, say) run just before and just
    after the snapshot; a failing one fails the run and leaves no snapshot; post runs whatever happened."""
    a = appliance
    populate(a)
    a.primary.wait_in_sync()
    trail = a.tmp / "hooks.log"
    pre = f'echo "pre $STANDBY_VOLUME" >> {trail}'
    post = f'echo "post $STANDBY_VOLUME $STANDBY_SNAPSHOT" >> {trail}'
    out = a.tmp / "hooked.tar.zst"
    backup(a, "--output", str(out), "--pre-snapshot", pre, "--post-snapshot", post)
    lines = trail.read_text().splitlines()
    assert lines[0] == "pre vol0" and lines[1].startswith("post vol0 backup-"), lines
    assert "complete" in run(*backup_argv("verify", str(out))).stdout

    for hooks, name in (
        ((f"{pre}; exit 3", post), "--pre-snapshot"),
        ((pre, f"{post}; exit 4"), "--post-snapshot"),
    ):
        trail.unlink()
        out = str(a.tmp / "no.tar.zst")
        cp = backup(a, "--output", out, "--pre-snapshot", hooks[0], "--post-snapshot", hooks[1], check=False)
        err = cp.stderr.strip().splitlines()[-1]  # (after the run's JSON log lines)
        assert cp.returncode == 1 and err.startswith("standby-backup: the ") and "Traceback" not in cp.stderr
        assert name in err and "exit status" in err, err
        assert [line.split()[0] for line in trail.read_text().splitlines()] == ["pre", "post"]
        assert a.standby.snapshots("vol0") == [], "a failed hook left a snapshot"
        assert not (a.tmp / "no.tar.zst").exists()

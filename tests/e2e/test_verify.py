"""Online verify (`standbyctl verify VOLUME [--repair]`) and the checksum-skipping full sync, with the real
daemons: a byte flipped in the replica file is found (exactly that block), repaired, and a second verify
finds nothing; a verify during a fio storm reports no false mismatch; refusals are one clear line; a full
sync of a replica that holds most of the data already resends only what differs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import BS, VOLUME_SIZE, Appliance, Daemons, MiB, need, rand, run
from faults_support import writes_reach

pytestmark = pytest.mark.timeout(240)

BLOCKS = VOLUME_SIZE // BS


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip(path: Path, offset: int) -> None:
    """Invert one byte of the replica file behind the standby's back (bit rot, a stray write)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def verify_json(app: Appliance, *extra: str) -> tuple[int, dict[str, object]]:
    cp = app.standby.ctl("verify", "vol0", "--json", *extra, check=False)
    assert cp.returncode in (0, 1), f"verify exited {cp.returncode}\n{cp.stdout}\n{cp.stderr}"
    try:
        return cp.returncode, json.loads(cp.stdout)
    except ValueError:
        pytest.fail(f"verify --json printed no JSON (exit {cp.returncode}):\n{cp.stdout}\n{cp.stderr}")


def test_a_flipped_byte_is_found_repaired_and_then_gone(appliance: Appliance) -> None:
    app = appliance
    app.writer.fill(0, 12 * MiB, 0x5A)
    app.writer.write(20 * MiB, rand(2 * MiB, seed=3))
    app.writer.flush()
    app.primary.wait_in_sync()
    replica = app.standby.replica("vol0")
    assert sha(replica) == sha(app.volume_path)

    bad = 20 * MiB + 37 * BS
    flip(replica, bad + 1234)
    cp = app.standby.ctl("verify", "vol0", check=False)
    assert cp.returncode == 1, f"out of sync must exit 1:\n{cp.stdout}\n{cp.stderr}"
    assert cp.stdout.strip() == f"vol0: 1 of {BLOCKS} blocks out of sync (first offsets: {bad})", cp.stdout

    code, found = verify_json(app)
    assert code == 1 and found["mismatched_blocks"] == 1 and found["first_offsets"] == [bad], found

    cp = app.standby.ctl("verify", "vol0", "--repair", check=False)
    assert cp.returncode == 0, f"a repaired verify must exit 0:\n{cp.stdout}\n{cp.stderr}"
    assert cp.stdout.strip() == f"vol0: 1 of {BLOCKS} blocks out of sync (first offsets: {bad}), repaired 1"

    cp = app.standby.ctl("verify", "vol0", check=False)
    assert cp.returncode == 0 and cp.stdout.strip() == f"vol0: 0 of {BLOCKS} blocks out of sync", cp.stdout
    app.writer.flush()
    app.primary.wait_in_sync()
    assert sha(replica) == sha(app.volume_path), "the replica differs from the primary after the repair"
    deadline = time.monotonic() + 10  # the last session's log line may trail its final answer
    while len([e for e in app.standby.daemon.events if e.get("event") == "verify_done"]) < 4:
        assert time.monotonic() < deadline, app.standby.daemon.tail()
        time.sleep(0.1)
    started = [e for e in app.standby.daemon.events if e.get("event") == "verify_started"]
    done = [e for e in app.standby.daemon.events if e.get("event") == "verify_done"]
    assert len(started) == len(done) == 4, (started, done)
    assert done[2]["mismatched_blocks"] == 1 and done[2]["repaired_blocks"] == 1


def test_verify_during_a_fio_storm_reports_no_false_mismatch(appliance: Appliance, tmp_path: Path) -> None:
    need("fio")
    app = appliance
    storm = subprocess.Popen(
        [
            "fio", "--name=storm", "--ioengine=nbd", f"--uri={app.primary.uri('vol0')}", "--rw=randwrite",
            "--bssplit=4k/60:64k/30:512/10", "--blockalign=512", f"--size={VOLUME_SIZE}", "--iodepth=8",
            "--time_based", "--runtime=8", "--randrepeat=0",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        writes_reach(app.standby, storm)  # writes are flowing
        results = []
        while storm.poll() is None and len(results) < 3:
            code, found = verify_json(app)
            results.append(found)
            assert code == 0 and found["mismatched_blocks"] == 0, f"false mismatch under writes: {found}"
            assert found["checked_bytes"] == VOLUME_SIZE
        assert results, "no verify ran while fio wrote"
    finally:
        out, _ = storm.communicate(timeout=120)
    assert storm.returncode == 0 and "err= 0" in out, f"a client write failed:\n{out}"
    run("qemu-io", "-f", "raw", "-c", "flush", app.primary.uri("vol0"))
    app.primary.wait_in_sync()
    assert sha(app.standby.replica("vol0")) == sha(app.volume_path)


def test_verify_is_refused_with_one_clear_line(appliance: Appliance) -> None:
    app = appliance
    cp = app.standby.ctl("verify", "nope", check=False)
    assert cp.returncode == 1 and cp.stdout == ""
    assert cp.stderr.strip() == "standbyctl: unknown volume 'nope'", cp.stderr
    cp = app.standby.ctl("verify", check=False)
    assert cp.returncode == 2, cp.stderr
    assert app.primary.daemon.stop() == 0
    cp = app.standby.ctl("verify", "vol0", check=False)
    assert cp.returncode == 1 and cp.stdout == ""
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1 and "no primary is connected" in lines[0], cp.stderr


def test_a_full_sync_over_old_data_resends_only_what_differs(daemons: Daemons, tmp_path: Path) -> None:
    need("qemu-io")
    vol = tmp_path / "primary" / "vol0.img"
    vol.parent.mkdir()
    data_bytes = 28 * MiB  # the last 4 MiB stay a hole
    with open(vol, "wb") as f:
        f.truncate(VOLUME_SIZE)
        f.write(rand(data_bytes, seed=11))
    standby = daemons.standby()
    first = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"})  # a new replica: a plain full copy
    assert first.daemon.stop() == 0
    replica = standby.replica("vol0")
    assert sha(replica) == sha(vol)
    changed = [0, 9 * MiB + 3 * BS, 9 * MiB + 4 * BS, 27 * MiB + 100 * BS]
    for offset in changed:
        flip(replica, offset + 7)

    again = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, "--discard-standby-data")
    handshake = again.daemon.wait_for("handshake")
    assert handshake["full_sync"] and not handshake["created"], handshake
    run("qemu-io", "-f", "raw", "-c", "flush", again.uri("vol0"))
    again.wait_in_sync()
    assert sha(replica) == sha(vol), "the replica differs from the primary after the full sync"
    assert standby.status()["volumes"][0]["state"] == "uptodate"
    sent = again.daemon.wait_for("resync_sent", timeout=30)
    hole = VOLUME_SIZE - data_bytes
    assert sent["checksummed_bytes"] == data_bytes, sent
    assert sent["resent_after_checksum_bytes"] == len(changed) * BS, sent
    assert sent["skipped_bytes"] == data_bytes - len(changed) * BS, sent
    resent = again.metrics().get("standby_resync_bytes_total", volume="vol0")
    # The zeroed hole regions and the four blocks that differed; not the 28 MiB of data.
    assert resent == hole + len(changed) * BS, resent

"""A replica written outside the standby daemon while it was stopped.

A snapshot reads the blocks no write of the daemon changed from the replica itself, so bytes written into
the replica file by something else (a careless `dd`, a restore of the wrong file, a tool run on the data
directory) silently change the snapshot's frozen image. The daemon must notice at start (the replica's
stamp no longer matches) and invalidate the snapshots of that replica, with a reason that says so,
rather than serve a changed image under the old name. A clean stop and start without touching the file
must keep every snapshot valid and reading its image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Daemons, MiB, Model, Primary, Standby, Writer, need, qemu_io, rand, run
from faults_support import assert_snapshot, sha, start_pair
from linkproxy import LinkProxy

pytestmark = pytest.mark.timeout(180)

#: Where the outside write lands: inside the data the snapshot froze.
CHANGED_AT = 1 * MiB
CHANGED_LENGTH = 256 * 1024


@dataclass
class Pair:
    """A standby and a primary (joined by a proxy, so a restarted standby is reachable again), vol0 in
    sync holding 4 MiB of data, and snapshot S of that image."""

    daemons: Daemons
    standby: Standby
    primary: Primary
    proxy: LinkProxy
    image: Path  # what S must read

    def stop_standby(self) -> None:
        rc = self.standby.daemon.stop()
        assert rc == 0, f"the standby exited {rc} on SIGTERM:\n{self.standby.daemon.tail()}"

    def start_standby(self) -> Standby:
        self.standby = self.daemons.standby(self.standby.data_dir)
        self.proxy.restore(self.standby)
        return self.standby

    def write_outside(self, tmp: Path, seed: int) -> None:
        """New bytes over part of S's data, straight into the replica file (the daemon is stopped)."""
        junk = tmp / "junk.bin"
        junk.write_bytes(rand(CHANGED_LENGTH, seed=seed))
        replica = self.standby.replica("vol0")
        run(
            "dd", f"if={junk}", f"of={replica}", "bs=4096", f"seek={CHANGED_AT // 4096}", "conv=notrunc,fsync"
        )


@pytest.fixture
def pair(daemons: Daemons, tmp_path: Path) -> Iterator[Pair]:
    need("qemu-io", "nbdcopy")
    standby, primary, proxy = start_pair(daemons, tmp_path)
    try:
        model = Model(VOLUME_SIZE)
        scratch = tmp_path / "scratch"
        scratch.mkdir()
        writer = Writer(primary.uri("vol0"), model, scratch)
        writer.many([(o, rand(MiB, seed=o)) for o in range(0, 4 * MiB, MiB)])
        primary.wait_in_sync()
        assert standby.snapshot("vol0", "S") == "S"
        yield Pair(daemons, standby, primary, proxy, model.save(tmp_path / "S.expected.img"))
    finally:
        proxy.close()


def says_changed_outside(reason: str) -> bool:
    """The reason says the replica was changed outside the daemon ("outside the daemon", "while the
    standby was not running"); paths in it do not count (the test's own directory is named so)."""
    words = " ".join(w for w in reason.lower().split() if "/" not in w)
    changed = any(w in words for w in ("chang", "modif", "written", "wrote"))
    outside = any(w in words for w in ("outside", "not running", "was stopped", "while the standby was down"))
    return "replica" in words and changed and outside


def test_a_replica_written_outside_the_daemon_invalidates_its_snapshots(pair: Pair, tmp_path: Path) -> None:
    pair.stop_standby()
    pair.write_outside(tmp_path, seed=666)
    again = pair.start_standby()

    snaps = {s["name"]: s for s in again.snapshots("vol0")}
    assert "S" in snaps, f"snapshot S is gone after the restart: {snaps}"
    s = snaps["S"]
    assert s["valid"] is False, f"snapshot S reads a replica changed outside the daemon but is valid: {s}"
    reason = str(s.get("reason", ""))
    assert says_changed_outside(reason), (
        f"the reason does not say the replica was changed outside the daemon: {reason!r}"
    )

    cp = qemu_io(again.uri("vol0@S"), "read 0 4096", check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0 or "failed" in out, f"reading vol0@S over NBD succeeded:\n{out}"

    ev = again.daemon.wait_for("snapshot_invalidated", timeout=15, volume="vol0", snapshot="S")
    assert says_changed_outside(str(ev.get("reason", ""))), f"snapshot_invalidated event: {ev}"


def test_a_clean_restart_keeps_snapshots_valid(pair: Pair, tmp_path: Path) -> None:
    pair.stop_standby()
    again = pair.start_standby()
    snaps = {s["name"]: s for s in again.snapshots("vol0")}
    assert snaps.get("S", {}).get("valid") is True, f"snapshot S after a clean restart: {snaps}"
    assert_snapshot(again, "S", pair.image, tmp_path)
    # A barrier in the standby's log: every line it wrote before (the start-up's checks of the replica,
    # the reads above) has been read by the time its creation of this snapshot is.
    again.snapshot("vol0", "barrier")
    again.daemon.wait_for("snapshot_created", timeout=15, snapshot="barrier")
    invalidated = [e for e in again.daemon.events if e.get("event") == "snapshot_invalidated"]
    assert not invalidated, f"a clean restart invalidated snapshots: {invalidated}"


def test_a_replica_written_outside_the_daemon_is_resynced_from_the_primary(
    pair: Pair, tmp_path: Path
) -> None:
    """Beyond invalidating the snapshots: the replica no longer holds the primary's data, so it must not
    go on reporting itself up to date; the primary's next connection makes it equal again."""
    pair.stop_standby()
    pair.write_outside(tmp_path, seed=667)
    again = pair.start_standby()
    pair.primary.wait_in_sync(timeout=60)
    assert sha(again.replica("vol0")) == sha(pair.primary.volumes["vol0"]), (
        "the replica changed outside the daemon was not made equal to the primary again "
        f"(status: {again.status()['volumes'][0]['state']})"
    )
    assert again.status()["volumes"][0]["state"] == "uptodate"

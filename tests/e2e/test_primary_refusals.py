"""A standby that takes the handshake and refuses every batch (`--on-full defer` with a snapshot whose
room is smaller than the writes): the primary does not hammer it (a few attempts over many seconds, a
few log lines on either side), reports itself disconnected with the refusal counted by reason, and
replicates again promptly once the snapshot is deleted. Real daemons on loopback."""

from __future__ import annotations

import time

import pytest
from e2e_support import Daemons, MiB, mirrored_pair, run
from faults_support import sha

pytestmark = pytest.mark.timeout(240)

WINDOW = 12.0  # seconds of refusals watched


def events(daemon, name: str) -> list[dict]:
    return [e for e in list(daemon.events) if e.get("event") == name]


def test_a_standby_refusing_every_batch_is_retried_with_backoff_and_recovers(
    daemons: Daemons, tmp_path
) -> None:
    standby, primary = mirrored_pair(daemons, tmp_path, standby_extra=("--on-full", "defer"))
    m = primary.metrics()
    assert m.get("standby_replication_connected", volume="vol0") == 1
    assert m.get("standby_replication_state", volume="vol0", state="connected") == 1

    standby.snapshot("vol0", "held", "--capacity", "64KiB")  # room for 16 preserved blocks
    # Overwriting 1 MiB needs 256: the standby refuses (RESOURCE_EXHAUSTED) and holds the volume back.
    # The client's writes are answered all the same (tracked in the primary's bitmap).
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", "-c", "flush", primary.uri("vol0"), timeout=60)
    first = primary.daemon.wait_for("mirror_disconnected", timeout=30)
    assert first["error"].startswith("RESOURCE_EXHAUSTED"), first
    assert first["state"] == "refused", first

    # Watch the refusals for WINDOW seconds: each attempt is a handshake on the standby.
    handshakes = len(events(standby.daemon, "handshake"))
    primary_lines = len(primary.daemon.lines)
    standby_lines = len(standby.daemon.lines)
    started = time.monotonic()
    checked = False
    while time.monotonic() - started < WINDOW:
        attempts = len(events(standby.daemon, "handshake")) - handshakes
        assert attempts <= 5, f"{attempts} reconnects in {time.monotonic() - started:.1f} s"
        if not checked and attempts >= 1:  # a scrape while it is refused, after a retry
            m = primary.metrics()
            assert m.get("standby_replication_connected", volume="vol0") == 0
            assert m.get("standby_replication_state", volume="vol0", state="refused") == 1
            assert m.get("standby_mirror_refusals_total", volume="vol0", reason="resource_exhausted") >= 1
            checked = True
        time.sleep(0.1)
    attempts = len(events(standby.daemon, "handshake")) - handshakes
    assert 1 <= attempts <= 5, attempts
    assert checked
    # Every attempt but maybe the one under way was refused and counted.
    refusals = primary.metrics().get(
        "standby_mirror_refusals_total", volume="vol0", reason="resource_exhausted"
    )
    assert refusals >= attempts, (refusals, attempts)
    # Before: about 5 reconnects and 38 log lines a second. Now one line on the primary for the whole
    # outage (its first `mirror_disconnected` came before the window), a handful per attempt on the
    # standby (its own events, not the primary's to change).
    assert len(primary.daemon.lines) - primary_lines <= 2, primary.daemon.tail(10)
    assert len(standby.daemon.lines) - standby_lines <= 8 * attempts, standby.daemon.tail(20)
    assert standby.status()["volumes"][0]["state"] == "deferred"

    # The cause removed: the next attempt (at most the cap of the backoff away) catches up.
    connected_before = len(events(primary.daemon, "mirror_connected"))
    standby.ctl("snapshot", "delete", "vol0", "held")
    deleted = time.monotonic()
    primary.wait_in_sync(timeout=60)
    assert time.monotonic() - deleted < 45, "replication did not recover promptly"
    assert sha(standby.replica("vol0")) == sha(primary.volumes["vol0"])
    assert standby.status()["volumes"][0]["state"] == "uptodate"
    back = primary.daemon.wait_for("mirror_connected", attempts=attempts + 1)
    assert back["resync_bytes"] >= MiB, back
    assert len(events(primary.daemon, "mirror_connected")) == connected_before + 1
    assert primary.metrics().get("standby_replication_state", volume="vol0", state="connected") == 1


def test_a_second_primary_cannot_take_a_live_volume_even_with_discard(daemons: Daemons, tmp_path) -> None:
    """Tried as a new user would: a second primary with the same volume name and --discard-standby-data
    while the first one mirrors. It is refused at its handshake (counted by reason) and the live replica
    stays up to date: snapshots allowed, the first primary still mirroring."""
    standby, first = mirrored_pair(daemons, tmp_path)
    other = tmp_path / "other" / "vol0.img"
    other.parent.mkdir()
    second = daemons.primary(
        standby, {"vol0": f"{other},size=32MiB"}, "--discard-standby-data", in_sync=False
    )
    deadline = time.monotonic() + 30
    while (
        standby.metrics().find("standby_replication_refusals_total", volume="vol0", reason="busy") or 0
    ) < 1:
        assert time.monotonic() < deadline, "the second primary's handshake was never refused"
        time.sleep(0.1)
    [vol] = standby.status()["volumes"]
    assert vol["state"] == "uptodate", vol
    standby.snapshot("vol0", "after-the-intruder")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "flush", first.uri("vol0"))
    first.wait_in_sync()
    assert sha(first.volumes["vol0"]) == sha(standby.replica("vol0"))
    assert second.daemon.alive(), "the refused primary keeps serving its own clients"

    # Idle, the volume still belongs to the first primary: another one is refused, even with
    # --discard-standby-data, until an operator releases it on the standby (named and logged).
    assert second.daemon.stop() == 0
    assert first.daemon.stop() == 0
    deadline = time.monotonic() + 30
    while standby.status()["volumes"][0]["connected"]:
        assert time.monotonic() < deadline, "the standby did not see the first primary go"
        time.sleep(0.1)
    third = daemons.primary(standby, {"vol0": f"{other},size=32MiB"}, "--discard-standby-data", in_sync=False)
    refused = third.daemon.wait_for("mirror_disconnected", timeout=30)
    assert "standbyctl takeover vol0" in refused["error"], refused
    assert sha(first.volumes["vol0"]) == sha(standby.replica("vol0")), "the idle replica was replaced"
    assert third.daemon.stop() == 0
    out = standby.ctl("takeover", "vol0").stdout
    assert "released" in out, out
    taken = standby.daemon.wait_for("volume_takeover", timeout=5)
    assert taken["previous_owner"], taken
    fourth = daemons.primary(
        standby, {"vol0": f"{other},size=32MiB"}, "--discard-standby-data", in_sync=False
    )
    fourth.wait_in_sync(timeout=60)
    assert sha(other) == sha(standby.replica("vol0"))
    assert standby.status()["volumes"][0]["owner"] != taken["previous_owner"]

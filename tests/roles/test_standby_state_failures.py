"""The standby node when its state files cannot be saved (a full or failing disk): the change is refused
and nothing is left held, memory and disk say the same, the failure is loud, and everything works again
once the file can be written, with no restart.

A state file's save fails here because a directory stands where its temporary file goes: a real failure
of the real write path, not a mock.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from standby.node import INCONSISTENT, UPTODATE, StandbyNode
from standbylib.errors import DiskFull, PreservationDeferred, StandbyError

MiB = 1 << 20


class Blocked:
    """Saves of `name` in the data directory fail while entered."""

    def __init__(self, node: StandbyNode, name: str) -> None:
        self.trap = Path(node.data_dir) / f"{name}.tmp"

    def __enter__(self) -> Blocked:
        self.trap.mkdir()
        return self

    def __exit__(self, *exc: object) -> None:
        self.trap.rmdir()


def synced(node: StandbyNode, generation: str = "g1"):
    """vol0, created and fully synced at `generation`."""
    replica, _created, _full = node.handshake("vol0", 4 * MiB, 4096, generation=generation)
    node.open_stream("vol0", "p1", 1, resync=True, generation=generation)
    node.apply(replica, 1, [(0, b"\x01" * 4096)], flush=True, uptodate=True)
    node.close_stream(replica)
    assert replica.state == UPTODATE and replica.generation == generation
    return replica


def saved_state(node: StandbyNode) -> dict:
    with open(os.path.join(node.data_dir, "state.json")) as fh:
        return json.load(fh)["volumes"]


def test_a_stream_whose_state_cannot_be_saved_is_refused_and_holds_nothing(node):
    replica = synced(node)
    with Blocked(node, "state.json"):
        with pytest.raises(StandbyError, match=r"state\.json"):
            node.open_stream("vol0", "p1", 1, resync=True, generation="g2")
        # refused: not connected, the generation and state unchanged in memory and on disk
        assert not replica.connected
        assert replica.state == UPTODATE and replica.generation == "g1"
        saved = saved_state(node)["vol0"]
        assert (saved["inconsistent"], saved["generation"], saved["promoted"]) == (False, "g1", "")
        assert node.state_write_failures == {"state.json": 1}
        assert any("state.json" in p for p in node.problems())
    # space is back: the very next stream is taken at once (the volume was not left locked)
    started = time.monotonic()
    node.open_stream("vol0", "p1", 1, resync=True, generation="g2")
    assert time.monotonic() - started < 1
    assert replica.connected and replica.state == INCONSISTENT
    assert node.problems() == []
    node.close_stream(replica)


def test_the_end_of_a_resync_that_cannot_be_saved_is_not_acknowledged(node):
    replica = synced(node)
    node.open_stream("vol0", "p1", 1, resync=True, generation="g2")
    with Blocked(node, "state.json"), pytest.raises(StandbyError):
        node.apply(replica, 1, [(0, b"\x02" * 4096)], flush=True, uptodate=True)
    # not acknowledged, so the primary keeps its bits and sends the batch again; still inconsistent
    assert replica.state == INCONSISTENT and replica.applied_sequence == 0
    assert saved_state(node)["vol0"]["inconsistent"] is True
    assert node.apply(replica, 1, [(0, b"\x02" * 4096)], flush=True, uptodate=True)
    assert replica.state == UPTODATE and replica.generation == "g2"
    assert saved_state(node)["vol0"]["generation"] == "g2"
    node.close_stream(replica)


def test_a_snapshot_whose_lease_cannot_be_saved_is_not_left_behind(node):
    synced(node)
    with Blocked(node, "leases.json"), pytest.raises(StandbyError, match=r"leases\.json"):
        node.create_snapshot("vol0", "backup-1", lease=60)
    assert node.snapshots("vol0") == []
    assert node.export("vol0@backup-1") is None
    assert node.leases.remaining("vol0", "backup-1") is None
    # and once the file can be written, the same snapshot is taken with its lease
    info = node.create_snapshot("vol0", "backup-1", lease=60)
    assert info.valid and 0 < (node.leases.remaining("vol0", "backup-1") or 0) <= 60


def test_a_promotion_that_cannot_be_saved_changes_nothing(node):
    replica = synced(node)
    with Blocked(node, "state.json"), pytest.raises(StandbyError):
        node.promote("vol0")
    assert not replica.promoted_at and replica.generation == "g1"
    assert node.export("vol0") is None
    assert saved_state(node)["vol0"]["promoted"] == ""


def test_a_deleted_snapshot_stays_deleted_when_its_lease_entry_cannot_be_dropped(node):
    synced(node)
    node.create_snapshot("vol0", "s1", lease=60)
    with Blocked(node, "leases.json"):
        node.delete_snapshot("vol0", "s1")
    assert node.snapshots("vol0") == []
    assert node.leases.remaining("vol0", "s1") is None


def test_refusals_are_counted_by_reason_and_logged_once_per_cause(node):
    replica = synced(node)
    full = DiskFull(path="/data/replicas/vol0.img", detail="write at 0: No space left on device")
    assert node.refused("vol0", full) is True  # a new cause: the caller logs it
    assert node.refused("vol0", full) is False  # the same cause again: counted, not logged
    assert node.refused("vol0", PreservationDeferred(volume="vol0", snapshots="s1", needed=1, free=0))
    assert node.refusals == {("vol0", "disk_full"): 2, ("vol0", "deferred"): 1}
    assert "deferred" in replica.last_error or "held back" in replica.last_error
    # a name no replica has is counted, but not by that name (clients could make up any number)
    node.refused("no-such-volume", full)
    assert node.refusals[("", "disk_full")] == 1
    # an applied batch clears the last refusal
    node.open_stream("vol0", "p1", 1)
    node.apply(replica, 1, [(0, b"\x03" * 4096)], flush=False)
    assert replica.last_error == ""
    assert node.refused("vol0", full) is True
    node.close_stream(replica)


def test_the_data_directory_keeps_a_reserve_of_real_blocks(node):
    # given up for a state file on a full disk: tests/e2e/test_full_filesystem.py fills a real one
    reserve = Path(node.reserve_path)
    assert reserve.stat().st_size == 4 * MiB
    assert reserve.stat().st_blocks * 512 >= 4 * MiB  # allocated, not a sparse file

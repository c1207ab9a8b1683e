"""The resync sends trims before data: a standby whose disk is full, where only the trims of the dirty
regions make the room their data needs, catches up (in offset order it never would: the data regions
come first and are refused at every attempt). In process, real gRPC on loopback; the standby's disk is
simulated by counting the replica's allocated blocks in a wrapper of its `apply`."""

from __future__ import annotations

import os
import threading

from blockfiles import data_extents
from primary_support import BS, MiB, close, files_equal, mirrored, settled, start_wrapped_rig, wait_until

from standbylib.errors import DiskFull

REGION = 64 * 1024


def allocated_blocks(path: str) -> set[int]:
    """The blocks of `path` that hold data."""
    return {b for start, end in data_extents(path) for b in range(start // BS, -(-end // BS))}


class SmallDisk:
    """The standby's disk holds `capacity` bytes of replica data: a batch that would need more at any
    point, applying its ops in order (a zeroed range frees its blocks, a write takes them), fails as a
    full disk does (RESOURCE_EXHAUSTED, nothing applied). Records every op applied, in order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.allocated: set[int] | None = None
        self.ops: list[tuple[int, int, str]] = []  # (offset, length, "zero" | "data")
        self.refused = 0
        self.lock = threading.Lock()

    def __call__(self, node, apply):
        def wrapped(replica, sequence, ops, flush, uptodate=False, mismatched=None):
            with self.lock:
                if self.allocated is None:
                    self.allocated = allocated_blocks(replica.path)
                blocks = set(self.allocated)
                done = []
                for offset, payload in ops:
                    if isinstance(payload, int):
                        blocks -= set(range(offset // BS, (offset + payload) // BS))
                        done.append((offset, payload, "zero"))
                    else:
                        blocks |= set(range(offset // BS, (offset + len(payload)) // BS))
                        done.append((offset, len(payload), "data"))
                        if len(blocks) * BS > self.capacity:
                            self.refused += 1
                            raise DiskFull(path=replica.path, detail="write: No space left on device")
                applied = apply(replica, sequence, ops, flush, uptodate, mismatched)
                if applied:
                    self.allocated = blocks
                    self.ops.extend(done)
                return applied

        return wrapped


def test_a_resync_that_only_trims_can_make_room_for_completes_trims_first(tmp_path):
    data_dir = str(tmp_path / "standby")
    size = 4 * MiB
    # The replica holds 2 MiB of data at [2, 4) MiB and its disk has room for 2 MiB + 128 KiB.
    disk = SmallDisk(2 * MiB + 128 * 1024)
    rig = start_wrapped_rig(data_dir, disk)
    port = int(rig.target.rsplit(":", 1)[1])
    dev = mirrored(tmp_path, rig.target, size=size)
    try:
        dev.write(2 * MiB, os.urandom(2 * MiB))
        wait_until(lambda: settled(dev), what="the first sync")
        dev.flush()
        rig.stop()
        rig.node.close()
        wait_until(lambda: not dev.mirror.connected, what="the outage")
        # While the standby is away: [2, 4) MiB is trimmed but for the last region, whose first half only
        # is trimmed, and [0, 2) MiB gets data. The resync must free 2 MiB before it writes 2 MiB.
        last = size - REGION
        dev.zero(2 * MiB, last - 2 * MiB)
        dev.zero(last, REGION // 2)
        dev.write(0, os.urandom(2 * MiB))
        disk = SmallDisk(2 * MiB + 128 * 1024)
        rig = start_wrapped_rig(data_dir, disk, port=port)
        wait_until(lambda: settled(dev), timeout=20, what="the resync (refused while data goes first)")
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        assert rig.node.replica("vol0").status == "uptodate"
        assert disk.allocated is not None and len(disk.allocated) * BS <= disk.capacity

        # The order: every region that is a hole, then the regions with data; within the last region,
        # its zeroed half before its data.
        resync = [op for op in disk.ops if op[0] < size]
        first_data = next(i for i, op in enumerate(resync) if op[2] == "data")
        holes = [op for op in resync if op[2] == "zero" and op[1] == REGION]
        assert {op[0] for op in holes} == set(range(2 * MiB, last, REGION))
        assert all(resync.index(op) < first_data for op in holes), resync[:40]
        tail = [op for op in resync if op[0] >= last]
        assert tail == [(last, REGION // 2, "zero"), (last + REGION // 2, REGION // 2, "data")], tail
    finally:
        close(dev)
        rig.stop()
        rig.node.close()

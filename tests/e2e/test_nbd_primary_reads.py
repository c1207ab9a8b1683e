"""Reads of the primary's exported volume: served on the connection's thread from the volume's read
plans (small reads copied, large ones sent from the page cache), never stale after a write's reply.

fio (nbd engine) writes random blocks of 4 KiB to 256 KiB through the primary and reads each back
while later writes are in flight (``verify_backlog``), then verifies the whole area again; the replica
must equal the primary's volume afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_support import Daemons, assert_image, need, run, sync_mode_pair

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20


def test_reads_through_the_primary_see_every_acknowledged_write(daemons: Daemons, tmp_path: Path) -> None:
    need("fio")
    standby, primary = sync_mode_pair(daemons, tmp_path)
    common = [
        "--ioengine=nbd", f"--uri={primary.uri('vol0')}", "--offset=4M", "--size=24M",
        "--bsrange=4k-256k", "--iodepth=16", "--verify=crc32c", "--randseed=7",
    ]  # fmt: skip
    # Writes with reads of earlier writes interleaved (the read path races the mirror's writes).
    out = run("fio", "--name=write", "--rw=randwrite", "--verify_backlog=8", *common).stdout
    assert "READ: " in out and "WRITE: " in out, out
    # Everything read back once more in one pass, at depth, big and small reads mixed.
    out = run("fio", "--name=write", "--rw=randwrite", "--verify_only", *common).stdout
    assert "io=24.0MiB" in out.split("READ: ", 1)[1], out
    primary.wait_in_sync()
    assert_image(standby.replica(), primary.volumes["vol0"].read_bytes(), "the replica")

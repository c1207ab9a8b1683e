"""The primary's own state on a full or failing disk: a client write whose bitmap bit cannot be made
durable fails (over NBD too) instead of being answered untracked, nothing stays held, a failed sync is
never trusted, and a generations file that cannot be written is reported while the mirror goes on
(reconnects, resyncs). In process, real gRPC and NBD on loopback."""

from __future__ import annotations

import os
import subprocess

import pytest
from primary_support import (
    BS,
    MiB,
    RecordingMetrics,
    close,
    files_equal,
    mirrored,
    settled,
    start_wrapped_rig,
    wait_until,
)
from standby_rig import start_rig

import primary.generations as generations_module
from primary.bitmap import WriteIntentBitmap
from primary.mirror import BitmapWriteFailed
from standbylib.errors import DeviceError, DiskFull
from standbylib.nbd.server import NbdServer
from standbylib.rawfile import MemFile

GRANULARITY = 64 * 1024


class FailingFile(MemFile):
    """A bitmap file on a disk that can fill up (`full`: writes fail with ENOSPC) or fail its syncs
    (`fail_sync`: EIO, and the writes since the last good sync are lost, as when the kernel drops the
    dirty pages of a failed writeback)."""

    def __init__(self) -> None:
        super().__init__(path="<bitmap>")
        self.full = False
        self.fail_sync = False
        self.durable = bytearray()

    def pwrite(self, data, offset):
        if self.full:
            raise DiskFull(path=self.path, detail=f"write at {offset}: No space left on device")
        super().pwrite(data, offset)

    def sync(self):
        if self.fail_sync:
            self.data[:] = self.durable  # the pages written since the last sync are gone
            raise DeviceError(path=self.path, detail="fdatasync: Input/output error")
        super().sync()
        self.durable = bytearray(self.data)


def failing_bitmap(size: int) -> tuple[WriteIntentBitmap, FailingFile]:
    raw = FailingFile()
    # No marking ahead: each region's first write needs its own bit written and synced.
    return WriteIntentBitmap(raw, size, GRANULARITY, ahead=0, new=True), raw


def region(offset: int) -> int:
    return offset // GRANULARITY


@pytest.fixture
def setup(tmp_path, rig):
    bitmap, raw = failing_bitmap(4 * MiB)
    metrics = RecordingMetrics()
    dev = mirrored(tmp_path, rig.target, bitmap=bitmap, metrics=metrics)
    wait_until(lambda: settled(dev), what="the first sync")
    dev.flush()
    bitmap.clean(force=True)  # the full sync's bits, cleared: each region's next write must mark it
    raw.sync()
    assert not bitmap.on_disk().any()
    yield dev, bitmap, raw, metrics
    raw.full = raw.fail_sync = False
    close(dev)


@pytest.fixture
def replica(rig):
    return rig.node.replica_path("vol0")


def test_a_write_whose_bit_cannot_be_written_fails_and_so_does_the_next_one(setup, replica, tmp_path):
    dev, bitmap, raw, metrics = setup
    dev.write(0, b"a" * BS)
    raw.full = True
    for attempt in range(2):  # the second time the bit is set in memory: it must still not pass
        with pytest.raises(BitmapWriteFailed, match=r"not done.*No space left"):
            dev.write(MiB, b"b" * BS)
        assert dev.read(MiB, BS) == bytes(BS), f"attempt {attempt}: the write was issued untracked"
        assert bitmap._inflight[region(MiB)] == 0, "a failed mark left its region held"
    assert metrics.write_failures == {"bitmap": 2}
    raw.full = False
    dev.write(MiB, b"b" * BS)
    assert bitmap.on_disk()[region(MiB)], "the bit of an answered write is not in the file"
    dev.flush()
    assert files_equal(tmp_path / "primary.img", replica)


def test_a_failed_sync_is_never_trusted(setup):
    dev, bitmap, raw, metrics = setup
    raw.fail_sync = True
    with pytest.raises(DeviceError):
        dev.write(2 * MiB, b"c" * BS)
    assert not bitmap.on_disk()[region(2 * MiB)]  # lost with the failed sync
    raw.fail_sync = False
    dev.write(2 * MiB, b"c" * BS)  # the sync now must write the page again, not just sync
    assert bitmap.on_disk()[region(2 * MiB)], "the bit was believed durable after a failed sync"
    assert metrics.write_failures == {"bitmap": 1}


def write_0x55_at_3m(uri: str) -> subprocess.CompletedProcess[str]:
    """A client (qemu-io) writes 4 KiB of 0x55 at 3 MiB of the export at `uri`."""
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x55 3M 4k", uri],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_nbd_client_write_that_cannot_be_tracked_fails(setup):
    dev, _bitmap, raw, _metrics = setup
    raw.full = True
    with NbdServer({"vol0": dev}) as server:
        assert server.address is not None
        host, port = server.address
        uri = f"nbd://{host}:{port}/vol0"
        cp = write_0x55_at_3m(uri)
        assert "failed" in cp.stdout + cp.stderr, f"the write was answered: {cp.stdout} {cp.stderr}"
        assert dev.read(3 * MiB, BS) == bytes(BS)
        raw.full = False
        cp = write_0x55_at_3m(uri)
        assert cp.returncode == 0 and "failed" not in cp.stdout + cp.stderr, cp.stdout + cp.stderr
    assert dev.read(3 * MiB, BS) == b"\x55" * BS


def test_generations_that_cannot_be_written_do_not_wedge_the_mirror(tmp_path, monkeypatch):
    data_dir = str(tmp_path / "standby")
    rig = start_rig(data_dir)
    port = int(rig.target.rsplit(":", 1)[1])
    metrics = RecordingMetrics()
    dev = mirrored(tmp_path, rig.target, metrics=metrics)
    full = {"on": False}
    real = generations_module.replace_file

    def replace_file(path, data):
        if full["on"]:
            raise DiskFull(path=path + ".tmp", detail="write: No space left on device")
        real(path, data)

    monkeypatch.setattr(generations_module, "replace_file", replace_file)
    try:
        wait_until(lambda: settled(dev), what="the first sync")
        current = dev.mirror.generations.current
        full["on"] = True
        rig.stop()  # the outage rotates the generation: that cannot be written
        rig.node.close()
        wait_until(lambda: metrics.write_failures.get("generation", 0) >= 1, what="the failure reported")
        # Not rotated: the generation stays the one on disk (what a restart would present).
        assert dev.mirror.generations.current == current
        dev.write(0, os.urandom(64 * 1024))  # while the standby is away: tracked
        rig = start_rig(data_dir, port=port)
        wait_until(lambda: settled(dev), what="the reconnection and its resync")
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        full["on"] = False
        rig.stop()  # the next change is written again
        rig.node.close()
        wait_until(lambda: dev.mirror.generations.current != current, what="the rotation")
        saved = (tmp_path / "primary.generation").read_text()
        assert f'"current": "{dev.mirror.generations.current}"' in saved
    finally:
        full["on"] = False
        close(dev)
        rig.stop()
        rig.node.close()


def test_a_full_sync_is_not_started_when_the_bitmap_cannot_record_it(tmp_path):
    bitmap, raw = failing_bitmap(4 * MiB)
    raw.full = True
    metrics = RecordingMetrics()
    rig = start_wrapped_rig(str(tmp_path / "standby"), lambda node, apply: apply)
    dev = mirrored(tmp_path, rig.target, bitmap=bitmap, metrics=metrics)
    try:
        wait_until(lambda: metrics.write_failures.get("bitmap", 0) >= 1, what="the failure reported")
        assert not dev.mirror.live and "bitmap" in dev.mirror.last_error
        raw.full = False
        wait_until(lambda: settled(dev), timeout=30, what="the full sync once the bitmap takes writes")
    finally:
        close(dev)
        rig.stop()
        rig.node.close()

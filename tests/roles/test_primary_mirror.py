"""The primary's mirrored device against a real standby (in process, real gRPC on loopback)."""

from __future__ import annotations

import array
import os
import random
import threading
import time

import pytest
from standby_rig import start_rig

from primary.bitmap import WriteIntentBitmap
from primary.device import MirroredDevice
from primary.generations import Generations
from primary.main import parse_volume
from primary.mirror import Mirror, NullMirrorMetrics
from standbylib.blockdev import open_file_device
from standbylib.errors import InvalidArgument, InvalidBlockSize
from standbylib.rawfile import is_zero

MiB = 1 << 20


class CountingMetrics(NullMirrorMetrics):
    def __init__(self):
        self.batches = 0
        self.writes = 0

    def batch_sent(self, volume, nbytes, writes):
        self.batches += 1
        self.writes += writes


def mirrored(tmp_path, target, size=4 * MiB, block_size=4096, metrics=None, mode="sync", **kw):
    local = open_file_device(str(tmp_path / "primary.img"), size)
    bitmap = WriteIntentBitmap.open(str(tmp_path / "primary.bitmap"), size)
    generations = Generations(str(tmp_path / "primary.generation"))
    mirror = Mirror(
        target, "vol0", size, block_size, bitmap, generations, metrics=metrics, mode=mode, ack_timeout=5, **kw
    )
    dev = MirroredDevice("vol0", local, mirror)
    mirror.start()
    assert mirror.wait_connected(10)
    return dev


def files_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


@pytest.fixture
def device(tmp_path, rig):
    dev = mirrored(tmp_path, rig.target)
    yield dev
    dev.mirror.stop()
    dev.close()


def test_a_write_is_on_the_replica_when_it_returns(rig, device):
    device.write(8192, b"q" * 4096)
    assert rig.node.replica("vol0").volume.read(8192, 4096) == b"q" * 4096


def test_unaligned_writes_are_mirrored_as_whole_blocks(rig, device, tmp_path):
    device.write(0, b"a" * 4096 * 3)
    device.write(100, b"b" * 5000)  # touches blocks 0 and 1 partly
    device.write(3 * 4096 - 1, b"c" * 2)  # straddles blocks 2 and 3
    device.flush()
    assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))


def test_zeroes_and_trims_keep_the_replica_sparse(rig, device, tmp_path):
    device.write(0, os.urandom(MiB))
    device.flush()
    allocated = os.stat(rig.node.replica_path("vol0")).st_blocks
    device.zero(0, 512 * 1024)  # aligned: punched on the standby
    device.write(512 * 1024, bytes(256 * 1024))  # a write of zeros: punched too
    device.zero(768 * 1024 + 100, 4096 * 4)  # unaligned edges: edge blocks travel as data
    device.flush()
    assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
    after = os.stat(rig.node.replica_path("vol0")).st_blocks
    assert after * 512 <= allocated * 512 - 768 * 1024 + 2 * 4096


def test_concurrent_overlapping_writes_keep_their_order_and_share_batches(rig, tmp_path):
    metrics = CountingMetrics()
    dev = mirrored(tmp_path, rig.target, metrics=metrics)
    try:

        def writer(seed):
            rnd = random.Random(seed)
            for _ in range(150):
                offset = rnd.randrange(0, 64) * 4096 + rnd.choice([0, 0, 512, 1000])
                dev.write(offset, bytes([rnd.randrange(256)]) * rnd.choice([512, 4096, 9000]))

        threads = [threading.Thread(target=writer, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        assert metrics.batches < metrics.writes  # concurrent writes were coalesced
    finally:
        dev.mirror.stop()
        dev.close()


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_writes_go_on_during_a_standby_outage_and_are_resynced(tmp_path):
    data = str(tmp_path / "standby")
    rig = start_rig(data)
    port = int(rig.target.rsplit(":", 1)[1])
    dev = mirrored(tmp_path, rig.target)
    try:
        dev.write(0, b"1" * 4096)
        wait_until(lambda: not dev.mirror.resyncing)  # the first contact's full sync
        before = dev.mirror.resent_bytes
        rig.stop()
        rig.node.close()
        wait_until(lambda: not dev.mirror.connected)  # the outage is noticed (a write would show it too)
        for i in range(1, 20):  # answered although the standby is gone: tracked in the bitmap
            dev.write(i * 65536, bytes([i]) * 4096)
        assert dev.mirror.bitmap.dirty() >= 19
        rig = start_rig(data, port=port)
        wait_until(
            lambda: dev.mirror.connected and not dev.mirror.resyncing and dev.mirror.bitmap.dirty() == 0
        )
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        assert rig.node.replica("vol0").status == "uptodate"
        # Only the dirty regions travelled again: 19 regions (and at most one dropped in-flight write).
        assert 19 * 65536 <= dev.mirror.resent_bytes - before <= 20 * 65536
    finally:
        dev.mirror.stop()
        dev.close()
        rig.stop()
        rig.node.close()


@pytest.mark.parametrize("mode", ["sync", "received", "async"])
def test_every_mode_mirrors_everything(rig, tmp_path, mode):
    dev = mirrored(tmp_path, rig.target, mode=mode)
    try:
        for i in range(50):
            dev.write(i * 8192, bytes([i + 1]) * 8192)
        dev.flush()  # a barrier: every write before it is applied and durable on the standby
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
    finally:
        dev.mirror.stop()
        dev.close()


def test_a_new_standby_gets_a_full_copy_that_skips_holes(tmp_path):
    local = open_file_device(str(tmp_path / "primary.img"), 8 * MiB)
    local.write(0, os.urandom(MiB))
    local.write(6 * MiB, b"z" * 4096)
    local.close()
    rig = start_rig(str(tmp_path / "standby"))
    dev = mirrored(tmp_path, rig.target, size=8 * MiB)
    try:
        wait_until(
            lambda: not dev.mirror.resyncing and dev.mirror.bitmap.dirty() == 0 and dev.mirror.connected
        )
        dev.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        assert os.stat(rig.node.replica_path("vol0")).st_blocks * 512 <= MiB + 65536 * 2
    finally:
        dev.mirror.stop()
        dev.close()
        rig.stop()
        rig.node.close()


def test_is_zero():
    assert is_zero(bytes(3 * MiB))
    assert not is_zero(bytes(3 * MiB - 1) + b"\1")
    assert not is_zero(b"\1" + bytes(10))
    assert not is_zero(bytes(MiB + 5) + b"\1" + bytes(5))
    assert is_zero(b"") and not is_zero(b"\1")
    # Views of other buffers and formats, a byte set anywhere in a chunk, the last chunk short.
    for size in (4096, MiB, 2 * MiB + 4096):
        buf = bytearray(size)
        assert is_zero(memoryview(buf)) and is_zero(memoryview(buf)[8:-8])
        assert is_zero(array.array("I", bytes(size)))
        for pos in (1, size // 2, MiB - 1 if size > MiB else size - 2, size - 2):
            buf[pos] = 0x80
            assert not is_zero(buf) and not is_zero(memoryview(buf)), (size, pos)
            buf[pos] = 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("vol0=/d/v.img", ("vol0", "/d/v.img", None, 4096)),
        ("db=/d/db,size=10GiB", ("db", "/d/db", 10 << 30, 4096)),
        ("db=/d/db,size=1MiB,block-size=64KiB", ("db", "/d/db", MiB, 65536)),
    ],
)
def test_volume_specs(text, expected):
    v = parse_volume(text)
    assert (v.name, v.path, v.size, v.block_size) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("vol0", InvalidArgument),
        ("vol0=", InvalidArgument),
        ("a@b=/x", InvalidArgument),
        ("v=/x,size=big", InvalidArgument),
        ("v=/x,colour=red", InvalidArgument),
        ("v=/x,block-size=1000", InvalidBlockSize),
        ("v=/x,size=5000", InvalidArgument),
    ],
)
def test_bad_volume_specs(text, error):
    with pytest.raises(error):
        parse_volume(text)


def test_split_brain_is_refused_until_the_standby_data_is_discarded(tmp_path):
    rig = start_rig(str(tmp_path / "standby"))
    try:
        dev = mirrored(tmp_path, rig.target)
        dev.write(0, b"a" * 4096)
        wait_until(lambda: not dev.mirror.resyncing)
        dev.mirror.stop()
        dev.close()
        dev.mirror.bitmap.close()
        # The primary's history is lost (its generation file replaced): it must not overwrite the
        # standby silently, nor follow it.
        # Without its state it is another primary to the standby, which owns the volume for the first
        # one: even --discard-standby-data is refused until an operator releases the volume.
        os.unlink(tmp_path / "primary.generation")
        for discard in (False, True):
            other = mirrored_unconnected(tmp_path, rig.target, discard_standby_data=discard)
            wait_until(lambda: "standbyctl takeover vol0" in other.mirror.last_error)  # noqa: B023
            assert not other.mirror.connected
            other.mirror.stop()
            other.close()
            other.mirror.bitmap.close()
        assert rig.node.takeover("vol0")
        other = mirrored_unconnected(tmp_path, rig.target)
        wait_until(lambda: "split brain" in other.mirror.last_error)
        assert not other.mirror.connected
        other.mirror.stop()
        other.close()
        other.mirror.bitmap.close()
        fixed = mirrored(tmp_path, rig.target, discard_standby_data=True)
        wait_until(lambda: not fixed.mirror.resyncing and fixed.mirror.bitmap.dirty() == 0)
        fixed.flush()
        assert files_equal(tmp_path / "primary.img", rig.node.replica_path("vol0"))
        assert rig.node.replica("vol0").generation == fixed.mirror.generations.current
        fixed.mirror.stop()
        fixed.close()
    finally:
        rig.stop()
        rig.node.close()


def mirrored_unconnected(tmp_path, target, **kwargs):
    local = open_file_device(str(tmp_path / "primary.img"), 4 * MiB)
    bitmap = WriteIntentBitmap.open(str(tmp_path / "primary.bitmap"), 4 * MiB)
    mirror = Mirror(
        target, "vol0", 4 * MiB, 4096, bitmap, Generations(str(tmp_path / "primary.generation")), **kwargs
    )
    dev = MirroredDevice("vol0", local, mirror)
    mirror.start()
    return dev

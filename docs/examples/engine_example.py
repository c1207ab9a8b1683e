"""Runnable example of the snapshot engine API (see docs/ENGINE.md).

Run it with `.venv/bin/python docs/examples/engine_example.py`.
"""

import os
import tempfile

from standbylib.blockdev import open_file_device
from standbylib.errors import ReadOnly, SnapshotInvalid
from standbylib.snapshot import PreservationStore

with tempfile.TemporaryDirectory() as workdir:
    # A persistent store of 8 MiB shared by every volume attached to it.
    store = PreservationStore.open(os.path.join(workdir, "preserve.store"), capacity=8 << 20)
    # The origin: a sparse 16 MiB file, created because it is missing and a size is given.
    device = open_file_device(os.path.join(workdir, "vol0.img"), size=16 << 20)
    vol = store.attach("vol0", device, block_size=4096)

    vol.write(0, b"monday " * 1000)
    vol.flush()

    nightly = vol.create_snapshot("nightly")  # O(1): nothing is copied
    vol.write_batch([(0, b"tuesday" * 1000), (1 << 20, bytes(8192))])  # one group commit
    assert nightly.read(0, 7) == b"monday "  # the snapshot is frozen
    assert vol.read(0, 7) == b"tuesday"  # the origin has moved on
    print("nightly:", nightly.info())

    try:
        nightly.write(0, b"x")
    except ReadOnly as e:
        print("as expected:", e)

    # A writable snapshot (claim 8): its writes go to the preservation store.
    scratch = vol.create_snapshot("scratch", writable=True)
    scratch.write(0, b"LABEL")
    scratch.flush()
    assert scratch.read(0, 12) == b"LABELay" + b"tuesd"
    assert vol.read(0, 5) == b"tuesd"

    # A snapshot with its own capacity becomes invalid when it overflows;
    # origin writes always go on. (Overwriting blocks that were holes or zeros
    # costs no capacity: they are preserved as hole entries, without data.)
    vol.write(2 << 20, os.urandom(1 << 20))
    small = vol.create_snapshot("small", capacity=64 << 10)
    vol.write(2 << 20, os.urandom(1 << 20))
    try:
        small.read(0, 4096)
        raise AssertionError("the small snapshot should have overflowed")
    except SnapshotInvalid as e:
        print("as expected:", e)

    print("store:", store.stats())
    for snap in vol.snapshots():
        vol.delete_snapshot(snap.name)
    print("after deleting every snapshot, bytes in use:", store.stats().used_bytes)
    store.close()
    device.close()

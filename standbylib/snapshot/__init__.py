"""Copy-on-write snapshot engine (patent WO 96/12232).

Quick tour::

    from standbylib.blockdev import open_file_device
    from standbylib.snapshot import PreservationStore

    store = PreservationStore.open("/var/lib/standby/preserve.store", capacity=10 << 30)
    vol = store.attach("vol0", open_file_device("/var/lib/standby/vol0.img", size=1 << 30))
    snap = vol.create_snapshot("nightly")          # O(1), nothing copied
    vol.write_batch([(0, b"x" * 4096), (8192, b"y" * 512)])   # old blocks preserved first
    frozen = snap.read(0, 4096)                    # still the data from before the write
    vol.delete_snapshot("nightly")                 # frees its preserved blocks
    store.close()

See docs/ENGINE.md for the full API and docs/STORE-FORMAT.md for the on-disk format.
"""

from standbylib.snapshot.engine import PreservationStore
from standbylib.snapshot.snapshot import Snapshot, SnapshotInfo
from standbylib.snapshot.store import ON_FULL_POLICIES, StoreStats
from standbylib.snapshot.volume import Volume, WriteOp

__all__ = [
    "ON_FULL_POLICIES",
    "PreservationStore",
    "Snapshot",
    "SnapshotInfo",
    "StoreStats",
    "Volume",
    "WriteOp",
]

"""How `store-v1.tar.gz` was made: a preservation store written by the engine of store format 1.

Format 1 preserved a block that was a hole (or all zeros) as a copy of its zeros, like any block. The
archive was made by running this script with the format-1 engine (the engine before hole entries) and
is kept as it came out, so that `test_store_v1.py` opens a store that format-1 software really wrote.
Run with a later engine, this script would write the current format instead: it documents the
fixture, it is not meant to be run again.

    python make_store_v1.py OUT.tar.gz

The volume ``vol`` (64 blocks of 4 KiB) is a RAM device, so the table holds no origin stamp (a stamp
names the file's inode, which extracting the archive changes); its contents are saved as ``vol.img``.
The history, which `test_store_v1.py` replays in its model (`EXPECTED` there):

1. blocks 0-31 data (block *b* filled with the byte ``0x40 + b``), blocks 32-63 zeros;
2. snapshot ``s1``;
3. blocks 0-7 get ``0xB0``, blocks 40-43 (zeros) get ``0xC0``: 12 copies, 4 of them copies of zeros;
4. snapshot ``s2``;
5. blocks 4-11 get ``0xD0``, blocks 44-45 (zeros) get ``0xE0``: 10 copies (8 data, 2 zeros);
6. writable snapshot ``w``, block 50 written to it with ``0xF0``;
7. block 46 (zeros) gets ``0xA0``: one copy of zeros, serving ``s1``, ``s2`` and ``w``;
8. the store is closed cleanly.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import tempfile

from standbylib.blockdev import Device
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore

BS = 4096
BLOCKS = 64


def fill(first: int, end: int, byte: int) -> tuple[int, bytes]:
    return first * BS, bytes([byte]) * ((end - first) * BS)


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as work:
        store_path = os.path.join(work, "preserve.store")
        origin = MemFile(bytes(BLOCKS * BS))
        store = PreservationStore.open(store_path, capacity=1 << 20)
        vol = store.attach("vol", Device(origin, BLOCKS * BS), block_size=BS)
        vol.write_batch([(b * BS, bytes([0x40 + b]) * BS) for b in range(32)])
        vol.create_snapshot("s1")
        vol.write_batch([fill(0, 8, 0xB0), fill(40, 44, 0xC0)])
        vol.create_snapshot("s2")
        vol.write_batch([fill(4, 12, 0xD0), fill(44, 46, 0xE0)])
        w = vol.create_snapshot("w", writable=True)
        w.write(*fill(50, 51, 0xF0))
        w.flush()
        vol.write_batch([fill(46, 47, 0xA0)])
        store.close()
        image = bytes(origin.data)
        with tarfile.open(out, "w:gz", compresslevel=9) as tar:
            tar.add(store_path, arcname="preserve.store")
            info = tarfile.TarInfo("vol.img")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))


if __name__ == "__main__":
    main(sys.argv[1])

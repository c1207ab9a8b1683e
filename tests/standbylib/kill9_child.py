"""Child process of test_kill9.py: writes to a file store and volume until it is killed.

Usage: ``python kill9_child.py DIR SEED SIZE``. It creates ``DIR/preserve.store`` and
``DIR/vol.img`` (SIZE bytes), fills the volume with a seeded pattern, then applies random
`Volume.write_batch` batches forever. After a seeded number of batches it creates a snapshot
(three in all, at different moments); right after each one it reads the snapshot image through
the engine, and appends ``{"<name>": "<sha256>"}`` to ``DIR/snapshots.jsonl`` (flushed and
fsynced), so the parent knows what each snapshot must read after the kill. Progress goes to
stdout: ``ready`` after the initial pattern, ``snapshot NAME`` after each record.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

from workload import random_ops

from standbylib.blockdev import open_file_device
from standbylib.snapshot import PreservationStore, Snapshot

BLOCK_SIZE = 4096
CHUNK = 1 << 20
SNAPSHOTS = 3
VOLUME = "vol"


def sha256_of(snap: Snapshot, size: int) -> str:
    digest = hashlib.sha256()
    for offset in range(0, size, CHUNK):
        digest.update(snap.read(offset, min(CHUNK, size - offset)))
    return digest.hexdigest()


def main() -> None:
    workdir, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    store = PreservationStore.open(os.path.join(workdir, "preserve.store"), capacity=4 * size)
    vol = store.attach(
        VOLUME, open_file_device(os.path.join(workdir, "vol.img"), size), block_size=BLOCK_SIZE
    )
    for offset in range(0, size, CHUNK):
        vol.write_batch([(offset, rng.randbytes(min(CHUNK, size - offset)))])
    vol.flush()
    print("ready", flush=True)

    log_path = os.path.join(workdir, "snapshots.jsonl")
    # Batches to apply before each snapshot: the first can come at once, the others later.
    gaps = [rng.choice((0, rng.randint(1, 40))), rng.randint(1, 80), rng.randint(1, 150)]
    taken = 0
    countdown = gaps[0]
    while True:
        if taken < SNAPSHOTS and countdown <= 0:
            name = f"snap{taken + 1}"
            snap = vol.create_snapshot(name)
            record = json.dumps({name: sha256_of(snap, size)})
            with open(log_path, "a") as log:
                log.write(record + "\n")
                log.flush()
                os.fsync(log.fileno())
            print(f"snapshot {name}", flush=True)
            taken += 1
            if taken < SNAPSHOTS:
                countdown = gaps[taken]
        vol.write_batch(
            random_ops(rng, size, BLOCK_SIZE, max_ops=12, max_blocks=16, aligned_share=0.4, zero_share=0.1)
        )
        countdown -= 1


if __name__ == "__main__":
    main()

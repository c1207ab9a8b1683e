"""`make demo`: the appliance on a built-in local setup.

For now this shows the snapshot engine on its own: a 64 MiB volume is written,
a snapshot is taken while a writer keeps changing the volume, and the snapshot
still reads the image it froze, with the preservation fill growing only with the
blocks overwritten. Everything lives in a temporary directory that is removed at
the end. The last line is ``DEMO OK``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time

from standbylib.blockdev import open_file_device
from standbylib.snapshot import PreservationStore, Snapshot, Volume
from standbylib.units import human_size

MiB = 1 << 20


def sha256_of(dev: Volume | Snapshot, chunk: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    for off in range(0, dev.size, chunk):
        h.update(dev.read(off, min(chunk, dev.size - off)))
    return h.hexdigest()


def say(text: str) -> None:
    print(text, flush=True)


def fill_line(store: PreservationStore, snap: Snapshot) -> str:
    info = snap.info()
    st = store.stats()
    return (
        f"snapshot {info.volume}@{info.name}: {info.preserved_blocks} blocks preserved "
        f"({human_size(info.preserved_bytes)}), store fill {st.fill_ratio:.1%} "
        f"of {human_size(st.capacity_bytes)}, {st.cow_copies} copy-on-write copies"
    )


def run(workdir: str, size: int, seed: int) -> None:
    rng = random.Random(seed)
    bs = 4096
    store = PreservationStore.open(os.path.join(workdir, "preservation.store"), capacity=size // 2)
    device = open_file_device(os.path.join(workdir, "vol0.img"), size=size)
    vol = store.attach("vol0", device, block_size=bs)
    cap = human_size(size // 2)
    say(f"volume vol0: {human_size(size)} sparse file, block size {bs}, store capacity {cap}")

    # Write a recognisable first version of every block.
    batch = []
    for off in range(0, size, 64 * 1024):
        batch.append((off, (f"version 1 of block at {off:#x} ".encode() * 4096)[: 64 * 1024]))
        if len(batch) == 64:
            vol.write_batch(batch)
            batch = []
    vol.flush()
    before = sha256_of(vol)
    say(f"wrote version 1 of the whole volume, sha256 {before[:16]}...")

    started = time.perf_counter()
    snap = vol.create_snapshot("demo")
    took = (time.perf_counter() - started) * 1000
    say(f"snapshot vol0@demo created in {took:.2f} ms (nothing copied)")
    say(fill_line(store, snap))

    # A writer keeps changing the origin: random 4 KiB to 64 KiB writes.
    written = 0
    for round_no in range(1, 5):
        batch = []
        for _ in range(256):
            length = bs * rng.choice((1, 2, 4, 16))
            off = rng.randrange(0, size - length, bs)
            batch.append((off, rng.randbytes(length)))
            written += length
        vol.write_batch(batch)
        vol.flush()
        frozen = sha256_of(snap)
        live = sha256_of(vol)
        state = "unchanged" if frozen == before else "CHANGED"
        say(
            f"round {round_no}: origin sha256 {live[:16]}..., snapshot sha256 {frozen[:16]}... ({state}); "
            + fill_line(store, snap)
        )
        if frozen != before:
            raise SystemExit("the snapshot changed: the engine is broken")
    if sha256_of(vol) == before:
        raise SystemExit("the origin did not change")

    info = snap.info()
    say(f"{human_size(written)} written to the origin; the snapshot holds {human_size(info.preserved_bytes)}")

    # A restart restores the snapshot with its state.
    store.close()
    store = PreservationStore.open(os.path.join(workdir, "preservation.store"))
    vol = store.attach("vol0", device, block_size=bs)
    snap = vol.snapshot("demo")
    if sha256_of(snap) != before:
        raise SystemExit("the snapshot changed across a restart")
    say("store reopened: snapshot vol0@demo still reads version 1; " + fill_line(store, snap))

    vol.delete_snapshot("demo")
    st = store.stats()
    say(f"snapshot deleted: store fill {st.fill_ratio:.1%}, {human_size(st.used_bytes)} in use")
    store.close()
    device.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default=64 * MiB, type=int, help="volume size in bytes (default 64 MiB)")
    parser.add_argument("--seed", default=1, type=int, help="seed of the random writer (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="standby-demo-")
    try:
        run(workdir, args.size, args.seed)
    finally:
        if args.keep:
            say(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("DEMO OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

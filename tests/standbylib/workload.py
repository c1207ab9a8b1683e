"""Random write batches shared by the crash tests (imported by module name, like faultfile)."""

from __future__ import annotations

import random


def random_ops(
    rng: random.Random,
    size: int,
    bs: int,
    *,
    max_ops: int,
    max_blocks: int,
    aligned_share: float,
    zero_share: float,
) -> list[tuple[int, bytes | int]]:
    """A batch of 1..max_ops writes on a volume of `size` bytes: block-aligned runs of up to
    `max_blocks` blocks (share `aligned_share`) or unaligned ones of up to 3 blocks; a share
    `zero_share` of them are zero requests ``(offset, length)``."""
    ops: list[tuple[int, bytes | int]] = []
    for _ in range(rng.randint(1, max_ops)):
        if rng.random() < aligned_share:
            offset = rng.randrange(size // bs) * bs
            length = rng.randint(1, max_blocks) * bs
        else:
            offset = rng.randrange(size)
            length = rng.randint(1, 3 * bs)
        length = min(length, size - offset)
        if rng.random() < zero_share:
            ops.append((offset, length))
        else:
            ops.append((offset, rng.randbytes(length)))
    return ops

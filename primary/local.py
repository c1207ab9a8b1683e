"""How the mirror's background work (resync, verify, repair) reads the protected volume."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field


def _never_a_hole(offset: int, length: int) -> bool:
    return False


@dataclass(slots=True)
class LocalVolume:
    """The local volume as the mirror sees it, set by `Mirror.attach`.

    `lock` is the writers' order lock: a range read under it (`read`) is queued for the standby before
    any later write to it, so a resend or a probe sits in the stream exactly where its read happened.
    `is_hole` says whether a range holds no data (it travels as a zeroed range, or is probed as zeros).
    """

    lock: AbstractContextManager[object] = field(default_factory=threading.Lock)
    read: Callable[[int, int], bytes] | None = None
    is_hole: Callable[[int, int], bool] = _never_a_hole

    def read_range(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (under `lock`, by the caller)."""
        assert self.read is not None, "the mirror reads its volume only once attached"
        return self.read(offset, length)

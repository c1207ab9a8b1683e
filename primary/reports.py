"""How the primary reports on its mirrors: the metrics a mirror feeds, and failures to write its own state.

A failure to write the primary's state (the write-intent bitmap, the data generations) is loud but said
once (`StateReport`); a client write whose regions cannot be marked in the bitmap fails
(`BitmapWriteFailed`) rather than be acknowledged untracked.
"""

from __future__ import annotations

import re
import threading
from typing import Protocol

from standbylib.errors import DeviceError
from standbylib.runtime import logs

log = logs.get(__name__)


class MirrorMetrics(Protocol):
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None: ...
    def connected(self, volume: str, up: bool) -> None: ...
    def set_state(self, volume: str, state: str) -> None: ...
    def refused(self, volume: str, reason: str) -> None: ...
    def state_write_failed(self, volume: str, file: str) -> None: ...
    def resynced(self, volume: str, nbytes: int) -> None: ...


class NullMirrorMetrics:
    def batch_sent(self, volume: str, nbytes: int, writes: int) -> None:
        pass

    def connected(self, volume: str, up: bool) -> None:
        pass

    def set_state(self, volume: str, state: str) -> None:
        pass

    def refused(self, volume: str, reason: str) -> None:
        pass

    def state_write_failed(self, volume: str, file: str) -> None:
        pass

    def resynced(self, volume: str, nbytes: int) -> None:
        pass


class BitmapWriteFailed(DeviceError):
    """A client write was refused: its regions could not be marked durably in the write-intent bitmap."""

    template = (
        "volume {volume!r}: the write was not done: it could not be marked in the write-intent bitmap "
        "{path} ({detail})"
    )


def describe(error: BaseException) -> str:
    """`error` as a short line: a device error as ``PATH: DETAIL`` (without the advice of its template,
    which speaks of the standby's data)."""
    if isinstance(error, DeviceError) and "path" in error.fields and "detail" in error.fields:
        return f"{error.fields['path']}: {error.fields['detail']}"
    return str(error)


class StateReport:
    """Failures to write the primary's own state (`kind`: bitmap, generation), reported loudly but once:
    `state_write_failed` (error) at the first failure and when the error changes, counted every time;
    `state_write_recovered` at the next success."""

    def __init__(self, volume: str, metrics: MirrorMetrics) -> None:
        self.volume = volume
        self.metrics = metrics
        self.failing: dict[str, str] = {}  # kind -> the last error logged (digits masked)
        self._lock = threading.Lock()

    def failed(self, kind: str, error: BaseException, consequence: str) -> None:
        self.metrics.state_write_failed(self.volume, kind)
        message = describe(error)
        key = masked(message)
        with self._lock:
            known = self.failing.get(kind)
            self.failing[kind] = key
        if known != key:
            log.error("state_write_failed", volume=self.volume, file=kind, error=message, effect=consequence)

    def ok(self, kind: str) -> None:
        if kind in self.failing:  # (checked without the lock first: the common case costs a lookup)
            with self._lock:
                gone = self.failing.pop(kind, None)
            if gone is not None:
                log.info("state_write_recovered", volume=self.volume, file=kind)


def masked(text: str) -> str:
    """`text` with its numbers masked: two errors that differ only in counts are the same failure."""
    return re.sub(r"\d+", "#", text)

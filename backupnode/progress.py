"""Progress of long work: a bar on a terminal (bytes, rate, ETA), log lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from tqdm import tqdm

from standbylib.runtime import logs
from standbylib.units import human_size

log = logs.get(__name__)

#: Seconds between progress log lines when stderr is not a terminal.
LOG_EVERY = 10.0


def terminal_size() -> tuple[int, int]:
    """(columns, rows) of the terminal on stderr; zeros when it reports none or is no terminal."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        return 0, 0
    return size.columns, size.lines


class Progress:
    """Counts bytes of work `what`; `enabled` shows a bar, else (with `log_lines`) logs every
    `LOG_EVERY` seconds."""

    def __init__(self, what: str, *, enabled: bool, log_lines: bool = False, **fields: Any) -> None:
        self.what = what
        self.enabled = enabled
        self.log_lines = log_lines and not enabled
        self.fields = fields
        self.total = 0
        self.done = 0
        self.uploaded = 0  # archive bytes an upload has sent (or found there already), when there is one
        self._bar: tqdm[Any] | None = None
        self._started = time.monotonic()
        self._logged = self._started

    def start(self, total: int) -> None:
        self.total = total
        self._started = self._logged = time.monotonic()
        if self.enabled:
            # A terminal that reports no size (a pty nobody sized: some ssh and container sessions)
            # would get nothing at all (tqdm hides a bar below the screen's last row): 80 x 24 then.
            sized = min(terminal_size()) > 0
            self._bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.what,
                file=sys.stderr,
                dynamic_ncols=sized,
                ncols=None if sized else 80,
                nrows=None if sized else 24,
                smoothing=0.1,
            )

    def uploaded_part(self, n: int) -> None:
        """An upload finished a part of `n` bytes: shown beside the bar, and in the log lines."""
        self.uploaded += n
        if self._bar is not None:
            self._bar.set_postfix_str(f"uploaded {human_size(self.uploaded)}", refresh=False)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.log_lines:
            now = time.monotonic()
            if now - self._logged >= LOG_EVERY:
                self._logged = now
                rate = self.done / max(now - self._started, 1e-9)
                left = (self.total - self.done) / rate if rate else None
                log.info(
                    f"{self.what}_progress",
                    bytes=self.done,
                    total_bytes=self.total,
                    percent=round(100 * self.done / self.total, 1) if self.total else 100.0,
                    bytes_per_second=round(rate),
                    eta_seconds=round(left, 1) if left is not None else None,
                    **({"uploaded_bytes": self.uploaded} if self.uploaded else {}),
                    **self.fields,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

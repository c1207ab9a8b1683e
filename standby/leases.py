"""Snapshot leases: a snapshot made for a backup is released if its backup node stops renewing it.

A backup node that dies (kill -9, a lost host) cannot delete the snapshot it made, and a forgotten
snapshot pins preserved blocks until the store fills. So the backup asks for a lease when it creates
the snapshot and renews it while it runs; the standby deletes a snapshot whose lease ran out. Leases
are wall-clock deadlines kept in ``leases.json`` in the data directory, so a restart of the standby
neither forgets nor extends them. A snapshot made without a lease is kept until deleted.
"""

from __future__ import annotations

import json
import os
import threading
import time

from standbylib.errors import InvalidArgument, StandbyError
from standbylib.rawfile import replace_file

LEASES_FILE = "leases.json"
#: The longest lease (a day): a lease is a liveness promise, not storage policy.
MAX_LEASE = 366 * 86400.0  # a kept base of monthly incrementals lives a month; a year is plenty


def check_lease(seconds: float) -> float:
    if not 0 < seconds <= MAX_LEASE:
        raise InvalidArgument(detail=f"lease of {seconds} s must be above 0 and at most {MAX_LEASE:.0f} s")
    return seconds


class Leases:
    """Deadlines (seconds since the epoch) by export name ``VOLUME@SNAPSHOT``."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, LEASES_FILE)
        self._lock = threading.Lock()
        self._deadlines: dict[str, float] = {}
        try:
            with open(self.path) as fh:
                self._deadlines = {str(k): float(v) for k, v in json.load(fh).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as e:
            raise StandbyError(
                detail=f"{self.path} is unreadable ({e}); remove it (the leases are lost)"
            ) from e

    def _save(self) -> None:
        replace_file(self.path, json.dumps(self._deadlines, sort_keys=True).encode())

    def grant(self, volume: str, name: str, seconds: float, now: float | None = None) -> float:
        """Set (or renew) the lease of ``volume@name`` to end `seconds` from now; the deadline."""
        deadline = (time.time() if now is None else now) + check_lease(seconds)
        key = f"{volume}@{name}"
        with self._lock:
            before = self._deadlines.get(key)
            self._deadlines[key] = deadline
            try:
                self._save()
            except BaseException:
                # Not saved, not granted: memory and leases.json say the same.
                if before is None:
                    del self._deadlines[key]
                else:
                    self._deadlines[key] = before
                raise
        return deadline

    def drop(self, volume: str, name: str) -> None:
        """Forget the lease of ``volume@name`` (its snapshot is gone); raises when leases.json cannot be
        saved, the lease being forgotten in memory all the same (an entry left in the file names no
        snapshot and is dropped when it runs out)."""
        with self._lock:
            if self._deadlines.pop(f"{volume}@{name}", None) is not None:
                self._save()

    def remaining(self, volume: str, name: str, now: float | None = None) -> float | None:
        """Seconds left on the lease of ``volume@name``; None when it has none."""
        with self._lock:
            deadline = self._deadlines.get(f"{volume}@{name}")
        if deadline is None:
            return None
        return max(0.0, deadline - (time.time() if now is None else now))

    def expired(self, now: float | None = None) -> list[tuple[str, str]]:
        """``(volume, snapshot)`` of every lease that ran out."""
        now = time.time() if now is None else now
        with self._lock:
            names = [name for name, deadline in self._deadlines.items() if deadline <= now]
        return [(n.split("@", 1)[0], n.split("@", 1)[1]) for n in names]

"""The standby's small state files in the data directory, and how every state file is written.

- ``standby.json``: the identity of this standby (a UUID), written once;
- ``state.json``: per volume, whether its replica is inconsistent (a resync is under way), the data
  generation it holds, when it was promoted and from which generation, a rollback and whether it has
  completed, whether a failback is waiting for the old primary;
- ``reserve.space``: `RESERVE_BYTES` kept allocated, given up to save a state file when the disk is full.

Every state file (``leases.json`` too) is replaced through `StateFiles.write`: a failure is loud (logged,
counted, listed as a problem until a later write of that file succeeds) and raised, so that the caller can
undo what it changed in memory and memory and disk keep saying the same.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from standby.replica import INCONSISTENT, Replica
from standbylib.errors import DeviceError, DiskFull, StandbyError
from standbylib.rawfile import replace_file
from standbylib.runtime import logs

log = logs.get(__name__)

IDENTITY_FILE = "standby.json"
STATE_FILE = "state.json"
#: Space kept aside in the data directory, given up to save a state file on a full disk (see `keep_reserve`).
RESERVE_FILE = "reserve.space"
RESERVE_BYTES = 4 << 20


class StateFiles:
    """The state files of the data directory `data_dir`: reading them at start, replacing them durably,
    the space reserve, and the record of the writes that failed."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self._lock = threading.Lock()  # guards the failure counts and the problems
        self._failures: dict[str, int] = {}  # failed writes by file name
        self._problems: dict[str, str] = {}  # by file name: a file that could not be saved, until it is
        self._saved: dict[str, dict[str, Any]] = {}  # state.json as last read or written

    @property
    def state_path(self) -> str:
        return os.path.join(self.data_dir, STATE_FILE)

    @property
    def reserve_path(self) -> str:
        return os.path.join(self.data_dir, RESERVE_FILE)

    def identity(self) -> str:
        """This standby's identity from ``standby.json``, made (and saved) the first time."""
        path = os.path.join(self.data_dir, IDENTITY_FILE)
        try:
            with open(path) as fh:
                return str(json.load(fh)["id"])
        except FileNotFoundError:
            ident = str(uuid.uuid4())
            replace_file(path, json.dumps({"id": ident}).encode())
            return ident
        except (OSError, ValueError, KeyError) as e:
            raise StandbyError(detail=f"{path} is unreadable ({e}); restore it or remove it") from e

    def load_states(self) -> None:
        """Read ``state.json`` (absent: nothing saved yet), for `restore` to give each replica its state."""
        path = self.state_path
        try:
            with open(path) as fh:
                volumes = json.load(fh)["volumes"]
                self._saved = {str(k): dict(v) for k, v in volumes.items()}
        except FileNotFoundError:
            self._saved = {}
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise StandbyError(detail=f"{path} is unreadable ({e}); remove it and resync the volumes") from e

    def restore(self, replica: Replica) -> None:
        """Give `replica` the state ``state.json`` held for its volume when the node started."""
        saved = self._saved.get(replica.name, {})
        replica.generation = str(saved.get("generation", ""))
        if saved.get("inconsistent"):
            replica.state = INCONSISTENT
        replica.promoted_at = str(saved.get("promoted") or "")
        replica.promoted_from = str(saved.get("promoted_from") or "")
        replica.rolled_back_to = str(saved.get("rolled_back_to") or "")
        replica.kept_snapshot = str(saved.get("kept_snapshot") or "")
        replica.rollback_pending = bool(saved.get("rollback_pending"))
        replica.failback = bool(saved.get("failback"))
        replica.owner = str(saved.get("owner") or "")
        replica.removing = bool(saved.get("removing"))

    def removing(self) -> list[str]:
        """The volumes ``state.json`` marks as being removed."""
        return sorted(name for name, saved in self._saved.items() if saved.get("removing"))

    def save_states(self, replicas: Iterable[Replica], forget: Iterable[str] = ()) -> None:
        """Persist each replica's consistency and generation (durably: a restart must not report an
        inconsistent replica up to date, nor forget which history it holds).

        A volume the file held that is not among `replicas` (not opened yet: a save while the node
        starts) keeps what the file said, unless it is in `forget` (a removed volume)."""
        dropped = set(forget)
        state = {name: saved for name, saved in self._saved.items() if name not in dropped}
        state.update(
            {
                r.name: {
                    "inconsistent": r.state == INCONSISTENT,
                    "generation": r.generation,
                    "promoted": r.promoted_at,
                    "promoted_from": r.promoted_from,
                    "rolled_back_to": r.rolled_back_to,
                    "kept_snapshot": r.kept_snapshot,
                    "rollback_pending": r.rollback_pending,
                    "failback": r.failback,
                    "owner": r.owner,
                    "removing": r.removing,
                }
                for r in replicas
            }
        )
        path = self.state_path
        self.write(path, lambda: replace_file(path, json.dumps({"volumes": state}).encode()))
        self._saved = state

    def write(self, path: str, write: Callable[[], object]) -> None:
        """Run `write`, which replaces the state file `path`; a failure is loud (logged at error, counted
        in `write_failures`, listed in `problems` until a later write of that file succeeds) and
        raised as `DiskFull` or `DeviceError`, so the caller can undo what it changed in memory."""
        name = os.path.basename(path)
        try:
            try:
                write()
            except DiskFull:
                # A full disk must not stop the state from moving on (a resync could then never start
                # to send the trims that would free space): give up the reserve and try once more.
                if not self._release_reserve():
                    raise
                write()
        except (OSError, StandbyError) as e:
            if isinstance(e, OSError):
                kind = DiskFull if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else DeviceError
                e = kind(path=path, detail=f"cannot save: {e.strerror or e}")
            with self._lock:
                self._failures[name] = self._failures.get(name, 0) + 1
                first = name not in self._problems
                self._problems[name] = f"{path} could not be saved: {e}"
            log.error("state_write_failed", file=path, error=str(e), first=first)
            raise e from None
        if name in self._problems:
            with self._lock:
                self._problems.pop(name, None)
            log.info("state_write_recovered", file=path)
        self.keep_reserve()

    def keep_reserve(self) -> None:
        """Keep `RESERVE_BYTES` allocated in the data directory (a file of real blocks), while the
        filesystem has room to spare: state files are small, and this space lets them be saved once the
        disk is full (`write`). Retaken only when four times its size is free, so that it never
        competes with the writes that need the space."""
        path = self.reserve_path
        if os.path.exists(path):
            return
        try:
            st = os.statvfs(self.data_dir)
            if st.f_bavail * st.f_frsize < 4 * RESERVE_BYTES:
                return
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(path + ".tmp", path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path + ".tmp")

    def _release_reserve(self) -> bool:
        """Free the reserve (True), or False when there is none."""
        try:
            os.unlink(self.reserve_path)
        except OSError:
            return False
        log.warning("space_reserve_released", file=self.reserve_path, bytes=RESERVE_BYTES)
        return True

    def problems(self) -> list[str]:
        """Conditions an operator must act on now (state files that could not be saved)."""
        with self._lock:
            return sorted(self._problems.values())

    def write_failures(self) -> dict[str, int]:
        """Failed writes so far, by file name."""
        with self._lock:
            return dict(self._failures)

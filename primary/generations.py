"""The primary's data generations: which history of the volume the standby holds.

`current` names the primary's data as it evolves; it changes (a new UUID) whenever the standby may
stop following it, that is when the connection drops. `base` is the last generation the standby was
known to hold completely. At the handshake the standby says which one it holds: `current` (in sync),
`base` (older: the bitmap has what it lacks), or another one, which means both sides changed since they
last agreed (a split brain, refused unless the operator discards the standby's data).

Persisted as a small JSON file, replaced atomically.
"""

from __future__ import annotations

import json
import uuid

from standbylib.errors import StandbyError
from standbylib.rawfile import replace_file


class Generations:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path) as fh:
                data = json.load(fh)
            self.current, self.base = str(data["current"]), str(data.get("base", ""))
        except FileNotFoundError:
            self.current, self.base = str(uuid.uuid4()), ""
            self._save()
        except (OSError, ValueError, KeyError) as e:
            raise StandbyError(
                detail=f"{path} is unreadable ({e}); remove it and restart with --discard-standby-data"
            ) from e

    def rotate(self) -> None:
        """The standby may miss what comes next: start a new generation (the base stays)."""
        self.current = str(uuid.uuid4())
        self._save()

    def agree(self, generation: str) -> None:
        """The standby holds `generation` completely."""
        if self.base != generation:
            self.base = generation
            self._save()

    def _save(self) -> None:
        replace_file(self.path, json.dumps({"current": self.current, "base": self.base}).encode())

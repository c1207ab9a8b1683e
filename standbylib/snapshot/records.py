"""Volume and snapshot records kept in the store's table, with their runtime counters."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from standbylib.errors import InvalidArgument
from standbylib.snapshot.index import ChainIndex

VALID = "valid"
INVALID = "invalid"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def check_name(kind: str, name: str) -> str:
    """Volume and snapshot names: 1-128 of [A-Za-z0-9._:+-], not starting with a punctuation mark.

    '@' and '/' are excluded because exports are named VOLUME@SNAPSHOT.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgument(
            detail=f"{kind} name {name!r} must be 1-128 characters of letters, digits and ._:+- "
            "and start with a letter or digit"
        )
    return name


@dataclass
class VolumeRecord:
    id: int
    name: str
    block_size: int
    size: int
    # What the origin file looked like when last attached or closed (`standbylib.snapshot.stamp`);
    # None for devices that are not files, and in tables written before stamps existed.
    stamp: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "block_size": self.block_size,
            "size": self.size,
        }
        if self.stamp is not None:
            d["stamp"] = dict(self.stamp)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VolumeRecord:
        stamp = d.get("stamp")
        return cls(
            int(d["id"]),
            str(d["name"]),
            int(d["block_size"]),
            int(d["size"]),
            dict(stamp) if isinstance(stamp, dict) else None,
        )


@dataclass
class SnapshotRecord:
    id: int
    volume: int
    name: str
    epoch: int
    writable: bool
    capacity: int | None
    created: str
    state: str = VALID
    reason: str = ""
    # What the caller noted about the origin when the snapshot was taken (the standby: the replica's
    # state); kept with the record, opaque to the engine.
    labels: dict[str, Any] = field(default_factory=dict)  # JSON values
    # Runtime only, rebuilt on open:
    preserved_blocks: int = 0  # distinct blocks it reads from data slots of the store
    hole_blocks: int = 0  # distinct blocks it reads as hole entries (preserved zeros, no data)
    private: ChainIndex = field(default_factory=ChainIndex)

    @property
    def valid(self) -> bool:
        return self.state == VALID

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "volume": self.volume,
            "name": self.name,
            "epoch": self.epoch,
            "writable": self.writable,
            "capacity": self.capacity,
            "created": self.created,
            "state": self.state,
            "reason": self.reason,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotRecord:
        return cls(
            id=int(d["id"]),
            volume=int(d["volume"]),
            name=str(d["name"]),
            epoch=int(d["epoch"]),
            writable=bool(d["writable"]),
            capacity=None if d.get("capacity") is None else int(d["capacity"]),
            created=str(d["created"]),
            state=str(d.get("state", VALID)),
            reason=str(d.get("reason", "")),
            labels=dict(d.get("labels") or {}),
        )


def live_snapshots(records: Iterable[SnapshotRecord], volume_id: int) -> list[SnapshotRecord]:
    """The valid snapshots of volume `volume_id` among `records`, oldest first."""
    live = [s for s in records if s.volume == volume_id and s.valid]
    live.sort(key=lambda s: s.epoch)
    return live

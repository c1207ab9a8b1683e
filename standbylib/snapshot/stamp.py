"""Stamps of origin files: did someone change a replica while the engine was not looking?

Snapshots read every block that was never overwritten through the engine from the origin itself,
so a write made to the origin file behind the engine's back (an operator running the primary agent
on the replica while the standby daemon is stopped, a restore from a backup...) silently changes
their frozen images. The store keeps a stamp of each volume's origin file in its table:

* ``in-use``, written durably when the volume is attached: the file's identity (device, inode,
  filesystem id) and size;
* ``clean``, written when the volume is closed: the same, plus its modification time (ns) and a
  checksum of a sample of 64 blocks spread over the file, taken after an fsync.

When the volume is attached again, a ``clean`` stamp must match in every field; after an unclean
stop (a crash, a kill -9) only identity and size can be checked, since the engine may have written
the file after its last stamp: a same-sized write to the same file after a crash goes unnoticed.

Only regular files have stamps; RAM and block devices have none (a block device's node changes its
inode on every boot, and its modification time does not follow writes).

Threading: pure functions; callers hold the store's lock.
"""

from __future__ import annotations

import stat
from typing import Any

import xxhash

from standbylib.blockdev import BlockDevice, Device
from standbylib.rawfile import OsFile

CLEAN = "clean"
IN_USE = "in-use"

#: Sample points of a clean stamp's checksum, and bytes read at each.
SAMPLES = 64
SAMPLE_BYTES = 4096


def _file(device: BlockDevice) -> OsFile | None:
    raw = device.raw if isinstance(device, Device) else None
    return raw if isinstance(raw, OsFile) else None


def take(device: BlockDevice, *, clean: bool) -> dict[str, Any] | None:
    """The stamp of `device` now, or None when it is not a regular file.

    A clean stamp first fsyncs the file (data and metadata), so that its modification time and
    sampled contents are what a power loss right after the close would leave on disk.
    Raises `DeviceError` when the file cannot be synced, stat'ed or read.
    """
    raw = _file(device)
    if raw is None:
        return None
    st = raw.stat()
    if not stat.S_ISREG(st.st_mode):
        return None
    if clean:
        raw.sync_all()
        st = raw.stat()
    found: dict[str, Any] = {
        "state": CLEAN if clean else IN_USE,
        "dev": st.st_dev,
        "ino": st.st_ino,
        "fsid": raw.filesystem_id(),
        "size": st.st_size,
    }
    if clean:
        found["mtime_ns"] = st.st_mtime_ns
        found["sample"] = sample_checksum(raw, st.st_size)
    return found


def sample_checksum(raw: OsFile, size: int) -> int:
    """XXH3-64 of `SAMPLES` pieces of `SAMPLE_BYTES` spread evenly over the file (4 KiB aligned)."""
    h = xxhash.xxh3_64()
    length = min(SAMPLE_BYTES, size)
    span = size - length
    seen = set()
    for i in range(SAMPLES):
        offset = (span * i // (SAMPLES - 1)) // SAMPLE_BYTES * SAMPLE_BYTES
        if offset in seen:
            continue
        seen.add(offset)
        h.update(offset.to_bytes(8, "little"))
        h.update(raw.pread(length, offset))
    return h.intdigest()


def differences(old: dict[str, Any], device: BlockDevice) -> list[str]:
    """What differs between the recorded stamp `old` and `device` now, in words (empty: nothing).

    Identity is the inode on the same device, or on a device with the same filesystem id (a device
    number can change across reboots, e.g. LVM minor numbers, while the filesystem stays the same).
    """
    now = take(device, clean=False)
    if now is None:
        return ["identity"]
    found = []
    same_device = old.get("dev") == now["dev"] or (bool(old.get("fsid")) and old.get("fsid") == now["fsid"])
    if old.get("ino") != now["ino"] or not same_device:
        found.append("identity")
    if old.get("size") != now["size"]:
        found.append("size")
    if old.get("state") == CLEAN:
        raw = _file(device)
        assert raw is not None  # take() found a regular file
        if old.get("mtime_ns") != raw.stat().st_mtime_ns:
            found.append("modified time")
        if "size" not in found and old.get("sample") != sample_checksum(raw, now["size"]):
            found.append("content")
    return found


def mismatch_reason(path: str, found: list[str]) -> str:
    """The reason given to the snapshots of a volume whose origin changed behind the engine's back."""
    what = ", ".join(found)
    verb = "differs" if len(found) == 1 else "differ"
    return (
        f"the replica {path} was changed while the standby was not running ({what} {verb}); "
        "its snapshots no longer hold their frozen images"
    )

"""The primary's data generations: which history of the volume the standby holds, and which file holds it.

`current` names the primary's data as it evolves; it changes (a new UUID) whenever the standby may
stop following it, that is when the connection drops. `base` is the last generation the standby was
known to hold completely. At the handshake the standby says which one it holds: `current` (in sync),
`base` (older: the bitmap has what it lacks), or another one, which means both sides changed since they
last agreed (a split brain, refused unless the operator discards the standby's data).

A generation belongs to the data it describes, so it is bound to the volume file: the state records the
file's identity (device and inode; not for block devices, whose device nodes are made anew at boot) and
size, and after a clean stop its mtime and a checksum of a sample of its blocks; the file itself carries
the current generation as the extended attribute ``user.standby.generation`` where the filesystem takes
user attributes (not on block devices: then silently without), so a copy or a rollback of the file from
another time carries another generation. At start, a file that is not the one the generations were
recorded for (another identity or size, another or no generation attribute, or, after a clean stop,
another mtime or sample) gets `mismatch` set: its generation is not presented to the standby (the
mirror refuses to connect, naming the cause and the fix) and the state is left as it is. With
``--discard-standby-data`` the file is taken as the data to keep: a new history starts, bound to it.

The xattr is written after the state file on every rotation, without a sync of the volume (which could
take long under writes); after an unclean stop the attribute may therefore still name the previous
generation, which is then accepted. A clean stop syncs the volume, attribute included: after it only the
current generation is.

Persisted as a small JSON file, replaced atomically.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import uuid
from typing import Any

from standbylib.errors import StandbyError
from standbylib.rawfile import replace_file

#: The extended attribute carrying the current generation on the volume file.
XATTR = "user.standby.generation"
#: Blocks of the volume read for the sample checksum of a clean stop, and their size.
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 4096
VERSION = 2
#: Errors of getxattr/setxattr meaning "no user attributes here" (a block device: EPERM).
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.ENOSYS)


class StateWriteError(StandbyError):
    """The primary's own state (generations, the generation attribute) could not be written."""

    template = "cannot record {what} in {path}: {detail}"


class VolumeFile:
    """The volume's file (or block device), open at `fd`, as the generations see it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = os.path.abspath(path)
        self.fd = fd
        self.block_device = stat.S_ISBLK(os.fstat(fd).st_mode)

    def identity(self) -> dict[str, Any]:
        st = os.fstat(self.fd)
        size = os.lseek(self.fd, 0, os.SEEK_END) if self.block_device else st.st_size
        return {
            "path": self.path,
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": size,
            "block_device": self.block_device,
        }

    def read_xattr(self) -> str | None:
        """The generation the file carries; None when it carries none. OSError when the filesystem takes
        no user attributes (errno in `_NO_XATTRS`)."""
        try:
            return os.getxattr(self.fd, XATTR).decode("ascii", "replace")
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None
            raise

    def write_xattr(self, generation: str) -> bool:
        """Put `generation` on the file; False when the filesystem takes no user attributes."""
        try:
            os.setxattr(self.fd, XATTR, generation.encode("ascii"))
        except OSError as e:
            if e.errno in _NO_XATTRS:
                return False
            raise
        return True

    def mtime_ns(self) -> int | None:
        return None if self.block_device else os.fstat(self.fd).st_mtime_ns

    def sample(self, size: int) -> str:
        """A checksum of `SAMPLE_BLOCKS` blocks spread evenly over the volume."""
        h = hashlib.sha256()
        last = max(0, size - SAMPLE_BLOCK)
        for i in range(SAMPLE_BLOCKS):
            offset = (last * i // (SAMPLE_BLOCKS - 1)) // SAMPLE_BLOCK * SAMPLE_BLOCK
            h.update(offset.to_bytes(8, "little"))
            h.update(os.pread(self.fd, SAMPLE_BLOCK, offset))
        return h.hexdigest()

    def sync(self) -> None:
        os.fsync(self.fd)


class Generations:
    """The generations kept in the file `path`, bound to `volume` (None: unbound, for tests and tools).

    `name` names the volume in messages; `discard` (``--discard-standby-data``) takes a file that is not
    the recorded one as the data to keep. Raises `StateWriteError` when the state cannot be written
    at start, `StandbyError` when it cannot be read.
    """

    def __init__(
        self, path: str, volume: VolumeFile | None = None, *, name: str = "", discard: bool = False
    ) -> None:
        self.path = path
        self.volume = volume
        self.name = name or os.path.basename(path)
        self.previous = ""  # the generation before `current` (the file may still carry it after a crash)
        self.bound: dict[str, Any] | None = None  # the identity of the file the generations belong to
        self.xattr = False  # whether the bound file carries the generation attribute
        self.clean: dict[str, Any] | None = None  # mtime and sample at the last clean stop
        self.mismatch = ""  # why the volume file is not the bound one (then nothing is written)
        self.bind_reason = ""  # why the file was bound at this start: new, upgrade, discard
        self.unsaved = False  # a change (`agree`) not written yet
        # Why this primary is outdated (the standby took the volume over: fenced); "" when it is not.
        self.outdated = ""
        # This primary's identity for this volume, kept across restarts: the standby refuses another one
        # (a volume is taken over from one primary to another only by an operator on the standby).
        self.primary_id = str(uuid.uuid4())
        new = False
        try:
            with open(path) as fh:
                data = json.load(fh)
            self.current, self.base = str(data["current"]), str(data.get("base", ""))
            self.previous = str(data.get("previous", ""))
            bound = data.get("volume")
            if bound is not None:
                self.bound = dict(bound)
                self.xattr = bool(bound.get("xattr", False))
            self.clean = data.get("clean")
            self.outdated = "" if discard else str(data.get("outdated", ""))
            self.primary_id = str(data.get("primary") or self.primary_id)
        except FileNotFoundError:
            self.current, self.base = str(uuid.uuid4()), ""
            new = True
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise StandbyError(
                detail=f"{path} is unreadable ({e}); remove it and restart with --discard-standby-data"
            ) from e
        if volume is None:
            if new:
                self._save()
            return
        try:
            self._check(volume, new, discard)
        except OSError as e:
            raise StandbyError(
                detail=f"volume {self.name!r}: cannot check {volume.path} against the generations recorded "
                f"in {path}: {e.strerror or e}"
            ) from e

    def _check(self, volume: VolumeFile, new: bool, discard: bool) -> None:
        """At start: bind the generations to `volume`, or accept it as the bound file, or set `mismatch`."""
        if self.bound is None:
            self._bind("new" if new else "upgrade")
            return
        cause = self._mismatch_cause(volume)
        if not cause:
            if self.xattr:
                try:  # it may carry the previous generation (an unclean stop): the current one from now
                    volume.write_xattr(self.current)
                except OSError as e:
                    raise StateWriteError(
                        what="the generation", path=volume.path, detail=e.strerror or str(e)
                    ) from e
            self.bound["dev"] = volume.identity()["dev"]  # (remounted under another device number)
            self.clean = None  # running: a crash from now on is an unclean stop
            self._save()
            return
        if discard:
            self.current, self.base, self.previous = str(uuid.uuid4()), "", ""
            self._bind("discard")
            return
        self.mismatch = (
            f"volume {self.name!r}: {volume.path} is not the file generation {self.current} was recorded "
            f"for ({cause}): if this file holds the data to keep, restart with --discard-standby-data (the "
            "standby's replica is then overwritten by a checksummed full resync); else point --volume at "
            f"the right file (the generations were recorded for {self.bound.get('path', '?')})"
        )

    # -- binding --------------------------------------------------------------------------------------

    def _bind(self, reason: str) -> None:
        """Bind the generations to the volume file as it is now."""
        assert self.volume is not None
        identity = self.volume.identity()
        try:
            self.xattr = self.volume.write_xattr(self.current)
        except OSError as e:
            raise StateWriteError(
                what="the generation", path=self.volume.path, detail=e.strerror or str(e)
            ) from e
        identity["xattr"] = self.xattr
        self.bound = identity
        self.clean = None
        self.bind_reason = reason
        self._save()

    def _mismatch_cause(self, volume: VolumeFile) -> str:
        """Why `volume` is not the file the generations were recorded for ("" when it is)."""
        bound = self.bound
        assert bound is not None
        now = volume.identity()
        if now["size"] != bound.get("size"):
            return f"size changed: it has {now['size']} bytes, the recorded file had {bound.get('size')}"
        carried: str | None = None
        xattr_error = ""
        if self.xattr:
            try:
                carried = volume.read_xattr()
            except OSError as e:
                xattr_error = (
                    "it is on a filesystem without user extended attributes, the recorded file was not"
                    if e.errno in _NO_XATTRS
                    else f"its generation attribute cannot be read: {e.strerror}"
                )
        if now["block_device"] != bool(bound.get("block_device")):
            return "one of them is a block device, the other a file"
        if not now["block_device"]:
            same_inode = now["ino"] == bound.get("ino")
            # A filesystem mounted under another device number keeps its inodes and attributes.
            remounted = same_inode and self.xattr and carried == self.current
            if not same_inode or (now["dev"] != bound.get("dev") and not remounted):
                return (
                    f"inode changed: it is inode {now['ino']} on device {now['dev']}, the generations "
                    f"were recorded for inode {bound.get('ino')} on device {bound.get('dev')}"
                )
        clean = self.clean
        if self.xattr:
            if xattr_error:
                return xattr_error
            if carried is None:
                return f"it carries no generation ({XATTR}): a copy made without its extended attributes?"
            accepted = {self.current} if clean else {self.current, self.previous} - {""}
            if carried not in accepted:
                return f"it carries generation {carried}: a copy or a rollback of it from another time"
        if clean:
            mtime = volume.mtime_ns()
            if mtime is not None and mtime != clean.get("mtime_ns"):
                return "it was modified after the clean stop (its mtime changed)"
            if volume.sample(now["size"]) != clean.get("sample"):
                return "its data changed after the clean stop (a sample of its blocks differs)"
        return ""

    # -- changes --------------------------------------------------------------------------------------

    def rotate(self) -> None:
        """The standby may miss what comes next: start a new generation (the base stays).

        Raises `StateWriteError` when it could not be recorded: the generation is then unchanged (still
        the one on disk), or, when only the file's attribute could not be written, changed."""
        new = str(uuid.uuid4())
        self._save(current=new, previous=self.current)
        self.previous, self.current = self.current, new
        self._write_xattr(new)

    def agree(self, generation: str) -> None:
        """The standby holds `generation` completely (kept in memory even when it cannot be written:
        `flush` retries; raises `StateWriteError` then)."""
        if self.base != generation:
            self.base = generation
            self.unsaved = True
            self._save()

    def fence(self, reason: str) -> None:
        """The standby took the volume over: this primary is outdated until a failback (recorded, so a
        restart stays fenced; raises `StateWriteError` when it cannot be written, kept in memory)."""
        if self.outdated != reason:
            self.outdated = reason
            self._save()

    def adopt(self, generation: str) -> None:
        """The volume now holds the standby's `generation` exactly (a failback pulled it): that is the
        current generation and the base, and the primary is no longer outdated."""
        self._save(current=generation, base=generation, previous="", outdated="")
        self.current = self.base = generation
        self.previous = self.outdated = ""
        self._write_xattr(generation)

    def _write_xattr(self, generation: str) -> None:
        """The volume file's generation attribute (where it has one); `StateWriteError` on failure."""
        if self.volume is not None and self.xattr:
            try:
                self.volume.write_xattr(generation)
            except OSError as e:
                raise StateWriteError(
                    what="the generation", path=self.volume.path, detail=e.strerror or str(e)
                ) from e

    def flush(self) -> None:
        """Write what an earlier failure left unsaved."""
        if self.unsaved:
            self._save()

    def clean_stop(self) -> None:
        """Record a clean stop (the volume is flushed and nothing writes it any more): the generation on
        the file, synced, and the file's mtime and sample. Nothing for a mismatched or unbound file."""
        volume = self.volume
        if volume is None or self.mismatch:
            return
        try:
            if self.xattr:
                volume.write_xattr(self.current)
            volume.sync()
            size = volume.identity()["size"]
            clean = {"mtime_ns": volume.mtime_ns(), "sample": volume.sample(size)}
        except OSError as e:
            raise StateWriteError(what="the clean stop", path=volume.path, detail=e.strerror or str(e)) from e
        self._save(clean=clean)
        self.clean = clean

    # -- the file -------------------------------------------------------------------------------------

    def _save(self, **changes: Any) -> None:
        """Write the state (with `changes` over the current values); in memory nothing changes here."""
        state: dict[str, Any] = {
            "version": VERSION,
            "current": self.current,
            "base": self.base,
            "previous": self.previous,
            "volume": self.bound,
            "clean": self.clean,
            "outdated": self.outdated,
            "primary": self.primary_id,
        }
        state.update(changes)
        if state["volume"] is None:
            del state["volume"], state["clean"]
        try:
            replace_file(self.path, json.dumps(state, sort_keys=True).encode())
        except (OSError, StandbyError) as e:
            detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise StateWriteError(what="the data generations", path=self.path, detail=detail) from e
        self.unsaved = False

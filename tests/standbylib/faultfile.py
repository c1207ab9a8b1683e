"""A fault-injecting `RawFile`: traces the changes to a set of files and rebuilds them as a power loss would.

A `Disk` is shared by several `FaultFile` objects (typically a store and an origin). Each
``pwrite``, ``punch``, ``truncate`` and ``sync`` of any of them is appended to the disk's trace
with a global event number, then applied to the file's live contents, so the engine above sees an
ordinary file.

`Disk.crash(cut, mode, rng)` returns what each file would hold after a power loss *before*
event `cut` (events ``0 .. cut-1`` happened, the rest did not):

* everything a file wrote before its last ``sync`` preceding `cut` survives;
* of its changes after that sync (the *pending* ones), the mode decides:

  - ``"none"``: every pending change is lost;
  - ``"all"``: every pending change survives;
  - ``"subset"``: each 512-byte sector keeps a random prefix of the pending changes that touched
    it (a sector is written atomically and the disk saw its contents at some moment after the
    sync), so a single write can be torn at sector boundaries, and two writes to one sector
    survive in their order, never the later one without the earlier. Whether a pending growth of
    the file survives is drawn too (the extension then reads as zeros where its data was lost),
    and a pending truncate survives or is lost as a whole.

`Replay` does the same for many cut points in increasing order without replaying the whole trace
each time. Reopening after a crash means wrapping the image in a new file:
``disk2.file("store", image)`` (a `FaultFile` over a `MemFile`, traced again), or `MemFile(image)`.

`Disk.inject(Fault(...))` makes calls fail as a real file would (`Fault`): EIO, no space (ENOSPC),
a short write that stores part of its data (up to a sector boundary) before running out of space,
a sync whose failure loses the file's unsynced changes for good. Failed calls change nothing (a short
write stores its prefix) and add no event, except that a losing sync marks the file's pending changes
lost: crash images never hold them, whatever a later sync does (`Disk.lost`).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from standbylib.errors import DeviceError, DiskFull
from standbylib.rawfile import Buffer, MemFile

SECTOR = 512
MODES = ("none", "all", "subset")

WRITE = "write"
PUNCH = "punch"
TRUNCATE = "truncate"
SYNC = "sync"

#: Calls a `Fault` can make fail (``pread`` covers ``preadinto`` and the source side of ``copy_from``).
FAULT_OPS = ("pwrite", "copy_from", "sync", "punch", "truncate", "pread")
FAULT_ERRORS = ("EIO", "ENOSPC", "short")


@dataclass
class Fault:
    """Makes calls of a disk's files fail.

    Of the calls matching `ops` (names from `FAULT_OPS`), `files` (None: any file of the disk) and
    `where(file, op, offset, length)`, the one numbered `skip` (0: the first) and the `count - 1`
    matching calls after it fail. `error`:

    * ``"EIO"``: `DeviceError`, nothing changed;
    * ``"ENOSPC"``: `DiskFull`, nothing changed;
    * ``"short"``: a write (``pwrite``, ``copy_from``) stores its data up to the sector boundary
      at or before its middle, then raises `DiskFull`, as a write that ran out of space half way;
      other calls as ``"ENOSPC"``.

    With `drop`, a failed ``sync`` also loses every change of its file since the file's last sync,
    for good (as Linux may after a writeback error): crash images never hold them, even after a
    later successful sync, unless they are written again. The errors are what `OsFile` raises.
    """

    ops: frozenset[str]
    files: frozenset[str] | None = None
    error: str = "EIO"
    skip: int = 0
    count: int = 1
    where: Callable[[str, str, int, int], bool] | None = None
    drop: bool = False
    seen: int = 0  # matching calls so far
    fired: list[str] = field(default_factory=list)  # the calls that failed, described

    def __post_init__(self) -> None:
        unknown = set(self.ops) - set(FAULT_OPS)
        if unknown or self.error not in FAULT_ERRORS:
            raise ValueError(f"bad fault: ops {sorted(unknown)} error {self.error!r}")

    def trips(self, file: str, op: str, offset: int, length: int) -> bool:
        """Count a call; whether it fails."""
        if op not in self.ops or (self.files is not None and file not in self.files):
            return False
        if self.where is not None and not self.where(file, op, offset, length):
            return False
        n = self.seen
        self.seen += 1
        if self.skip <= n < self.skip + self.count:
            self.fired.append(f"{op} of {file} at {offset} (+{length})")
            return True
        return False

    def exception(self, path: str, op: str, offset: int) -> DeviceError:
        if self.error == "EIO":
            return DeviceError(path=path, detail=f"{op} at {offset}: Input/output error (injected)")
        return DiskFull(path=path, detail=f"{op} at {offset}: No space left on device (injected)")


@dataclass(frozen=True)
class Event:
    """One change to one file: `data` of a write, `length` of a punch; `offset` is a truncate's new size."""

    number: int
    file: str
    kind: str
    offset: int = 0
    data: bytes = b""
    length: int = 0

    @property
    def end(self) -> int:
        return self.offset + (len(self.data) if self.kind == WRITE else self.length)


class Disk:
    """The trace shared by every `FaultFile` created from it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.initial: dict[str, bytes] = {}
        self.files: dict[str, FaultFile] = {}
        self.fault: Fault | None = None
        self.lost: set[int] = set()  # events a losing sync dropped (see `Fault.drop`)

    def inject(self, fault: Fault) -> Fault:
        """Make calls fail from now on as `fault` says (replacing any fault injected before)."""
        self.fault = fault
        return fault

    def heal(self) -> Fault | None:
        """Stop injecting; return the fault that was injected."""
        fault, self.fault = self.fault, None
        return fault

    def trip(self, file: str, op: str, offset: int = 0, length: int = 0) -> Fault | None:
        """The injected fault if this call must fail, else None."""
        fault = self.fault
        if fault is not None and fault.trips(file, op, offset, length):
            return fault
        return None

    def lose_pending(self, file: str) -> None:
        """Mark the changes of `file` since its last sync lost for good."""
        for ev in reversed(self.events):
            if ev.file != file:
                continue
            if ev.kind == SYNC:
                break
            self.lost.add(ev.number)

    @property
    def now(self) -> int:
        """Number of the next event: a cut at `now` keeps everything done so far (subject to the mode)."""
        return len(self.events)

    def file(self, name: str, initial: bytes | bytearray = b"") -> FaultFile:
        """A new file on this disk whose durable contents start as `initial`."""
        if name in self.files:
            raise ValueError(f"file {name!r} already exists on this disk")
        self.initial[name] = bytes(initial)
        f = FaultFile(self, name, initial)
        self.files[name] = f
        return f

    def record(self, file: str, kind: str, offset: int = 0, data: bytes = b"", length: int = 0) -> None:
        self.events.append(Event(len(self.events), file, kind, offset, data, length))

    def sync_events(self, file: str) -> list[int]:
        """Event numbers of the syncs of `file`, in order."""
        return [e.number for e in self.events if e.file == file and e.kind == SYNC]

    def crash(self, cut: int, mode: str, rng: random.Random | None = None) -> dict[str, bytearray]:
        """The durable image of every file after a power loss before event `cut`."""
        return Replay(self).images(cut, mode, rng)


class FaultFile:
    """A `RawFile` in RAM whose every change is traced on its `Disk`."""

    def __init__(self, disk: Disk, name: str, initial: bytes | bytearray = b"") -> None:
        self.disk = disk
        self.name = name
        self.path = f"<fault:{name}>"
        self.mem = MemFile(initial, path=self.path)
        self.counters = self.mem.counters
        self.closed = False

    @property
    def data(self) -> bytearray:
        """The live contents (what a reader sees now, durable or not)."""
        return self.mem.data

    def _trip(self, op: str, offset: int = 0, length: int = 0) -> Fault | None:
        return self.disk.trip(self.name, op, offset, length)

    def pread(self, length: int, offset: int) -> bytes:
        fault = self._trip("pread", offset, length)
        if fault is not None:
            raise fault.exception(self.path, "read", offset)
        return self.mem.pread(length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> None:
        fault = self._trip("pread", offset, len(buf))
        if fault is not None:
            raise fault.exception(self.path, "read", offset)
        self.mem.preadinto(buf, offset)

    def pwrite(self, data: Buffer, offset: int) -> None:
        chunk = bytes(data)
        fault = self._trip("pwrite", offset, len(chunk))
        if fault is not None:
            self._fail_write(fault, "write", chunk, offset)
        self.disk.record(self.name, WRITE, offset, chunk)
        self.mem.pwrite(chunk, offset)

    def _fail_write(self, fault: Fault, op: str, chunk: bytes, offset: int) -> None:
        # A write running out of space stops at a block boundary: here the sector boundary at or
        # before its middle (nothing when the write lies within one sector).
        stop = (offset + len(chunk) // 2) // SECTOR * SECTOR
        if fault.error == "short" and stop > offset:
            part = chunk[: stop - offset]
            self.disk.record(self.name, WRITE, offset, part)
            self.mem.pwrite(part, offset)
        raise fault.exception(self.path, op, offset)

    def copy_from(self, src: FaultFile, src_offset: int, length: int, offset: int) -> None:
        """`OsFile.copy_from` between two files of one disk: a write of `src`'s bytes (traced as one)."""
        fault = src._trip("pread", src_offset, length)
        if fault is not None:
            raise fault.exception(src.path, "read", src_offset)
        chunk = src.mem.pread(length, src_offset)
        fault = self._trip("copy_from", offset, length)
        if fault is not None:
            self._fail_write(fault, "copy", chunk, offset)
        self.disk.record(self.name, WRITE, offset, chunk)
        self.mem.pwrite(chunk, offset)

    def sync(self) -> None:
        fault = self._trip("sync")
        if fault is not None:
            if fault.drop:
                self.disk.lose_pending(self.name)
            raise fault.exception(self.path, "fdatasync", 0)
        self.disk.record(self.name, SYNC)
        self.mem.sync()

    def punch(self, offset: int, length: int) -> None:
        fault = self._trip("punch", offset, length)
        if fault is not None:
            raise fault.exception(self.path, "punch hole", offset)
        self.disk.record(self.name, PUNCH, offset, length=length)
        self.mem.punch(offset, length)

    def size(self) -> int:
        return self.mem.size()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return [(length, False)]

    def truncate(self, size: int) -> None:
        fault = self._trip("truncate", size)
        if fault is not None:
            raise fault.exception(self.path, "resize", size)
        self.disk.record(self.name, TRUNCATE, size)
        self.mem.truncate(size)

    def close(self) -> None:
        self.closed = True


def _apply(image: bytearray, ev: Event) -> None:
    """Apply one event to an image the way `MemFile` does."""
    if ev.kind == WRITE:
        end = ev.offset + len(ev.data)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[ev.offset : end] = ev.data
    elif ev.kind == PUNCH:
        end = min(ev.offset + ev.length, len(image))
        if end > ev.offset:
            image[ev.offset : end] = bytes(end - ev.offset)
    elif ev.kind == TRUNCATE:
        if ev.offset < len(image):
            del image[ev.offset :]
        else:
            image.extend(bytes(ev.offset - len(image)))


def _sectors(ev: Event) -> range:
    if ev.end <= ev.offset:
        return range(0)
    return range(ev.offset // SECTOR, (ev.end - 1) // SECTOR + 1)


class Replay:
    """Builds crash images of a `Disk` for cut points given in non-decreasing order.

    For each file it keeps the image as of its last sync before the previous cut and moves it
    forward, so building images for N cut points costs one pass over the trace plus the pending
    changes of each cut.
    """

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.by_file: dict[str, list[int]] = {name: [] for name in disk.initial}
        self.syncs: dict[str, list[int]] = {name: [] for name in disk.initial}
        for ev in disk.events:
            if ev.number in disk.lost:  # dropped by a failed sync: never durable
                continue
            self.by_file[ev.file].append(ev.number)
            if ev.kind == SYNC:
                self.syncs[ev.file].append(ev.number)
        self.base = {name: bytearray(data) for name, data in disk.initial.items()}
        self.applied = dict.fromkeys(disk.initial, 0)  # position in by_file[name] applied to base
        self.last_cut = 0

    def images(self, cut: int, mode: str, rng: random.Random | None = None) -> dict[str, bytearray]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not 0 <= cut <= len(self.disk.events):
            raise ValueError(f"cut {cut} outside the trace of {len(self.disk.events)} events")
        if cut < self.last_cut:
            raise ValueError("cut points must be given in non-decreasing order")
        self.last_cut = cut
        if rng is None:
            rng = random.Random(cut)
        return {name: self._image(name, cut, mode, rng) for name in sorted(self.base)}

    def _image(self, name: str, cut: int, mode: str, rng: random.Random) -> bytearray:
        events = self.disk.events
        numbers = self.by_file[name]
        syncs = self.syncs[name]
        i = bisect.bisect_left(syncs, cut)
        last_sync = syncs[i - 1] if i else -1
        # Move the durable base up to the last sync before the cut.
        stop = bisect.bisect_left(numbers, last_sync)
        base = self.base[name]
        for pos in range(self.applied[name], stop):
            _apply(base, events[numbers[pos]])
        self.applied[name] = max(self.applied[name], stop)
        image = bytearray(base)
        pending = [
            events[n]
            for n in numbers[bisect.bisect_right(numbers, last_sync) : bisect.bisect_left(numbers, cut)]
            if events[n].kind != SYNC
        ]
        if not pending or mode == "none":
            return image
        if mode == "all":
            for ev in pending:
                _apply(image, ev)
            return image
        return _torn(image, pending, rng)


def _torn(image: bytearray, pending: list[Event], rng: random.Random) -> bytearray:
    """Apply to each sector a random prefix of the pending changes that touch it."""
    touches: dict[int, int] = {}
    for ev in pending:
        if ev.kind != TRUNCATE:
            for s in _sectors(ev):
                touches[s] = touches.get(s, 0) + 1
    # A third of the sectors keep nothing, a third everything, the rest a random prefix.
    keep: dict[int, int] = {}
    for s, m in touches.items():
        r = rng.random()
        keep[s] = 0 if r < 1 / 3 else m if r < 2 / 3 else rng.randint(0, m)
    seen: dict[int, int] = {}
    full_size = len(image)
    for ev in pending:
        if ev.kind == TRUNCATE:
            full_size = ev.offset
            if rng.random() < 0.5:
                _apply(image, ev)
            continue
        full_size = max(full_size, ev.end) if ev.kind == WRITE else full_size
        for s in _sectors(ev):
            idx = seen.get(s, 0)
            seen[s] = idx + 1
            if idx >= keep[s]:
                continue
            lo = max(ev.offset, s * SECTOR)
            hi = min(ev.end, (s + 1) * SECTOR)
            if ev.kind == WRITE:
                if hi > len(image):
                    image.extend(bytes(hi - len(image)))
                image[lo:hi] = ev.data[lo - ev.offset : hi - ev.offset]
            elif lo < len(image):
                hi = min(hi, len(image))
                image[lo:hi] = bytes(hi - lo)
    if full_size > len(image) and rng.random() < 0.5:
        # The file's new size reached the disk, some of its data did not.
        image.extend(bytes(full_size - len(image)))
    return image

"""Every bad request to the engine raises its precise exception and changes nothing on disk.

The fixture builds a store file and a volume file holding data, one read-only and one writable snapshot
with preserved blocks; each test fingerprints both files (sha256) before the bad request and after it.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from standbylib.blockdev import Device, open_file_device, ram_device
from standbylib.errors import (
    Closed,
    InvalidArgument,
    InvalidBlockSize,
    InvalidLength,
    OutOfRange,
    ReadOnly,
    RequestError,
    SnapshotExists,
    SnapshotInvalid,
    StoreCorrupt,
    StoreNotWritable,
    UnknownSnapshot,
    UnknownVolume,
    VolumeMismatch,
)
from standbylib.rawfile import MemFile
from standbylib.snapshot import PreservationStore, Snapshot, Volume, layout

BS = 4096
SIZE = 64 * 1024


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass
class Env:
    store_path: str
    volume_path: str
    store: PreservationStore
    device: Device
    volume: Volume
    ro: Snapshot
    rw: Snapshot

    def fingerprint(self) -> tuple[str, str]:
        return sha256(self.store_path), sha256(self.volume_path)

    def state(self) -> tuple[Any, ...]:
        """What a user can observe through the API."""
        stats = self.store.stats()
        return (
            self.volume.read(0, SIZE),
            self.ro.read(0, SIZE),
            self.rw.read(0, SIZE),
            self.ro.info(),
            self.rw.info(),
            [s.name for s in self.volume.snapshots()],
            (stats.used_bytes, stats.preserved_blocks, stats.snapshots),
        )


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    store_path = str(tmp_path / "preserve.store")
    volume_path = str(tmp_path / "vol0.img")
    store = PreservationStore.open(store_path, 1 << 20)
    device = open_file_device(volume_path, SIZE)
    volume = store.attach("vol0", device, block_size=BS)
    volume.write(0, b"\x11" * SIZE)
    ro = volume.create_snapshot("frozen")
    rw = volume.create_snapshot("scratch", writable=True)
    volume.write_batch([(0, b"\x22" * 2 * BS), (5 * BS + 7, b"\x33" * 100)])
    rw.write(9 * BS, b"\x44" * BS)
    rw.flush()
    volume.flush()
    yield Env(store_path, volume_path, store, device, volume, ro, rw)
    store.close()
    device.close()


def assert_refused(
    env: Env, exc: type[BaseException], call: Callable[[], object]
) -> pytest.ExceptionInfo[Any]:
    """`call` raises exactly `exc` (not a subclass) and leaves the API view and both files unchanged."""
    before_files = env.fingerprint()
    before_state = env.state()
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"raised {type(info.value).__name__}, expected {exc.__name__}"
    env.volume.flush()
    assert env.state() == before_state
    assert env.fingerprint() == before_files
    return info


# ---------------------------------------------------------------------------------------- ranges


BAD_RANGES = [
    pytest.param(SIZE, 1, OutOfRange, id="at-end"),
    pytest.param(SIZE - 100, 101, OutOfRange, id="past-end"),
    pytest.param(SIZE + BS, BS, OutOfRange, id="beyond-end"),
    pytest.param(-1, 10, OutOfRange, id="negative-offset"),
    pytest.param(-BS, BS, OutOfRange, id="negative-offset-block"),
    pytest.param(0, 0, InvalidLength, id="zero-length"),
    pytest.param(100, -5, InvalidLength, id="negative-length"),
]


def _target(env: Env, which: str) -> Volume | Snapshot:
    targets: dict[str, Volume | Snapshot] = {
        "volume": env.volume,
        "readonly-snapshot": env.ro,
        "writable-snapshot": env.rw,
    }
    return targets[which]


TARGETS = ["volume", "readonly-snapshot", "writable-snapshot"]
WRITABLE = ["volume", "writable-snapshot"]

# The ranged requests: the targets each is made of, and the call (a write's data is `length` bytes, so it
# has no negative-length case).
RANGED: dict[str, tuple[list[str], Callable[[Volume | Snapshot, int, int], object]]] = {
    "read": (TARGETS, lambda t, offset, length: t.read(offset, length)),
    "zero": (WRITABLE, lambda t, offset, length: t.zero(offset, length)),
    "write": (WRITABLE, lambda t, offset, length: t.write(offset, b"\x55" * length)),
}
RANGE_CASES = [
    pytest.param(request, which, *case.values, id=f"{request}-{which}-{case.id}")
    for request, (targets, _call) in RANGED.items()
    for which in targets
    for case in BAD_RANGES
    if not (request == "write" and case.id == "negative-length")
]


@pytest.mark.parametrize(("request_kind", "which", "offset", "length", "exc"), RANGE_CASES)
def test_bad_range(
    env: Env, request_kind: str, which: str, offset: int, length: int, exc: type[RequestError]
) -> None:
    target = _target(env, which)
    call = RANGED[request_kind][1]
    info = assert_refused(env, exc, lambda: call(target, offset, length))
    # The error names the request as the caller made it.
    assert info.value.length == length


@pytest.mark.parametrize(("offset", "length", "exc"), BAD_RANGES)
@pytest.mark.parametrize("as_zero", [False, True], ids=["write", "zero"])
def test_batch_with_one_bad_op_applies_nothing(
    env: Env, offset: int, length: int, exc: type[RequestError], as_zero: bool
) -> None:
    bad: tuple[int, bytes | int] = (offset, length) if as_zero or length < 0 else (offset, b"\x66" * length)
    ops: list[tuple[int, bytes | int]] = [
        (3 * BS, b"\x77" * BS),  # would need a copy for both snapshots
        (10, b"\x88" * 20),
        (12 * BS, BS),
        bad,
        (14 * BS, b"\x99" * BS),
    ]
    assert_refused(env, exc, lambda: env.volume.write_batch(ops))


@pytest.mark.parametrize("which", TARGETS)
def test_huge_zero_request_is_refused_as_out_of_range(env: Env, which: str) -> None:
    # A length no device could hold (as a bad client might send) is a range error, not an allocation.
    target = _target(env, which)
    assert_refused(env, OutOfRange, lambda: target.zero(BS, 1 << 50))


# ---------------------------------------------------------------------------------------- read-only


def test_refused_zero_on_a_readonly_snapshot_allocates_nothing() -> None:
    # A WRITE_ZEROES of a large range on a read-only export must be refused without building the range
    # in memory first (a client could otherwise make the server allocate gigabytes per request).
    store = PreservationStore.in_memory(1 << 20)
    vol = store.attach("big", ram_device(64 << 20), block_size=BS)
    snap = vol.create_snapshot("frozen")
    tracemalloc.start()
    try:
        with pytest.raises(ReadOnly):
            snap.zero(0, 64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.write(0, b"x"), id="write-byte"),
        pytest.param(lambda s: s.write(BS, b"x" * BS), id="write-block"),
        pytest.param(lambda s: s.write(BS - 1, b"x" * (2 * BS)), id="write-unaligned"),
        pytest.param(lambda s: s.zero(0, SIZE), id="zero-all"),
    ],
)
def test_write_to_readonly_snapshot(env: Env, call: Callable[[Snapshot], None]) -> None:
    info = assert_refused(env, ReadOnly, lambda: call(env.ro))
    assert "frozen" in str(info.value)
    assert env.ro.readonly
    assert not env.rw.readonly


# ---------------------------------------------------------------------------------------- names


def test_unknown_snapshot(env: Env) -> None:
    info = assert_refused(env, UnknownSnapshot, lambda: env.volume.snapshot("nope"))
    assert "nope" in str(info.value) and "vol0" in str(info.value)
    assert_refused(env, UnknownSnapshot, lambda: env.volume.delete_snapshot("nope"))


def test_deleted_snapshot_handle_is_unknown(env: Env) -> None:
    stale = env.volume.create_snapshot("gone")
    env.volume.delete_snapshot("gone")
    assert_refused(env, UnknownSnapshot, lambda: stale.read(0, BS))
    assert_refused(env, UnknownSnapshot, lambda: env.volume.delete_snapshot("gone"))


def test_snapshot_of_another_volume_is_unknown(env: Env) -> None:
    other = env.store.attach("vol1", ram_device(SIZE), block_size=BS)
    assert_refused(env, UnknownSnapshot, lambda: other.snapshot("frozen"))
    assert_refused(env, UnknownSnapshot, lambda: other.delete_snapshot("frozen"))


def test_unknown_volume(env: Env) -> None:
    info = assert_refused(env, UnknownVolume, lambda: env.store.volume("vol9"))
    assert "vol9" in str(info.value)


@pytest.mark.parametrize("writable", [False, True])
def test_duplicate_snapshot_name(env: Env, writable: bool) -> None:
    info = assert_refused(
        env, SnapshotExists, lambda: env.volume.create_snapshot("frozen", writable=writable)
    )
    assert "frozen" in str(info.value)
    assert not env.ro.info().writable


BAD_NAMES = [
    "",
    "-leading-dash",
    ".hidden",
    "_underscore",
    "with space",
    "vol@snap",
    "a/b",
    "../up",
    "tab\tname",
    "new\nline",
    "é",
    "x" * 129,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_snapshot_name(env: Env, name: str) -> None:
    assert_refused(env, InvalidArgument, lambda: env.volume.create_snapshot(name))


@pytest.mark.parametrize("name", [123, b"bytes", ["list"]])
def test_snapshot_name_must_be_text(env: Env, name: Any) -> None:
    assert_refused(env, InvalidArgument, lambda: env.volume.create_snapshot(name))


def test_longest_and_punctuated_names_are_accepted(env: Env) -> None:
    for name in ["x" * 128, "a.b_c:d+e-f", "0"]:
        assert env.volume.create_snapshot(name).name == name


@pytest.mark.parametrize("name", ["", "a/b", "v@s", "x" * 129])
def test_invalid_volume_name(env: Env, name: str) -> None:
    assert_refused(env, InvalidArgument, lambda: env.store.attach(name, ram_device(SIZE)))


@pytest.mark.parametrize("capacity", [0, -1, -BS])
def test_snapshot_capacity_must_be_positive(env: Env, capacity: int) -> None:
    assert_refused(env, InvalidArgument, lambda: env.volume.create_snapshot("capped", capacity=capacity))


# ---------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("block_size", [0, -4096, 256, 511, 1000, 4097, 3 * 4096, 2 << 20, 4 << 20, 4096.0])
def test_bad_block_size(env: Env, block_size: Any) -> None:
    info = assert_refused(
        env, InvalidBlockSize, lambda: env.store.attach("vol1", ram_device(SIZE), block_size=block_size)
    )
    assert info.value.block_size == block_size
    assert env.store.volume_names() == ["vol0"]


@pytest.mark.parametrize("block_size", [512, 1 << 20])
def test_block_size_limits_are_accepted(block_size: int) -> None:
    store = PreservationStore.in_memory(8 << 20)
    vol = store.attach("edge", ram_device(2 << 20), block_size=block_size)
    vol.write(0, b"\x01" * (2 << 20))
    snap = vol.create_snapshot("edge-snap")
    vol.write(block_size - 1, b"ab")
    assert vol.read(block_size - 2, 4) == b"\x01ab\x01"
    assert snap.read(block_size - 2, 4) == b"\x01" * 4
    assert snap.info().preserved_blocks == 2


@pytest.mark.parametrize(("size", "block_size"), [(SIZE + 512, 4096), (4096 + 1, 512), (BS, 8192)])
def test_volume_size_not_multiple_of_block_size(env: Env, size: int, block_size: int) -> None:
    assert_refused(
        env, InvalidArgument, lambda: env.store.attach("vol1", ram_device(size), block_size=block_size)
    )
    assert env.store.volume_names() == ["vol0"]


@pytest.mark.parametrize("reopen", [False, True], ids=["same-store", "reopened-store"])
def test_reattach_with_another_block_size(env: Env, reopen: bool) -> None:
    env.volume.close()
    store = env.store
    if reopen:
        store.close()
        store = env.store = PreservationStore.open(env.store_path)
    before = env.fingerprint()
    for block_size in (512, 8192):
        with pytest.raises(VolumeMismatch, match="block size"):
            store.attach("vol0", env.device, block_size=block_size)
    assert env.fingerprint() == before
    # The volume still attaches with its own block size and its snapshots are intact.
    vol = store.attach("vol0", env.device, block_size=BS)
    assert vol.snapshot("frozen").read(0, BS) == b"\x11" * BS
    assert vol.snapshot("scratch").read(9 * BS, BS) == b"\x44" * BS


def test_reattach_with_a_smaller_device(env: Env) -> None:
    env.volume.close()
    before = env.fingerprint()
    with pytest.raises(VolumeMismatch, match="shrink"):
        env.store.attach("vol0", ram_device(SIZE - BS), block_size=BS)
    assert env.fingerprint() == before


def test_attach_twice(env: Env) -> None:
    assert_refused(env, VolumeMismatch, lambda: env.store.attach("vol0", env.device, block_size=BS))


# ---------------------------------------------------------------------------------------- store files


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("{tmp}/regular-file/preserve.store", id="parent-is-a-file"),
        pytest.param("/proc/standby-test-preserve.store", id="new-file-in-proc"),
        pytest.param("/proc/self/preserve.store", id="new-file-in-proc-self"),
        pytest.param("/sys/standby-test-preserve.store", id="new-file-in-sys"),
    ],
)
def test_store_path_not_writable(tmp_path: Any, path: str) -> None:
    (tmp_path / "regular-file").write_bytes(b"not a directory")
    path = path.format(tmp=tmp_path)
    with pytest.raises(StoreNotWritable) as info:
        PreservationStore.open(path, 1 << 20)
    assert path in str(info.value)
    assert not os.path.exists(path)
    assert (tmp_path / "regular-file").read_bytes() == b"not a directory"


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"hello, this is not a store\n" * 200, id="text"),
        pytest.param(os.urandom(8192), id="random"),
        pytest.param(b"\0" * 8192, id="zeros"),
        pytest.param(b"SBYPRES1" + b"\0" * 4088, id="magic-without-checksum"),
    ],
)
@pytest.mark.parametrize("capacity", [None, 1 << 20])
def test_open_a_file_that_is_not_a_store(tmp_path: Any, content: bytes, capacity: int | None) -> None:
    path = tmp_path / "not-a-store"
    path.write_bytes(content)
    with pytest.raises(StoreCorrupt) as info:
        PreservationStore.open(str(path), capacity)
    assert str(path) in str(info.value)
    # The file is left exactly as it was: opening must never format someone's data.
    assert path.read_bytes() == content


def assert_reopen_refused(env: Env, exc: type[BaseException], match: str, **kwargs: Any) -> None:
    """Opening the (closed) store file again raises `exc` matching `match`, and leaves the file as it was."""
    before = sha256(env.store_path)
    with pytest.raises(exc, match=match):
        PreservationStore.open(env.store_path, **kwargs)
    assert sha256(env.store_path) == before


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        pytest.param([(20, b"\xff")], "checksum", id="superblock"),
        pytest.param([(off + 30, b"\xff\xfe") for off in layout.TABLE_OFFSETS], "table", id="both-tables"),
    ],
)
def test_open_a_damaged_store(env: Env, damage: list[tuple[int, bytes]], match: str) -> None:
    env.store.close()
    with open(env.store_path, "r+b") as f:
        for offset, data in damage:
            f.seek(offset)
            f.write(data)
    assert_reopen_refused(env, StoreCorrupt, match)


def test_new_store_needs_a_capacity(tmp_path: Any) -> None:
    path = tmp_path / "new.store"
    with pytest.raises(InvalidArgument, match="capacity"):
        PreservationStore.open(str(path))
    assert not path.exists()
    with pytest.raises(InvalidArgument, match="capacity"):
        PreservationStore.open_raw(MemFile())


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"capacity": -1}, id="negative-capacity"),
        pytest.param({"capacity": 1 << 20, "on_full": "drop"}, id="unknown-policy"),
    ],
)
def test_bad_store_arguments(tmp_path: Any, kwargs: dict[str, Any]) -> None:
    path = tmp_path / "bad.store"
    with pytest.raises(InvalidArgument):
        PreservationStore.open(str(path), **kwargs)
    # A refused open leaves no store file behind.
    assert not path.exists()
    with pytest.raises(InvalidArgument):
        PreservationStore.open_raw(MemFile(), **kwargs)


def test_reopen_with_unknown_policy_changes_nothing(env: Env) -> None:
    env.store.close()
    assert_reopen_refused(env, InvalidArgument, "on_full", on_full="ignore")


# ---------------------------------------------------------------------------------------- invalid snapshots


def test_reading_an_invalid_snapshot(tmp_path: Any) -> None:
    store_path = str(tmp_path / "small.store")
    store = PreservationStore.open(store_path, 2 * BS)
    device = ram_device(SIZE)
    device.write(0, b"o" * SIZE)  # data: overwriting it needs copies (zeros would be hole entries)
    vol = store.attach("vol0", device, block_size=BS)
    snap = vol.create_snapshot("tiny", writable=True)
    vol.write(0, b"\x01" * 3 * BS)  # three copies needed, room for two
    assert not snap.valid
    before = sha256(store_path)
    for call in (lambda: snap.read(0, BS), lambda: snap.read(SIZE - 1, 1), lambda: snap.write(0, b"x")):
        with pytest.raises(SnapshotInvalid) as info:
            call()
        message = str(info.value)
        assert "'tiny'" in message and "'vol0'" in message
        assert "full" in message  # the reason
    # Out-of-range requests are still reported as such.
    with pytest.raises(OutOfRange):
        snap.read(SIZE, 1)
    assert sha256(store_path) == before
    assert vol.read(0, 3 * BS) == b"\x01" * 3 * BS
    store.close()


# ---------------------------------------------------------------------------------------- closed


CLOSED_CALLS = [
    pytest.param(lambda e: e.volume.read(0, BS), id="volume-read"),
    pytest.param(lambda e: e.volume.write(0, b"x"), id="volume-write"),
    pytest.param(lambda e: e.volume.zero(0, BS), id="volume-zero"),
    pytest.param(lambda e: e.volume.write_batch([(0, b"x"), (BS, 1)]), id="volume-batch"),
    pytest.param(lambda e: e.volume.flush(), id="volume-flush"),
    pytest.param(lambda e: e.volume.create_snapshot("late"), id="create-snapshot"),
    pytest.param(lambda e: e.volume.delete_snapshot("frozen"), id="delete-snapshot"),
    pytest.param(lambda e: e.ro.read(0, BS), id="snapshot-read"),
    pytest.param(lambda e: e.rw.write(0, b"x"), id="snapshot-write"),
    pytest.param(lambda e: e.rw.flush(), id="snapshot-flush"),
    pytest.param(lambda e: e.store.attach("vol1", ram_device(SIZE)), id="attach"),
]


@pytest.mark.parametrize("call", CLOSED_CALLS)
def test_closed_store(env: Env, call: Callable[[Env], object]) -> None:
    env.store.close()
    before = env.fingerprint()
    with pytest.raises(Closed, match="closed"):
        call(env)
    assert env.fingerprint() == before
    env.store.close()  # closing twice is harmless


@pytest.mark.parametrize(
    "call",
    [p for p in CLOSED_CALLS if p.id not in ("snapshot-flush", "attach")],
)
def test_closed_volume(env: Env, call: Callable[[Env], object]) -> None:
    env.volume.close()
    before = env.fingerprint()
    with pytest.raises(Closed, match="vol0"):
        call(env)
    assert env.fingerprint() == before

"""The engine on a filesystem with no space left, for real (no fault injection).

* A file-size limit (RLIMIT_FSIZE, any user): the store file cannot grow past it, as on a full disk.
* A small ext4 filesystem, mounted from a loop device and filled to the last block (root only,
  skipped elsewhere): the standby's data directory on a really full disk.

In both, a batch that needs copies the disk cannot take is refused with `DiskFull`, as often as it
is retried: no snapshot is invalidated or deferred because of the disk, the store keeps no space
for the failed copies, and once space is freed the same batch goes through on the same store.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from storecheck import assert_accounting, file_size_limit

from standbylib.blockdev import open_file_device
from standbylib.errors import DiskFull
from standbylib.snapshot import PreservationStore
from standbylib.snapshot.layout import AREAS_OFFSET, ENTRY_BLOCK

BS = 4096
MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    return bytes((i // 7 + seed) % 253 for i in range(size))


@pytest.mark.parametrize("on_full", ["invalidate", "defer"])
def test_a_store_that_cannot_grow_refuses_batches_and_keeps_no_space(tmp_path: Path, on_full: str) -> None:
    size = 512 * 1024
    volume_path = tmp_path / "vol.img"
    volume_path.write_bytes(pattern(size, 1))
    heard: list[tuple[str, str, str]] = []
    store = PreservationStore.open(
        str(tmp_path / "p.store"), 8 * MiB, on_full=on_full, on_invalidated=lambda *e: heard.append(e)
    )
    device = open_file_device(str(volume_path))
    vol = store.attach("vol", device, block_size=BS)
    snap = vol.create_snapshot("nightly")
    big = [(0, b"\x01" * 64 * BS)]  # 64 copies, in the kernel (copy_file_range)
    with file_size_limit(AREAS_OFFSET + ENTRY_BLOCK + 8 * BS):  # room for 8 slots
        vol.write_batch([(100 * BS, b"\x02" * 2 * BS)])  # what fits still goes through
        for attempt in range(3):
            with pytest.raises(DiskFull) as info:
                vol.write_batch(big)
            assert str(tmp_path / "p.store") in str(info.value)
            assert snap.valid, f"attempt {attempt}: invalidated because the disk was full"
            assert store.stats().used_bytes == 2 * BS, f"attempt {attempt}: the failed copies kept space"
            assert_accounting(store, f"attempt {attempt}")
    vol.write_batch(big)  # room again: the same batch, the same store
    expected = bytearray(pattern(size, 1))
    expected[0 : 64 * BS] = b"\x01" * 64 * BS
    expected[100 * BS : 102 * BS] = b"\x02" * 2 * BS
    assert vol.read(0, size) == expected
    assert snap.valid and snap.read(0, size) == pattern(size, 1)
    assert store.stats().used_bytes == 66 * BS and not heard
    vol.flush()
    vol.close()
    store.close()
    store = PreservationStore.open(str(tmp_path / "p.store"))
    vol = store.attach("vol", device, block_size=BS)
    assert vol.snapshot("nightly").read(0, size) == pattern(size, 1)
    assert store.stats().used_bytes == 66 * BS
    store.close()
    device.close()


# ---------------------------------------------------------------------------------------- a full ext4


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 filesystem mounted on a loop device (root only)."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("mount"):
        pytest.skip("needs root and mkfs.ext4 to mount a small filesystem")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    try:
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(image))
        run("mount", "-o", "loop", str(image), str(mnt))
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a loop filesystem here: {e}")
    try:
        yield mnt
    finally:
        try:
            run("umount", str(mnt))
        except subprocess.CalledProcessError:
            run("umount", "-l", str(mnt))


def fill(path: Path) -> None:
    """Write `path` until the filesystem has no block left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (MiB, 64 * 1024, 4096, 512):
            data = b"\xff" * chunk
            while True:
                try:
                    os.write(fd, data)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("on_full", ["invalidate", "defer"])
def test_a_really_full_ext4(small_ext4: Path, on_full: str) -> None:
    size = MiB
    volume_path = small_ext4 / "vol.img"
    store_path = small_ext4 / "preserve.store"
    volume_path.write_bytes(pattern(size, 3))  # allocated: overwriting it needs no space
    heard: list[tuple[str, str, str]] = []
    store = PreservationStore.open(
        str(store_path), 16 * MiB, on_full=on_full, on_invalidated=lambda *e: heard.append(e)
    )
    device = open_file_device(str(volume_path))
    vol = store.attach("vol", device, block_size=BS)
    vol.create_snapshot("old")
    vol.write_batch([(0, b"\x01" * 32 * BS)])  # 32 copies serving only "old"
    nightly = vol.create_snapshot("nightly")
    frozen = vol.read(0, size)
    fill(small_ext4 / "filler")

    batch = [(64 * BS, b"\x02" * 64 * BS)]
    for attempt in range(3):
        with pytest.raises(DiskFull) as info:
            vol.write_batch(batch)
        assert str(store_path) in str(info.value) and "free space on the filesystem" in str(info.value)
        assert nightly.valid and vol.snapshot("old").valid, f"attempt {attempt}: invalidated on a full disk"
        assert store.stats().used_bytes == 32 * BS, f"attempt {attempt}: the failed copies kept space"
        assert_accounting(store, f"attempt {attempt}")
        assert vol.read(0, size) == frozen
    # Deleting a snapshot works on the full disk (and gives its blocks back to the filesystem).
    free_before = os.statvfs(small_ext4).f_bfree
    vol.delete_snapshot("old")
    assert os.statvfs(small_ext4).f_bfree >= free_before + 32
    assert store.stats().used_bytes == 0
    os.unlink(small_ext4 / "filler")
    vol.write_batch(batch)
    assert nightly.read(0, size) == frozen and not heard
    assert store.stats().used_bytes == 64 * BS
    vol.flush()
    vol.close()
    store.close()
    store = PreservationStore.open(str(store_path))
    vol = store.attach("vol", device, block_size=BS)
    assert vol.snapshot("nightly").valid and vol.snapshot("nightly").read(0, size) == frozen
    assert store.stats().used_bytes == 64 * BS
    store.close()
    device.close()

"""A filesystem on the appliance, as an administrator would use it: ext4 made and written through the
primary's export (nbdfuse + fuse2fs), a snapshot taken, writes going on, and the snapshot mounted read-only
on the backup side showing exactly the files of snapshot time."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import Appliance, MiB, need, rand, run

pytestmark = pytest.mark.timeout(240)


class Mounts:
    """FUSE mounts made by one test; all undone at its end, whatever happened."""

    def __init__(self) -> None:
        self.stack: list[tuple[Path, subprocess.Popen[bytes]]] = []

    def _wait_mounted(self, mnt: Path, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"{what} exited {proc.returncode} before mounting {mnt}:\n{err}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not mount {mnt} within 60 s", pytrace=False)
            time.sleep(0.1)

    def nbdfuse(self, mnt: Path, uri: str, *, readonly: bool = False) -> Path:
        """The export as the file MNT/disk."""
        mnt.mkdir(parents=True, exist_ok=True)
        argv = ["nbdfuse", *(["-r"] if readonly else []), str(mnt / "disk"), uri]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.stack.append((mnt, proc))
        self._wait_mounted(mnt, proc, "nbdfuse")
        return mnt / "disk"

    def fuse2fs(self, image: Path, mnt: Path, *, readonly: bool = False) -> Path:
        mnt.mkdir(parents=True, exist_ok=True)
        opts = "fakeroot" + (",ro" if readonly else "")
        argv = ["fuse2fs", "-f", str(image), str(mnt), "-o", opts]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.stack.append((mnt, proc))
        self._wait_mounted(mnt, proc, "fuse2fs")
        return mnt

    def umount(self, mnt: Path) -> None:
        """Unmount and wait for the FUSE daemon to write back and exit."""
        found = [i for i, (m, _p) in enumerate(self.stack) if m == mnt]
        assert found, f"{mnt} is not mounted here"
        i = found[-1]
        proc = self.stack[i][1]
        run("umount", mnt)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the FUSE daemon of {mnt} did not exit after umount", pytrace=False)
        del self.stack[i]
        assert rc == 0, f"the FUSE daemon of {mnt} exited {rc}"

    def cleanup(self) -> None:
        while self.stack:
            mnt, proc = self.stack.pop()
            if os.path.ismount(mnt):
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def read_tree(root: Path) -> dict[str, bytes]:
    out = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.is_file() and not rel.startswith("lost+found"):
            out[rel] = p.read_bytes()
    return out


def sync_file(path: Path) -> None:
    """fsync the exported disk file: FUSE flush -> NBD FLUSH through to the primary (and the standby)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_ext4_snapshot_mounts_read_only_with_the_files_of_snapshot_time(
    appliance: Appliance, mounts: Mounts
) -> None:
    need("nbdfuse", "fuse2fs", "mkfs.ext4", "e2fsck")
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE is needed for nbdfuse and fuse2fs"
    a = appliance
    disk = mounts.nbdfuse(a.tmp / "primary-disk", a.primary.uri("vol0"))
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "e2e", disk)

    before = {
        "etc/hostname": b"standby-e2e\n",
        "data/big.bin": rand(3 * MiB + 123, seed=1),
        "data/small.txt": b"hello, snapshot\n" * 100,
        "gone-later.txt": b"delete me after the snapshot\n",
    }
    fs = mounts.fuse2fs(disk, a.tmp / "primary-fs")
    write_tree(fs, before)
    mounts.umount(fs)
    sync_file(disk)

    snap = a.standby.snapshot("vol0", "fs1")

    # writes go on: overwrite, delete, add
    fs = mounts.fuse2fs(disk, a.tmp / "primary-fs")
    (fs / "data" / "big.bin").write_bytes(rand(2 * MiB, seed=2))
    (fs / "gone-later.txt").unlink()
    write_tree(fs, {"new/after.bin": rand(MiB, seed=3)})
    after = read_tree(fs)
    mounts.umount(fs)
    sync_file(disk)

    # the backup side: the snapshot export as a file, checked and mounted read-only
    sdisk = mounts.nbdfuse(a.tmp / "snap-disk", a.standby.uri(f"vol0@{snap}"), readonly=True)
    fsck = run("e2fsck", "-fn", sdisk, check=False)
    assert fsck.returncode == 0, f"e2fsck of the snapshot found problems:\n{fsck.stdout}{fsck.stderr}"
    sfs = mounts.fuse2fs(sdisk, a.tmp / "snap-fs", readonly=True)
    got = read_tree(sfs)
    assert set(got) == set(before), f"snapshot files {sorted(got)}, expected {sorted(before)}"
    for rel, data in before.items():
        assert got[rel] == data, f"{rel} in the snapshot differs from the file at snapshot time"
    mounts.umount(sfs)
    mounts.umount(sdisk.parent)
    mounts.umount(disk.parent)

    # the replica holds the current filesystem: consistent, with the files written after the snapshot
    fsck = run("e2fsck", "-fn", a.standby.replica("vol0"), check=False)
    assert fsck.returncode == 0, f"e2fsck of the replica found problems:\n{fsck.stdout}{fsck.stderr}"
    assert a.standby.replica("vol0").read_bytes() == a.volume_path.read_bytes(), "replica != primary's file"
    assert set(after) == {"etc/hostname", "data/big.bin", "data/small.txt", "new/after.bin"}

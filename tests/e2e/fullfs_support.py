"""A filesystem that really runs out of space, for the end-to-end tests of a full standby disk.

`FullFs` is a small ext4 image (``mkfs.ext4 -m 0``, few inodes) mounted with ``fuse2fs -f IMG MNT -o
fakeroot``, as an administrator without a spare partition would do it. It is used as the standby's
``--data-dir``; `FullFs.fill` consumes every block (or every inode) the filesystem will still hand out
with filler files under ``MNT/.filler``, and `FullFs.free` deletes them. `mounted_fullfs` mounts one for a
test and unmounts it at the end whatever happened (``umount``, then ``umount -l``, then the FUSE daemon
killed): no mount is ever left behind.

What fuse2fs (1.47) does under ENOSPC, as found while writing these tests (and unlike the kernel's ext4):

* it never hands out the last 10 % of the blocks when the superblock reserves none (``-m 0``): it keeps
  a tenth of the blocks back then, from everybody, root and fakeroot included. ``statvfs`` says so too:
  ``f_bavail`` is ``f_bfree`` minus 10 %. "Full" is ``f_bavail`` at one block while ``f_bfree`` still
  shows ~10 % free; `FullFs.available` is what a write can get;
* before every write it checks that the write's length in whole blocks is free above that reserve,
  whether or not the blocks are allocated already: on a full fuse2fs no write of 4 KiB or more succeeds,
  not even an overwrite in place of blocks a file has (the kernel's ext4 allows those); a write of less
  than a block passes the check and fails only when it needs a new block and none is left. So on a full
  fuse2fs even the rewrite of the store's table (snapshot create or delete, the flush at a clean stop)
  fails with ENOSPC unless blocks are freed first (the standby gives up its 4 MiB reserve file for that);
* an allocating write fails at once with ENOSPC (the FUSE mount is write-through: no error delayed to
  ``fsync`` or ``close``); ``fallocate`` is all or nothing: it fails and allocates nothing when the whole
  length does not fit, so `fill` asks for slightly less, then tops up block by block;
* punching a hole (``FALLOC_FL_PUNCH_HOLE``) and unlinking work on a full filesystem and free the blocks
  at once; ``FALLOC_FL_ZERO_RANGE`` is refused (EINVAL); ``SEEK_DATA``/``SEEK_HOLE`` are not passed to
  fuse2fs (every file looks all data); ``copy_file_range`` works (the kernel copies through the page
  cache, in FUSE write requests, each checked as above);
* creating a file needs a free inode: with every inode taken (`fill` ``mode="inodes"``) a new file fails
  with ENOSPC while writes into existing files still get blocks.

FULLFS_DRIVER=kernel mounts the same image with the kernel's ext4 on a loop device instead (root only),
to tell the appliance's problems from fuse2fs's.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_support import BS, MiB, need, run

#: Size of the image: room for a 32 MiB replica, its preserved copies and a filler.
FS_SIZE = 128 * MiB
#: Inodes of the image: the standby needs a handful (identity, state, leases, store, replica, temporaries).
FS_INODES = 128
FILLER_DIR = ".filler"
#: Every filesystem mounted and not yet unmounted: unmounted at exit too (an interrupted run).
_MOUNTED: list[FullFs] = []


@dataclass
class FullFs:
    """One ext4 image mounted with fuse2fs; `fill` makes it full, `free` gives the space back."""

    root: Path
    size: int = FS_SIZE
    inodes: int = FS_INODES
    driver: str = "fuse2fs"  # or "kernel": ext4 on a loop device
    image: Path = field(init=False)
    mnt: Path = field(init=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    fillers: list[Path] = field(default_factory=list, init=False)
    _n: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.image = self.root / "fs.img"
        self.mnt = self.root / "mnt"

    # -- lifecycle ---------------------------------------------------------------------------------------

    def make(self) -> None:
        need("mkfs.ext4", "e2fsck")
        if self.driver == "fuse2fs":
            need("fuse2fs")
            assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE is needed for fuse2fs"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(self.size)
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(self.inodes), "-b", "4096", "-L", "fullfs",
            self.image)  # fmt: skip

    def mount(self) -> None:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.driver == "kernel":
            run("mount", "-o", "loop", self.image, self.mnt)
            (self.mnt / FILLER_DIR).mkdir(exist_ok=True)
            return
        argv = ["fuse2fs", "-f", str(self.image), str(self.mnt), "-o", "fakeroot"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"fuse2fs exited {self.proc.returncode} before mounting {self.mnt}:\n{err}")
            if time.monotonic() > deadline:
                pytest.fail(f"fuse2fs did not mount {self.mnt} within 60 s", pytrace=False)
            time.sleep(0.05)
        (self.mnt / FILLER_DIR).mkdir(exist_ok=True)

    def unmount(self) -> list[str]:
        """Unmount (lazily when busy) and end fuse2fs; the problems met (never raises)."""
        problems: list[str] = []
        if os.path.ismount(self.mnt):
            cp = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True, check=False)
            if cp.returncode != 0:
                problems.append(f"umount {self.mnt} failed ({cp.stderr.strip()}): unmounted lazily")
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                problems.append("fuse2fs did not exit within 30 s of the unmount (killed)")
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
            self.proc = None
        if os.path.ismount(self.mnt):
            problems.append(f"{self.mnt} is still mounted")
        return problems

    def fsck(self) -> str:
        """``e2fsck -fn`` of the unmounted image: "" when clean, else its report."""
        cp = subprocess.run(["e2fsck", "-fn", str(self.image)], capture_output=True, text=True, check=False)
        return "" if cp.returncode == 0 else f"e2fsck -fn exited {cp.returncode}:\n{cp.stdout}{cp.stderr}"

    # -- space -------------------------------------------------------------------------------------------

    def available(self) -> int:
        """Bytes an unprivileged allocation can still get (fuse2fs keeps 10 % back from everybody)."""
        st = os.statvfs(self.mnt)
        return st.f_bavail * st.f_frsize

    def usage(self) -> str:
        """What takes the space: each file's allocated bytes (and apparent size when it differs)."""
        rows = []
        for path in sorted(self.mnt.rglob("*")):
            if path.is_file() and FILLER_DIR not in path.parts:
                st = path.stat()
                rows.append(f"{path.relative_to(self.mnt)}: {st.st_blocks * 512} allocated of {st.st_size}")
        fill = sum(p.stat().st_size for p in self.fillers if p.exists())
        return f"{self.available()} available; fillers {fill}; " + "; ".join(rows)

    def free_inodes(self) -> int:
        return os.statvfs(self.mnt).f_favail

    def _filler(self) -> Path:
        self._n += 1
        path = self.mnt / FILLER_DIR / f"f{self._n}"
        self.fillers.append(path)
        return path

    def fill(self, mode: str = "blocks", leave: int = 0) -> int:
        """Take every block (``blocks``), every inode (``inodes``) or both (``both``) the filesystem
        will still give, leaving about `leave` bytes; the bytes (or inodes) taken."""
        taken = 0
        if mode in ("blocks", "both"):  # first: its filler file needs an inode
            taken += self._fill_blocks(leave)
        if mode in ("inodes", "both"):
            taken += self._fill_inodes()
        return taken

    def _fill_blocks(self, leave: int) -> int:
        path = self._filler()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        taken = 0
        try:
            # fallocate is all or nothing on fuse2fs: ask for what statvfs promises, then a bit less
            for back in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024):
                want = self.available() - leave - back * BS
                if want <= 0:
                    break
                try:
                    os.posix_fallocate(fd, 0, want)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    continue
                taken = want
                break
            # top up a block at a time until ENOSPC (extent blocks, races with the standby's writes)
            block = b"\xf1" * BS
            while self.available() > leave:
                try:
                    os.pwrite(fd, block, taken)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                taken += BS
            os.fsync(fd)
            # what the file holds (a kernel filesystem may keep part of a fallocate that failed)
            taken = os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)
        return taken

    def _fill_inodes(self) -> int:
        made = 0
        while True:
            path = self._filler()
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except OSError as e:
                self.fillers.pop()
                if e.errno != errno.ENOSPC:
                    raise
                return made
            made += 1

    def free(self, nbytes: int | None = None) -> int:
        """Delete the fillers (all, or about `nbytes` of them, the last first: a filler file is cut
        short); the bytes freed, as statvfs sees them."""
        before = self.available()
        while self.fillers and (nbytes is None or self.available() - before < nbytes):
            path = self.fillers[-1]
            size = path.stat().st_size if path.exists() else 0
            if nbytes is not None and size > nbytes - (self.available() - before) + BS:
                keep = size - (nbytes - (self.available() - before))
                os.truncate(path, max(0, keep - keep % BS))
                break
            path.unlink(missing_ok=True)
            self.fillers.pop()
        return self.available() - before

    def is_full(self) -> bool:
        """True when a new block cannot be allocated (a probe write fails with ENOSPC)."""
        probe = self.mnt / FILLER_DIR / "probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                return True
            raise
        try:
            os.pwrite(fd, b"p" * BS, 0)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                return True
            raise
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
        return False


@contextlib.contextmanager
def mounted_fullfs(root: Path, size: int = FS_SIZE, inodes: int = FS_INODES) -> Iterator[FullFs]:
    """A fresh `FullFs` for one test; unmounted at the end whatever happened. The image is removed
    after a clean unmount (set FULLFS_KEEP=1 to keep it); an e2fsck problem is printed, not failed: it
    is the filesystem driver's, not the appliance's."""
    fs = FullFs(root, size, inodes, os.environ.get("FULLFS_DRIVER", "fuse2fs"))
    _MOUNTED.append(fs)
    try:
        fs.make()
        fs.mount()
        yield fs
    finally:
        problems = fs.unmount()
        _MOUNTED.remove(fs)
        report = fs.fsck() if fs.image.exists() and not problems else ""
        if report:
            print(f"fuse2fs image {fs.image} after the test: {report}")
        for p in problems:
            print(f"fullfs: {p}")
        if not problems and not report and not os.environ.get("FULLFS_KEEP"):
            fs.image.unlink(missing_ok=True)
            shutil.rmtree(fs.mnt, ignore_errors=True)


@atexit.register
def _unmount_leftovers() -> None:
    for fs in list(_MOUNTED):
        with contextlib.suppress(Exception):
            fs.unmount()


# ------------------------------------------------------------------------------------------ waiting


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    """Poll `pred` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"{what} (waited {timeout:.0f} s)", pytrace=False)
        time.sleep(interval)


def seeds(count: int, env: str = "FULLFS_SEED") -> list[int]:
    """`count` random seeds, or the one in $`env` (to repeat a run).

    Parallel workers (pytest-xdist) must collect the same tests: they draw from the run's id, which
    they share, and the number of draws before (the same in every worker: collection order is fixed)."""
    if env in os.environ:
        return [int(os.environ[env])]
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    rng = random.Random(f"{run}-{len(_DRAWN)}") if run else random.SystemRandom()
    drawn = [rng.randrange(1 << 31) for _ in range(count)]
    _DRAWN.append(drawn)
    return drawn


_DRAWN: list[list[int]] = []

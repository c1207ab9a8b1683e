"""`OsFile` and `replace_file` report failures as library errors naming the file, never as OSError.

No space (ENOSPC), a quota (EDQUOT) or a file-size limit (EFBIG) is `DiskFull`, whose message says
what to do, so that the gRPC edge answers RESOURCE_EXHAUSTED and the primary retries later; any other
error is `DeviceError`. The real kernel produces EFBIG for a process whose file-size limit
(RLIMIT_FSIZE) is lower than the write: those tests need no root and no special filesystem. The
other errnos are injected by replacing the system call.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from storecheck import file_size_limit

from standbylib import rawfile
from standbylib.errors import DeviceError, DiskFull
from standbylib.rawfile import OsFile, replace_file

MiB = 1 << 20
FULL = [errno.ENOSPC, errno.EDQUOT, errno.EFBIG]


def raising(err: int) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise OSError(err, os.strerror(err))

    return call


def assert_error(info: pytest.ExceptionInfo[Any], err: int, path: str) -> None:
    expected = DiskFull if err in FULL else DeviceError
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert path in message
    assert info.value.path == path and info.value.detail
    if expected is DiskFull:
        assert "free space on the filesystem holding" in message


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[OsFile, OsFile]]:
    src = OsFile(str(tmp_path / "src"), create=True)
    src.pwrite(bytes(range(256)) * 64, 0)  # 16 KiB
    dst = OsFile(str(tmp_path / "dst"), create=True)
    yield src, dst
    src.close()
    dst.close()


# ---------------------------------------------------------------------------------------- real EFBIG


def test_writes_past_the_file_size_limit_are_disk_full(files: tuple[OsFile, OsFile]) -> None:
    src, dst = files
    with file_size_limit(MiB):
        with pytest.raises(DiskFull) as info:
            dst.pwrite(b"x" * 4096, 2 * MiB)
        assert_error(info, errno.EFBIG, dst.path)
        with pytest.raises(DiskFull) as info:
            dst.copy_from(src, 0, 8192, 2 * MiB)  # copy_file_range itself
        assert_error(info, errno.EFBIG, dst.path)
        with pytest.raises(DiskFull) as info:
            dst.copy_from(src, 1 << 30, 8192, 2 * MiB)  # past the source's end: zeros are written
        assert_error(info, errno.EFBIG, dst.path)
        with pytest.raises(DiskFull) as info:
            dst.truncate(2 * MiB)
        assert_error(info, errno.EFBIG, dst.path)
        dst.copy_from(src, 0, 8192, 4096)  # below the limit all goes on
    assert dst.pread(8192, 4096) == src.pread(8192, 0)


# ---------------------------------------------------------------------------------------- injected


@pytest.mark.parametrize("err", [*FULL, errno.EIO], ids=errno.errorcode.get)
def test_copy_errors(files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    src, dst = files
    monkeypatch.setattr(os, "copy_file_range", raising(err))
    with pytest.raises(DeviceError) as info:
        dst.copy_from(src, 0, 4096, 0)
    assert_error(info, err, dst.path)


@pytest.mark.parametrize(
    "err", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL], ids=errno.errorcode.get
)
def test_copy_between_files_the_kernel_cannot_copy_goes_through_user_space(
    files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    src, dst = files
    monkeypatch.setattr(os, "copy_file_range", raising(err))
    dst.copy_from(src, 4096, 8192, 100)
    assert dst.pread(8192, 100) == src.pread(8192, 4096)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EIO], ids=errno.errorcode.get)
def test_sync_errors(files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    _src, dst = files
    monkeypatch.setattr(os, "fdatasync", raising(err))
    monkeypatch.setattr(os, "fsync", raising(err))
    for call in (dst.sync, dst.sync_all):
        with pytest.raises(DeviceError) as info:
            call()
        assert_error(info, err, dst.path)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=errno.errorcode.get)
def test_punch_errors(files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    src, _dst = files

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(rawfile, "_fallocate", fallocate)
    with pytest.raises(DeviceError) as info:
        src.punch(0, 4096)
    assert_error(info, err, src.path)


def test_punch_where_unsupported_writes_zeros(
    files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _dst = files

    def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(rawfile, "_fallocate", fallocate)
    src.punch(100, 5000)
    assert src.pread(5000, 100) == bytes(5000)
    assert src.pread(100, 0) == bytes(range(100))


@pytest.mark.parametrize(
    ("call", "syscall"), [("pread", "pread"), ("preadinto", "preadv"), ("size", "fstat")]
)
def test_read_errors(
    files: tuple[OsFile, OsFile], monkeypatch: pytest.MonkeyPatch, call: str, syscall: str
) -> None:
    src, _dst = files
    calls = {
        "pread": lambda: src.pread(4096, 0),
        "preadinto": lambda: src.preadinto(memoryview(bytearray(4096)), 0),
        "size": src.size,
    }
    with monkeypatch.context() as m:
        m.setattr(os, syscall, raising(errno.EIO))
        with pytest.raises(DeviceError) as info:
            calls[call]()
    assert_error(info, errno.EIO, src.path)


# ---------------------------------------------------------------------------------------- replace_file


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_replace_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    replace_file(str(path), b"one")
    replace_file(str(path), b"two")
    assert path.read_bytes() == b"two"
    assert leftovers(path) == []


def test_replace_file_past_the_file_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    replace_file(str(path), b"old contents")
    with file_size_limit(MiB), pytest.raises(DiskFull) as info:
        replace_file(str(path), b"x" * (2 * MiB))
    assert_error(info, errno.EFBIG, str(path))
    assert path.read_bytes() == b"old contents"
    assert leftovers(path) == [], "the temporary file was left behind"


@pytest.mark.parametrize(
    ("call", "err"),
    [
        ("fsync", errno.ENOSPC),
        ("fsync", errno.EDQUOT),
        ("fsync", errno.EIO),
        ("rename", errno.EIO),
        ("rename", errno.ENOSPC),
    ],
)
def test_replace_file_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, err: int) -> None:
    path = tmp_path / "state.json"
    replace_file(str(path), b"old contents")
    monkeypatch.setattr(os, call, raising(err))
    with pytest.raises(DeviceError) as info:
        replace_file(str(path), b"new contents")
    monkeypatch.undo()
    assert_error(info, err, str(path))
    assert path.read_bytes() == b"old contents"
    assert leftovers(path) == [], "the temporary file was left behind"


def test_replace_file_in_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "gone" / "state.json"
    with pytest.raises(DeviceError) as info:
        replace_file(str(path), b"data")
    assert type(info.value) is DeviceError and str(path) in str(info.value)

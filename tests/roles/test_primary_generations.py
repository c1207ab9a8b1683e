"""Data generations bound to the volume file: another file, a copy or a rollback from another time,
or (after a clean stop) a file changed behind the primary's back is not taken for the data the
generations describe; the same file after a clean stop or a crash is."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

import pytest
from primary_support import MiB, RecordingMetrics, close, mirrored, wait_until

from primary.generations import XATTR, Generations, VolumeFile

SIZE = 4 * MiB


class Volume:
    """A volume file and the generations beside it, opened and closed as the primary does."""

    def __init__(self, tmp_path) -> None:
        self.path = tmp_path / "vol.img"
        self.state = str(tmp_path / "vol.generation")
        with open(self.path, "wb") as f:
            f.truncate(SIZE)
            f.write(b"v1" * 4096)
        self.fd = -1

    def open(self, *, discard: bool = False) -> Generations:
        self.close()
        self.fd = os.open(self.path, os.O_RDWR)
        return Generations(self.state, VolumeFile(str(self.path), self.fd), name="vol0", discard=discard)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write(self, offset: int, data: bytes) -> None:
        fd = self.fd if self.fd >= 0 else os.open(self.path, os.O_RDWR)
        os.pwrite(fd, data, offset)
        if fd != self.fd:
            os.close(fd)

    def xattr(self) -> str:
        return os.getxattr(self.path, XATTR).decode()

    def saved(self) -> dict:
        with open(self.state) as f:
            return json.load(f)


@pytest.fixture
def vol(tmp_path):
    v = Volume(tmp_path)
    yield v
    v.close()


def test_a_new_state_is_bound_to_the_file(vol):
    g = vol.open()
    assert g.bind_reason == "new" and not g.mismatch
    assert vol.xattr() == g.current and g.xattr
    st = os.stat(vol.path)
    assert vol.saved()["volume"]["ino"] == st.st_ino and vol.saved()["volume"]["size"] == SIZE


def test_the_same_file_after_a_clean_stop_or_a_crash_is_accepted(vol):
    g = vol.open()
    vol.write(0, b"x" * 4096)
    g.rotate()
    g.clean_stop()
    assert vol.saved()["clean"]["mtime_ns"] == os.stat(vol.path).st_mtime_ns
    g = vol.open()
    assert not g.mismatch and g.bind_reason == ""
    assert vol.saved()["clean"] is None  # running: a crash from now on is an unclean stop
    vol.write(8192, b"y" * 4096)
    g.rotate()  # then a crash (kill -9): no clean stop recorded
    g = vol.open()
    assert not g.mismatch


def test_a_copy_as_a_new_file_is_refused_naming_the_cause_and_the_fix(vol, tmp_path):
    g = vol.open()
    generation = g.current
    g.clean_stop()
    vol.close()
    shutil.copy2(vol.path, tmp_path / "copy.img")  # a copy: a new inode (copy2 keeps the attribute)
    os.replace(tmp_path / "copy.img", vol.path)
    before = vol.saved()
    g = vol.open()
    assert "inode changed" in g.mismatch
    assert f"is not the file generation {generation} was recorded for" in g.mismatch
    assert "--discard-standby-data" in g.mismatch and "point --volume at the right file" in g.mismatch
    assert vol.saved() == before, "a refused file changed the recorded state"


def test_a_file_overwritten_in_place_after_a_clean_stop_is_refused(vol, tmp_path):
    g = vol.open()
    shutil.copyfile(vol.path, tmp_path / "old.img")  # an earlier copy
    vol.write(0, b"new!" * 1024)
    g.clean_stop()
    vol.close()
    shutil.copyfile(tmp_path / "old.img", vol.path)  # the same inode, its attribute kept
    assert vol.xattr() == g.current
    g = vol.open()
    assert "mtime changed" in g.mismatch


def test_a_change_with_the_mtime_put_back_is_found_by_the_sample(vol):
    g = vol.open()
    g.clean_stop()
    vol.close()
    st = os.stat(vol.path)
    vol.write(0, b"z" * 4096)  # the first block is always in the sample
    os.utime(vol.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    g = vol.open()
    assert "sample of its blocks differs" in g.mismatch


def test_a_rollback_carries_an_older_generation(vol):
    g = vol.open()
    old_generation = g.current
    g.rotate()
    g.rotate()  # two outages later, a snapshot of the filesystem from the first generation comes back
    vol.close()
    os.setxattr(vol.path, XATTR, old_generation.encode())
    g = vol.open()  # even after an unclean stop: only the previous generation is accepted
    assert f"carries generation {old_generation}" in g.mismatch


def test_the_previous_generation_is_accepted_after_a_crash_only(vol):
    g = vol.open()
    previous = g.current
    g.rotate()  # the attribute's update is not synced: a crash may lose it
    os.setxattr(vol.path, XATTR, previous.encode())
    g = vol.open()
    assert not g.mismatch
    assert vol.xattr() == g.current  # brought up to date at start
    g.clean_stop()  # a clean stop syncs the attribute: afterwards the previous one is refused
    os.setxattr(vol.path, XATTR, g.previous.encode())
    g = vol.open()
    assert "carries generation" in g.mismatch


def test_a_copy_without_attributes_in_place_is_refused_even_after_a_crash(vol):
    vol.open()
    os.removexattr(vol.path, XATTR)
    g = vol.open()
    assert "carries no generation" in g.mismatch


def test_discarding_binds_a_new_history_to_the_file(vol, tmp_path):
    g = vol.open()
    g.agree(g.current)
    old = (g.current, g.base)
    vol.close()
    shutil.copy2(vol.path, tmp_path / "copy.img")
    os.replace(tmp_path / "copy.img", vol.path)
    g = vol.open(discard=True)
    assert not g.mismatch and g.bind_reason == "discard"
    assert g.current not in old and g.base == ""
    assert vol.xattr() == g.current
    assert not vol.open().mismatch  # and it is the recorded file from now on


def test_a_state_of_an_older_version_is_bound_at_start(vol):
    with open(vol.state, "w") as f:
        json.dump({"current": "g1", "base": "g0"}, f)
    g = vol.open()
    assert (g.current, g.base, g.bind_reason) == ("g1", "g0", "upgrade")
    assert vol.xattr() == "g1" and not vol.open().mismatch


def test_without_user_attributes_the_identity_and_the_clean_stop_still_bind(vol, tmp_path, monkeypatch):
    def no_xattrs(*args, **kwargs):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    monkeypatch.setattr(os, "getxattr", no_xattrs)
    g = vol.open()
    assert not g.xattr and not g.mismatch
    g.rotate()
    g.clean_stop()
    assert not vol.open().mismatch
    vol.close()
    shutil.copyfile(vol.path, tmp_path / "copy.img")
    os.replace(tmp_path / "copy.img", vol.path)
    assert "inode changed" in vol.open().mismatch


def test_a_mirror_whose_volume_file_is_not_the_recorded_one_never_contacts_the_standby(tmp_path, rig):
    local = tmp_path / "primary.img"
    with open(local, "wb") as f:
        f.truncate(SIZE)
    state = str(tmp_path / "primary.generation")
    fd = os.open(local, os.O_RDWR)
    Generations(state, VolumeFile(str(local), fd)).clean_stop()
    os.close(fd)
    os.unlink(local)
    with open(local, "wb") as f:  # another file at the same path
        f.truncate(SIZE)
    fd = os.open(local, os.O_RDWR)
    metrics = RecordingMetrics()
    try:
        generations = Generations(state, VolumeFile(str(local), fd), name="vol0")
        dev = mirrored(tmp_path, rig.target, SIZE, metrics=metrics, generations=generations)
        try:
            wait_until(lambda: dev.mirror.state == "blocked", what="the blocked state")
            assert dev.mirror.blocked and not dev.mirror.live and not dev.mirror.connected
            assert "--discard-standby-data" in dev.mirror.last_error
            assert metrics.states == ["blocked"] and not metrics.up
            dev.write(0, b"w" * 4096)  # the volume is still served; the write is tracked
            assert dev.mirror.bitmap.dirty() >= 1
            assert dev.mirror.handshakes == 0 and rig.node.replicas() == []
        finally:
            close(dev)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)

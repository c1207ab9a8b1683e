"""The README's command block, run as written: its default addresses (127.0.0.1:7700, :10809, :10810)
in a network namespace of the test's own, so that nothing else running on this machine holds those
ports; the two daemons as two terminals would run them, then every other line in order."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import BIN
from deploy_support import need
from walkthrough_support import Site, doc_block, steps

pytestmark = pytest.mark.timeout(300)

DATA = 24 << 20  # the disk image the block copies to the primary


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A network namespace with only its loopback, up; the command prefix that enters it."""
    for tool in ("unshare", "nsenter", "ip"):
        need(tool)
    holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep 3600"])
    enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net", "--"]
    try:
        deadline = time.monotonic() + 10
        while True:
            up = subprocess.run([*enter, "ip", "-o", "link", "show", "lo"], capture_output=True, text=True)
            if "UP" in up.stdout.split(">")[0] and os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink(
                "/proc/self/ns/net"
            ):
                break
            assert holder.poll() is None and time.monotonic() < deadline, f"no namespace: {up.stderr}"
            time.sleep(0.05)
        yield enter
    finally:
        holder.kill()
        holder.wait()


def test_the_readme_block_works_as_written(netns: list[str], tmp_path: Path) -> None:
    for tool in ("qemu-img", "nbdcopy"):
        need(tool)
    site = Site(tmp_path / "site", wrapper=netns)
    site.path = f"{BIN}{os.pathsep}{site.path}"  # the project's programs, as `make demo` installs them
    home = site.root / "root"
    data = bytearray(DATA)
    rng = random.Random(5)
    for offset in (0, 12 << 20):
        data[offset : offset + (4 << 20)] = rng.randbytes(4 << 20)
    (home / "disk.img").write_bytes(data)

    def status() -> dict[str, Any]:
        vol: dict[str, Any] = json.loads(site.sh("standbyctl status --json").stdout)["volumes"][0]
        return vol

    skipped = []
    for step in steps(doc_block("README.md", "## What works today")):
        command = step.command.split("  #")[0].strip()
        if command.startswith("standby-daemon"):
            site.background("standby-daemon", command)
        elif command.startswith("standby-primary"):
            site.background("standby-primary", command)
        elif "s3://" in command:
            skipped.append(command)  # needs an S3 endpoint: tests/e2e/test_s3_backup.py runs it
        else:
            if command.startswith("standbyctl snapshot create"):
                # As a user would: a snapshot waits for the first sync (an inconsistent replica refuses).
                deadline = time.monotonic() + 120
                while status()["state"] != "uptodate":
                    assert time.monotonic() < deadline, status()
                    time.sleep(0.2)
            out = site.sh(command).stdout
            if command == "standbyctl snapshot create vol0 nightly":
                assert out.strip() == "nightly", out
    assert len(skipped) == 1, skipped

    # What the block promised: the frozen image read with nbdcopy, the status, the archive.
    image = home / "nightly.img"
    assert image.stat().st_size == 10 << 30
    with open(image, "rb") as f:
        assert f.read(DATA) == bytes(data), "nightly.img is not what qemu-img wrote"
        with pytest.raises(OSError) as none:
            os.lseek(f.fileno(), DATA, os.SEEK_DATA)
        assert none.value.errno == errno.ENXIO, "nightly.img has data past what was written"
    site.sh("standby-backup verify vol0.tar.zst")
    vol = status()
    assert (vol["state"], vol["connected"], vol["size"]) == ("uptodate", True, 10 << 30), vol
    for name in ("standby-primary", "standby-daemon"):
        site.stop(name)
    assert site.not_json() == [], "\n".join(site.not_json())

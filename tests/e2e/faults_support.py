"""Fault injection helpers shared by the fault tests and the randomised fault matrix: a standby and a
primary joined by a `LinkProxy`, fio storms, and the invariants checked after every fault."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from e2e_support import VOLUME_SIZE, Daemons, Primary, Standby, need, run
from linkproxy import LinkProxy


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fio_storm(uri: str, seconds: float, cwd: Path, size: int = VOLUME_SIZE) -> subprocess.Popen[str]:
    """Random 4 KiB and 64 KiB writes through the primary for `seconds`, 8 in flight, in the first
    `size` bytes."""
    need("fio")
    return subprocess.Popen(
        [
            "fio", "--name=storm", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bssplit=4k/70:64k/30", f"--size={size}", "--iodepth=8", "--time_based",
            f"--runtime={seconds}", "--randrepeat=0",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "err= 0" in out, f"a client write failed:\n{out}"


def resync_budget(primary: Primary, since: int) -> int:
    """Bytes the primary announced to resync at each reconnect after the `since`-th event."""
    events = [e for e in primary.daemon.events if e.get("event") == "mirror_connected"]
    return sum(int(e.get("resync_bytes", 0)) for e in events[since:])


def resent(primary: Primary) -> float:
    return primary.metrics().find("standby_resync_bytes_total", volume="vol0") or 0.0


def frozen_snapshot(standby: Standby, primary: Primary, tmp: Path) -> tuple[str, Path]:
    """Write data, wait for sync, take a snapshot; the image it must keep."""
    primary_file = primary.volumes["vol0"]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 8M", "-c", "flush", primary.uri("vol0"))
    primary.wait_in_sync()
    expected = tmp / "frozen.img"
    shutil.copyfile(primary_file, expected)
    return standby.snapshot("vol0", "before"), expected


def assert_snapshot(standby: Standby, name: str, expected: Path, tmp: Path) -> None:
    out = tmp / f"snapshot-read-{name}.img"
    out.unlink(missing_ok=True)  # nbdcopy may skip zeros: never read into an old copy
    run("nbdcopy", "--connections=4", standby.uri(f"vol0@{name}"), out)
    assert sha(out) == sha(expected), f"snapshot {name} does not read its frozen image"
    out.unlink()


def assert_in_sync(standby: Standby, primary: Primary) -> None:
    run("qemu-io", "-f", "raw", "-c", "flush", primary.uri("vol0"))
    primary.wait_in_sync(timeout=120)
    assert sha(standby.replica("vol0")) == sha(primary.volumes["vol0"]), (
        "the replica differs from the primary"
    )
    assert standby.status()["volumes"][0]["state"] == "uptodate"


def start_pair(
    daemons: Daemons,
    tmp: Path,
    *extra: str,
    standby_extra: tuple[str, ...] = (),
    data_dir: Path | None = None,
) -> tuple[Standby, Primary, LinkProxy]:
    """A standby (its --data-dir `data_dir`, by default tmp/standby) and a primary in front of it through
    a `LinkProxy`."""
    standby = daemons.standby(data_dir, *standby_extra)
    proxy = LinkProxy(standby)
    vol = tmp / "primary" / "vol0.img"
    vol.parent.mkdir(exist_ok=True)
    primary = daemons.primary(proxy, {"vol0": f"{vol},size=32MiB"}, "--ack-timeout", "3", *extra)
    return standby, primary, proxy

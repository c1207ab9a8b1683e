"""Fault injection helpers shared by the fault tests and the randomised fault matrix: a standby and a
primary joined by a `LinkProxy`, fio storms, and the invariants checked after every fault."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Daemons, MiB, Primary, Standby, need, run
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


def wait_for(
    ok: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    *,
    clients: subprocess.Popen[str] | None = None,
) -> None:
    """Until `ok()` is true: how a fault is placed on what it must hit (writes in flight, an outage the
    primary noticed), never a fixed pause. Fails naming `what` after `timeout` s, or as soon as `clients`
    (the writers the condition counts on) ended."""
    deadline = time.monotonic() + timeout
    while not ok():
        if clients is not None and clients.poll() is not None:
            pytest.fail(f"the client writes ended before {what}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout:.0f} s", pytrace=False)
        time.sleep(0.05)


def applied(standby: Standby) -> float:
    """Bytes the standby applied to vol0 (a daemon restarted counts from 0)."""
    return standby.metrics().find("standby_applied_bytes_total", volume="vol0") or 0.0


def written(primary: Primary) -> float:
    """Bytes clients wrote through the primary to vol0."""
    return primary.metrics().find("standby_written_bytes_total", volume="vol0") or 0.0


def link_lost(primary: Primary) -> bool:
    """The primary noticed its standby is gone: no stream, writes only tracked in the bitmap."""
    m = primary.metrics()
    states = ("disconnected", "refused")
    return any(m.find("standby_replication_state", volume="vol0", state=s) == 1 for s in states)


def writes_reach(standby: Standby, clients: subprocess.Popen[str], nbytes: int = MiB) -> None:
    """Until `nbytes` more of the clients' writes were applied by the standby: writes flow over the link
    (after a fault: the primary reconnected and mirrors again)."""
    start = applied(standby)
    wait_for(lambda: applied(standby) >= start + nbytes, "writes flowing to the standby", clients=clients)


def writes_tracked(primary: Primary, clients: subprocess.Popen[str], nbytes: int = MiB) -> None:
    """Until the primary noticed the outage and `nbytes` more client writes went through it meanwhile
    (answered, and tracked in its bitmap for the resync)."""
    start = written(primary)
    wait_for(
        lambda: link_lost(primary) and written(primary) >= start + nbytes,
        "writes tracked by the primary during the outage",
        clients=clients,
    )


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


@contextlib.contextmanager
def storm_pair(
    daemons: Daemons, tmp: Path, *extra: str
) -> Iterator[tuple[Standby, Primary, LinkProxy, str, Path]]:
    """The set-up of a fault during a storm of client writes: the tools, `start_pair` (with `extra` for
    the primary; its proxy closed when the block ends) and `frozen_snapshot`. Gives the standby, the
    primary, the proxy, the snapshot's name and the image it must keep."""
    need("fio", "qemu-io", "nbdcopy")
    standby, primary, proxy = start_pair(daemons, tmp, *extra)
    try:
        name, expected = frozen_snapshot(standby, primary, tmp)
        yield standby, primary, proxy, name, expected
    finally:
        proxy.close()

"""`make demo`: the appliance on a built-in local setup, in a temporary directory removed at the end.

A standby daemon and a primary agent start on free loopback ports. qemu-io writes through the primary's
NBD export (every write mirrored, in order, before it is answered); a snapshot is taken on the standby;
a writer keeps changing the volume while nbdcopy reads the snapshot's NBD export; the copy must equal
the image at snapshot time, the replica must equal the primary's volume, and the preservation fill must
equal the blocks overwritten since the snapshot. The backup node archives the snapshot over NBD while
writes go on; the archive is verified and restored (with `standby-backup restore` and with plain GNU tar)
to exactly the image at snapshot time. The last line is ``DEMO OK``; no process is left behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from daemons import BIN, Daemon, start_primary, start_standby

from standbylib.units import human_size

MiB = 1 << 20
SIZE = 64 * MiB


def say(text: str) -> None:
    print(text, flush=True)


def sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise SystemExit(f"demo failed: {' '.join(argv)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_io(uri: str, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    sh(*args, uri)


def metric(address: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise SystemExit(f"demo failed: no metric {name}{{{want}}}")


def main() -> int:
    for tool in ("qemu-io", "nbdcopy", "tar", "zstd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/install-debian-tools.sh (make demo does)")
    work = Path(tempfile.mkdtemp(prefix="standby-demo-"))
    daemons: list[Daemon] = []
    try:
        say(f"1. starting a standby daemon and a primary agent in {work}")
        standby = start_standby(work / "standby", "--preservation-capacity", "256MiB")
        daemons.append(standby)
        primary = start_primary(
            [f"vol0={work / 'vol0.img'},size=64MiB"], standby.addresses["grpc"], work / "p.log"
        )
        daemons.append(primary)
        ctl = [str(BIN / "standbyctl"), "--standby", standby.addresses["grpc"]]
        vol_uri = f"nbd://{primary.addresses['nbd']}/vol0"
        say(f"   primary exports {vol_uri}; standby exports snapshots on nbd://{standby.addresses['nbd']}")

        say("2. writing 32 MiB through the primary with qemu-io (mirrored before each write is answered)")
        qemu_io(vol_uri, "write -P 0x11 0 16M", "write -P 0x22 16M 16M", "flush")
        frozen = work / "frozen.img"
        shutil.copyfile(work / "vol0.img", frozen)  # the image the snapshot must keep

        name = sh(*ctl, "snapshot", "create", "vol0", "demo").strip()
        say(f"3. snapshot {name!r} taken on the standby (O(1): nothing copied)")

        say("4. overwriting 8 MiB through the primary while nbdcopy reads the snapshot over NBD")
        writer = threading.Thread(
            target=qemu_io, args=(vol_uri, *[f"write -P 0x{0x30 + i:x} {i}M 1M" for i in range(8)])
        )
        writer.start()
        copy = work / "snapshot-copy.img"
        sh("nbdcopy", "--connections=4", f"nbd://{standby.addresses['nbd']}/vol0@{name}", str(copy))
        writer.join()
        qemu_io(vol_uri, "flush")
        if sha256_file(copy) != sha256_file(frozen):
            raise SystemExit("demo failed: the snapshot does not read the image frozen at snapshot time")
        say("   the snapshot reads exactly the image at snapshot time")
        if sha256_file(work / "vol0.img") != sha256_file(
            standby_replica := work / "standby/replicas/vol0.img"
        ):
            raise SystemExit(f"demo failed: {standby_replica} differs from the primary's volume")
        say("   the standby's replica equals the primary's volume")

        used = metric(
            standby.addresses["metrics"], "standby_preservation_used_bytes", volume="vol0", snapshot=name
        )
        fill = metric(
            standby.addresses["metrics"], "standby_preservation_fill_ratio", volume="vol0", snapshot=name
        )
        if used != 8 * MiB:
            raise SystemExit(f"demo failed: preservation used {used} bytes, 8 MiB expected")
        say(f"5. preservation fill of {name}: {human_size(int(used))} used ({fill:.2%} of its capacity)")
        pm = primary.addresses["metrics"]
        connected = metric(pm, "standby_replication_connected", volume="vol0")
        mirrored = metric(pm, "standby_mirrored_bytes_total", volume="vol0")
        behind = metric(pm, "standby_out_of_sync_bytes", volume="vol0")
        lag = metric(standby.addresses["metrics"], "standby_replication_lag_seconds", volume="vol0")
        say(
            f"   replication: connected={int(connected)}, {human_size(int(mirrored))} mirrored, "
            f"{human_size(int(behind))} out of sync, standby lag {lag:.1f} s"
        )
        say("6. the backup node archives the snapshot over NBD while the primary keeps writing")
        archive = work / "vol0.tar.zst"
        writer = threading.Thread(target=qemu_io, args=(vol_uri, "write -P 0x55 40M 8M", "flush"))
        writer.start()
        backup = [str(BIN / "standby-backup")]
        sh(*backup, "run", "vol0", "--standby", standby.addresses["grpc"], "--snapshot", name,
           "--output", str(archive), "--metrics-listen", "off", "--log-format", "json")  # fmt: skip
        writer.join()
        say(f"   {archive.name}: {human_size(archive.stat().st_size)} for {human_size(SIZE)} of volume")
        say("   " + sh(*backup, "verify", str(archive)).strip())
        restored = work / "restored.img"
        sh(*backup, "restore", str(archive), "--output", str(restored))
        (work / "tar").mkdir()
        sh("tar", "--zstd", "-xSf", str(archive), "-C", str(work / "tar"))
        for path, how in (
            (restored, "standby-backup restore"),
            (work / "tar" / "vol0.img", "tar --zstd -xSf"),
        ):
            if sha256_file(path) != sha256_file(frozen):
                raise SystemExit(f"demo failed: {how} did not give the image at snapshot time")
        say("   restored with standby-backup restore and with plain tar: both equal the snapshot-time image")
        status = json.loads(sh(*ctl, "status", "--json"))
        say("7. standbyctl status:")
        for line in sh(*ctl, "status").splitlines():
            say(f"   {line}".rstrip())
        assert status["volumes"][0]["connected"]
        sh(*ctl, "snapshot", "delete", "vol0", name)
        say(f"8. snapshot {name!r} deleted; stopping the daemons")
        for d in reversed(daemons):
            if d.stop() != 0:
                raise SystemExit(f"demo failed: {d.name} exited with {d.proc.returncode}:\n{d.tail()}")
        daemons.clear()
    finally:
        for d in reversed(daemons):
            d.stop()
        shutil.rmtree(work, ignore_errors=True)
    say("DEMO OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

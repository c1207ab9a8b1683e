"""Load: 8 NBD clients (fio jobs, each its own connection) read and write through the primary while the
backup node archives a snapshot of the same volume. No client error, the backup verifies and restores
to its snapshot's image, the replica equals the primary; p50/p99 latencies are printed.

`make test` runs 10 s; `make soak` runs the 60 s variant."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Appliance, MiB, backup_argv, need, rand, run
from faults_support import writes_reach


def load(a: Appliance, seconds: int) -> dict[str, float]:
    need("fio", "nbdcopy")
    a.writer.write(0, rand(8 * MiB, seed=41))
    fio = subprocess.Popen(
        [
            "fio", "--name=load", "--ioengine=nbd", f"--uri={a.primary.uri('vol0')}", "--numjobs=8",
            "--rw=randrw", "--rwmixread=50", "--bssplit=4k/60:64k/40", f"--size={VOLUME_SIZE}",
            "--iodepth=4", "--time_based", f"--runtime={seconds}", "--group_reporting",
            "--output-format=json", "--randrepeat=0",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=a.tmp,
    )  # fmt: skip
    writes_reach(a.standby, fio)  # the load is under way
    # a backup in parallel, of a snapshot kept to compare the archive with
    archive = a.tmp / "load.tar.zst"
    run(*backup_argv("run", "vol0", "--standby", a.standby.grpc, "--output", str(archive), "--keep-snapshot",
                     "--metrics-listen", "off"), timeout=300)  # fmt: skip
    [snap] = a.standby.snapshots("vol0")
    frozen = a.read_export(a.standby.uri(f"vol0@{snap['name']}"), "frozen.img")
    out, err = fio.communicate(timeout=seconds + 120)
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0, f"fio reported error {job['error']}"
    restored = a.tmp / "restored.img"
    run(*backup_argv("restore", str(archive), "--output", str(restored)))
    assert restored.read_bytes() == frozen, "the archive made under load is not the snapshot's image"
    a.standby.ctl("snapshot", "delete", "vol0", snap["name"])
    run("qemu-io", "-f", "raw", "-c", "flush", a.primary.uri("vol0"))
    a.primary.wait_in_sync(timeout=120)
    assert Path(a.standby.replica("vol0")).read_bytes() == a.volume_path.read_bytes()
    figures = {}
    for kind in ("read", "write"):
        pct = job[kind]["clat_ns"]["percentile"]
        figures[f"{kind}_iops"] = round(job[kind]["iops"], 1)
        figures[f"{kind}_p50_ms"] = round(pct["50.000000"] / 1e6, 3)
        figures[f"{kind}_p99_ms"] = round(pct["99.000000"] / 1e6, 3)
    print(f"load, 8 clients for {seconds} s with a backup in parallel: {json.dumps(figures)}")
    return figures


@pytest.mark.timeout(300)
def test_eight_clients_and_a_backup_short(appliance: Appliance) -> None:
    figures = load(appliance, 10)
    assert figures["write_iops"] > 0 and figures["read_iops"] > 0


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_eight_clients_and_a_backup_60s(appliance: Appliance) -> None:
    figures = load(appliance, 60)
    assert figures["write_iops"] > 0 and figures["read_iops"] > 0

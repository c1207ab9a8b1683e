"""Scale: 16 volumes from 8 primaries (2 each) on one standby, fio writing to every volume at once.

Afterwards every volume is in sync and equal to its replica, the standby lists all 16, each volume's
metrics on both sides count what fio wrote to it (the primary's written bytes exactly, the standby's
applied bytes at least), and no volume starved: each got at least `STARVED` of the busiest one's
throughput (a low bar on a shared 2-core machine; bench/scale_bench.py measures the real spread).

`make test` runs 16 MiB volumes for 4 s; `make soak` 128 MiB volumes for 30 s."""

from __future__ import annotations

import hashlib
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemons import primary_argv
from e2e_support import Daemons, MiB, Primary, Standby, need

PRIMARIES = 8
VOLUMES_PER_PRIMARY = 2
STARVED = 0.2


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def start_fleet(daemons: Daemons, tmp: Path, size: str) -> tuple[Standby, list[Primary]]:
    """A standby and `PRIMARIES` primaries of `VOLUMES_PER_PRIMARY` new volumes each (``pIvJ``), the
    primaries started side by side (each start costs a second of imports), all in sync."""
    standby = daemons.standby()
    folder = tmp / "primaries"
    folder.mkdir()
    started = []
    for i in range(PRIMARIES):
        paths = {f"p{i}v{j}": folder / f"p{i}v{j}.img" for j in range(VOLUMES_PER_PRIMARY)}
        argv = primary_argv([f"{name}={path},size={size}" for name, path in paths.items()], standby.grpc)
        started.append((daemons._start(f"primary-{i}", argv), paths))
    primaries = []
    for d, paths in started:
        d.wait_for("ready")
        primaries.append(Primary(d, paths, d.address("nbd"), d.address("metrics")))
    for p in primaries:
        p.wait_in_sync()
    return standby, primaries


def by_volume(p: Primary | Standby, name: str) -> dict[str, float]:
    """Volume -> value of the series `name` of one scrape."""
    return {labels["volume"]: v for labels, v in p.metrics().samples.get(name, []) if labels.get("volume")}


def written(primaries: list[Primary]) -> dict[str, float]:
    return {v: n for p in primaries for v, n in by_volume(p, "standby_written_bytes_total").items()}


def fio_all(targets: dict[str, str], size: int, seconds: int, cwd: Path) -> dict[str, dict[str, float]]:
    """One fio job per volume (`targets`: volume -> NBD URI), all at once for `seconds`, random 4 KiB and
    64 KiB writes, 8 in flight each, flushed at the end: per volume the bytes written and MiB/s."""
    need("fio")
    argv = [
        "fio", "--ioengine=nbd", "--rw=randwrite", "--bssplit=4k/70:64k/30", "--iodepth=8",
        f"--size={size}", "--time_based", f"--runtime={seconds}", "--randrepeat=0", "--norandommap",
        "--end_fsync=1", "--output-format=json",
    ]  # fmt: skip
    for name, uri in targets.items():
        argv += [f"--name={name}", f"--uri={uri}"]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, cwd=cwd, check=False)
    assert cp.returncode == 0, f"fio failed:\n{cp.stdout}\n{cp.stderr}"
    out: dict[str, dict[str, float]] = {}
    for job in json.loads(cp.stdout[cp.stdout.index("{") :])["jobs"]:
        assert job["error"] == 0, f"fio reported error {job['error']} on {job['jobname']}"
        nbytes = job["write"]["io_bytes"]
        out[job["jobname"]] = {"bytes": nbytes, "mib_s": nbytes / MiB / (job["job_runtime"] / 1000)}
    return out


def stop_all(primaries: list[Primary]) -> None:
    """SIGTERM to every primary side by side; each must exit with 0."""
    with ThreadPoolExecutor(len(primaries)) as pool:
        codes = list(pool.map(lambda p: p.daemon.stop(), primaries))
    assert codes == [0] * len(primaries), f"exit codes of the primaries on SIGTERM: {codes}"


def scale(daemons: Daemons, tmp: Path, size_mib: int, seconds: int) -> None:
    need("fio")
    standby, primaries = start_fleet(daemons, tmp, f"{size_mib}MiB")
    names = sorted(v for p in primaries for v in p.volumes)
    assert len(names) == PRIMARIES * VOLUMES_PER_PRIMARY
    written0, applied0 = written(primaries), by_volume(standby, "standby_applied_bytes_total")
    fio = fio_all({v: p.uri(v) for p in primaries for v in p.volumes}, size_mib * MiB, seconds, tmp)
    assert sorted(fio) == names, fio.keys()

    for p in primaries:
        p.wait_in_sync(timeout=120)
    written1, applied1 = written(primaries), by_volume(standby, "standby_applied_bytes_total")
    assert sorted(by_volume(standby, "standby_volume_size_bytes")) == names, "the standby lists other volumes"
    status = {v["name"]: (v["state"], v["connected"]) for v in standby.status()["volumes"]}
    assert status == dict.fromkeys(names, ("uptodate", True)), status
    for v in names:
        want = fio[v]["bytes"]
        assert want > 0, f"fio wrote nothing to {v}"
        assert written1[v] - written0.get(v, 0) == want, (
            f"{v}: the primary counts {written1[v] - written0.get(v, 0):.0f} bytes written, fio wrote {want}"
        )
        assert applied1[v] - applied0.get(v, 0) >= want, (
            f"{v}: the standby counts {applied1[v] - applied0.get(v, 0):.0f} bytes applied, fio wrote {want}"
        )
    for p in primaries:
        for v, path in p.volumes.items():
            assert sha(path) == sha(standby.replica(v)), f"the replica of {v} differs from its volume"

    rates = {v: round(f["mib_s"], 2) for v, f in fio.items()}
    print(f"scale, {len(names)} volumes for {seconds} s, MiB/s per volume: {json.dumps(rates)}")
    busiest = max(rates.values())
    starved = {v: r for v, r in rates.items() if r < STARVED * busiest}
    assert not starved, f"volumes under {STARVED} x the busiest's {busiest} MiB/s: {starved}"
    stop_all(primaries)


@pytest.mark.timeout(300)
def test_16_volumes_from_8_primaries_short(daemons: Daemons, tmp_path: Path) -> None:
    scale(daemons, tmp_path, size_mib=16, seconds=4)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_16_volumes_from_8_primaries_30s(daemons: Daemons, tmp_path: Path) -> None:
    scale(daemons, tmp_path, size_mib=128, seconds=30)

"""Hole entries against real daemons: a snapshot of a half-hole volume, then every block overwritten
through the primary. The blocks that were holes are preserved as hole entries: no store space, a
snapshot export whose block status (`nbdinfo --map`, `qemu-img map`) still reports them as holes, and a
backup whose archive holds no data for them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_support import VOLUME_SIZE, Appliance, MiB, backup_argv, need, rand, run

pytestmark = pytest.mark.timeout(180)

DATA = [(0, 8 * MiB), (16 * MiB, 8 * MiB)]  # the rest of the 32 MiB volume: holes


def merged(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """(offset, length, is_hole) runs with adjacent runs of the same kind merged."""
    out: list[tuple[int, int, bool]] = []
    for offset, length, hole in runs:
        if out and out[-1][2] == hole and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, hole)
        else:
            out.append((offset, length, hole))
    return out


def test_a_half_hole_snapshot_keeps_its_holes_for_nbd_clients_and_backups(appliance: Appliance) -> None:
    need("nbdinfo", "qemu-img", "nbdcopy", "tar", "zstd")
    a = appliance
    for i, (offset, length) in enumerate(DATA):
        a.writer.write(offset, rand(length, seed=40 + i))
    name = a.standby.snapshot("vol0", "half")
    frozen = a.model.freeze()
    a.writer.fill(0, VOLUME_SIZE, 0x77)  # every block: 16 MiB of copies, 16 MiB of hole entries

    m = a.standby.metrics()
    used = m.get("standby_preservation_used_bytes", volume="vol0", snapshot=name)
    assert used == 16 * MiB, f"the snapshot uses {used} bytes: the holes took space"
    assert m.get("standby_preservation_used_bytes") == 16 * MiB
    assert {s["name"]: s for s in a.standby.snapshots("vol0")}[name]["preserved_bytes"] == 16 * MiB

    uri = a.standby.uri(f"vol0@{name}")
    want = [
        (0, 8 * MiB, False),
        (8 * MiB, 8 * MiB, True),
        (16 * MiB, 8 * MiB, False),
        (24 * MiB, 8 * MiB, True),
    ]
    nbd_map: list[dict[str, Any]] = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    for e in nbd_map:
        assert e["type"] in (0, 3), f"block status flags {e} (3: NBD_STATE_HOLE|NBD_STATE_ZERO)"
    assert merged([(e["offset"], e["length"], e["type"] == 3) for e in nbd_map]) == want, nbd_map
    qemu_map: list[dict[str, Any]] = json.loads(
        run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout
    )
    assert merged([(e["start"], e["length"], not e["data"]) for e in qemu_map]) == want, qemu_map
    assert all(e["zero"] for e in qemu_map if not e["data"]), qemu_map
    assert a.read_export(uri) == frozen

    archive = a.tmp / "half.tar.zst"
    run(*backup_argv("run", "vol0", "--standby", a.standby.grpc, "--snapshot", name, "--output", str(archive),
                     "--metrics-listen", "off"), timeout=120)  # fmt: skip
    manifest = json.loads(run(*backup_argv("list", str(archive), "--json")).stdout)
    assert manifest["extents"] == [list(e) for e in DATA], manifest
    assert manifest["data_bytes"] == 16 * MiB, manifest
    restored = a.tmp / "restored.img"
    run(*backup_argv("restore", str(archive), "--output", str(restored)))
    assert restored.read_bytes() == frozen
    assert restored.stat().st_blocks * 512 <= 16 * MiB + MiB, "the restored image is not sparse"
    a.standby.ctl("snapshot", "delete", "vol0", name)
    assert a.standby.metrics().get("standby_preservation_used_bytes") == 0

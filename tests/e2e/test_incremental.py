"""Incremental archives against real daemons: a full archive, then incrementals holding only the blocks
written since their base (taken from the standby's preservation index); a chain restores exactly the
newest snapshot's image; a mis-ordered, incomplete or foreign chain is refused with a message naming the
problem and leaves no image; archives made twice from one snapshot are byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from e2e_support import VOLUME_SIZE, Appliance, MiB, backup_argv, qemu_io, rand, run

pytestmark = pytest.mark.timeout(300)


def backup(a: Appliance, *args: str, check: bool = True) -> str:
    cp = run(
        *backup_argv("run", "vol0", "--standby", a.standby.grpc, "--metrics-listen", "off", *args),
        check=check,
        timeout=120,
    )
    return cp.stdout + cp.stderr


def manifest(archive: Path) -> dict:
    out = run(*backup_argv("list", str(archive), "--json")).stdout
    return json.loads(out)


def index(archive: Path) -> dict:
    return json.loads(Path(str(archive) + ".manifest.json").read_text())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def documented_script() -> str:
    """The shell script of docs/ARCHIVE-FORMAT.md that applies an incremental with plain tools."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "ARCHIVE-FORMAT.md").read_text()
    section = text.split("### Applying an incremental with plain tools", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def blocks_of(extents: list[list[int]]) -> int:
    return sum(n for _, n in extents)


def test_a_chain_restores_the_newest_snapshot_incrementals_hold_only_changes(appliance: Appliance) -> None:
    a = appliance
    dest = a.tmp / "archives"
    dest.mkdir()
    a.writer.write(0, rand(4 * MiB, seed=1))
    a.writer.write(20 * MiB, rand(2 * MiB, seed=2))
    out = backup(a, "--output", f"{dest}/", "--since", "latest", "--keep-snapshot")
    assert "incremental since" not in out and "full_backup_no_base" in out, (
        "with no archive in the destination, --since latest makes a full one"
    )
    [full] = sorted(dest.glob("*.tar.zst"))
    assert manifest(full)["kind"] == "full"
    [kept] = a.standby.snapshots("vol0")

    # Changes: data, a rewrite with the same bytes, zeroes and a trim.
    a.writer.write(8 * MiB, rand(MiB, seed=3))
    a.writer.write(0, rand(4096, seed=1))  # the same bytes again: still a write
    qemu_io(a.primary.uri("vol0"), "write -z 1M 512k", "discard 20M 1M", "flush")
    a.model.zero(MiB, 512 * 1024)
    a.model.zero(20 * MiB, MiB)
    out = backup(a, "--output", f"{dest}/", "--since", "latest", "--keep-snapshot", "--release-base")
    assert f"incremental since {kept['name']}" in out, out
    inc1 = next(p for p in sorted(dest.glob("*.tar.zst")) if p != full)
    m1 = manifest(inc1)
    assert m1["kind"] == "incremental"
    assert m1["base"]["archive_sha256"] == sha(full) == index(full)["archive_sha256"]
    assert m1["base"]["snapshot"]["name"] == kept["name"]
    assert m1["data_bytes"] == MiB + 4096, m1["extents"]  # only the written data is read
    assert blocks_of(m1["zero_extents"]) == 512 * 1024 + MiB, m1["zero_extents"]
    assert [s["name"] for s in a.standby.snapshots("vol0")] != [kept["name"]], "--release-base kept the base"
    assert kept["name"] not in [s["name"] for s in a.standby.snapshots("vol0")]

    a.writer.write(30 * MiB, rand(MiB, seed=4))
    backup(a, "--output", f"{dest}/", "--since", "latest", "--keep-snapshot", "--release-base")
    inc2 = next(p for p in sorted(dest.glob("*.tar.zst")) if p not in (full, inc1))
    assert manifest(inc2)["base"]["archive_sha256"] == sha(inc1)

    image = a.tmp / "restored.img"
    out = run(*backup_argv("restore", str(full), str(inc1), str(inc2), "--output", str(image))).stdout
    assert "from 3 archives" in out
    assert image.read_bytes() == bytes(a.model.data), "the chain did not restore the newest snapshot's image"
    assert image.stat().st_blocks * 512 < VOLUME_SIZE, "the restored image is not sparse"
    verified = run(*backup_argv("verify", str(full), str(inc1), str(inc2))).stdout
    assert "chain of 3 archives linked" in verified

    # The same chain applied with plain tools, by the script of docs/ARCHIVE-FORMAT.md, word for word.
    script = a.tmp / "apply-incremental"
    script.write_text(documented_script())
    script.chmod(0o755)
    plain = a.tmp / "plain"
    plain.mkdir()
    run("tar", "--zstd", "-xSf", full, "-C", plain)
    run(script, plain / "vol0.img", full, inc1)
    run(script, plain / "vol0.img", inc1, inc2)
    assert (plain / "vol0.img").read_bytes() == bytes(a.model.data), "the documented script differs"
    wrong = run(script, plain / "vol0.img", full, inc2, check=False)
    assert wrong.returncode == 1 and "was not made on" in wrong.stderr, wrong.stderr

    listing = run(*backup_argv("list", f"{dest}/")).stdout
    assert listing.count("incremental") == 2 and listing.count("full") == 1, listing

    # Broken chains: refused before anything is written, with the problem named.
    for chain, problem in [
        ((inc1, inc2), "is an incremental archive"),
        ((full, inc2), "mis-ordered or misses a link"),
        ((full, inc2, inc1), "mis-ordered or misses a link"),
        ((full, full), "only the first archive of a chain is full"),
        ((inc1,), "is an incremental archive"),
    ]:
        bad = a.tmp / "bad.img"
        cp = run(*backup_argv("restore", *map(str, chain), "--output", str(bad)), check=False)
        assert cp.returncode == 1, cp
        assert problem in cp.stderr and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
        assert not bad.exists() and not Path(str(bad) + ".partial").exists()


def test_archives_of_one_snapshot_are_identical_and_a_foreign_base_is_refused(appliance: Appliance) -> None:
    a = appliance
    a.writer.write(0, rand(3 * MiB, seed=5))
    a.standby.ctl("snapshot", "create", "vol0", "s0")
    a.writer.write(2 * MiB, rand(2 * MiB, seed=6))
    a.standby.ctl("snapshot", "create", "vol0", "s1")
    one, two = a.tmp / "one.tar.zst", a.tmp / "two.tar.zst"
    backup(a, "--snapshot", "s0", "--output", str(one))
    backup(a, "--snapshot", "s0", "--output", str(two))
    assert sha(one) == sha(two), "two archives of the same snapshot differ"
    inc_a, inc_b = a.tmp / "inc-a.tar.zst", a.tmp / "inc-b.tar.zst"
    backup(a, "--snapshot", "s1", "--since", "s0", "--base-archive", str(one), "--output", str(inc_a))
    backup(a, "--snapshot", "s1", "--since", "s0", "--base-archive", str(two), "--output", str(inc_b))
    assert sha(inc_a) == sha(inc_b), "two incrementals of the same snapshots differ"

    # Another archive of s0 (another compression level): same snapshot, other bytes.
    other = a.tmp / "other.tar.zst"
    backup(a, "--snapshot", "s0", "--level", "1", "--output", str(other))
    assert sha(other) != sha(one)
    cp = run(*backup_argv("restore", str(other), str(inc_a), "--output", str(a.tmp / "x.img")), check=False)
    assert cp.returncode == 1 and "was made on another archive" in cp.stderr, cp.stderr
    assert not (a.tmp / "x.img").exists()

    # --since with a base archive of another snapshot, or a newer base: one clear line, exit 1.
    cp = run(*backup_argv("run", "vol0", "--standby", a.standby.grpc, "--metrics-listen", "off",
                          "--snapshot", "s1", "--since", "s0", "--base-archive", str(inc_a),
                          "--output", str(a.tmp / "y.tar.zst")), check=False)  # fmt: skip
    assert cp.returncode == 1 and "not the snapshot vol0@s0" in cp.stderr, cp.stderr
    cp = run(*backup_argv("run", "vol0", "--standby", a.standby.grpc, "--metrics-listen", "off",
                          "--snapshot", "s0", "--since", "s1", "--base-archive", str(inc_a),
                          "--output", str(a.tmp / "z.tar.zst")), check=False)  # fmt: skip
    assert cp.returncode == 1 and "not older" in cp.stderr, cp.stderr

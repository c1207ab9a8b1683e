"""The archive format: GNU tar restores it sparsely and exactly; cut or damaged archives never pass."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from backupnode.archive import ArchiveWriter, CorruptArchive, IncompleteArchive, Manifest, data_pieces
from backupnode.main import main
from backupnode.reader import read_archive

KiB, MiB = 1 << 10, 1 << 20


def make_image(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 1) -> None:
    """A sparse image whose data extents hold half random, half repetitive (compressible) bytes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            half = length // 2
            f.seek(offset)
            f.write(rng.randbytes(half) + (b"standby " * (length // 8 + 1))[: length - half])


def write_archive(image: Path, out: Path, extents: list[tuple[int, int]], chunk: int = MiB) -> Manifest:
    size = image.stat().st_size
    m = Manifest("vol0", size, 4096, "s1", "2026-11-26T01:02:03Z", extents, chunk_size=chunk)
    with open(out, "wb") as f, open(image, "rb") as src:
        w = ArchiveWriter(f, m, threads=0)
        w.begin()
        for offset, length in data_pieces(extents, 300 * KiB):  # pieces that straddle chunks
            w.write(os.pread(src.fileno(), length, offset))
        w.finish()
        w.close()
    return m


def image_and_archive(
    tmp_path: Path, size: int, extents: list[tuple[int, int]], chunk: int = MiB
) -> tuple[Path, Path]:
    """A sparse image of `size` bytes with data in `extents` (`make_image`), and its archive."""
    image, archive = tmp_path / "src.img", tmp_path / "a.tar.zst"
    make_image(image, size, extents)
    write_archive(image, archive, extents, chunk)
    return image, archive


def check(path: Path) -> None:
    with open(path, "rb") as f:
        read_archive(f, str(path))


def tar_bytes(path: Path) -> bytes:
    """The archive's tar stream, decompressed."""
    return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = {
    "ends_in_hole": (64 * MiB, [(0, MiB), (5 * MiB, 3 * MiB + 4096), (20 * MiB, 8192)]),
    "ends_in_data": (8 * MiB, [(MiB, MiB), (7 * MiB, MiB)]),
    "all_holes": (16 * MiB, []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gnu_tar_restores_the_image_exactly_and_sparsely(tmp_path: Path, case: str) -> None:
    size, extents = CASES[case]
    image, archive = image_and_archive(tmp_path, size, extents)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xSf", str(archive), "-C", str(out)], check=True)
    restored = out / "vol0.img"
    assert restored.stat().st_size == size
    assert sha(restored) == sha(image)
    data = sum(n for _, n in extents)
    assert restored.stat().st_blocks * 512 <= data + 64 * KiB, "GNU tar did not restore the image sparse"
    assert json.loads((out / "MANIFEST.json").read_text())["extents"] == [list(e) for e in extents]
    assert json.loads((out / "TRAILER.json").read_text())["complete"] is True
    # Python's tarfile reads the same sparse map
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(archive))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["MANIFEST.json", "vol0.img", "TRAILER.json"]
    assert [tuple(s) for s in members[1].sparse or [] if s[1]] == extents


def test_our_restore_equals_tar_and_the_manifest_lists_the_volume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size, extents = CASES["ends_in_hole"]
    image, archive = image_and_archive(tmp_path, size, extents)
    assert main(["restore", str(archive), "--output", str(tmp_path / "r.img")]) == 0
    assert sha(tmp_path / "r.img") == sha(image)
    assert (tmp_path / "r.img").stat().st_blocks * 512 <= sum(n for _, n in extents) + 64 * KiB
    assert main(["verify", str(archive)]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["list", str(archive), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["volume"], doc["size"], doc["snapshot"]) == ("vol0", size, "s1")


def test_restore_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, archive = image_and_archive(tmp_path, 4 * MiB, [(0, MiB)])
    target = tmp_path / "exists.img"
    target.write_bytes(b"precious")
    assert main(["restore", str(archive), "--output", str(target)]) == 1
    assert "give --force" in capsys.readouterr().err
    assert target.read_bytes() == b"precious"
    assert main(["restore", str(archive), "--output", str(target), "--force"]) == 0
    assert sha(target) == sha(image)


def cut_points(length: int) -> list[int]:
    return sorted({0, 10, 100, length // 4, length // 2, length - 200, length - 20, length - 1})


def test_a_cut_archive_is_never_taken_for_a_complete_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size, extents = CASES["ends_in_hole"]
    _image, archive = image_and_archive(tmp_path, size, extents)
    whole = archive.read_bytes()
    for cut in cut_points(len(whole)):
        part = tmp_path / f"cut{cut}.tar.zst"
        part.write_bytes(whole[:cut])
        with pytest.raises((IncompleteArchive, CorruptArchive)):
            check(part)
        target = tmp_path / f"r{cut}.img"
        assert main(["restore", str(part), "--output", str(target)]) == 1
        assert not target.exists() and not Path(str(target) + ".partial").exists()
        assert main(["verify", str(part)]) == 1
    err = capsys.readouterr().err
    assert "did not finish" in err or "ends early" in err


def test_an_unfinished_writer_leaves_an_incomplete_archive(tmp_path: Path) -> None:
    image, archive = tmp_path / "src.img", tmp_path / "a.tar.zst"
    make_image(image, 4 * MiB, [(0, 2 * MiB)])
    m = Manifest("vol0", 4 * MiB, 4096, "s1", "2026-11-26T01:02:03Z", [(0, 2 * MiB)])
    with open(archive, "wb") as f:
        w = ArchiveWriter(f, m, threads=0)
        w.begin()
        w.write(image.read_bytes()[: 2 * MiB])  # all the data, but the backup failed before finish
        w.close()
    with pytest.raises(IncompleteArchive, match="did not finish"):
        check(archive)


def test_verify_names_the_first_damaged_chunk_and_restore_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size, extents = CASES["ends_in_hole"]
    image, archive = image_and_archive(tmp_path, size, extents, chunk=MiB)
    raw = bytearray(tar_bytes(archive))
    # The byte at image offset 5 MiB + 1.5 MiB: data-stream offset 1 MiB + 1.5 MiB, in chunk 2 (of 1 MiB).
    needle = image.read_bytes()[5 * MiB + 1536 * KiB : 5 * MiB + 1536 * KiB + 64]
    at = raw.index(needle)
    raw[at] ^= 0xFF
    bad = tmp_path / "bad.tar.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(bytes(raw)))
    assert main(["verify", str(bad)]) == 1
    assert f"at image offset {5 * MiB + MiB}" in capsys.readouterr().err  # chunk 2 starts 1 MiB into extent 2
    target = tmp_path / "r.img"
    assert main(["restore", str(bad), "--output", str(target)]) == 1
    assert not target.exists() and not Path(str(target) + ".partial").exists()

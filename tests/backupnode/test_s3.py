"""Archives on S3, against a real S3 server (SeaweedFS, tests/s3server.py): what a user would notice.

Uploads stream as one multipart upload with Content-MD5 on every part, in bounded memory, resume after a
crash without sending again what is there, survive a server restart, and fail with one clear line; an
archive looks complete only once its index exists.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import zstandard
from botocore.exceptions import ClientError
from s3server import READ_ONLY_KEY, READ_ONLY_SECRET, S3Server, free_port

from backupnode import destinations
from backupnode import s3 as s3lib
from backupnode.archive import ArchiveWriter, Manifest, data_pieces
from backupnode.destinations import INDEX_SUFFIX, IndexExists
from backupnode.reader import read_archive
from backupnode.s3 import (
    BadS3Url,
    EndpointUnreachable,
    NoSuchArchive,
    NoSuchBucket,
    ObjectExists,
    S3AccessDenied,
    S3Error,
    S3Location,
    S3NoCredentials,
    S3Reader,
    S3Upload,
    make_client,
    part_size_for,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PART = s3lib.S3_MIN_PART  # 5 MiB: the smallest part S3 takes, to keep the tests quick
WAIT = 60.0  # seconds: a bound on waits for events that come in well under a second

_buckets = itertools.count()


@pytest.fixture(autouse=True)
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment of a user whose AWS settings point at the test server, nothing else."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    s3lib.reset_client()
    yield
    s3lib.reset_client()


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket for this test."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return s3.make_bucket(f"t{next(_buckets)}-{name}".rstrip("-"))


def data_of(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def feed(up: S3Upload, data: bytes, piece: int = MiB + 7) -> None:
    """Write `data` in odd-sized pieces, as an archive writer would."""
    view = memoryview(data)
    for at in range(0, len(data), piece):
        up.write(view[at : at + piece])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_sha(url: str) -> str:
    h = hashlib.sha256()
    with S3Reader(url) as r:
        while chunk := r.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def open_uploads(server: S3Server, bucket: str) -> list[str]:
    reply = server.client().list_multipart_uploads(Bucket=bucket)
    return [u["Key"] for u in reply.get("Uploads", [])]


def head(server: S3Server, bucket: str, key: str) -> bool:
    try:
        server.client().head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def assert_one_clear_line(e: BaseException, *texts: str) -> None:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg and "<" not in msg and "botocore" not in msg, msg
    for text in texts:
        assert text in msg, msg


class PartLog:
    """Records every UploadPart a client sends: part number, Content-MD5 header and body's MD5."""

    def __init__(self, client: Any) -> None:
        self.calls: list[tuple[int, str, str]] = []
        self._lock = threading.Lock()
        client.meta.events.register("before-call.s3.UploadPart", self._seen)

    def _seen(self, params: dict[str, Any], **kwargs: Any) -> None:
        body = params["body"]
        digest = hashlib.md5(bytes(body)).digest()
        number = int(params["query_string"]["partNumber"])
        with self._lock:
            self.calls.append((number, params["headers"].get("Content-MD5", ""), _b64(digest)))

    @property
    def numbers(self) -> list[int]:
        return sorted(n for n, _, _ in self.calls)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


# -- the round trip -----------------------------------------------------------------------------------


def test_round_trip_four_parts_and_the_index_only_after_finish(s3: S3Server, bucket: str) -> None:
    data = data_of(50 * MiB)  # 16 + 16 + 16 + 2 MiB
    url = f"s3://{bucket}/vol0/2026-12-01.tar.zst"
    done: list[int] = []
    up = S3Upload(url, part_size=16 * MiB, on_part=done.append)
    feed(up, data)
    assert not head(s3, bucket, "vol0/2026-12-01.tar.zst"), "the object shows before the upload completes"
    assert destinations.read_index(url) is None
    assert destinations.list_indexes(f"s3://{bucket}/vol0/") == []

    up.finish({"volume": "vol0", "sha256": sha(data)})

    assert up.bytes_written == len(data) and up.sha256.hexdigest() == sha(data)
    assert (up.uploaded_parts, up.uploaded_bytes, up.skipped_parts) == (4, len(data), 0)
    assert sorted(done) == [2 * MiB, 16 * MiB, 16 * MiB, 16 * MiB]
    with S3Reader(url) as r:
        assert r.size == len(data)
        assert r.read() == data
    assert destinations.read_index(url) == {"volume": "vol0", "sha256": sha(data)}
    raw = s3.client().get_object(Bucket=bucket, Key="vol0/2026-12-01.tar.zst" + INDEX_SUFFIX)["Body"].read()
    assert raw == (json.dumps({"sha256": sha(data), "volume": "vol0"}, indent=1) + "\n").encode()
    assert open_uploads(s3, bucket) == []


def test_an_archive_written_to_s3_reads_back_and_verifies(tmp_path: Path, bucket: str) -> None:
    image = tmp_path / "vol0.img"
    extents = [(0, 3 * MiB), (8 * MiB, 5 * MiB + 512)]
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
        for offset, length in extents:
            f.seek(offset)
            f.write(data_of(length // 2, seed=offset) + b"standby " * (length // 16) + bytes(length % 16))
    url = f"s3://{bucket}/vol0/full.tar.zst"
    manifest = Manifest("vol0", 16 * MiB, 4096, "s1", "2026-12-01T00:00:00Z", extents, chunk_size=MiB)
    up = S3Upload(url, part_size=PART)
    writer = ArchiveWriter(up, manifest, threads=0)
    writer.begin()
    with open(image, "rb") as src:
        for offset, length in data_pieces(extents, 2 * MiB):
            src.seek(offset)
            writer.write(src.read(length))
    writer.finish()
    up.finish({"volume": "vol0", "data_bytes": manifest.data_bytes})
    with destinations.open_read(url) as f:
        result = read_archive(f, url)
    assert result.bad_chunks == [] and result.manifest.extents == extents
    assert destinations.list_indexes(f"s3://{bucket}/vol0/") == [
        (url, {"volume": "vol0", "data_bytes": manifest.data_bytes})
    ]


def test_a_zstd_stream_decompresses_straight_from_s3(bucket: str) -> None:
    data = data_of(3 * MiB) + b"standby " * (512 * KiB)
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    url = f"s3://{bucket}/a.zst"
    up = S3Upload(url, part_size=PART)
    up.write(packed)
    up.finish({})
    with S3Reader(url, chunk_size=256 * KiB) as raw:  # many ranged GETs
        assert zstandard.ZstdDecompressor().stream_reader(raw).read() == data
    with destinations.open_read(url) as f:
        assert zstandard.ZstdDecompressor().stream_reader(f).read() == data


def test_an_empty_stream_makes_an_empty_object(bucket: str) -> None:
    url = f"s3://{bucket}/empty"
    up = S3Upload(url, part_size=PART)
    up.finish({"empty": True})
    with S3Reader(url) as r:
        assert r.size == 0 and r.read() == b""
    assert destinations.read_index(url) == {"empty": True}


# -- Content-MD5 --------------------------------------------------------------------------------------


def test_every_part_carries_its_content_md5(bucket: str) -> None:
    client = make_client()
    log = PartLog(client)
    up = S3Upload(f"s3://{bucket}/md5", part_size=PART, client=client)
    feed(up, data_of(2 * PART + 3 * MiB))
    up.finish({})
    assert log.numbers == [1, 2, 3]
    assert all(header == body_md5 for _, header, body_md5 in log.calls), log.calls


def test_a_part_damaged_on_the_way_is_refused_by_the_server(s3: S3Server, bucket: str) -> None:
    client = make_client()

    def damage(params: dict[str, Any], **kwargs: Any) -> None:
        body = bytearray(params["body"])  # a copy: the upload's own buffer stays as it was
        body[12345] ^= 0xFF
        params["body"] = bytes(body)

    client.meta.events.register("before-call.s3.UploadPart", damage)
    url = f"s3://{bucket}/damaged"
    up = S3Upload(url, part_size=PART, client=client)
    feed(up, data_of(PART + MiB))
    with pytest.raises(S3Error) as err:
        up.finish({})
    assert_one_clear_line(err.value, url, "UploadPart", "Content-MD5")
    up.abort()
    assert open_uploads(s3, bucket) == []
    assert destinations.read_index(url) is None and not head(s3, bucket, "damaged")


# -- memory -------------------------------------------------------------------------------------------


def test_write_blocks_with_in_flight_parts_uploading_and_one_buffered(s3: S3Server, bucket: str) -> None:
    client = make_client()
    state = threading.Condition()
    started: list[int] = []
    release = threading.Event()

    def slow(params: dict[str, Any], **kwargs: Any) -> None:
        with state:
            started.append(1)
            state.notify_all()
        assert release.wait(WAIT)

    client.meta.events.register("before-call.s3.UploadPart", slow)
    data = data_of(6 * PART + MiB)
    url = f"s3://{bucket}/bounded"
    up = S3Upload(url, part_size=PART, in_flight=2, client=client)
    assert up.memory_bound == 3 * PART
    accepted = [0]
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            for at in range(0, len(data), MiB):
                up.write(data[at : at + MiB])
                with state:
                    accepted[0] += len(data[at : at + MiB])
                    state.notify_all()
            up.finish({})
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        with state:
            assert state.wait_for(lambda: len(started) == 2 and accepted[0] == 3 * PART, WAIT)
        t.join(1.0)  # were write not bounded, it would now run on through the data
        with state:
            assert t.is_alive() and accepted[0] == 3 * PART and len(started) == 2
    finally:
        release.set()
        t.join(WAIT)
    assert not failed and not t.is_alive()
    assert object_sha(url) == sha(data)


# -- resume -------------------------------------------------------------------------------------------


def die_after_parts(url: str, data: bytes, parts: int) -> None:
    """An upload of `data` that gets `parts` parts to the server, then is dropped as by a killed
    process: no finish, no close, no abort."""
    client = make_client()
    done = threading.Semaphore(0)
    client.meta.events.register("after-call.s3.UploadPart", lambda **kw: done.release())
    up = S3Upload(url, part_size=PART, client=client)
    up.write(data)
    for _ in range(parts):
        assert done.acquire(timeout=WAIT)
    assert up.parts == parts  # the rest sits in the buffer being filled, never sent


def test_resume_skips_the_parts_already_there(s3: S3Server, bucket: str) -> None:
    data = data_of(5 * PART + MiB)
    url = f"s3://{bucket}/resumed"
    die_after_parts(url, data[: 3 * PART + MiB], 3)
    assert destinations.read_index(url) is None and not head(s3, bucket, "resumed")

    client = make_client()
    log = PartLog(client)
    done: list[int] = []
    up = S3Upload(url, part_size=PART, resume=True, client=client, on_part=done.append)
    assert up.resumed
    feed(up, data)
    up.finish({"resumed": True})

    assert (up.skipped_parts, up.skipped_bytes) == (3, 3 * PART)
    assert (up.uploaded_parts, up.uploaded_bytes) == (3, 2 * PART + MiB)
    assert log.numbers == [4, 5, 6]  # parts 1-3 never went over the wire again
    assert sorted(done) == sorted([PART] * 5 + [MiB])  # progress counts skipped parts too
    assert object_sha(url) == sha(data) and up.sha256.hexdigest() == sha(data)
    assert destinations.read_index(url) == {"resumed": True}
    assert open_uploads(s3, bucket) == []


def test_resume_with_other_bytes_uploads_the_parts_that_differ(s3: S3Server, bucket: str) -> None:
    old = data_of(4 * PART, seed=1)
    url = f"s3://{bucket}/changed"
    die_after_parts(url, old[: 3 * PART + MiB], 3)
    new = bytearray(old)
    new[PART + 100] ^= 0x01  # part 2 differs by one bit
    new += data_of(MiB, seed=2)

    client = make_client()
    log = PartLog(client)
    up = S3Upload(url, part_size=PART, resume=True, client=client)
    assert up.resumed
    feed(up, bytes(new))
    up.finish({})
    assert up.skipped_parts == 2 and log.numbers == [2, 4, 5]
    assert object_sha(url) == sha(bytes(new))


def test_resume_with_less_data_leaves_out_the_old_parts_past_its_end(s3: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/shorter"
    die_after_parts(url, data_of(3 * PART + MiB), 3)
    new = data_of(PART + MiB)  # part 1 as before, part 2 short; the old part 3 is not in the object
    up = S3Upload(url, part_size=PART, resume=True)
    feed(up, new)
    up.finish({})
    assert (up.skipped_parts, up.uploaded_parts) == (1, 1)
    assert object_sha(url) == sha(new)


def test_resume_with_nothing_to_resume_starts_afresh(s3: S3Server, bucket: str) -> None:
    s3.client().create_multipart_upload(Bucket=bucket, Key="other-key")  # another key's upload
    url = f"s3://{bucket}/other"
    up = S3Upload(url, part_size=PART, resume=True)
    assert not up.resumed
    up.write(b"x" * 100)
    up.finish({})
    assert object_sha(url) == sha(b"x" * 100)


def test_close_leaves_the_upload_open_for_a_resume(s3: S3Server, bucket: str) -> None:
    data = data_of(3 * PART)
    url = f"s3://{bucket}/interrupted"
    up = S3Upload(url, part_size=PART)
    feed(up, data[: 2 * PART + 10])
    up.close()
    assert open_uploads(s3, bucket) == ["interrupted"]
    with pytest.raises(S3Error, match="closed"):
        up.write(b"more")
    again = S3Upload(url, part_size=PART, resume=True)
    feed(again, data)
    again.finish({})
    assert again.skipped_parts == 2 and object_sha(url) == sha(data)


# -- the server restarted -----------------------------------------------------------------------------


def test_an_upload_survives_a_server_restart_between_attempts(s3: S3Server, bucket: str) -> None:
    """Part 2's first attempt meets a stopped server; botocore retries, and its second attempt goes out
    once the server is back (ordered by events, not by time)."""
    client = make_client()
    attempts: list[int] = []
    reached, server_down, server_up = threading.Event(), threading.Event(), threading.Event()

    def before_send(request: Any, **kwargs: Any) -> None:
        number = int(parse_qs(urlsplit(request.url).query).get("partNumber", ["0"])[0])
        attempts.append(number)
        if number == 2 and attempts.count(2) == 1:
            reached.set()
            assert server_down.wait(WAIT)
        elif number == 2:
            assert server_up.wait(WAIT)

    client.meta.events.register("before-send.s3.UploadPart", before_send)
    data = data_of(2 * PART + MiB)
    url = f"s3://{bucket}/restarted"
    up = S3Upload(url, part_size=PART, in_flight=1, client=client)
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            feed(up, data)
            up.finish({"ok": 1})
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert reached.wait(WAIT)
        s3.stop()
        server_down.set()
        s3.start()
        server_up.set()
    finally:
        server_down.set()
        server_up.set()
        t.join(WAIT)
    assert not failed, failed
    assert attempts.count(2) >= 2 and attempts.count(1) == 1
    assert object_sha(url) == sha(data)
    assert destinations.read_index(url) == {"ok": 1}


def test_a_server_down_for_good_fails_in_one_line_and_abort_cleans_up(s3: S3Server, bucket: str) -> None:
    client = make_client(max_attempts=2)
    url = f"s3://{bucket}/unlucky"
    up = S3Upload(url, part_size=PART, client=client)
    s3.stop()
    try:
        feed(up, data_of(PART + MiB))
        with pytest.raises(EndpointUnreachable) as err:
            up.finish({})
    finally:
        s3.start()
    assert_one_clear_line(err.value, url, "cannot reach the S3 endpoint", s3.endpoint)
    up.abort()
    assert open_uploads(s3, bucket) == []
    assert destinations.read_index(url) is None and not head(s3, bucket, "unlucky")


# -- clear errors -------------------------------------------------------------------------------------


def test_wrong_credentials_are_one_clear_line(
    s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{bucket}/k"
    for key, secret in (("nobody", "nothing"), (s3.env()["AWS_ACCESS_KEY_ID"], "wrong-secret")):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        s3lib.reset_client()
        with pytest.raises(S3AccessDenied) as err:
            S3Upload(url, part_size=PART)
        assert_one_clear_line(err.value, f"{url}: access denied", "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
        with pytest.raises(S3AccessDenied) as err:
            destinations.list_indexes(f"s3://{bucket}/")
        assert_one_clear_line(err.value, "access denied")
        with pytest.raises(S3AccessDenied):
            S3Reader(url)
        with pytest.raises(S3AccessDenied):
            destinations.write_index(url, {})
    assert open_uploads(s3, bucket) == []
    assert not head(s3, bucket, "k") and not head(s3, bucket, "k" + INDEX_SUFFIX)


def test_no_credentials_at_all_is_one_clear_line(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # and no files, no instance metadata (s3.env())
    with pytest.raises(S3NoCredentials) as err:
        S3Upload(f"s3://{bucket}/k", part_size=PART)
    assert_one_clear_line(err.value, f"s3://{bucket}/k: no S3 credentials found", "AWS_ACCESS_KEY_ID")


def test_an_identity_that_may_not_write_is_refused_before_any_data(
    s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", READ_ONLY_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", READ_ONLY_SECRET)
    url = f"s3://{bucket}/readonly"
    with pytest.raises(S3AccessDenied) as err:
        S3Upload(url, part_size=PART)
    assert_one_clear_line(err.value, url, "access denied (AccessDenied)")
    assert open_uploads(s3, bucket) == [] and destinations.read_index(url) is None


def test_a_missing_bucket_is_named() -> None:
    url = "s3://no-such-bucket-here/vol0/a.tar.zst"
    with pytest.raises(NoSuchBucket) as err:
        S3Upload(url, part_size=PART)
    assert_one_clear_line(err.value, f"{url}: no bucket 'no-such-bucket-here'")
    with pytest.raises(NoSuchBucket):
        S3Reader(url)
    with pytest.raises(NoSuchBucket):
        destinations.list_indexes("s3://no-such-bucket-here/vol0/")


def test_an_existing_archive_or_index_is_never_overwritten(s3: S3Server, bucket: str) -> None:
    s3.client().put_object(Bucket=bucket, Key="taken", Body=b"an archive")
    with pytest.raises(ObjectExists) as err:
        S3Upload(f"s3://{bucket}/taken", part_size=PART, resume=True)
    assert_one_clear_line(err.value, f"s3://{bucket}/taken exists: ")

    s3.client().put_object(Bucket=bucket, Key="indexed" + INDEX_SUFFIX, Body=b"{}")
    with pytest.raises(ObjectExists) as err:
        S3Upload(f"s3://{bucket}/indexed", part_size=PART)
    assert_one_clear_line(err.value, f"s3://{bucket}/indexed exists: ", INDEX_SUFFIX)
    assert open_uploads(s3, bucket) == []
    assert s3.client().get_object(Bucket=bucket, Key="taken")["Body"].read() == b"an archive"


def test_a_missing_archive_on_read_is_one_line(bucket: str) -> None:
    url = f"s3://{bucket}/nothing-here"
    with pytest.raises(NoSuchArchive) as err:
        S3Reader(url)
    assert_one_clear_line(err.value)
    assert str(err.value) == f"{url}: no such archive"
    with pytest.raises(NoSuchArchive):
        destinations.open_read(url)


def test_an_object_replaced_while_read_fails_instead_of_mixing_two(s3: S3Server, bucket: str) -> None:
    s3.client().put_object(Bucket=bucket, Key="replaced", Body=data_of(MiB, seed=1))
    with S3Reader(f"s3://{bucket}/replaced", chunk_size=128 * KiB) as r:
        assert r.read(128 * KiB) == data_of(MiB, seed=1)[: 128 * KiB]
        s3.client().put_object(Bucket=bucket, Key="replaced", Body=data_of(MiB, seed=2))
        with pytest.raises(S3Error) as err:
            r.read()
    assert_one_clear_line(err.value, "changed while it was read")


@pytest.mark.parametrize(
    "url", ["s3://", "s3://bucket", "s3://bucket/", "s3://bucket/dir/", "http://bucket/key", "s3://B!/k"]
)
def test_a_malformed_url_is_one_line(url: str) -> None:
    with pytest.raises(BadS3Url) as err:
        S3Location.parse(url)
    assert_one_clear_line(err.value, "not an s3:// URL with a bucket and a key")
    with pytest.raises(BadS3Url):
        S3Upload(url, part_size=PART)


def test_urls_and_prefixes() -> None:
    assert S3Location.parse("s3://bk1/a/b/c.tar.zst") == S3Location("bk1", "a/b/c.tar.zst")
    assert S3Location.parse("s3://bk1/a").index.url == "s3://bk1/a" + INDEX_SUFFIX
    assert S3Location.parse_prefix("s3://bk1") == S3Location("bk1", "")
    assert S3Location.parse_prefix("s3://bk1/") == S3Location("bk1", "")
    assert S3Location.parse_prefix("s3://bk1/vol0") == S3Location("bk1", "vol0/")
    assert S3Location.parse_prefix("s3://bk1/vol0/").child("x").url == "s3://bk1/vol0/x"
    with pytest.raises(BadS3Url) as err:
        S3Location.parse_prefix("/srv/backups")
    assert_one_clear_line(err.value, "not an s3:// URL with a bucket (s3://BUCKET/")
    assert s3lib.is_s3("s3://bk1/k") and not s3lib.is_s3("/srv/backups/k")


def test_an_unreachable_endpoint_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    with pytest.raises(EndpointUnreachable) as err:
        S3Upload("s3://bk1/k", part_size=PART, client=make_client(max_attempts=1))
    assert_one_clear_line(err.value, f"s3://bk1/k: cannot reach the S3 endpoint {dead}")


def test_settings_come_from_the_aws_files_too(
    s3: S3Server, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A profile in AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE is enough; a configured endpoint is
    addressed path-style, as S3-compatible servers need."""
    env = s3.env()
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(name)
    endpoint = env["AWS_ENDPOINT_URL"].replace("127.0.0.1", "localhost")
    (tmp_path / "config").write_text(f"[profile backup]\nregion = eu-west-3\nendpoint_url = {endpoint}\n")
    (tmp_path / "credentials").write_text(
        f"[backup]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "backup")
    client = make_client()
    assert client.meta.region_name == "eu-west-3" and client.meta.endpoint_url == endpoint
    assert client.meta.config.s3["addressing_style"] == "path"
    destinations.write_index(f"s3://{bucket}/from-files", {"ok": True})
    assert destinations.read_index(f"s3://{bucket}/from-files") == {"ok": True}

    (tmp_path / "config").write_text(f"[profile backup]\nendpoint_url = {endpoint}\n")
    assert make_client().meta.region_name == "us-east-1"  # no region anywhere


# -- part sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100 * MiB, 160 * GiB, 157 * GiB + 1, TiB, 16 * TiB, 100 * TiB])
def test_part_size_fits_the_archive_in_ten_thousand_parts(size: int) -> None:
    part = part_size_for(size)
    assert part >= 16 * MiB and part % MiB == 0 and part <= 5 * GiB
    if size <= 10_000 * 5 * GiB:
        assert part * 10_000 >= size
        assert part == 16 * MiB or (part - MiB) * 10_000 < size  # no larger than needed
    assert part_size_for(16 * TiB) * 10_000 >= 16 * TiB


# -- destinations -------------------------------------------------------------------------------------


def test_local_index_is_written_once(tmp_path: Path) -> None:
    archive = str(tmp_path / "a.tar.zst")
    assert destinations.read_index(archive) is None
    destinations.write_index(archive, {"n": 1})
    with pytest.raises(IndexExists) as err:
        destinations.write_index(archive, {"n": 2})
    assert_one_clear_line(err.value, f"{archive}{INDEX_SUFFIX} exists")
    assert destinations.read_index(archive) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.zst" + INDEX_SUFFIX]  # no temp files left


def test_s3_index_is_written_once(bucket: str) -> None:
    archive = f"s3://{bucket}/a.tar.zst"
    destinations.write_index(archive, {"n": 1})
    with pytest.raises(IndexExists) as err:
        destinations.write_index(archive, {"n": 2})
    assert_one_clear_line(err.value, f"{archive}{INDEX_SUFFIX} exists")
    assert destinations.read_index(archive) == {"n": 1}


def test_list_indexes_of_a_directory(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).write_bytes(b"archive")
        destinations.write_index(str(tmp_path / name), {"name": name})
    (tmp_path / "incomplete").write_bytes(b"cut short")
    (tmp_path / "sub").mkdir()
    destinations.write_index(str(tmp_path / "sub" / "deeper"), {"name": "deeper"})
    assert destinations.list_indexes(str(tmp_path)) == [
        (str(tmp_path / "a"), {"name": "a"}),
        (str(tmp_path / "b"), {"name": "b"}),
    ]


def test_list_indexes_of_a_prefix(s3: S3Server, bucket: str) -> None:
    for name in ("vol0/b", "vol0/a", "vol0/sub/deeper", "vol1/c"):
        destinations.write_index(f"s3://{bucket}/{name}", {"name": name})
    s3.client().put_object(Bucket=bucket, Key="vol0/incomplete", Body=b"cut short")
    expected = [(f"s3://{bucket}/vol0/a", {"name": "vol0/a"}), (f"s3://{bucket}/vol0/b", {"name": "vol0/b"})]
    assert destinations.list_indexes(f"s3://{bucket}/vol0/") == expected
    assert destinations.list_indexes(f"s3://{bucket}/vol0") == expected
    assert destinations.list_indexes(f"s3://{bucket}") == []


def test_delete_removes_the_index_first_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "a.tar.zst"
    archive.write_bytes(b"archive")
    destinations.write_index(str(archive), {})
    order: list[str] = []
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        order.append(os.path.basename(path))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    destinations.delete_archive(str(archive))
    assert order == ["a.tar.zst" + INDEX_SUFFIX, "a.tar.zst"]
    assert list(tmp_path.iterdir()) == []
    destinations.delete_archive(str(archive))  # nothing left to delete: fine


def test_delete_removes_the_index_first_on_s3(s3: S3Server, bucket: str) -> None:
    url = f"s3://{bucket}/a.tar.zst"
    up = S3Upload(url, part_size=PART)
    up.write(b"archive")
    up.finish({})
    order: list[str] = []
    s3lib.client().meta.events.register(  # the process's client, which destinations uses
        "before-call.s3.DeleteObject", lambda params, **kw: order.append(params["url_path"])
    )
    destinations.delete_archive(url)
    assert [p.rsplit("/", 1)[-1] for p in order] == ["a.tar.zst" + INDEX_SUFFIX, "a.tar.zst"]
    assert not head(s3, bucket, "a.tar.zst") and destinations.read_index(url) is None
    destinations.delete_archive(url)  # nothing left to delete: fine
    destinations.delete_archive(f"s3://{bucket}/never-was")

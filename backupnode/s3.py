"""Archives on S3 and S3-compatible object storage: ``s3://BUCKET/KEY`` wherever an archive path goes.

An archive is written as ONE multipart upload (`S3Upload`): the stream is cut into parts of a fixed size,
up to `in_flight` of them upload at once, each with its Content-MD5 so the server refuses a part that
arrived damaged. Completing the upload makes the object; the archive only counts as complete once its
index, ``KEY + INDEX_SUFFIX``, is written after it (once: ``If-None-Match: *``). A backup that died
leaves an open multipart upload and no index; ``resume=True`` finds that upload again and skips the
parts that are already there with the same bytes.

`S3Reader` reads an object as a stream, with ranged GETs and one range read ahead.

Endpoint, region and credentials come from the standard AWS environment variables and files only
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_DEFAULT_REGION``), as every
AWS tool reads them. Every failure comes out as one `S3Error` line naming the object and what to do.

It is longer than the other modules (about 800 lines) because its three parts share one client and one
table of failures (`translate`): the upload's workers, the reader's read-ahead and the small calls
(indexes, listings) must all turn a botocore failure into the same one-line errors.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import logging
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from standbylib.errors import StandbyError
from standbylib.rawfile import Buffer

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: The archive's index object (its catalogue entry) is the archive's key plus this suffix.
INDEX_SUFFIX = ".manifest.json"

MiB, GiB = 1 << 20, 1 << 30
#: S3's limits on a multipart upload.
MAX_PARTS = 10_000
S3_MIN_PART = 5 * MiB
MAX_PART = 5 * GiB
#: The smallest part size `part_size_for` chooses.
MIN_PART = 16 * MiB
#: Bytes of each ranged GET of `S3Reader`, and the times one is tried when its body is cut short.
READ_CHUNK = 8 * MiB
READ_ATTEMPTS = 3
#: The region when none is configured anywhere.
DEFAULT_REGION = "us-east-1"
#: Attempts of one request (botocore's standard retry mode: exponential backoff with jitter).
MAX_ATTEMPTS = 8
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 120.0

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_CREDENTIALS_HINT = (
    "check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "AWS_SHARED_CREDENTIALS_FILE) and their rights on the bucket"
)


# -- errors -------------------------------------------------------------------------------------------


class S3Error(StandbyError):
    template = "{url}: {detail}"


class BadS3Url(S3Error):
    template = "{url!r} is not an s3:// URL {want}{detail}"


class S3AccessDenied(S3Error):
    template = "{url}: access denied ({detail}): " + _CREDENTIALS_HINT


class S3NoCredentials(S3Error):
    template = (
        "{url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )


class NoSuchBucket(S3Error):
    template = "{url}: no bucket {bucket!r}"


class ObjectExists(S3Error):
    template = "{url} exists: {detail}"


class NoSuchArchive(S3Error):
    template = "{url}: no such archive"


class EndpointUnreachable(S3Error):
    template = "{url}: cannot reach the S3 endpoint {endpoint}: {detail}"


class PreconditionFailed(S3Error):
    """An If-None-Match or If-Match did not hold (the callers say what that means)."""


class UploadGone(S3Error):
    template = "{url}: {detail}: the multipart upload is gone (aborted or completed elsewhere)"


class S3ClientError(S3Error):
    template = "cannot set up the S3 client: {detail} (check AWS_PROFILE, AWS_CONFIG_FILE, AWS_ENDPOINT_URL)"


_ACCESS_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"})


def error_code(e: ClientError) -> str:
    """The S3 error code of `e` ("404", "403"... for a HEAD, whose answer has no body)."""
    return str(e.response.get("Error", {}).get("Code", "")) or str(_status(e))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


#: What the codes that mean the same whatever the operation say (after "OPERATION: ").
_CODE_DETAILS = {
    "BadDigest": "the server received other bytes than were sent (Content-MD5)",
    "SlowDown": "the server asks to slow down, and went on asking through every retry",
}


def translate(e: Exception, url: str, op: str, endpoint: str = "") -> S3Error:
    """The one `S3Error` line for a boto3 failure of operation `op` on `url` (the table of this module).

    A 404 is `NoSuchArchive` and a 412 `PreconditionFailed`, whatever the operation: the callers that
    know better (a 404 of HeadBucket is no bucket) catch these and say so."""
    if isinstance(e, S3Error):
        return e
    if isinstance(e, ClientError):
        return _client_error(e, url, op)
    if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
        return S3NoCredentials(url=url)
    where = endpoint or "(unknown)"
    if isinstance(e, EndpointConnectionError):
        return EndpointUnreachable(url=url, endpoint=where, detail=f"{op}: connection failed")
    if isinstance(e, HTTPClientError):
        return EndpointUnreachable(url=url, endpoint=where, detail=f"{op}: {_one_line(str(e))}")
    return S3Error(url=url, detail=f"{op} failed: {_one_line(str(e)) or type(e).__name__}")


def _client_error(e: ClientError, url: str, op: str) -> S3Error:
    code = error_code(e)
    if code in _ACCESS_CODES:
        return S3AccessDenied(url=url, detail=code if code != "403" else f"{op}: HTTP 403")
    if code == "NoSuchBucket":
        return NoSuchBucket(url=url, bucket=S3Location.parse_prefix(url).bucket)
    if code in ("NoSuchKey", "404"):
        return NoSuchArchive(url=url)
    if code in ("PreconditionFailed", "412"):
        return PreconditionFailed(url=url, detail=f"{op}: a precondition failed")
    if code == "NoSuchUpload":
        return UploadGone(url=url, detail=op)
    if code in _CODE_DETAILS:
        return S3Error(url=url, detail=f"{op}: {_CODE_DETAILS[code]}")
    message = _one_line(str(e.response.get("Error", {}).get("Message", "")))
    said = f": {message}" if message else ""
    return S3Error(url=url, detail=f"{op} failed: {code} (HTTP {_status(e)}){said}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


# -- URLs ---------------------------------------------------------------------------------------------


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


@dataclass(frozen=True, slots=True)
class S3Location:
    """An object (`key`) or a prefix (`key` empty or ending in "/") in `bucket`."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def index(self) -> S3Location:
        """The location of this archive's index object."""
        return S3Location(self.bucket, self.key + INDEX_SUFFIX)

    def child(self, name: str) -> S3Location:
        """The object `name` directly under this prefix."""
        return S3Location(self.bucket, self.key + name)

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``s3://BUCKET/KEY`` of an object: the key may contain "/", but not end with one."""
        bucket, key = _split(url, _OBJECT_URL)
        if not key or key.endswith("/"):
            raise BadS3Url(url=url, want=_OBJECT_URL, detail="")
        return cls(bucket, key)

    @classmethod
    def parse_prefix(cls, url: str) -> S3Location:
        """``s3://BUCKET``, ``s3://BUCKET/`` or ``s3://BUCKET/PREFIX/`` (a missing final "/" is added)."""
        bucket, key = _split(url, _PREFIX_URL)
        if key and not key.endswith("/"):
            key += "/"
        return cls(bucket, key)


_OBJECT_URL = "with a bucket and a key (s3://BUCKET/KEY)"
_PREFIX_URL = "with a bucket (s3://BUCKET/ or s3://BUCKET/PREFIX/)"


def _split(url: str, want: str) -> tuple[str, str]:
    if not is_s3(url):
        raise BadS3Url(url=url, want=want, detail="")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise BadS3Url(
            url=url, want=want, detail=f": bucket name {bucket!r} is not valid (3-63 of a-z 0-9 . -)"
        )
    if key.startswith("/") or "//" in key:
        raise BadS3Url(url=url, want=want, detail=": the key has an empty path segment")
    return bucket, key


# -- the client ---------------------------------------------------------------------------------------


def make_client(*, max_attempts: int = MAX_ATTEMPTS) -> Any:
    """A new boto3 S3 client configured from the standard AWS environment and files only.

    Checksums only where S3 requires them (we send Content-MD5 ourselves, and S3-compatible servers
    choke on the newer flexible checksums); path-style addressing when an endpoint URL is set, as
    S3-compatible servers need."""
    # Imported here, not at the top: boto3 and botocore.config take a quarter of a second to import,
    # which every run of the backup node would pay even when no archive is on S3.
    import boto3
    from botocore.config import Config

    # botocore's own INFO lines ("Found credentials in environment variables.") are not our events.
    logging.getLogger("botocore").setLevel(logging.WARNING)

    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        max_pool_connections=32,
    )
    try:
        session = boto3.session.Session()
        region = session.region_name or DEFAULT_REGION
        s3 = session.client("s3", region_name=region, config=config)
        # The endpoint is known once a client has resolved it (environment, then config file).
        if _custom_endpoint(s3.meta.endpoint_url):
            s3 = session.client(
                "s3", region_name=region, config=config.merge(Config(s3={"addressing_style": "path"}))
            )
    except BotoCoreError as e:
        raise S3ClientError(detail=_one_line(str(e))) from None
    return s3


def _custom_endpoint(endpoint_url: str) -> bool:
    host = urlsplit(endpoint_url).hostname or ""
    return not (host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"))


@functools.cache
def client() -> Any:
    """The process's S3 client (boto3 clients are thread-safe), made on first use."""
    return make_client()


def _process_client() -> Any:
    return client()  # for code whose `client` argument hides the function


def reset_client() -> None:
    """Forget the process's client: the next `client()` reads the environment again (tests)."""
    client.cache_clear()


def endpoint_of(s3: Any) -> str:
    return str(s3.meta.endpoint_url)


# -- small operations ---------------------------------------------------------------------------------


def call(s3: Any, method: str, url: str, **params: Any) -> Any:
    """``s3.method(**params)``, a failure translated into the one `S3Error` line about `url`."""
    try:
        return getattr(s3, method)(**params)
    except (ClientError, BotoCoreError) as e:
        raise translate(e, url, _operation(method), endpoint_of(s3)) from None


def listing(s3: Any, method: str, url: str, field: str, **params: Any) -> Iterator[dict[str, Any]]:
    """The items under `field` of every page of the paginated ``s3.method(**params)``, translated."""
    try:
        for page in s3.get_paginator(method).paginate(**params):
            yield from page.get(field, [])
    except (ClientError, BotoCoreError) as e:
        raise translate(e, url, _operation(method), endpoint_of(s3)) from None


def _operation(method: str) -> str:
    return "".join(word.title() for word in method.split("_"))  # head_object -> HeadObject


def check_bucket(s3: Any, loc: S3Location) -> None:
    """HeadBucket: an `S3Error` when the bucket is missing or the credentials are refused."""
    try:
        call(s3, "head_bucket", loc.url, Bucket=loc.bucket)
    except NoSuchArchive:
        raise NoSuchBucket(url=loc.url, bucket=loc.bucket) from None


def exists(s3: Any, loc: S3Location) -> bool:
    """HeadObject: whether the object is there."""
    try:
        call(s3, "head_object", loc.url, Bucket=loc.bucket, Key=loc.key)
    except NoSuchArchive:
        return False
    return True


def index_bytes(doc: dict[str, Any]) -> bytes:
    """The stored form of an index document (sorted keys, indent 1, final newline)."""
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def put_index(s3: Any, archive: S3Location, doc: dict[str, Any]) -> None:
    """Write `archive`'s index object once: an existing index is never overwritten (``If-None-Match``)."""
    loc = archive.index
    body = index_bytes(doc)
    try:
        call(
            s3,
            "put_object",
            loc.url,
            Bucket=loc.bucket,
            Key=loc.key,
            Body=body,
            ContentType="application/json",
            ContentMD5=_md5_b64(body),
            IfNoneMatch="*",
        )
    except PreconditionFailed:
        raise ObjectExists(url=loc.url, detail="an index is never overwritten") from None


def get_small(s3: Any, loc: S3Location) -> bytes | None:
    """The whole content of a small object (an index), None when there is none."""
    try:
        reply = call(s3, "get_object", loc.url, Bucket=loc.bucket, Key=loc.key)
        return bytes(reply["Body"].read())
    except NoSuchArchive:
        return None
    except BotoCoreError as e:  # the body cut short
        raise translate(e, loc.url, "GetObject", endpoint_of(s3)) from None


def delete(s3: Any, loc: S3Location) -> None:
    """DeleteObject (a missing object is fine)."""
    with contextlib.suppress(NoSuchArchive):
        call(s3, "delete_object", loc.url, Bucket=loc.bucket, Key=loc.key)


def list_keys(s3: Any, prefix: S3Location) -> list[str]:
    """The keys directly under `prefix` (not in its sub-"directories"), in S3's (lexical) order."""
    items = listing(
        s3, "list_objects_v2", prefix.url, "Contents", Bucket=prefix.bucket, Prefix=prefix.key, Delimiter="/"
    )
    return [str(item["Key"]) for item in items]


def _md5_b64(data: Buffer) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def part_size_for(expected_bytes: int) -> int:
    """The part size of an upload of at most `expected_bytes`: a multiple of 1 MiB, at least `MIN_PART`,
    so that `expected_bytes` fits in `MAX_PARTS` parts; capped at S3's 5 GiB (an upload past 10,000
    parts of 5 GiB then fails when it gets there, with a clear error).

    Pass a bound of the archive's size: its data bytes (holes take no space) plus headroom for the tar
    headers and for zstd on incompressible data. The memory of an upload is about
    ``(in_flight + 1) * part_size``."""
    per_part = -(-max(expected_bytes, 0) // MAX_PARTS)
    size = max(MIN_PART, -(-per_part // MiB) * MiB)
    return min(size, MAX_PART)


# -- writing ------------------------------------------------------------------------------------------


class S3Upload:
    """A writable binary sink streamed as one multipart upload to ``s3://BUCKET/KEY``.

    Construction checks the bucket and refuses when the object or its index exists (`ObjectExists`).
    `write` cuts the stream into parts of `part_size` bytes; a full part goes to a pool of `in_flight`
    threads that upload it (UploadPart with Content-MD5, retried by botocore). Memory stays within
    `memory_bound` = ``(in_flight + 1) * part_size``: `in_flight` part buffers uploading or queued and
    one filling; `write` blocks while none is free. Buffers are reused, and a part is never copied on
    its way to the socket.

    With ``resume=True`` the newest open multipart upload of exactly KEY is taken up again (`resumed`
    says whether one was found, else a new one is started): a part whose number is already there with
    the same size and an ETag equal to the MD5 of the new bytes is not sent again (`skipped_parts`,
    `skipped_bytes`); any other is uploaded over it.

    `finish(index)` sends the last part, completes the upload and writes the index object: only then
    does the archive look complete. `abort()` drops the upload (fatal errors); `close()` leaves it for a
    later resume (an interruption).

    Threading: call `write`, `flush`, `finish`, `close` and `abort` from one thread. `on_part(nbytes)`
    is called on that thread too, from `write` and `finish`, once per part done (uploaded or skipped),
    so a progress bar needs no lock. A worker's failure is raised as `S3Error` by the next `write` or
    `finish`."""

    def __init__(
        self,
        url: str,
        *,
        part_size: int,
        in_flight: int = 4,
        resume: bool = False,
        client: Any = None,
        on_part: Callable[[int], None] | None = None,
    ) -> None:
        if not S3_MIN_PART <= part_size <= MAX_PART:
            raise ValueError(f"part size {part_size} is outside S3's limits [5 MiB, 5 GiB]")
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self.location = S3Location.parse(url)
        self.url = self.location.url
        self.part_size = part_size
        self.in_flight = in_flight
        self._s3 = client if client is not None else _process_client()
        self._endpoint = endpoint_of(self._s3)
        self._on_part = on_part
        self.sha256 = hashlib.sha256()
        self.bytes_written = 0
        self.uploaded_parts = self.uploaded_bytes = 0
        self.skipped_parts = self.skipped_bytes = 0

        check_bucket(self._s3, self.location)
        self._refuse_existing()
        self._listed: dict[int, tuple[int, str]] = {}  # part number -> (size, ETag) found on resume
        found = self._newest_upload() if resume else None
        self.resumed = found is not None
        if found is not None:
            self.upload_id = found
            self._listed = self._list_parts()
        else:
            self.upload_id = self._create()

        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="s3-upload")
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._buffers = 0  # part buffers made so far, at most in_flight + 1
        self._buf: bytearray | None = None  # the part being filled
        self._fill = 0
        self._next_part = 1
        self._futures: list[Future[None]] = []
        self._etags: dict[int, str] = {}
        self._done: queue.SimpleQueue[int] = queue.SimpleQueue()  # sizes of parts done, for on_part
        self._lock = threading.Lock()  # the counters and _error, written by the workers
        self._error: S3Error | None = None
        self._open = True

    @property
    def memory_bound(self) -> int:
        """The most bytes of part buffers this upload holds at once."""
        return (self.in_flight + 1) * self.part_size

    @property
    def parts(self) -> int:
        """Parts handed to the workers so far."""
        return self._next_part - 1

    # The sink -----------------------------------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def write(self, data: Buffer) -> int:
        """Append `data`; blocks while every part buffer is uploading or queued."""
        self._check()
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        pos, n = 0, len(view)
        while pos < n:
            if self._buf is None:
                self._buf = self._take_buffer()
                self._fill = 0
            take = min(n - pos, self.part_size - self._fill)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.part_size:
                self._submit(self._buf)
                self._buf = None
        self.bytes_written += n
        self._report()
        return n

    def flush(self) -> None:
        """Nothing to do: parts go out as they fill (here so this can stand where a file stands)."""

    def finish(self, index: dict[str, Any]) -> None:
        """Upload the last part, wait for all, complete the upload, then write the index object."""
        self._check()
        if self._buf is not None or self._next_part == 1:
            last = self._buf if self._buf is not None else bytearray()
            del last[self._fill :]  # shrinks in place: the last buffer is not reused
            self._submit(last)
            self._buf = None
        wait_futures(self._futures)
        self._report()
        self._check()
        self._complete()
        self._shutdown(cancel=False)
        put_index(self._s3, self.location, index)

    def close(self) -> None:
        """Stop without completing: queued parts are dropped, the ones uploading end, and the upload stays
        open for ``resume=True`` (an interruption). Parts done are still counted."""
        if self._open:
            self._shutdown(cancel=True)
            self._report()

    def abort(self) -> None:
        """Drop the upload and its parts (fatal errors); best effort, never raises."""
        self._shutdown(cancel=True)
        with contextlib.suppress(Exception):
            self._s3.abort_multipart_upload(
                Bucket=self.location.bucket, Key=self.location.key, UploadId=self.upload_id
            )

    @property
    def closed(self) -> bool:
        return not self._open

    # Inside -------------------------------------------------------------------------------------------

    def _refuse_existing(self) -> None:
        if exists(self._s3, self.location):
            raise ObjectExists(url=self.url, detail="an archive is never overwritten; choose another name")
        if exists(self._s3, self.location.index):
            raise ObjectExists(
                url=self.url,
                detail=f"its index {self.location.index.url} is there; choose another name",
            )

    def _create(self) -> str:
        loc = self.location
        reply = call(
            self._s3,
            "create_multipart_upload",
            self.url,
            Bucket=loc.bucket,
            Key=loc.key,
            ContentType="application/zstd",
        )
        return str(reply["UploadId"])

    def _newest_upload(self) -> str | None:
        """The id of the newest open multipart upload of exactly our key, if any."""
        loc = self.location
        uploads = listing(
            self._s3, "list_multipart_uploads", self.url, "Uploads", Bucket=loc.bucket, Prefix=loc.key
        )
        ours = [(u["Initiated"], str(u["UploadId"])) for u in uploads if u["Key"] == loc.key]
        return max(ours, key=lambda u: u[0])[1] if ours else None

    def _list_parts(self) -> dict[int, tuple[int, str]]:
        """Part number -> (size, ETag) of the parts already in the upload."""
        loc = self.location
        parts = listing(
            self._s3, "list_parts", self.url, "Parts", Bucket=loc.bucket, Key=loc.key, UploadId=self.upload_id
        )
        return {int(p["PartNumber"]): (int(p["Size"]), str(p["ETag"])) for p in parts}

    def _check(self) -> None:
        if not self._open:
            raise S3Error(url=self.url, detail="the upload is closed")
        with self._lock:
            error = self._error
        if error is not None:
            raise error

    def _take_buffer(self) -> bytearray:
        if self._buffers <= self.in_flight and self._free.empty():
            self._buffers += 1
            return bytearray(self.part_size)
        buf = self._free.get()  # a worker hands one back, after an upload or a failure
        self._check()
        return buf

    def _submit(self, buf: bytearray) -> None:
        number = self._next_part
        if number > MAX_PARTS:
            raise S3Error(
                url=self.url,
                detail=f"larger than {MAX_PARTS} parts of {self.part_size} bytes: use a larger part size",
            )
        self._next_part += 1
        self._futures.append(self._pool.submit(self._send, number, buf))

    def _send(self, number: int, buf: bytearray) -> None:
        """A worker: upload part `number` (or skip it when it is there already), hand the buffer back."""
        try:
            md5 = hashlib.md5(buf, usedforsecurity=False).digest()
            listed = self._listed.get(number)
            if listed is not None and listed[0] == len(buf) and listed[1].strip('"') == md5.hex():
                etag, skipped = listed[1], True
            else:
                reply = self._s3.upload_part(
                    Bucket=self.location.bucket,
                    Key=self.location.key,
                    UploadId=self.upload_id,
                    PartNumber=number,
                    Body=buf,
                    ContentMD5=base64.b64encode(md5).decode(),
                )
                etag, skipped = str(reply["ETag"]), False
            with self._lock:
                self._etags[number] = etag
                if skipped:
                    self.skipped_parts += 1
                    self.skipped_bytes += len(buf)
                else:
                    self.uploaded_parts += 1
                    self.uploaded_bytes += len(buf)
            self._done.put(len(buf))
        except Exception as e:
            error = translate(e, self.url, f"UploadPart {number}", self._endpoint)
            with self._lock:
                if self._error is None:
                    self._error = error
        finally:
            self._free.put(buf)

    def _report(self) -> None:
        while True:
            try:
                nbytes = self._done.get_nowait()
            except queue.Empty:
                return
            if self._on_part is not None:
                self._on_part(nbytes)

    def _complete(self) -> None:
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in range(1, self._next_part)]
        try:
            call(
                self._s3,
                "complete_multipart_upload",
                self.url,
                Bucket=self.location.bucket,
                Key=self.location.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": parts},
            )
        except UploadGone:
            # A retry of a completion whose reply was lost finds the upload gone: done, if the object
            # is the one these parts make.
            if not self._completed_as(parts):
                raise

    def _completed_as(self, parts: list[dict[str, Any]]) -> bool:
        try:
            digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
            head = call(self._s3, "head_object", self.url, Bucket=self.location.bucket, Key=self.location.key)
        except (ValueError, S3Error):
            return False
        expected = f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"
        return str(head.get("ETag", "")).strip('"') == expected

    def _shutdown(self, *, cancel: bool) -> None:
        if self._open:
            self._open = False
            self._pool.shutdown(wait=True, cancel_futures=cancel)


# -- reading ------------------------------------------------------------------------------------------


class S3Reader(io.RawIOBase):
    """A readable binary stream over one object: ranged GETs of `chunk_size` bytes, the next range read
    ahead on a thread, so memory stays within two chunks. A missing object is `NoSuchArchive`; an
    object replaced while it is read fails (the GETs are pinned to its ETag).

    Not seekable; `close` (or the context manager) stops the read-ahead."""

    def __init__(self, url: str, *, client: Any = None, chunk_size: int = READ_CHUNK) -> None:
        super().__init__()
        self.location = S3Location.parse(url)
        self.url = self.location.url
        self._s3 = client if client is not None else _process_client()
        self._endpoint = endpoint_of(self._s3)
        self._chunk_size = chunk_size
        try:
            head = call(self._s3, "head_object", self.url, Bucket=self.location.bucket, Key=self.location.key)
        except NoSuchArchive:
            check_bucket(self._s3, self.location)  # a missing bucket says so
            raise
        self.size = int(head["ContentLength"])
        self._etag = str(head["ETag"])
        self._pos = 0
        self._chunk = memoryview(b"")
        self._at = 0  # position in _chunk
        self._fetched = 0  # offset of the next range to fetch
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-read")
        self._next = self._fetch_next()

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.closed:
            raise ValueError("read of a closed S3Reader")
        if not len(view):
            return 0
        if self._at == len(self._chunk):
            if self._next is None:
                return 0
            self._chunk, self._at = memoryview(self._next.result()), 0
            self._next = self._fetch_next()
        n = min(len(view), len(self._chunk) - self._at)
        view[:n] = self._chunk[self._at : self._at + n]
        self._at += n
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray(self.size - self._pos)
        view = memoryview(out)
        got = 0
        while got < len(out):
            n = self.readinto(view[got:])
            if not n:
                break
            got += n
        return bytes(out[:got])

    def close(self) -> None:
        if not self.closed:
            if self._next is not None:
                self._next.cancel()
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

    def _fetch_next(self) -> Future[bytes] | None:
        start = self._fetched
        if start >= self.size:
            return None
        end = min(self.size, start + self._chunk_size)
        self._fetched = end
        return self._pool.submit(self._get, start, end)

    def _get(self, start: int, end: int) -> bytes:
        """One ranged GET; a body cut short is read again (botocore retries only the request)."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                reply = call(
                    self._s3,
                    "get_object",
                    self.url,
                    Bucket=self.location.bucket,
                    Key=self.location.key,
                    Range=f"bytes={start}-{end - 1}",
                    IfMatch=self._etag,
                )
            except PreconditionFailed:
                raise S3Error(url=self.url, detail="the object changed while it was read") from None
            try:
                data = bytes(reply["Body"].read())
            except (HTTPClientError, IncompleteReadError) as e:
                if attempt == READ_ATTEMPTS:
                    raise translate(e, self.url, "GetObject", self._endpoint) from None
                continue
            if len(data) == end - start:
                return data
        raise S3Error(url=self.url, detail=f"GetObject: bytes {start}-{end - 1} came back short")

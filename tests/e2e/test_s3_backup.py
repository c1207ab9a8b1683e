"""Archives on a real S3 server (SeaweedFS): full and incremental archives uploaded and read back, the
backup node killed mid-upload then `--resume`d to the same bytes, the S3 server restarted mid-upload,
and the errors an administrator meets (wrong credentials, a missing bucket, a key that exists): one
clear line each, exit 1, nothing left that looks complete, no snapshot left behind."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    Appliance,
    Daemons,
    MiB,
    Model,
    Standby,
    Writer,
    backup_argv,
    rand,
    run,
    sync_mode_pair,
)
from linkproxy import LinkProxy
from s3server import S3Server

pytestmark = pytest.mark.timeout(300)

BIG = 96 * MiB  # six 16 MiB parts of random data


def backup(
    a: Appliance | Any, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    grpc = a.standby.grpc
    return run(*backup_argv("run", "vol0", "--standby", grpc, "--metrics-listen", "off", *args),
               check=check, timeout=180, env=env)  # fmt: skip


def ctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(*backup_argv(*args), check=check, env=env)


def object_sha(s3: S3Server, bucket: str, key: str) -> str:
    body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def big_upload(
    daemons: Daemons, tmp: Path, s3: S3Server, bucket: str
) -> tuple[Standby, Model, str, LinkProxy, dict[str, str], str, list[str]]:
    """A 128 MiB volume holding BIG bytes of random data, a bucket, a proxy between the backup node and
    the S3 server (to hold the link at will), and the backup's command line to `s3://BUCKET/vol0.tar.zst`
    through it, with its environment."""
    standby, primary = sync_mode_pair(daemons, tmp, size="128MiB")
    model = Model(128 * MiB)
    scratch = tmp / "scratch"
    scratch.mkdir()
    Writer(primary.uri("vol0"), model, scratch).write(0, rand(BIG, seed=len(bucket)))
    s3.make_bucket(bucket)
    proxy = LinkProxy(s3.endpoint.removeprefix("http://"))
    env = {**s3.env(), "AWS_ENDPOINT_URL": f"http://{proxy.address}"}
    url = f"s3://{bucket}/vol0.tar.zst"
    argv = backup_argv("run", "vol0", "--standby", standby.grpc, "--metrics-listen", "off", "--output", url)
    return standby, model, bucket, proxy, env, url, argv


def env_with(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **env}


def parts_done(s3: S3Server, bucket: str, key: str) -> int:
    """Parts of the open upload of `key` that completed (0 while none is open)."""
    for upload in uploads(s3, bucket):
        if upload["Key"] == key:
            listed = s3.client().list_parts(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
            return len(listed.get("Parts", []))
    return 0


def keys(s3: S3Server, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def uploads(s3: S3Server, bucket: str) -> list[dict[str, Any]]:
    return list(s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def test_full_and_incremental_archives_on_s3_restore_verify_and_list(
    appliance: Appliance, s3: S3Server
) -> None:
    a = appliance
    env = s3.env()
    bucket = s3.make_bucket("nightly")
    dest = f"s3://{bucket}/vol0/"
    a.writer.write(0, rand(3 * MiB, seed=21))
    backup(a, env, "--output", dest, "--since", "latest", "--keep-snapshot")
    a.writer.write(MiB, rand(MiB, seed=22))
    out = backup(a, env, "--output", dest, "--since", "latest", "--keep-snapshot", "--release-base")
    assert "incremental since" in out.stderr, out.stderr
    names = keys(s3, bucket)
    archives = sorted(k for k in names if k.endswith(".tar.zst"))
    assert len(archives) == 2 and all(k + ".manifest.json" in names for k in archives), names
    assert not [k for k in names if k.endswith(".partial.json")], "a finished upload left its marker"
    assert uploads(s3, bucket) == [], "a finished upload is still open"
    listing = ctl(env, "list", dest, "--json").stdout
    found = json.loads(listing)
    full, inc = (next(e for e in found if e["manifest"]["kind"] == k) for k in ("full", "incremental"))
    assert inc["manifest"]["base"]["archive_sha256"] == full["archive_sha256"]
    assert full["archive_sha256"] == object_sha(s3, bucket, full["archive"].split("/", 3)[3])
    image = a.tmp / "restored.img"
    ctl(env, "restore", full["archive"], inc["archive"], "--output", str(image))
    assert image.read_bytes() == bytes(a.model.data)
    assert "chain of 2 archives linked" in ctl(env, "verify", full["archive"], inc["archive"]).stdout


def test_killed_mid_upload_then_resumed_gives_the_same_archive(
    daemons: Daemons, tmp_path: Path, s3: S3Server
) -> None:
    standby, _model, bucket, proxy, env, url, argv = big_upload(daemons, tmp_path, s3, "resume")
    proc = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Let two parts complete, then hold the link so that the rest cannot, and kill -9 the node.
        deadline = time.monotonic() + 60
        while True:
            done = parts_done(s3, bucket, "vol0.tar.zst")
            if done >= 2:
                proxy.stall()
                break
            assert proc.poll() is None, "the upload finished before it could be interrupted"
            assert time.monotonic() < deadline, "no part was uploaded within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        proxy.unstall()
    assert "vol0.tar.zst.manifest.json" not in keys(s3, bucket), "a killed upload looks complete"
    [snap] = [s["name"] for s in standby.snapshots("vol0")]  # leased, kept for --resume
    # The bytes the archive must have: the same snapshot archived to a local file.
    local = tmp_path / "local.tar.zst"
    node = backup_argv("run", "vol0", "--standby", standby.grpc, "--metrics-listen", "off")
    run(*node, "--snapshot", snap, "--output", str(local))
    out = run(*node, "--output", url, "--resume", "--log-format", "json", env=env, timeout=180)
    done = [json.loads(line) for line in out.stderr.splitlines() if '"backup_done"' in line]
    assert done and done[0]["resumed_parts"] >= 2, out.stderr
    want = hashlib.sha256(local.read_bytes()).hexdigest()
    assert object_sha(s3, bucket, "vol0.tar.zst") == want == done[0]["archive_sha256"]
    assert standby.snapshots("vol0") == [], "the resumed backup left its snapshot"
    assert uploads(s3, bucket) == []
    proxy.close()


def test_s3_server_restarted_mid_upload_the_backup_completes(
    daemons: Daemons, tmp_path: Path, s3: S3Server
) -> None:
    _standby, model, _bucket, proxy, env, url, argv = big_upload(daemons, tmp_path, s3, "restart")
    proxy.stall()  # the upload starts and waits on the link
    proc = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not proxy.held:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the backup never reached the S3 server"
            time.sleep(0.01)
        s3.restart()  # the connections in flight are lost with it
        proxy.restore()
        proxy.unstall()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    assert proc.returncode == 0, err.decode()
    image = tmp_path / "restored.img"
    run(*backup_argv("restore", url, "--output", str(image)), env=s3.env())
    assert image.read_bytes() == bytes(model.data)


@pytest.mark.parametrize("case", ["wrong credentials", "missing bucket", "key exists", "index exists"])
def test_s3_errors_are_one_line_and_leave_nothing_complete(
    appliance: Appliance, s3: S3Server, case: str
) -> None:
    a = appliance
    bucket = s3.make_bucket("errors")
    env = s3.env()
    key = f"{case.replace(' ', '-')}.tar.zst"
    url = f"s3://{bucket}/{key}"
    want = {"wrong credentials": "access denied", "missing bucket": "no bucket",
            "key exists": "exists", "index exists": "exists"}[case]  # fmt: skip
    if case == "wrong credentials":
        env = s3.env(secret_key="not-the-secret")
    elif case == "missing bucket":
        url = "s3://no-such-bucket/vol0.tar.zst"
    elif case == "key exists":
        s3.client().put_object(Bucket=bucket, Key=key, Body=b"someone else's")
    else:
        s3.client().put_object(Bucket=bucket, Key=key + ".manifest.json", Body=b"{}")
    before = keys(s3, bucket)
    cp = backup(a, env, "--output", url, check=False)
    assert cp.returncode == 1, cp.stderr
    # Besides the JSON log lines (stderr is no terminal), exactly one line: the error.
    lines = [x for x in cp.stderr.strip().splitlines() if not x.startswith("{")]
    assert len(lines) == 1 and want in lines[0], cp.stderr
    assert "Traceback" not in cp.stderr and "<" not in lines[0], cp.stderr
    assert keys(s3, bucket) == before, "a failed backup changed the bucket"
    assert uploads(s3, bucket) == [], "a failed backup left an upload open"
    assert a.standby.snapshots("vol0") == [], "a failed backup left its snapshot"


def test_the_progress_bar_shows_the_upload(appliance: Appliance, s3: S3Server) -> None:
    """On a terminal, the backup's progress bar shows the bytes uploaded beside the data read."""
    a = appliance
    a.writer.write(0, rand(3 * MiB, seed=51))
    bucket = s3.make_bucket("progress")
    argv = backup_argv("run", "vol0", "--standby", a.standby.grpc, "--metrics-listen", "off",
                       "--output", f"s3://{bucket}/vol0.tar.zst")  # fmt: skip
    terminal, tty = os.openpty()
    fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 wide
    proc = subprocess.Popen(argv, env=env_with(s3.env()), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=tty)  # fmt: skip
    os.close(tty)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the other side closed: the program ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(terminal)
    assert proc.wait(60) == 0, shown.decode(errors="replace")
    assert b"uploaded 3.0 MiB" in shown, shown.decode(errors="replace")

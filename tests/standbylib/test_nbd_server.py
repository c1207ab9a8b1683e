"""The NBD server as real clients see it: nbdinfo, qemu-img, qemu-io and nbdcopy against an in-process
server, plus raw-socket sessions for input no well-behaved client sends."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from blockfiles import ForwardingDevice

from standbylib.blockdev import BlockDevice, Device, open_file_device, ram_device
from standbylib.nbd import NbdServer
from standbylib.nbd import protocol as p
from standbylib.nbd.handshake import MAX_REQUEST
from standbylib.snapshot import PreservationStore

SIZE = 1 << 20
BS = 4096


def pattern(tag: int, size: int = SIZE) -> bytes:
    """Bytes that name their 8-byte position, so misplaced data shows."""
    return b"".join(struct.pack(">BxxxI", tag, i) for i in range(size // 8))


class HoleyDevice(ForwardingDevice):
    """A RAM device that reports its second half as a hole through the optional `extents` method."""

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        half = self.size // 2
        out: list[tuple[int, bool]] = []
        end = offset + length
        if offset < half:
            out.append((min(end, half) - offset, False))
        if end > half:
            out.append((end - max(offset, half), True))
        return out


@dataclass
class Env:
    url: str
    host: str
    port: int
    rw_path: str
    rw: Device
    ro: Device
    frozen: bytes
    lookups: list[str] = field(default_factory=list)

    def uri(self, name: str) -> str:
        return f"{self.url}/{name}"


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    rw_path = str(tmp_path / "rw.img")
    rw = open_file_device(rw_path, SIZE)
    rw.write(0, pattern(1))
    ro_path = str(tmp_path / "ro.img")
    with open(ro_path, "wb") as f:
        f.write(pattern(2))
    ro = open_file_device(ro_path, readonly=True)
    store = PreservationStore.in_memory(4 * SIZE)
    vol = store.attach("vol0", ram_device(SIZE), block_size=BS)
    vol.write(0, pattern(3))
    snap = vol.create_snapshot("nightly")
    vol.write(0, pattern(4, SIZE // 2))  # after the snapshot: must not show through it
    holey = ram_device(SIZE)
    holey.write(0, pattern(5, SIZE // 2))
    devices: dict[str, BlockDevice] = {
        "rw": rw,
        "ro": ro,
        "vol0@nightly": snap,
        "holey": HoleyDevice(holey),
    }
    lookups: list[str] = []

    def lookup(name: str) -> BlockDevice | None:
        lookups.append(name)
        return devices.get(name)

    server = NbdServer(lookup, list_exports=lambda: list(devices))
    host, port = server.start()
    try:
        yield Env(f"nbd://{host}:{port}", host, port, rw_path, rw, ro, pattern(3), lookups)
    finally:
        server.stop()
        rw.close()
        ro.close()
        store.close()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=check)


# ------------------------------------------------------------------------------------ real clients


def test_nbdinfo_reports_size_read_only_and_block_sizes(env: Env) -> None:
    rw = json.loads(run("nbdinfo", "--json", env.uri("rw")).stdout)["exports"][0]
    ro = json.loads(run("nbdinfo", "--json", env.uri("ro")).stdout)["exports"][0]
    assert rw["export-size"] == ro["export-size"] == SIZE
    assert rw["is_read_only"] is False
    assert ro["is_read_only"] is True
    assert rw["can_multi_conn"] and rw["can_flush"] and rw["can_fua"] and rw["can_trim"] and rw["can_zero"]
    assert (rw["block_size_minimum"], rw["block_size_preferred"], rw["block_size_maximum"]) == (
        1,
        4096,
        MAX_REQUEST,
    )
    assert "base:allocation" in rw["contexts"]


def test_nbdinfo_list_shows_every_export_and_unknown_export_is_refused(env: Env) -> None:
    out = run("nbdinfo", "--list", env.url).stdout
    for name in ("rw", "ro", "vol0@nightly", "holey"):
        assert f'export="{name}"' in out
    missing = run("nbdinfo", env.uri("nosuch"), check=False)
    assert missing.returncode != 0


def test_qemu_img_convert_reads_the_frozen_snapshot_image(env: Env, tmp_path: Any) -> None:
    out = str(tmp_path / "out.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", env.uri("vol0@nightly"), out)
    with open(out, "rb") as f:
        assert f.read() == env.frozen


def test_qemu_io_writes_and_reads_back_through_the_writable_export(env: Env) -> None:
    res = run(
        "qemu-io", "-f", "raw", env.uri("rw"), "-c", "write -P 0xab 0 64k", "-c", "read -P 0xab 0 64k",
        "-c", "write -z 64k 4k", "-c", "flush",
    )  # fmt: skip
    assert "Pattern verification failed" not in res.stdout + res.stderr
    with open(env.rw_path, "rb") as f:
        image = f.read()
    assert image[: 64 << 10] == b"\xab" * (64 << 10)
    assert image[64 << 10 : 68 << 10] == bytes(4096)
    assert image[68 << 10 :] == pattern(1)[68 << 10 :]


def test_write_to_read_only_export_fails_and_changes_nothing(env: Env) -> None:
    # qemu-io sees the READ_ONLY flag and refuses to open the export for writing.
    res = run("qemu-io", "-f", "raw", env.uri("ro"), "-c", "write -P 0xcd 0 4k", check=False)
    assert res.returncode != 0
    assert "Permission denied" in res.stderr
    # nbdcopy into it fails too.
    res = run("nbdcopy", "--synchronous", env.uri("rw"), env.uri("ro"), check=False)
    assert res.returncode != 0
    assert env.ro.read(0, SIZE) == pattern(2)


def test_nbdcopy_multi_conn_both_ways(env: Env, tmp_path: Any) -> None:
    src = str(tmp_path / "src.img")
    back = str(tmp_path / "back.img")
    data = pattern(7)
    with open(src, "wb") as f:
        f.write(data)
    before = len(env.lookups)
    run("nbdcopy", "-C", "4", "-T", "4", "-R", "8", "--request-size=65536", src, env.uri("rw"))
    assert env.rw.read(0, SIZE) == data
    run("nbdcopy", "-C", "4", "-T", "4", "-R", "8", "--request-size=65536", env.uri("rw"), back)
    with open(back, "rb") as f:
        assert f.read() == data
    # Each copy opened four connections (multi-conn), each choosing the export once.
    assert len(env.lookups) - before >= 8


def test_nbdinfo_map_shows_holes_from_base_allocation(env: Env) -> None:
    holey = run("nbdinfo", "--map", env.uri("holey")).stdout.split("\n")
    rows = [line.split() for line in holey if line.strip()]
    assert rows[0][:3] == ["0", str(SIZE // 2), "0"]
    assert rows[1][:3] == [str(SIZE // 2), str(SIZE // 2), "3"]
    assert rows[1][3] == "hole,zero"
    plain = run("nbdinfo", "--map", env.uri("rw")).stdout.split()
    assert plain[:3] == ["0", str(SIZE), "0"]


def test_copy_of_export_with_holes_keeps_data_and_zeros(env: Env, tmp_path: Any) -> None:
    out = str(tmp_path / "holey.img")
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", env.uri("holey"), out)
    with open(out, "rb") as f:
        assert f.read() == pattern(5, SIZE // 2) + bytes(SIZE // 2)


# ------------------------------------------------------------------------------------ raw sockets


class Raw:
    """A minimal client speaking the fixed newstyle handshake and simple replies."""

    def __init__(self, env: Env) -> None:
        self.sock = socket.create_connection((env.host, env.port), timeout=10)
        greeting = self.recv(p.GREETING.size)
        assert p.GREETING.unpack(greeting)[:2] == (p.INIT_MAGIC, p.OPTS_MAGIC)
        self.sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            piece = self.sock.recv(n - len(buf))
            if not piece:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += piece
        return buf

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return replies up to the final (non-INFO/SERVER/META) one."""
        self.sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            assert (magic, opt) == (p.REP_MAGIC, option)
            replies.append((kind, self.recv(length)))
            if kind not in (p.REP_INFO, p.REP_SERVER, p.REP_META_CONTEXT):
                return replies

    def go(self, name: str) -> int:
        replies = self.option(p.OPT_GO, p.pack_string(name) + p.U16.pack(0))
        assert replies[-1][0] == p.REP_ACK
        return p.INFO_EXPORT_STRUCT.unpack(replies[0][1])[1]

    def structured(self) -> None:
        assert self.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]

    def chunks(self, cookie: int) -> list[tuple[int, bytes]]:
        """Read structured reply chunks of `cookie` up to the one flagged DONE: ``(type, payload)``."""
        out = []
        while True:
            magic, flags, kind, got, length = p.STRUCTURED_REPLY.unpack(self.recv(p.STRUCTURED_REPLY.size))
            assert (magic, got) == (p.STRUCTURED_REPLY_MAGIC, cookie)
            out.append((kind, self.recv(length)))
            if flags & p.REPLY_FLAG_DONE:
                return out

    def request(self, command: int, offset: int, length: int, data: bytes = b"", cookie: int = 1) -> int:
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, command, cookie, offset, length) + data)
        return self.reply(cookie)

    def reply(self, cookie: int) -> int:
        magic, error, got = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
        assert (magic, got) == (p.SIMPLE_REPLY_MAGIC, cookie)
        return int(error)

    def close(self) -> None:
        self.sock.close()


def test_bad_option_magic_ends_only_that_connection(env: Env) -> None:
    bad = Raw(env)
    bad.sock.sendall(struct.pack(">QII", 0x1234, p.OPT_GO, 0))
    with pytest.raises((EOFError, ConnectionError)):
        bad.recv(1)
    bad.close()
    good = Raw(env)
    assert good.go("rw") == SIZE
    assert good.request(p.CMD_READ, 0, 8) == 0
    assert good.recv(8) == pattern(1)[:8]
    good.close()


def test_unknown_option_is_unsupported_and_negotiation_continues(env: Env) -> None:
    raw = Raw(env)
    assert raw.option(99, b"ignored")[0][0] == p.REP_ERR_UNSUP
    assert raw.option(p.OPT_INFO, p.pack_string("nosuch") + p.U16.pack(0))[0][0] == p.REP_ERR_UNKNOWN
    assert raw.option(p.OPT_GO, p.pack_string("nosuch") + p.U16.pack(0))[0][0] == p.REP_ERR_UNKNOWN
    assert raw.go("ro") == SIZE
    raw.close()


def test_request_errors_leave_the_connection_usable(env: Env) -> None:
    raw = Raw(env)
    raw.go("rw")
    assert raw.request(p.CMD_READ, SIZE - 4, 8) == p.EINVAL
    assert raw.request(p.CMD_WRITE, SIZE - 4, 8, b"x" * 8) == p.ENOSPC
    big = MAX_REQUEST + 1
    raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 7, 0, big))
    raw.sock.sendall(bytes(big))  # the payload is consumed, not mistaken for requests
    assert raw.reply(7) == p.EINVAL
    assert raw.request(p.CMD_READ, 0, big) == p.EINVAL
    assert raw.request(p.CMD_FLUSH, 0, 0) == 0
    assert raw.request(p.CMD_READ, 0, 16) == 0
    assert raw.recv(16) == pattern(1)[:16]
    assert env.rw.read(0, SIZE) == pattern(1)
    raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
    with pytest.raises(EOFError):
        raw.recv(1)
    raw.close()

    ro = Raw(env)
    ro.go("ro")
    assert ro.request(p.CMD_WRITE, 0, 4, b"abcd") == p.EPERM
    assert ro.request(p.CMD_WRITE_ZEROES, 0, 4096) == p.EPERM
    assert ro.request(p.CMD_READ, 0, 4) == 0
    assert ro.recv(4) == pattern(2)[:4]
    ro.close()
    assert env.ro.read(0, SIZE) == pattern(2)


def test_structured_reads_send_holes_as_hole_chunks_and_errors_as_error_chunks(env: Env) -> None:
    raw = Raw(env)
    raw.structured()
    raw.go("holey")
    half = SIZE // 2
    raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 5, half - 8, 4096))
    chunks = raw.chunks(5)
    assert chunks[0] == (p.REPLY_TYPE_OFFSET_DATA, p.OFFSET_DATA.pack(half - 8) + pattern(5, half)[-8:])
    assert chunks[1] == (p.REPLY_TYPE_OFFSET_HOLE, p.OFFSET_HOLE.pack(half, 4088))
    raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 6, SIZE, 512))
    [(kind, payload)] = raw.chunks(6)
    assert kind == p.REPLY_TYPE_ERROR
    error, size = p.ERROR_CHUNK.unpack_from(payload)
    assert error == p.EINVAL
    assert b"beyond the export size" in payload[p.ERROR_CHUNK.size : p.ERROR_CHUNK.size + size]
    raw.close()


def test_requests_in_flight_are_all_answered(env: Env) -> None:
    raw = Raw(env)
    raw.go("rw")
    n = 32
    for i in range(n):
        raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 100 + i, i * BS, BS))
    seen = {}
    for _ in range(n):
        magic, error, cookie = p.SIMPLE_REPLY.unpack(raw.recv(p.SIMPLE_REPLY.size))
        assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
        seen[cookie] = raw.recv(BS)
    expected = pattern(1)
    assert seen == {100 + i: expected[i * BS : (i + 1) * BS] for i in range(n)}
    raw.close()


def test_abrupt_disconnect_mid_request_leaves_server_serving(env: Env) -> None:
    raw = Raw(env)
    raw.go("rw")
    raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, 4096) + b"half")
    raw.sock.close()
    assert env.rw.read(0, 4) == pattern(1)[:4]
    info = json.loads(run("nbdinfo", "--json", env.uri("rw")).stdout)
    assert info["exports"][0]["export-size"] == SIZE


def test_sparse_file_export_reports_its_holes(tmp_path: Any) -> None:
    # A sparse file device reports its holes itself (SEEK_HOLE), so clients can skip them.
    device = open_file_device(str(tmp_path / "sparse.img"), size=4 << 20)
    device.write(1 << 20, b"\x5a" * (1 << 20))
    assert device.extents(0, 4 << 20) == [(1 << 20, True), (1 << 20, False), (2 << 20, True)]
    with NbdServer({"sparse": device}) as server:
        assert server.address is not None
        host, port = server.address
        out = subprocess.run(
            ["nbdinfo", "--map", "--json", f"nbd://{host}:{port}/sparse"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    device.close()
    runs = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert [(o, n) for o, n, t in runs if t & 1] == [(0, 1 << 20), (2 << 20, 2 << 20)]
    assert [(o, n) for o, n, t in runs if not t & 1] == [(1 << 20, 1 << 20)]


class SlowFlushDevice(ForwardingDevice):
    """A file device with read plans whose flush waits until `release` is set."""

    closes_inner = False

    def __init__(self, inner: Device) -> None:
        super().__init__(inner)
        self.readonly = False
        self.release = threading.Event()

    def read_plan(self, offset: int, length: int) -> Any:
        return self.inner.read_plan(offset, length)

    def flush(self) -> None:
        assert self.release.wait(10)
        self.inner.flush()


def test_a_slow_request_does_not_hold_back_the_replies_behind_it(tmp_path: Any) -> None:
    device = open_file_device(str(tmp_path / "slow.img"), SIZE)
    device.write(0, pattern(9))
    slow = SlowFlushDevice(device)
    with NbdServer({"slow": slow}) as server:
        assert server.address is not None
        host, port = server.address
        raw = Raw(Env("", host, port, "", device, device, b""))
        raw.go("slow")
        raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_FLUSH, 1, 0, 0))
        raw.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 2, 4096, 4096))
        assert raw.reply(2) == 0  # the read is answered while the flush is still waiting
        assert raw.recv(4096) == pattern(9)[4096:8192]
        slow.release.set()
        assert raw.reply(1) == 0
        raw.close()
    device.close()


def test_reads_of_a_sparse_file_in_flight_together_reply_holes_and_zeros(tmp_path: Any) -> None:
    # Contiguous reads buffered together are planned as one run and split into replies again.
    device = open_file_device(str(tmp_path / "sparse.img"), size=SIZE)
    data = pattern(6, SIZE // 4)
    device.write(SIZE // 4, data)
    with NbdServer({"sparse": device}) as server:
        assert server.address is not None
        host, port = server.address
        env = Env("", host, port, "", device, device, b"")
        reads = [(SIZE // 4 - 8192 + i * 12288, 12288) for i in range(30)]  # crosses data and holes
        image = bytes(SIZE // 4) + data + bytes(SIZE // 2)
        for structured in (False, True):
            raw = Raw(env)
            if structured:
                raw.structured()
            raw.go("sparse")
            raw.sock.sendall(
                b"".join(
                    p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 10 + i, off, n)
                    for i, (off, n) in enumerate(reads)
                )
            )
            for i, (off, n) in enumerate(reads):
                if not structured:
                    assert raw.reply(10 + i) == 0
                    assert raw.recv(n) == image[off : off + n]
                    continue
                got = bytearray(b"?" * n)
                kinds = set()
                for kind, payload in raw.chunks(10 + i):
                    kinds.add(kind)
                    if kind == p.REPLY_TYPE_OFFSET_DATA:
                        (at,) = p.OFFSET_DATA.unpack_from(payload)
                        got[at - off : at - off + len(payload) - 8] = payload[8:]
                    else:
                        assert kind == p.REPLY_TYPE_OFFSET_HOLE
                        at, size = p.OFFSET_HOLE.unpack(payload)
                        got[at - off : at - off + size] = bytes(size)
                assert got == image[off : off + n]
                if not any(image[off : off + n]):
                    assert kinds == {p.REPLY_TYPE_OFFSET_HOLE}  # holes are not sent as data
            raw.close()
    device.close()

"""The NBD client against real servers (our NbdServer in-process, nbdkit as a process) and against a
scripted raw-socket server for replies no well-behaved server sends.

nbdkit is required: `make test` installs it (scripts/install-debian-tools.sh); without it these tests
fail rather than skip, so a missing tool cannot pass for a working client.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from blockfiles import data_extents

from standbylib.blockdev import open_file_device
from standbylib.nbd import (
    Extent,
    NbdClient,
    NbdClientClosed,
    NbdCommandError,
    NbdConnectError,
    NbdConnectionLost,
    NbdPool,
    NbdProtocolError,
    NbdServer,
    NbdTimeout,
    NbdUnknownExport,
)
from standbylib.nbd import client as nbd_client
from standbylib.nbd import protocol as p

MiB = 1 << 20
SIZE = 8 * MiB
EXPORT = "vol0@nightly"


def make_image(path: str) -> bytes:
    """A sparse 8 MiB file: data runs (one unaligned and tiny) between holes. Returns its bytes."""
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in (
            (0, 192 << 10),
            (1 * MiB, 1 * MiB),
            (3 * MiB + 12345, 100),
            (5 * MiB, 2 * MiB),
        ):
            f.seek(offset)
            f.write(rng.randbytes(length))
    with open(path, "rb") as f:
        return f.read()


def file_map(path: str) -> list[tuple[int, bool]]:
    """The file's (length, is_hole) runs over its SIZE bytes, as SEEK_DATA/SEEK_HOLE see them."""
    runs: list[tuple[int, bool]] = []
    pos = 0
    for start, end in data_extents(path):
        if start > pos:
            runs.append((start - pos, True))
        runs.append((end - start, False))
        pos = end
    if pos < SIZE:
        runs.append((SIZE - pos, True))
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def nbdkit(*args: str) -> Iterator[int]:
    """Run ``nbdkit ARGS`` on a free loopback port; yield the port once it accepts connections."""
    for _attempt in range(3):
        port = free_port()
        proc = subprocess.Popen(
            ["nbdkit", "--exit-with-parent", "-f", "-p", str(port), "-i", "127.0.0.1", *args],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        if proc.poll() is None:
            break
        proc.wait()  # exited: most likely the port was taken meanwhile; try another
    else:
        assert proc.stderr is not None
        raise AssertionError(f"nbdkit did not start: {proc.stderr.read().decode()}")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@dataclass
class Target:
    kind: str
    host: str
    port: int
    export: str
    path: str
    data: bytes
    structured: bool

    def connect(self, **kw: Any) -> NbdClient:
        return NbdClient.connect(self.host, self.port, self.export, timeout=10, **kw)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = str(tmp_path_factory.mktemp("client") / "sparse.img")
    return path, make_image(path)


@pytest.fixture(scope="module")
def ours(image: tuple[str, bytes]) -> Iterator[Target]:
    path, data = image
    device = open_file_device(path, readonly=True)
    with NbdServer({EXPORT: device, "other": device}) as server:
        assert server.address is not None
        host, port = server.address
        yield Target("ours", host, port, EXPORT, path, data, True)
    device.close()


@pytest.fixture(scope="module")
def kit(image: tuple[str, bytes]) -> Iterator[Target]:
    path, data = image
    with nbdkit("-r", "file", path) as port:
        yield Target("nbdkit", "127.0.0.1", port, EXPORT, path, data, True)


@pytest.fixture(scope="module")
def kit_no_sr(image: tuple[str, bytes]) -> Iterator[Target]:
    path, data = image
    with nbdkit("--no-sr", "-r", "file", path) as port:
        yield Target("nbdkit --no-sr", "127.0.0.1", port, EXPORT, path, data, False)


@pytest.fixture(params=["ours", "nbdkit", "nbdkit-no-sr"])
def target(request: pytest.FixtureRequest) -> Target:
    name = {"ours": "ours", "nbdkit": "kit", "nbdkit-no-sr": "kit_no_sr"}[request.param]
    value: Target = request.getfixturevalue(name)
    return value


def random_ranges(rng: random.Random, n: int, largest: int = 300_000) -> list[tuple[int, int]]:
    out = []
    for _ in range(n):
        length = rng.choice((1, 511, 4096, 65536, rng.randrange(1, largest)))
        out.append((rng.randrange(0, SIZE - length + 1), length))
    return out


# ------------------------------------------------------------------------------------ real servers


def test_handshake_reports_the_export(target: Target) -> None:
    with target.connect() as c:
        assert c.size == SIZE
        assert c.export == EXPORT
        assert c.readonly
        assert c.can_multi_conn
        assert c.structured is target.structured
        assert c.has_allocation is target.structured
        # ours advertises 64 MiB; nbdkit advertises no block sizes (the client assumes 32 MiB)
        max_block = 64 * MiB if target.kind == "ours" else 32 * MiB
        assert (c.min_block, c.preferred_block, c.max_block) == (1, 4096, max_block)
        assert c.transmission_flags & p.FLAG_HAS_FLAGS
        assert c.max_read == 32 * MiB


def test_reads_equal_the_file(target: Target) -> None:
    rng = random.Random(1)
    data = target.data
    with target.connect() as c:
        assert c.read(0, SIZE) == data
        assert c.read(5, 0) == b""
        for offset, length in random_ranges(rng, 60):
            assert c.read(offset, length) == data[offset : offset + length], (offset, length)
        # readinto a dirty buffer: holes must come back as zeros, not as what was there.
        buf = bytearray(b"\xff" * (2 * MiB))
        c.readinto(MiB - 4096, buf)
        assert buf == data[MiB - 4096 : 3 * MiB - 4096]
        view = memoryview(bytearray(b"\xee" * 8192))
        c.readinto(3 * MiB + 8192, view[100:4196])
        assert view[100:4196] == data[3 * MiB + 8192 : 3 * MiB + 12288]
        assert view[:100] == b"\xee" * 100


def test_read_many_keeps_the_order_with_requests_in_flight(target: Target) -> None:
    rng = random.Random(2)
    ranges = [*random_ranges(rng, 400), (0, 0), (SIZE - 1, 1)]
    rng.shuffle(ranges)
    with target.connect() as c:
        for depth in (1, 5, 32):
            got = [(offset, bytes(view)) for offset, view in c.read_many(ranges, depth=depth)]
            assert got == [(o, target.data[o : o + n]) for o, n in ranges]
        # Closing a pipelined iteration early leaves the connection usable (the replies are drained).
        it = c.read_many(ranges, depth=16)
        next(it)
        it.close()
        assert c.read(MiB, 4096) == target.data[MiB : MiB + 4096]


def test_pool_reads_over_several_connections_in_range_order(target: Target) -> None:
    rng = random.Random(3)
    ranges = random_ranges(rng, 300, largest=MiB)
    taken = consumed = 0
    most_ahead = 0

    def feed() -> Iterator[tuple[int, int]]:
        nonlocal taken, most_ahead
        for r in ranges:
            most_ahead = max(most_ahead, taken - consumed)
            taken += 1
            yield r

    with NbdPool.connect(target.host, target.port, EXPORT, connections=4, timeout=10) as pool:
        assert pool.connections == 4
        assert pool.size == SIZE
        for offset, view in pool.read_many(feed(), depth=3, window=6):
            assert (offset, bytes(view)) == (ranges[consumed][0], target.data[offset : offset + len(view)])
            assert len(view) == ranges[consumed][1]
            consumed += 1
            if consumed % 50 == 0:
                time.sleep(0.01)  # a slow consumer: the connections must wait, not run ahead
        assert consumed == len(ranges)
        assert most_ahead <= 6  # never more than `window` ranges taken and not consumed
        # The whole image in 1 MiB pieces, as a backup streams it.
        whole = b"".join(bytes(v) for _, v in pool.read_many((o, MiB) for o in range(0, SIZE, MiB)))
        assert whole == target.data


def test_pool_uses_one_connection_without_multi_conn(image: tuple[str, bytes]) -> None:
    path, data = image
    with (
        nbdkit("--filter=multi-conn", "-r", "file", path, "multi-conn-mode=disable") as port,
        NbdPool.connect("127.0.0.1", port, EXPORT, connections=4, timeout=10) as pool,
    ):
        assert not pool.clients[0].can_multi_conn
        assert pool.connections == 1
        ranges = [(o, 300_000) for o in range(0, SIZE - 300_000, 250_000)]
        got = [(o, bytes(v)) for o, v in pool.read_many(ranges)]
        assert got == [(o, data[o : o + n]) for o, n in ranges]


def test_reads_larger_than_the_servers_maximum_are_split(image: tuple[str, bytes]) -> None:
    path, data = image
    args = ["--filter=blocksize-policy", "-r", "file", path]
    limits = ["blocksize-minimum=512", "blocksize-maximum=64K", "blocksize-error-policy=error"]
    with nbdkit(*args, *limits) as port, NbdClient.connect("127.0.0.1", port, EXPORT, timeout=10) as c:
        assert (c.min_block, c.max_block, c.max_read) == (512, 64 << 10, 64 << 10)
        assert c.read(0, SIZE) == data  # 128 requests: nbdkit would refuse a larger one
        ranges = [(o, 300 * 512) for o in range(512, SIZE - 300 * 512, 200 * 512)]
        assert [bytes(v) for _, v in c.read_many(ranges, depth=4)] == [data[o : o + n] for o, n in ranges]


def test_extents_report_the_files_holes(target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    with target.connect() as c:
        if not target.structured:
            assert c.extents(0, SIZE) == [Extent(SIZE, 0)]
            return
        expected = file_map(target.path)
        assert any(hole for _, hole in expected) and any(not hole for _, hole in expected)
        got = c.extents(0, SIZE)
        assert sum(e.length for e in got) == SIZE
        assert [(e.length, e.is_hole) for e in got] == expected
        assert all(e.is_zero for e in got if e.is_hole)
        # Holes read as zeros.
        pos = 0
        for e in got:
            if e.is_hole:
                assert c.read(pos, e.length) == bytes(e.length)
            pos += e.length
        # Requests capped below the range are repeated until it is covered.
        monkeypatch.setattr(nbd_client, "MAX_EXTENTS_REQUEST", 256 << 10)
        assert c.extents(0, SIZE) == got
        part = c.extents(MiB - 100, 3 * MiB)
        assert sum(e.length for e in part) == 3 * MiB
        assert part[0] == Extent(100, part[0].flags) and part[0].is_hole
        assert c.extents(0, 0) == []


def test_sparse_content_from_nbdkit_data_plugin() -> None:
    rng = random.Random(4)
    pieces = {MiB + 3: rng.randbytes(40), 6 * MiB: rng.randbytes(5000)}
    expected = bytearray(SIZE)
    spec = []
    for offset, chunk in pieces.items():
        expected[offset : offset + len(chunk)] = chunk
        spec.append(f"@{offset} " + " ".join(str(b) for b in chunk))
    with nbdkit("data", " ".join(spec), f"size={SIZE}") as port:
        with NbdClient.connect("127.0.0.1", port, "", timeout=10) as c:
            assert c.read(0, SIZE) == expected
            runs = c.extents(0, SIZE)
            assert sum(e.length for e in runs) == SIZE
            assert any(e.is_hole for e in runs)
            pos = 0
            for e in runs:
                if e.is_hole or e.is_zero:
                    assert not any(expected[pos : pos + e.length])
                pos += e.length
            got = [bytes(v) for _, v in c.read_many([(o, len(b)) for o, b in pieces.items()])]
            assert got == list(pieces.values())
        with NbdPool.connect("127.0.0.1", port, "", connections=3, timeout=10) as pool:
            assert (
                b"".join(bytes(v) for _, v in pool.read_many((o, MiB) for o in range(0, SIZE, MiB)))
                == expected
            )


def test_unknown_export_is_a_clear_error(ours: Target, image: tuple[str, bytes]) -> None:
    with pytest.raises(NbdUnknownExport) as err:
        NbdClient.connect(ours.host, ours.port, "vol0@nosuch", timeout=10)
    message = str(err.value)
    assert f"{ours.host}:{ours.port}" in message
    assert "'vol0@nosuch'" in message
    assert "unknown export" in message  # the server's own text
    assert "\n" not in message
    path, _ = image
    strict = ["--filter=exportname", "-r", "file", path, "exportname-strict=true", f"exportname={EXPORT}"]
    with nbdkit(*strict) as port:
        with pytest.raises(NbdUnknownExport, match=r"127\.0\.0\.1:\d+ has no export 'other'"):
            NbdClient.connect("127.0.0.1", port, "other", timeout=10)
        with NbdClient.connect("127.0.0.1", port, EXPORT, timeout=10) as c:
            assert c.size == SIZE


def test_list_exports(ours: Target, image: tuple[str, bytes]) -> None:
    assert sorted(NbdClient.list_exports(ours.host, ours.port)) == sorted([EXPORT, "other"])
    path, _ = image
    listing = ["--filter=exportname", "-r", "file", path, "exportname-list=explicit", f"exportname={EXPORT}"]
    with nbdkit(*listing) as port:
        assert NbdClient.list_exports("127.0.0.1", port) == [EXPORT]


def test_reading_beyond_the_end_is_a_command_error_and_the_connection_goes_on(target: Target) -> None:
    with target.connect() as c:
        with pytest.raises(NbdCommandError) as err:
            c.read(SIZE - 10, 20)
        assert err.value.errno in (p.EINVAL, p.ENOSPC)
        message = str(err.value)
        assert f":{target.port}" in message and EXPORT in message and f"[{SIZE - 10}, +20)" in message
        assert err.value.error.split()[0] in ("EINVAL", "ENOSPC")
        if target.kind == "ours":
            assert "beyond the export size" in err.value.message
        assert c.read(SIZE - 10, 10) == target.data[-10:]
        # In a pipeline, the failing range raises in its turn; those before it arrive.
        ranges = [(0, 4096), (4096, 4096), (SIZE, 4096), (8192, 4096)]
        got = []
        with pytest.raises(NbdCommandError):
            for _offset, view in c.read_many(ranges):
                got.append(bytes(view))
        assert got == [target.data[:4096], target.data[4096:8192]]
        assert c.read(0, 100) == target.data[:100]
        if target.structured:
            with pytest.raises(NbdCommandError) as err2:
                c.extents(SIZE - 4096, 8192)
            assert err2.value.command == "BLOCK_STATUS"
            assert c.extents(0, 4096)[0].length == 4096


def test_pool_raises_the_first_error_and_stays_usable(ours: Target) -> None:
    ranges = [(o, 65536) for o in range(0, SIZE, 65536)]
    ranges.insert(40, (SIZE - 100, 200))
    with NbdPool.connect(ours.host, ours.port, EXPORT, connections=3, timeout=10) as pool:
        seen = 0
        with pytest.raises(NbdCommandError, match="EINVAL"):
            for _ in pool.read_many(ranges, depth=4):
                seen += 1
        assert seen <= 40
        # Stopping early ends the threads too, and every connection still works afterwards.
        for _ in pool.read_many(ranges[:20]):
            break
        assert [bytes(v) for _, v in pool.read_many(ranges[:30])] == [
            ours.data[o : o + n] for o, n in ranges[:30]
        ]
        for client in pool.clients:
            assert client.read(0, 10) == ours.data[:10]

        def bad_ranges() -> Iterator[tuple[int, int]]:
            yield (0, 10)
            raise ValueError("broken range source")

        with pytest.raises(ValueError, match="broken range source"):
            list(pool.read_many(bad_ranges()))


def test_connection_refused_is_a_clear_error() -> None:
    port = free_port()
    with pytest.raises(NbdConnectError) as err:
        NbdClient.connect("127.0.0.1", port, EXPORT, timeout=5)
    assert str(err.value) == (
        f"cannot connect to NBD server 127.0.0.1:{port} (export {EXPORT!r}): connection refused "
        "(is the server running?)"
    )
    with pytest.raises(NbdConnectError):
        NbdPool.connect("127.0.0.1", port, EXPORT)


# ------------------------------------------------------------------------------------ scripted server


class Peer:
    """The server side of one scripted connection: the handshake done right, then the script."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.requests: list[tuple[int, int, int, int]] = []

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            piece = self.conn.recv(n - len(buf))
            if not piece:
                raise EOFError
            buf += piece
        return buf

    def handshake(self, *, structured: bool, size: int = SIZE) -> None:
        self.conn.sendall(
            p.GREETING.pack(p.INIT_MAGIC, p.OPTS_MAGIC, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        )
        self.recv(4)
        while True:
            _, option, length = p.OPTION_HEADER.unpack(self.recv(p.OPTION_HEADER.size))
            self.recv(length)
            if option == p.OPT_STRUCTURED_REPLY:
                self.conn.sendall(p.option_reply(option, p.REP_ACK if structured else p.REP_ERR_UNSUP))
            elif option == p.OPT_SET_META_CONTEXT:
                context = p.U32.pack(7) + p.META_BASE_ALLOCATION.encode()
                self.conn.sendall(
                    p.option_reply(option, p.REP_META_CONTEXT, context) + p.option_reply(option, p.REP_ACK)
                )
            elif option == p.OPT_GO:
                info = p.INFO_EXPORT_STRUCT.pack(p.INFO_EXPORT, size, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY)
                self.conn.sendall(
                    p.option_reply(option, p.REP_INFO, info) + p.option_reply(option, p.REP_ACK)
                )
                return
            else:
                self.conn.sendall(p.option_reply(option, p.REP_ERR_UNSUP))

    def request(self) -> tuple[int, int, int, int]:
        """The next request as (command, cookie, offset, length)."""
        _, _, command, cookie, offset, length = p.REQUEST.unpack(self.recv(p.REQUEST.size))
        self.requests.append((command, cookie, offset, length))
        return command, cookie, offset, length

    def data(self, cookie: int, offset: int, payload: bytes, *, done: bool = True) -> bytes:
        return p.chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(payload), done=done) + (
            p.OFFSET_DATA.pack(offset) + payload
        )

    def hole(self, cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
        return p.chunk_header(cookie, p.REPLY_TYPE_OFFSET_HOLE, 12, done=done) + p.OFFSET_HOLE.pack(
            offset, length
        )


Script = Callable[[Peer], None]


@contextlib.contextmanager
def scripted(
    script: Script, *, handshake: bool = True, structured: bool = True
) -> Iterator[tuple[int, list[Peer]]]:
    """A one-connection server on loopback running `script` after the handshake.

    Yields the port and a list that holds the connection's `Peer` once the client connected."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peers: list[Peer] = []

    def serve() -> None:
        conn, _ = listener.accept()
        peer = Peer(conn)
        peers.append(peer)
        with contextlib.suppress(OSError, EOFError):
            if handshake:
                peer.handshake(structured=structured)
            script(peer)
            while conn.recv(65536):  # keep the connection open until the client leaves
                pass
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield port, peers
    finally:
        listener.close()
        if peers:
            with contextlib.suppress(OSError):
                peers[0].conn.shutdown(socket.SHUT_RDWR)
        thread.join(5)


def connect(port: int, timeout: float = 5, structured: bool = True) -> NbdClient:
    return NbdClient.connect("127.0.0.1", port, EXPORT, timeout=timeout, structured=structured)


def test_chunks_out_of_order_and_interleaved_are_reassembled() -> None:
    payload = bytes(range(256)) * 32  # 8 KiB

    def script(peer: Peer) -> None:
        _, c1, o1, _ = peer.request()
        _, c2, o2, _ = peer.request()
        # The second request's reply first, and the chunks of both mixed, each reply in pieces.
        peer.conn.sendall(
            peer.data(c2, o2 + 4096, payload[4096:], done=False)
            + peer.hole(c1, o1 + 4096, 4096, done=False)
            + peer.data(c2, o2, payload[:4096], done=True)
            + peer.data(c1, o1, payload[:4096], done=False)
            + p.chunk_header(c1, p.REPLY_TYPE_NONE, 0, done=True)
        )

    with scripted(script) as (port, _), connect(port) as c:
        got = list(c.read_many([(0, 8192), (MiB, 8192)]))
        assert [(o, bytes(v)) for o, v in got] == [(0, payload[:4096] + bytes(4096)), (MiB, payload)]


def test_error_chunk_is_a_command_error_with_the_servers_message() -> None:
    def script(peer: Peer) -> None:
        _, cookie, _, _ = peer.request()
        peer.conn.sendall(p.error_chunk(cookie, p.EIO, "disk on fire"))
        _, cookie, offset, length = peer.request()
        peer.conn.sendall(peer.data(cookie, offset, b"x" * length))

    with scripted(script) as (port, _), connect(port) as c:
        with pytest.raises(NbdCommandError) as err:
            c.read(4096, 512)
        assert err.value.error == "EIO (Input/output error)"
        assert str(err.value) == (
            f"NBD server 127.0.0.1:{port}, export {EXPORT!r}: READ of [4096, +512) failed with "
            "EIO (Input/output error): disk on fire"
        )
        assert c.read(0, 3) == b"xxx"  # the connection goes on


def bad_reply(kind: str) -> Script:
    """A script answering the first READ wrongly in the way `kind` names."""

    def script(peer: Peer) -> None:
        _, cookie, offset, length = peer.request()
        reply = {
            "garbage": b"\xde\xad\xbe\xef" * 8,
            "outside": peer.data(cookie, offset + length - 10, b"y" * 20),
            "short": peer.data(cookie, offset, b"y" * (length // 2)),
            "gap": peer.data(cookie, offset, b"y" * 100, done=False)
            + peer.hole(cookie, offset + 200, length - 200),
            "overlap": peer.data(cookie, offset, b"y" * 100, done=False)
            + peer.data(cookie, offset + 50, b"z" * 50),
            "cookie": peer.data(cookie + 99, offset, b"y" * length),
            "mid-data": peer.data(cookie, offset, b"y" * length)[:-100],
            "mid-header": peer.data(cookie, offset, b"y" * length)[:10],
            "zero hole": peer.hole(cookie, offset, 0),
            "none with data": p.chunk_header(cookie, p.REPLY_TYPE_NONE, 4, done=True) + b"abcd",
            "unknown type": p.chunk_header(cookie, 77, 0, done=True),
            "simple with data": p.simple_reply(cookie) + b"y" * length,
        }[kind]
        peer.conn.sendall(reply)
        if kind.startswith("mid"):
            peer.conn.shutdown(socket.SHUT_RDWR)

    return script


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "bad reply magic 0xdeadbeef"),
        ("outside", r"data chunk \[4598, \+20\) outside the requested range of READ \[4096, \+512\)"),
        ("short", r"short read: the reply to READ \[4096, \+512\) has no data for offset 4352"),
        ("gap", "short read"),
        ("overlap", "overlapping chunks at offset 4146"),
        ("cookie", "cookie 100, which no request in flight has"),
        ("mid-data", r"closed the connection .* \(after 412 of 512 bytes of a frame\)"),
        ("mid-header", r"closed the connection .* \(after 10 of 20 bytes of a frame\)"),
        ("zero hole", "hole chunk"),
        ("none with data", "NBD_REPLY_TYPE_NONE chunk with 4 bytes"),
        ("unknown type", "unknown reply chunk type 77"),
        ("simple with data", "simple reply with data"),
    ],
)
def test_a_misbehaving_server_is_a_protocol_error(kind: str, message: str) -> None:
    with scripted(bad_reply(kind)) as (port, _), connect(port) as c:
        start = time.monotonic()
        with pytest.raises(NbdProtocolError, match=message) as err:
            c.read(4096, 512)
        assert time.monotonic() - start < 3  # detected, not waited out
        assert isinstance(err.value, p.ProtocolError)
        assert f"127.0.0.1:{port}" in str(err.value) and EXPORT in str(err.value)
        if kind.startswith("mid"):
            assert isinstance(err.value, NbdConnectionLost)
        # The connection cannot be trusted any more: later calls say so instead of reading garbage.
        with pytest.raises(NbdClientClosed, match="an earlier error broke it"):
            c.read(0, 1)


def test_short_simple_reply_then_close_is_a_lost_connection() -> None:
    def script(peer: Peer) -> None:
        _, cookie, _, length = peer.request()
        peer.conn.sendall(p.simple_reply(cookie) + b"q" * (length - 1))
        peer.conn.shutdown(socket.SHUT_RDWR)

    with scripted(script, structured=False) as (port, _), connect(port) as c:
        assert not c.structured and not c.has_allocation
        with pytest.raises(NbdConnectionLost, match="after 4095 of 4096 bytes"):
            c.read(0, 4096)


def test_garbage_greeting_is_a_protocol_error() -> None:
    def script(peer: Peer) -> None:
        peer.conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with (
        scripted(script, handshake=False) as (port, _),
        pytest.raises(NbdProtocolError, match="not an NBD server"),
    ):
        connect(port)


def test_a_silent_server_times_out_with_a_clear_error() -> None:
    def script(peer: Peer) -> None:
        peer.request()  # and never answer

    with scripted(script) as (port, _), connect(port, timeout=0.3) as c:
        start = time.monotonic()
        with pytest.raises(NbdTimeout) as err:
            c.read(0, 4096)
        assert time.monotonic() - start < 2
        assert str(err.value).startswith(f"no reply from NBD server 127.0.0.1:{port} within 0.3 s")


def test_close_sends_disc_and_the_client_refuses_further_use() -> None:
    def script(peer: Peer) -> None:
        _, cookie, offset, length = peer.request()
        peer.conn.sendall(peer.data(cookie, offset, b"d" * length))
        peer.request()

    with scripted(script) as (port, peers):
        c = connect(port)
        with c:
            assert c.read(0, 4) == b"dddd"
        deadline = time.monotonic() + 5
        while len(peers[0].requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r[0] for r in peers[0].requests] == [p.CMD_READ, p.CMD_DISC]
        with pytest.raises(NbdClientClosed, match="closed"):
            c.read(0, 4)
        c.close()  # idempotent

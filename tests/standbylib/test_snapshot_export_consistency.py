"""A snapshot exported over NBD reads as its frozen image while the origin is being overwritten.

Origin writes (`Volume.write_batch`: preserve the old blocks, as copies or, where they were holes, as
hole entries, then overwrite the origin) run in a loop on one thread while other threads read the
snapshot through read plans, `Snapshot.read`, raw NBD
sessions (simple and structured replies, many requests in flight, runs of contiguous reads) and
nbdcopy with four connections. Every byte read must be the frozen image: an origin range that a plan
chose to serve from the replica must not change before it is copied, and must never be sent by
reference (the kernel would send the later data).
"""

from __future__ import annotations

import hashlib
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from standbylib.blockdev import open_file_device
from standbylib.nbd import NbdServer
from standbylib.nbd import protocol as p
from standbylib.snapshot import PreservationStore, Snapshot

SIZE = 32 << 20
BS = 4096
DURATION = 3.0


class Client:
    """A raw NBD client with many requests in flight; checks every reply against `image`."""

    def __init__(self, address: tuple[str, int], export: str, *, structured: bool) -> None:
        self.sock = socket.create_connection(address, timeout=30)
        self.structured = structured
        assert p.GREETING.unpack(self.recv(p.GREETING.size))[:2] == (p.INIT_MAGIC, p.OPTS_MAGIC)
        self.sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        if structured:
            self.option(p.OPT_STRUCTURED_REPLY)
        replies = self.option(p.OPT_GO, p.pack_string(export) + p.U16.pack(0))
        assert replies[-1] == p.REP_ACK

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            piece = self.sock.recv(n - len(buf))
            if not piece:
                raise EOFError
            buf += piece
        return bytes(buf)

    def option(self, option: int, data: bytes = b"") -> list[int]:
        self.sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, option, len(data)) + data)
        kinds = []
        while True:
            _magic, _opt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
            self.recv(length)
            kinds.append(kind)
            if kind != p.REP_INFO:
                return kinds

    def read_many(self, ranges: list[tuple[int, int]]) -> dict[int, bytes]:
        """Send every READ at once, then collect the replies (in whatever order they come)."""
        self.sock.sendall(
            b"".join(
                p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, i, off, n) for i, (off, n) in enumerate(ranges)
            )
        )
        out: dict[int, bytearray] = {}
        done: set[int] = set()
        while len(done) < len(ranges):
            if not self.structured:
                magic, error, cookie = p.SIMPLE_REPLY.unpack(self.recv(p.SIMPLE_REPLY.size))
                assert (magic, error) == (p.SIMPLE_REPLY_MAGIC, 0)
                out[cookie] = bytearray(self.recv(ranges[cookie][1]))
                done.add(cookie)
                continue
            magic, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack(self.recv(p.STRUCTURED_REPLY.size))
            assert magic == p.STRUCTURED_REPLY_MAGIC
            payload = self.recv(length)
            start, n = ranges[cookie]
            buf = out.setdefault(cookie, bytearray(b"?" * n))
            if kind == p.REPLY_TYPE_OFFSET_DATA:
                (at,) = p.OFFSET_DATA.unpack_from(payload)
                buf[at - start : at - start + length - 8] = payload[8:]
            elif kind == p.REPLY_TYPE_OFFSET_HOLE:
                at, size = p.OFFSET_HOLE.unpack(payload)
                buf[at - start : at - start + size] = bytes(size)
            else:
                raise AssertionError(f"reply chunk type {kind}: {payload!r}")
            if flags & p.REPLY_FLAG_DONE:
                done.add(cookie)
        return {cookie: bytes(data) for cookie, data in out.items()}

    def close(self) -> None:
        self.sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
        self.sock.close()


def random_ranges(rng: random.Random) -> list[tuple[int, int]]:
    """Random reads, and a run of contiguous ones (the server plans those together)."""
    ranges = []
    for _ in range(8):
        off = rng.randrange(0, SIZE - 1)
        ranges.append((off, rng.randrange(1, min(SIZE - off, 512 << 10) + 1)))
    start = rng.randrange(0, SIZE // BS - 128) * BS
    ranges += [(start + i * (64 << 10), 64 << 10) for i in range(8)]
    return ranges


def test_snapshot_reads_are_the_frozen_image_while_the_origin_is_overwritten(tmp_path: Any) -> None:
    rng = random.Random(7)
    frozen = bytearray(rng.randbytes(SIZE))
    for off in range(3 << 20, SIZE, 4 << 20):  # holes the writer will fill: hole entries
        frozen[off : off + (1 << 20)] = bytes(1 << 20)
    frozen = bytes(frozen)
    store = PreservationStore.open(str(tmp_path / "store"), 4 * SIZE)
    origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
    vol = store.attach("vol", origin, block_size=BS)
    for off in range(0, SIZE, 1 << 20):
        if any(frozen[off : off + (1 << 20)]):
            vol.write(off, frozen[off : off + (1 << 20)])
    snap = vol.create_snapshot("s")
    server = NbdServer({"vol@s": snap})
    address = server.start()
    stop = threading.Event()
    failures: list[str] = []
    counts = {"writes": 0, "plan_reads": 0, "nbd_reads": 0}

    def writer() -> None:
        wrng = random.Random(1)
        while not stop.is_set():
            ops: list[tuple[int, bytes | int]] = []
            for _ in range(wrng.randrange(1, 4)):
                # Mostly small writes: first overwrites of blocks (the ones that move a block from
                # the origin to the store) keep happening for the whole test.
                off = wrng.randrange(0, SIZE - 1)
                n = wrng.randrange(1, min(SIZE - off, (256 << 10) if wrng.random() < 0.05 else 6 * BS) + 1)
                ops.append((off, n) if wrng.random() < 0.1 else (off, wrng.randbytes(n)))
            vol.write_batch(ops)
            counts["writes"] += 1

    def direct_reader(seed: int) -> None:
        rrng = random.Random(seed)
        while not stop.is_set():
            for _ in range(4):
                off = rrng.randrange(0, SIZE - 1)
                n = rrng.randrange(1, min(SIZE - off, 256 << 10) + 1)
                with snap.read_plan(off, n) as plan:
                    buf = bytearray(n)
                    time.sleep(0.002)  # a consumer may take its time: the plan must stay true
                    plan.readinto(memoryview(buf))
                if buf != frozen[off : off + n]:
                    failures.append(f"read plan [{off}, +{n})")
                if snap.read(off, n) != frozen[off : off + n]:
                    failures.append(f"Snapshot.read [{off}, +{n})")
                counts["plan_reads"] += 2

    def nbd_reader(seed: int, structured: bool) -> None:
        rrng = random.Random(seed)
        client = Client(address, "vol@s", structured=structured)
        while not stop.is_set():
            ranges = random_ranges(rrng)
            for cookie, data in client.read_many(ranges).items():
                off, n = ranges[cookie]
                if data != frozen[off : off + n]:
                    failures.append(f"NBD {'structured' if structured else 'simple'} [{off}, +{n})")
            counts["nbd_reads"] += len(ranges)
        client.close()

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=direct_reader, args=(s,)) for s in (1, 2, 3)]
    threads += [threading.Thread(target=nbd_reader, args=(s, s % 2 == 0)) for s in (4, 5, 6)]
    errors: list[BaseException] = []

    def guarded(run: Callable[..., None]) -> Callable[..., None]:
        def inner(*args: Any) -> None:
            try:
                run(*args)
            except BaseException as e:  # surfaced below
                errors.append(e)
                stop.set()

        return inner

    for t in threads:
        t._target = guarded(t._target)  # type: ignore[attr-defined]
        t.start()
    try:
        # A real client too, reading the whole export over four connections.
        deadline = time.monotonic() + DURATION
        copies = 0
        while time.monotonic() < deadline or copies == 0:
            out = tmp_path / "copy.img"
            subprocess.run(
                [
                    "nbdcopy",
                    "--connections=4",
                    "--threads=4",
                    f"nbd://{address[0]}:{address[1]}/vol@s",
                    str(out),
                ],
                check=True,
                timeout=60,
            )
            if hashlib.sha256(out.read_bytes()).digest() != hashlib.sha256(frozen).digest():
                failures.append("nbdcopy image")
            copies += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    try:
        assert not errors, errors
        assert not failures, failures[:10]
        # The race was really run: the origin changed a lot, and the snapshot kept the old blocks.
        assert counts["writes"] > 50, counts
        assert counts["plan_reads"] > 50 and counts["nbd_reads"] > 50, counts
        assert snap.info().preserved_blocks > 500 and snap.info().hole_blocks > 50, snap.info()
        assert vol.read(0, SIZE) != frozen
        assert snap.read(0, SIZE) == frozen
    finally:
        store.close()
        origin.close()


def test_a_snapshot_plan_is_never_zero_copy(tmp_path: Any) -> None:
    store = PreservationStore.open(str(tmp_path / "store"), SIZE)
    origin = open_file_device(str(tmp_path / "origin.img"), SIZE)
    snap: Snapshot = store.attach("vol", origin, block_size=BS).create_snapshot("s")
    with snap.read_plan(0, SIZE) as plan:
        assert not plan.zero_copy
    store.close()
    origin.close()

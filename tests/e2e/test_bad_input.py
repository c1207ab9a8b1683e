"""Hostile and malformed NBD traffic on a raw socket, against the standby's and the primary's NBD ports:
neither daemon crashes, each request error gets the errno of the spec (doc/proto.md of the
NetworkBlockDevice/nbd repository), no data changes, and both go on serving real clients afterwards."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from e2e_support import VOLUME_SIZE, Appliance, MiB, need, rand, run

pytestmark = pytest.mark.timeout(180)

# doc/proto.md
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
OPT_ABORT, OPT_GO = 2, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_UNKNOWN = (1 << 31) + 6
INFO_EXPORT = 0
FLAG_READ_ONLY = 1 << 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
EPERM, EINVAL, ENOSPC = 1, 22, 28


class RawNbd:
    """A deliberately minimal NBD client: fixed newstyle, OPT_GO, simple replies."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError(f"server closed the connection ({len(buf)} of {n} bytes)")
            buf += chunk
        return bytes(buf)

    def greeting(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT), "not a fixed newstyle NBD server"
        assert flags & FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return opt, rtype, self.recv(length)

    def go(self, name: str) -> tuple[int, int] | int:
        """OPT_GO: (size, transmission flags), or the error reply type."""
        raw = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == OPT_GO
            if rtype == REP_ACK:
                assert size is not None, "OPT_GO acknowledged without NBD_INFO_EXPORT"
                return size, flags  # type: ignore[return-value]
            if rtype & (1 << 31):
                return rtype
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, flags = struct.unpack(">QH", data[2:12])

    def request(self, cmd: int, offset: int, length: int, cookie: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload)

    def reply(self, cookie: int, data_length: int = 0) -> tuple[int, bytes]:
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert got == cookie, f"reply for cookie {got}, expected {cookie}"
        return error, (self.recv(data_length) if error == 0 and data_length else b"")

    def read(self, offset: int, length: int, cookie: int = 1) -> tuple[int, bytes]:
        self.request(CMD_READ, offset, length, cookie)
        return self.reply(cookie, length)

    def close(self) -> None:
        self.sock.close()


def hostile_sessions(address: str) -> None:
    """Garbage at every stage of a session; each connection is then dropped."""
    junk = rand(4096, seed=666)
    # 1. connect and vanish
    RawNbd(address).close()
    # 2. garbage instead of the client flags
    c = RawNbd(address)
    c.recv(18)
    c.sock.sendall(junk)
    c.close()
    # 3. an option with a bad magic
    c = RawNbd(address)
    c.greeting()
    c.sock.sendall(struct.pack(">QII", 0xDEADBEEF, OPT_GO, 8) + b"\0" * 8)
    c.close()
    # 4. an option announcing 4 GiB of data, then a few bytes and a hang-up
    c = RawNbd(address)
    c.greeting()
    c.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFFF) + junk[:100])
    c.close()
    # 5. OPT_GO whose name length points past the option's data
    c = RawNbd(address)
    c.greeting()
    c.option(OPT_GO, struct.pack(">I", 1 << 30) + b"vol0")
    c.close()
    # 6. client flags with bits nobody defined, then a half header
    c = RawNbd(address)
    c.recv(18)
    c.sock.sendall(struct.pack(">I", 0xFFFFFFFF) + struct.pack(">Q", IHAVEOPT)[:5])
    c.close()


def transmission_abuse(address: str, export: str, *, writable: bool) -> None:
    """Requests no well-behaved client sends, on a negotiated export; checks the errno of each and that the
    connection survives request errors."""
    c = RawNbd(address)
    c.greeting()
    # an unknown option is answered ERR_UNSUP and negotiation goes on
    c.option(0x7777, b"xyz")
    opt, rtype, _ = c.option_reply()
    assert (opt, rtype) == (0x7777, REP_ERR_UNSUP), f"unknown option answered {rtype:#x}"
    # an unknown export is refused and negotiation goes on
    assert c.go("no-such-export") == REP_ERR_UNKNOWN
    got = c.go(export)
    assert isinstance(got, tuple), f"OPT_GO {export} refused with {got:#x}"
    size, flags = got
    assert size == VOLUME_SIZE
    assert bool(flags & FLAG_READ_ONLY) is (not writable), f"{export}: read-only flag {flags:#x}"

    err, _ = c.read(VOLUME_SIZE - 4096, 8192, cookie=2)
    assert err == EINVAL, f"read past the end: errno {err}, expected EINVAL"
    err, _ = c.read(1 << 62, 4096, cookie=3)
    assert err == EINVAL, f"read at 2**62: errno {err}, expected EINVAL"
    c.request(99, 0, 4096, cookie=4)  # unknown command
    err, _ = c.reply(4)
    assert err == EINVAL, f"unknown command: errno {err}, expected EINVAL"

    payload = rand(8192, seed=7)
    if writable:
        c.request(CMD_WRITE, VOLUME_SIZE - 4096, 8192, cookie=5, payload=payload)
        err, _ = c.reply(5)
        assert err == ENOSPC, f"write past the end: errno {err}, expected ENOSPC"
    else:
        c.request(CMD_WRITE, 0, 8192, cookie=5, payload=payload)
        err, _ = c.reply(5)
        assert err == EPERM, f"write to a read-only export: errno {err}, expected EPERM"
    # the connection survived every request error: a plain read still works
    err, data = c.read(0, 4096, cookie=6)
    assert err == 0 and len(data) == 4096, f"the connection did not survive request errors (errno {err})"
    c.close()

    # a write whose payload never comes, then a hang-up: nothing of it may be applied
    c = RawNbd(address)
    c.greeting()
    assert isinstance(c.go(export), tuple)
    c.request(CMD_WRITE, 0, 1 * MiB, cookie=7, payload=payload[:1000])
    c.close()
    # a request with a bad magic ends the session (the server may not guess where the next one starts)
    c = RawNbd(address)
    c.greeting()
    assert isinstance(c.go(export), tuple)
    c.sock.sendall(struct.pack(">IHHQQI", 0xBADBAD, 0, CMD_WRITE, 8, 0, 4096) + payload[:4096])
    c.close()
    # an oversize write (1 GiB announced) and a hang-up
    c = RawNbd(address)
    c.greeting()
    assert isinstance(c.go(export), tuple)
    c.request(CMD_WRITE, 0, 1 << 30, cookie=9, payload=payload)
    c.close()


def test_hostile_traffic_to_the_standby_changes_nothing_and_crashes_nothing(appliance: Appliance) -> None:
    need("qemu-img")
    a = appliance
    a.writer.write(0, rand(2 * MiB, seed=1))
    a.standby.snapshot("vol0", "ro")
    a.standby.snapshot("vol0", "rw", "--writable")
    frozen = a.model.freeze()
    expected = a.model.save(a.tmp / "expected.img")

    hostile_sessions(a.standby.nbd)
    transmission_abuse(a.standby.nbd, "vol0@ro", writable=False)
    transmission_abuse(a.standby.nbd, "vol0@rw", writable=True)

    assert a.standby.daemon.alive(), f"the standby died:\n{a.standby.daemon.tail()}"
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, a.standby.uri("vol0@ro"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, a.standby.uri("vol0@rw"))
    assert a.standby.replica("vol0").read_bytes() == frozen
    # replication still works
    a.writer.fill(MiB, MiB, 0x6B)
    assert a.standby.replica("vol0").read_bytes() == a.model.freeze()


def test_hostile_traffic_to_the_primary_changes_nothing_and_crashes_nothing(appliance: Appliance) -> None:
    need("qemu-img")
    a = appliance
    a.writer.write(0, rand(2 * MiB, seed=2))

    hostile_sessions(a.primary.nbd)
    transmission_abuse(a.primary.nbd, "vol0", writable=True)

    assert a.primary.daemon.alive(), f"the primary died:\n{a.primary.daemon.tail()}"
    assert a.standby.daemon.alive(), f"the standby died:\n{a.standby.daemon.tail()}"
    assert a.volume_path.read_bytes() == a.model.freeze(), "hostile traffic changed the primary's volume"
    assert a.standby.replica("vol0").read_bytes() == a.model.freeze(), "hostile traffic changed the replica"
    # and it still serves a real client, and still mirrors
    a.writer.write(5 * MiB, rand(MiB, seed=3))
    expected = a.model.save(a.tmp / "expected.img")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, a.primary.uri("vol0"))
    assert a.standby.replica("vol0").read_bytes() == a.model.freeze()
    assert os.path.getsize(a.standby.replica("vol0")) == VOLUME_SIZE

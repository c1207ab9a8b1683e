"""Command flags, read-only exports and the 64 MiB request limit, as real clients see them.

libnbd's Python bindings (``nbdsh``, Debian package python3-libnbd) send requests with any command
flags once ``set_strict_mode(0)`` turns off its own checks, so each flag a command does not allow is
sent for real: the server must answer EINVAL and go on serving the connection (as nbdkit and
nbd-server do). nbdinfo and qemu-io check what read-only exports advertise; a raw socket sends what
libnbd refuses to (a request above 64 MiB).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from blockfiles import ForwardingDevice

from standbylib.blockdev import BlockDevice, Device, open_file_device, ram_device
from standbylib.nbd import NbdServer
from standbylib.nbd import protocol as p
from standbylib.nbd.handshake import MAX_REQUEST
from standbylib.snapshot import PreservationStore

MiB = 1 << 20
SIZE = 4 * MiB
BIG = 128 * MiB  # room for a 64 MiB request
BS = 4096


def need(*tools: str) -> None:
    """Fail (never skip) when a client tool is missing, naming its Debian package."""
    packages = {"nbdsh": "python3-libnbd", "nbdinfo": "libnbd-bin", "qemu-io": "qemu-utils"}
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install the Debian package {packages[tool]}", pytrace=False)


def nbdsh(script: str, timeout: float = 120) -> Any:
    """Run `script` in nbdsh (``nbd`` imported, ``h`` an unconnected handle); its last line of output
    is JSON, returned decoded.

    nbdsh runs the ``python3`` found first on PATH, which must be the one python3-libnbd installed
    into (the system's), not a virtual environment's."""
    need("nbdsh")
    env = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))
    cp = subprocess.run(
        ["nbdsh", "-c", script], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert cp.returncode == 0, f"nbdsh failed ({cp.returncode}):\n{cp.stdout}\n{cp.stderr}"
    return json.loads(cp.stdout.strip().splitlines()[-1])


# Prepended to nbdsh scripts: run one request, record "ok" or the errno name the server answered.
ATTEMPT = """
import json
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except nbd.Error as e:
        out[name] = e.errno
"""


def session(uri: str, body: str, *, structured: bool = True) -> str:
    """An nbdsh script: connect `h` to `uri` (base:allocation, structured replies unless told), switch
    off libnbd's own checks, run `body` (which fills the dict ``out``, with `attempt` or directly),
    disconnect and print ``out`` as JSON."""
    return (
        ATTEMPT
        + f"h.set_request_structured_replies({structured})\n"
        + 'h.add_meta_context("base:allocation")\n'
        + f"h.connect_uri({uri!r})\n"
        + "h.set_strict_mode(0)\n"
        + body
        + "h.shutdown()\nprint(json.dumps(out))\n"
    )


def pattern(tag: int, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


class NoPlans(ForwardingDevice):
    """A device without read plans (its READs are served by the worker pool), with extents."""

    closes_inner = False

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        return self.inner.extents(offset, length)


@dataclass
class Env:
    url: str
    rw_path: Path
    rw: Device
    ro_image: bytes

    def uri(self, name: str) -> str:
        return f"{self.url}/{name}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    rw_path = tmp_path / "rw.img"
    rw = open_file_device(str(rw_path), SIZE)
    rw.write(0, pattern(1, SIZE // 2))  # the second half stays a hole
    ro_path = tmp_path / "ro.img"
    ro_path.write_bytes(pattern(2, SIZE))
    ro = open_file_device(str(ro_path), readonly=True)
    store = PreservationStore.in_memory(4 * SIZE)
    vol = store.attach("vol0", ram_device(SIZE), block_size=BS)
    vol.write(0, pattern(3, SIZE))
    snap = vol.create_snapshot("s1")
    devices: dict[str, BlockDevice] = {"rw": rw, "ro": ro, "vol0@s1": snap, "noplan": NoPlans(rw)}
    server = NbdServer(devices)
    host, port = server.start()
    try:
        yield Env(f"nbd://{host}:{port}", rw_path, rw, pattern(2, SIZE))
    finally:
        server.stop()
        rw.close()
        ro.close()
        store.close()


# ------------------------------------------------------------------------------- command flags


def test_a_flag_its_command_does_not_allow_gets_einval_and_the_connection_goes_on(env: Env) -> None:
    fua, no_hole, df, req_one, fast_zero = 1, 2, 4, 8, 16
    script = session(
        env.uri("rw"),
        f"""
ignore = lambda *args: 0
attempt("read_fua", lambda: h.pread(4096, 0, {fua}))
attempt("read_df", lambda: h.pread(4096, 0, {df}))
attempt("read_no_hole", lambda: h.pread(4096, 0, {no_hole}))
attempt("read_req_one", lambda: h.pread(4096, 0, {req_one}))
attempt("read_fast_zero", lambda: h.pread(4096, 0, {fast_zero}))
attempt("read_unknown", lambda: h.pread(4096, 0, 0x20))
attempt("read_high_bit", lambda: h.pread(4096, 0, 0x8000))
attempt("write_fua", lambda: h.pwrite(b"\\x11" * 4096, 0, {fua}))
attempt("write_no_hole", lambda: h.pwrite(b"\\x22" * 4096, 4096, {no_hole}))
attempt("write_df", lambda: h.pwrite(b"\\x22" * 4096, 4096, {df}))
attempt("write_req_one", lambda: h.pwrite(b"\\x22" * 4096, 4096, {req_one}))
attempt("zero_fua_no_hole", lambda: h.zero(4096, 8192, {fua | no_hole}))
attempt("zero_fast_zero", lambda: h.zero(4096, 12288, {fast_zero}))
attempt("zero_df", lambda: h.zero(4096, 12288, {df}))
attempt("trim_fua", lambda: h.trim(4096, 16384, {fua}))
attempt("trim_no_hole", lambda: h.trim(4096, 20480, {no_hole}))
attempt("flush_fua", lambda: h.flush({fua}))
attempt("flush_req_one", lambda: h.flush({req_one}))
attempt("status_req_one", lambda: h.block_status(65536, 0, ignore, {req_one}))
attempt("status_fua", lambda: h.block_status(65536, 0, ignore, {fua}))
attempt("status_df", lambda: h.block_status(65536, 0, ignore, {df}))
attempt("status_no_hole", lambda: h.block_status(65536, 0, ignore, {no_hole}))
out["after"] = h.pread(32768, 0).hex()
out["can"] = [h.can_fua(), h.can_flush(), h.can_trim(), h.can_zero(), h.can_df(), h.can_fast_zero()]
""",
    )
    out = nbdsh(script)
    after = bytes.fromhex(out.pop("after"))
    assert out.pop("can") == [True, True, True, True, True, False]
    assert out == {
        # FUA is valid on every command once SEND_FUA is advertised (doc/proto.md: "MUST accept")
        "read_fua": "ok",
        "read_df": "ok",
        "read_no_hole": "EINVAL",
        "read_req_one": "EINVAL",
        "read_fast_zero": "EINVAL",
        "read_unknown": "EINVAL",
        "read_high_bit": "EINVAL",
        "write_fua": "ok",
        "write_no_hole": "EINVAL",
        "write_df": "EINVAL",
        "write_req_one": "EINVAL",
        "zero_fua_no_hole": "ok",
        "zero_fast_zero": "EINVAL",  # FAST_ZERO is not advertised
        "zero_df": "EINVAL",
        "trim_fua": "ok",
        "trim_no_hole": "EINVAL",
        "flush_fua": "ok",
        "flush_req_one": "EINVAL",
        "status_req_one": "ok",
        "status_fua": "ok",
        "status_df": "EINVAL",
        "status_no_hole": "EINVAL",
    }
    # Only the accepted writes happened: 4 KiB of 0x11, 4 KiB of the old data (the refused writes),
    # 4 KiB of zeros (write zeroes), 4 KiB old, 4 KiB of zeros (trim), 12 KiB old.
    old = pattern(1, SIZE // 2)
    want = b"\x11" * 4096 + old[4096:8192] + bytes(4096) + old[12288:16384] + bytes(4096) + old[20480:32768]
    assert after == want
    assert env.rw.read(0, 32768) == want


def test_write_zeroes_with_no_hole_leaves_the_range_allocated(env: Env) -> None:
    hole = SIZE // 2 + 64 * 1024  # inside the file's hole
    assert env.rw.extents(hole, 65536) == [(65536, True)]
    script = session(
        env.uri("rw"),
        f"""
attempt("no_hole", lambda: h.zero(65536, {hole}, 2))
attempt("plain", lambda: h.zero(65536, 0))
h.flush()
out["data"] = h.pread(65536, {hole}) == bytes(65536) and h.pread(65536, 0) == bytes(65536)
""",
    )
    assert nbdsh(script) == {"no_hole": "ok", "plain": "ok", "data": True}
    assert env.rw.extents(hole, 65536) == [(65536, False)], "NO_HOLE must not leave a hole"
    assert env.rw.extents(0, 65536) == [(65536, True)], "a plain write zeroes may punch a hole"


@pytest.mark.parametrize("export", ["rw", "noplan"])
def test_df_reads_come_as_one_data_chunk_and_need_structured_replies(env: Env, export: str) -> None:
    # [SIZE/2 - 64 KiB, SIZE/2 + 64 KiB) of "rw" is data then hole: two chunks without DF, one with
    # it. "rw" is read on the connection's thread (read plans), "noplan" in the worker pool.
    half = 65536
    start = SIZE // 2 - half
    script = session(
        env.uri(export),
        f"""
def read(flags):
    chunks = []
    def chunk(buf, offset, status, error):
        chunks.append([offset, len(buf), status])
        return 0
    data = h.pread_structured({2 * half}, {start}, chunk, flags)
    return chunks, data.hex()
out["plain"], plain = read(0)
out["df"], df = read(4)
out["same"] = plain == df
""",
    )
    out = nbdsh(script)
    assert out["plain"] == [[start, half, 1], [start + half, half, 2]]
    assert out["df"] == [[start, 2 * half, 1]]
    assert out["same"]
    # Without structured replies DF is not advertised, and a READ carrying it is refused.
    body = """
out["can_df"] = h.can_df()
attempt("df", lambda: h.pread(4096, 0, 4))
attempt("plain", lambda: h.pread(4096, 0))
"""
    simple = session(env.uri(export), body, structured=False)
    assert nbdsh(simple) == {"can_df": False, "df": "EINVAL", "plain": "ok"}


# ------------------------------------------------------------------------------- read-only exports


@pytest.mark.parametrize("export", ["ro", "vol0@s1"])
def test_read_only_exports_advertise_no_write_commands(env: Env, export: str) -> None:
    need("nbdinfo", "qemu-io")
    info = json.loads(subprocess.run(
        ["nbdinfo", "--json", env.uri(export)], capture_output=True, text=True, check=True, timeout=30
    ).stdout)["exports"][0]  # fmt: skip
    assert info["is_read_only"] is True
    for can in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"):
        assert info[can] is False, f"{export} advertises {can}"
    assert info["can_multi_conn"] is True
    assert info["can_df"] is True
    # qemu opens it read-only and reads it.
    res = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", env.uri(export), "-c", "read 0 64k"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0 and "read 65536/65536 bytes" in res.stdout, res.stdout + res.stderr


def test_writes_to_a_read_only_export_still_get_eperm(env: Env) -> None:
    script = session(
        env.uri("ro"),
        """
attempt("write", lambda: h.pwrite(b"x" * 4096, 0))
attempt("zero", lambda: h.zero(4096, 0))
attempt("trim", lambda: h.trim(4096, 0))
attempt("write_fua", lambda: h.pwrite(b"x" * 4096, 0, 1))
attempt("read_fua", lambda: h.pread(4096, 0, 1))
attempt("flush", lambda: h.flush())
out["read"] = h.pread(4096, 0).hex()
""",
    )
    out = nbdsh(script)
    assert bytes.fromhex(out.pop("read")) == env.ro_image[:4096]
    assert out == {
        "write": "EPERM",
        "zero": "EPERM",
        "trim": "EPERM",
        "write_fua": "EPERM",
        "read_fua": "EINVAL",  # SEND_FUA is not advertised
        "flush": "ok",  # not advertised, harmless: nothing to make durable
    }


# ------------------------------------------------------------------------------- 64 MiB requests


@pytest.fixture
def big(tmp_path: Path) -> Iterator[tuple[str, Device, Any]]:
    """A 128 MiB file export "file" and a writable snapshot "vol0@w" of a 128 MiB volume."""
    dev = open_file_device(str(tmp_path / "big.img"), BIG)
    store = PreservationStore.in_memory(3 * BIG)
    vol = store.attach("vol0", ram_device(BIG), block_size=BS)
    vol.write(0, pattern(9, 4 * MiB))
    snap = vol.create_snapshot("w", writable=True)
    with NbdServer({"file": dev, "vol0@w": snap}) as server:
        assert server.address is not None
        host, port = server.address
        yield f"nbd://{host}:{port}", dev, vol
    dev.close()
    store.close()


def test_64_mib_is_advertised_and_served_both_ways(big: tuple[str, Device, Any]) -> None:
    url, dev, vol = big
    data = pattern(10, MAX_REQUEST)
    digest = hashlib.sha256(data).hexdigest()
    for export in ("file", "vol0@w"):
        script = session(
            f"{url}/{export}",
            f"""
import hashlib, random
data = random.Random(10).randbytes({MAX_REQUEST})
out["max"] = h.get_block_size(nbd.SIZE_MAXIMUM)
h.pwrite(data, {3 * MiB})
out["read"] = hashlib.sha256(h.pread({MAX_REQUEST}, {3 * MiB})).hexdigest()
""",
        )
        assert nbdsh(script) == {"max": MAX_REQUEST, "read": digest}, export
    assert hashlib.sha256(dev.read(3 * MiB, MAX_REQUEST)).hexdigest() == digest
    # The writable snapshot took the write; its origin did not.
    assert vol.read(0, 4 * MiB) == pattern(9, 4 * MiB)
    assert vol.read(4 * MiB, 4 * MiB) == bytes(4 * MiB)


def test_a_request_above_64_mib_gets_einval_and_the_connection_goes_on(big: tuple[str, Device, Any]) -> None:
    url, dev, _vol = big
    host, port = url.removeprefix("nbd://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        f = s.makefile("rb")

        def recv(n: int) -> bytes:
            data = f.read(n)
            assert len(data) == n
            return data

        recv(p.GREETING.size)
        s.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
        s.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_EXPORT_NAME, 4) + b"file")
        size, _flags = p.EXPORT_NAME_REPLY.unpack(recv(p.EXPORT_NAME_REPLY.size))
        assert size == BIG
        too_big = MAX_REQUEST + BS
        s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_WRITE, 1, 0, too_big))
        s.sendall(b"\x77" * too_big)  # consumed and dropped, not taken for requests
        s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 2, 0, too_big))
        s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 3, 0, 8))
        replies = {}
        for _ in range(3):
            magic, error, cookie = p.SIMPLE_REPLY.unpack(recv(p.SIMPLE_REPLY.size))
            assert magic == p.SIMPLE_REPLY_MAGIC
            replies[cookie] = (error, recv(8) if cookie == 3 and not error else b"")
        assert replies == {1: (p.EINVAL, b""), 2: (p.EINVAL, b""), 3: (0, bytes(8))}
    assert dev.extents(0, BIG) == [(BIG, True)], "the refused write wrote something"

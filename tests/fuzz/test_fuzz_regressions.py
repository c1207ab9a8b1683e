"""Regression tests for the bugs the fuzzers found, each reduced to the smallest input that showed it."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from standby.node import StandbyNode
from standbylib.blockdev import ram_device
from standbylib.errors import InvalidArgument
from standbylib.nbd import NbdServer
from standbylib.nbd import protocol as p
from standbylib.snapshot import PreservationStore

MiB = 1 << 20


def _wait(ok: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _unread(sock: socket.socket) -> int:
    """Bytes that arrived on `sock` and were not read yet (FIONREAD)."""
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return value


def _negotiate(sock: socket.socket, export: bytes) -> None:
    def recv(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            assert chunk, "server closed during negotiation"
            out += chunk
        return out

    recv(p.GREETING.size)
    sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    data = p.U32.pack(len(export)) + export + p.U16.pack(0)
    sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_GO, len(data)) + data)
    while True:
        _magic, _opt, kind, length = p.OPTION_REPLY.unpack(recv(p.OPTION_REPLY.size))
        recv(length)
        assert not kind & p.REP_FLAG_ERROR, f"GO refused: {kind:#x}"
        if kind == p.REP_ACK:
            return


def test_a_client_resetting_the_connection_during_a_large_snapshot_read_is_no_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by test_fuzz_nbd (case_drop): a client asks for a read, then a larger one, and resets the
    connection without reading the replies. Sending the first reply to make room for the second one
    failed with ECONNRESET inside the read path, which took it for a failed read: "unexpected error in
    command 0" with a traceback at ERROR level, and an error reply queued for a gone client."""
    size = 64 * MiB
    store = PreservationStore.in_memory(size)
    vol = store.attach("vol0", ram_device(size), block_size=4096)
    vol.write(0, os.urandom(size))
    snap = vol.create_snapshot("s")  # snapshots read through copied plans (never zero_copy)
    server = NbdServer({"vol0@s": snap})
    host, port = server.start()
    caplog.set_level(logging.DEBUG, logger="standbylib.nbd")
    try:
        for _ in range(3):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server blocks
            sock.settimeout(10)
            sock.connect((host, port))
            _negotiate(sock, b"vol0@s")
            sock.sendall(
                p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 0, 4 * MiB - 4096)
                + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_READ, 2, 8 * MiB, 32 * MiB)
            )
            # The first reply's bytes arrive: the server is sending it to make room for the second, and
            # blocks there (4 MiB into our 4 KiB window) until the reset.
            _wait(lambda s=sock: _unread(s) > 0, "the first reply")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        # The server met the resets and ended the three connections by itself (what it logged is in).
        _wait(lambda: not server._connections, "the server to end the reset connections")
    finally:
        server.stop()
        store.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "a client going away was logged as a server error: " + "; ".join(
        r.getMessage() for r in errors
    )


@pytest.mark.parametrize("size", [(1 << 63) - 4096, (1 << 64) - 4096, 1 << 50])
def test_a_handshake_with_a_size_the_filesystem_cannot_hold_is_invalid_and_leaves_nothing(
    tmp_path: Path, size: int
) -> None:
    """Found by test_fuzz_grpc (Handshake with boundary sizes): a size beyond what the filesystem (or a
    file offset) can hold raised DeviceError or OverflowError, answered INTERNAL, left an empty replica
    file behind and leaked its file descriptor."""
    node = StandbyNode(str(tmp_path / "data"), capacity="16MiB")
    try:
        fds = len(os.listdir("/proc/self/fd"))
        for i in range(5):
            with pytest.raises(InvalidArgument, match="more than the standby's filesystem can hold"):
                node.handshake(f"big{i}", size, 4096)
        assert len(os.listdir("/proc/self/fd")) == fds, "file descriptors leaked"
        assert os.listdir(tmp_path / "data" / "replicas") == [], "replica files left behind"
        assert node.replicas() == []
        replica, created, _full = node.handshake("small", MiB, 4096)
        assert created and replica.size == MiB
    finally:
        node.close()


@pytest.mark.parametrize("bad", ["garbage", "second-open"])
def test_a_bad_message_on_a_mirror_stream_with_received_acks_is_invalid_argument_not_internal(
    tmp_path: Path, bad: str
) -> None:
    """Found by test_fuzz_grpc (Mirror, garbled): with `received_acks` the requests are read on a thread
    of their own; a message that did not parse (the call aborted INVALID_ARGUMENT by the parser) or a
    second `open` came back to the servicer as an unknown exception and ended the call INTERNAL, logged
    as an internal error."""
    import grpc

    from standby import services
    from standbylib.rpc.v1 import replication_pb2
    from standbylib.runtime.rpc import create_server

    node = StandbyNode(str(tmp_path / "data"), capacity="16MiB")
    server, (host, port), _health = create_server(("127.0.0.1", 0), lambda s: services.register(s, node, "-"))
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        node.handshake("v", MiB, 4096)
        opened = replication_pb2.MirrorRequest(
            open=replication_pb2.MirrorOpen(volume="v", first_sequence=1, primary_id="p", received_acks=True)
        ).SerializeToString()
        batch = replication_pb2.MirrorRequest(
            batch=replication_pb2.Batch(
                sequence=1, writes=[replication_pb2.Write(offset=0, data=b"x" * 4096)]
            )
        ).SerializeToString()
        wrong = b"\x0a\xff\xff\xff\xff\x0f" if bad == "garbage" else opened
        call = channel.stream_stream(
            "/standbyappliance.v1.Replication/Mirror",
            request_serializer=lambda b: b,
            response_deserializer=replication_pb2.MirrorReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([opened, batch, wrong]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        # the stream was released: the next one may open the volume
        replies = list(call(iter([opened, batch]), timeout=30))
        assert [r.sequence for r in replies if not r.received] == [1]
    finally:
        channel.close()
        server.stop(0)
        node.close()

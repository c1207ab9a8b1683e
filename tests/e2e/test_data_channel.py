"""The standby's data channel (standby/datachannel.py) against a real `standby-daemon` on loopback.

Hostile connections to the data listener are refused (an error frame with the gRPC code of the failure
where the protocol still allows one, then the connection closes), logged (`data_channel_refused` with
its reason), counted (`standby_data_channel_refusals_total{reason}`), apply nothing (the replica of a
volume written through a good session first keeps its bytes, `standbyctl status` its applied bytes),
and leave the daemon serving: `standbyctl status` answers and a real `standby-primary` mirrors.
Then TLS and mutual TLS on the listener; the listener's connection limit, and a real primary outlasting
a flood of idle connections; a primary that requires the channel of a standby without one; and 64
volumes mirrored at once on each transport, with the gRPC transport's stream limit.

The attacks speak the wire protocol by hand (e2e_support: `RawReplication`, `DataConnection`).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import (
    BS,
    CTL_CMD,
    Daemon,
    Daemons,
    DataConnection,
    MiB,
    RawReplication,
    Standby,
    _console,
    batch_frame,
    data_address,
    frame,
    hello,
    qemu_io,
    rand,
    run,
)
from tls_support import Pair, Pki, _leaf, make_pki

from standby.datachannel import HELLO_LIMIT, HELLO_SECONDS, MAX_HELLOS, TOKEN_SECONDS
from standby.services import GRPC_STREAM_LIMIT
from standbylib.rpc.frames import MAX_FRAME
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2
from standbylib.rpc.wire import varint

pytestmark = pytest.mark.timeout(300)

VOL = "v1"
VOL_SIZE = MiB
REASONS = ("tls", "hello", "token", "certificate", "protocol", "timeout", "limit")
#: What a good session writes to `v1` before the attacks: the bytes the replica must keep.
GOOD_WRITES = [(0, rand(16 * BS, seed=1)), (64 * BS, rand(4 * BS, seed=2)), (VOL_SIZE - BS, rand(BS, seed=3))]
#: What every hostile batch tries to write: found in the replica, it was applied.
EVIL = b"\xee" * BS
JUNK = rand(4096, seed=66)


def few(cases: Any, keep: int = 3) -> list[Any]:
    """The cases of a family in order: the first `keep` in `make test`, all of them in `make soak`."""
    return [c if i < keep else pytest.param(c, marks=pytest.mark.soak) for i, c in enumerate(sorted(cases))]


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def evil_write(offset: int = 0) -> bytes:
    """A well-formed `Write` of `EVIL` at `offset`, as an entry of `Batch.writes`."""
    return field_bytes(2, replication_pb2.Write(offset=offset, data=EVIL).SerializeToString())


def evil_batch(sequence: int = 1) -> bytes:
    """The frame of a well-formed batch writing `EVIL` at offset 0."""
    return batch_frame(sequence, [(0, EVIL)], flush=True)


def request_frame(**kind: Any) -> bytes:
    return frame(replication_pb2.MirrorRequest(**kind).SerializeToString())


# ------------------------------------------------------------------------------------------ the rig


@dataclass
class Rig:
    """A standby with volume `v1` written through a good data channel session; what it must hold."""

    daemons: Daemons
    standby: Standby
    raw: RawReplication
    data: str
    tmp: Path
    tls: ssl.SSLContext | None = None
    primary_args: tuple[str, ...] = ()
    image: bytearray = field(default_factory=lambda: bytearray(VOL_SIZE))
    applied_bytes: int = 0
    primaries: int = 0

    @property
    def daemon(self) -> Daemon:
        return self.standby.daemon

    def connect(
        self, offer: replication_pb2.DataChannelOffer | None = None, tls: ssl.SSLContext | None = None
    ) -> DataConnection:
        where = (offer.host, offer.port) if offer is not None else self.data
        return DataConnection(where, tls or self.tls)

    def session(self, writes: list[tuple[int, bytes]], volume: str = VOL) -> None:
        """A well-behaved session: one batch, applied and acknowledged; the image follows."""
        offer = self.raw.offer(volume)
        assert f"{offer.host}:{offer.port}" == self.data, (
            f"offered {offer.host}:{offer.port}, listening {self.data}"
        )
        assert len(offer.token) >= 16, f"a token of {len(offer.token)} bytes"
        conn = self.connect(offer)
        try:
            conn.send(hello(offer.token) + batch_frame(1, writes, flush=True))
            reply = conn.reply()
            assert reply is not None and not reply.error_code, f"a good batch was not applied: {reply}"
            assert (reply.sequence, reply.durable) == (1, True), reply
        finally:
            conn.close()
        if volume == VOL:
            for offset, data in writes:
                self.image[offset : offset + len(data)] = data
                self.applied_bytes += len(data)
        # The session is over once the standby let the volume go.
        self.wait_volume(volume, lambda v: not v["connected"], "disconnected after its session")

    def status(self) -> dict[str, Any]:
        """The Status RPC's volumes (what `standbyctl status --json` prints of them)."""
        reply = control_pb2_grpc.ControlStub(self.raw.channel).Status(control_pb2.StatusRequest(), timeout=30)
        keys = ("name", "state", "connected", "applied_bytes", "last_error")
        return {"volumes": [{k: getattr(v, k) for k in keys} for v in reply.volumes]}

    def volume(self, volume: str = VOL) -> dict[str, Any]:
        vols: dict[str, dict[str, Any]] = {v["name"]: v for v in self.status()["volumes"]}
        assert volume in vols, f"the Status RPC does not list {volume}: {sorted(vols)}"
        return vols[volume]

    def wait_volume(
        self, volume: str, ok: Callable[[dict[str, Any]], bool], what: str, timeout: float = 20.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            v = self.volume(volume)
            if ok(v):
                return v
            assert time.monotonic() < deadline, f"{volume} not {what} within {timeout:.0f} s: {v}"
            time.sleep(0.1)

    def refusals(self) -> dict[str, float]:
        m = self.standby.metrics()
        return {r: m.get("standby_data_channel_refusals_total", reason=r) for r in REASONS}

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.daemon.events)
            if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait_logged(self, count: int, event: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """The `count`-th event `event` with `fields` (the log is read by a thread: it may lag)."""
        deadline = time.monotonic() + timeout
        while len(found := self.logged(event, **fields)) < count:
            assert time.monotonic() < deadline, (
                f"the standby did not log {event} {fields} ({count} times) within {timeout:.0f} s:\n"
                f"{self.daemon.tail(20)}"
            )
            time.sleep(0.05)
        return found[count - 1]

    def before(self) -> Before:
        return Before(
            self.refusals(), {r: len(self.logged("data_channel_refused", reason=r)) for r in REASONS}
        )

    def assert_unchanged(self, what: str) -> None:
        """Nothing of `what` reached the replica of `v1`."""
        got = self.standby.replica(VOL).read_bytes()
        if got != bytes(self.image):
            bad = [o for o in range(0, VOL_SIZE, BS) if got[o : o + BS] != self.image[o : o + BS]]
            evil = [o for o in bad if got[o : o + BS] == EVIL]
            raise AssertionError(
                f"{what} changed the replica of {VOL}: {len(bad)} blocks differ, first at {bad[:8]} "
                f"({len(evil)} hold the hostile batch's data)"
            )
        v = self.volume()
        assert v["applied_bytes"] == self.applied_bytes, (
            f"{what}: the Status RPC shows {v['applied_bytes']} applied bytes for {VOL}, "
            f"{self.applied_bytes} were sent by good sessions"
        )

    def assert_clean_log(self) -> None:
        assert not self.logged("internal_error"), self.logged("internal_error")
        tracebacks = [line for line in self.daemon.lines if "Traceback" in line or "Exception in" in line]
        assert not tracebacks, f"the standby printed a traceback:\n{self.daemon.tail(40)}"

    def assert_serving(self) -> None:
        """The daemon is alive, answers `standbyctl status`, a real primary mirrors to it through the
        data channel, and a good session of `v1` still applies."""
        assert self.daemon.alive(), f"the standby died:\n{self.daemon.tail()}"
        listed = {v["name"]: v for v in ctl_status(self)["volumes"]}
        assert listed[VOL]["applied_bytes"] == self.applied_bytes, listed[VOL]
        self.primaries += 1
        name = f"p{self.primaries}"
        path = self.tmp / f"{name}.img"
        content = rand(2 * MiB, seed=100 + self.primaries)
        path.write_bytes(content)
        primary = self.daemons.primary(
            self.standby, {name: f"{path},size=2MiB,block-size={BS}"}, *self.primary_args
        )
        connected = primary.daemon.wait_for("mirror_connected", volume=name)
        assert connected.get("transport") == "channel", connected
        assert self.standby.replica(name).read_bytes() == content, "a real primary could not mirror"
        self.session([(8 * BS, rand(BS, seed=self.primaries))])
        self.assert_unchanged("a good session after the attacks")
        self.assert_clean_log()


@dataclass
class Before:
    refusals: dict[str, float]
    logged: dict[str, int]


def ctl_status(rig: Rig) -> dict[str, Any]:
    """`standbyctl status --json` (with the client files of a TLS rig)."""
    tls = rig.primary_args if rig.tls is not None else ()
    args = ["--standby", rig.standby.grpc, "--timeout", "20", *tls, "status", "--json"]
    return dict(json.loads(run(*_console(*CTL_CMD), *args, timeout=60).stdout))


def start_rig(
    daemons: Daemons,
    tmp: Path,
    *standby_args: str,
    credentials: grpc.ChannelCredentials | None = None,
    tls: ssl.SSLContext | None = None,
    primary_args: tuple[str, ...] = (),
) -> Rig:
    standby = daemons.standby(None, *standby_args)
    raw = RawReplication(standby.grpc, credentials)
    raw.handshake(VOL, VOL_SIZE)
    rig = Rig(daemons, standby, raw, data_address(standby), tmp, tls, primary_args)
    rig.session(GOOD_WRITES)
    rig.assert_unchanged("the good session")
    return rig


@pytest.fixture
def rig(daemons: Daemons, tmp_path: Path) -> Iterator[Rig]:
    r = start_rig(daemons, tmp_path)
    try:
        yield r
    finally:
        r.raw.close()


def check_refused(
    rig: Rig,
    before: Before,
    replies: list[replication_pb2.MirrorReply],
    reason: str,
    code: str | None,
    what: str,
    *,
    count: int = 1,
) -> dict[str, Any]:
    """The connection was refused: the one error frame `code` (None: none expected), no acknowledgement,
    logged and counted under `reason` (`count` times), nothing applied. The (last) log event."""
    acks = [r for r in replies if not r.error_code]
    assert not acks, f"{what}: the standby acknowledged batches: {acks}"
    codes = [r.error_code for r in replies]
    if code is None:
        assert codes == [], f"{what}: error frames {codes} where none was expected"
    else:
        assert codes == [code], f"{what}: error frames {codes}, expected one {code}"
        assert replies[0].error, f"{what}: the error frame has no message: {replies[0]}"
    event = rig.wait_logged(before.logged[reason] + count, "data_channel_refused", reason=reason)
    assert str(event.get("peer", "")).startswith("127.0.0.1:"), event
    assert event.get("error"), event
    want = dict(before.refusals)
    want[reason] += count
    after = rig.refusals()
    assert after == want, f"{what}: refusals counted {after}, expected {want}"
    rig.assert_unchanged(what)
    return event


class GrpcStream:
    """A Mirror call on the gRPC transport (no data channel), its requests sent one by one."""

    def __init__(self, raw: RawReplication, volume: str, first_sequence: int = 1) -> None:
        self._requests: queue.Queue[replication_pb2.MirrorRequest | None] = queue.Queue()
        opening = replication_pb2.MirrorOpen(volume=volume, first_sequence=first_sequence, primary_id="raw")
        self._requests.put(replication_pb2.MirrorRequest(open=opening))
        self.call = raw.stub.Mirror(iter(self._requests.get, None), timeout=240)

    def send(self, sequence: int, writes: list[tuple[int, bytes]]) -> None:
        batch = replication_pb2.Batch(
            sequence=sequence, writes=[replication_pb2.Write(offset=o, data=d) for o, d in writes]
        )
        self._requests.put(replication_pb2.MirrorRequest(batch=batch))

    def reply(self) -> replication_pb2.MirrorReply:
        reply: replication_pb2.MirrorReply = next(self.call)
        return reply

    def failure(self) -> grpc.RpcError:
        """The error that ends the call (it must end with one)."""
        try:
            while True:
                next(self.call)
        except grpc.RpcError as e:
            return e
        except StopIteration:
            pytest.fail("the Mirror call ended with OK, an error was expected", pytrace=False)

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


# ------------------------------------------------------------------------------------------ before the hello


BEFORE_HELLO = {
    # a frame that is not a MirrorRequest
    "junk_frame": (frame(b"\xff" * 7 + JUNK[:200]), "INVALID_ARGUMENT"),
    # bytes without framing: their first four announce a length of 489 MB
    "unframed_junk": (JUNK, "INVALID_ARGUMENT"),
    "absurd_length": (b"\xff\xff\xff\xff" + JUNK[:100], "INVALID_ARGUMENT"),
    "hello_over_its_limit": (hello(bytes(HELLO_LIMIT)), "INVALID_ARGUMENT"),
    "empty_frame": (frame(b""), "INVALID_ARGUMENT"),
    "batch_first": (evil_batch(), "INVALID_ARGUMENT"),
    "open_first": (
        request_frame(open=replication_pb2.MirrorOpen(volume=VOL, first_sequence=1, data_channel=True)),
        "INVALID_ARGUMENT",
    ),
    # half a frame, then the client shuts its side
    "eof_in_a_frame": (b"\x00\x00", "UNAVAILABLE"),
    "eof_at_once": (b"", "UNAVAILABLE"),
}


@pytest.mark.parametrize("case", few(BEFORE_HELLO))
def test_garbage_instead_of_a_hello_is_refused(rig: Rig, case: str) -> None:
    data, code = BEFORE_HELLO[case]
    before = rig.before()
    conn = rig.connect()
    if code == "UNAVAILABLE":
        conn.send(data)
        conn.sock.shutdown(socket.SHUT_WR)
    else:
        conn.send(data + evil_batch())  # a batch right behind: it must not be applied
    replies = conn.replies_until_closed(HELLO_SECONDS + 10)
    check_refused(rig, before, replies, "hello", code, case)
    rig.assert_serving()


def test_unknown_tokens_are_refused(rig: Rig) -> None:
    before = rig.before()
    replies = []
    for token in (rand(32, seed=5), b"", bytes(32), rand(HELLO_LIMIT - 64, seed=6)):
        conn = rig.connect()
        conn.send(hello(token) + evil_batch())
        replies += conn.replies_until_closed()
    assert [r.error_code for r in replies] == ["PERMISSION_DENIED"] * 4, replies
    check_refused(rig, before, replies[:1], "token", "PERMISSION_DENIED", "unknown tokens", count=4)
    assert "token" in replies[0].error, replies[0]
    rig.assert_serving()


def test_a_token_is_good_for_one_connection_only(rig: Rig) -> None:
    offer = rig.raw.offer(VOL)
    first = rig.connect(offer)
    first.send(hello(offer.token) + batch_frame(1, [(4 * BS, rand(BS, seed=7))], flush=True))
    reply = first.reply()
    assert reply is not None and reply.sequence == 1 and not reply.error_code, reply
    rig.image[4 * BS : 5 * BS] = rand(BS, seed=7)
    rig.applied_bytes += BS

    # While the first connection's session runs, and after it ended: the token is spent.
    before = rig.before()
    second = rig.connect(offer)
    second.send(hello(offer.token) + evil_batch(2))
    check_refused(rig, before, second.replies_until_closed(), "token", "PERMISSION_DENIED", "a token reused")
    first.send(batch_frame(2, [(5 * BS, rand(BS, seed=8))]))
    reply = first.reply()
    assert reply is not None and reply.sequence == 2 and not reply.error_code, reply
    rig.image[5 * BS : 6 * BS] = rand(BS, seed=8)
    rig.applied_bytes += BS
    first.close()
    rig.wait_volume(VOL, lambda v: not v["connected"], "disconnected")

    before = rig.before()
    third = rig.connect(offer)
    third.send(hello(offer.token) + evil_batch(3))
    check_refused(rig, before, third.replies_until_closed(), "token", "PERMISSION_DENIED", "a spent token")
    rig.assert_serving()


def test_an_unused_token_gives_its_volume_to_the_next_stream(rig: Rig) -> None:
    offer = rig.raw.offer(VOL)
    assert rig.volume()["connected"], "the volume is not claimed while its token is out"
    # A new stream of the volume, on the gRPC transport: it gets the volume, the token is void.
    stream = GrpcStream(rig.raw, VOL)
    try:
        data = rand(2 * BS, seed=9)
        stream.send(1, [(10 * BS, data)])
        reply = stream.reply()
        assert reply.sequence == 1, reply
        rig.image[10 * BS : 12 * BS] = data
        rig.applied_bytes += len(data)
    finally:
        stream.close()
    unused = rig.wait_logged(1, "data_channel_unused", volume=VOL)
    assert "new stream" in unused.get("reason", ""), unused
    rig.wait_volume(VOL, lambda v: not v["connected"], "disconnected")

    before = rig.before()
    conn = rig.connect(offer)
    conn.send(hello(offer.token) + evil_batch())
    check_refused(rig, before, conn.replies_until_closed(), "token", "PERMISSION_DENIED", "a revoked token")
    rig.assert_serving()


def test_a_silent_client_is_cut_after_the_hello_timeout_and_an_unused_token_expires(rig: Rig) -> None:
    """Both take `HELLO_SECONDS` / `TOKEN_SECONDS` (10 s): run side by side, while other clients are
    served."""
    rig.raw.handshake("v2", VOL_SIZE)
    before = rig.before()
    offered = time.monotonic()
    stale = rig.raw.offer("v2")
    assert rig.volume("v2")["connected"], "v2 is not claimed while its token is out"
    slow = rig.connect()
    slow.send(b"\x00")  # one byte of a frame header, then nothing
    started = time.monotonic()

    # Meanwhile other connections are served: sessions of v1, refusals, status.
    for i in range(3):
        rig.session([(20 * BS + i * BS, rand(BS, seed=20 + i))])
    other = rig.connect()
    other.send(hello(b"not a token"))
    assert [r.error_code for r in other.replies_until_closed()] == ["PERMISSION_DENIED"]
    assert time.monotonic() - started < HELLO_SECONDS - 1, "the test is too slow to show anything"

    replies = slow.replies_until_closed(HELLO_SECONDS + 15)
    cut = time.monotonic() - started
    assert HELLO_SECONDS - 0.5 <= cut <= HELLO_SECONDS + 3, f"the silent client was cut after {cut:.1f} s"
    before.refusals["token"] += 1
    before.logged["token"] += 1
    event = check_refused(rig, before, replies, "timeout", "DEADLINE_EXCEEDED", "a silent client")
    assert "hello" in event["error"], event

    unused = rig.wait_logged(1, "data_channel_unused", volume="v2")
    expired = time.monotonic() - offered
    assert expired >= TOKEN_SECONDS - 0.5, f"the token expired after {expired:.1f} s"
    assert unused.get("level") == "warning", unused
    assert not rig.volume("v2")["connected"], "the expired token still holds v2"
    before = rig.before()
    conn = rig.connect(stale)
    conn.send(hello(stale.token) + evil_batch())
    check_refused(rig, before, conn.replies_until_closed(), "token", "PERMISSION_DENIED", "an expired token")
    assert not any(rig.standby.replica("v2").read_bytes()), "the expired token's batch reached v2"
    rig.session([(0, rand(BS, seed=30))], volume="v2")
    rig.assert_serving()


# ------------------------------------------------------------------------------------------ after the hello


@pytest.mark.parametrize("length", [0xFFFFFFFF, MAX_FRAME + 1], ids=["4GiB", "max_frame_plus_1"])
def test_an_absurd_length_after_the_hello_is_refused(rig: Rig, length: int) -> None:
    before = rig.before()
    offer = rig.raw.offer(VOL)
    conn = rig.connect(offer)
    conn.send(hello(offer.token) + length.to_bytes(4, "big") + JUNK)
    check_refused(
        rig, before, conn.replies_until_closed(), "protocol", "INVALID_ARGUMENT", "an absurd length"
    )
    rig.wait_volume(VOL, lambda v: not v["connected"], "released")
    rig.assert_serving()


def _malformed() -> dict[str, bytes]:
    good = b"\x08\x01" + evil_write()  # sequence 1, EVIL at 0
    past = b"\x08\x00\x12" + varint(2 * BS) + EVIL  # a data field announcing twice what follows
    return {
        # the batch ends inside a varint (flush = 0x80...)
        "truncated_varint_in_batch": field_bytes(2, good + b"\x18\x80"),
        # the message ends inside a varint (an unknown field's value)
        "truncated_varint_at_the_end": field_bytes(2, good) + b"\x28\xff\xff",
        "varint_of_11_bytes": field_bytes(2, good + b"\x18" + b"\x80" * 10 + b"\x01"),
        "write_data_past_its_write": field_bytes(2, good + field_bytes(2, past)),
        "write_past_its_batch": field_bytes(2, good + b"\x12" + varint(10 * BS) + evil_write(BS)),
        "batch_past_the_frame": b"\x12" + varint(len(good) + 100) + good,
        "two_batches": field_bytes(2, good) + field_bytes(2, b"\x08\x02" + evil_write(BS)),
        "end_group_tag": field_bytes(2, good + b"\x4c"),
        "wire_type_7": field_bytes(2, good + b"\x4f\x00"),
    }


MALFORMED = _malformed()


@pytest.mark.parametrize("case", few(MALFORMED))
def test_a_malformed_batch_is_refused_whole(rig: Rig, case: str) -> None:
    before = rig.before()
    offer = rig.raw.offer(VOL)
    conn = rig.connect(offer)
    conn.send(hello(offer.token) + frame(MALFORMED[case]) + evil_batch(2))
    check_refused(rig, before, conn.replies_until_closed(), "protocol", "INVALID_ARGUMENT", case)
    rig.wait_volume(VOL, lambda v: not v["connected"], "released")
    rig.assert_serving()


NOT_BATCHES = {
    "hello_again": lambda token: hello(token),
    "open": lambda token: request_frame(open=replication_pb2.MirrorOpen(volume=VOL, first_sequence=1)),
    "empty_message": lambda token: frame(b""),
    "unknown_field_only": lambda token: frame(b"\x28\x01"),
}


@pytest.mark.parametrize("case", few(NOT_BATCHES))
def test_a_frame_that_is_not_a_batch_after_the_hello_is_refused(rig: Rig, case: str) -> None:
    before = rig.before()
    offer = rig.raw.offer(VOL)
    conn = rig.connect(offer)
    conn.send(hello(offer.token) + NOT_BATCHES[case](offer.token) + evil_batch())
    check_refused(rig, before, conn.replies_until_closed(), "protocol", "INVALID_ARGUMENT", case)
    rig.assert_serving()


INVALID_BATCHES = {
    "past_the_end": (1, [(0, EVIL), (VOL_SIZE, EVIL)], "OUT_OF_RANGE"),
    "straddling_the_end": (1, [(0, EVIL), (VOL_SIZE - BS, EVIL + EVIL)], "OUT_OF_RANGE"),
    "offset_near_2_64": (1, [(0, EVIL), ((1 << 64) - BS, EVIL)], "OUT_OF_RANGE"),
    "misaligned_offset": (1, [(0, EVIL), (512, EVIL)], "INVALID_ARGUMENT"),
    "partial_block": (1, [(0, EVIL), (BS, EVIL[:100])], "INVALID_ARGUMENT"),
    "empty_write": (1, [(0, EVIL), (BS, b"")], "INVALID_ARGUMENT"),
    "sequence_gap": (2, [(0, EVIL)], "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", few(INVALID_BATCHES))
def test_an_invalid_batch_gets_the_code_it_gets_on_grpc(rig: Rig, case: str) -> None:
    sequence, writes, code = INVALID_BATCHES[case]
    # The gRPC stream's answer to the same batch.
    stream = GrpcStream(rig.raw, VOL)
    try:
        stream.send(sequence, writes)
        failure = stream.failure()
    finally:
        stream.close()
    assert failure.code().name == code, f"gRPC answered {failure.code().name}: {failure.details()}"
    rig.assert_unchanged(f"{case} on gRPC")
    rig.wait_volume(VOL, lambda v: not v["connected"], "released")

    refused_before = rig.standby.metrics().get(
        "standby_replication_refusals_total", volume=VOL, reason="invalid_request"
    )
    offer = rig.raw.offer(VOL)
    conn = rig.connect(offer)
    conn.send(hello(offer.token) + batch_frame(sequence, writes, flush=True) + evil_batch(sequence + 1))
    replies = conn.replies_until_closed()
    assert [r.error_code for r in replies] == [code], f"the data channel answered {replies}"
    assert replies[0].error == failure.details(), (replies[0].error, failure.details())
    rig.assert_unchanged(f"{case} on the data channel")
    refused = rig.standby.metrics().get(
        "standby_replication_refusals_total", volume=VOL, reason="invalid_request"
    )
    assert refused == refused_before + 1, f"refusals of {VOL}: {refused_before} -> {refused}"
    assert rig.volume()["last_error"] == failure.details()
    rig.assert_serving()


@pytest.mark.parametrize("received_acks", [False, True], ids=["applied_acks", "received_acks"])
def test_batches_applied_before_a_refused_one_are_acknowledged_before_the_error(
    rig: Rig, received_acks: bool
) -> None:
    """As on the gRPC stream, where each applied batch is acknowledged before the status ends the call:
    the primary learns what the standby holds (acknowledgements may be cumulative)."""
    first, second = rand(2 * BS, seed=80), rand(BS, seed=81)
    offer = rig.raw.offer(VOL, received_acks=received_acks)
    conn = rig.connect(offer)
    conn.send(
        hello(offer.token)
        + batch_frame(1, [(40 * BS, first)])
        + batch_frame(2, [(50 * BS, second)])
        + batch_frame(3, [(VOL_SIZE, EVIL)])  # out of range: refused
        + evil_batch(4)
    )
    replies = conn.replies_until_closed()
    rig.image[40 * BS : 42 * BS] = first
    rig.image[50 * BS : 51 * BS] = second
    rig.applied_bytes += 3 * BS
    rig.assert_unchanged("two good batches and a refused one")  # the two good ones were applied
    errors = [r.error_code for r in replies if r.error_code]
    assert errors == ["OUT_OF_RANGE"], replies
    applied = [r.sequence for r in replies if not r.error_code and not r.received]
    before_error = [r.sequence for r in replies[: replies.index(next(r for r in replies if r.error_code))]]
    assert applied and max(applied) == 2, f"applied batches 1 and 2 acknowledged as {applied}: {replies}"
    assert 2 in before_error or received_acks, f"the acknowledgement of 2 came after the error: {replies}"
    rig.assert_serving()


@pytest.mark.parametrize("received_acks", [False, True], ids=["applied_acks", "received_acks"])
def test_a_sequence_beyond_64_bits_is_refused_not_a_crash(rig: Rig, received_acks: bool) -> None:
    """Protobuf reads a varint of more than 64 bits modulo 2**64; a standby that takes such a sequence
    as it is may apply it, and then cannot encode its acknowledgement (a uint64)."""
    top = (1 << 64) - 1
    offer = rig.raw.offer(VOL, first_sequence=top, received_acks=received_acks)
    conn = rig.connect(offer)
    last = rand(BS, seed=40)
    conn.send(hello(offer.token) + batch_frame(top, [(30 * BS, last)], flush=True))
    while (reply := conn.reply()) is not None and reply.received:
        pass
    assert reply is not None and reply.sequence == top and not reply.error_code, f"batch {top}: {reply}"
    rig.image[30 * BS : 31 * BS] = last
    rig.applied_bytes += BS

    beyond = field_bytes(2, b"\x08" + b"\x80" * 9 + b"\x02" + evil_write())  # sequence 2**64
    conn.send(frame(beyond))
    conn.sock.shutdown(socket.SHUT_WR)  # the session ends after it, unless the standby ends it first
    rest = [r for r in conn.replies_until_closed() if not r.received]
    # Refused, or read as protobuf reads it: 2**64 mod 2**64 = 0, an old batch, skipped (its
    # acknowledgement, of sequence 0, may be left out at the end of the session).
    refused = [r.error_code for r in rest] == ["INVALID_ARGUMENT"]
    skipped = all(r.sequence == 0 and not r.error_code for r in rest)
    assert refused or skipped, f"the batch numbered 2**64 was answered {rest}"
    rig.assert_unchanged("a batch numbered 2**64")
    rig.assert_clean_log()
    # The replica's record of the stream is still one a handshake can report.
    reply = rig.raw.handshake(VOL, VOL_SIZE)
    assert reply.volume == VOL
    rig.assert_serving()


# ------------------------------------------------------------------------------------------ TLS


@dataclass(frozen=True)
class Certificates:
    pki: Pki
    second_client: Pair  # signed by the appliance's CA, like `pki.client`: valid, but another one


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    d = tmp_path_factory.mktemp("pki")
    pki = make_pki(d)
    ca_key = pki.ca.with_name("ca-key.pem")
    assert ca_key.is_file(), f"tls_support keeps the CA key elsewhere than {ca_key}"
    second = _leaf(d, "second-client", (pki.ca, ca_key), "second.example", "extendedKeyUsage=clientAuth")
    return Certificates(pki, second)


def server_files(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca)]


def client_files(pki: Pki, pair: Pair | None = None) -> tuple[str, ...]:
    pair = pair or pki.client
    return ("--tls-ca", str(pki.ca), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key))


def client_context(pki: Pki, pair: Pair | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def credentials(pki: Pki, pair: Pair | None) -> grpc.ChannelCredentials:
    if pair is None:
        return grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes())


def tls_rig(daemons: Daemons, tmp: Path, pki: Pki, *, mutual: bool) -> Rig:
    pair = pki.client if mutual else None
    rig = start_rig(
        daemons,
        tmp,
        *server_files(pki),
        *(["--require-client-cert"] if mutual else []),
        credentials=credentials(pki, pair),
        tls=client_context(pki, pair),
        primary_args=client_files(pki) if mutual else ("--tls-ca", str(pki.ca)),
    )
    listening = rig.daemon.wait_for("listening", service="data")
    assert listening.get("tls") == ("mutual" if mutual else "on"), listening
    return rig


def test_a_tls_data_listener_refuses_plain_tcp_and_serves_tls_primaries(
    daemons: Daemons, tmp_path: Path, certs: Certificates
) -> None:
    rig = tls_rig(daemons, tmp_path, certs.pki, mutual=False)
    offer = rig.raw.offer(VOL)
    before = rig.before()
    plain = DataConnection(rig.data)
    plain.send(hello(offer.token) + evil_batch())
    replies = plain.replies_until_closed()
    check_refused(rig, before, replies, "tls", None, "a plain TCP client")
    # The token the plain client showed was never read: it still opens a TLS session.
    conn = rig.connect(offer)
    data = rand(BS, seed=50)
    conn.send(hello(offer.token) + batch_frame(1, [(40 * BS, data)]))
    reply = conn.reply()
    assert reply is not None and reply.sequence == 1 and not reply.error_code, reply
    conn.close()
    rig.image[40 * BS : 41 * BS] = data
    rig.applied_bytes += BS
    rig.wait_volume(VOL, lambda v: not v["connected"], "released")
    rig.assert_serving()  # a real primary with --tls-ca mirrors through the TLS data channel


def test_mutual_tls_refuses_a_data_connection_with_another_certificate(
    daemons: Daemons, tmp_path: Path, certs: Certificates
) -> None:
    pki = certs.pki
    rig = tls_rig(daemons, tmp_path, pki, mutual=True)

    # The token was asked for with `pki.client`; `second_client` (same CA, valid) presents it.
    offer = rig.raw.offer(VOL)
    before = rig.before()
    intruder = rig.connect(offer, client_context(pki, certs.second_client))
    intruder.send(hello(offer.token) + evil_batch())
    intruder_replies = intruder.replies_until_closed()
    assert not [r for r in intruder_replies if not r.error_code], intruder_replies
    event = rig.wait_logged(before.logged["certificate"] + 1, "data_channel_refused", reason="certificate")
    assert event.get("error"), event
    want = dict(before.refusals)
    want["certificate"] += 1
    assert rig.refusals() == want
    rig.assert_unchanged("a data connection with another client certificate")
    rig.wait_volume(VOL, lambda v: not v["connected"], "released after the refused certificate")
    # The token is spent: the right certificate cannot use it afterwards either.
    before = rig.before()
    late = rig.connect(offer)
    late.send(hello(offer.token) + evil_batch())
    late_replies = late.replies_until_closed()
    assert not [r for r in late_replies if not r.error_code], late_replies
    rig.wait_logged(before.logged["token"] + 1, "data_channel_refused", reason="token")

    # Without a client certificate, or with one of another CA: no TLS session at all.
    for pair, what in ((None, "no client certificate"), (pki.other_client, "another CA's certificate")):
        before = rig.before()
        ctx = client_context(pki, pair)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            conn = DataConnection(rig.data, ctx)
            conn.send(hello(rand(32, seed=51)) + evil_batch())
            assert not [r for r in conn.replies_until_closed() if not r.error_code], what
        check_refused(rig, before, [], "tls", None, what)

    rig.assert_serving()  # a real primary with the right certificate mirrors through the data channel

    # Refusals after the TLS handshake carry their error frame, as they do on plain TCP.
    assert [r.error_code for r in intruder_replies] == ["PERMISSION_DENIED"], (
        f"the connection with another certificate got {intruder_replies} instead of a PERMISSION_DENIED "
        "error frame"
    )
    assert [r.error_code for r in late_replies] == ["PERMISSION_DENIED"], late_replies


TLS_REFUSALS: dict[str, tuple[bytes, str, str]] = {
    "unknown_token": (hello(rand(32, seed=52)), "token", "PERMISSION_DENIED"),
    "hello_over_its_limit": (hello(bytes(HELLO_LIMIT)), "hello", "INVALID_ARGUMENT"),
    "batch_first": (evil_batch(), "hello", "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", sorted(TLS_REFUSALS))
def test_a_refusal_after_the_tls_handshake_sends_its_error_frame(
    daemons: Daemons, tmp_path: Path, certs: Certificates, case: str
) -> None:
    data, reason, code = TLS_REFUSALS[case]
    rig = tls_rig(daemons, tmp_path, certs.pki, mutual=False)
    before = rig.before()
    conn = rig.connect()
    conn.send(data + evil_batch())
    check_refused(rig, before, conn.replies_until_closed(), reason, code, f"{case} over TLS")


def test_a_tls_handshake_that_trickles_is_cut_at_the_hello_timeout(
    daemons: Daemons, tmp_path: Path, certs: Certificates
) -> None:
    """`HELLO_SECONDS` bounds "a new connection's TLS handshake and hello" (standby/datachannel.py): a
    client that sends its ClientHello one byte a second must not hold a connection for longer."""
    rig = tls_rig(daemons, tmp_path, certs.pki, mutual=False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(certs.pki, None).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    client_hello = outgoing.read()
    assert len(client_hello) > 2 * (HELLO_SECONDS + 5), "a ClientHello too short for the test"
    before = rig.before()
    host, port = rig.data.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=1)
    started = time.monotonic()
    closed_after = None
    try:
        for byte in client_hello:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass  # nothing from the standby for a second: the next byte
            except OSError:
                closed_after = time.monotonic() - started
                break
            if time.monotonic() - started > HELLO_SECONDS + 5:
                break
    finally:
        sock.close()
    assert closed_after is not None, (
        f"a client trickling its TLS ClientHello held its connection for {time.monotonic() - started:.0f} s; "
        f"the handshake and hello are bounded by {HELLO_SECONDS:g} s"
    )
    assert closed_after <= HELLO_SECONDS + 3, f"cut after {closed_after:.1f} s"
    reason = "timeout" if rig.refusals()["timeout"] > before.refusals["timeout"] else "tls"
    check_refused(rig, before, [], reason, None, "a trickling TLS handshake")


# ------------------------------------------------------------------------------------------ limits


#: Where the floods of idle connections come from: another host, as far as the standby can tell.
FLOOD_SOURCE = "127.0.0.2"


def test_idle_connections_beyond_the_limit_are_closed_at_once_and_the_standby_serves_on(rig: Rig) -> None:
    """One address holds at most `MAX_HELLOS` connections that have not said hello; more are closed at
    once, logged once and counted, and connections from other addresses are served meanwhile."""
    idle = [DataConnection(rig.data, rig.tls, source=FLOOD_SOURCE) for _ in range(MAX_HELLOS)]
    try:
        rig.wait_volume(VOL, lambda v: True, "listed")  # status answers with the flood on
        before = rig.before()
        limit_before = rig.standby.metrics().get("standby_limit_reached_total", limit="data_channel_hellos")
        extra = []
        for _ in range(2):
            conn = DataConnection(rig.data, rig.tls, source=FLOOD_SOURCE)
            conn.send(evil_batch())
            extra.append(conn.replies_until_closed(10))
        assert extra == [[], []], f"connections over the limit were answered: {extra}"
        event = rig.wait_logged(1, "limit_reached", limit="data_channel_hellos")
        assert event.get("value") == MAX_HELLOS, event
        m = rig.standby.metrics()
        limit = m.get("standby_limit_reached_total", limit="data_channel_hellos")
        assert limit == limit_before + 2, f"limit counted {limit_before} -> {limit}"
        want = dict(before.refusals)
        want["limit"] += 2
        assert rig.refusals() == want
        assert len(rig.logged("limit_reached", limit="data_channel_hellos")) == 1, "logged per connection"
        rig.assert_unchanged("connections over the limit")
        rig.assert_serving()  # from another address, a session opens and applies during the flood
    finally:
        for conn in idle:
            conn.close()
    rig.wait_logged(MAX_HELLOS, "data_channel_refused", reason="hello", timeout=60)
    rig.assert_serving()


def primary_tracebacks(daemon: Daemon) -> list[str]:
    return [line for line in daemon.lines if "Traceback" in line or line.startswith("Exception in")]


def test_a_primary_mirrors_through_a_flood_of_idle_connections_from_another_host(
    daemons: Daemons, tmp_path: Path
) -> None:
    """Anyone who reaches the data listener can open connections that never say hello; they take at
    most `MAX_HELLOS` places per address, so a primary on another host still mirrors during the flood."""
    standby = daemons.standby()
    data = data_address(standby)
    flood = [DataConnection(data, source=FLOOD_SOURCE) for _ in range(MAX_HELLOS)]
    try:
        over = DataConnection(data, source=FLOOD_SOURCE)
        assert over.replies_until_closed(10) == [], "a connection over the limit was answered"
        standby.daemon.wait_for("limit_reached", limit="data_channel_hellos")
        path = tmp_path / "p.img"
        content = rand(2 * MiB, seed=70)
        path.write_bytes(content)
        primary = daemons.primary(standby, {"p": f"{path},size=2MiB,block-size={BS}"})
        assert primary.daemon.wait_for("mirror_connected", volume="p").get("transport") == "channel"
        assert standby.replica("p").read_bytes() == content
    finally:
        for conn in flood:
            conn.close()
    assert not primary_tracebacks(primary.daemon), (
        f"the primary printed a traceback:\n{primary.daemon.tail(40)}"
    )


def test_a_channel_primary_against_a_standby_without_data_listener_is_refused_and_says_why(
    daemons: Daemons, tmp_path: Path
) -> None:
    standby = daemons.standby(None, "--data-listen", "off")
    assert not [e for e in standby.daemon.events if e.get("service") == "data"], "a data listener is up"
    path = tmp_path / "p.img"
    path.write_bytes(rand(MiB, seed=71))
    primary = daemons.primary(
        standby, {"p": f"{path},size=1MiB,block-size={BS}"}, "--transport", "channel", in_sync=False
    )
    refused = primary.daemon.wait_for("mirror_disconnected", timeout=30, volume="p")
    assert refused.get("state") == "refused", refused
    assert "FAILED_PRECONDITION" in refused.get("error", ""), refused
    assert "--transport auto" in refused.get("error", ""), refused
    assert not primary_tracebacks(primary.daemon), (
        f"the primary printed a traceback:\n{primary.daemon.tail(40)}"
    )
    assert primary.metrics().get("standby_replication_connected", volume="p") == 0
    # An auto primary of the same standby falls back to the gRPC stream.
    other = tmp_path / "q.img"
    other.write_bytes(rand(MiB, seed=72))
    auto = daemons.primary(standby, {"q": f"{other},size=1MiB,block-size={BS}"}, "--transport", "auto")
    assert auto.daemon.wait_for("mirror_connected", volume="q").get("transport") == "grpc"
    assert standby.replica("q").read_bytes() == other.read_bytes()


# ------------------------------------------------------------------------------------------ scale

SCALE_VOLUMES = 64
STATUS_SECONDS = 5.0


class BackgroundWrites:
    """Keeps writing (qemu-io, flushed) to some volumes of a primary until stopped."""

    def __init__(self, nbd: str, volumes: list[str]) -> None:
        self.nbd = nbd
        self.volumes = volumes
        self.rounds = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for i, name in enumerate(self.volumes):
                    pattern = (self.rounds * 7 + i) % 255 + 1
                    offset = (self.rounds * 5 + i) % 64 * BS
                    qemu_io(f"nbd://{self.nbd}/{name}", f"write -P {pattern} {offset} {4 * BS}", "flush")
                self.rounds += 1
        except BaseException as e:  # reported by stop()
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert self.error is None, f"the background writes failed: {self.error}"
        assert self.rounds >= 1, "no round of writes completed"


def timed_status(standby: Standby) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    status = standby.status()
    return time.monotonic() - started, status


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_64_volumes_mirror_at_once_and_status_stays_answerable(
    daemons: Daemons, tmp_path: Path, transport: str
) -> None:
    standby = daemons.standby()
    (tmp_path / "p").mkdir()
    names = [f"s{i:02d}" for i in range(SCALE_VOLUMES)]
    volumes = {n: f"{tmp_path / 'p' / n}.img,size=1MiB,block-size={BS}" for n in names}
    primary = daemons.primary(standby, volumes, "--mode", "sync", "--transport", transport)
    connected = [e for e in primary.daemon.events if e.get("event") == "mirror_connected"]
    want = "channel" if transport == "auto" else "grpc"
    assert sorted(e["volume"] for e in connected) == names, connected
    assert {e.get("transport") for e in connected} == {want}, connected

    seconds, status = timed_status(standby)
    vols = {v["name"]: v for v in status["volumes"]}
    assert sorted(vols) == names
    bad = {
        n: (v["state"], v["connected"])
        for n, v in vols.items()
        if (v["state"], v["connected"]) != ("uptodate", True)
    }
    assert not bad, f"volumes not connected and up to date: {bad}"

    writes = BackgroundWrites(primary.nbd, names[:8])
    try:
        slowest = 0.0
        for _ in range(5):
            seconds, status = timed_status(standby)
            slowest = max(slowest, seconds)
            assert len(status["volumes"]) == SCALE_VOLUMES
            assert all(v["connected"] for v in status["volumes"]), status
        assert slowest < STATUS_SECONDS, f"standbyctl status took {slowest:.1f} s while 64 volumes mirror"

        raw = RawReplication(standby.grpc)
        try:
            raw.handshake("extra", VOL_SIZE)
            stream = GrpcStream(raw, "extra")
            try:
                stream.send(1, [(0, rand(BS, seed=60))])
                if transport == "grpc":
                    # The 65th Mirror stream on gRPC: refused at the limit, the others unharmed.
                    failure = stream.failure()
                    assert failure.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, failure
                    assert str(GRPC_STREAM_LIMIT) in failure.details() and "limit" in failure.details()
                    event = standby.daemon.wait_for("limit_reached", limit="grpc_mirror_streams")
                    assert event.get("value") == GRPC_STREAM_LIMIT, event
                    m = standby.metrics()
                    assert m.get("standby_limit_reached_total", limit="grpc_mirror_streams") == 1
                else:
                    # Data channel sessions hold no gRPC worker: a gRPC stream still fits.
                    assert stream.reply().sequence == 1
            finally:
                stream.close()
            # The data channel needs no worker either way.
            offer = raw.offer("extra")
            conn = DataConnection((offer.host, offer.port))
            conn.send(hello(offer.token) + batch_frame(1, [(BS, rand(BS, seed=61))]))
            reply = conn.reply()
            assert reply is not None and reply.sequence == 1 and not reply.error_code, reply
            conn.close()
        finally:
            raw.close()
        seconds, status = timed_status(standby)
        assert seconds < STATUS_SECONDS, f"standbyctl status took {seconds:.1f} s after the 65th stream"
        assert sum(v["connected"] for v in status["volumes"] if v["name"] in names) == SCALE_VOLUMES
    finally:
        writes.stop()
    primary.wait_in_sync()
    for n in names:
        assert standby.replica(n).read_bytes() == (tmp_path / "p" / f"{n}.img").read_bytes(), n

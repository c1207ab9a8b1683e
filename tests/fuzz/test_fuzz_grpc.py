"""Fuzzing of the standby's gRPC services on a real daemon: every method of Replication and Control
gets random and boundary protobuf values, mutated serializations and raw garbage bytes.

Each call must end with OK or one of the client-error codes of `ALLOWED` (never INTERNAL, UNKNOWN, a
deadline, or a dead daemon). The volume ``vol0`` that a real primary mirrors is only ever given
requests that cannot change it (it is never handshaked, mirrored to, promoted, nor its snapshot
``fuzzfrozen`` deleted or re-leased); the Mirror stream is fuzzed on a volume of its own, ``fz0``,
whose expected image follows the batches the standby acknowledged as applied. At the end: the daemon
is alive and logged no internal error, its memory stayed bounded, the replica of ``vol0`` and the
snapshot export are unchanged, ``fz0`` holds exactly what was acknowledged, and the real primary still
mirrors a new write.

Short run in `make test`; long run under `make soak` (`FUZZ_CASES`, `FUZZ_SEED` as for the NBD fuzzer).
"""

from __future__ import annotations

import math
import random
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import Daemons, need
from fuzz_support import (
    BS,
    SNAPSHOT,
    VOLUME,
    VOLUME_SIZE,
    Memory,
    assert_same_blocks,
    assert_still_mirrors,
    case_indices,
    cases,
    check_standby_after_fuzz,
    daemon_alive,
    mutate_bytes,
    named_case,
    protected_digests,
    start_rig,
)
from google.protobuf.message import DecodeError, Message

from standbylib.checksums import block_digests
from standbylib.rpc.v1 import control_pb2, replication_pb2

pytestmark = pytest.mark.timeout(1800)

C = grpc.StatusCode
ALLOWED = {
    C.OK,
    C.INVALID_ARGUMENT,
    C.OUT_OF_RANGE,
    C.NOT_FOUND,
    C.ALREADY_EXISTS,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.ABORTED,  # a volume the fuzzer promoted refuses mirrored writes (the primary fences itself)
}
PROTECTED = {VOLUME}
FZ = "fz0"
FZ_SIZE = 1 << 20
DEADLINE = 60.0
REPL = "/standbyappliance.v1.Replication/"
CTRL = "/standbyappliance.v1.Control/"

U64 = [
    0,
    1,
    511,
    512,
    4095,
    4096,
    4097,
    FZ_SIZE - 1,
    FZ_SIZE,
    FZ_SIZE + 4096,
    VOLUME_SIZE,
    (1 << 31),
    (1 << 32) - 1,
]
U64 += [1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 4096, (1 << 64) - 1]
U32 = [
    0,
    1,
    2,
    511,
    512,
    513,
    1024,
    4096,
    4097,
    1 << 16,
    1 << 20,
    (1 << 20) + 1,
    1 << 21,
    1 << 31,
    (1 << 32) - 1,
]
DOUBLES = [0.0, -0.0, -1.0, 1e-9, 0.5, 1.0, 86400.0, 86400.0001, 1e308, -1e308, math.inf, -math.inf, math.nan]
DOUBLES += [5e-324, 3600.0]


def odd_names(rng: random.Random) -> list[str]:
    return [
        "",
        VOLUME,
        FZ,
        "a",
        "x" * 128,
        "x" * 129,
        "a/b",
        "..",
        "../vol0",
        "/etc/passwd",
        ".hidden",
        "-dash",
        "a\x00b",
        "\x00",
        "ünïcødé",
        "\u202e\U0001f600",
        "vol0@fuzzfrozen",
        "a b",
        "a\nb",
        "%s%n",
        "y" * rng.choice([4096, 1 << 16, 1 << 20]),
        "".join(
            rng.choice(string.ascii_letters + string.digits + "._:+-") for _ in range(rng.randrange(1, 20))
        ),
        "fz" + str(rng.randrange(10)),
        "snap-" + str(rng.randrange(5)),
    ]


def name(rng: random.Random) -> str:
    return rng.choice(odd_names(rng))


def u64(rng: random.Random) -> int:
    return rng.choice(U64) if rng.random() < 0.8 else rng.getrandbits(64)


def u32(rng: random.Random) -> int:
    return rng.choice(U32) if rng.random() < 0.8 else rng.getrandbits(32)


def dbl(rng: random.Random) -> float:
    return rng.choice(DOUBLES) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)


def blob(rng: random.Random) -> bytes:
    return rng.choice([b"", b"\x00", rng.randbytes(rng.randrange(1, 64)), rng.randbytes(BS), bytes(BS)])


# -- the fuzz volume's model ----------------------------------------------------------------------------


@dataclass
class FuzzVolume:
    """What the standby must hold for `fz0`: the batches it acknowledged as applied."""

    data: bytearray = field(default_factory=lambda: bytearray(FZ_SIZE))
    applied_batches: int = 0

    def apply(self, batch: replication_pb2.Batch) -> None:
        for w in batch.writes:
            if w.checksum_length:
                continue  # a probe compares, never writes
            if w.zero_length:
                self.data[w.offset : w.offset + w.zero_length] = bytes(w.zero_length)
            else:
                self.data[w.offset : w.offset + len(w.data)] = w.data
        self.applied_batches += 1


# -- requests ------------------------------------------------------------------------------------------


def handshake_request(rng: random.Random) -> replication_pb2.HandshakeRequest:
    vol = name(rng)
    while vol in PROTECTED:
        vol = name(rng)
    size = u64(rng) if rng.random() < 0.7 else rng.randrange(1, 64) * rng.choice([512, BS, 1 << 20])
    return replication_pb2.HandshakeRequest(
        volume=vol,
        size=size,
        block_size=u32(rng),
        primary_id=name(rng)[:64],
        generation=rng.choice(["", "g1", name(rng)[:64]]),
        base_generation=rng.choice(["", "g0", name(rng)[:64]]),
        discard_standby_data=rng.random() < 0.3,
    )


def random_write(rng: random.Random, seq_data: bool = True) -> replication_pb2.Write:
    """A write, zero run or probe of `fz0`: mostly valid, often at or beyond a boundary."""
    blocks = FZ_SIZE // BS
    offset = rng.randrange(blocks) * BS if rng.random() < 0.7 else u64(rng)
    kind = rng.random()
    if kind < 0.45:
        n = rng.choice([BS, 2 * BS, 16 * BS]) if rng.random() < 0.8 else rng.choice([0, 1, BS - 1, BS + 1])
        if rng.random() < 0.1:
            offset = FZ_SIZE - BS  # at size-1 block; with n > BS beyond the end
        w = replication_pb2.Write(offset=offset, data=rng.randbytes(n))
    elif kind < 0.7:
        n = rng.choice([BS, 8 * BS]) if rng.random() < 0.7 else u64(rng)
        w = replication_pb2.Write(offset=offset, zero_length=n)
    elif kind < 0.85:
        n = rng.choice([BS, 4 * BS]) if rng.random() < 0.7 else u64(rng)
        digests = block_digests(bytes(min(n, 64 * BS)), BS) if n <= 64 * BS and n % BS == 0 else b""
        if rng.random() < 0.4:
            digests = mutate_bytes(rng, digests) if digests else rng.randbytes(rng.choice([0, 7, 9, 16]))
        w = replication_pb2.Write(offset=offset, checksum_length=n, digests=digests, verify_id=u64(rng) % 3)
    else:
        w = replication_pb2.Write(
            offset=offset,
            data=blob(rng),
            zero_length=u64(rng) if rng.random() < 0.5 else 0,
            checksum_length=u64(rng) if rng.random() < 0.3 else 0,
            digests=blob(rng),
            verify_id=u64(rng),
        )
    return w


def mirror_messages(rng: random.Random, vol: str) -> tuple[replication_pb2.MirrorOpen, list[Any]]:
    """An open and the messages after it (batches, with the odd wrong one)."""
    first = rng.choice([0, 1, 1, 1, 2, 100, (1 << 64) - 1, (1 << 63)]) if rng.random() < 0.9 else u64(rng)
    opened = replication_pb2.MirrorOpen(
        volume=vol,
        first_sequence=first,
        primary_id=rng.choice(["fuzz", name(rng)[:64]]),
        received_acks=rng.random() < 0.3,
        resync=rng.random() < 0.2,
        generation=rng.choice(["", "gfuzz"]),
    )
    seq = first or 1
    out: list[Any] = []
    for _ in range(rng.randrange(0, 6)):
        r = rng.random()
        if r < 0.75:
            s = seq
            seq += 1
        elif r < 0.85:
            s = rng.choice([seq - 1, 0, seq + 1, seq + 2])
        else:
            s = u64(rng)
        s = max(0, min(s, (1 << 64) - 1))
        writes = [random_write(rng) for _ in range(rng.randrange(0, 5))]
        batch = replication_pb2.Batch(
            sequence=s, writes=writes, flush=rng.random() < 0.3, uptodate=rng.random() < 0.3
        )
        out.append(batch)
        if rng.random() < 0.05:
            out.append(replication_pb2.MirrorOpen(volume=vol))  # open again: refused
    return opened, out


def control_request(rng: random.Random, method: str) -> Message:
    vol = rng.choice([VOLUME, FZ, name(rng)])
    snap = name(rng)
    if method == "Status":
        return control_pb2.StatusRequest()
    if method == "CreateSnapshot":
        return control_pb2.CreateSnapshotRequest(
            volume=vol,
            name=snap,
            writable=rng.random() < 0.3,
            capacity_bytes=u64(rng) if rng.random() < 0.5 else 0,
            lease_seconds=dbl(rng) if rng.random() < 0.5 else 0.0,
        )
    if method == "ListSnapshots":
        return control_pb2.ListSnapshotsRequest(volume=rng.choice(["", vol]))
    if method == "DeleteSnapshot":
        if vol == VOLUME and snap == SNAPSHOT:
            snap = "not-" + SNAPSHOT
        return control_pb2.DeleteSnapshotRequest(volume=vol, name=snap)
    if method == "RenewSnapshotLease":
        if vol == VOLUME and snap == SNAPSHOT:
            snap = "not-" + SNAPSHOT
        return control_pb2.RenewSnapshotLeaseRequest(volume=vol, name=snap, lease_seconds=dbl(rng))
    if method == "Verify":
        if vol == VOLUME and rng.random() < 0.9:
            vol = FZ  # a real verify of vol0 takes a second: now and then only
        return control_pb2.VerifyRequest(volume=vol, repair=rng.random() < 0.5)
    if method == "Promote":
        while vol in PROTECTED or vol == FZ:
            vol = name(rng)
        return control_pb2.PromoteRequest(volume=vol, force=rng.random() < 0.5)
    if method == "RemoveVolume":
        while vol in PROTECTED or vol == FZ:
            vol = name(rng)  # (volumes the fuzzer's own handshakes made may go)
        return control_pb2.RemoveVolumeRequest(volume=vol, force=rng.random() < 0.5)
    raise AssertionError(method)


REQUEST_TYPES: dict[str, type[Message]] = {
    REPL + "Handshake": replication_pb2.HandshakeRequest,
    REPL + "Mirror": replication_pb2.MirrorRequest,
    CTRL + "Status": control_pb2.StatusRequest,
    CTRL + "CreateSnapshot": control_pb2.CreateSnapshotRequest,
    CTRL + "ListSnapshots": control_pb2.ListSnapshotsRequest,
    CTRL + "DeleteSnapshot": control_pb2.DeleteSnapshotRequest,
    CTRL + "RenewSnapshotLease": control_pb2.RenewSnapshotLeaseRequest,
    CTRL + "Verify": control_pb2.VerifyRequest,
    CTRL + "Promote": control_pb2.PromoteRequest,
    CTRL + "RemoveVolume": control_pb2.RemoveVolumeRequest,
}


def harmless(method: str, data: bytes) -> bool:
    """Whether garbage `data`, should it parse, still leaves `vol0` and its snapshot alone."""
    try:
        msg = REQUEST_TYPES[method].FromString(data)
    except (DecodeError, RuntimeWarning, ValueError):
        return True
    fields = {f.name: v for f, v in msg.ListFields()}
    if method == REPL + "Mirror":
        inner = msg.open if msg.WhichOneof("kind") == "open" else None
        return inner is None or (inner.volume not in PROTECTED and inner.volume != FZ)
    vol = fields.get("volume", "")
    if method in (REPL + "Handshake", CTRL + "Promote", CTRL + "RemoveVolume"):
        return vol not in PROTECTED and vol != FZ
    if method in (CTRL + "DeleteSnapshot", CTRL + "RenewSnapshotLease"):
        return not (vol == VOLUME and fields.get("name") == SNAPSHOT)
    return True


# -- calls ---------------------------------------------------------------------------------------------


class Caller:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
            ],
        )
        self.codes: dict[str, int] = {}

    def _record(self, method: str, code: grpc.StatusCode, details: str, what: str) -> grpc.StatusCode:
        key = f"{method.rsplit('/', 1)[1]}:{code.name}"
        self.codes[key] = self.codes.get(key, 0) + 1
        assert code in ALLOWED, f"{method} ({what}) answered {code.name}: {details}"
        return code

    def unary(self, method: str, data: bytes, what: str) -> tuple[grpc.StatusCode, bytes | None]:
        call = self.channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            reply = call(data, timeout=DEADLINE)
        except grpc.RpcError as e:
            return self._record(method, e.code(), e.details() or "", what), None
        return self._record(method, C.OK, "", what), reply

    def server_stream(self, method: str, data: bytes, what: str) -> grpc.StatusCode:
        call = self.channel.unary_stream(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            for _ in call(data, timeout=DEADLINE):
                pass
        except grpc.RpcError as e:
            return self._record(method, e.code(), e.details() or "", what)
        return self._record(method, C.OK, "", what)

    def bidi(self, method: str, messages: list[bytes], what: str) -> tuple[grpc.StatusCode, list[bytes]]:
        call = self.channel.stream_stream(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        replies: list[bytes] = []
        try:
            for reply in call(iter(messages), timeout=DEADLINE):
                replies.append(reply)
        except grpc.RpcError as e:
            return self._record(method, e.code(), e.details() or "", what), replies
        return self._record(method, C.OK, "", what), replies

    def close(self) -> None:
        self.channel.close()


def garbage(rng: random.Random, method: str, valid: bytes) -> bytes | None:
    """Raw random bytes or a mutated serialization; None when it would touch what must not change."""
    for _ in range(10):
        r = rng.random()
        if r < 0.3:
            data = rng.randbytes(rng.choice([1, 2, 5, 16, 100, 4096]))
        elif r < 0.4:
            data = rng.choice(
                [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 10 + b"\x01", b"\x12"]
            )
        else:
            data = mutate_bytes(rng, valid)
        if harmless(method, data):
            return data
    return None


def mirror_case(caller: Caller, rng: random.Random, fz: FuzzVolume, garbled: bool) -> None:
    vol = FZ if rng.random() < 0.85 else name(rng)
    while vol in PROTECTED:
        vol = name(rng)
    opened, rest = mirror_messages(rng, vol)
    msgs: list[replication_pb2.MirrorRequest] = [replication_pb2.MirrorRequest(open=opened)]
    if rng.random() < 0.05:
        msgs = []  # a batch first: refused
    for m in rest:
        if isinstance(m, replication_pb2.Batch):
            msgs.append(replication_pb2.MirrorRequest(batch=m))
        else:
            msgs.append(replication_pb2.MirrorRequest(open=m))
    wire = [m.SerializeToString() for m in msgs]
    if garbled and wire:
        i = rng.randrange(len(wire))
        bad = garbage(rng, REPL + "Mirror", wire[i])
        if bad is None:
            return
        wire[i] = bad
        try:
            parsed = replication_pb2.MirrorRequest.FromString(bad)
        except (DecodeError, RuntimeWarning, ValueError):
            parsed = None
        if parsed is not None and i == 0 and parsed.WhichOneof("kind") == "open" and parsed.open.volume == FZ:
            opened = parsed.open
            msgs[0] = parsed
        if parsed is not None and i > 0:
            msgs[i] = parsed
        elif i > 0:
            del msgs[i:]  # the stream ends at the message that does not parse
            wire = wire[: i + 1]
    _code, replies = caller.bidi(REPL + "Mirror", wire, "garbled" if garbled else "generated")
    if not msgs or msgs[0].WhichOneof("kind") != "open" or msgs[0].open.volume != FZ:
        return
    # Which batches were applied: replay the standby's rule on the acknowledged ones, in order.
    applied_acks = [replication_pb2.MirrorReply.FromString(r) for r in replies]
    applied_acks = [a for a in applied_acks if not a.received]
    applied = (msgs[0].open.first_sequence or 1) - 1
    batches = [m.batch for m in msgs[1:] if m.WhichOneof("kind") == "batch"]
    for ack, batch in zip(applied_acks, batches, strict=False):
        assert ack.sequence == batch.sequence, f"ack for {ack.sequence}, batch {batch.sequence} expected"
        if batch.sequence <= applied:
            continue  # acknowledged, skipped as a duplicate
        assert batch.sequence == applied + 1, f"batch {batch.sequence} applied after {applied}"
        fz.apply(batch)
        applied = batch.sequence
    assert len(applied_acks) <= len(batches), "more acknowledgements than batches"


CONTROL_METHODS = ["Status", "CreateSnapshot", "ListSnapshots", "DeleteSnapshot", "RenewSnapshotLease"]
CONTROL_METHODS += ["Verify", "Promote", "RemoveVolume"]


def one_case(caller: Caller, rng: random.Random, fz: FuzzVolume) -> str:
    r = rng.random()
    garbled = rng.random() < 0.25
    if r < 0.35:
        mirror_case(caller, rng, fz, garbled)
        return "Mirror"
    if r < 0.5:
        method = REPL + "Handshake"
        valid = handshake_request(rng).SerializeToString()
    else:
        short = rng.choice(CONTROL_METHODS)
        method = CTRL + short
        valid = control_request(rng, short).SerializeToString()
    data = garbage(rng, method, valid) if garbled else valid
    if data is None:
        return "skipped"
    if method.endswith("/Verify"):
        caller.server_stream(method, data, "garbled" if garbled else "generated")
    else:
        caller.unary(method, data, "garbled" if garbled else "generated")
    return method.rsplit("/", 1)[1]


def run_grpc_fuzz(daemons: Daemons, tmp: Path, seed: int, n: int) -> None:
    need("qemu-io")
    rig = start_rig(daemons, tmp, seed)
    standby = rig.standby
    before = protected_digests(rig)
    caller = Caller(standby.grpc)
    fz = FuzzVolume()
    code, _ = caller.unary(
        REPL + "Handshake",
        replication_pb2.HandshakeRequest(
            volume=FZ, size=FZ_SIZE, block_size=BS, primary_id="fuzz"
        ).SerializeToString(),
        "setup",
    )
    assert code == C.OK
    memory = Memory.of(standby)
    indices = case_indices(n)
    counts: dict[str, int] = {}
    started = time.monotonic()
    try:
        for i in indices:
            rng = random.Random(f"{seed}:grpc:{i}")
            with named_case(i, standby):
                kind = one_case(caller, rng, fz)
            counts[kind] = counts.get(kind, 0) + 1
            daemon_alive(standby)
            memory.sample()
        print(
            f"grpc: {len(indices)} cases in {time.monotonic() - started:.1f} s "
            f"{dict(sorted(counts.items()))}\n"
            f"codes: {dict(sorted(caller.codes.items()))}\n{memory.summary()}; fz0 applied "
            f"{fz.applied_batches} batches"
        )
    finally:
        caller.close()
    check_standby_after_fuzz(rig, before, memory, "unexpected error")
    got = rig.replica_path(FZ).read_bytes()
    assert len(got) == FZ_SIZE, f"fz0's replica has {len(got)} bytes"
    assert_same_blocks(got, bytes(fz.data), "fz0 differs from the acknowledged batches")
    assert_still_mirrors(rig)


def test_grpc_fuzz_short(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_grpc_fuzz(daemons, tmp_path, fuzz_seed, cases(600, 5000, is_soak=False))


@pytest.mark.soak
def test_grpc_fuzz_soak(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_grpc_fuzz(daemons, tmp_path, fuzz_seed, cases(600, 5000, is_soak=True))

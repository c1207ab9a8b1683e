"""Fuzzing of the standby's data channel on a real daemon: after a valid hello, random, mutated and
boundary batch frames (and now and then garbage before the hello).

Every case opens a session of the fuzz volume ``fz0`` (a Mirror call asking for the data channel, then a
connection presenting its token), sends a few frames and closes its side; the standby answers until it
closes. Each frame must either be acknowledged as applied, and then be a batch protobuf reads, whose
writes the model of ``fz0`` replays (in order, skipping the sequence numbers already applied, the
probes' mismatches checked against the model), or be refused with an error frame (INVALID_ARGUMENT or
OUT_OF_RANGE), after which nothing more is applied. After every case ``fz0``'s replica equals the model
and the daemon is alive; at the end it logged no internal error nor traceback, its memory stayed bounded,
the replica of ``vol0`` (mirrored by a real primary) and its snapshot are unchanged, and that primary
still mirrors a new write.

Short run in `make test`; long run under `make soak` (`FUZZ_CASES`, `FUZZ_SEED`, `FUZZ_CASE` as for the
other fuzzers).
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_support import Daemons, DataConnection, RawReplication, frame, hello, need
from fuzz_support import (
    BS,
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
from google.protobuf.message import DecodeError

from standbylib.checksums import Probe, Repair, block_digests
from standbylib.rpc.frames import MAX_FRAME
from standbylib.rpc.v1 import replication_pb2
from standbylib.rpc.wire import encode_batch, varint

pytestmark = pytest.mark.timeout(1800)

FZ = "fz0"
FZ_SIZE = 1 << 20
BLOCKS = FZ_SIZE // BS
REFUSALS = {"INVALID_ARGUMENT", "OUT_OF_RANGE"}
BEFORE_HELLO_CODES = {"INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAVAILABLE"}
U64_EDGES = [0, 1, BS - 1, BS, FZ_SIZE - BS, FZ_SIZE, FZ_SIZE + BS, (1 << 32) - 1, 1 << 32]
U64_EDGES += [(1 << 63) - 1, 1 << 63, (1 << 64) - BS, (1 << 64) - 1]


# -- the model of fz0 -----------------------------------------------------------------------------------


@dataclass
class Model:
    """What the standby must hold for `fz0`: the batches it applied, as protobuf reads them, and the
    last sequence number applied on the current session."""

    data: bytearray = field(default_factory=lambda: bytearray(FZ_SIZE))
    applied_batches: int = 0
    applied_sequence: int = 0

    def copy(self) -> Model:
        return Model(bytearray(self.data), self.applied_batches, self.applied_sequence)

    def mismatches(self, offset: int, length: int, digests: bytes) -> list[int]:
        ours = block_digests(bytes(self.data[offset : offset + length]), BS)
        return [
            offset + i * BS
            for i in range(length // BS)
            if ours[i * 8 : i * 8 + 8] != digests[i * 8 : i * 8 + 8]
        ]

    def step(self, f: Frame) -> list[int] | None:
        """Take frame `f` as the standby must: a batch protobuf reads, next in sequence (applied) or
        already applied (skipped), with valid ops; the mismatches its probes find. None: a frame the
        standby must refuse (or, with a lying length prefix, cannot read whole)."""
        batch = parse(f.data) if f.header is None else None
        if batch is None:
            return None
        if batch.sequence <= self.applied_sequence:
            return []
        if batch.sequence != self.applied_sequence + 1 or valid_op(batch) is not None:
            return None
        mismatched: list[int] = []
        for w in batch.writes:
            if w.checksum_length:
                mismatched += self.mismatches(w.offset, w.checksum_length, w.digests)
            elif w.zero_length:
                self.data[w.offset : w.offset + w.zero_length] = bytes(w.zero_length)
            else:
                self.data[w.offset : w.offset + len(w.data)] = w.data
        self.applied_batches += 1
        self.applied_sequence = batch.sequence
        return mismatched


def valid_op(batch: replication_pb2.Batch) -> str | None:
    """Why the standby must refuse `batch`'s ops (None: they are valid for fz0)."""
    for w in batch.writes:
        length = w.checksum_length or w.zero_length or len(w.data)
        if length <= 0 or w.offset % BS or length % BS:
            return "misaligned"
        if w.offset + length > FZ_SIZE:
            return "out of range"
        if w.checksum_length and len(w.digests) != length // BS * 8:
            return "digests"
    return None


# -- frames --------------------------------------------------------------------------------------------


def u64(rng: random.Random) -> int:
    return rng.choice(U64_EDGES) if rng.random() < 0.7 else rng.getrandbits(64)


def good_ops(rng: random.Random, model: Model) -> list[tuple[int, object]]:
    """Valid ops of fz0: data, zeroed runs, probes (right or wrong digests), repairs."""
    ops: list[tuple[int, object]] = []
    for _ in range(rng.randrange(0, 6)):
        n = rng.choice([1, 1, 2, 4])
        offset = rng.randrange(BLOCKS - n + 1) * BS
        kind = rng.random()
        if kind < 0.5:
            ops.append((offset, rng.randbytes(n * BS) if rng.random() < 0.8 else bytes(n * BS)))
        elif kind < 0.65:
            ops.append((offset, n * BS))
        elif kind < 0.9:
            digests = block_digests(bytes(model.data[offset : offset + n * BS]), BS)
            if rng.random() < 0.5:  # the model is older than this batch's writes: some will differ
                digests = rng.randbytes(len(digests))
            ops.append((offset, Probe(n * BS, digests, rng.choice([0, 0, 1, u64(rng)]))))
        else:
            payload: bytes | int = rng.randbytes(n * BS) if rng.random() < 0.5 else n * BS
            ops.append((offset, Repair(payload, rng.randrange(1, 5))))
    return ops


def bad_op(rng: random.Random) -> tuple[int, object]:
    """An op the standby must refuse: out of range, misaligned, empty, or with wrong digests."""
    kind = rng.randrange(5)
    if kind == 0:
        return (u64(rng) // BS * BS or FZ_SIZE, rng.randbytes(BS))
    if kind == 1:
        return (rng.randrange(1, BS), rng.randbytes(BS))
    if kind == 2:
        return (0, rng.choice([b"", rng.randbytes(rng.randrange(1, BS))]))
    if kind == 3:
        return (FZ_SIZE - BS, u64(rng) or 2 * BS)
    return (0, Probe(2 * BS, rng.randbytes(rng.choice([0, 8, 24])), 0))


def encoded(sequence: int, ops: list[tuple[int, object]], rng: random.Random) -> bytes:
    pieces = encode_batch(sequence, ops, rng.random() < 0.3, rng.random() < 0.1)  # type: ignore[arg-type]
    return b"".join(bytes(p) for p in pieces)


def odd_varint_batch(rng: random.Random, sequence: int) -> bytes:
    """A batch whose sequence or a write's offset is a varint at or beyond 64 bits, or non-minimal."""
    which = rng.randrange(4)
    if which == 0:
        number = b"\x80" * 9 + bytes([rng.choice([1, 2, 0x7F])])  # 2**63, 2**64, 127 * 2**63
    elif which == 1:
        number = b"\xff" * 9 + bytes([rng.choice([1, 2, 0x7F])])
    elif which == 2:
        number = bytes(b | 0x80 for b in varint(sequence)) + b"\x80\x00"  # `sequence`, non-minimal
    else:
        number = b"\x80" * 10 + b"\x01"  # 11 bytes
    write = replication_pb2.Write(offset=0, data=rng.randbytes(BS)).SerializeToString()
    if rng.random() < 0.5:
        batch = b"\x08" + number + b"\x12" + varint(len(write)) + write
    else:
        write = b"\x08" + number + write[2:] if write.startswith(b"\x08\x00") else b"\x08" + number + write
        batch = b"\x08" + varint(sequence) + b"\x12" + varint(len(write)) + write
    return b"\x12" + varint(len(batch)) + batch


@dataclass
class Frame:
    data: bytes  # the frame's message (without its length prefix)
    kind: str  # good, bad, mutated, random, varint, other
    header: bytes | None = None  # an odd length prefix instead of the true one


def case_frames(rng: random.Random, model: Model, first: int) -> list[Frame]:
    frames: list[Frame] = []
    seq = first
    for _ in range(rng.randrange(1, 7)):
        r = rng.random()
        if r < 0.5:
            s = seq if rng.random() < 0.9 else rng.choice([seq - 1, seq + 1, 0, first])
            s = max(s, 0)  # past 2**64 - 1 (after a stream opened there) the number needs 65 bits
            frames.append(Frame(encoded(s, good_ops(rng, model), rng), "good" if s < 1 << 64 else "varint"))
            seq += 1
        elif r < 0.6:
            ops = good_ops(rng, model)
            ops.insert(rng.randrange(len(ops) + 1), bad_op(rng))
            frames.append(Frame(encoded(seq, ops, rng), "bad"))
        elif r < 0.8:
            valid = encoded(seq, good_ops(rng, model), rng)
            for _ in range(rng.randrange(1, 4)):
                valid = mutate_bytes(rng, valid)
            frames.append(Frame(valid, "mutated"))
        elif r < 0.87:
            frames.append(Frame(rng.randbytes(rng.choice([0, 1, 2, 5, 17, 100, 4096])), "random"))
        elif r < 0.93:
            frames.append(Frame(odd_varint_batch(rng, seq), "varint"))
        elif r < 0.97:
            other = rng.choice(
                [
                    replication_pb2.MirrorRequest(
                        hello=replication_pb2.DataChannelHello(token=rng.randbytes(32))
                    ),
                    replication_pb2.MirrorRequest(
                        open=replication_pb2.MirrorOpen(volume=FZ, first_sequence=1)
                    ),
                    replication_pb2.MirrorRequest(),
                ]
            )
            frames.append(Frame(other.SerializeToString(), "other"))
        else:
            # a length prefix that lies: longer than what follows (the connection then ends), or absurd
            valid = encoded(seq, good_ops(rng, model), rng)
            length = rng.choice([len(valid) + rng.randrange(1, 100), 0xFFFFFFFF, (80 << 20) + 1])
            frames.append(Frame(valid, "length", length.to_bytes(4, "big")))
            break  # nothing after it can be a frame
    return frames


# -- a case --------------------------------------------------------------------------------------------


@dataclass
class Counts:
    cases: int = 0
    frames: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def parse(message: bytes) -> replication_pb2.Batch | None:
    try:
        request = replication_pb2.MirrorRequest.FromString(message)
    except (DecodeError, RuntimeWarning, ValueError):
        return None
    return request.batch if request.WhichOneof("kind") == "batch" else None


def session_case(
    raw: RawReplication, replica: Path, rng: random.Random, model: Model, counts: Counts
) -> None:
    first = rng.choice([1, 1, 1, 2, 1000, 1 << 63, (1 << 64) - 1])
    received_acks = rng.random() < 0.3
    offer = raw.offer(FZ, first_sequence=first, primary_id="fuzz", received_acks=received_acks)
    frames = case_frames(rng, model, first)
    conn = DataConnection((offer.host, offer.port))
    wire = hello(offer.token) + b"".join(f.header + f.data if f.header else frame(f.data) for f in frames)
    conn.send(wire)
    with_shutdown(conn)
    replies = conn.replies_until_closed(60)

    applied = [r for r in replies if not r.error_code and not r.received]
    received = [r for r in replies if r.received]
    errors = [r for r in replies if r.error_code]
    # (In `received` mode the reading thread and the applying one may each send an error frame.)
    assert len(errors) <= (2 if received_acks else 1), f"error frames: {errors}"
    for error in errors:
        assert error.error_code in REFUSALS, f"refused with {error.error_code}: {error.error}"
        assert error.error, "an error frame without a message"
    if errors and replies[-1] is not errors[0]:
        # The error frame is the standby's last word; in `received` mode the applying thread still
        # acknowledges (or refuses) the batches it had queued.
        assert received_acks, f"replies after the error frame: {replies}"
        counts.add(counts.outcomes, "received:replies-after-the-error-frame")
    for f in frames:
        counts.add(counts.frames, f.kind)
    if received_acks:
        for ack, f in zip(received, frames, strict=False):
            batch = parse(f.data)
            assert batch is not None and ack.sequence == batch.sequence, f"received {ack} for {f.kind}"
        assert len(received) <= len(frames), (
            f"{len(received)} received acknowledgements, {len(frames)} frames"
        )

    # Acknowledgements are cumulative (one may stand for several batches): each names a frame, and
    # every frame up to it must be one the standby may apply; replay them as protobuf reads them.
    model.applied_sequence = first - 1
    j = 0
    for ack in applied:
        while True:
            assert j < len(frames), f"an acknowledgement of {ack.sequence} beyond the {len(frames)} frames"
            f = frames[j]
            what = f"frame {j} ({f.kind}, {f.data[:64].hex()}...)"
            j += 1
            before = model.applied_sequence
            found = model.step(f)
            batch = parse(f.data)
            assert found is not None and batch is not None, (
                f"{what} was acknowledged, though protobuf reads no valid next batch there: {ack}"
            )
            counts.add(counts.outcomes, "applied" if model.applied_sequence != before else "skipped")
            if batch.sequence == ack.sequence:
                assert list(ack.mismatched) == found, (
                    f"{what}: mismatches {list(ack.mismatched)}, model {found}"
                )
                break
            assert not found, f"{what}: its probes found {found}, yet its reply waited for a later one"

    # The frames after the last acknowledgement: the standby applied some of them (their replies can
    # wait for the next frame's), then refused one or saw the end. fz0 tells how many.
    got = replica.read_bytes()
    options = [model.copy()]
    trailing = frames[j:]
    for f in trailing:
        state = options[-1].copy()
        if state.step(f) is None:
            break
        options.append(state)
    matching = [n for n, state in enumerate(options) if state.data == got]
    assert matching, (
        f"fz0 holds none of the {len(options)} images the acknowledged and the following frames can leave "
        f"({[f.kind for f in trailing]} after the last acknowledgement, replies {replies})"
    )
    if errors:
        # One frame was refused: one the image allows (after no-op batches it is ambiguous), and not a
        # batch of the encoder that protobuf reads as the next valid one.
        refusable = [n for n in matching if n < len(trailing)]
        assert refusable, f"every frame was applied, yet an error frame came: {errors}"
        acceptable = [n for n in refusable if n + 1 == len(options) or trailing[n].kind != "good"]
        assert acceptable, f"a valid batch was refused: {replies}"
        n = max(acceptable)
    else:
        n = max(matching)
    chosen = options[n]
    for _ in range(n):
        counts.add(counts.outcomes, "applied-without-its-acknowledgement")
    model.data, model.applied_batches = chosen.data, chosen.applied_batches
    model.applied_sequence = chosen.applied_sequence
    if n < len(trailing):
        stopped = trailing[n]
        if n + 1 < len(options):
            # A batch protobuf reads as valid was refused: fine for odd encodings the data channel's
            # decoder does not take (groups, two batch fields), never for one of the encoder's batches.
            assert errors, f"a valid {stopped.kind} batch was neither applied nor refused: {replies}"
            counts.add(counts.outcomes, f"refused-though-protobuf-reads-it:{stopped.kind}")
        elif errors:
            counts.add(counts.outcomes, f"refused:{errors[0].error_code}")
        else:
            lying = stopped.header is not None and int.from_bytes(stopped.header, "big") <= MAX_FRAME
            if parse(stopped.data) is None and not lying:
                raise AssertionError(
                    f"a {stopped.kind} frame protobuf reads as no batch ({stopped.data[:64].hex()}...) "
                    f"was not refused: the standby took it for a batch (replies {replies})"
                )
            assert lying, f"{stopped.kind} frame neither applied nor refused: {replies}"
            counts.add(counts.outcomes, "cut")
    else:
        assert not errors, f"every frame was applied, yet an error frame came: {errors}"


def with_shutdown(conn: DataConnection) -> None:
    """The client is done sending: its side of the connection ends (the standby then ends the session)."""
    with contextlib.suppress(OSError):
        conn.sock.shutdown(socket.SHUT_WR)


def opens_a_session(head: bytes, token: bytes) -> bool:
    """Whether `head` starts with a frame protobuf reads as the hello of `token`."""
    length = int.from_bytes(head[:4], "big")
    if len(head) < 4 + length or length > 4096:
        return False
    try:
        request = replication_pb2.MirrorRequest.FromString(head[4 : 4 + length])
    except (DecodeError, RuntimeWarning, ValueError):
        return False
    return request.WhichOneof("kind") == "hello" and request.hello.token == token


def hello_case(raw: RawReplication, rng: random.Random, counts: Counts) -> None:
    """Garbage or a mutated hello instead of a hello: refused, nothing applied."""
    offer = raw.offer(FZ, first_sequence=1, primary_id="fuzz")
    valid = replication_pb2.MirrorRequest(hello=replication_pb2.DataChannelHello(token=offer.token))
    r = rng.random()
    if r < 0.4:
        head = frame(mutate_bytes(rng, valid.SerializeToString()))
    elif r < 0.6:
        head = mutate_bytes(rng, frame(valid.SerializeToString()))
    elif r < 0.8:
        head = rng.randbytes(rng.choice([1, 3, 4, 5, 64, 4096, 5000]))
    else:
        head = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x10\x01", frame(b""), frame(b"\x1a")])
    if opens_a_session(head, offer.token):
        counts.add(counts.outcomes, "hello:still-valid")
        return  # the mutation left a valid hello in front: not this case's business
    body = encoded(1, [(0, rng.randbytes(BS))], rng)
    conn = DataConnection((offer.host, offer.port))
    conn.send(head + frame(body))
    with_shutdown(conn)
    replies = conn.replies_until_closed(60)
    codes = [r.error_code for r in replies]
    assert not [r for r in replies if not r.error_code], (
        f"a batch after a broken hello was applied: {replies}"
    )
    assert len(codes) <= 1 and set(codes) <= BEFORE_HELLO_CODES, f"a broken hello answered {codes}"
    counts.add(counts.outcomes, f"hello:{codes[0] if codes else 'closed'}")


def run_channel_fuzz(daemons: Daemons, tmp: Path, seed: int, n: int) -> None:
    need("qemu-io")
    rig = start_rig(daemons, tmp, seed)
    standby = rig.standby
    before = protected_digests(rig)
    raw = RawReplication(standby.grpc)
    raw.handshake(FZ, FZ_SIZE, BS, primary_id="fuzz")
    model = Model()
    memory = Memory.of(standby)
    counts = Counts()
    started = time.monotonic()
    try:
        for i in case_indices(n):
            rng = random.Random(f"{seed}:channel:{i}")
            with named_case(i, standby):
                if rng.random() < 0.1:
                    hello_case(raw, rng, counts)
                else:
                    session_case(raw, rig.replica_path(FZ), rng, model, counts)
                daemon_alive(standby)
                got = rig.replica_path(FZ).read_bytes()
                assert_same_blocks(got, bytes(model.data), "fz0 differs from the model")
            counts.cases += 1
            if i % 50 == 0:
                memory.sample()
        print(
            f"data channel: {counts.cases} cases in {time.monotonic() - started:.1f} s; frames "
            f"{dict(sorted(counts.frames.items()))}\noutcomes {dict(sorted(counts.outcomes.items()))}\n"
            f"{memory.summary()}; fz0 applied {model.applied_batches} batches"
        )
    finally:
        raw.close()
    check_standby_after_fuzz(rig, before, memory, "Exception in thread")
    assert_still_mirrors(rig)


def test_data_channel_fuzz_short(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_channel_fuzz(daemons, tmp_path, fuzz_seed, cases(2000, 50000, is_soak=False))


@pytest.mark.soak
def test_data_channel_fuzz_soak(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_channel_fuzz(daemons, tmp_path, fuzz_seed, cases(2000, 50000, is_soak=True))

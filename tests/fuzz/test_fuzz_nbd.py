"""Fuzzing of the NBD servers of the real daemons: raw bytes at every phase of a session, and
structure-aware mutations of valid handshakes and requests (one field or a few bytes changed, frames cut,
split with pauses, dropped mid-request, many connections at once).

Targets: the read-only snapshot export ``vol0@fuzzfrozen`` of the standby, and the read-write volume
export ``vol0`` of the primary (whose mutations are kept from ever forming a valid write, so its image
must not change either). After every case: the daemon is alive and a fresh, well-behaved client on
another connection reads the export correctly; every few cases and at the end: the daemon's RSS stays
within `RSS_GROWTH_LIMIT` of its start, and at the end the whole export, the primary's file and the
standby's replica still hold exactly the image. Valid sessions sent in odd pieces are also checked
reply by reply (the data of each READ, the errno of each refused request, block status against holes).

Short runs are part of `make test`; `make soak` runs the long ones (`FUZZ_CASES` overrides the count,
`FUZZ_SEED` replays a run, `FUZZ_CASE` one case of it).
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_support import Daemons, need
from fuzz_support import (
    BS,
    ODD_NAMES,
    SNAPSHOT,
    VOLUME,
    VOLUME_SIZE,
    Memory,
    Raw,
    Rig,
    assert_logged_none,
    case_indices,
    cases,
    client_flags,
    daemon_alive,
    go_data,
    meta_data,
    mutate_bytes,
    name_bytes,
    option,
    qemu_compare,
    read_export,
    request,
    sha,
    spot_check,
    start_rig,
    u32,
    u64,
    unread_by_peer,
)

from standbylib.nbd import protocol as p
from standbylib.nbd.errnos import WRITING
from standbylib.nbd.handshake import MAX_OPTION, MAX_REQUEST

pytestmark = pytest.mark.timeout(1800)

META = p.META_BASE_ALLOCATION.encode()
#: Log lines that betray an unexpected exception in a daemon (a bug, even when it survived it).
SUSPICIOUS = ("unexpected error", "Traceback", "internal_error", '"level": "critical"')


@dataclass
class Target:
    """One export under fuzz."""

    name: str  # "standby" | "primary"
    address: str
    export: str
    readonly: bool
    image: bytes
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def export_b(self) -> bytes:
        return self.export.encode()


# -- building sessions ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """What a client sends after the greeting: option frames, then request frames."""

    options: list[bytes]
    requests: list[bytes]
    structured: bool
    meta: bool


def valid_plan(t: Target, rng: random.Random, *, n: int | None = None) -> Plan:
    """A well-formed session: options ending in NBD_OPT_GO, then reads, block status and flushes."""
    structured = rng.random() < 0.6
    meta = structured and rng.random() < 0.7
    opts = [client_flags(no_zeroes=rng.random() < 0.5)]
    if rng.random() < 0.3:
        opts.append(option(p.OPT_LIST))
    if structured:
        opts.append(option(p.OPT_STRUCTURED_REPLY))
    if meta:
        if rng.random() < 0.3:
            opts.append(option(p.OPT_LIST_META_CONTEXT, meta_data(t.export_b, [b"base:"])))
        opts.append(option(p.OPT_SET_META_CONTEXT, meta_data(t.export_b, [META])))
    if rng.random() < 0.3:
        opts.append(option(p.OPT_INFO, go_data(t.export_b, [p.INFO_BLOCK_SIZE])))
    opts.append(option(p.OPT_GO, go_data(t.export_b, [p.INFO_EXPORT] if rng.random() < 0.5 else [])))
    reqs = []
    for i in range(rng.randrange(1, 8) if n is None else n):
        length = rng.choice([512, BS, 8 * BS, 64 * BS])
        offset = rng.randrange(0, VOLUME_SIZE - length + 1) // 512 * 512
        kind = rng.random()
        cookie = rng.getrandbits(64)
        if kind < 0.7:
            reqs.append(request(p.CMD_READ, offset, length, cookie))
        elif kind < 0.85 and meta:
            reqs.append(request(p.CMD_BLOCK_STATUS, offset, length, cookie, flags=rng.choice([0, 8])))
        else:
            reqs.append(request(p.CMD_FLUSH, 0, 0, cookie + i))
    return Plan(opts, reqs, structured, meta)


def writes_nothing(t: Target, stream: bytes) -> bool:
    """Whether the server, parsing `stream` as the transmission phase, meets no write it would apply.

    Mirrors `Transmission._loop`/`_validate` closely enough: a WRITE consumes its payload; a bad magic or
    a DISC ends the session."""
    pos = 0
    while pos + p.REQUEST.size <= len(stream):
        magic, _flags, command, _cookie, offset, length = p.REQUEST.unpack_from(stream, pos)
        pos += p.REQUEST.size
        if magic != p.REQUEST_MAGIC or command == p.CMD_DISC:
            return True
        in_range = length > 0 and offset + length <= VOLUME_SIZE
        if command in WRITING and in_range and (command != p.CMD_WRITE or length <= MAX_REQUEST):
            return False
        if command == p.CMD_WRITE:
            pos += length
    return True


def defuse(t: Target, frame: bytes) -> bytes:
    """For the read-write target: turn a request that would write into one beyond the export."""
    if t.readonly or len(frame) < p.REQUEST.size:
        return frame
    magic, flags, command, cookie, offset, length = p.REQUEST.unpack_from(frame)
    if command in WRITING and length and offset + length <= VOLUME_SIZE:
        offset = VOLUME_SIZE + offset  # ENOSPC, whatever else is wrong
    return p.REQUEST.pack(magic, flags, command, cookie, offset, length) + frame[p.REQUEST.size :]


def mutate_option(t: Target, rng: random.Random, frame: bytes) -> bytes:
    """One field of an option frame (or of its data) changed, or its bytes mutated."""
    if len(frame) < p.OPTION_HEADER.size:
        return mutate_bytes(rng, frame)
    magic, opt, length = p.OPTION_HEADER.unpack_from(frame)
    data = frame[p.OPTION_HEADER.size :]
    kind = rng.randrange(9)
    if kind == 0:
        magic = rng.choice([0, p.OPTS_MAGIC ^ 1, p.INIT_MAGIC, rng.getrandbits(64)])
    elif kind == 1:
        opt = rng.choice(
            [0, 12, 13, 255, 0x7FFFFFFF, 1 << 31, (1 << 32) - 1, p.OPT_STARTTLS, rng.getrandbits(32)]
        )
        opt = rng.choice([opt, rng.randrange(0, 14)])
    elif kind == 2:
        length = rng.choice([0, 1, len(data) - 1, len(data) + 1, MAX_OPTION, MAX_OPTION + 1, u32(rng)])
        length = max(0, min(length, (1 << 32) - 1))
    elif kind == 3:  # another export name, with the lengths fixed
        name = rng.choice([*ODD_NAMES, t.export_b + rng.choice([b"\x00", b"/", b"@", b"\xff"])])
        data = go_data(name, [rng.randrange(0, 5) for _ in range(rng.randrange(3))])
        length = len(data)
    elif kind == 4:  # the name length lies
        name = t.export_b
        data = name_bytes(name, length=u32(rng, len(name))) + data[4 + len(name) :]
        length = len(data)
    elif kind == 5:  # information request count or meta context count lies
        if opt in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            data = meta_data(
                t.export_b, [META, b"base:", b"qemu:dirty-bitmap:x"][: rng.randrange(4)], count=u32(rng)
            )
        else:
            data = go_data(t.export_b, [0, 3], count=rng.choice([0, 1, 3, 0xFFFF, rng.getrandbits(16)]))
        length = len(data)
    elif kind == 6:  # meta context queries with odd names
        queries = [rng.choice([META, b"", b"base:", b"base:allocation\x00", rng.choice(ODD_NAMES)[:200]])]
        data = meta_data(rng.choice([t.export_b, rng.choice(ODD_NAMES)]), queries * rng.randrange(1, 4))
        opt = rng.choice([p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT])
        length = len(data)
    elif kind == 7:  # NBD_OPT_EXPORT_NAME with an odd name
        data = rng.choice([*ODD_NAMES, t.export_b])
        opt, length = p.OPT_EXPORT_NAME, len(data)
    else:
        return mutate_bytes(rng, frame)
    return p.OPTION_HEADER.pack(magic, opt, length) + data


def mutate_request(t: Target, rng: random.Random, frame: bytes) -> bytes:
    """One field of a request header changed; a WRITE gets its payload (whole, short or missing)."""
    magic, flags, command, cookie, offset, length = p.REQUEST.unpack_from(frame)
    kind = rng.randrange(8)
    if kind == 0:
        magic = rng.choice([0, p.REQUEST_MAGIC ^ 1, p.SIMPLE_REPLY_MAGIC, rng.getrandbits(32)])
    elif kind == 1:
        flags = rng.choice([1, 2, 4, 8, 16, 0x20, 0x8000, 0xFFFF, rng.getrandbits(16)])
    elif kind == 2:
        command = rng.choice(
            [p.CMD_CACHE, p.CMD_RESIZE, 9, 10, 0x7FFF, 0xFFFF, p.CMD_TRIM, p.CMD_WRITE_ZEROES]
        )
        command = rng.choice([command, rng.randrange(0, 12), p.CMD_BLOCK_STATUS])
    elif kind == 3:
        cookie = rng.choice([0, (1 << 64) - 1, cookie ^ 1])
    elif kind == 4:
        offset = u64(rng, VOLUME_SIZE)
    elif kind == 5:
        length = u32(rng, VOLUME_SIZE)
    elif kind == 6:
        offset, length = u64(rng, VOLUME_SIZE), u32(rng, VOLUME_SIZE)
    else:
        command = p.CMD_WRITE
        length = rng.choice([512, BS, 64 * BS, MAX_REQUEST, MAX_REQUEST + 1, u32(rng)])
        offset = rng.choice([offset, u64(rng, VOLUME_SIZE)])
    out = defuse(t, p.REQUEST.pack(magic, flags, command, cookie, offset, length))
    if command == p.CMD_WRITE and magic == p.REQUEST_MAGIC:
        give = min(length, rng.choice([length, length, 0, length // 2, 1]), 256 << 10)
        out += rng.randbytes(give)
    return out


# -- cases ---------------------------------------------------------------------------------------------


def negotiate(t: Target, rng: random.Random, plan: Plan) -> Raw | None:
    """Connect and negotiate `plan`'s options, reading the server's replies; None if it refused."""
    c = Raw(t.address)
    if c.recv_exact(p.GREETING.size) is None:
        c.close()
        return None
    c.send(b"".join(plan.options), rng, pauses=rng.random() < 0.3)
    # read option replies until the GO's ACK
    while True:
        head = c.recv_exact(p.OPTION_REPLY.size)
        if head is None:
            c.close()
            return None
        magic, opt, kind, length = p.OPTION_REPLY.unpack(head)
        assert magic == p.REP_MAGIC, f"bad option reply magic {magic:#x}"
        assert length <= 1 << 20, f"option reply of {length} bytes"
        if length and c.recv_exact(length) is None:
            c.close()
            return None
        if opt == p.OPT_GO and kind == p.REP_ACK:
            return c
        if opt == p.OPT_GO and kind & p.REP_FLAG_ERROR:
            raise AssertionError(f"valid NBD_OPT_GO of {t.export} refused: {kind:#x}")


def case_raw(t: Target, rng: random.Random) -> str:
    """Random bytes at one phase of a session."""
    phase = rng.choice(["connect", "greeting", "flags", "go", "transmission"])
    junk_len = rng.choice([1, 3, 8, 16, 27, 28, 100, 4096, 70000])
    junk = rng.randbytes(junk_len)
    if rng.random() < 0.3:  # random bytes that start like a frame go further
        starts = {
            "flags": p.OPTION_HEADER.pack(p.OPTS_MAGIC, rng.randrange(12), 0)[:12],
            "greeting": client_flags(),
            "go": p.U32.pack(p.REQUEST_MAGIC),
        }
        junk = starts.get(phase, p.U32.pack(p.REQUEST_MAGIC)) + junk
    if phase in ("go", "transmission"):
        plan = valid_plan(t, rng)
        c = negotiate(t, rng, plan)
        if c is None:
            return f"raw-{phase}-refused"
        if phase == "transmission":
            c.send(b"".join(plan.requests[: rng.randrange(len(plan.requests) + 1)]))
        if not t.readonly and not writes_nothing(t, junk):
            junk = junk[:27]
        c.send(junk, rng, pauses=rng.random() < 0.3)
    else:
        c = Raw(t.address)
        if phase != "connect":
            c.recv_exact(p.GREETING.size)
        if phase == "flags":
            c.send(client_flags())
        c.send(junk, rng, pauses=rng.random() < 0.3)
    c.drain(total=0.5)
    c.close(reset=rng.random() < 0.3)
    return f"raw-{phase}"


def case_handshake(t: Target, rng: random.Random) -> str:
    """A valid handshake with one frame mutated (or cut), sent whole or in pieces."""
    plan = valid_plan(t, rng, n=2)
    frames = list(plan.options)
    i = rng.randrange(len(frames))
    if i == 0:
        frames[0] = rng.choice(
            [p.CLIENT_FLAGS.pack(rng.choice([0, 2, 4, 3 | 4, 0xFFFFFFFF, rng.getrandbits(32)])), b"\x00\x00"]
        )
    else:
        frames[i] = mutate_option(t, rng, frames[i])
    stream = b"".join(frames)
    tail = b"".join(plan.requests)
    if rng.random() < 0.25:
        stream = stream[: rng.randrange(len(stream) + 1)]  # truncated
        tail = b""
    c = Raw(t.address)
    if rng.random() < 0.8:
        c.recv_exact(p.GREETING.size)
    c.send(stream, rng, pauses=rng.random() < 0.3)
    c.drain(total=0.5)
    # After a mutated handshake the server may have gone on to transmission: only harmless requests.
    c.send(tail if writes_nothing(t, tail) else b"")
    c.drain(total=0.5)
    c.close(reset=rng.random() < 0.3)
    return "handshake"


#: A case run on a negotiated session (`in_session`): given its target, rng, plan and connection.
SessionCase = Callable[[Target, random.Random, Plan, Raw], None]


def in_session(name: str) -> Callable[[SessionCase], Callable[[Target, random.Random], str]]:
    """A case that runs on a session of its own, negotiated from a valid plan: it is counted as `name`,
    or as ``name-refused`` when the server refused the negotiation."""

    def wrap(case: SessionCase) -> Callable[[Target, random.Random], str]:
        @functools.wraps(case)
        def run(t: Target, rng: random.Random) -> str:
            plan = valid_plan(t, rng)
            c = negotiate(t, rng, plan)
            if c is None:
                return f"{name}-refused"
            case(t, rng, plan, c)
            return name

        return run

    return wrap


@in_session("requests")
def case_requests(t: Target, rng: random.Random, plan: Plan, c: Raw) -> None:
    """A negotiated session whose requests have one field mutated; optionally a DISC, a cut or a drop."""
    reqs = list(plan.requests)
    for _ in range(rng.randrange(1, 3)):
        i = rng.randrange(len(reqs))
        reqs[i] = mutate_request(t, rng, reqs[i][: p.REQUEST.size])
    stream = b"".join(reqs)
    if rng.random() < 0.2:
        stream += request(p.CMD_DISC, 0, 0, 0) + rng.randbytes(rng.randrange(64))
    if rng.random() < 0.2:
        stream = stream[: rng.randrange(len(stream) + 1)]
    if not t.readonly and not writes_nothing(t, stream):
        raise AssertionError("mutated requests would write to the read-write export (fuzzer bug)")
    c.send(stream, rng, pauses=rng.random() < 0.3)
    c.drain(total=1.0)
    c.close(reset=rng.random() < 0.5)


@in_session("drop")
def case_drop(t: Target, rng: random.Random, plan: Plan, c: Raw) -> None:
    """A request cut anywhere (header or payload), then the connection dropped (FIN or RST)."""
    length = rng.choice([BS, 64 * BS, MAX_REQUEST])
    offset = rng.randrange(0, VOLUME_SIZE // BS) * BS
    if not t.readonly:
        offset += VOLUME_SIZE  # a write beyond the export: must be refused, never half applied
    frame = request(p.CMD_WRITE, offset, length, 77) + rng.randbytes(min(length, 128 << 10))
    if rng.random() < 0.5:
        frame = request(p.CMD_READ, rng.randrange(0, VOLUME_SIZE // BS) * BS, 64 * BS, 78) * 4
    c.send(
        b"".join(plan.requests[:1]) + frame[: rng.randrange(1, len(frame))], rng, pauses=rng.random() < 0.5
    )
    c.close(reset=rng.random() < 0.5)


@in_session("short-write")
def case_short_write(t: Target, rng: random.Random, plan: Plan, c: Raw) -> None:
    """A WRITE whose payload is shorter than announced, followed by more requests (which the server
    takes as payload), then silence and a drop."""
    length = rng.choice([BS, 16 * BS, 1 << 20])
    offset = 0 if t.readonly else VOLUME_SIZE
    payload = rng.randbytes(rng.randrange(0, length))
    follow = b"".join(plan.requests)
    c.send(request(p.CMD_WRITE, offset, length, 5) + payload + follow, rng, pauses=rng.random() < 0.3)
    c.drain(total=0.3)
    c.close(reset=rng.random() < 0.5)


def case_checked(t: Target, rng: random.Random) -> str:
    """A valid session, with requests the server must refuse, sent in random pieces with pauses: every
    reply is checked (READ data against the image, errnos, block status against the holes)."""
    plan = valid_plan(t, rng, n=rng.randrange(1, 12))
    expect: dict[int, tuple[int, int, int, int]] = {}  # cookie -> command, offset, length, errno
    reqs = []
    for frame in plan.requests:
        _m, _f, command, cookie, offset, length = p.REQUEST.unpack(frame)
        reqs.append(frame)
        expect[cookie] = (command, offset, length, 0)
    bad_cookie = 1 << 40
    for _ in range(rng.randrange(0, 4)):
        bad_cookie += 1
        kind = rng.randrange(5)
        if kind == 0:
            reqs.append(request(p.CMD_READ, VOLUME_SIZE - BS, 2 * BS, bad_cookie))
            expect[bad_cookie] = (p.CMD_READ, 0, 0, p.EINVAL)
        elif kind == 1:
            reqs.append(request(p.CMD_READ, (1 << 64) - BS, BS, bad_cookie))
            expect[bad_cookie] = (p.CMD_READ, 0, 0, p.EINVAL)
        elif kind == 2:
            reqs.append(request(rng.choice([p.CMD_CACHE, 9, 0xFFFF]), 0, BS, bad_cookie))
            expect[bad_cookie] = (p.CMD_CACHE, 0, 0, p.EINVAL)
        elif kind == 3:
            off = 0 if t.readonly else VOLUME_SIZE
            reqs.append(request(p.CMD_WRITE, off, 2 * BS, bad_cookie) + rng.randbytes(2 * BS))
            expect[bad_cookie] = (p.CMD_WRITE, 0, 0, p.EPERM if t.readonly else p.ENOSPC)
        else:
            reqs.append(request(p.CMD_READ, 0, MAX_REQUEST + BS, bad_cookie))
            expect[bad_cookie] = (p.CMD_READ, 0, 0, p.EINVAL)
    rng.shuffle(reqs)
    c = negotiate(t, rng, plan)
    if c is None:
        raise AssertionError(f"a valid negotiation with {t.export} failed")
    c.send(b"".join(reqs) + request(p.CMD_DISC, 0, 0, 0), rng, pauses=True)
    check_replies(t, c, plan.structured, expect)
    c.close()
    return "checked"


def check_replies(t: Target, c: Raw, structured: bool, expect: dict[int, tuple[int, int, int, int]]) -> None:
    pending = dict(expect)
    got: dict[int, bytearray] = {}
    while pending:
        head = c.recv_exact(4, timeout=30)
        assert head is not None, f"the server closed with replies missing for {sorted(pending)}"
        (magic,) = p.U32.unpack(head)
        if magic == p.SIMPLE_REPLY_MAGIC:
            rest = c.recv_exact(12, timeout=30)
            assert rest is not None
            error, cookie = p.SIMPLE_REPLY.unpack(head + rest)[1:]
            assert cookie in pending, f"reply for unknown or finished cookie {cookie}"
            command, offset, length, want_err = pending.pop(cookie)
            assert error == want_err, f"cookie {cookie} command {command}: errno {error}, expected {want_err}"
            if command == p.CMD_READ and not error:
                data = c.recv_exact(length, timeout=30)
                assert data == t.image[offset : offset + length], f"READ [{offset}, +{length}) wrong data"
            continue
        assert magic == p.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert structured, "structured reply without NBD_OPT_STRUCTURED_REPLY"
        rest = c.recv_exact(p.STRUCTURED_REPLY.size - 4, timeout=30)
        assert rest is not None
        _m, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack(head + rest)
        payload = c.recv_exact(length, timeout=30) if length else b""
        assert payload is not None
        assert cookie in pending, f"chunk for unknown or finished cookie {cookie}"
        command, offset, rlen, want_err = pending[cookie]
        buf = got.setdefault(cookie, bytearray(rlen) if command == p.CMD_READ else bytearray())
        if kind & p.REPLY_TYPE_FLAG_ERROR:
            (error, msg_len) = p.ERROR_CHUNK.unpack_from(payload)
            assert error == want_err and error, f"cookie {cookie}: errno {error}, expected {want_err}"
            assert len(payload) >= p.ERROR_CHUNK.size + msg_len
        elif kind == p.REPLY_TYPE_OFFSET_DATA:
            (at,) = p.OFFSET_DATA.unpack_from(payload)
            data = payload[8:]
            assert offset <= at and at + len(data) <= offset + rlen, (
                f"data chunk outside the request {cookie}"
            )
            assert data == t.image[at : at + len(data)], f"READ chunk at {at} of {len(data)} bytes wrong data"
            buf[at - offset : at - offset + len(data)] = data
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            at, n = p.OFFSET_HOLE.unpack(payload)
            assert offset <= at and at + n <= offset + rlen
            assert not any(t.image[at : at + n]), f"hole chunk [{at}, +{n}) over data"
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            assert command == p.CMD_BLOCK_STATUS, f"block status for command {command}"
            pos, total = offset, 0
            for i in range(4, len(payload), 8):
                n, state = p.EXTENT.unpack_from(payload, i)
                assert n > 0, "an extent of 0 bytes"
                if state & p.STATE_ZERO:
                    assert not any(t.image[pos : pos + n]), f"extent [{pos}, +{n}) said zero over data"
                pos += n
                total += n
            assert total > 0, "block status describes nothing"
        else:
            assert kind == p.REPLY_TYPE_NONE, f"unknown chunk type {kind}"
        if flags & p.REPLY_FLAG_DONE:
            pending.pop(cookie)
            if command == p.CMD_READ and not want_err:
                assert bytes(buf) == t.image[offset : offset + rlen], f"READ [{offset}, +{rlen}) wrong"


def case_many(t: Target, rng: random.Random) -> str:
    """Many connections at once, each running a random case."""
    n = rng.choice([8, 16, 32])
    seeds = [rng.getrandbits(64) for _ in range(n)]
    errors: list[BaseException] = []

    def one(seed: int) -> None:
        r = random.Random(seed)
        try:
            r.choice(SINGLE)(t, r)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a connection of the crowd hung"
    if errors:
        raise errors[0]
    return f"many-{n}"


def case_big_writes(t: Target, rng: random.Random, memory: Memory | None = None) -> str:
    """Connections each announcing a WRITE of the largest size the server accepts, sending part of its
    payload and waiting: the server must not hold that much memory per connection for data that never
    comes (to a read-only export, none at all)."""
    n = rng.choice([4, 8])
    conns = []
    for _ in range(n):
        plan = valid_plan(t, rng, n=0)
        c = negotiate(t, rng, plan)
        if c is None:
            continue
        offset = 0 if t.readonly else VOLUME_SIZE
        c.send(request(p.CMD_WRITE, offset, rng.choice([MAX_REQUEST, MAX_REQUEST - BS]), 9) + bytes(BS))
        conns.append(c)
    # Measured once the server has read what each connection sent (the request and part of its payload).
    deadline = time.monotonic() + 10
    while any(unread_by_peer(c.sock) for c in conns):
        assert time.monotonic() < deadline, "the server does not read the requests it was sent"
        time.sleep(0.005)
    if memory is not None:
        memory.sample()
    for c in conns:
        c.close(reset=True)
    return "big-writes"


SINGLE: list[Callable[[Target, random.Random], str]] = [
    case_raw,
    case_raw,
    case_handshake,
    case_handshake,
    case_handshake,
    case_requests,
    case_requests,
    case_requests,
    case_drop,
    case_short_write,
    case_checked,
    case_checked,
]
ALL: list[Callable[[Target, random.Random], str]] = [*SINGLE, *SINGLE, case_many]


# -- the runs ------------------------------------------------------------------------------------------


def fuzz(t: Target, seed: int, n: int, daemon: object, memory: Memory, check_every: int = 1) -> None:
    indices = case_indices(n)
    started = time.monotonic()
    for i in indices:
        rng = random.Random(f"{seed}:{t.name}:{i}")
        case = rng.choice(ALL)
        try:
            kind = case(t, rng)
        except (ConnectionError, TimeoutError) as e:
            daemon_alive(daemon)  # type: ignore[arg-type]
            raise AssertionError(f"case {i} ({case.__name__}): the server stopped answering: {e!r}") from e
        except AssertionError as e:
            raise AssertionError(f"case {i} ({case.__name__}) of {t.name}: {e} [FUZZ_CASE={i}]") from e
        t.counts[kind] = t.counts.get(kind, 0) + 1
        daemon_alive(daemon)  # type: ignore[arg-type]
        if i % check_every == 0:
            try:
                spot_check(t.address, t.export, lambda o, n: t.image[o : o + n], rng)
            except AssertionError as e:
                raise AssertionError(f"after case {i} ({kind}) of {t.name}: {e} [FUZZ_CASE={i}]") from e
        memory.sample()
    print(
        f"{t.name}: {len(indices)} cases in {time.monotonic() - started:.1f} s "
        f"{dict(sorted(t.counts.items()))}; {memory.summary()}"
    )


def run_nbd_fuzz(daemons: Daemons, tmp: Path, seed: int, n: int) -> None:
    need("qemu-img")
    rig: Rig = start_rig(daemons, tmp, seed)
    standby = Target("standby", rig.standby.nbd, f"{VOLUME}@{SNAPSHOT}", True, rig.image)
    primary = Target("primary", rig.primary.nbd, VOLUME, False, rig.image)
    for target, daemon in ((standby, rig.standby), (primary, rig.primary)):
        warm = random.Random(seed)
        for _ in range(5):
            spot_check(target.address, target.export, lambda o, n: rig.image[o : o + n], warm)
        memory = Memory.of(daemon)
        fuzz(target, seed, n, daemon, memory)
        case_big_writes(target, random.Random(seed), memory)
        memory.check()
    for d in (rig.standby.daemon, rig.primary.daemon):
        assert_logged_none(d, SUSPICIOUS)
    # at the end, everything holds the image exactly: each export read whole, the files, the replica
    daemon_alive(rig.standby)
    daemon_alive(rig.primary)
    for target in (standby, primary):
        got = read_export(target.address, target.export, VOLUME_SIZE)
        assert sha(got) == sha(rig.image), f"{target.name} export {target.export} changed"
    assert sha(rig.volume_path.read_bytes()) == sha(rig.image), "the primary's volume changed"
    assert sha(rig.replica_path().read_bytes()) == sha(rig.image), "the standby's replica changed"
    qemu_compare(rig.volume_path, f"nbd://{rig.standby.nbd}/{VOLUME}@{SNAPSHOT}")
    qemu_compare(rig.volume_path, f"nbd://{rig.primary.nbd}/{VOLUME}")


def test_nbd_fuzz_short(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_nbd_fuzz(daemons, tmp_path, fuzz_seed, cases(150, 3000, is_soak=False))


@pytest.mark.soak
def test_nbd_fuzz_soak(daemons: Daemons, tmp_path: Path, fuzz_seed: int) -> None:
    run_nbd_fuzz(daemons, tmp_path, fuzz_seed, cases(150, 3000, is_soak=True))

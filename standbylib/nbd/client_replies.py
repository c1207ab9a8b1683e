"""The NBD client's transmission phase on the wire: its requests in flight and the replies to them.

`ReplyReader` numbers each request (its cookie) and reads one reply message at a time, simple reply
or structured reply chunk, matching it to its request by cookie: a server may answer out of order and
interleave the chunks of several replies. READ data is received straight into the request's place in
the caller's buffer (`SocketReader.readinto`). A structured reply must cover the requested range
exactly: a chunk outside the range, overlapping chunks or a gap are protocol errors, never
zero-filled; only holes the server declared read as zeros. A server error becomes the request's
`NbdCommandError`; anything malformed is an `NbdProtocolError` (the stream cannot be trusted any
more).

`Job` (one range of a read, split into requests) and `Extent` (one run of base:allocation status)
are the results the client and the pool hand around. Sending, pipelining and translating socket
failures belong to `standbylib.nbd.client.NbdClient`.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from standbylib.nbd import protocol as p
from standbylib.nbd.client_errors import NbdCommandError, NbdProtocolError, errno_name
from standbylib.nbd.negotiate import MAX_REPLY_PAYLOAD
from standbylib.nbd.sockio import SocketReader

_ZEROS = memoryview(bytes(1 << 20))

_COMMAND_NAMES: Final = {p.CMD_READ: "READ", p.CMD_BLOCK_STATUS: "BLOCK_STATUS", p.CMD_DISC: "DISC"}


class Extent(NamedTuple):
    """One run of base:allocation status: `length` bytes with NBD_STATE_* `flags`."""

    length: int
    flags: int

    @property
    def is_hole(self) -> bool:
        """Unallocated on the server (NBD_STATE_HOLE): a backup need not read it."""
        return bool(self.flags & p.STATE_HOLE)

    @property
    def is_zero(self) -> bool:
        """Known to read as zeros (NBD_STATE_ZERO)."""
        return bool(self.flags & p.STATE_ZERO)


class Job:
    """One range of a read: its buffer and the requests it was split into."""

    __slots__ = ("error", "flight", "key", "length", "offset", "remaining", "view", "zeroed")

    def __init__(self, key: Any, offset: int, view: memoryview, *, zeroed: bool) -> None:
        self.key = key
        self.flight: list[int] = [0]  # requests in flight of the pipeline the job belongs to (shared)
        self.offset = offset
        self.length = len(view)
        self.view = view
        self.zeroed = zeroed  # the buffer is fresh (all zeros): hole chunks need not clear it
        self.remaining = 0  # requests not completed yet
        self.error: NbdCommandError | None = None


class Op:
    """One request in flight."""

    __slots__ = ("chunks", "command", "cookie", "error", "extents", "job", "length", "offset", "view")

    def __init__(
        self, cookie: int, command: int, offset: int, length: int, view: memoryview | None, job: Job | None
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.offset = offset
        self.length = length
        self.view = view
        self.job = job
        self.chunks: list[tuple[int, int]] = []  # content chunks received: (start within the op, length)
        self.error: tuple[int, str] | None = None  # (errno, message) of the first error chunk
        self.extents: list[Extent] | None = None

    def describe(self) -> str:
        return f"{_COMMAND_NAMES.get(self.command, str(self.command))} [{self.offset}, +{self.length})"


class ReplyReader:
    """The requests in flight on one connection, and the reading of their replies. One thread.

    `structured` and `meta_context_id` are what the handshake negotiated; the client sets them before
    the first request. `pending` maps the cookies in flight to their requests."""

    def __init__(self, rx: SocketReader, server: str, export: str) -> None:
        self.rx = rx
        self.server = server
        self.export = export
        self.structured = False
        self.meta_context_id: int | None = None
        self.pending: dict[int, Op] = {}
        self.cookie = 0  # the last cookie used

    def request(
        self, command: int, offset: int, length: int, view: memoryview | None, job: Job | None
    ) -> tuple[Op, bytes]:
        """Register a request; return it and its header (the caller sends headers in batches)."""
        self.cookie += 1
        cookie = self.cookie
        op = self.pending[cookie] = Op(cookie, command, offset, length, view, job)
        return op, p.REQUEST.pack(p.REQUEST_MAGIC, 0, command, cookie, offset, length)

    def pump(self) -> Op | None:
        """Receive one reply message (simple reply or structured chunk); the op it completed, if any."""
        rx = self.rx
        magic = rx.peek_blocking(p.U32)[0]
        if magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
            _, flags, kind, cookie, length = rx.unpack(p.STRUCTURED_REPLY)
            op = self.pending.get(cookie)
            if op is None:
                raise self._violation(f"reply chunk for cookie {cookie}, which no request in flight has")
            self._chunk(op, kind, length)
            if not flags & p.REPLY_FLAG_DONE:
                return None
            del self.pending[cookie]
            self._finish(op)
            self._completed(op)
            return op
        if magic == p.SIMPLE_REPLY_MAGIC:
            _, error, cookie = rx.unpack(p.SIMPLE_REPLY)
            op = self.pending.pop(cookie, None)
            if op is None:
                raise self._violation(f"reply for cookie {cookie}, which no request in flight has")
            if error:
                op.error = (error, "")
            elif op.command == p.CMD_READ:
                if self.structured:
                    raise self._violation(f"simple reply with data to {op.describe()} (structured replies)")
                assert op.view is not None
                rx.readinto(op.view)
            elif op.command == p.CMD_BLOCK_STATUS:
                raise self._violation(f"simple reply without error to {op.describe()}")
            self._completed(op)
            return op
        raise self._violation(f"bad reply magic {magic:#x}")

    def _chunk(self, op: Op, kind: int, length: int) -> None:
        rx = self.rx
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            if op.command != p.CMD_READ or length <= 8:
                raise self._violation(f"data chunk of {length} bytes in the reply to {op.describe()}")
            (at,) = rx.unpack(p.OFFSET_DATA)
            start, n = at - op.offset, length - 8
            if start < 0 or start + n > op.length:
                raise self._violation(
                    f"data chunk [{at}, +{n}) outside the requested range of {op.describe()}"
                )
            assert op.view is not None
            rx.readinto(op.view[start : start + n])
            op.chunks.append((start, n))
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            if op.command != p.CMD_READ or length != p.OFFSET_HOLE.size:
                raise self._violation(f"hole chunk of {length} bytes in the reply to {op.describe()}")
            at, n = rx.unpack(p.OFFSET_HOLE)
            start = at - op.offset
            if n == 0 or start < 0 or start + n > op.length:
                raise self._violation(
                    f"hole chunk [{at}, +{n}) outside the requested range of {op.describe()}"
                )
            assert op.view is not None and op.job is not None
            if not op.job.zeroed:
                view = op.view
                for i in range(start, start + n, len(_ZEROS)):
                    m = min(start + n - i, len(_ZEROS))
                    view[i : i + m] = _ZEROS[:m]
            op.chunks.append((start, n))
        elif kind == p.REPLY_TYPE_NONE:
            if length:
                raise self._violation(f"NBD_REPLY_TYPE_NONE chunk with {length} bytes of payload")
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            if (
                op.command != p.CMD_BLOCK_STATUS
                or length < 12
                or (length - 4) % 8
                or length > MAX_REPLY_PAYLOAD
            ):
                raise self._violation(f"block status chunk of {length} bytes in the reply to {op.describe()}")
            payload = rx.read(length)
            (context,) = p.U32.unpack_from(payload)
            if context != self.meta_context_id:
                raise self._violation(f"block status for metadata context {context}, which was not selected")
            if op.extents is not None:
                raise self._violation(f"two block status chunks in the reply to {op.describe()}")
            extents = [Extent(n, f) for n, f in p.EXTENT.iter_unpack(memoryview(payload)[4:])]
            if any(e.length == 0 for e in extents):
                raise self._violation(f"zero-length extent in the reply to {op.describe()}")
            op.extents = extents
        elif (
            kind & p.REPLY_TYPE_FLAG_ERROR
        ):  # an error chunk; unknown error types still carry an errno and a message
            if length < 6 or length > MAX_REPLY_PAYLOAD:
                raise self._violation(f"error chunk of {length} bytes in the reply to {op.describe()}")
            payload = rx.read(length)
            value, size = p.ERROR_CHUNK.unpack_from(payload)
            tail = 8 if kind == p.REPLY_TYPE_ERROR_OFFSET else 0
            if size > length - 6 - tail:
                raise self._violation(f"error message longer than its chunk in the reply to {op.describe()}")
            message = payload[6 : 6 + size].decode("utf-8", "replace").strip()
            if value == 0:
                raise self._violation(f"error chunk with error 0 in the reply to {op.describe()}")
            if op.error is None:
                op.error = (value, message)
        else:
            raise self._violation(f"unknown reply chunk type {kind} in the reply to {op.describe()}")

    def _finish(self, op: Op) -> None:
        """Check a completed structured reply: a successful READ covers its range exactly."""
        if op.error is not None:
            return
        if op.command == p.CMD_READ:
            chunks = op.chunks
            if len(chunks) == 1 and chunks[0] == (0, op.length):
                return
            chunks.sort()
            pos = 0
            for start, n in chunks:
                if start < pos:
                    raise self._violation(
                        f"overlapping chunks at offset {op.offset + start} in {op.describe()}"
                    )
                if start > pos:
                    break
                pos = start + n
            if pos != op.length:
                raise self._violation(
                    f"short read: the reply to {op.describe()} has no data for offset {op.offset + pos}"
                )
        elif op.command == p.CMD_BLOCK_STATUS and op.extents is None:
            raise self._violation(f"the reply to {op.describe()} has no block status")

    def _completed(self, op: Op) -> None:
        job = op.job
        if job is not None:
            job.remaining -= 1
            job.flight[0] -= 1
            if op.error is not None and job.error is None:
                job.error = self.command_error(op)

    def command_error(self, op: Op) -> NbdCommandError:
        """The `NbdCommandError` of a request the server answered with an error (of its whole range,
        when the request is part of a job)."""
        assert op.error is not None
        value, message = op.error
        return NbdCommandError(
            server=self.server,
            export=self.export,
            command=_COMMAND_NAMES.get(op.command, str(op.command)),
            offset=op.offset if op.job is None else op.job.offset,
            length=op.length if op.job is None else op.job.length,
            errno=value,
            error=errno_name(value),
            message=message,
        )

    def _violation(self, detail: str) -> NbdProtocolError:
        return NbdProtocolError(server=self.server, export=self.export, detail=detail)

"""NBD transmission phase: requests in, replies out, on one connection's blocking socket.

Threads: the connection's own thread reads requests. READs (and BLOCK_STATUS) on a device with read
plans (`standbylib.readplan.PlanSource`) are served right there. A READ and the READs buffered right
behind it that continue it (sequential clients send dozens at once) form a run of up to `BATCH_BYTES`:
one plan for the whole run, its file ranges read with ``preadv`` into a reused page-aligned buffer,
the plan closed (for a snapshot that releases the store's shared lock, so origin writes wait for the
copy, never for the network), then one reply per request, and the replies of everything buffered sent
with one ``sendmsg``. Plans marked ``zero_copy`` (plain files) are sent with ``sendfile`` instead of
being copied when the requests are large (`ZERO_COPY_MIN`). Everything else (writes, flush, trim,
reads of devices without plans) runs in the server's worker pool, at most `max_in_flight` per
connection, and its reply is written when it completes, out of order with the rest; the writer's lock
keeps each reply (or batch) whole.

Requests are checked before anything is done (`Transmission._validate`): the command flags each
command allows (`handshake.command_flags`), the 64 MiB limit (`MAX_REQUEST`), the export's size and
alignment; a refused request gets an errno reply (a refused WRITE's payload is read and dropped) and
the connection goes on.

Measured on 2 cores (nbdcopy, 4 connections, 256 KiB reads from the page cache; docs/NBD.md): a
``bytearray`` destination for ``preadv`` copied at a fifth of the speed of a page-aligned one (2 vs 11
GB/s: its data is not cache-line aligned), one ``sendmsg`` per batch instead of per reply halved the
syscalls and GIL hand-offs, and planning a run instead of each request cut the planning cost sevenfold.

It is longer than the other modules: it is one connection's loop, and its read runs, asynchronous
writes and replies share that connection's buffers, outbox and in-flight count (the handshake, the
replies' encoding and the socket I/O are in their own modules).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from os import preadv
from typing import Protocol, runtime_checkable

from standbylib.blockdev import BlockDevice
from standbylib.errors import StandbyError
from standbylib.nbd import protocol as p
from standbylib.nbd.errnos import WRITING, errno_for
from standbylib.nbd.handshake import BASE_ALLOCATION_ID, MAX_REQUEST, Session, command_flags
from standbylib.nbd.protocol import ProtocolError
from standbylib.nbd.replies import (
    Part,
    Segment,
    as_segment,
    data_header,
    error_reply,
    read_reply,
    send_parts,
    take,
)
from standbylib.nbd.sockio import SocketReader, SocketWriter
from standbylib.rawfile import Buffer
from standbylib.readplan import FileRange, Hole, PlanSource, ReadPlan, pread_full

log = logging.getLogger(__name__)

#: Replies batched before they are sent even if more requests are waiting.
BATCH_BYTES = 4 << 20
#: Initial size of a connection's reply buffer (it grows to hold the largest request).
BUFFER_BYTES = 8 << 20
#: Smallest READ sent with ``sendfile`` when its plan allows (``zero_copy``): a run of smaller ones is
#: copied into the reply buffer with one ``preadv`` and goes out with the rest of the batch in one
#: ``sendmsg``, where ``sendfile`` would cost a ``sendmsg`` for the header and a ``sendfile`` per reply
#: (4 KiB reads at depth 32: 0.3 of nbdkit's rate by reference, 1.0 copied).
ZERO_COPY_MIN = 64 << 10
_ALIGN = 4096  # each reply's data starts on a page: the kernel copies page-aligned data fastest


class PeerGone(ConnectionError):
    """Sending replies failed: the client went away (or reset the connection); the connection ends."""


#: What an asynchronous write's completion returns: a function that sends its queued reply, or None.
Sender = Callable[[], None] | None


@runtime_checkable
class AsyncWriter(Protocol):
    """Optional device method: a write that never blocks its caller (see `MirroredDevice.write_async`).

    ``write_async(offset, data, done)`` writes, arranges for ``done()`` once the write is complete
    (possibly before it returns) and returns True; or returns False, having done nothing, when it
    would block, and the server runs a plain `write` in its pool instead. Errors raise, or, found
    once the write was started, are given to ``done(error)`` (the client gets the error's errno).
    ``done`` queues the reply and returns a function that sends what is queued: a device completing
    many writes at once calls each ``done``, then each distinct function it got once.

    ``more`` says further requests are already buffered on the connection: the device may hold back
    work it would start for this write alone (the primary's mirror: sending a batch), so that the
    writes of a burst share it; the server calls ``send_pending()`` before it waits for the next
    request."""

    def write_async(
        self, offset: int, data: Buffer, done: Callable[..., Sender], more: bool = False
    ) -> bool: ...

    def send_pending(self) -> None: ...


@runtime_checkable
class ExtentSource(Protocol):
    """Optional device method: ``extents(offset, length)`` -> consecutive ``(length, is_hole)`` runs."""

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...


class Transmission:
    """Serve the requests of one connection until NBD_CMD_DISC or the end of the connection.

    `run` blocks the calling (connection) thread; it returns once every request of the connection
    handed to `pool` has completed.
    """

    def __init__(
        self,
        reader: SocketReader,
        writer: SocketWriter,
        session: Session,
        *,
        pool: Executor,
        max_in_flight: int,
        min_block: int,
    ) -> None:
        assert session.device is not None
        self.reader = reader
        self.writer = writer
        self.session = session
        self.device: BlockDevice = session.device
        self.pool = pool
        self.min_block = min_block
        self._allowed = command_flags(session.flags)  # command -> the command flags it may carry
        # For the READ fast path: the export's size as announced, what a READ may carry, alignment.
        self._size = self.device.size
        self._read_flags = self._allowed[p.CMD_READ]
        self._mask = min_block - 1
        # Protocol isinstance checks are slow (a few us): decide once per connection.
        self.planner = self.device if isinstance(self.device, PlanSource) else None
        self.inline = self.planner is not None
        self.async_writer = self.device if isinstance(self.device, AsyncWriter) else None
        self._thread_id = 0
        self._async_writes = 0  # started with write_async, not replied yet (under _in_flight_lock)
        self._deferring = False  # a write_async was told more requests follow: call send_pending
        self._outbox: list[Part] = []  # their replies completed on other threads, not sent yet
        self._outbox_count = 0
        self._outbox_lock = threading.Lock()
        self._slots = threading.Semaphore(max_in_flight)
        self._in_flight: set[Future[None]] = set()
        self._in_flight_lock = threading.Lock()
        self._all_done = threading.Condition(self._in_flight_lock)
        # Batch of inline replies not sent yet, and the plans whose file ranges it sends by reference.
        self._pending: list[Part] = []
        self._pending_bytes = 0
        self._held: list[ReadPlan] = []
        self._buf: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._pos = 0

    # -- request loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        self._thread_id = threading.get_ident()
        try:
            self._loop()
        finally:
            try:
                if self._deferring:
                    self._send_deferred()  # the writes below complete only once it is sent
                self._flush()
            finally:
                self._release_held()
                with self._all_done:
                    while self._in_flight or self._async_writes:
                        self._all_done.wait()
                self._drop_buffer()

    def _loop(self) -> None:
        reader = self.reader
        header_size = p.REQUEST.size
        inline, size, read_flags, mask = self.inline, self._size, self._read_flags, self._mask
        while True:
            if reader.buffered() < header_size:
                # No further request at hand: never wait for one with work held back or replies unsent.
                if self._deferring:
                    self._send_deferred()
                if self._pending:
                    self._flush()
            magic, flags, command, cookie, offset, length = reader.unpack(p.REQUEST)
            if magic != p.REQUEST_MAGIC:
                raise ProtocolError(detail=f"bad request magic {magic:#x}")
            if (
                command == p.CMD_READ
                and inline
                and not flags & ~read_flags
                and 0 < length <= MAX_REQUEST
                and offset + length <= size
                and not (offset | length) & mask
            ):
                # The common case first, checked inline (what `_validate` accepts): small reads
                # cost a few microseconds each, and a method call is a tenth of a microsecond.
                self._read_run(cookie, offset, length, flags & p.CMD_FLAG_DF)
                if self._pending_bytes >= BATCH_BYTES:
                    self._flush()
                continue
            payload: Buffer | None = None
            if command == p.CMD_DISC:
                return
            error = self._validate(command, flags, offset, length)
            if command == p.CMD_WRITE:
                if reader.buffered() < length:
                    if self._deferring:
                        self._send_deferred()
                    self._flush()
                if error is not None:  # refused: its payload is consumed, never held
                    reader.discard(length)
                else:
                    payload = reader.read(length)
            if error is not None:
                self._queue(self._error_parts(cookie, *error))
            elif self.inline and command == p.CMD_READ:
                self._read_run(cookie, offset, length, flags & p.CMD_FLAG_DF)
                if self._pending_bytes >= BATCH_BYTES:
                    self._flush()
            elif self.inline and command == p.CMD_BLOCK_STATUS:
                self._queue(self._block_status(command, flags, cookie, offset, length))
            elif command == p.CMD_WRITE and self.async_writer is not None and not flags & p.CMD_FLAG_FUA:
                assert payload is not None
                if not self._write_async(cookie, offset, payload):
                    self._submit(command, flags, cookie, offset, length, payload)
            else:
                self._submit(command, flags, cookie, offset, length, payload)

    def _validate(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str] | None:
        """Return ``(errno, message)`` for a request that must not reach the device, else None."""
        session, device = self.session, self.device
        allowed = self._allowed.get(command)
        if allowed is None:
            return p.EINVAL, f"unsupported command {command}"
        if command == p.CMD_BLOCK_STATUS and not (session.structured and session.meta_allocation):
            return p.EINVAL, "NBD_CMD_BLOCK_STATUS needs structured replies and base:allocation"
        if command in WRITING and device.readonly:
            return p.EPERM, f"export {session.name!r} is read-only"
        if flags & ~allowed:
            return p.EINVAL, f"command flags {flags:#x} not valid on command {command} of this export"
        if command == p.CMD_FLUSH:
            return (p.EINVAL, "NBD_CMD_FLUSH takes no range") if offset or length else None
        if length == 0:
            return p.EINVAL, "zero-length request"
        if command in (p.CMD_READ, p.CMD_WRITE) and length > MAX_REQUEST:
            return p.EINVAL, f"request of {length} bytes exceeds {MAX_REQUEST}"
        if offset + length > device.size:
            err = p.ENOSPC if command in WRITING else p.EINVAL
            return err, f"request [{offset}, +{length}) is beyond the export size {device.size}"
        mask = self.min_block - 1
        if (offset | length) & mask and command != p.CMD_BLOCK_STATUS:
            return p.EINVAL, f"request not aligned to {self.min_block} bytes"
        return None

    # -- inline reads ---------------------------------------------------------------------------------

    def _read_run(self, cookie: int, offset: int, length: int, df: int = 0) -> None:
        """Serve this READ together with the READs buffered right behind it that continue it (a client
        reading sequentially sends many at once): one plan and one copy for all, a reply for each.
        Planning a run costs about what planning one request does (one lock, one index lookup, one
        hole lookup), and contiguous file ranges are read with one ``preadv``. A READ with
        NBD_CMD_FLAG_DF (`df`) is served alone and answered with one data chunk, holes as zeros."""
        reads = [(cookie, length)]
        end = offset + length
        smallest = length
        reader = self.reader
        limit = end if df else min(offset + BATCH_BYTES, self._size)
        mask = self._mask
        while end < limit:
            ahead = reader.peek(p.REQUEST)
            if ahead is None:
                break
            magic, next_flags, command, next_cookie, next_offset, next_length = ahead
            # A valid READ without flags that continues the run (what `_validate` would accept,
            # checked inline).
            if (
                command != p.CMD_READ
                or next_flags
                or next_offset != end
                or magic != p.REQUEST_MAGIC
                or not 0 < next_length <= limit - end
                or (next_length & mask)
            ):
                break
            reader.skip(p.REQUEST.size)
            reads.append((next_cookie, next_length))
            end += next_length
            smallest = min(smallest, next_length)
        # sendfile pays a syscall per reply (and one for its header): only for large requests.
        segments = self._read_segments(offset, end - offset, reads, smallest >= ZERO_COPY_MIN)
        if segments is None:
            return
        self._pending_bytes += end - offset
        if len(segments) == 1 and not isinstance(segments[0], int):
            # The common case, the whole run is data: a slice of it and a header per request.
            data = segments[0]
            pending = self._pending
            structured = self.session.structured
            if len(reads) == 1:
                pending.append(data_header(cookie, offset, length) if structured else p.simple_reply(cookie))
                pending.append(data)
                return
            pos = offset
            for cookie, n in reads:
                at = pos - offset
                if isinstance(data, FileRange):
                    piece: Part = FileRange(data.fd, data.offset + at, n)
                else:
                    piece = memoryview(data)[at : at + n]
                pending.append(data_header(cookie, pos, n) if structured else p.simple_reply(cookie))
                pending.append(piece)
                pos += n
            return
        if df:
            self._queue(read_reply(cookie, offset, segments, structured=True, one_chunk=True))
            return
        k = cut = 0
        pos = offset
        for cookie, n in reads:
            mine, k, cut = take(segments, k, cut, n)
            self._queue(self._read_parts(cookie, pos, mine))
            pos += n

    def _read_segments(
        self, offset: int, length: int, reads: list[tuple[int, int]], by_reference: bool
    ) -> list[Segment] | None:
        """Plan ``[offset, offset+length)`` and copy it into the reply buffer (or, `by_reference` and
        if the plan allows, hold the plan for sendfile); None after queueing an error reply for each
        of `reads` when that failed."""
        assert self.planner is not None
        try:
            plan = self.planner.read_plan(offset, length)
        except Exception as e:
            self._fail_all(reads, e)
            return None
        pieces = plan.pieces
        if len(pieces) == 1 and type(pieces[0]) is FileRange and not (by_reference and plan.zero_copy):
            # One file range (a plain file, a snapshot range from one place): `_copy` made short.
            try:
                fd, at, n = pieces[0]
                view = self._reserve(n)
                dest = view[self._pos - n : self._pos]
                if preadv(fd, [dest], at) != n:  # short: end of file, or a signal
                    pread_full(fd, dest, at)
            except PeerGone:
                raise
            except Exception as e:
                self._fail_all(reads, e)
                return None
            finally:
                plan.close()
            return [dest]
        held = False
        try:
            segments: list[Segment] = []
            if plan.zero_copy and by_reference:
                for piece in plan.pieces:
                    segments.append(piece.length if isinstance(piece, Hole) else as_segment(piece))
                held = any(isinstance(s, FileRange) for s in segments)
            else:
                self._copy(plan, segments, length)
        except PeerGone:
            raise  # sending the batch to make room failed: the connection ends, no read failed
        except Exception as e:
            self._fail_all(reads, e)
            return None
        finally:
            if held:
                self._held.append(plan)
            else:
                plan.close()
        return segments

    def _fail_all(self, reads: list[tuple[int, int]], exc: Exception) -> None:
        error = self._failure(p.CMD_READ, reads[0][0], exc)
        self._queue(error)
        for cookie, _n in reads[1:]:
            self._queue(self._error_parts(cookie, errno_for(exc, p.CMD_READ), str(exc)))

    def _copy(self, plan: ReadPlan, segments: list[Segment], length: int) -> None:
        """Copy `plan` into the reply buffer; append its segments (buffer views and hole lengths)."""
        view = self._reserve(length)
        start = self._pos - length
        pos = run = 0
        for piece in plan.pieces:
            n = piece.length
            if isinstance(piece, Hole):
                if pos > run:
                    segments.append(view[start + run : start + pos])
                segments.append(n)
                pos += n
                run = pos
                continue
            if isinstance(piece, FileRange):
                dest = view[start + pos : start + pos + n]
                if preadv(piece.fd, [dest], piece.offset) != n:  # short: end of file, or a signal
                    pread_full(piece.fd, dest, piece.offset)
            else:
                view[start + pos : start + pos + n] = piece.data
            pos += n
        if pos > run:
            segments.append(view[start + run : start + pos])

    def _reserve(self, length: int) -> memoryview:
        """Room for `length` bytes at the next aligned position of the reply buffer (flushing the batch
        if it is full); returns the whole buffer's view, the room ending at ``self._pos``."""
        pos = -(-self._pos // _ALIGN) * _ALIGN
        if self._view is None or pos + length > len(self._view):
            self._flush()
            pos = 0
            if self._view is None or length > len(self._view):
                self._drop_buffer()
                size = max(BUFFER_BYTES, -(-length // _ALIGN) * _ALIGN)
                self._buf = mmap.mmap(-1, size)
                self._view = memoryview(self._buf)
        self._pos = pos + length
        return self._view

    def _read_parts(self, cookie: int, offset: int, segments: list[Segment]) -> list[Part]:
        return read_reply(cookie, offset, segments, structured=self.session.structured)

    # -- batch ----------------------------------------------------------------------------------------

    def _queue(self, parts: list[Part], nbytes: int = 0) -> None:
        """Add `parts` (about `nbytes` of data) to the batch."""
        self._pending.extend(parts)
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        """Send the batch, then close the plans it sent file ranges of."""
        if self._pending:
            try:
                with self.writer.lock:
                    send_parts(self.writer, self._pending)
            except OSError as e:
                self._pending = []
                self._pending_bytes = 0
                raise PeerGone(str(e)) from e
            self._pending = []
            self._pending_bytes = 0
        self._release_held()
        self._pos = 0
        if self._view is not None and len(self._view) > BUFFER_BYTES:
            self._drop_buffer()  # grown for one large READ: do not keep up to 64 MiB per connection

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for plan in held:
            plan.close()

    def _drop_buffer(self) -> None:
        view, buf = self._view, self._buf
        self._view = self._buf = None
        if view is not None and buf is not None:
            view.release()
            with contextlib.suppress(BufferError):  # a view still alive: the mapping goes with it
                buf.close()

    # -- everything else: the worker pool -----------------------------------------------------------

    def _submit(
        self, command: int, flags: int, cookie: int, offset: int, length: int, payload: Buffer | None
    ) -> None:
        if not self._slots.acquire(blocking=False):
            if self._deferring:
                self._send_deferred()  # the slots come back as those writes complete
            self._flush()
            self._slots.acquire()
        try:
            fut = self.pool.submit(self._serve, command, flags, cookie, offset, length, payload)
        except BaseException:
            self._slots.release()
            raise
        with self._in_flight_lock:
            self._in_flight.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        self._slots.release()
        with self._all_done:
            self._in_flight.discard(fut)
            if not self._in_flight:
                self._all_done.notify_all()

    # -- writes that complete later, without a worker ---------------------------------------------------

    def _write_async(self, cookie: int, offset: int, payload: Buffer) -> bool:
        """Start a WRITE on this thread (the device replies through a callback); False if the device
        would block, and nothing was done."""
        assert self.async_writer is not None
        if not self._slots.acquire(blocking=False):
            if self._deferring:
                self._send_deferred()  # the slots come back as those writes complete
            self._flush()
            self._slots.acquire()
        with self._all_done:
            self._async_writes += 1

        def done(error: Exception | None = None) -> Sender:
            if error is not None:
                return self._finish_async(self._failure(p.CMD_WRITE, cookie, error))
            return self._finish_async([p.simple_reply(cookie)])

        more = self.reader.buffered() >= p.REQUEST.size
        try:
            started = self.async_writer.write_async(offset, payload, done, more)
            self._deferring = self._deferring or (started and more)
        except Exception as e:
            self._queue(self._failure(p.CMD_WRITE, cookie, e))
            self._async_done(1)
            return True
        if not started:
            self._async_done(1)
        return started

    def _send_deferred(self) -> None:
        """Let the device start what `write_async` held back for a burst (see `AsyncWriter`)."""
        self._deferring = False
        assert self.async_writer is not None
        self.async_writer.send_pending()

    def _finish_async(self, parts: list[Part]) -> Sender:
        """The reply of an asynchronous write: batched when on the connection's thread; else queued
        in the outbox, and `_send_outbox` (returned) sends it."""
        if threading.get_ident() == self._thread_id:
            self._queue(parts)
            self._async_done(1)
            return None
        with self._outbox_lock:
            self._outbox.extend(parts)
            self._outbox_count += 1
        return self._send_outbox

    def _send_outbox(self) -> None:
        with self._outbox_lock:
            parts, self._outbox = self._outbox, []
            count, self._outbox_count = self._outbox_count, 0
        if not count:
            return
        try:
            with self.writer.lock:
                send_parts(self.writer, parts)
        except OSError as e:
            log.debug("nbd %s: reply to a gone client not sent: %s", self.session.name, e)
        self._async_done(count)

    def _async_done(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()
        with self._all_done:
            self._async_writes -= count
            if not self._async_writes:
                self._all_done.notify_all()

    def _serve(
        self, command: int, flags: int, cookie: int, offset: int, length: int, payload: Buffer | None
    ) -> None:
        """Run one request in a worker thread and write its reply."""
        device = self.device
        try:
            if command == p.CMD_READ:
                segments = _read_segments(device, offset, length, self.session)
                df = bool(flags & p.CMD_FLAG_DF)
                parts = read_reply(cookie, offset, segments, structured=self.session.structured, one_chunk=df)
            elif command == p.CMD_BLOCK_STATUS:
                parts = self._block_status(command, flags, cookie, offset, length)
            else:
                _apply(device, command, flags, offset, length, payload)
                parts = [p.simple_reply(cookie)]
        except Exception as e:
            parts = self._failure(command, cookie, e)
        try:
            with self.writer.lock:
                send_parts(self.writer, parts)
        except OSError as e:
            log.debug("nbd %s: reply to a gone client not sent: %s", self.session.name, e)

    def _block_status(self, command: int, flags: int, cookie: int, offset: int, length: int) -> list[Part]:
        try:
            extents = _extents(self.device, offset, length, bool(flags & p.CMD_FLAG_REQ_ONE))
        except Exception as e:
            return self._failure(command, cookie, e)
        return [p.block_status_chunk(cookie, BASE_ALLOCATION_ID, extents)]

    # -- errors ---------------------------------------------------------------------------------------

    def _failure(self, command: int, cookie: int, exc: Exception) -> list[Part]:
        """The error reply for `exc`, logged: library errors briefly, anything else with its traceback."""
        value = errno_for(exc, command)
        if isinstance(exc, StandbyError):
            log.info("nbd %s: %s -> %s", self.session.name, exc, p.ERRNO_NAMES.get(value, value))
            message = str(exc)
        else:
            log.error("nbd %s: unexpected error in command %d", self.session.name, command, exc_info=exc)
            message = "internal error"
        return self._error_parts(cookie, value, message)

    def _error_parts(self, cookie: int, error: int, message: str) -> list[Part]:
        return error_reply(cookie, error, message, structured=self.session.structured)


# -- helpers ------------------------------------------------------------------------------------------


def _apply(
    device: BlockDevice, command: int, flags: int, offset: int, length: int, payload: Buffer | None
) -> None:
    if command == p.CMD_WRITE:
        assert payload is not None
        device.write(offset, payload)
    elif command == p.CMD_WRITE_ZEROES and flags & p.CMD_FLAG_NO_HOLE:
        # The range must stay allocated: write zeros rather than deallocate (a piece at a time).
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZEROS))
            device.write(offset, _ZEROS[:n] if n < len(_ZEROS) else _ZEROS)
            offset += n
    elif command in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
        device.zero(offset, length)
    if command == p.CMD_FLUSH or flags & p.CMD_FLAG_FUA:
        device.flush()


#: Zeros written for NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE.
_ZEROS = bytes(1 << 20)


def _read_segments(device: BlockDevice, offset: int, length: int, session: Session) -> list[Segment]:
    """READ of a device without read plans: holes skipped when structured replies allow hole chunks.

    The segments cover the whole range: anything the device's extents leave out is read as data.
    """
    if not (session.structured and isinstance(device, ExtentSource)):
        return [device.read(offset, length)]
    segments: list[Segment] = []
    pos, end = offset, offset + length
    for run, hole in device.extents(offset, length):
        run = min(run, end - pos)
        if run <= 0:
            break
        segments.append(run if hole else device.read(pos, run))
        pos += run
    if pos < end:
        segments.append(device.read(pos, end - pos))
    return segments


def _extents(device: BlockDevice, offset: int, length: int, req_one: bool) -> list[tuple[int, int]]:
    """base:allocation descriptors for ``[offset, offset+length)``; all data without an extents method."""
    if not isinstance(device, ExtentSource):
        return [(length, 0)]
    out: list[tuple[int, int]] = []
    left = length
    for run, hole in device.extents(offset, length):
        run = min(run, left)
        if run <= 0:
            break
        flags = p.STATE_HOLE | p.STATE_ZERO if hole else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + run, flags)
        else:
            out.append((run, flags))
        left -= run
        if req_one:
            break
    if not out:
        return [(length, 0)]
    # Descriptor lengths are 32-bit; requests are at most 4 GiB - 1 so each run fits.
    return out[:1] if req_one else out

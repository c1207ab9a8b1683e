"""An NBD server exporting `BlockDevice`s: fixed newstyle handshake, structured replies, base:allocation.

Why asyncio: one event loop multiplexes every connection and keeps many requests in flight per
connection without a thread per request; device calls block (file I/O, store locks), so each runs in a
shared thread pool and its reply is written when it completes, possibly out of order. The loop runs in
its own thread, so synchronous callers and tests use `NbdServer.start` / `NbdServer.stop` directly.

Errors: a request that fails (bad range, read-only export, unknown command, a library `RequestError`,
or any device error) gets an errno reply and the connection goes on; a broken frame (bad magic, unknown
client flags, an oversize option) or an abrupt disconnect ends only that connection. Library
exceptions become errno values in one table, `ERRNO_TABLE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from standbylib.blockdev import BlockDevice
from standbylib.errors import (
    InvalidArgument,
    InvalidLength,
    OutOfRange,
    PreservationFull,
    ReadOnly,
    RequestError,
    StandbyError,
)
from standbylib.nbd import protocol as p
from standbylib.nbd.protocol import ProtocolError

log = logging.getLogger(__name__)

#: Largest READ/WRITE payload served; larger requests get EINVAL (a WRITE's payload is still consumed).
MAX_REQUEST = 32 << 20
#: Largest option payload accepted during the handshake; larger ones end the connection.
MAX_OPTION = 64 << 10
#: Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK_SIZE = 4096
#: Metadata context id of base:allocation (the only context offered).
BASE_ALLOCATION_ID = 1

#: Library exception -> NBD errno, most specific first. Anything not listed is EIO (and logged).
ERRNO_TABLE: tuple[tuple[type[BaseException], int], ...] = (
    (ReadOnly, p.EPERM),
    (OutOfRange, p.EINVAL),
    (InvalidLength, p.EINVAL),
    (InvalidArgument, p.EINVAL),
    (PreservationFull, p.ENOSPC),
    (RequestError, p.EIO),
    (StandbyError, p.EIO),
)

_WRITING = frozenset({p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES})


def errno_for(exc: BaseException, command: int) -> int:
    """The errno to send for `exc` raised while serving `command`.

    The spec asks for ENOSPC (not EINVAL) when a write reaches past the end of the export.
    """
    if isinstance(exc, OutOfRange) and command in _WRITING:
        return p.ENOSPC
    for kind, value in ERRNO_TABLE:
        if isinstance(exc, kind):
            return value
    return p.EIO


@runtime_checkable
class ExtentSource(Protocol):
    """Optional device method: ``extents(offset, length)`` -> consecutive ``(length, is_hole)`` runs."""

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]: ...


Exports = Mapping[str, BlockDevice] | Callable[[str], BlockDevice | None]


@dataclass
class _Session:
    """What one connection negotiated."""

    no_zeroes: bool = False
    structured: bool = False
    meta_export: str | None = None  # export the selected contexts apply to
    meta_allocation: bool = False
    name: str = ""
    device: BlockDevice | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class NbdServer:
    """Serve `exports` over NBD.

    `exports` maps an export name to a device, either as a mapping or as a callable returning None
    for unknown names (then `list_exports` supplies the names for NBD_OPT_LIST; without it the list
    is empty); the callable runs on the event-loop thread, so it must not block. The server never
    closes devices: their owner does, after `stop`.

    Threading: `start` runs an event loop in a background thread; device methods are called from a
    pool of `workers` threads, concurrently for requests in flight (devices are thread-safe). Each
    connection keeps at most `max_in_flight` requests in progress. `min_block_size` is advertised and
    enforced: requests not aligned to it get EINVAL.
    """

    def __init__(
        self,
        exports: Exports,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        list_exports: Callable[[], list[str]] | None = None,
        workers: int = 16,
        max_in_flight: int = 64,
        min_block_size: int = 1,
    ) -> None:
        if min_block_size < 1 or min_block_size & (min_block_size - 1):
            raise InvalidArgument(detail=f"min_block_size {min_block_size} must be a power of two")
        self._exports = exports
        self._list_exports = list_exports
        self._listen = listen
        self._workers = workers
        self._max_in_flight = max_in_flight
        self._min_block = min_block_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind, start serving in a background thread and return the bound ``(host, port)``."""
        if self._thread is not None:
            raise InvalidArgument(detail="server already started")
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="nbd-io")
        loop = asyncio.new_event_loop()
        self._loop = loop
        bound: list[tuple[str, int]] = []
        failure: list[BaseException] = []
        started = threading.Event()

        async def bind() -> None:
            try:
                self._server = await asyncio.start_server(self._accept, self._listen[0], self._listen[1])
                host, port = self._server.sockets[0].getsockname()[:2]
                bound.append((host, port))
            except BaseException as e:
                failure.append(e)
            finally:
                started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(bind())
            if not failure:
                loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="nbd-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            self._executor.shutdown()
            raise failure[0]
        self.address = bound[0]
        return self.address

    def stop(self) -> None:
        """Stop listening, end every connection, and wait for requests in progress to finish."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            fut.result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._thread = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        connections = dict(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.gather(*connections, return_exceptions=True)
        for writer in connections.values():
            writer.close()  # a task cancelled before its first step never reached its own close
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- exports --------------------------------------------------------------------------------------

    def _lookup(self, name: str) -> BlockDevice | None:
        if isinstance(self._exports, Mapping):
            return self._exports.get(name)
        return self._exports(name)

    def _names(self) -> list[str]:
        if isinstance(self._exports, Mapping):
            return list(self._exports)
        return list(self._list_exports()) if self._list_exports is not None else []

    def _transmission_flags(self, device: BlockDevice) -> int:
        flags = (
            p.FLAG_HAS_FLAGS
            | p.FLAG_SEND_FLUSH
            | p.FLAG_SEND_FUA
            | p.FLAG_CAN_MULTI_CONN
            | p.FLAG_SEND_TRIM
            | p.FLAG_SEND_WRITE_ZEROES
        )
        if device.readonly:
            flags |= p.FLAG_READ_ONLY
        return flags

    # -- connection -----------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback owning its task: asyncio's own wrapper for coroutine callbacks reports a
        # task cancelled at shutdown as an unhandled error.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections[task] = writer
        task.add_done_callback(lambda t: self._connections.pop(t, None))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        session = _Session()
        try:
            if await self._handshake(reader, writer, session):
                await self._transmission(reader, writer, session)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.debug("nbd client %s disconnected", peer)
        except ProtocolError as e:
            log.warning("nbd client %s: %s; closing the connection", peer, e)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("nbd client %s: unexpected error; closing the connection", peer)
        finally:
            if session.tasks:
                await asyncio.gather(*session.tasks, return_exceptions=True)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # -- handshake ------------------------------------------------------------------------------------

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _Session
    ) -> bool:
        """Negotiate options; True when an export was chosen and transmission begins."""
        writer.write(p.GREETING.pack(p.INIT_MAGIC, p.OPTS_MAGIC, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        await writer.drain()
        (client_flags,) = p.CLIENT_FLAGS.unpack(await reader.readexactly(p.CLIENT_FLAGS.size))
        if client_flags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise ProtocolError(detail=f"unknown client flags {client_flags:#x}")
        if not client_flags & p.FLAG_C_FIXED_NEWSTYLE:
            raise ProtocolError(detail="client does not support fixed newstyle negotiation")
        session.no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(await reader.readexactly(p.OPTION_HEADER.size))
            if magic != p.OPTS_MAGIC:
                raise ProtocolError(detail=f"bad option magic {magic:#x}")
            if length > MAX_OPTION:
                raise ProtocolError(detail=f"option {option} carries {length} bytes, limit {MAX_OPTION}")
            data = await reader.readexactly(length)

            def reply(kind: int, payload: bytes = b"", option: int = option) -> None:
                writer.write(p.option_reply(option, kind, payload))

            if option == p.OPT_EXPORT_NAME:
                name = data.decode("utf-8", "replace")
                device = self._lookup(name)
                if device is None:
                    raise ProtocolError(detail=f"unknown export {name!r} in NBD_OPT_EXPORT_NAME")
                self._select(session, name, device)
                writer.write(p.EXPORT_NAME_REPLY.pack(device.size, self._transmission_flags(device)))
                if not session.no_zeroes:
                    writer.write(p.ZERO_PAD)
                await writer.drain()
                return True
            if option == p.OPT_ABORT:
                reply(p.REP_ACK)
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                return False
            if option in (p.OPT_INFO, p.OPT_GO):
                if await self._info(data, option, writer, session):
                    return True
            elif option == p.OPT_LIST:
                if data:
                    reply(p.REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                else:
                    for name in self._names():
                        reply(p.REP_SERVER, p.pack_string(name))
                    reply(p.REP_ACK)
            elif option == p.OPT_STRUCTURED_REPLY:
                if data:
                    reply(p.REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                else:
                    session.structured = True
                    reply(p.REP_ACK)
            elif option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
                self._meta_context(option, data, writer, session)
            else:
                reply(p.REP_ERR_UNSUP, f"option {option} is not supported".encode())
            await writer.drain()

    def _select(self, session: _Session, name: str, device: BlockDevice) -> None:
        session.name = name
        session.device = device
        if session.meta_export != name:
            session.meta_allocation = False

    async def _info(self, data: bytes, option: int, writer: asyncio.StreamWriter, session: _Session) -> bool:
        """Answer NBD_OPT_INFO / NBD_OPT_GO; True when GO succeeded."""
        try:
            name, requests = _parse_info(data)
        except ProtocolError as e:
            writer.write(p.option_reply(option, p.REP_ERR_INVALID, str(e).encode()))
            return False
        device = self._lookup(name)
        if device is None:
            writer.write(p.option_reply(option, p.REP_ERR_UNKNOWN, f"unknown export {name!r}".encode()))
            return False
        del requests  # block sizes are sent whether asked or not, as the spec allows
        export = p.INFO_EXPORT_STRUCT.pack(p.INFO_EXPORT, device.size, self._transmission_flags(device))
        sizes = p.INFO_BLOCK_SIZE_STRUCT.pack(
            p.INFO_BLOCK_SIZE, self._min_block, max(self._min_block, PREFERRED_BLOCK_SIZE), MAX_REQUEST
        )
        writer.write(p.option_reply(option, p.REP_INFO, export))
        writer.write(p.option_reply(option, p.REP_INFO, sizes))
        writer.write(p.option_reply(option, p.REP_ACK))
        await writer.drain()
        if option == p.OPT_GO:
            self._select(session, name, device)
            return True
        return False

    def _meta_context(
        self, option: int, data: bytes, writer: asyncio.StreamWriter, session: _Session
    ) -> None:
        def reply(kind: int, payload: bytes = b"") -> None:
            writer.write(p.option_reply(option, kind, payload))

        if not session.structured:
            reply(p.REP_ERR_INVALID, b"negotiate NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            name, queries = _parse_meta(data)
        except ProtocolError as e:
            reply(p.REP_ERR_INVALID, str(e).encode())
            return
        if self._lookup(name) is None:
            reply(p.REP_ERR_UNKNOWN, f"unknown export {name!r}".encode())
            return
        if option == p.OPT_SET_META_CONTEXT:
            selected = p.META_BASE_ALLOCATION in queries
        else:
            selected = not queries or any(q in ("base:", p.META_BASE_ALLOCATION) for q in queries)
        if selected:
            ctx_id = BASE_ALLOCATION_ID if option == p.OPT_SET_META_CONTEXT else 0
            reply(p.REP_META_CONTEXT, p.U32.pack(ctx_id) + p.META_BASE_ALLOCATION.encode())
        if option == p.OPT_SET_META_CONTEXT:
            session.meta_export = name
            session.meta_allocation = selected
        reply(p.REP_ACK)

    # -- transmission ---------------------------------------------------------------------------------

    async def _transmission(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: _Session
    ) -> None:
        device = session.device
        assert device is not None
        slots = asyncio.Semaphore(self._max_in_flight)
        while True:
            header = await reader.readexactly(p.REQUEST.size)
            magic, flags, command, cookie, offset, length = p.REQUEST.unpack(header)
            if magic != p.REQUEST_MAGIC:
                raise ProtocolError(detail=f"bad request magic {magic:#x}")
            payload: bytes | None = None
            if command == p.CMD_WRITE:
                if length > MAX_REQUEST:
                    await _discard(reader, length)
                    self._send_error(writer, session, cookie, p.EINVAL, f"request of {length} bytes too big")
                    await writer.drain()
                    continue
                payload = await reader.readexactly(length)
            elif command == p.CMD_DISC:
                return
            await slots.acquire()
            task = asyncio.create_task(
                self._request(writer, session, device, command, flags, cookie, offset, length, payload)
            )
            session.tasks.add(task)

            def done(t: asyncio.Task[None]) -> None:
                session.tasks.discard(t)
                slots.release()

            task.add_done_callback(done)

    async def _request(
        self,
        writer: asyncio.StreamWriter,
        session: _Session,
        device: BlockDevice,
        command: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        payload: bytes | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            error = self._validate(session, device, command, flags, offset, length)
            if error is not None:
                self._send_error(writer, session, cookie, error[0], error[1])
            elif command == p.CMD_READ and session.structured and isinstance(device, ExtentSource):
                pieces = await loop.run_in_executor(self._executor, _read_sparse, device, offset, length)
                for i, (start, piece) in enumerate(pieces):
                    last = i == len(pieces) - 1
                    if isinstance(piece, int):
                        hole = p.OFFSET_HOLE.pack(start, piece)
                        writer.write(p.chunk_header(cookie, p.REPLY_TYPE_OFFSET_HOLE, len(hole), done=last))
                        writer.write(hole)
                    else:
                        header = p.chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + len(piece), done=last)
                        writer.write(header)
                        writer.write(p.OFFSET_DATA.pack(start))
                        writer.write(piece)
            elif command == p.CMD_READ:
                data = await loop.run_in_executor(self._executor, device.read, offset, length)
                if session.structured:
                    writer.write(p.chunk_header(cookie, p.REPLY_TYPE_OFFSET_DATA, 8 + length, done=True))
                    writer.write(p.OFFSET_DATA.pack(offset))
                else:
                    writer.write(p.simple_reply(cookie))
                writer.write(data)
            elif command == p.CMD_BLOCK_STATUS:
                extents = await loop.run_in_executor(
                    self._executor, _extents, device, offset, length, bool(flags & p.CMD_FLAG_REQ_ONE)
                )
                writer.write(p.block_status_chunk(cookie, BASE_ALLOCATION_ID, extents))
            else:
                fua = bool(flags & p.CMD_FLAG_FUA)
                await loop.run_in_executor(
                    self._executor, _apply, device, command, offset, length, payload, fua
                )
                writer.write(p.simple_reply(cookie))
        except Exception as e:
            value = errno_for(e, command)
            if isinstance(e, StandbyError):
                log.info("nbd %s: %s -> %s", session.name, e, p.ERRNO_NAMES.get(value, value))
                message = str(e)
            else:
                log.exception("nbd %s: unexpected error in command %d", session.name, command)
                message = "internal error"
            self._send_error(writer, session, cookie, value, message)
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _validate(
        self, session: _Session, device: BlockDevice, command: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        """Return ``(errno, message)`` for a request that must not reach the device, else None."""
        if command not in (p.CMD_READ, p.CMD_WRITE, p.CMD_FLUSH, p.CMD_TRIM, p.CMD_WRITE_ZEROES):
            if command != p.CMD_BLOCK_STATUS:
                return p.EINVAL, f"unsupported command {command}"
            if not session.structured or not session.meta_allocation:
                return p.EINVAL, "NBD_CMD_BLOCK_STATUS needs structured replies and base:allocation"
        if command == p.CMD_FLUSH:
            return (p.EINVAL, "NBD_CMD_FLUSH takes no range") if offset or length else None
        if command in _WRITING and device.readonly:
            return p.EPERM, f"export {session.name!r} is read-only"
        if length == 0:
            return p.EINVAL, "zero-length request"
        if command in (p.CMD_READ, p.CMD_WRITE) and length > MAX_REQUEST:
            return p.EINVAL, f"request of {length} bytes exceeds {MAX_REQUEST}"
        if offset + length > device.size:
            err = p.ENOSPC if command in _WRITING else p.EINVAL
            return err, f"request [{offset}, +{length}) is beyond the export size {device.size}"
        mask = self._min_block - 1
        if (offset | length) & mask and command != p.CMD_BLOCK_STATUS:
            return p.EINVAL, f"request not aligned to {self._min_block} bytes"
        return None

    def _send_error(
        self, writer: asyncio.StreamWriter, session: _Session, cookie: int, error: int, message: str
    ) -> None:
        if session.structured:
            writer.write(p.error_chunk(cookie, error, message))
        else:
            writer.write(p.simple_reply(cookie, error))


# -- helpers run in the worker pool ---------------------------------------------------------------------


def _apply(
    device: BlockDevice, command: int, offset: int, length: int, payload: bytes | None, fua: bool
) -> None:
    if command == p.CMD_WRITE:
        assert payload is not None
        device.write(offset, payload)
    elif command in (p.CMD_TRIM, p.CMD_WRITE_ZEROES):
        device.zero(offset, length)
    if command == p.CMD_FLUSH or fua:
        device.flush()


def _read_sparse(device: ExtentSource, offset: int, length: int) -> list[tuple[int, bytes | int]]:
    """Read ``[offset, offset+length)`` as ``(offset, data)`` and ``(offset, hole_length)`` pieces.

    Holes are not read at all, so clients skip them without the bytes crossing the wire. The pieces
    cover the whole range: anything the device's extents leave out is read as data.
    """
    assert isinstance(device, BlockDevice)
    pieces: list[tuple[int, bytes | int]] = []
    pos, end = offset, offset + length
    for run, hole in device.extents(offset, length):
        run = min(run, end - pos)
        if run <= 0:
            break
        if hole:
            pieces.append((pos, run))
        else:
            pieces.append((pos, device.read(pos, run)))
        pos += run
    if pos < end:
        pieces.append((pos, device.read(pos, end - pos)))
    return pieces


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


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    """Consume `length` payload bytes we will not use, in bounded pieces."""
    while length:
        piece = await reader.readexactly(min(length, 1 << 20))
        length -= len(piece)


def _parse_info(data: bytes) -> tuple[str, list[int]]:
    name, rest = _take_string(data)
    if len(rest) < 2:
        raise ProtocolError(detail="NBD_OPT_INFO/GO data truncated")
    (count,) = p.U16.unpack_from(rest)
    if len(rest) != 2 + 2 * count:
        raise ProtocolError(detail="NBD_OPT_INFO/GO information request count does not match length")
    return name, [p.U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)]


def _parse_meta(data: bytes) -> tuple[str, list[str]]:
    name, rest = _take_string(data)
    if len(rest) < 4:
        raise ProtocolError(detail="meta context data truncated")
    (count,) = p.U32.unpack_from(rest)
    rest = rest[4:]
    queries = []
    for _ in range(count):
        query, rest = _take_string(rest)
        queries.append(query)
    if rest:
        raise ProtocolError(detail="meta context data has trailing bytes")
    return name, queries


def _take_string(data: bytes) -> tuple[str, bytes]:
    if len(data) < 4:
        raise ProtocolError(detail="string length truncated")
    (n,) = p.U32.unpack_from(data)
    if len(data) < 4 + n:
        raise ProtocolError(detail="string truncated")
    try:
        text = data[4 : 4 + n].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(detail="string is not UTF-8") from e
    return text, data[4 + n :]

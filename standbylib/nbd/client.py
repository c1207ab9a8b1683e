"""An NBD client for reading exports: fixed newstyle, structured replies, base:allocation, pipelining.

The backup node reads a frozen snapshot (export ``VOLUME@SNAPSHOT``) and streams it, strictly in order,
into an archive. So this client is built for one job, reading fast and never returning wrong bytes:

* `NbdClient.connect` negotiates fixed newstyle (NO_ZEROES), structured replies, the
  ``base:allocation`` metadata context and the export with NBD_OPT_GO (asking for block sizes). Each
  extra is optional: a server without structured replies or the context still works, its extents are
  then reported as one data run. A server without NBD_OPT_GO gets NBD_OPT_EXPORT_NAME.
* `read`, `readinto` and `read_many` send NBD_CMD_READ, up to `depth` requests in flight on the
  connection, and match replies by cookie (a server may answer out of order and interleave the
  chunks of several replies). A structured reply is reassembled from its OFFSET_DATA and
  OFFSET_HOLE chunks, and must cover the requested range exactly: a chunk outside the range,
  overlapping chunks or a gap are protocol errors, never zero-filled; only holes the server declared
  read as zeros. Requests larger than the server's maximum (at most 32 MiB) are split.
* `extents` asks NBD_CMD_BLOCK_STATUS, at most 1 GiB per request, as often as needed to cover the
  range, so a backup can skip holes without reading them.
* `NbdPool` opens several connections to one export (only when the server advertises
  NBD_FLAG_CAN_MULTI_CONN: otherwise connections may not see each other's state) and reads a list
  of ranges across them in threads, yielding the results strictly in range order with a bounded
  number of ranges held, so its caller can write one sequential stream.

Pipelining needs no writer thread: a request is 28 bytes, so the `depth` headers sent ahead fit in
the socket buffers many times over and sending never waits for the server to drain its replies.
Replies are received with ``recv_into`` straight into the destination buffer (a small buffer takes
the headers: the connection's `SocketReader`, shared with the server), and the socket is blocking
with SO_RCVTIMEO/SO_SNDTIMEO instead of Python's socket timeout, which would add a ``poll`` before
every ``recv``.

TLS: with ``tls`` (an ``ssl.SSLContext`` for the client's side) the client sends NBD_OPT_STARTTLS
right after the greeting, runs the TLS handshake on the same socket (`standbylib.nbd.tls`) and
negotiates everything else inside TLS; a server that does not offer TLS, or a failed handshake, is an
`NbdNegotiationError`. The server's certificate must name `server_name` (default: the host).

Errors all derive from `NbdClientError` and name the server (host:port) and the export in one line.
A server error for one command (`NbdCommandError`, with the errno's name and the server's message)
leaves the connection usable; a protocol violation, a lost connection or a timeout make it unusable
(the reply stream cannot be trusted any more), and later calls say so.

This module owns `NbdClient`: the connection's life, the translation of socket failures into client
errors, pipelining and the public calls. The rest lives beside it and is re-exported here:
`client_errors` (the exceptions), `negotiate` (TCP connect and handshake), `client_replies`
(requests in flight, reply parsing, `Extent`) and `pool` (`NbdPool`).

Threading: an `NbdClient` is used by one thread at a time; `NbdPool` gives each connection a thread.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from standbylib.errors import InvalidArgument
from standbylib.nbd import protocol as p
from standbylib.nbd.client_errors import (
    NbdClientClosed,
    NbdClientError,
    NbdCommandError,
    NbdConnectionLost,
    NbdNegotiationError,
    NbdProtocolError,
    NbdTimeout,
)
from standbylib.nbd.client_replies import Extent, Job, ReplyReader
from standbylib.nbd.negotiate import (
    DEFAULT_MAX_BLOCK,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    MAX_READ_REQUEST,
    Negotiation,
    open_socket,
    server_address,
)
from standbylib.nbd.sockio import PeerClosed, SocketReader
from standbylib.nbd.tls import TlsConnection
from standbylib.rawfile import Buffer

__all__ = ["DEFAULT_MAX_BLOCK", "MAX_EXTENTS_REQUEST", "MAX_READ_REQUEST", "NbdClient"]

#: Largest NBD_CMD_BLOCK_STATUS range asked at once: large enough to map a sparse volume in a few
#: round trips, small enough that a server walking its allocation map answers promptly.
MAX_EXTENTS_REQUEST: Final = 1 << 30
#: Requests in flight for one `NbdClient.readinto` larger than `max_read`.
READ_DEPTH: Final = 16

_RECV_BUFFER = 64 << 10  # headers and small payloads; data goes straight to its destination


class NbdClient:
    """One connection to one NBD export, for reading. Create with `connect`; close with `close`."""

    def __init__(self, sock: socket.socket, host: str, port: int, export: str, timeout: float) -> None:
        """Wrap a connected socket; `connect` does this and negotiates. Not for direct use."""
        self._sock: socket.socket | TlsConnection = sock
        self._raw = sock
        self._rx = SocketReader(sock, _RECV_BUFFER)
        self.host = host
        self.port = port
        self.server = server_address(host, port)
        self._export = export
        self.timeout = timeout
        self._size = 0
        self._flags = 0
        self._min_block = DEFAULT_MIN_BLOCK
        self._preferred_block = DEFAULT_PREFERRED_BLOCK
        self._max_block = DEFAULT_MAX_BLOCK
        self._max_read = MAX_READ_REQUEST
        self._replies = ReplyReader(self._rx, self.server, export)
        self._pending = self._replies.pending
        self._broken: NbdClientError | None = None
        self._closed = False

    # -- connecting -----------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        export: str,
        *,
        timeout: float = 30.0,
        structured: bool = True,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> NbdClient:
        """Connect to `export` at `host`:`port` and negotiate; raise an `NbdClientError` subclass.

        `structured=False` skips structured replies (and so base:allocation): for tests and for
        servers that mishandle them. `timeout` bounds every wait for the server, in seconds. `tls`
        starts TLS before anything else; the server's certificate must name `server_name` (default:
        `host`)."""
        if timeout <= 0:
            raise InvalidArgument(detail=f"timeout {timeout} must be greater than 0")
        sock = open_socket(host, port, export, timeout)
        client = cls(sock, host, port, export, timeout)
        try:
            client._negotiate(structured, tls, server_name or host)
        except BaseException:
            client._sock.close()
            sock.close()
            raise
        return client

    @classmethod
    def list_exports(cls, host: str, port: int, *, timeout: float = 30.0) -> list[str]:
        """The export names the server lists for NBD_OPT_LIST (servers may list none, or not all)."""
        sock = open_socket(host, port, "", timeout)
        client = cls(sock, host, port, "", timeout)
        try:
            with client._translate("listing the exports"):
                return Negotiation(sock, client._rx, client.server, "").list_exports()
        finally:
            sock.close()

    def _negotiate(self, structured: bool, tls: ssl.SSLContext | None = None, server_name: str = "") -> None:
        """Run the handshake (`standbylib.nbd.negotiate`) and keep what it learnt of the export."""
        handshake = Negotiation(self._raw, self._rx, self.server, self._export)
        try:
            with self._translate("negotiating"):
                handshake.negotiate(structured, tls, server_name)
        finally:
            self._sock = handshake.sock  # the TLS connection once STARTTLS succeeded, even on failure
        self._size, self._flags = handshake.size, handshake.flags
        self._min_block = handshake.min_block
        self._preferred_block = handshake.preferred_block
        self._max_block = handshake.max_block
        self._replies.structured = handshake.structured
        self._replies.meta_context_id = handshake.meta_context_id
        self._max_read = handshake.check_block_sizes()

    # -- properties -----------------------------------------------------------------------------------

    @property
    def export(self) -> str:
        return self._export

    @property
    def size(self) -> int:
        """Size of the export in bytes."""
        return self._size

    @property
    def transmission_flags(self) -> int:
        return self._flags

    @property
    def readonly(self) -> bool:
        return bool(self._flags & p.FLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        """Whether several connections to the export see one consistent image (NBD_FLAG_CAN_MULTI_CONN)."""
        return bool(self._flags & p.FLAG_CAN_MULTI_CONN)

    @property
    def min_block(self) -> int:
        """Requests should be aligned to this (1 unless the server says otherwise)."""
        return self._min_block

    @property
    def preferred_block(self) -> int:
        return self._preferred_block

    @property
    def max_block(self) -> int:
        """Largest request payload the server accepts (32 MiB unless the server says otherwise)."""
        return self._max_block

    @property
    def max_read(self) -> int:
        """Largest READ this client sends; larger reads are split into requests of this size."""
        return self._max_read

    @property
    def structured(self) -> bool:
        """Whether structured replies were negotiated."""
        return self._replies.structured

    @property
    def meta_context_id(self) -> int | None:
        """The server's id of the base:allocation metadata context, None when it was not negotiated."""
        return self._replies.meta_context_id

    @property
    def has_allocation(self) -> bool:
        """Whether base:allocation was negotiated, i.e. `extents` can report holes."""
        return self.meta_context_id is not None

    # -- errors ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, doing: str) -> Iterator[None]:
        """Turn socket failures into client errors; any but a command error breaks the connection."""
        try:
            yield
        except NbdCommandError:
            raise
        except NbdClientError as e:
            self._break(e)
            raise
        except PeerClosed as e:
            where = f"after {e.have} of {e.want} bytes of a frame" if e.have else "between frames"
            exc = NbdConnectionLost(
                server=self.server, export=self._export, detail=f"while {doing} ({where})"
            )
            self._break(exc)
            raise exc from None
        except ssl.SSLError as e:
            reason = str(e.reason or e).replace("_", " ").lower()
            exc4: NbdClientError = NbdNegotiationError(
                server=self.server, export=self._export, detail=f"TLS failed while {doing}: {reason}"
            )
            self._break(exc4)
            raise exc4 from None
        except (BlockingIOError, TimeoutError) as e:
            exc2 = NbdTimeout(server=self.server, export=self._export, timeout=self.timeout, detail=doing)
            self._break(exc2)
            raise exc2 from e
        except OSError as e:
            exc3 = NbdConnectionLost(
                server=self.server, export=self._export, detail=f"while {doing}: {e.strerror or e}"
            )
            self._break(exc3)
            raise exc3 from e

    def _break(self, exc: NbdClientError) -> None:
        if self._broken is None:
            self._broken = exc
        self._pending.clear()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _check_usable(self) -> None:
        if self._closed:
            raise NbdClientClosed(server=self.server, export=self._export, detail="the client was closed")
        if self._broken is not None:
            raise NbdClientClosed(
                server=self.server, export=self._export, detail=f"an earlier error broke it: {self._broken}"
            )

    # -- requests -------------------------------------------------------------------------------------

    def _pipeline(self, take: Callable[[bool], Job | None], depth: int) -> Iterator[Job]:
        """Read jobs from `take` with up to `depth` requests in flight; yield each job done, in order.

        ``take(block)`` returns the next job, or None: when `block` is False if none is available
        right now, when True only once there are no more. At most `depth` jobs are held (taken and
        not yet yielded); a job that failed raises its `NbdCommandError` when its turn comes. On any
        exit the requests still in flight are drained, so the connection stays usable unless broken.
        """
        request, pump = self._replies.request, self._replies.pump
        jobs: collections.deque[Job] = collections.deque()
        queue: collections.deque[tuple[Job, int, int]] = collections.deque()  # (job, start, length)
        # Requests of this pipeline in flight, shared with its jobs: whichever call receives a reply
        # (another pipeline on the same connection may) counts it down.
        flight = [0]
        step = self._max_read
        drain = True
        try:
            while True:
                while len(jobs) < depth:
                    job = take(not jobs)
                    if job is None:
                        break
                    jobs.append(job)
                    job.flight = flight
                    for start in range(0, job.length, step):
                        queue.append((job, start, min(step, job.length - start)))
                        job.remaining += 1
                if not jobs:
                    return
                if queue and flight[0] < depth:
                    headers = []
                    while queue and flight[0] < depth:
                        job, start, n = queue.popleft()
                        view = job.view[start : start + n]
                        headers.append(request(p.CMD_READ, job.offset + start, n, view, job)[1])
                        flight[0] += 1
                    self._sock.sendall(b"".join(headers))
                head = jobs[0]
                if head.remaining == 0:
                    jobs.popleft()
                    if head.error is not None:
                        raise head.error
                    yield head
                    continue
                pump()
        except (PeerClosed, OSError, NbdProtocolError):
            drain = False  # the reply stream is broken: nothing more can be read from it
            raise
        finally:
            if drain and self._pending and self._broken is None:
                with contextlib.suppress(NbdClientError), self._translate("draining replies"):
                    while self._pending:
                        pump()

    def _validate(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise InvalidArgument(detail=f"read of [{offset}, +{length}): offset and length must be >= 0")

    # -- public API -----------------------------------------------------------------------------------

    def readinto(self, offset: int, buf: Buffer) -> None:
        """Fill `buf` (a writable buffer) with the export's bytes at `offset`, in pipelined requests."""
        self._check_usable()
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise InvalidArgument(detail="readinto needs a writable buffer")
        self._validate(offset, len(view))
        if not view:
            return
        jobs = [Job(0, offset, view, zeroed=False)]
        with self._translate(f"reading [{offset}, +{len(view)})"):
            for _ in self._pipeline(lambda block: jobs.pop() if jobs else None, READ_DEPTH):
                pass

    def read(self, offset: int, length: int) -> bytes:
        """The `length` bytes of the export at `offset` (a copy: `readinto` avoids it)."""
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def read_many(
        self, ranges: Iterable[tuple[int, int]], depth: int = 16
    ) -> Iterator[tuple[int, memoryview]]:
        """Read each ``(offset, length)`` of `ranges`, yielding ``(offset, data)`` in the order given.

        Up to `depth` requests are in flight and up to `depth` ranges held at once (so memory is
        bounded by `depth` times the largest range). Each `data` is a view of a fresh buffer the caller
        may keep. Ranges are taken from `ranges` lazily. Closing the iterator early is fine."""
        self._check_usable()
        if depth < 1:
            raise InvalidArgument(detail=f"depth {depth} must be at least 1")
        it = iter(ranges)

        def take(block: bool) -> Job | None:
            for offset, length in it:
                self._validate(offset, length)
                return Job(offset, offset, memoryview(bytearray(length)), zeroed=True)
            return None

        for job in self._read_jobs(take, depth):
            yield job.offset, job.view

    def _read_jobs(self, take: Callable[[bool], Job | None], depth: int) -> Iterator[Job]:
        """`_pipeline` with socket failures translated into client errors (`read_many`, `NbdPool`)."""
        self._check_usable()
        with self._translate("reading"):
            yield from self._pipeline(take, depth)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """base:allocation of ``[offset, offset+length)`` as consecutive runs covering it exactly.

        Adjacent runs with equal flags are merged. Without the metadata context the range is one
        data run (flags 0): a server that cannot tell holes makes a backup read everything."""
        self._check_usable()
        self._validate(offset, length)
        if not length:
            return []
        if self.meta_context_id is None:
            return [Extent(length, 0)]
        out: list[Extent] = []
        pos, end = offset, offset + length
        with self._translate(f"mapping [{offset}, +{length})"):
            while pos < end:
                n = min(end - pos, MAX_EXTENTS_REQUEST)
                op, header = self._replies.request(p.CMD_BLOCK_STATUS, pos, n, None, None)
                self._sock.sendall(header)
                while op.cookie in self._pending:
                    self._replies.pump()  # replies to reads of a suspended `read_many` may come first
                if op.error is not None:
                    raise self._replies.command_error(op)
                assert op.extents is not None
                for e in op.extents:
                    # The spec says descriptors stay within the request; clip in case one does not.
                    run = min(e.length, end - pos)
                    if out and out[-1].flags == e.flags:
                        out[-1] = Extent(out[-1].length + run, e.flags)
                    else:
                        out.append(Extent(run, e.flags))
                    pos += run
                    if pos >= end:
                        break
        return out

    def close(self) -> None:
        """Send NBD_CMD_DISC (when the connection is healthy) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None and not self._pending:
                with contextlib.suppress(OSError):
                    self._replies.cookie += 1
                    disc = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, self._replies.cookie, 0, 0)
                    self._sock.sendall(disc)
                    self._sock.shutdown(socket.SHUT_WR)
        finally:
            self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NbdClient({self.server}, export={self._export!r}, size={self._size})"

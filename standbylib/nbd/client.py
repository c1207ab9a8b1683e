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
the headers), and the socket is blocking with SO_RCVTIMEO/SO_SNDTIMEO instead of Python's socket
timeout, which would add a ``poll`` before every ``recv``.

TLS: with ``tls`` (an ``ssl.SSLContext`` for the client's side) the client sends NBD_OPT_STARTTLS
right after the greeting, runs the TLS handshake on the same socket (`standbylib.nbd.tls`) and
negotiates everything else inside TLS; a server that does not offer TLS, or a failed handshake, is an
`NbdNegotiationError`. The server's certificate must name `server_name` (default: the host).

Errors all derive from `NbdClientError` and name the server (host:port) and the export in one line.
A server error for one command (`NbdCommandError`, with the errno's name and the server's message)
leaves the connection usable; a protocol violation, a lost connection or a timeout make it unusable
(the reply stream cannot be trusted any more), and later calls say so.

Threading: an `NbdClient` is used by one thread at a time; `NbdPool` gives each connection a thread.
"""

from __future__ import annotations

import collections
import contextlib
import errno as _errno
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple

from standbylib.errors import InvalidArgument, RequestError, StandbyError
from standbylib.nbd import protocol as p
from standbylib.nbd.protocol import ProtocolError
from standbylib.nbd.tls import TlsConnection, TlsHandshakeError
from standbylib.rawfile import Buffer

__all__ = [
    "DEFAULT_MAX_BLOCK",
    "MAX_EXTENTS_REQUEST",
    "MAX_READ_REQUEST",
    "Extent",
    "NbdClient",
    "NbdClientClosed",
    "NbdClientError",
    "NbdCommandError",
    "NbdConnectError",
    "NbdConnectionLost",
    "NbdNegotiationError",
    "NbdPool",
    "NbdProtocolError",
    "NbdTimeout",
    "NbdUnknownExport",
    "errno_name",
]

#: Largest READ sent; larger reads are split. 32 MiB is what every server must accept (doc/proto.md).
MAX_READ_REQUEST: Final = 32 << 20
#: Largest NBD_CMD_BLOCK_STATUS range asked at once: large enough to map a sparse volume in a few
#: round trips, small enough that a server walking its allocation map answers promptly.
MAX_EXTENTS_REQUEST: Final = 1 << 30
#: Requests in flight for one `NbdClient.readinto` larger than `max_read`.
READ_DEPTH: Final = 16
#: Block sizes assumed when the server sends no NBD_INFO_BLOCK_SIZE (the spec's defaults).
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
DEFAULT_MAX_BLOCK: Final = MAX_READ_REQUEST
#: Largest option reply or non-data reply chunk accepted; anything bigger is a broken server.
MAX_REPLY_PAYLOAD: Final = 16 << 20

_RECV_BUFFER = 64 << 10  # headers and small payloads; data goes straight to its destination
_ZEROS = memoryview(bytes(1 << 20))

_COMMAND_NAMES: Final = {p.CMD_READ: "READ", p.CMD_BLOCK_STATUS: "BLOCK_STATUS", p.CMD_DISC: "DISC"}
_OPTION_NAMES: Final = {
    p.OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    p.OPT_ABORT: "NBD_OPT_ABORT",
    p.OPT_LIST: "NBD_OPT_LIST",
    p.OPT_GO: "NBD_OPT_GO",
    p.OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    p.OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    p.OPT_STARTTLS: "NBD_OPT_STARTTLS",
}
_REP_ERRORS: Final = {
    p.REP_ERR_UNSUP: "not supported",
    p.REP_ERR_POLICY: "refused by the server's policy",
    p.REP_ERR_INVALID: "invalid",
    p.REP_ERR_PLATFORM: "not supported on the server's platform",
    p.REP_ERR_TLS_REQD: "the server requires TLS",
    p.REP_ERR_UNKNOWN: "unknown export",
    p.REP_ERR_SHUTDOWN: "the server is shutting down",
    p.REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    p.REP_ERR_TOO_BIG: "request too big",
}


# -- errors ---------------------------------------------------------------------------------------------


class NbdClientError(StandbyError):
    """Base of the NBD client's errors. Fields: `server` ("host:port"), `export`, and per class more."""

    template = "NBD server {server}, export {export!r}: {detail}"


class NbdConnectError(NbdClientError):
    """No TCP connection: refused, unreachable, unresolvable, or no answer to the connect."""

    template = "cannot connect to NBD server {server} (export {export!r}): {detail}"


class NbdUnknownExport(NbdClientError):
    """The server has no export of that name (NBD_REP_ERR_UNKNOWN); `reason` is the server's text."""

    template = "NBD server {server} has no export {export!r}: {reason}"


class NbdNegotiationError(NbdClientError):
    """The server refused the session during the handshake (TLS required, policy, shutting down...)."""

    template = "NBD server {server} refused export {export!r}: {detail}"


class NbdProtocolError(NbdClientError, ProtocolError):
    """The server broke the protocol; the connection is unusable (its replies cannot be trusted)."""

    template = "NBD server {server} broke the protocol (export {export!r}): {detail}"


class NbdConnectionLost(NbdProtocolError):
    """The connection ended or failed while the client expected more from the server."""

    template = "NBD server {server} closed the connection (export {export!r}) {detail}"


class NbdTimeout(NbdClientError):
    """Nothing arrived from the server (or it took nothing) for `timeout` seconds."""

    template = "no reply from NBD server {server} within {timeout:g} s while {detail} (export {export!r})"


class NbdClientClosed(NbdClientError):
    """The client was closed, or broken by an earlier error, and cannot send requests."""

    template = "NBD connection to {server} (export {export!r}) is not usable: {detail}"


class NbdCommandError(NbdClientError, RequestError):
    """The server answered one command with an error; the connection goes on.

    Fields: `command` ("READ"...), `offset`, `length`, `errno` (the wire value), `error` (its name,
    e.g. "EINVAL") and `message` (the server's text from a structured error chunk, else "")."""

    template = (
        "NBD server {server}, export {export!r}: {command} of [{offset}, +{length}) failed with "
        "{error}{message_part}"
    )

    def __init__(self, **fields: Any) -> None:
        message = fields.get("message", "")
        super().__init__(message_part=f": {message}" if message else "", **fields)


def errno_name(value: int) -> str:
    """A wire errno as a name with its meaning, e.g. ``"EIO (Input/output error)"``.

    The protocol's errno values are Linux's, so the host's table names the ones NBD does not list."""
    name = p.ERRNO_NAMES.get(value) or _errno.errorcode.get(value)
    if name is None:
        return f"error {value}"
    return f"{name} ({os.strerror(value)})"


# -- results ----------------------------------------------------------------------------------------------


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


# -- low level ------------------------------------------------------------------------------------------


class _Eof(Exception):
    """The peer closed the connection; `have` of `want` bytes of the current frame had arrived."""

    def __init__(self, have: int, want: int) -> None:
        super().__init__(have, want)
        self.have = have
        self.want = want


class _Receiver:
    """Reads frames from a blocking socket: headers through a small buffer, data straight into place."""

    def __init__(self, sock: socket.socket | TlsConnection) -> None:
        self._sock = sock
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def _fill(self, n: int) -> None:
        if self._start + n > len(self._buf):
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
        while self._end - self._start < n:
            got = self._sock.recv_into(self._view[self._end :])
            if not got:
                raise _Eof(self._end - self._start, n)
            self._end += got

    def unpack(self, frame: struct.Struct) -> tuple[Any, ...]:
        self._fill(frame.size)
        values = frame.unpack_from(self._buf, self._start)
        self._start += frame.size
        return values

    def take(self) -> bytes:
        """The bytes buffered and not consumed yet, consuming them."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data

    def peek_u32(self) -> int:
        self._fill(4)
        value: int = p.U32.unpack_from(self._buf, self._start)[0]
        return value

    def read(self, n: int) -> bytes:
        if n <= len(self._buf):
            self._fill(n)
            data = bytes(self._view[self._start : self._start + n])
            self._start += n
            return data
        out = bytearray(n)
        self.readinto(memoryview(out))
        return bytes(out)

    def readinto(self, view: memoryview) -> None:
        """Fill `view` exactly: first from the buffer, then with ``recv_into`` directly into it."""
        want = len(view)
        pos = min(self._end - self._start, want)
        if pos:
            view[:pos] = self._view[self._start : self._start + pos]
            self._start += pos
        recv_into = self._sock.recv_into
        while pos < want:
            got = recv_into(view[pos:])
            if not got:
                raise _Eof(pos, want)
            pos += got

    def skip(self, n: int) -> None:
        while n:
            piece = min(n, len(self._buf))
            self._fill(piece)
            self._start += piece
            n -= piece


class _Job:
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


class _Op:
    """One request in flight."""

    __slots__ = ("chunks", "command", "cookie", "error", "extents", "job", "length", "offset", "view")

    def __init__(
        self, cookie: int, command: int, offset: int, length: int, view: memoryview | None, job: _Job | None
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


def _set_timeouts(sock: socket.socket, timeout: float) -> None:
    """Kernel send/receive timeouts on a blocking socket: an expired one fails the call with EAGAIN."""
    sec = int(timeout)
    usec = int((timeout - sec) * 1_000_000)
    tv = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _server(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _open_socket(host: str, port: int, export: str, timeout: float) -> socket.socket:
    server = _server(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        raise NbdConnectError(server=server, export=export, detail=f"cannot resolve {host!r}: {e}") from e
    except TimeoutError as e:
        raise NbdConnectError(server=server, export=export, detail=f"no answer within {timeout:g} s") from e
    except ConnectionRefusedError as e:
        raise NbdConnectError(
            server=server, export=export, detail="connection refused (is the server running?)"
        ) from e
    except OSError as e:
        raise NbdConnectError(server=server, export=export, detail=e.strerror or str(e)) from e
    try:
        sock.settimeout(None)
        _set_timeouts(sock, timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the client -----------------------------------------------------------------------------------------


class NbdClient:
    """One connection to one NBD export, for reading. Create with `connect`; close with `close`."""

    def __init__(self, sock: socket.socket, host: str, port: int, export: str, timeout: float) -> None:
        """Wrap a connected socket; `connect` does this and negotiates. Not for direct use."""
        self._sock: socket.socket | TlsConnection = sock
        self._raw = sock
        self._rx = _Receiver(sock)
        self.host = host
        self.port = port
        self.server = _server(host, port)
        self._export = export
        self.timeout = timeout
        self._size = 0
        self._flags = 0
        self._min_block = DEFAULT_MIN_BLOCK
        self._preferred_block = DEFAULT_PREFERRED_BLOCK
        self._max_block = DEFAULT_MAX_BLOCK
        self._max_read = MAX_READ_REQUEST
        self.structured = False
        self.meta_context_id: int | None = None
        self._pending: dict[int, _Op] = {}
        self._cookie = 0
        self._no_zeroes = False
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
        sock = _open_socket(host, port, export, timeout)
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
        sock = _open_socket(host, port, "", timeout)
        client = cls(sock, host, port, "", timeout)
        try:
            with client._translate("listing the exports"):
                client._greet()
                names = []
                for kind, data in client._option(p.OPT_LIST, b""):
                    if kind == p.REP_SERVER:
                        if len(data) < 4 or p.U32.unpack_from(data)[0] > len(data) - 4:
                            raise client._violation("malformed NBD_REP_SERVER reply to NBD_OPT_LIST")
                        (n,) = p.U32.unpack_from(data)
                        names.append(data[4 : 4 + n].decode("utf-8", "replace"))
                    elif kind != p.REP_ACK:
                        raise client._option_refused(p.OPT_LIST, kind, data)
                with contextlib.suppress(OSError):  # a polite goodbye; the server may drop us first
                    sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_ABORT, 0))
                return names
        finally:
            sock.close()

    def _greet(self) -> None:
        magic, second, flags = self._rx.unpack(p.GREETING)
        if magic != p.INIT_MAGIC:
            raise self._violation(f"not an NBD server (greeting magic {magic:#x})")
        if second == p.OLDSTYLE_MAGIC:
            raise self._violation("the server speaks the oldstyle handshake, which is not supported")
        if second != p.OPTS_MAGIC:
            raise self._violation(f"bad handshake magic {second:#x}")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._violation("the server does not support the fixed newstyle handshake")
        client_flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if flags & p.FLAG_NO_ZEROES else 0)
        self._no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        self._sock.sendall(p.CLIENT_FLAGS.pack(client_flags))

    def _negotiate(self, structured: bool, tls: ssl.SSLContext | None = None, server_name: str = "") -> None:
        with self._translate("negotiating"):
            self._greet()
            if tls is not None:
                self._start_tls(tls, server_name)
            if structured:
                self.structured = self._option_ack(p.OPT_STRUCTURED_REPLY, b"")
            if self.structured:
                self._set_meta_context()
            name = self._export.encode("utf-8")
            go = p.U32.pack(len(name)) + name + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)
            replies = self._option(p.OPT_GO, go)
            kind, data = replies[-1]
            if kind == p.REP_ERR_UNSUP:
                self._export_name(name)
            elif kind != p.REP_ACK:
                raise self._option_refused(p.OPT_GO, kind, data)
            else:
                self._go_info(replies[:-1])
        self._check_block_sizes()

    def _start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake; from then on the socket is the TLS connection."""
        replies = self._option(p.OPT_STARTTLS, b"")
        kind, data = replies[-1]
        if kind != p.REP_ACK:
            refused = self._option_refused(p.OPT_STARTTLS, kind, data)
            if kind in (p.REP_ERR_UNSUP, p.REP_ERR_POLICY):
                raise NbdNegotiationError(
                    server=self.server, export=self._export, detail="the server does not offer TLS"
                )
            raise refused
        raw = self._raw
        assert isinstance(raw, socket.socket)
        try:
            conn = TlsConnection.connect(raw, context, server_name, self._rx.take())
        except TlsHandshakeError as e:
            raise NbdNegotiationError(server=self.server, export=self._export, detail=str(e)) from None
        self._sock = conn
        self._rx = _Receiver(conn)

    def _set_meta_context(self) -> None:
        """Select base:allocation; without it (any error) extents are reported as data."""
        name = self._export.encode("utf-8")
        query = p.META_BASE_ALLOCATION.encode()
        data = p.U32.pack(len(name)) + name + p.U32.pack(1) + p.U32.pack(len(query)) + query
        for kind, payload in self._option(p.OPT_SET_META_CONTEXT, data):
            if kind == p.REP_META_CONTEXT:
                if len(payload) < 4:
                    raise self._violation("NBD_REP_META_CONTEXT reply too short")
                if payload[4:] == query:
                    self.meta_context_id = p.U32.unpack_from(payload)[0]
            elif kind != p.REP_ACK:
                self.meta_context_id = None  # refused (unsupported, or the export is unknown: GO says)

    def _go_info(self, infos: list[tuple[int, bytes]]) -> None:
        have_export = False
        for kind, data in infos:
            if kind != p.REP_INFO or len(data) < 2:
                raise self._violation(f"unexpected reply {kind:#x} to NBD_OPT_GO")
            (info,) = p.U16.unpack_from(data)
            if info == p.INFO_EXPORT:
                if len(data) != p.INFO_EXPORT_STRUCT.size:
                    raise self._violation("NBD_INFO_EXPORT of the wrong length")
                _, self._size, self._flags = p.INFO_EXPORT_STRUCT.unpack(data)
                have_export = True
            elif info == p.INFO_BLOCK_SIZE:
                if len(data) != p.INFO_BLOCK_SIZE_STRUCT.size:
                    raise self._violation("NBD_INFO_BLOCK_SIZE of the wrong length")
                _, self._min_block, self._preferred_block, self._max_block = p.INFO_BLOCK_SIZE_STRUCT.unpack(
                    data
                )
            # Other information (name, description) is not needed; unknown types must be ignored.
        if not have_export:
            raise self._violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (size and flags)")

    def _export_name(self, name: bytes) -> None:
        """The pre-GO way to choose an export: no error reply, an unknown export just ends the session."""
        self._sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_EXPORT_NAME, len(name)) + name)
        try:
            self._size, self._flags = self._rx.unpack(p.EXPORT_NAME_REPLY)
            if not self._no_zeroes:
                self._rx.skip(len(p.ZERO_PAD))
        except _Eof as e:
            raise NbdUnknownExport(
                server=self.server,
                export=self._export,
                reason="the server closed the connection on NBD_OPT_EXPORT_NAME",
            ) from e

    def _check_block_sizes(self) -> None:
        lo, pref, hi = self._min_block, self._preferred_block, self._max_block
        if not (1 <= lo <= 65536 and lo & (lo - 1) == 0):
            raise self._violation(f"invalid minimum block size {lo}")
        if pref < lo or pref & (pref - 1):
            raise self._violation(f"invalid preferred block size {pref}")
        if hi < lo or (hi % lo and hi != 0xFFFFFFFF):
            raise self._violation(f"invalid maximum block size {hi}")
        self._max_read = max(lo, min(hi, MAX_READ_REQUEST) // lo * lo)

    def _option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option; return its replies, the final one (ACK or an error) last."""
        self._sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, option, len(data)) + data)
        replies = []
        name = _OPTION_NAMES.get(option, str(option))
        while True:
            magic, echoed, kind, length = self._rx.unpack(p.OPTION_REPLY)
            if magic != p.REP_MAGIC:
                raise self._violation(f"bad option reply magic {magic:#x} in the reply to {name}")
            if echoed != option:
                raise self._violation(f"reply to option {echoed} while waiting for the reply to {name}")
            if length > MAX_REPLY_PAYLOAD:
                raise self._violation(f"option reply of {length} bytes to {name}")
            replies.append((kind, self._rx.read(length) if length else b""))
            if kind == p.REP_ACK or kind & p.REP_FLAG_ERROR:
                return replies
            if kind not in (p.REP_INFO, p.REP_SERVER, p.REP_META_CONTEXT):
                raise self._violation(f"unknown reply type {kind:#x} to {name}")

    def _option_ack(self, option: int, data: bytes) -> bool:
        """True when the server acknowledged the option, False when it refused it."""
        replies = self._option(option, data)
        if len(replies) != 1:
            raise self._violation(f"unexpected replies to {_OPTION_NAMES.get(option, option)}")
        return replies[0][0] == p.REP_ACK

    def _option_refused(self, option: int, kind: int, data: bytes) -> NbdClientError:
        text = data.decode("utf-8", "replace").strip()
        if kind == p.REP_ERR_UNKNOWN:
            return NbdUnknownExport(
                server=self.server, export=self._export, reason=text or "the server does not know it"
            )
        what = _REP_ERRORS.get(kind, f"error {kind & ~p.REP_FLAG_ERROR}")
        detail = f"{_OPTION_NAMES.get(option, option)}: {what}" + (f" ({text})" if text else "")
        if not kind & p.REP_FLAG_ERROR:
            return self._violation(f"unexpected reply type {kind:#x} to {_OPTION_NAMES.get(option, option)}")
        return NbdNegotiationError(server=self.server, export=self._export, detail=detail)

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
    def has_allocation(self) -> bool:
        """Whether base:allocation was negotiated, i.e. `extents` can report holes."""
        return self.meta_context_id is not None

    # -- errors ---------------------------------------------------------------------------------------

    def _violation(self, detail: str) -> NbdProtocolError:
        return NbdProtocolError(server=self.server, export=self._export, detail=detail)

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
        except _Eof as e:
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

    def _command_error(self, op: _Op) -> NbdCommandError:
        assert op.error is not None
        value, message = op.error
        return NbdCommandError(
            server=self.server,
            export=self._export,
            command=_COMMAND_NAMES.get(op.command, str(op.command)),
            offset=op.offset if op.job is None else op.job.offset,
            length=op.length if op.job is None else op.job.length,
            errno=value,
            error=errno_name(value),
            message=message,
        )

    # -- requests and replies -------------------------------------------------------------------------

    def _request(
        self, command: int, offset: int, length: int, view: memoryview | None, job: _Job | None
    ) -> tuple[_Op, bytes]:
        """Register a request; return it and its header (the caller sends headers in batches)."""
        self._cookie += 1
        cookie = self._cookie
        op = self._pending[cookie] = _Op(cookie, command, offset, length, view, job)
        return op, p.REQUEST.pack(p.REQUEST_MAGIC, 0, command, cookie, offset, length)

    def _pump(self) -> _Op | None:
        """Receive one reply message (simple reply or structured chunk); the op it completed, if any."""
        rx = self._rx
        magic = rx.peek_u32()
        if magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
            _, flags, kind, cookie, length = rx.unpack(p.STRUCTURED_REPLY)
            op = self._pending.get(cookie)
            if op is None:
                raise self._violation(f"reply chunk for cookie {cookie}, which no request in flight has")
            self._chunk(op, kind, length)
            if not flags & p.REPLY_FLAG_DONE:
                return None
            del self._pending[cookie]
            self._finish(op)
            self._completed(op)
            return op
        if magic == p.SIMPLE_REPLY_MAGIC:
            _, error, cookie = rx.unpack(p.SIMPLE_REPLY)
            op = self._pending.pop(cookie, None)
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

    def _chunk(self, op: _Op, kind: int, length: int) -> None:
        rx = self._rx
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

    def _finish(self, op: _Op) -> None:
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

    def _completed(self, op: _Op) -> None:
        job = op.job
        if job is not None:
            job.remaining -= 1
            job.flight[0] -= 1
            if op.error is not None and job.error is None:
                job.error = self._command_error(op)

    def _pipeline(self, take: Callable[[bool], _Job | None], depth: int) -> Iterator[_Job]:
        """Read jobs from `take` with up to `depth` requests in flight; yield each job done, in order.

        ``take(block)`` returns the next job, or None: when `block` is False if none is available
        right now, when True only once there are no more. At most `depth` jobs are held (taken and
        not yet yielded); a job that failed raises its `NbdCommandError` when its turn comes. On any
        exit the requests still in flight are drained, so the connection stays usable unless broken.
        """
        jobs: collections.deque[_Job] = collections.deque()
        queue: collections.deque[tuple[_Job, int, int]] = collections.deque()  # (job, start, length)
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
                        headers.append(self._request(p.CMD_READ, job.offset + start, n, view, job)[1])
                        flight[0] += 1
                    self._sock.sendall(b"".join(headers))
                head = jobs[0]
                if head.remaining == 0:
                    jobs.popleft()
                    if head.error is not None:
                        raise head.error
                    yield head
                    continue
                self._pump()
        except (_Eof, OSError, NbdProtocolError):
            drain = False  # the reply stream is broken: nothing more can be read from it
            raise
        finally:
            if drain and self._pending and self._broken is None:
                with contextlib.suppress(NbdClientError), self._translate("draining replies"):
                    while self._pending:
                        self._pump()

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
        jobs = [_Job(0, offset, view, zeroed=False)]
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

        def take(block: bool) -> _Job | None:
            for offset, length in it:
                self._validate(offset, length)
                return _Job(offset, offset, memoryview(bytearray(length)), zeroed=True)
            return None

        for job in self._read_jobs(take, depth):
            yield job.offset, job.view

    def _read_jobs(self, take: Callable[[bool], _Job | None], depth: int) -> Iterator[_Job]:
        """`_pipeline` with socket failures translated into client errors."""
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
                op, header = self._request(p.CMD_BLOCK_STATUS, pos, n, None, None)
                self._sock.sendall(header)
                while op.cookie in self._pending:
                    self._pump()  # replies to reads of a suspended `read_many` may come first
                if op.error is not None:
                    raise self._command_error(op)
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
                    self._cookie += 1
                    self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, self._cookie, 0, 0))
                    self._sock.shutdown(socket.SHUT_WR)
        finally:
            self._sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NbdClient({self.server}, export={self._export!r}, size={self._size})"


# -- several connections --------------------------------------------------------------------------------


class _Feed:
    """The ranges of one `NbdPool.read_many`, handed out to the connection threads, and their results.

    The state is under `cond`; the caller's iterator runs under `ranges_lock`. `free` counts the
    ranges that may still be taken before the consumer frees some: a taken range holds its buffer
    until the consumer has had it, so at most `window` buffers are alive however far the
    connections run ahead of the consumer."""

    def __init__(self, ranges: Iterator[tuple[int, int]], window: int) -> None:
        self.ranges = ranges
        self.ranges_lock = threading.Lock()  # the caller's iterator runs under this, not under `cond`
        self.cond = threading.Condition()
        self.free = window
        self.taken = 0
        self.exhausted = False
        self.stop = False
        self.error: BaseException | None = None
        self.results: dict[int, _Job] = {}

    def take(self, block: bool) -> _Job | None:
        """The next range as a job (see `NbdClient._pipeline`), or None."""
        with self.cond:
            while True:
                if self.stop or self.exhausted:
                    return None
                if self.free > 0:
                    break
                if not block:
                    return None
                self.cond.wait()
            self.free -= 1  # reserved: given back below if there is no range after all
        # The caller's iterator may be slow: run it outside `cond`, so the consumer and the other
        # connections go on meanwhile; its lock keeps the indices in iteration order.
        with self.ranges_lock:
            try:
                item = None if self.stop else next(self.ranges, None)
            except BaseException:
                with self.cond:
                    self.free += 1
                raise
            if item is None:
                with self.cond:
                    self.exhausted = self.exhausted or not self.stop
                    self.free += 1
                    self.cond.notify_all()
                return None
            offset, length = item
            if offset < 0 or length < 0:
                raise InvalidArgument(detail=f"read of [{offset}, +{length}): offset and length must be >= 0")
            with self.cond:
                index = self.taken
                self.taken += 1
        return _Job(index, offset, memoryview(bytearray(length)), zeroed=True)

    def deliver(self, job: _Job) -> None:
        with self.cond:
            if not self.stop:
                self.results[job.key] = job
                self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.stop = True
            self.cond.notify_all()


class NbdPool:
    """Several connections to one export, reading ranges in parallel and returning them in order.

    More connections help when one connection cannot keep the link or the server busy: each has its
    own server thread on most servers (nbdkit, ours), and here each has a thread receiving into its
    buffers (``recv_into`` releases the GIL). The server must advertise NBD_FLAG_CAN_MULTI_CONN;
    otherwise connections might see different states of the export, and the pool uses one.
    """

    def __init__(self, clients: list[NbdClient]) -> None:
        """Wrap connected clients of one export; `connect` builds them. Not for direct use."""
        if not clients:
            raise InvalidArgument(detail="an NbdPool needs at least one connection")
        self._clients = clients
        self._lock = threading.Lock()
        self._active = False

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        export: str,
        *,
        connections: int = 4,
        timeout: float = 30.0,
        structured: bool = True,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> NbdPool:
        """Open up to `connections` connections to `export` (one unless the server allows multi-conn);
        `tls` and `server_name` as for `NbdClient.connect`."""
        if connections < 1:
            raise InvalidArgument(detail=f"connections {connections} must be at least 1")
        options: dict[str, Any] = {
            "timeout": timeout,
            "structured": structured,
            "tls": tls,
            "server_name": server_name,
        }
        first = NbdClient.connect(host, port, export, **options)
        clients = [first]
        try:
            for _ in range(connections - 1 if first.can_multi_conn else 0):
                client = NbdClient.connect(host, port, export, **options)
                clients.append(client)
                if (client.size, client.transmission_flags) != (first.size, first.transmission_flags):
                    raise NbdProtocolError(
                        server=first.server,
                        export=export,
                        detail=f"connections disagree on the export (size {first.size} vs {client.size})",
                    )
        except BaseException:
            for client in clients:
                client.close()
            raise
        return cls(clients)

    @property
    def clients(self) -> list[NbdClient]:
        return list(self._clients)

    @property
    def connections(self) -> int:
        return len(self._clients)

    @property
    def size(self) -> int:
        return self._clients[0].size

    @property
    def export(self) -> str:
        return self._clients[0].export

    def extents(self, offset: int, length: int) -> list[Extent]:
        """`NbdClient.extents` on the first connection (not while a `read_many` is running)."""
        with self._lock:
            if self._active:
                raise InvalidArgument(detail="extents() called while read_many() is running on the pool")
            self._active = True
        try:
            return self._clients[0].extents(offset, length)
        finally:
            self._active = False

    def read_many(
        self, ranges: Iterable[tuple[int, int]], *, depth: int = 4, window: int | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        """Read each ``(offset, length)`` of `ranges` over all connections; yield ``(offset, data)`` in order.

        Each connection keeps up to `depth` requests in flight. At most `window` ranges (default: two
        per request slot, ``2 * connections * depth``) are taken and not yet yielded, so memory stays
        within `window` times the largest range while the consumer is slow. Each `data` is a view of
        a fresh buffer the caller may keep. `ranges` is iterated lazily by the connection threads.

        The first error (a command error, a protocol error, an exception of `ranges`) is raised to
        the caller as soon as it waits for a range not delivered yet, so ranges before the failed one
        may not all have been yielded. The other connections then stop taking ranges, finish their
        requests in flight and stay usable. Closing the iterator early stops them the same way.
        """
        if depth < 1:
            raise InvalidArgument(detail=f"depth {depth} must be at least 1")
        limit = window if window is not None else 2 * len(self._clients) * depth
        if limit < 1:
            raise InvalidArgument(detail=f"window {window} must be at least 1")
        with self._lock:
            if self._active:
                raise InvalidArgument(detail="read_many() is already running on this pool")
            self._active = True
        feed = _Feed(iter(ranges), limit)
        threads = [
            threading.Thread(target=self._work, args=(client, feed, depth), name=f"nbd-read-{i}", daemon=True)
            for i, client in enumerate(self._clients)
        ]
        try:
            for thread in threads:
                thread.start()
            index = 0
            while True:
                with feed.cond:
                    while index not in feed.results:
                        if feed.error is not None:
                            raise feed.error
                        if feed.exhausted and index >= feed.taken:
                            return
                        feed.cond.wait()
                    job = feed.results.pop(index)
                yield job.offset, job.view
                del job
                with feed.cond:
                    feed.free += 1
                    feed.cond.notify_all()
                index += 1
        finally:
            with feed.cond:
                feed.stop = True
                feed.cond.notify_all()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            self._active = False

    @staticmethod
    def _work(client: NbdClient, feed: _Feed, depth: int) -> None:
        try:
            for job in client._read_jobs(feed.take, depth):
                feed.deliver(job)
        except BaseException as e:
            feed.fail(e)

    def close(self) -> None:
        """Close every connection."""
        for client in self._clients:
            client.close()

    def __enter__(self) -> NbdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

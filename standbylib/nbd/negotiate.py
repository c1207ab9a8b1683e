"""The NBD client's side of setting up a connection: the TCP connect, then the handshake.

`open_socket` connects and sets kernel timeouts; `Negotiation` runs fixed newstyle (NO_ZEROES),
NBD_OPT_STARTTLS when asked, structured replies, the ``base:allocation`` metadata context and
NBD_OPT_GO (asking for block sizes), falling back to NBD_OPT_EXPORT_NAME for a server without GO;
each extra is optional. It keeps what the server said about the export (size, flags, block sizes) for
`standbylib.nbd.client.NbdClient`, which wraps these steps in its error translation: socket failures
propagate from here as they are, refusals and violations are `NbdClientError`s.

Replies are read through the connection's `SocketReader`; after STARTTLS the reader is switched to the
TLS connection (`SocketReader.start_tls`), so the client keeps one reader for its whole life.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import Final

from standbylib.nbd import protocol as p
from standbylib.nbd.client_errors import (
    NbdClientError,
    NbdConnectError,
    NbdNegotiationError,
    NbdProtocolError,
    NbdUnknownExport,
)
from standbylib.nbd.sockio import PeerClosed, SocketReader
from standbylib.nbd.tls import TlsConnection, TlsHandshakeError

#: Largest READ sent; larger reads are split. 32 MiB is what every server must accept (doc/proto.md).
MAX_READ_REQUEST: Final = 32 << 20
#: Block sizes assumed when the server sends no NBD_INFO_BLOCK_SIZE (the spec's defaults).
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
DEFAULT_MAX_BLOCK: Final = MAX_READ_REQUEST
#: Largest option reply or non-data reply chunk accepted; anything bigger is a broken server.
MAX_REPLY_PAYLOAD: Final = 16 << 20

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


def server_address(host: str, port: int) -> str:
    """``host:port`` as errors name the server (IPv6 addresses in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _set_timeouts(sock: socket.socket, timeout: float) -> None:
    """Kernel send/receive timeouts on a blocking socket: an expired one fails the call with EAGAIN."""
    sec = int(timeout)
    usec = int((timeout - sec) * 1_000_000)
    tv = struct.pack("ll", sec, usec)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def open_socket(host: str, port: int, export: str, timeout: float) -> socket.socket:
    """A blocking TCP connection to the server with SO_RCVTIMEO/SO_SNDTIMEO of `timeout` seconds.

    Kernel timeouts instead of Python's socket timeout, which would add a ``poll`` before every
    ``recv``. Failing to connect is an `NbdConnectError` naming `export`."""
    server = server_address(host, port)
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


class Negotiation:
    """The client's side of one handshake on a connected socket, and what it learnt of the export.

    After `negotiate`: `sock` is what the client talks through (the TLS connection once
    NBD_OPT_STARTTLS succeeded, else the socket), `size` and `flags` describe the export, the block
    sizes are the server's (or the spec's defaults), `structured` says whether structured replies
    were negotiated and `meta_context_id` is base:allocation's id, or None without it. `sock` is
    valid even when `negotiate` failed half-way, so the caller closes the right object."""

    def __init__(self, sock: socket.socket, rx: SocketReader, server: str, export: str) -> None:
        self.raw = sock
        self.sock: socket.socket | TlsConnection = sock
        self.rx = rx
        self.server = server
        self.export = export
        self.no_zeroes = False
        self.structured = False
        self.meta_context_id: int | None = None
        self.size = 0
        self.flags = 0
        self.min_block = DEFAULT_MIN_BLOCK
        self.preferred_block = DEFAULT_PREFERRED_BLOCK
        self.max_block = DEFAULT_MAX_BLOCK

    def negotiate(self, structured: bool, tls: ssl.SSLContext | None, server_name: str) -> None:
        """The whole handshake up to the transmission phase; `structured=False` skips structured
        replies (and so base:allocation); `tls` starts TLS first, checking `server_name`."""
        self.greet()
        if tls is not None:
            self._start_tls(tls, server_name)
        if structured:
            self.structured = self._option_ack(p.OPT_STRUCTURED_REPLY, b"")
        if self.structured:
            self._set_meta_context()
        name = self.export.encode("utf-8")
        go = p.U32.pack(len(name)) + name + p.U16.pack(1) + p.U16.pack(p.INFO_BLOCK_SIZE)
        replies = self._option(p.OPT_GO, go)
        kind, data = replies[-1]
        if kind == p.REP_ERR_UNSUP:
            self._export_name(name)
        elif kind != p.REP_ACK:
            raise self._option_refused(p.OPT_GO, kind, data)
        else:
            self._go_info(replies[:-1])

    def list_exports(self) -> list[str]:
        """The export names the server lists for NBD_OPT_LIST, then NBD_OPT_ABORT."""
        self.greet()
        names = []
        for kind, data in self._option(p.OPT_LIST, b""):
            if kind == p.REP_SERVER:
                if len(data) < 4 or p.U32.unpack_from(data)[0] > len(data) - 4:
                    raise self._violation("malformed NBD_REP_SERVER reply to NBD_OPT_LIST")
                (n,) = p.U32.unpack_from(data)
                names.append(data[4 : 4 + n].decode("utf-8", "replace"))
            elif kind != p.REP_ACK:
                raise self._option_refused(p.OPT_LIST, kind, data)
        with contextlib.suppress(OSError):  # a polite goodbye; the server may drop us first
            self.sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_ABORT, 0))
        return names

    def check_block_sizes(self) -> int:
        """Check the block sizes; return the largest READ to send (the maximum block, at most
        `MAX_READ_REQUEST`, a multiple of the minimum)."""
        lo, pref, hi = self.min_block, self.preferred_block, self.max_block
        if not (1 <= lo <= 65536 and lo & (lo - 1) == 0):
            raise self._violation(f"invalid minimum block size {lo}")
        if pref < lo or pref & (pref - 1):
            raise self._violation(f"invalid preferred block size {pref}")
        if hi < lo or (hi % lo and hi != 0xFFFFFFFF):
            raise self._violation(f"invalid maximum block size {hi}")
        return max(lo, min(hi, MAX_READ_REQUEST) // lo * lo)

    def greet(self) -> None:
        """Check the server's greeting and answer with the client's flags."""
        magic, second, flags = self.rx.unpack(p.GREETING)
        if magic != p.INIT_MAGIC:
            raise self._violation(f"not an NBD server (greeting magic {magic:#x})")
        if second == p.OLDSTYLE_MAGIC:
            raise self._violation("the server speaks the oldstyle handshake, which is not supported")
        if second != p.OPTS_MAGIC:
            raise self._violation(f"bad handshake magic {second:#x}")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._violation("the server does not support the fixed newstyle handshake")
        client_flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if flags & p.FLAG_NO_ZEROES else 0)
        self.no_zeroes = bool(client_flags & p.FLAG_C_NO_ZEROES)
        self.sock.sendall(p.CLIENT_FLAGS.pack(client_flags))

    def _start_tls(self, context: ssl.SSLContext, server_name: str) -> None:
        """NBD_OPT_STARTTLS, then the TLS handshake; from then on `sock` is the TLS connection."""
        replies = self._option(p.OPT_STARTTLS, b"")
        kind, data = replies[-1]
        if kind != p.REP_ACK:
            refused = self._option_refused(p.OPT_STARTTLS, kind, data)
            if kind in (p.REP_ERR_UNSUP, p.REP_ERR_POLICY):
                raise NbdNegotiationError(
                    server=self.server, export=self.export, detail="the server does not offer TLS"
                )
            raise refused
        try:
            conn = TlsConnection.connect(self.raw, context, server_name, self.rx.take())
        except TlsHandshakeError as e:
            raise NbdNegotiationError(server=self.server, export=self.export, detail=str(e)) from None
        self.sock = conn
        self.rx.start_tls(conn)

    def _set_meta_context(self) -> None:
        """Select base:allocation; without it (any error) extents are reported as data."""
        name = self.export.encode("utf-8")
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
                _, self.size, self.flags = p.INFO_EXPORT_STRUCT.unpack(data)
                have_export = True
            elif info == p.INFO_BLOCK_SIZE:
                if len(data) != p.INFO_BLOCK_SIZE_STRUCT.size:
                    raise self._violation("NBD_INFO_BLOCK_SIZE of the wrong length")
                _, self.min_block, self.preferred_block, self.max_block = p.INFO_BLOCK_SIZE_STRUCT.unpack(
                    data
                )
            # Other information (name, description) is not needed; unknown types must be ignored.
        if not have_export:
            raise self._violation("NBD_OPT_GO succeeded without NBD_INFO_EXPORT (size and flags)")

    def _export_name(self, name: bytes) -> None:
        """The pre-GO way to choose an export: no error reply, an unknown export just ends the session."""
        self.sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, p.OPT_EXPORT_NAME, len(name)) + name)
        try:
            self.size, self.flags = self.rx.unpack(p.EXPORT_NAME_REPLY)
            if not self.no_zeroes:
                self.rx.discard(len(p.ZERO_PAD))
        except PeerClosed as e:
            raise NbdUnknownExport(
                server=self.server,
                export=self.export,
                reason="the server closed the connection on NBD_OPT_EXPORT_NAME",
            ) from e

    def _option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send one option; return its replies, the final one (ACK or an error) last."""
        self.sock.sendall(p.OPTION_HEADER.pack(p.OPTS_MAGIC, option, len(data)) + data)
        replies = []
        name = _OPTION_NAMES.get(option, str(option))
        while True:
            magic, echoed, kind, length = self.rx.unpack(p.OPTION_REPLY)
            if magic != p.REP_MAGIC:
                raise self._violation(f"bad option reply magic {magic:#x} in the reply to {name}")
            if echoed != option:
                raise self._violation(f"reply to option {echoed} while waiting for the reply to {name}")
            if length > MAX_REPLY_PAYLOAD:
                raise self._violation(f"option reply of {length} bytes to {name}")
            replies.append((kind, bytes(self.rx.read(length)) if length else b""))
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
                server=self.server, export=self.export, reason=text or "the server does not know it"
            )
        what = _REP_ERRORS.get(kind, f"error {kind & ~p.REP_FLAG_ERROR}")
        detail = f"{_OPTION_NAMES.get(option, option)}: {what}" + (f" ({text})" if text else "")
        if not kind & p.REP_FLAG_ERROR:
            return self._violation(f"unexpected reply type {kind:#x} to {_OPTION_NAMES.get(option, option)}")
        return NbdNegotiationError(server=self.server, export=self.export, detail=detail)

    def _violation(self, detail: str) -> NbdProtocolError:
        return NbdProtocolError(server=self.server, export=self.export, detail=detail)

"""TLS for NBD connections (NBD_OPT_STARTTLS): a TLS session over a connected blocking socket.

After the server acknowledges NBD_OPT_STARTTLS the TLS handshake runs on the same socket, and option
haggling then goes on inside TLS (doc/proto.md of NetworkBlockDevice/nbd). `TlsConnection` is what the
socket becomes: it offers the calls the NBD code makes on a socket (``recv_into``, ``sendall``,
``shutdown``, ``close``...) on top of an ``ssl.SSLObject`` with memory BIOs, driving the raw socket
itself. That way one thread may block receiving while other threads send (an NBD server answers from
its worker threads while the connection's thread waits for the next request): OpenSSL forbids
concurrent use of one ``SSL`` object, so every call into it holds a short lock, and the blocking
socket I/O happens outside that lock. Bytes the peer sent right after its STARTTLS (before our
acknowledgement reached it) are handed over from the caller's receive buffer, so nothing is lost.

``sendmsg`` and ``sendfile`` do not apply to a TLS connection; `standbylib.nbd.sockio` joins the parts
and sends them with ``sendall`` instead (file ranges are read, then sent).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from standbylib.nbd.protocol import ProtocolError

#: Bytes received from the socket at a time (a TLS record is at most 16 KiB plus overhead).
_RECV = 256 << 10


@dataclass(frozen=True)
class ServerTls:
    """An NBD server's TLS: its context (certificate, key, client-certificate policy) and whether
    clients must start TLS before anything else (``--nbd-tls require``) or may (``optional``)."""

    context: ssl.SSLContext
    required: bool = True


class TlsHandshakeError(ProtocolError):
    """The TLS handshake failed: the peer's certificate was refused, or the peer refused ours."""

    template = "TLS handshake failed: {detail}"


class TlsConnection:
    """A TLS session on a connected blocking socket: one receiving thread, any number of senders."""

    def __init__(
        self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
    ) -> None:
        """Wrap `sock` with `obj` (made by ``wrap_bio`` on the two BIOs); `accept` and `connect` do
        this and the handshake. Not for direct use."""
        self.raw = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._ssl_lock = threading.Lock()  # the SSLObject and its BIOs
        self._send_lock = threading.Lock()  # the order of the bytes on the socket
        self._closed = False

    # -- set up ---------------------------------------------------------------------------------------

    @classmethod
    def accept(cls, sock: socket.socket, context: ssl.SSLContext, received: bytes = b"") -> TlsConnection:
        """The server's side: handshake on `sock`; `received` = bytes already read from it."""
        conn = cls._wrap(sock, context, server_side=True, server_hostname=None)
        conn._handshake(received)
        return conn

    @classmethod
    def connect(
        cls, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None, received: bytes = b""
    ) -> TlsConnection:
        """The client's side; the server's certificate must name `server_hostname` (when the context
        checks host names)."""
        conn = cls._wrap(sock, context, server_side=False, server_hostname=server_hostname)
        conn._handshake(received)
        return conn

    @classmethod
    def _wrap(
        cls, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None
    ) -> TlsConnection:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        return cls(sock, obj, incoming, outgoing)

    def _handshake(self, received: bytes) -> None:
        if received:
            self._in.write(received)
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                wanted = True
            except ssl.SSLError as e:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert that tells the peer why
                raise TlsHandshakeError(detail=_reason(e)) from None
            if wanted:
                self._flush()
                data = self.raw.recv(_RECV)
                if not data:
                    raise TlsHandshakeError(detail="the peer closed the connection during the handshake")
                with self._ssl_lock:
                    self._in.write(data)
        self._flush()

    # -- socket calls ---------------------------------------------------------------------------------

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        """Receive up to `nbytes` (all of `buffer`) decrypted bytes; 0 when the peer closed."""
        view = memoryview(buffer).cast("B")
        n = nbytes or len(view)
        read: Any = self._obj.read  # read(n, buffer) returns a count (typeshed says bytes)
        while True:
            with self._ssl_lock:
                try:
                    got: int = read(n, view)
                except ssl.SSLWantReadError:
                    got = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
                pending = self._out.pending
            if pending:
                self._flush()  # e.g. the answer to a key update
            if got >= 0:
                return got
            data = self.raw.recv(_RECV)
            if not data:
                return 0  # closed without close_notify: the NBD layer decides whether it was mid-frame
            with self._ssl_lock:
                self._in.write(data)

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf)
        return bytes(buf[:got])

    def sendall(self, data: Any) -> None:
        """Encrypt and send all of `data`; records go out in the order of the calls."""
        with self._send_lock:
            with self._ssl_lock:
                self._obj.write(data)
                out = self._out.read()
            self.raw.sendall(out)

    def _flush(self) -> None:
        with self._send_lock:
            with self._ssl_lock:
                out = self._out.read()
            if out:
                self.raw.sendall(out)

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def setsockopt(self, *args: Any) -> None:
        self.raw.setsockopt(*args)

    def fileno(self) -> int:
        return self.raw.fileno()

    def getpeercert(self) -> dict[str, Any] | None:
        return self._obj.getpeercert()

    def version(self) -> str | None:
        return self._obj.version()

    def close(self) -> None:
        """Send close_notify (best effort, never waiting for the peer's) and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._ssl_lock, contextlib.suppress(ssl.SSLError, ValueError):
                self._obj.unwrap()
            with contextlib.suppress(OSError):
                self._flush()
        finally:
            self.raw.close()


def _reason(e: ssl.SSLError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    reason = e.reason or str(e)
    return str(reason).replace("_", " ").lower()

"""Blocking-socket I/O for one NBD connection: a buffered reader and a lock-protected writer.

The reader parses many small frames (request headers are 28 bytes) out of one ``recv``; the writer
sends a whole reply, or a batch of replies, with one ``sendmsg`` (and ``sendfile`` for file ranges
sent by reference), holding its lock so replies written from several threads never interleave.

Both also work on a `TlsConnection` (after NBD_OPT_STARTTLS; `SocketReader.start_tls` and
`SocketWriter.start_tls` switch them over). ``sendmsg`` and ``sendfile`` do not exist there: the
writer then joins the parts of each call into one ``sendall``, and reads file ranges before sending
them. The plain path only pays one attribute test per call.

The NBD client (`standbylib.nbd.client`) reads its replies with the same reader: `peek_blocking` shows
a reply's magic before it is parsed, and `readinto` receives a READ's data straight into the caller's
buffer.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Sequence
from typing import Any

from standbylib.nbd.tls import TlsConnection
from standbylib.rawfile import Buffer
from standbylib.readplan import FileRange

_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
#: Largest piece of a long payload allocated at once (`SocketReader.read`).
READ_PIECE = 8 << 20
_ZEROS = bytes(1 << 20)


class PeerClosed(EOFError):
    """The peer closed the connection (mid-frame or between frames).

    `have` of the `want` bytes being read had arrived: 0 means between frames, so a caller can tell a
    clean end from a cut-off frame without parsing the message."""

    def __init__(self, message: str, *, have: int = 0, want: int = 0) -> None:
        super().__init__(message)
        self.have = have
        self.want = want


class SocketReader:
    """Reads frames from a blocking socket through a buffer of `size` bytes. One reader thread."""

    def __init__(self, sock: socket.socket | TlsConnection, size: int = 256 << 10) -> None:
        self._sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    def start_tls(self, sock: TlsConnection) -> None:
        """Read from `sock` from now on (the bytes buffered so far went to its handshake: `take`)."""
        self._sock = sock
        self._start = self._end = 0

    def take(self) -> bytes:
        """The bytes buffered and not consumed yet, consuming them."""
        data = bytes(self._view[self._start : self._end])
        self._start = self._end = 0
        return data

    def buffered(self) -> int:
        """Bytes received and not consumed yet (available without blocking)."""
        return self._end - self._start

    def _fill(self, n: int) -> None:
        """Make at least `n` (<= buffer size) bytes available, receiving as much as the socket has."""
        if self._start + n > len(self._buf):
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start : self._end]
            self._start, self._end = 0, left
        while self._end - self._start < n:
            got = self._sock.recv_into(self._view[self._end :])
            if not got:
                have = self._end - self._start
                raise PeerClosed(f"connection closed with {have} of {n} bytes", have=have, want=n)
            self._end += got

    def unpack(self, frame: struct.Struct) -> tuple[Any, ...]:
        """Read one fixed-size frame."""
        self._fill(frame.size)
        values = frame.unpack_from(self._buf, self._start)
        self._start += frame.size
        return values

    def peek(self, frame: struct.Struct) -> tuple[Any, ...] | None:
        """The next frame if it is buffered already (without consuming it), else None; never blocks."""
        if self._end - self._start < frame.size:
            return None
        return frame.unpack_from(self._buf, self._start)

    def peek_blocking(self, frame: struct.Struct) -> tuple[Any, ...]:
        """The next frame without consuming it, waiting for it if it is not buffered yet.

        For a reader that must see a frame's first field to know which frame follows (the NBD client:
        a simple reply or a structured reply chunk)."""
        self._fill(frame.size)
        return frame.unpack_from(self._buf, self._start)

    def skip(self, n: int) -> None:
        """Consume `n` buffered bytes (after `peek`)."""
        assert n <= self._end - self._start
        self._start += n

    def read(self, n: int) -> bytes | bytearray:
        """Read exactly `n` bytes.

        More than a buffer's worth is received straight into pieces of at most `READ_PIECE` bytes,
        each allocated when the data reaches it, then joined: a peer announcing 64 MiB and sending
        little makes the server hold little, and a write up to `READ_PIECE` costs no extra copy."""
        if n <= len(self._buf):
            self._fill(n)
            data = bytes(self._view[self._start : self._start + n])
            self._start += n
            return data
        have = self._end - self._start
        pieces: list[bytearray] = []
        left = n
        while left:
            piece = bytearray(max(min(left, READ_PIECE), have))
            view = memoryview(piece)
            if have:
                view[:have] = self._view[self._start : self._end]
                self._start = self._end = 0
            got, have = have, 0
            while got < len(piece):
                k = self._sock.recv_into(view[got:])
                if not k:
                    have = n - left + got
                    raise PeerClosed(f"connection closed with {have} of {n} bytes", have=have, want=n)
                got += k
            pieces.append(piece)
            left -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, view: memoryview) -> None:
        """Fill `view` exactly: first from the buffer, then with ``recv_into`` straight into it.

        For a reader that knows where the bytes go (the NBD client's reads land in the caller's
        buffer): a payload of any size costs no copy beyond the buffered part."""
        want = len(view)
        pos = min(self._end - self._start, want)
        if pos:
            view[:pos] = self._view[self._start : self._start + pos]
            self._start += pos
        recv_into = self._sock.recv_into
        while pos < want:
            got = recv_into(view[pos:])
            if not got:
                raise PeerClosed(f"connection closed with {pos} of {want} bytes", have=pos, want=want)
            pos += got

    def discard(self, n: int) -> None:
        """Consume `n` bytes we will not use, a buffer at a time."""
        while n:
            piece = min(n, len(self._buf))
            self._fill(piece)
            self._start += piece
            n -= piece


class SocketWriter:
    """Writes whole replies to a blocking socket from any thread.

    `send` takes the lock itself; a caller sending a batch (several `send_locked` and `sendfile_locked`
    calls) holds `lock` around them, so nothing else is written in between.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._tls: TlsConnection | None = None
        self.lock = threading.Lock()

    def start_tls(self, sock: TlsConnection) -> None:
        """Send through `sock` from now on."""
        self._tls = sock

    def send(self, parts: Sequence[Buffer]) -> None:
        with self.lock:
            self.send_locked(parts)

    def send_locked(self, parts: Sequence[Buffer], *, more: bool = False) -> None:
        """Send every byte of `parts` (gathered: no concatenation); `more` when more follows at once."""
        if self._tls is not None:
            self._tls.sendall(b"".join(parts))
            return
        flags = socket.MSG_MORE if more else 0
        parts = list(parts)
        while parts:
            batch = parts[:_IOV_MAX]
            total = sum(len(b) for b in batch)
            sent = self._sock.sendmsg(batch, (), flags if len(parts) <= _IOV_MAX else socket.MSG_MORE)
            if sent == total:
                del parts[:_IOV_MAX]
                continue
            # Partial send (a signal, or a non-blocking socket): drop what went out and go on.
            i = 0
            while sent >= len(parts[i]):
                sent -= len(parts[i])
                i += 1
            del parts[:i]
            parts[0] = memoryview(parts[0])[sent:]

    def sendfile_locked(self, piece: FileRange) -> None:
        """Send `piece` by reference from the page cache; past the end of the file, zeros."""
        fd, offset, left = piece
        if self._tls is not None:
            self._send_file_tls(self._tls, fd, offset, left)
            return
        out = self._sock.fileno()
        while left:
            n = os.sendfile(out, fd, offset, left)
            if n == 0:
                while left:
                    chunk = min(left, len(_ZEROS))
                    self.send_locked([_ZEROS[:chunk]], more=True)
                    left -= chunk
                return
            offset += n
            left -= n

    @staticmethod
    def _send_file_tls(tls: TlsConnection, fd: int, offset: int, left: int) -> None:
        """`sendfile_locked` over TLS: read the range a piece at a time and send it; zeros past the end."""
        while left:
            data = os.pread(fd, min(left, _TLS_PIECE), offset)
            if not data:
                tls.sendall(_ZEROS[: min(left, len(_ZEROS))])
                left -= min(left, len(_ZEROS))
                continue
            tls.sendall(data)
            offset += len(data)
            left -= len(data)


#: Bytes read from a file and sent at a time over TLS.
_TLS_PIECE = 1 << 20


def zero_parts(n: int) -> list[memoryview]:
    """`n` zero bytes as views of one shared zero buffer."""
    view = memoryview(_ZEROS)
    return [view[: min(n - i, len(_ZEROS))] for i in range(0, n, len(_ZEROS))]

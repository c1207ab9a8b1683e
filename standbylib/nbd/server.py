"""An NBD server exporting `BlockDevice`s: fixed newstyle handshake, structured replies, base:allocation.

This module owns the listening socket and the threads; the protocol lives in `handshake`
(negotiation) and `transmission` (requests and replies). Threads rather than asyncio: each connection
has a thread with a blocking socket that reads requests and serves reads itself (a read is ``preadv``
calls and a ``sendmsg``, which release the GIL, so several connections really run in parallel), while
writes, flushes and reads of devices without read plans run in a shared worker pool and reply out of
order. The asyncio version this replaced paid a thread hop, a future and a ``bytes`` copy per request
and read a snapshot at 0.14 of nbdkit's speed (bench/nbd_bench.py, docs/NBD.md).

Errors: a request that fails (bad range, read-only export, unknown command, a library `RequestError`,
or any device error) gets an errno reply and the connection goes on; a broken frame (bad magic, unknown
client flags, an oversize option) or an abrupt disconnect ends only that connection. Library
exceptions become errno values in one table, `ERRNO_TABLE`.

TLS: with ``tls`` (a `ServerTls`) clients may, or must, start TLS with NBD_OPT_STARTTLS during the
handshake (`handshake.negotiate`); the connection then runs over a `TlsConnection`. With ``access`` (an
`ExportAccess`) the owner decides, by the client's certificate, which exports each client may open.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from standbylib.errors import InvalidArgument
from standbylib.nbd.errnos import ERRNO_TABLE, errno_for
from standbylib.nbd.handshake import (
    BASE_ALLOCATION_ID,
    MAX_OPTION,
    MAX_REQUEST,
    PREFERRED_BLOCK_SIZE,
    ExportAccess,
    Exports,
    ExportTable,
    negotiate,
)
from standbylib.nbd.protocol import ProtocolError
from standbylib.nbd.sockio import SocketReader, SocketWriter
from standbylib.nbd.tls import ServerTls, TlsConnection
from standbylib.nbd.transmission import ExtentSource, Transmission
from standbylib.readplan import PlanSource

__all__ = [
    "BASE_ALLOCATION_ID",
    "ERRNO_TABLE",
    "MAX_OPTION",
    "MAX_REQUEST",
    "PREFERRED_BLOCK_SIZE",
    "ExportAccess",
    "Exports",
    "ExtentSource",
    "NbdServer",
    "PlanSource",
    "ServerTls",
    "errno_for",
]

log = logging.getLogger(__name__)


class NbdServer:
    """Serve `exports` over NBD.

    `exports` maps an export name to a device, either as a mapping or as a callable returning None
    for unknown names (then `list_exports` supplies the names for NBD_OPT_LIST; without it the list
    is empty); the callable runs on the connection's thread during its handshake and may block. The
    server never closes devices: their owner does, after `stop`.

    Threading: `start` listens in a background thread and serves each connection in a thread of its
    own, which calls the device's `read_plan` (`standbylib.readplan.PlanSource`), `extents` and
    `read` itself; `write`, `zero`, `flush` and, for devices without read plans, `read` run in a pool
    of `workers` threads shared by all connections, at most `max_in_flight` per connection. So device
    methods are called concurrently (devices are thread-safe) and replies may go out of order.
    `min_block_size` is advertised and enforced: requests not aligned to it get EINVAL.

    `access`: which exports a client may open and list, asked with its certificate (None before or
    without TLS) during its handshake; a refused export is answered NBD_REP_ERR_POLICY whether it exists
    or not. None: every client may open every export.
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
        tls: ServerTls | None = None,
        access: ExportAccess | None = None,
    ) -> None:
        if min_block_size < 1 or min_block_size & (min_block_size - 1):
            raise InvalidArgument(detail=f"min_block_size {min_block_size} must be a power of two")
        self._exports = ExportTable(exports, list_exports, access)
        self._listen = listen
        self._workers = workers
        self._max_in_flight = max_in_flight
        self._min_block = min_block_size
        self._tls = tls
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._stopping = False
        self.address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind, start serving in background threads and return the bound ``(host, port)``."""
        if self._accepter is not None:
            raise InvalidArgument(detail="server already started")
        host, port = self._listen
        family, _type, _proto, _name, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.create_server(addr[:2], family=family, backlog=128)
        self._sock = sock
        self._stopping = False
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="nbd-io")
        self._accepter = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accepter.start()
        bound_host, bound_port = sock.getsockname()[:2]
        self.address = (bound_host, bound_port)
        return self.address

    def stop(self) -> None:
        """Stop listening, end every connection, and wait for requests in progress to finish."""
        accepter, sock = self._accepter, self._sock
        if accepter is None or sock is None:
            return
        with self._lock:
            self._stopping = True
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        accepter.join()
        sock.close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections.values():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes blocked recv/send: the connection ends
        for thread in connections:
            thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._accepter = self._sock = self._pool = None

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        n = 0
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError as e:
                if self._stopping:
                    return
                log.warning("nbd accept failed: %s", e)
                threading.Event().wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            n += 1
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"nbd-conn-{n}", daemon=True
            )
            with self._lock:
                if self._stopping:
                    conn.close()
                    return
                self._connections[thread] = conn
            thread.start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        assert self._pool is not None
        reader, writer = SocketReader(conn), SocketWriter(conn)
        secured: list[TlsConnection] = []

        def start_tls(received: bytes) -> TlsConnection:
            assert self._tls is not None
            secured.append(TlsConnection.accept(conn, self._tls.context, received))
            return secured[0]

        try:
            session = negotiate(reader, writer, self._exports, self._min_block, self._tls, start_tls)
            if session is not None:
                Transmission(
                    reader,
                    writer,
                    session,
                    pool=self._pool,
                    max_in_flight=self._max_in_flight,
                    min_block=self._min_block,
                ).run()
        except ProtocolError as e:
            log.warning("nbd client %s: %s; closing the connection", peer, e)
        except (EOFError, OSError) as e:
            log.debug("nbd client %s disconnected: %s", peer, e)
        except Exception:
            log.exception("nbd client %s: unexpected error; closing the connection", peer)
        finally:
            if secured:
                secured[0].close()  # close_notify, then the socket
            conn.close()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

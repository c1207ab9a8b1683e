"""Several NBD connections to one export, reading ranges in parallel and yielding them in order.

`NbdPool` opens several `NbdClient` connections (only when the server advertises
NBD_FLAG_CAN_MULTI_CONN: otherwise connections may not see each other's state) and reads a list of
ranges across them, one thread per connection, yielding the results strictly in range order with a
bounded number of ranges held, so its caller (the backup node) can write one sequential stream.
`_Feed` hands the ranges out to the connection threads and collects their results.

`standbylib.nbd.client` re-exports `NbdPool`, so this module imports the client only when a pool
connects.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from standbylib.errors import InvalidArgument
from standbylib.nbd.client_errors import NbdProtocolError
from standbylib.nbd.client_replies import Extent, Job

if TYPE_CHECKING:
    from standbylib.nbd.client import NbdClient

__all__ = ["NbdPool"]


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
        self.results: dict[int, Job] = {}

    def take(self, block: bool) -> Job | None:
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
        return Job(index, offset, memoryview(bytearray(length)), zeroed=True)

    def deliver(self, job: Job) -> None:
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
        from standbylib.nbd.client import NbdClient  # not at the top: client.py imports this module

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

"""The standby's data channel: Mirror sessions whose batches travel on a plain TCP connection.

A primary opens its Mirror stream on gRPC with ``data_channel`` set. The servicer claims the volume
(`StandbyNode.open_stream`, as for any stream) and hands the claim to this server with `offer`, which
returns a one-time token; the gRPC call then ends, so no stream holds one of the gRPC server's worker
threads. The primary connects to the data listener (TLS, and mutual TLS, exactly as gRPC is
configured), sends ``DataChannelHello{token}``, then batches as frames (`standbylib.rpc.frames`); each
is applied (`standby.batches`) and acknowledged by a `MirrorReply` frame, as on the stream.

The listener is exposed to anything that can reach it, so it trusts nothing before the token:

* a token is good for one connection and for `TOKEN_SECONDS`; with mutual TLS, only for the client
  certificate that opened the gRPC call; unknown, reused or expired tokens are refused;
* the hello must arrive, whole, within `HELLO_SECONDS`, and be at most `HELLO_LIMIT` bytes; later
  frames at most `MAX_FRAME` (whatever length is announced) and each within `FRAME_SECONDS` once
  begun; a session silent for `IDLE_SECONDS` ends (a primary sends a heartbeat every second);
* a TLS listener refuses a client that does not start TLS; at most `max_connections` connections are
  served, of which at most `MAX_HELLOS` from one address before their hello (the rest are closed at
  once, logged once, counted: ``standby_limit_reached_total``);
* a refusal sends an error frame when it can (`MirrorReply.error_code`, `error`), is logged
  (``data_channel_refused``) and counted (``standby_data_channel_refusals_total{reason}``), applies
  nothing, and leaves the daemon serving.

One thread per connection: it receives a frame into a reused buffer, applies it, sends the reply.
In ``received`` mode a second thread applies while the first acknowledges arrivals.

It is a little over the other modules' size because the defences listed above are one piece: the
tokens, the limits and the session loop decide together what a connection may do next.
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import queue
import secrets
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError

from standby.batches import applied_reply, apply_batch
from standby.node import StandbyNode
from standby.replica import Replica
from standbylib.errors import StandbyError
from standbylib.rpc.frames import (
    MAX_FRAME,
    FrameReader,
    FrameTooBig,
    PeerClosed,
    close_socket,
    describe_error,
    send_frame,
)
from standbylib.rpc.v1 import replication_pb2
from standbylib.rpc.wire import Decoded, MalformedMessage, batch_view, decode_batch
from standbylib.runtime import logs
from standbylib.runtime.rpc import status_for

log = logs.get(__name__)

#: Seconds a token stays good (the primary connects right after it got it).
TOKEN_SECONDS = 10.0
#: Seconds for a new connection's TLS handshake and hello, and the largest hello accepted.
HELLO_SECONDS = 10.0
HELLO_LIMIT = 4096
#: Seconds a frame may take once its first byte arrived, and a session may stay silent.
FRAME_SECONDS = 60.0
IDLE_SECONDS = 60.0
#: Connections served at once (sessions and connections still in their hello), and connections from
#: one address still in their hello at most (so that clients that never present a token cannot keep
#: the primaries of other hosts out).
MAX_CONNECTIONS = 256
MAX_HELLOS = 16
#: Batches acknowledged by one cumulative reply at most (see `DataChannelServer._session`).
COALESCE = 16
#: Batches received and not yet applied, per session, in `received` mode.
RECEIVE_QUEUE = 8
#: Why connections are refused (the `reason` label; every one is exported from the start).
REFUSAL_REASONS = ("tls", "hello", "token", "certificate", "protocol", "timeout", "limit")


class ChannelMetrics(Protocol):
    def channel_refused(self, reason: str) -> None: ...
    def limit_reached(self, limit: str) -> None: ...


class NullChannelMetrics:
    def channel_refused(self, reason: str) -> None:
        pass

    def limit_reached(self, limit: str) -> None:
        pass


@dataclass
class _Offer:
    replica: Replica
    received_acks: bool
    certificate: bytes | None  # DER of the gRPC client's certificate (mutual TLS), else None
    expires: float


class _Refused(Exception):
    def __init__(self, reason: str, code: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.code, self.message = reason, code, message


class DataChannelServer:
    """Listens on `address`; `tls` is the gRPC server's TLS as an ``ssl.SSLContext`` (None: plain TCP),
    requiring client certificates when gRPC does."""

    def __init__(
        self,
        node: StandbyNode,
        address: tuple[str, int],
        *,
        tls: ssl.SSLContext | None = None,
        metrics: ChannelMetrics | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.node = node
        self.address = address
        self.tls = tls
        self.metrics: ChannelMetrics = metrics or NullChannelMetrics()
        self.max_connections = max_connections
        self._offers: dict[bytes, _Offer] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._sessions = 0
        self._hellos: collections.Counter[str] = collections.Counter()  # before their hello, by address
        self._at_limit = False
        self._running = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.bound: tuple[str, int] = address

    # -- life ----------------------------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            detail = f"cannot listen on {host}:{port} (data channel): {e.strerror}"
            raise StandbyError(detail=detail) from None
        sock.listen(128)
        sock.settimeout(0.5)  # wake up to expire unused tokens
        self._sock = sock
        self.bound = (host, sock.getsockname()[1])
        self._running = True
        self._thread = threading.Thread(target=self._accept_loop, name="data-channel", daemon=True)
        self._thread.start()
        return self.bound

    def stop(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            offers, self._offers = list(self._offers.values()), {}
            connections = list(self._connections)
        for offer in offers:
            self.node.close_stream(offer.replica)
        for conn in connections:
            close_socket(conn)

    @property
    def sessions(self) -> int:
        return self._sessions

    # -- tokens (from the gRPC servicer) -------------------------------------------------------------

    def offer(
        self, replica: Replica, opened: replication_pb2.MirrorOpen, certificate: bytes | None
    ) -> replication_pb2.DataChannelOffer:
        """Take over the claim of `replica` (its stream lock) for a data channel session; the offer the
        primary needs to connect. An offer not taken up in `TOKEN_SECONDS` releases the claim."""
        token = secrets.token_bytes(32)
        with self._lock:
            self._offers[token] = _Offer(
                replica, opened.received_acks, certificate, time.monotonic() + TOKEN_SECONDS
            )
        host, port = self.bound
        return replication_pb2.DataChannelOffer(token=token, host=host, port=port)

    def revoke(self, volume: str) -> None:
        """Forget the offers of `volume` not taken up (a new stream of it is opening)."""
        with self._lock:
            gone = [t for t, o in self._offers.items() if o.replica.name == volume]
            offers = [self._offers.pop(t) for t in gone]
        for offer in offers:
            log.info("data_channel_unused", volume=volume, reason="a new stream of the volume opened")
            self.node.close_stream(offer.replica)

    def _redeem(self, token: bytes) -> _Offer | None:
        with self._lock:
            for known in self._offers:
                if hmac.compare_digest(known, token):
                    return self._offers.pop(known)
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone = [t for t, o in self._offers.items() if o.expires < now]
            offers = [self._offers.pop(t) for t in gone]
        for offer in offers:
            log.warning(
                "data_channel_unused",
                volume=offer.replica.name,
                reason=f"the primary did not connect to the data channel within {TOKEN_SECONDS:g} s",
            )
            self.node.close_stream(offer.replica)

    # -- connections ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while self._running:
            self._expire()
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._running:
                    log.warning("data_channel_accept_failed", error=str(e))
                    time.sleep(0.1)
                continue
            with self._lock:
                if len(self._connections) >= self.max_connections:
                    full = "data_channel_connections"
                elif self._hellos[peer[0]] >= MAX_HELLOS:
                    full = "data_channel_hellos"
                else:
                    full = ""
                    self._connections.add(conn)
                    self._hellos[peer[0]] += 1
                    self._at_limit = False
            if full:
                self._over_limit(conn, peer, full)
                continue
            threading.Thread(
                target=self._serve, args=(conn, peer), name=f"data-{peer[0]}:{peer[1]}", daemon=True
            ).start()

    def _over_limit(self, conn: socket.socket, peer: tuple[str, int], limit: str) -> None:
        self.metrics.limit_reached(limit)
        self.metrics.channel_refused("limit")
        if not self._at_limit:  # once per episode, not once per connection
            self._at_limit = True
            log.warning(
                "limit_reached",
                limit=limit,
                value=self.max_connections if limit == "data_channel_connections" else MAX_HELLOS,
                peer=f"{peer[0]}:{peer[1]}",
                effect="new data channel connections are closed until one ends (connections that "
                "have presented their token are not limited by data_channel_hellos)",
            )
        conn.close()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        where = f"{peer[0]}:{peer[1]}"
        sock = conn
        authenticated = False
        try:
            try:
                conn.settimeout(HELLO_SECONDS)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small
                if self.tls is not None:
                    try:
                        sock = self.tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError) as e:
                        detail = f"no TLS handshake: {describe_error(e)}"
                        raise _Refused("tls", "UNAVAILABLE", detail) from None
                reader, offer = self._hello(sock)
            except _Refused as e:
                self._refuse(sock, where, e, send=e.reason != "tls")
                return
            except (OSError, ssl.SSLError) as e:
                reason = "timeout" if isinstance(e, TimeoutError) else "hello"
                self._refuse(sock, where, _Refused(reason, "UNAVAILABLE", describe_error(e)), send=False)
                return
            with self._lock:
                self._hello_done(peer[0])
                self._sessions += 1
            authenticated = True
            try:
                log.info(
                    "data_channel_opened", volume=offer.replica.name, peer=where, tls=self.tls is not None
                )
                self._session(sock, reader, offer, where)
            finally:
                with self._lock:
                    self._sessions -= 1
                self.node.close_stream(offer.replica)
        finally:
            with self._lock:
                self._connections.discard(conn)
                if not authenticated:
                    self._hello_done(peer[0])
            close_socket(sock)

    def _hello_done(self, host: str) -> None:
        """Under the lock: a connection from `host` is past its hello (or gone)."""
        self._hellos[host] -= 1
        if self._hellos[host] <= 0:
            del self._hellos[host]

    def _hello(self, sock: socket.socket) -> tuple[FrameReader, _Offer]:
        deadline = time.monotonic() + HELLO_SECONDS
        reader = FrameReader(sock, limit=HELLO_LIMIT, initial=HELLO_LIMIT)
        try:
            frame = reader.read(deadline)
        except FrameTooBig as e:
            raise _Refused("hello", "INVALID_ARGUMENT", f"the hello is too big: {e}") from None
        except PeerClosed:
            raise _Refused("hello", "UNAVAILABLE", "closed before its hello") from None
        except TimeoutError:
            raise _Refused("timeout", "DEADLINE_EXCEEDED", f"no hello within {HELLO_SECONDS:g} s") from None
        try:
            request = replication_pb2.MirrorRequest.FromString(bytes(frame))
        except DecodeError:
            raise _Refused("hello", "INVALID_ARGUMENT", "the first frame is not a MirrorRequest") from None
        if request.WhichOneof("kind") != "hello":
            raise _Refused("hello", "INVALID_ARGUMENT", "the first frame must be a DataChannelHello")
        offer = self._redeem(request.hello.token)
        if offer is None:
            raise _Refused(
                "token",
                "PERMISSION_DENIED",
                "unknown, used or expired data channel token (open a Mirror stream first)",
            )
        if offer.certificate is not None:
            presented = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
            if presented != offer.certificate:
                self.node.close_stream(offer.replica)
                raise _Refused(
                    "certificate",
                    "PERMISSION_DENIED",
                    "the client certificate is not the one that opened the Mirror stream",
                )
        reader.limit = MAX_FRAME
        sock.settimeout(IDLE_SECONDS)
        return reader, offer

    def _refuse(self, sock: socket.socket, where: str, e: _Refused, *, send: bool = True) -> None:
        self.metrics.channel_refused(e.reason)
        log.warning("data_channel_refused", peer=where, reason=e.reason, error=e.message)
        if send:
            _send_error(sock, e.code, e.message)

    # -- a session -----------------------------------------------------------------------------------

    def _session(self, sock: socket.socket, reader: FrameReader, offer: _Offer, where: str) -> None:
        replica = offer.replica
        out = _Replies(sock)
        applier = _Applier(self.node, replica, out) if offer.received_acks else None
        # Acknowledgements are cumulative: while the next frame is already arriving, the reply of a
        # plain batch waits for the next one's (up to `COALESCE` batches), which saves a message and a
        # wake-up on both sides. Replies that matter on their own go at once (a flush barrier's, which a
        # client's FLUSH waits for; the end of a resync's; mismatches; a verify command); a held reply
        # goes before an error and when the primary closes.
        coalesced = 0
        ended = "the primary closed the data channel"
        try:
            while True:
                try:
                    frame = reader.read(time.monotonic() + FRAME_SECONDS)
                except PeerClosed as e:
                    if not e.clean:
                        ended = str(e)
                    return
                if applier is not None:
                    frame = memoryview(bytes(frame))  # queued: its own copy, the buffer is reused
                view = batch_view(frame)
                if view is None:
                    raise MalformedMessage(detail="only batches may follow the hello")
                decoded = decode_batch(view)
                if applier is not None:
                    out.send(replication_pb2.MirrorReply(sequence=decoded.sequence, received=True))
                    applier.put(decoded)
                    continue
                mismatched = apply_batch(
                    self.node,
                    replica,
                    decoded.sequence,
                    decoded.ops,
                    decoded.flush,
                    decoded.uptodate,
                    decoded.resync_remaining,
                )
                reply = applied_reply(self.node, replica, decoded.sequence, decoded.flush, mismatched)
                if (
                    coalesced < COALESCE
                    and not (decoded.flush or decoded.uptodate or mismatched)
                    and not reply.HasField("verify")
                    and _readable(sock)
                ):
                    out.hold(reply)
                    coalesced += 1
                    continue
                coalesced = 0
                out.send(reply)
        except StandbyError as e:
            code = status_for(e).name
            ended = f"{code}: {e}"
            if isinstance(e, MalformedMessage | FrameTooBig):
                self.metrics.channel_refused("protocol")
                log.warning("data_channel_refused", peer=where, reason="protocol", error=str(e))
            if applier is not None:
                applier.close()  # what arrived before the bad frame is applied and acknowledged first
                applier = None
            out.error(code, str(e))
        except (OSError, ssl.SSLError) as e:
            ended = describe_error(e)
        except Exception as e:  # a bug: the primary gets INTERNAL, the daemon goes on
            log.exception("internal_error", error=repr(e), volume=replica.name)
            ended = "INTERNAL: an unexpected error (see internal_error)"
            out.error("INTERNAL", "internal error in the daemon; its log has the details")
        finally:
            if applier is not None:
                applier.close()
            out.release()
            log.info("data_channel_closed", volume=replica.name, peer=where, reason=ended)


class _Replies:
    """A session's replies: sent under one lock, at most one held back (cumulative acknowledgement),
    nothing after the error frame, which is the last."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._held: replication_pb2.MirrorReply | None = None
        self._closed = False

    def hold(self, reply: replication_pb2.MirrorReply) -> None:
        with self._lock:
            self._held = reply

    def send(self, reply: replication_pb2.MirrorReply) -> None:
        with self._lock:
            if self._closed:
                return
            self._held = None
            send_frame(self.sock, [reply.SerializeToString()])

    def release(self) -> None:
        """Send the reply held back (the session ends)."""
        with self._lock:
            held, self._held = self._held, None
            if held is not None and not self._closed:
                with contextlib.suppress(OSError, ValueError):
                    send_frame(self.sock, [held.SerializeToString()])

    def error(self, code: str, message: str) -> None:
        self.release()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _send_error(self.sock, code, message)


class _Applier:
    """`received` mode: applies the queued batches in order and acknowledges each once applied; the
    first failure sends the error frame and shuts the connection."""

    def __init__(self, node: StandbyNode, replica: Replica, out: _Replies) -> None:
        self.node, self.replica, self.out = node, replica, out
        self.queue: queue.Queue[Decoded | None] = queue.Queue(maxsize=RECEIVE_QUEUE)
        self.failed: StandbyError | None = None
        self.thread = threading.Thread(target=self._run, name=f"apply-{replica.name}", daemon=True)
        self.thread.start()

    def put(self, decoded: Decoded) -> None:
        if self.failed is not None:
            raise self.failed
        self.queue.put(decoded)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(30)  # the next session of this volume starts once this one applies nothing

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.failed is not None:
                continue
            try:
                node, replica = self.node, self.replica
                mismatched = apply_batch(
                    node, replica, item.sequence, item.ops, item.flush, item.uptodate, item.resync_remaining
                )
                self.out.send(applied_reply(node, replica, item.sequence, item.flush, mismatched))
            except StandbyError as e:
                self.failed = e
                self.out.error(status_for(e).name, str(e))
                _shutdown_only(self.out.sock)
            except OSError:
                self.failed = StandbyError(detail="the data channel broke")
                _shutdown_only(self.out.sock)
            except Exception as e:
                log.exception("internal_error", error=repr(e), volume=self.replica.name)
                self.failed = StandbyError(detail="internal error")
                self.out.error("INTERNAL", "internal error in the daemon; its log has the details")
                _shutdown_only(self.out.sock)


def _readable(sock: socket.socket) -> bool:
    """Bytes of a next frame are already here (decrypted, or on the socket)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


def _send_error(sock: socket.socket, code: str, message: str) -> None:
    reply = replication_pb2.MirrorReply(error_code=code, error=message[:4000])
    with contextlib.suppress(OSError, ValueError):  # the peer is gone already
        send_frame(sock, [reply.SerializeToString()])


def _shutdown_only(sock: socket.socket) -> None:
    """Wake the session's reader (it closes the socket)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

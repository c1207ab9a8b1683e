"""The transport of one Mirror stream: the gRPC call that opens it, and the data channel its batches
travel on when the standby offers one (docs/REPLICATION.md, The data channel).

The call's first request is `open`; with ``--transport auto`` or ``channel`` it asks for the data
channel. When the standby answers with a channel offer, the primary connects (`primary.datalink`),
the gRPC call ends and batches and acknowledgements travel on the channel; otherwise they travel on the
call itself, the request iterator forming batches as the op log's window allows. Either way the
acknowledgements go to one callback, on the thread running the stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from primary.datalink import ChannelError, DataLink
from primary.oplog import OpLog
from standbylib.errors import StandbyError
from standbylib.rpc.v1 import replication_pb2
from standbylib.runtime.tls import TlsFiles

#: How batches travel: on the standby's data channel when it offers one, else on the gRPC stream
#: (auto); on the data channel only; on the gRPC stream only.
TRANSPORTS = ("auto", "channel", "grpc")
#: The Mirror method's full name (proto/v1/replication.proto).
MIRROR_METHOD = "/standbyappliance.v1.Replication/Mirror"
#: gRPC statuses that say the link or the standby is down rather than that the standby refused.
TRANSPORT_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
TRANSPORT_CODE_NAMES = frozenset(code.name for code in TRANSPORT_CODES)

Reply = replication_pb2.MirrorReply


class Transport:
    """How the streams of one volume's mirror travel (`mode`, one of `TRANSPORTS`)."""

    def __init__(
        self,
        oplog: OpLog,
        target: str,
        tls: TlsFiles | None,
        mode: str = "auto",
        data_address: tuple[str, int] | None = None,
    ) -> None:
        if mode not in TRANSPORTS:
            raise ValueError(f"transport {mode!r} is not one of {', '.join(TRANSPORTS)}")
        self.log = oplog
        self.target = target
        self.tls = tls
        self.mode = mode
        self.data_address = data_address  # where the data channel is, if not at the offered port
        self.in_use = ""  # "channel" or "grpc" once a stream opened
        self._unreachable = False  # the last attempt could not connect to the channel: use gRPC once
        # Under the log's lock: what cancels the running stream (its gRPC call or its data channel), and
        # since when it waits for the standby's answer to the data channel request (None: it does not).
        # No batch is in flight then, so the tick loop times the wait itself (`answer_overdue`).
        self.call: Any = None
        self.answer_since: float | None = None

    def run(
        self,
        channel: grpc.Channel,
        opening: replication_pb2.MirrorOpen,
        stream_id: int,
        on_reply: Callable[[Reply], None],
    ) -> None:
        """Run stream `stream_id` of the op log, opened with `opening`, until it ends: raises
        (`grpc.RpcError`, `ChannelError`, `StandbyError`) unless the mirror is stopping."""
        # Batches are serialised by `wire.encode_batch` (protobuf's encoder is too slow for bulk data),
        # so this call passes request bytes through unchanged.
        mirror = channel.stream_stream(
            MIRROR_METHOD, request_serializer=_identity, response_deserializer=Reply.FromString
        )
        # Ask for the data channel unless told not to, or unless it could not be reached last time.
        want = self.mode != "grpc" and not self._unreachable
        self._unreachable = False
        opening.data_channel = want
        decided = threading.Event()
        responses = mirror(self._requests(opening, stream_id, want, decided))
        try:
            with self.log.cond:
                self.call = responses
            if want and self._open_channel(responses, stream_id, decided, on_reply):
                return
            self.in_use = "grpc"
            decided.set()
            for reply in responses:
                on_reply(reply)
            if self.log.running:
                raise StandbyError(detail="the standby ended the stream")
        finally:
            decided.set()
            with self.log.cond:
                self.call = None
            responses.cancel()

    def _open_channel(
        self, responses: Any, stream_id: int, decided: threading.Event, on_reply: Callable[[Reply], None]
    ) -> bool:
        """The standby's answer to the data channel request: connect to the channel it offers and run
        the stream there until it ends (raises); False when it offers none (the stream goes on, on
        gRPC, unless the transport is ``channel``)."""
        with self.log.cond:
            self.answer_since = time.monotonic()
        try:
            return self._channel_answered(responses, stream_id, decided, on_reply)
        finally:
            with self.log.cond:
                self.answer_since = None

    def answer_overdue(self, timeout: float) -> bool:
        """Under the log's lock: the standby has not answered the data channel request (nor ended the
        call once the channel is connected) for `timeout` seconds: the stream is as silent as one
        whose batches are not acknowledged."""
        return self.answer_since is not None and time.monotonic() - self.answer_since > timeout

    def _channel_answered(
        self, responses: Any, stream_id: int, decided: threading.Event, on_reply: Callable[[Reply], None]
    ) -> bool:
        answer = next(responses, None)
        if answer is None:
            raise StandbyError(detail="the standby ended the stream")
        if not answer.HasField("channel"):
            if self.mode == "channel":
                raise ChannelError(
                    status="FAILED_PRECONDITION",
                    detail="the standby offers no data channel (started with --data-listen off?); "
                    "--transport auto falls back to gRPC",
                )
            return False
        try:
            link = DataLink.connect(answer.channel, channel_target(self.target), self.tls, self.data_address)
        except ChannelError:
            if self.mode == "auto":
                self._unreachable = True  # the next attempt goes by gRPC
            raise
        self.in_use = "channel"
        decided.set()  # the request side of the call ends
        for _ in responses:  # the gRPC call ends: the session lives on the data channel
            pass
        with self.log.cond:  # (a reentrant lock)
            self.answer_since = None
            attached = self.log.attach_link(link, stream_id)
            if attached:
                self.call = link
        if not attached:
            link.close()
            return True
        try:
            self.log.pump()
            for reply in link.replies():
                on_reply(reply)
        finally:
            self.log.detach_link()  # no batch is sent on a closed channel
            link.close()
        return True

    def _requests(
        self, opening: replication_pb2.MirrorOpen, stream_id: int, channel: bool, decided: threading.Event
    ) -> Iterator[bytes]:
        """The request side of one stream: `open`, then batches as the window allows. With `channel`,
        the batches wait until `decided`: they go on the data channel if the standby offered one."""
        oplog = self.log
        yield replication_pb2.MirrorRequest(open=opening).SerializeToString()
        if channel:
            while not decided.wait(0.5):
                with oplog.cond:
                    if oplog.stream_id != stream_id or not oplog.running:
                        return
            if self.in_use != "grpc":
                return  # batches go on the data channel: the call's request side ends
        while True:
            with oplog.cond:
                while oplog.stream_id == stream_id and not oplog.sendable():
                    if not oplog.running and not oplog.pending():
                        return
                    oplog.work.wait()
                if oplog.stream_id != stream_id:
                    return
                batch = oplog.form_batch()
            oplog.metrics.batch_sent(oplog.volume, batch.nbytes, len(batch.ops))
            yield b"".join(batch.pieces)


def _identity(message: bytes) -> bytes:
    return message


def channel_target(target: str) -> str:
    """The host of a gRPC target ``HOST:PORT`` (``[v6]:PORT``): where a wildcard data channel is."""
    host = target.rpartition(":")[0] if ":" in target else target
    return host.strip("[]") or "127.0.0.1"


def details(e: grpc.RpcError) -> str:
    """The details of a failed call (its message as the peer gave it)."""
    text = e.details() if hasattr(e, "details") else None
    return str(text or e)

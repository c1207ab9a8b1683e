"""The primary's end of a data channel (docs/REPLICATION.md, Data channel).

The Mirror stream's opening on gRPC returns a `DataChannelOffer`; `DataLink.connect` opens the TCP
connection it names (TLS, and a client certificate, exactly as the gRPC channel has them), presents the
token, and from then on batches go out as frames (`send`) and replies come back as frames (`replies`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator, Sequence

from google.protobuf.message import DecodeError

from standbylib.errors import StandbyError
from standbylib.rawfile import Buffer
from standbylib.rpc.frames import FrameReader, PeerClosed, close_socket, describe_error, send_frame
from standbylib.rpc.v1 import replication_pb2
from standbylib.runtime.tls import TlsFiles

#: Seconds to connect and present the token.
CONNECT_SECONDS = 10.0


class ChannelError(StandbyError):
    """The data channel ended: `status` is the gRPC status name the same failure has on the stream
    (UNAVAILABLE when the connection broke, else the standby's `MirrorReply.error_code`)."""

    template = "{detail}"

    status: str = "UNAVAILABLE"


def channel_address(
    offer: replication_pb2.DataChannelOffer, target_host: str, override: tuple[str, int] | None = None
) -> tuple[str, int]:
    """Where to connect: `override` (``--standby-data``) when given, else the offered port on the host
    the gRPC target names (the address the operator gave, valid through NAT or a proxy, and the name
    the standby's certificate is checked against)."""
    if override is not None:
        return override
    return target_host.strip("[]"), offer.port


class DataLink:
    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self._reader = FrameReader(sock, initial=64 << 10)

    @classmethod
    def connect(
        cls,
        offer: replication_pb2.DataChannelOffer,
        target_host: str,
        tls: TlsFiles | None,
        override: tuple[str, int] | None = None,
    ) -> DataLink:
        host, port = channel_address(offer, target_host, override)
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
        except OSError as e:
            raise ChannelError(
                status="UNAVAILABLE",
                detail=f"cannot connect to the standby's data channel at {where}: {e.strerror or e} "
                "(is its --data-listen reachable from here? --transport grpc avoids the data channel)",
            ) from None
        sock: socket.socket = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None and tls.enabled:
                sock = tls.client_context().wrap_socket(raw, server_hostname=tls.server_name or target_host)
            link = cls(sock, where)
            link.send([replication_pb2.MirrorRequest(hello={"token": offer.token}).SerializeToString()])
        except (OSError, ssl.SSLError) as e:
            close_socket(sock)
            raise ChannelError(
                status="UNAVAILABLE", detail=f"data channel {where}: {describe_error(e)}"
            ) from None
        except BaseException:
            close_socket(sock)
            raise
        sock.settimeout(None)
        return link

    def send(self, pieces: Sequence[Buffer]) -> None:
        send_frame(self.sock, pieces)

    def replies(self) -> Iterator[replication_pb2.MirrorReply]:
        """The standby's replies until the channel ends, which raises `ChannelError`."""
        reader = self._reader
        while True:
            try:
                frame = reader.read()
            except PeerClosed as e:
                raise ChannelError(status="UNAVAILABLE", detail=f"data channel {self.where}: {e}") from None
            except (OSError, ssl.SSLError) as e:
                detail = f"data channel {self.where}: {describe_error(e)}"
                raise ChannelError(status="UNAVAILABLE", detail=detail) from None
            try:
                reply = replication_pb2.MirrorReply.FromString(bytes(frame))
            except DecodeError:
                detail = f"data channel {self.where}: a frame from the standby is not a MirrorReply"
                raise ChannelError(status="INTERNAL", detail=detail) from None
            if reply.error_code:
                raise ChannelError(status=reply.error_code, detail=reply.error or reply.error_code)
            yield reply

    def cancel(self) -> None:
        """End the channel from any thread: a blocked send or read returns with an error."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        close_socket(self.sock)

"""gRPC glue shared by the roles: the error table, server and channel factories.

Library exceptions become gRPC status codes in one table (`STATUS_TABLE`), and back again on the client
side (`raise_for`), so neither side parses messages. Unknown exceptions go out as INTERNAL with a
generic message and are logged with their traceback by the servicer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from standbylib.errors import (
    AlreadyExists,
    Closed,
    DiskFull,
    Fenced,
    InvalidArgument,
    InvalidBlockSize,
    InvalidLength,
    NotFound,
    OutOfRange,
    Overloaded,
    PermissionDenied,
    PreservationDeferred,
    PreservationFull,
    ReadOnly,
    ReplicaInconsistent,
    RequestError,
    SnapshotInvalid,
    StandbyError,
    StoreError,
    VolumeMismatch,
)
from standbylib.runtime import logs
from standbylib.runtime.tls import TlsFiles

log = logs.get(__name__)

#: Largest gRPC message either side accepts: a batch of a few MiB plus one oversize client write.
MAX_MESSAGE = 80 << 20

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # Detect a dead peer on an idle stream within about a minute.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.so_reuseport", 0),
]

#: Library exception -> gRPC status, most specific first.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidBlockSize, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidLength, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Fenced, grpc.StatusCode.ABORTED),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ReadOnly, grpc.StatusCode.FAILED_PRECONDITION),
    (ReplicaInconsistent, grpc.StatusCode.FAILED_PRECONDITION),
    (SnapshotInvalid, grpc.StatusCode.FAILED_PRECONDITION),
    (VolumeMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (PreservationFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PreservationDeferred, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Closed, grpc.StatusCode.UNAVAILABLE),
    (StoreError, grpc.StatusCode.INTERNAL),
    (RequestError, grpc.StatusCode.FAILED_PRECONDITION),
)


class RemoteError(StandbyError):
    """A gRPC call failed; `code` is the status (a `grpc.StatusCode`)."""

    template = "{detail}"


class Unavailable(RemoteError):
    """The peer could not be reached."""

    template = "cannot reach {target}: {detail}"


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status that `exc` maps to; unknown errors are INTERNAL and logged."""
    code = status_for(exc)
    if isinstance(exc, StandbyError) and code != grpc.StatusCode.INTERNAL:
        context.abort(code, _details(str(exc)))
    if isinstance(exc, StandbyError):
        log.error("request_failed", error=str(exc), kind=type(exc).__name__)
        context.abort(code, _details(str(exc)))
    log.exception("internal_error", error=repr(exc))
    context.abort(grpc.StatusCode.INTERNAL, "internal error in the daemon; its log has the details")


#: Longest status message sent: messages echo the request (a volume name, say) and gRPC refuses
#: metadata over 16 KiB, which would turn the answer into RESOURCE_EXHAUSTED.
MAX_DETAILS = 4096


def _details(message: str) -> str:
    if len(message) <= MAX_DETAILS:
        return message
    return message[: MAX_DETAILS - 40] + f"... ({len(message)} characters in all)"


def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a unary servicer method: library errors become their status codes."""

    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:
            if _is_abort(e):
                raise
            abort(context, e)

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(exc).__module__.startswith("grpc") or type(exc).__name__ == "_AbortError"


class Malformed:
    """Stands for a request message that did not parse; the servicer side answers INVALID_ARGUMENT."""

    def __init__(self, type_name: str, error: str) -> None:
        self.message = f"malformed {type_name} message: {error}"


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError) as e:
            return Malformed(cls.DESCRIPTOR.name, str(e) or type(e).__name__)

    return parse


def _checked_unary(method: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return method(request, context)

    return handle


def _checked_stream(method: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        def checked() -> Iterator[Any]:
            for request in requests:
                if isinstance(request, Malformed):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                yield request

        return method(checked(), context)

    return handle


def add_service(server: grpc.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Register `servicer` (methods named as in the .proto) for `service`.

    Used instead of the generated ``add_*_to_server`` so that a request that does not parse is answered
    INVALID_ARGUMENT with the parser's reason (grpc's own handling answers INTERNAL and logs an error).
    """
    handlers = {}
    for m in service.methods:
        request_cls = GetMessageClass(m.input_type)
        response_cls = GetMessageClass(m.output_type)
        impl = getattr(servicer, m.name)
        factory: Any
        if m.client_streaming:
            streaming = m.server_streaming
            factory = (
                grpc.stream_stream_rpc_method_handler if streaming else grpc.stream_unary_rpc_method_handler
            )
            behaviour = _checked_stream(impl)
        else:
            streaming = m.server_streaming
            factory = (
                grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
            )
            behaviour = _checked_unary(impl)
        handlers[m.name] = factory(
            behaviour,
            request_deserializer=_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def create_server(
    address: tuple[str, int],
    register: Callable[[grpc.Server], None],
    *,
    workers: int = 32,
    tls: TlsFiles | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, tuple[str, int], health.HealthServicer]:
    """A started gRPC server on `address` with the servicers `register` adds and the health service.

    With `tls` (enabled) the port speaks TLS only, mutual TLS when it requires client certificates.
    `interceptors` see every call, the health service's included.
    Returns the server, the bound address (port 0 resolved) and the health servicer (all SERVING).
    """
    credentials = tls.server_credentials() if tls is not None and tls.enabled else None
    pool = futures.ThreadPoolExecutor(max_workers=workers)
    server = grpc.server(pool, options=SERVER_OPTIONS, interceptors=list(interceptors))
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    host, port = address
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if credentials is not None:
        bound = server.add_secure_port(target, credentials)
    else:
        bound = server.add_insecure_port(target)
    if bound == 0:
        raise StandbyError(detail=f"cannot listen on {target}: address in use or not available")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, (host, bound), health_servicer


def channel(target: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel to `target`: TLS (with a client certificate when `tls` has one) when `tls` is enabled."""
    if tls is not None and tls.enabled:
        return grpc.secure_channel(
            target, tls.channel_credentials(), options=CHANNEL_OPTIONS + tls.channel_options()
        )
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


@contextmanager
def calling(target: str, tls: TlsFiles | None = None) -> Iterator[None]:
    """Turn a failed call into a `RemoteError` whose message is the server's, or `Unavailable`.

    `tls` is the channel's TLS (None or not enabled: plaintext), for a clear reason when a TLS
    handshake fails."""
    try:
        yield
    except grpc.RpcError as e:
        raise_for(e, target, tls)


def raise_for(e: grpc.RpcError, target: str, tls: TlsFiles | None = None) -> NoReturn:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    if code == grpc.StatusCode.UNAVAILABLE:
        detail = explain_unavailable(details or "unavailable", tls is not None and tls.enabled)
        raise Unavailable(target=target, detail=detail, code=code) from None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        raise Unavailable(target=target, detail="no answer in time", code=code) from None
    raise RemoteError(detail=details or code.name, code=code) from None


def explain_unavailable(details: str, tls: bool) -> str:
    """gRPC's reason for an unreachable peer, with the likely cause first when it is about TLS.

    gRPC reports a refused client certificate, and a plaintext client at a TLS port, as "Socket
    closed": the server ends the connection during the handshake without telling why."""
    low = details.lower()
    last = details.rpartition("last error: ")[2] or details
    if "hostname verification" in low:
        hint = (
            "TLS: the server's certificate does not carry the name or address connected to: put it in the "
            "certificate's subjectAltName (IP:ADDRESS for an address, docs/SECURITY.md), or give "
            "--tls-server-name with a name it carries"
        )
    elif "certificate_verify_failed" in low or "certificate verify failed" in low:
        hint = "TLS: the server's certificate is not signed by a CA of --tls-ca"
    elif "wrong_version_number" in low:
        hint = "TLS handshake failed: the server does not speak TLS (drop --tls-ca), or another protocol"
    elif "socket closed" in low or "connection reset" in low:
        if tls:
            hint = (
                "the server closed the connection during the TLS handshake: it requires a client "
                "certificate signed by its CA (--tls-cert and --tls-key), or refused the one given"
            )
        else:
            hint = (
                "the server closed the connection: it may require TLS (--tls-ca, and --tls-cert and "
                "--tls-key for mutual TLS)"
            )
    else:
        return details
    return f"{hint} ({last})"

"""Authorization of the standby's gRPC calls and NBD exports by the client certificate's identity.

`Authorizer` is a ``grpc.ServerInterceptor``: every call of the Replication and Control services is
mapped to an action by `METHODS` and the volume it names (the request's ``volume`` field; for a
Mirror stream the first message's ``open.volume``), and refused with PERMISSION_DENIED before the
servicer runs unless the policy grants the action on that volume to one of the identities of the
client's certificate. A method missing from `METHODS` is refused whatever the identity (fail closed);
only the health service is open to every client. Status and ListSnapshots answer with the volumes the
client may see. A refused request changes nothing, and a volume that does not exist is refused exactly
as one that does, so a refusal reveals nothing about the standby's volumes.

`ExportGuard` applies the same policy to the NBD exports (`standbylib.nbd.handshake.ExportAccess`).
Each refusal is logged once (``request_denied``, with the identity, the volume and the action) and
counted in ``standby_requests_denied_total{action}``.

The data channel needs no check of its own: a session starts only with the one-time token of an
authorized Mirror call, and with mutual TLS only with that call's client certificate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from standby import policy as p
from standby.policy import Policy, describe, identities_of_auth_context, identities_of_certificate
from standbylib.errors import PermissionDenied
from standbylib.runtime import logs
from standbylib.runtime.rpc import Malformed, abort

log = logs.get(__name__)

if TYPE_CHECKING:  # generic in the type stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]

_REPLICATION = "/standbyappliance.v1.Replication/"
_CONTROL = "/standbyappliance.v1.Control/"
#: Methods every client may call, whatever the policy.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

#: Full method name -> the action it needs on the volume it names. Status and ListSnapshots need
#: `STATUS` on some volume and show only the volumes it is granted on.
METHODS: dict[str, str] = {
    _REPLICATION + "Handshake": p.MIRROR,
    _REPLICATION + "Mirror": p.MIRROR,
    _REPLICATION + "FailbackPull": p.MIRROR,  # the old primary pulls what changed while promoted
    _CONTROL + "Status": p.STATUS,
    _CONTROL + "ListSnapshots": p.STATUS,
    _CONTROL + "CreateSnapshot": p.SNAPSHOT,
    _CONTROL + "DeleteSnapshot": p.SNAPSHOT,
    _CONTROL + "RenewSnapshotLease": p.SNAPSHOT,
    _CONTROL + "SnapshotChanges": p.SNAPSHOT,
    _CONTROL + "Verify": p.VERIFY,
    _CONTROL + "Promote": p.FAILOVER,
    _CONTROL + "Demote": p.FAILOVER,
    _CONTROL + "Takeover": p.FAILOVER,
    _CONTROL + "RemoveVolume": p.FAILOVER,
}

#: The counter's label of a method missing from `METHODS`.
UNLISTED = "unlisted"

#: How a refusal says what was asked: "CN=x may not <verb> volume 'v'".
VERBS = {
    p.MIRROR: "mirror",
    p.VERIFY: "verify",
    p.STATUS: "see the status of",
    p.SNAPSHOT: "manage the snapshots of",
    p.EXPORT: "open the NBD exports of",
    p.FAILOVER: "fail over or fail back",
}


class Denials:
    """Logs and counts refusals (``request_denied``, ``standby_requests_denied_total{action}``).

    `registry` None: counted in an unregistered counter (tests, library use)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.counter = Counter(
            "standby_requests_denied_total",
            "Requests refused by the authorization policy (--policy), by action: mirror, verify, status, "
            "snapshot, export (NBD), failover, unlisted (a gRPC method the policy does not cover).",
            ["action"],
            registry=registry,
        )
        for action in (*p.ACTIONS, UNLISTED):
            self.counter.labels(action)

    def denied(self, identities: Sequence[str], volume: str, action: str, **where: str) -> PermissionDenied:
        """Log and count a refusal; the error to answer it with (PERMISSION_DENIED on gRPC)."""
        who = describe(identities)
        self.counter.labels(action).inc()
        log.warning("request_denied", identity=who, volume=volume, action=action, **where)
        if action == UNLISTED:
            detail = f"{who} may not call {where.get('method', '?')}: the standby's policy does not cover it"
        elif action == p.STATUS and not volume:
            detail = f"{who} may not see the status of any volume (action {action!r})"
        else:
            detail = (
                f"{who} may not {VERBS[action]} volume {volume!r} (action {action!r} is not granted to "
                "this identity by the standby's policy)"
            )
        return PermissionDenied(detail=detail)


def _identities(context: grpc.ServicerContext) -> tuple[str, ...]:
    auth: Any = context.auth_context()  # property -> list of values (the stubs say one value)
    return identities_of_auth_context(auth)


def _volume(request: Any) -> str:
    """The volume a unary request names: its ``volume`` field."""
    return str(getattr(request, "volume", "") or "")


def _first_volume(request: Any) -> str:
    """The volume the first message of a client stream names: for Mirror ``open.volume`` (empty when
    the stream does not begin with `open`, which the servicer refuses), else its ``volume`` field."""
    if request is None:
        return ""
    if "open" in request.DESCRIPTOR.fields_by_name:
        return str(request.open.volume) if request.HasField("open") else ""
    return _volume(request)


class Authorizer(grpc.ServerInterceptor):
    """The gRPC side of the policy (see the module's docstring). Thread-safe: it holds no state but
    the immutable policy and the counter."""

    def __init__(self, policy: Policy, denials: Denials) -> None:
        self.policy = policy
        self.denials = denials

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        return self.guard(handler_call_details.method, continuation(handler_call_details))

    def guard(self, method: str, handler: Handler | None) -> Handler | None:
        """`handler` of `method`, answering only what the policy allows."""
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        action = METHODS.get(method)
        if handler.request_streaming:
            stream: Any = handler.stream_stream or handler.stream_unary
            return _rebuilt(handler, self._streamed(method, action, stream))
        unary: Any = handler.unary_unary or handler.unary_stream
        if action == p.STATUS:
            return _rebuilt(handler, self._listing(method, unary))
        return _rebuilt(handler, self._unary(method, action, unary))

    def _check(self, context: grpc.ServicerContext, method: str, action: str | None, volume: str) -> None:
        identities = _identities(context)
        if action is None:
            abort(context, self.denials.denied(identities, "", UNLISTED, method=method, peer=context.peer()))
        if not self.policy.allows(identities, action, volume):
            abort(
                context, self.denials.denied(identities, volume, action, method=method, peer=context.peer())
            )

    def _unary(self, method: str, action: str | None, inner: Callable[..., Any]) -> Callable[..., Any]:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            # A request that did not parse names no volume; the servicer answers it INVALID_ARGUMENT.
            if action is None or not isinstance(request, Malformed):
                self._check(context, method, action, _volume(request))
            return inner(request, context)

        return behaviour

    def _streamed(self, method: str, action: str | None, inner: Callable[..., Any]) -> Callable[..., Any]:
        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            first = next(requests, None)
            if action is None or not isinstance(first, Malformed):
                self._check(context, method, action, _first_volume(first))
            return inner(requests if first is None else itertools.chain([first], requests), context)

        return behaviour

    def _listing(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        """Status and ListSnapshots: STATUS on the volume asked for, else on some volume; the reply
        keeps only the volumes (and snapshots) the client may see."""

        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            identities = _identities(context)
            volume = "" if isinstance(request, Malformed) else _volume(request)
            if volume:
                self._check(context, method, p.STATUS, volume)
            elif not isinstance(request, Malformed) and not self.policy.allows_any(identities, p.STATUS):
                abort(
                    context, self.denials.denied(identities, "", p.STATUS, method=method, peer=context.peer())
                )
            reply = inner(request, context)
            self._keep_visible(reply, identities)
            return reply

        return behaviour

    def _keep_visible(self, reply: Any, identities: Sequence[str]) -> None:
        def visible(volume: str) -> bool:
            return self.policy.allows(identities, p.STATUS, volume)

        if hasattr(reply, "volumes"):  # StatusReply
            kept = [v for v in reply.volumes if visible(v.name)]
            del reply.volumes[:]
            reply.volumes.extend(kept)
        if hasattr(reply, "snapshots"):  # ListSnapshotsReply
            kept = [s for s in reply.snapshots if visible(s.volume)]
            del reply.snapshots[:]
            reply.snapshots.extend(kept)


_FACTORIES: dict[tuple[bool, bool], Callable[..., Handler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _rebuilt(handler: Handler, behaviour: Callable[..., Any]) -> Handler:
    """A handler of the same kind and (de)serializers as `handler` running `behaviour`."""
    factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ExportGuard:
    """The NBD side of the policy (`standbylib.nbd.handshake.ExportAccess`): a client opens, and
    NBD_OPT_LIST shows it, only the exports of the volumes its certificate is granted `EXPORT` on.
    Without a client certificate (NBD without TLS, or TLS without client certificates) nothing."""

    def __init__(self, policy: Policy, denials: Denials) -> None:
        self.policy = policy
        self.denials = denials

    def refusal(self, name: str, peer: Mapping[str, Any] | None) -> str | None:
        identities = identities_of_certificate(peer)
        volume = p.volume_of_export(name)
        if self.policy.allows(identities, p.EXPORT, volume):
            return None
        return str(self.denials.denied(identities, volume, p.EXPORT, export=name))

    def listed(self, name: str, peer: Mapping[str, Any] | None) -> bool:
        return self.policy.allows(identities_of_certificate(peer), p.EXPORT, p.volume_of_export(name))

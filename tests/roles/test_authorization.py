"""Authorization by certificate identity, in process: the policy file and its matching
(`standby.policy`), the method table and interceptor (`standby.authz`), and the NBD server's export
access hook (`standbylib.nbd.handshake.ExportAccess`). tests/e2e/test_policy.py runs the real daemons
with real certificates."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from standby_rig import start_rig

from standby import authz, services
from standby import policy as p
from standby.node import StandbyNode
from standby.policy import Policy, PolicyError
from standbylib.blockdev import ram_device
from standbylib.nbd import NbdClient, NbdServer
from standbylib.nbd.client_errors import NbdClientError
from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2, replication_pb2_grpc
from standbylib.runtime.rpc import Malformed, create_server

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config" / "policy.toml"

POLICY = """
[identity."CN=primary-a"]
primary = ["vol-a"]

[identity."DNS:Primary-B.example"]
primary = ["vol-b", "db-*"]

[identity."CN=watcher"]
status = ["vol-a"]

[identity."URI:spiffe://example.org/backup"]
snapshots = ["vol-?"]

[identity."email:oncall@example.org"]
failover = ["vol-[ab]"]
"""


@pytest.fixture
def policy() -> Policy:
    return Policy.parse(POLICY, "/etc/standby/policy.toml")


# ------------------------------------------------------------------------------------------ the file


def test_the_example_in_deploy_loads_and_means_what_its_comments_say() -> None:
    example = Policy.load(str(EXAMPLE))
    assert example.allows(["CN=db1.example"], p.MIRROR, "db1-data")
    assert not example.allows(["CN=db1.example"], p.MIRROR, "db2-data")
    assert not example.allows(["CN=db1.example"], p.EXPORT, "db1-data"), "a primary reads no NBD export"
    assert example.allows(["URI:spiffe://example.org/host/web1"], p.MIRROR, "web1")
    assert example.allows(["CN=backup.example"], p.EXPORT, "web1")
    assert not example.allows(["CN=backup.example"], p.FAILOVER, "web1")
    assert example.allows(["email:oncall@example.org"], p.STATUS, "web1")
    assert example.allows(["email:oncall@example.org"], p.FAILOVER, "db2-x")
    assert not example.allows(["email:oncall@example.org"], p.FAILOVER, "web1")


def test_identities_are_written_in_one_canonical_spelling(policy: Policy) -> None:
    assert policy.identities == [
        "CN=primary-a",
        "DNS:primary-b.example",  # DNS names are not case-sensitive
        "CN=watcher",
        "URI:spiffe://example.org/backup",
        "email:oncall@example.org",
    ]
    assert p.canonical_identity("cn=primary-a") == "CN=primary-a"
    assert p.canonical_identity("EMAIL:Ops@Example.org") == "email:Ops@Example.org"
    assert p.canonical_identity("uri:spiffe://x/Y") == "URI:spiffe://x/Y"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[identity."CN=a"\nprimary = ["v"]', "not valid TOML"),
        ('[identity."CN=a"]\nprimary = ["v"]\n[roles]\nx = 1', "unknown key 'roles'"),
        (
            '[identity."CN=a"]\nbackup = ["v"]',
            "role 'backup': unknown role (roles: primary, status, snapshots",
        ),
        ('[identity."O=example"]\nprimary = ["v"]', "identity 'O=example' is not CN=NAME, DNS:NAME"),
        ('[identity."CN="]\nprimary = ["v"]', "no name after 'CN='"),
        ('[identity."CN=a"]\nprimary = "v"', "must be a list of volume patterns"),
        ('[identity."CN=a"]\nprimary = ["v w"]', "'v w' is not a volume name or glob pattern"),
        ('[identity."CN=a"]\nprimary = [""]', "'' is not a volume name or glob pattern"),
        (
            '[identity."DNS:a.example"]\nprimary = ["v"]\n[identity."dns:A.example"]\nstatus = ["v"]',
            "given twice",
        ),
        ("identity = 3", '"identity" must be tables'),
        ('[identity]\n"CN=a" = ["v"]', "must be a table of roles"),
    ],
)
def test_a_policy_that_does_not_parse_is_one_line_naming_the_file(text: str, says: str) -> None:
    with pytest.raises(PolicyError) as e:
        Policy.parse(text, "/etc/standby/policy.toml")
    message = str(e.value)
    assert message.startswith("policy file /etc/standby/policy.toml: "), message
    assert says in message, message
    assert "\n" not in message, message


def test_an_unreadable_or_binary_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy file .*missing\.toml: cannot read it"):
        Policy.load(str(tmp_path / "missing.toml"))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[identity]")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.load(str(binary))


def test_an_empty_policy_grants_nothing() -> None:
    empty = Policy.parse("", "empty.toml")
    assert empty.identities == []
    assert not any(empty.allows(["CN=a"], action, "v") for action in p.ACTIONS)


# ------------------------------------------------------------------------------------------ matching


def test_roles_grant_their_actions_on_their_volumes_only(policy: Policy) -> None:
    def actions(identity: str, volume: str) -> set[str]:
        return {a for a in p.ACTIONS if policy.allows([identity], a, volume)}

    assert actions("CN=primary-a", "vol-a") == {p.MIRROR, p.VERIFY}
    assert actions("CN=primary-a", "vol-b") == set()
    assert actions("DNS:primary-b.example", "db-7") == {p.MIRROR, p.VERIFY}
    assert actions("CN=watcher", "vol-a") == {p.STATUS}
    assert actions("CN=watcher", "vol-b") == set()
    # the operators' roles nest: failover > snapshots > status
    assert actions("URI:spiffe://example.org/backup", "vol-c") == {p.STATUS, p.SNAPSHOT, p.VERIFY, p.EXPORT}
    assert actions("URI:spiffe://example.org/backup", "vol-cc") == set(), "? is one character"
    assert actions("email:oncall@example.org", "vol-b") == {
        p.STATUS, p.SNAPSHOT, p.VERIFY, p.EXPORT, p.FAILOVER,
    }  # fmt: skip
    assert actions("email:oncall@example.org", "vol-c") == set()
    assert actions("CN=stranger", "vol-a") == set()


def test_a_certificate_may_do_what_any_of_its_identities_may(policy: Policy) -> None:
    both = ["CN=watcher", "URI:spiffe://example.org/backup"]
    assert policy.allows(both, p.EXPORT, "vol-b")
    assert policy.allows(both, p.STATUS, "vol-a")
    assert policy.allows_any(["CN=stranger", "CN=watcher"], p.STATUS)
    assert not policy.allows_any(["CN=primary-a"], p.STATUS)
    assert not policy.allows([], p.STATUS, "vol-a"), "no certificate, no rights"


def test_patterns_match_whole_names_and_case() -> None:
    strict = Policy.parse('[identity."CN=a"]\nprimary = ["db-*", "Vol"]', "x.toml")
    assert strict.allows(["CN=a"], p.MIRROR, "db-")
    assert not strict.allows(["CN=a"], p.MIRROR, "xdb-1")
    assert not strict.allows(["CN=a"], p.MIRROR, "vol")
    assert not strict.allows(["CN=A"], p.MIRROR, "db-1"), "common names are matched as written"


def test_identities_of_grpc_and_of_ssl_agree_for_one_certificate() -> None:
    # What grpc's auth context and Python's ssl give for the certificate of CN=primary-a with the
    # subjectAltNames DNS:Primary-A.example, URI:spiffe://example.org/a, email:ops@example.org, IP:10.0.0.1
    auth = {
        "x509_common_name": [b"primary-a"],
        "peer_dns": [b"Primary-A.example"],
        "peer_uri": [b"spiffe://example.org/a"],
        "peer_email": [b"ops@example.org"],
        "peer_ip": [b"10.0.0.1"],
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
    }
    cert = {
        "subject": ((("organizationName", "Example"),), (("commonName", "primary-a"),)),
        "subjectAltName": (
            ("DNS", "Primary-A.example"),
            ("URI", "spiffe://example.org/a"),
            ("email", "ops@example.org"),
            ("IP Address", "10.0.0.1"),
        ),
    }
    want = ("CN=primary-a", "DNS:primary-a.example", "URI:spiffe://example.org/a", "email:ops@example.org")
    assert p.identities_of_auth_context(auth) == want
    assert p.identities_of_certificate(cert) == want
    assert p.identities_of_certificate(None) == () == p.identities_of_certificate({})
    assert p.identities_of_auth_context({}) == ()
    assert p.describe([]) == "a client without a certificate"


# ------------------------------------------------------------------------------------------ gRPC


def test_every_method_of_the_services_is_in_the_table() -> None:
    """A method added to the .proto is refused to everyone (fail closed) until it is given an action
    here; this test makes that a decision rather than a surprise."""
    methods = {
        f"/{service.full_name}/{m.name}"
        for module in (control_pb2, replication_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert methods <= set(authz.METHODS), sorted(methods - set(authz.METHODS))
    # an operator demotes; the old primary pulls what changed (a primary's act on its own volume)
    assert authz.METHODS["/standbyappliance.v1.Control/Demote"] == p.FAILOVER
    assert authz.METHODS["/standbyappliance.v1.Replication/FailbackPull"] == p.MIRROR
    assert set(authz.METHODS.values()) <= set(p.ACTIONS)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    """What the interceptor uses of a `grpc.ServicerContext`: the identities of a client certificate."""

    def __init__(self, *identities: str) -> None:
        auth: dict[str, list[bytes]] = {}
        for identity in identities:
            kind, _, name = identity.partition("=") if identity.startswith("CN=") else identity.partition(":")
            prop = {"CN": "x509_common_name", "DNS": "peer_dns", "URI": "peer_uri", "email": "peer_email"}[
                kind
            ]
            auth.setdefault(prop, []).append(name.encode())
        self.auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def handler(method: str, behaviour: Any) -> Any:
    streaming = method.endswith("/Mirror")
    factory = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    return factory(behaviour)


class Calls:
    """Servicer behaviours that record what reached them."""

    def __init__(self) -> None:
        self.reached: list[Any] = []

    def unary(self, request: Any, context: Any) -> Any:
        self.reached.append(request)
        return "done"

    def stream(self, requests: Iterator[Any], context: Any) -> Any:
        got = list(requests)
        self.reached.append(got)
        return iter(["done"])


def call(
    authorizer: authz.Authorizer, method: str, request: Any, *identities: str, calls: Calls | None = None
) -> tuple[Calls, Any]:
    calls = calls or Calls()
    guarded = authorizer.guard(
        method, handler(method, calls.stream if method.endswith("/Mirror") else calls.unary)
    )
    assert guarded is not None
    if guarded.request_streaming:
        result = list(guarded.stream_stream(iter(request), Context(*identities)))
    else:
        result = guarded.unary_unary(request, Context(*identities))
    return calls, result


R = "/standbyappliance.v1.Replication/"
C = "/standbyappliance.v1.Control/"
BACKUP = "URI:spiffe://example.org/backup"


def mirror_open(volume: str) -> list[replication_pb2.MirrorRequest]:
    opened = replication_pb2.MirrorRequest(open=replication_pb2.MirrorOpen(volume=volume, primary_id="p"))
    batch = replication_pb2.MirrorRequest(batch=replication_pb2.Batch(sequence=1))
    return [opened, batch]


CASES = [
    # (identity, method, request, allowed)
    ("CN=primary-a", R + "Handshake", replication_pb2.HandshakeRequest(volume="vol-a"), True),
    ("CN=primary-a", R + "Handshake", replication_pb2.HandshakeRequest(volume="vol-b"), False),
    ("CN=primary-a", R + "Handshake", replication_pb2.HandshakeRequest(volume="no-such-volume"), False),
    ("CN=primary-a", R + "Mirror", mirror_open("vol-a"), True),
    ("CN=primary-a", R + "Mirror", mirror_open("vol-b"), False),
    ("CN=primary-a", R + "Mirror", mirror_open("vol-a")[1:], False),  # no `open` first: names no volume
    ("CN=primary-a", C + "Verify", control_pb2.VerifyRequest(volume="vol-a"), True),
    ("CN=primary-a", C + "Verify", control_pb2.VerifyRequest(volume="vol-b"), False),
    ("CN=primary-a", C + "CreateSnapshot", control_pb2.CreateSnapshotRequest(volume="vol-a"), False),
    ("CN=watcher", C + "ListSnapshots", control_pb2.ListSnapshotsRequest(volume="vol-a"), True),
    ("CN=watcher", C + "ListSnapshots", control_pb2.ListSnapshotsRequest(volume="vol-b"), False),
    ("CN=watcher", C + "CreateSnapshot", control_pb2.CreateSnapshotRequest(volume="vol-a"), False),
    ("CN=watcher", R + "Handshake", replication_pb2.HandshakeRequest(volume="vol-a"), False),
    (BACKUP, C + "CreateSnapshot", control_pb2.CreateSnapshotRequest(volume="vol-b"), True),
    (BACKUP, C + "DeleteSnapshot", control_pb2.DeleteSnapshotRequest(volume="vol-b"), True),
    (BACKUP, C + "RenewSnapshotLease", control_pb2.RenewSnapshotLeaseRequest(volume="vol-b"), True),
    (BACKUP, C + "SnapshotChanges", control_pb2.SnapshotChangesRequest(volume="vol-b"), True),
    (BACKUP, C + "Promote", control_pb2.PromoteRequest(volume="vol-b"), False),
    (BACKUP, R + "Mirror", mirror_open("vol-b"), False),
    ("email:oncall@example.org", C + "Promote", control_pb2.PromoteRequest(volume="vol-b"), True),
    ("email:oncall@example.org", C + "Promote", control_pb2.PromoteRequest(volume="vol-c"), False),
]  # fmt: skip


@pytest.mark.parametrize(("identity", "method", "request_", "allowed"), CASES)
def test_each_method_needs_its_action_on_the_volume_it_names(
    policy: Policy, identity: str, method: str, request_: Any, allowed: bool
) -> None:
    denials = authz.Denials()
    authorizer = authz.Authorizer(policy, denials)
    action = authz.METHODS[method]
    if allowed:
        calls, _ = call(authorizer, method, request_, identity)
        assert calls.reached, "an allowed request must reach the servicer"
        if method.endswith("/Mirror"):
            assert calls.reached[0] == request_, "the stream reaches the servicer whole, open first"
        assert denials.counter.labels(action)._value.get() == 0
        return
    calls = Calls()
    with pytest.raises(Aborted) as e:
        call(authorizer, method, request_, identity, calls=calls)
    volume = request_[0].open.volume if method.endswith("/Mirror") else request_.volume
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert identity in e.value.details and repr(volume) in e.value.details and action in e.value.details
    assert not calls.reached
    assert denials.counter.labels(action)._value.get() == 1


def test_a_denied_request_does_not_reach_the_servicer(policy: Policy) -> None:
    authorizer = authz.Authorizer(policy, authz.Denials())
    calls = Calls()
    guarded = authorizer.guard(R + "Mirror", handler(R + "Mirror", calls.stream))
    assert guarded is not None
    with pytest.raises(Aborted):
        guarded.stream_stream(iter(mirror_open("vol-b")), Context("CN=primary-a"))
    guarded = authorizer.guard(R + "Handshake", handler(R + "Handshake", calls.unary))
    assert guarded is not None
    with pytest.raises(Aborted):
        guarded.unary_unary(replication_pb2.HandshakeRequest(volume="vol-b"), Context("CN=primary-a"))
    assert calls.reached == []


def test_a_method_not_in_the_table_is_refused_to_everyone_and_health_stays_open(policy: Policy) -> None:
    denials = authz.Denials()
    authorizer = authz.Authorizer(policy, denials)
    with pytest.raises(Aborted) as e:
        call(authorizer, "/standbyappliance.v1.Control/Reformat", control_pb2.PromoteRequest(volume="vol-b"),
             "email:oncall@example.org")  # fmt: skip
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "may not call /standbyappliance.v1.Control/Reformat" in e.value.details
    assert denials.counter.labels(authz.UNLISTED)._value.get() == 1
    health = grpc.unary_unary_rpc_method_handler(lambda r, c: "serving")
    assert authorizer.guard("/grpc.health.v1.Health/Check", health) is health


def test_a_request_that_did_not_parse_goes_to_the_servicer_which_refuses_it(policy: Policy) -> None:
    authorizer = authz.Authorizer(policy, authz.Denials())
    calls, _ = call(
        authorizer, C + "CreateSnapshot", Malformed("CreateSnapshotRequest", "bad"), "CN=primary-a"
    )
    assert isinstance(calls.reached[0], Malformed)


def test_status_and_snapshot_lists_show_only_the_volumes_the_client_may_see(policy: Policy) -> None:
    authorizer = authz.Authorizer(policy, authz.Denials())

    def status(request: Any, context: Any) -> control_pb2.StatusReply:
        return control_pb2.StatusReply(
            volumes=[control_pb2.VolumeStatus(name=n) for n in ("vol-a", "vol-b", "vol-c", "other")]
        )

    def snapshots(request: Any, context: Any) -> control_pb2.ListSnapshotsReply:
        return control_pb2.ListSnapshotsReply(
            snapshots=[control_pb2.SnapshotInfo(volume=n, name="s") for n in ("vol-a", "vol-b", "other")]
        )

    def names(identity: str) -> tuple[list[str], list[str]]:
        seen = authorizer.guard(C + "Status", grpc.unary_unary_rpc_method_handler(status))
        listed = authorizer.guard(C + "ListSnapshots", grpc.unary_unary_rpc_method_handler(snapshots))
        assert seen is not None and listed is not None
        a = seen.unary_unary(control_pb2.StatusRequest(), Context(identity))
        b = listed.unary_unary(control_pb2.ListSnapshotsRequest(), Context(identity))
        return [v.name for v in a.volumes], [s.volume for s in b.snapshots]

    assert names("CN=watcher") == (["vol-a"], ["vol-a"])
    assert names("URI:spiffe://example.org/backup") == (["vol-a", "vol-b", "vol-c"], ["vol-a", "vol-b"])
    with pytest.raises(Aborted) as e:
        names("CN=primary-a")  # no status anywhere
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "CN=primary-a may not see the status of any volume" in e.value.details


def test_the_authorized_server_keeps_health_open_and_refuses_a_client_without_identity(
    tmp_path: Path,
) -> None:
    """The wiring of standby-daemon: the services of a server made with the authorizer as interceptor
    (their handlers registered by method name, as the generated code does) pass it, the health service
    does not. Without TLS a client has no identity."""
    node = StandbyNode(str(tmp_path / "data"), capacity="64MiB")
    policy = Policy.parse('[identity."CN=a"]\nfailover = ["*"]', "p.toml")
    authorizer = authz.Authorizer(policy, authz.Denials())
    server, bound, _ = create_server(
        ("127.0.0.1", 0),
        lambda s: services.register(s, node, "127.0.0.1:1"),
        interceptors=(authorizer,),
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{bound[1]}")
    try:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as e:
            control_pb2_grpc.ControlStub(channel).Status(control_pb2.StatusRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a client without a certificate may not see the status" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            replication_pb2_grpc.ReplicationStub(channel).Handshake(
                replication_pb2.HandshakeRequest(volume="vol0", size=1 << 20, block_size=4096), timeout=10
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert node.replicas() == [], "a refused handshake created a replica"
    finally:
        channel.close()
        server.stop(grace=None).wait()
        node.close()


def test_the_unguarded_rig_still_serves_everyone(tmp_path: Path) -> None:
    """Without a policy nothing changes (the rig registers the services as before)."""
    rig = start_rig(str(tmp_path / "standby"))
    try:
        channel = grpc.insecure_channel(rig.target)
        reply = control_pb2_grpc.ControlStub(channel).Status(control_pb2.StatusRequest(), timeout=10)
        assert reply.standby_id == rig.node.id
        channel.close()
    finally:
        rig.stop()
        rig.node.close()


# ------------------------------------------------------------------------------------------ NBD


class Access:
    """An `ExportAccess` granting the exports of one volume."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.asked: list[tuple[str, Any]] = []

    def refusal(self, name: str, peer: Any) -> str | None:
        self.asked.append((name, peer))
        return None if p.volume_of_export(name) == self.volume else f"not {name!r} for you"

    def listed(self, name: str, peer: Any) -> bool:
        return p.volume_of_export(name) == self.volume


def test_the_nbd_server_asks_its_owner_which_exports_a_client_may_open() -> None:
    device = ram_device(1 << 20)
    access = Access("vol-a")
    exports = {"vol-a@s1": device, "vol-b@s1": device}
    with NbdServer(exports, access=access) as server:
        assert server.address is not None
        host, port = server.address
        client = NbdClient.connect(host, port, "vol-a@s1", timeout=10)
        assert client.size == 1 << 20
        client.close()
        assert NbdClient.list_exports(host, port, timeout=10) == ["vol-a@s1"]
        for name in ("vol-b@s1", "vol-b@missing"):  # refused the same, whether it exists or not
            with pytest.raises(NbdClientError) as e:
                NbdClient.connect(host, port, name, timeout=10)
            assert "refused by the server's policy" in str(e.value) and f"not {name!r} for you" in str(
                e.value
            )
    assert ("vol-a@s1", None) in access.asked, "without TLS the peer has no certificate"


def test_the_export_guard_reads_identities_from_the_client_certificate(policy: Policy) -> None:
    denials = authz.Denials()
    guard = authz.ExportGuard(policy, denials)
    backup = {
        "subject": ((("commonName", "backup-1"),),),
        "subjectAltName": (("URI", "spiffe://example.org/backup"),),
    }
    primary = {"subject": ((("commonName", "primary-a"),),)}
    assert guard.refusal("vol-a@nightly", backup) is None
    assert guard.refusal("vol-b", backup) is None, "a promoted volume's export"
    assert guard.listed("vol-c@x", backup) and not guard.listed("other@x", backup)
    refused = guard.refusal("vol-a@nightly", primary)
    assert refused is not None and "CN=primary-a may not open the NBD exports of volume 'vol-a'" in refused
    assert guard.refusal("vol-a@nightly", None) is not None, "no certificate, no export"
    assert denials.counter.labels(p.EXPORT)._value.get() == 2

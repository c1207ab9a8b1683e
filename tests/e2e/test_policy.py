"""Authorization by certificate identity (docs/SECURITY.md): one standby with a `--policy`, several
primaries, each with its own certificate, mirroring its own volume, and operators whose certificates
carry the roles status, snapshots and failover. Every daemon and client is the real program or a real
gRPC/NBD client; certificates are made with openssl (`tls_support`).

One standby and its primaries serve the whole module (module-scoped fixture): the tests only read, or
are refused, except the promotion of vol-c, which no other test uses. The policy's matching and the
method table are tested in process in tests/roles/test_authorization.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_support import (
    CTL_CMD,
    STANDBY_CMD,
    Daemons,
    Primary,
    Standby,
    _console,
    assert_image,
    assert_one_clear_line,
    need,
    rand,
    run,
    running_daemons,
)
from tls_support import Pair, _ca, _leaf, _nbd_dir

from standbylib.rpc.v1 import control_pb2, control_pb2_grpc, replication_pb2, replication_pb2_grpc

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
SIZE = 8 * MiB

POLICY = """
[identity."CN=primary-a"]
primary = ["vol-a"]

[identity."DNS:primary-b.example"]
primary = ["vol-b"]

[identity."CN=watcher"]
status = ["vol-a"]

[identity."URI:spiffe://example.org/backup"]
snapshots = ["vol-a"]

[identity."email:oncall@example.org"]
status = ["*"]
failover = ["vol-c"]
"""

#: name -> (common name, extensions) of the client certificates; `stranger` is signed by the CA too,
#: but the policy does not name it.
CLIENTS = {
    "primary-a": ("primary-a", ""),
    "primary-b": ("primary-b", "subjectAltName=DNS:primary-b.example"),
    "watcher": ("watcher", ""),
    "backup": ("backup-1", "subjectAltName=URI:spiffe://example.org/backup"),
    "oncall": ("oncall", "subjectAltName=email:oncall@example.org"),
    "stranger": ("stranger", ""),
}

#: How the standby names the clients in its refusals: every identity of the certificate.
IDENTITIES = {
    "primary-a": "CN=primary-a",
    "watcher": "CN=watcher",
    "backup": "CN=backup-1, URI:spiffe://example.org/backup",
}


@dataclass
class Certs:
    ca: Path
    server: Pair
    clients: dict[str, Pair]
    nbd_dirs: dict[str, Path]  # libnbd's layout, per client

    def client(self, name: str) -> list[str]:
        pair = self.clients[name]
        return ["--tls-ca", str(self.ca), "--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]

    def server_files(self) -> list[str]:
        server = self.server
        return ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(self.ca)]


def make_certs(d: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: install the Debian package openssl", pytrace=False)
    d.mkdir(parents=True, exist_ok=True)
    ca = _ca(d, "ca")
    server = _leaf(
        d, "server", ca, "standby.example",
        "subjectAltName=DNS:standby.example,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    )  # fmt: skip
    clients, dirs = {}, {}
    for name, (cn, ext) in CLIENTS.items():
        clients[name] = _leaf(d, name, ca, cn, f"{ext}\nextendedKeyUsage=clientAuth".lstrip())
        dirs[name] = _nbd_dir(d / f"nbd-{name}", ca[0], clients[name])
    return Certs(ca[0], server, clients, dirs)


@dataclass
class Site:
    certs: Certs
    policy: Path
    standby: Standby
    primaries: dict[str, Primary]
    images: dict[str, bytes]  # what each volume (vol-a, vol-b, vol-c) holds
    daemons: Daemons

    def channel(self, client: str) -> grpc.Channel:
        """A gRPC channel to the standby with the certificate of `client`."""
        pair = self.certs.clients[client]
        credentials = grpc.ssl_channel_credentials(
            self.certs.ca.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes()
        )
        return grpc.secure_channel(self.standby.grpc, credentials)

    def ctl(self, client: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [*_console(*CTL_CMD), "--standby", self.standby.grpc, "--timeout", "10"]
        return run(*argv, *self.certs.client(client), *args, check=check, timeout=60)

    def nbds(self, export: str, client: str) -> str:
        return f"nbds://{self.standby.nbd}/{export}?tls-certificates={self.certs.nbd_dirs[client]}"

    def denied(self, action: str) -> float:
        return self.standby.metrics().get("standby_requests_denied_total", action=action)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("policy")
    certs = make_certs(tmp / "pki")
    policy = tmp / "policy.toml"
    policy.write_text(POLICY)
    images = {name: rand(SIZE, seed=i) for i, name in enumerate(("vol-a", "vol-b", "vol-c"), 1)}
    for name, data in images.items():
        (tmp / f"{name}.img").write_bytes(data)
    with running_daemons(tmp) as daemons:
        standby = daemons.standby(
            None, *certs.server_files(), "--require-client-cert", "--nbd-tls", "require",
            "--policy", str(policy), "--adopt", f"vol-c={tmp / 'vol-c.img'}",
        )  # fmt: skip
        primaries = {
            name: daemons.primary(standby, {vol: str(tmp / f"{vol}.img")}, *certs.client(name))
            for name, vol in (("primary-a", "vol-a"), ("primary-b", "vol-b"))
        }
        yield Site(certs, policy, standby, primaries, images, daemons)


@pytest.fixture
def daemons(site: Site) -> Daemons:
    """The module's daemons (so that a failed test shows their logs, tests/e2e/conftest.py)."""
    return site.daemons


def refusal(call: Callable[..., Any], *args: object) -> grpc.RpcError:
    """The error of a gRPC call that must be refused with PERMISSION_DENIED (a streamed answer is read
    to its end)."""
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, timeout=10)
        if isinstance(result, Iterator):
            list(result)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value
    return e.value


def test_each_primary_mirrors_its_own_volume(site: Site, daemons: Daemons) -> None:
    for primary, volume in (("primary-a", "vol-a"), ("primary-b", "vol-b")):
        assert_image(site.standby.replica(volume), site.images[volume], f"the replica of {volume}")
        # the batches travel on the data channel that the authorized Mirror call opened
        site.primaries[primary].daemon.wait_for("mirror_connected", volume=volume, transport="channel")
    status = json.loads(site.ctl("oncall", "status", "--json").stdout)
    volumes = {v["name"]: v for v in status["volumes"]}
    assert sorted(volumes) == ["vol-a", "vol-b", "vol-c"], status
    assert volumes["vol-a"]["connected"] and volumes["vol-b"]["connected"], status
    listening = site.standby.daemon.wait_for("listening", service="grpc")
    assert listening.get("tls") == "mutual" and listening.get("policy") == str(site.policy), listening


def test_a_primary_is_refused_on_another_primarys_volume(
    site: Site, daemons: Daemons, tmp_path: Path
) -> None:
    before = site.denied("mirror")
    with site.channel("primary-a") as channel:
        replication = replication_pb2_grpc.ReplicationStub(channel)
        control = control_pb2_grpc.ControlStub(channel)
        handshake = replication_pb2.HandshakeRequest(
            volume="vol-b", size=SIZE, block_size=4096, primary_id="x"
        )
        denied = refusal(replication.Handshake, handshake)
        assert "CN=primary-a may not mirror volume 'vol-b'" in (denied.details() or ""), denied
        opening = replication_pb2.MirrorRequest(
            open=replication_pb2.MirrorOpen(volume="vol-b", data_channel=True)
        )
        denied = refusal(replication.Mirror, iter([opening]))
        assert "CN=primary-a may not mirror volume 'vol-b'" in (denied.details() or ""), denied
        # A volume that does not exist is refused the same way: the refusal reveals nothing.
        handshake.volume = "vol-new"
        denied = refusal(replication.Handshake, handshake)
        assert "CN=primary-a may not mirror volume 'vol-new'" in (denied.details() or ""), denied
        denied = refusal(control.CreateSnapshot, control_pb2.CreateSnapshotRequest(volume="vol-b", name="x"))
        assert "CN=primary-a may not manage the snapshots of volume 'vol-b'" in (denied.details() or "")
        denied = refusal(control.Verify, control_pb2.VerifyRequest(volume="vol-b"))
        assert "CN=primary-a may not verify volume 'vol-b'" in (denied.details() or "")
        refusal(control.Status, control_pb2.StatusRequest())
        # Its own volume it may verify.
        done = list(control.Verify(control_pb2.VerifyRequest(volume="vol-a"), timeout=60))[-1]
        assert done.done and done.mismatched_blocks == 0 and done.total_bytes == SIZE, done

    assert site.denied("mirror") == before + 3
    events = site.standby.daemon.logged("request_denied", identity="CN=primary-a", volume="vol-b")
    assert {e.get("action") for e in events} >= {"mirror", "snapshot", "verify"}, events

    # The real primary program with primary-a's certificate, set up for vol-b by mistake: refused, it
    # says why and keeps its own volume.
    wrong = tmp_path / "wrong-vol-b.img"
    wrong.write_bytes(rand(SIZE, seed=99))
    primary_a = [*site.certs.client("primary-a"), "--connect-timeout", "1"]  # ready without waiting 10 s
    rogue = daemons.primary(site.standby, {"vol-b": str(wrong)}, *primary_a, in_sync=False)
    refused = rogue.daemon.wait_for("mirror_disconnected", volume="vol-b")
    assert "permission denied: CN=primary-a may not mirror volume 'vol-b'" in str(refused.get("error")), (
        refused
    )
    assert rogue.metrics().get("standby_replication_connected", volume="vol-b") == 0
    assert rogue.daemon.stop() == 0

    # Nothing changed: vol-b's replica and its primary's stream, no replica for vol-new.
    assert_image(site.standby.replica("vol-b"), site.images["vol-b"], "vol-b's replica after the refusals")
    assert site.primaries["primary-b"].metrics().get("standby_replication_connected", volume="vol-b") == 1
    assert not site.standby.replica("vol-new").exists()


def test_operator_roles(site: Site, daemons: Daemons) -> None:
    # status: sees vol-a only, and may change nothing
    status = json.loads(site.ctl("watcher", "status", "--json").stdout)
    assert [v["name"] for v in status["volumes"]] == ["vol-a"], status
    err = assert_one_clear_line(
        site.ctl("watcher", "snapshot", "create", "vol-a", "w1", check=False), 1, "a snapshot by status only",
        "CN=watcher", "'vol-a'", "may not manage the snapshots",
    )  # fmt: skip
    assert err.startswith("standbyctl: permission denied: "), err

    # snapshots: create, list, delete on vol-a; nothing on vol-b, no promotion
    with site.channel("backup") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        control.CreateSnapshot(control_pb2.CreateSnapshotRequest(volume="vol-a", name="b1"), timeout=10)
        listed = control.ListSnapshots(control_pb2.ListSnapshotsRequest(), timeout=10).snapshots
        assert [(s.volume, s.name) for s in listed if s.name == "b1"] == [("vol-a", "b1")]
        assert {s.volume for s in listed} <= {"vol-a"}
        control.DeleteSnapshot(control_pb2.DeleteSnapshotRequest(volume="vol-a", name="b1"), timeout=10)
        refusal(control.CreateSnapshot, control_pb2.CreateSnapshotRequest(volume="vol-b", name="b1"))
        refusal(control.ListSnapshots, control_pb2.ListSnapshotsRequest(volume="vol-b"))
        denied = refusal(control.Promote, control_pb2.PromoteRequest(volume="vol-a"))
        assert "may not fail over or fail back volume 'vol-a'" in (denied.details() or ""), denied

    # failover: promotes vol-c (no primary mirrors it), not vol-b
    promoted = site.ctl("oncall", "promote", "vol-c", "--force").stdout
    assert "vol-c: promoted" in promoted, promoted
    need("nbdinfo")  # its read-write export is the failover role's too
    assert run("nbdinfo", "--size", site.nbds("vol-c", "oncall")).stdout.strip() == str(SIZE)
    with site.channel("oncall") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        denied = refusal(control.Promote, control_pb2.PromoteRequest(volume="vol-b", force=True))
        assert "email:oncall@example.org" in (denied.details() or "") and "'vol-b'" in (
            denied.details() or ""
        )
    assert site.primaries["primary-b"].metrics().get("standby_replication_connected", volume="vol-b") == 1

    # a certificate of the CA that the policy does not name: nothing at all
    with site.channel("stranger") as channel:
        denied = refusal(control_pb2_grpc.ControlStub(channel).Status, control_pb2.StatusRequest())
        assert "CN=stranger may not see the status of any volume" in (denied.details() or ""), denied


def test_nbd_exports_follow_the_policy(site: Site, daemons: Daemons) -> None:
    need("nbdinfo")
    with site.channel("backup") as channel:
        control_pb2_grpc.ControlStub(channel).CreateSnapshot(
            control_pb2.CreateSnapshotRequest(volume="vol-a", name="nightly"), timeout=10
        )
    before = site.denied("export")
    size = run("nbdinfo", "--size", site.nbds("vol-a@nightly", "backup")).stdout.strip()
    assert size == str(SIZE)
    listed = run("nbdinfo", "--list", "--json", site.nbds("", "backup")).stdout
    assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["vol-a@nightly"], listed

    for export, client in [
        ("vol-a@nightly", "primary-a"),  # a primary reads no export unless granted
        ("vol-a@nightly", "watcher"),  # status does not read
        ("vol-c", "backup"),  # another volume's export (VOLUME: once promoted)
        ("vol-b@nightly", "backup"),  # one that does not exist: refused the same way
    ]:
        cp = run("nbdinfo", "--size", site.nbds(export, client), check=False)
        assert cp.returncode != 0, f"{client} read {export}"
        assert "server policy prevents NBD_OPT_GO" in cp.stderr, cp.stderr  # NBD_REP_ERR_POLICY
        # The standby says who was refused what (libnbd does not show the server's text).
        who = IDENTITIES[client]
        event = site.standby.daemon.wait_for(
            "request_denied", 10, action="export", export=export, identity=who
        )
        assert event.get("volume") == export.partition("@")[0], event
    assert site.denied("export") == before + 4


def test_start_up_refuses_a_policy_it_cannot_apply(site: Site, daemons: Daemons, tmp_path: Path) -> None:
    standby = [*_console(*STANDBY_CMD), "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0"]
    policy = str(site.policy)
    broken, unknown = tmp_path / "broken.toml", tmp_path / "unknown.toml"
    broken.write_text('[identity."CN=a"\nprimary = ["v"]\n')
    unknown.write_text('[identity."CN=a"]\nadmin = ["*"]\n')
    mutual = [*site.certs.server_files(), "--require-client-cert"]
    cases = {
        "without TLS": ([], policy, [f"--policy {policy}", "needs mutual TLS", "no TLS"]),
        "without client certificates": (site.certs.server_files(), policy, ["--require-client-cert"]),
        "that does not parse": (mutual, str(broken), [f"policy file {broken}", "not valid TOML"]),
        "with an unknown role": (mutual, str(unknown), [f"policy file {unknown}", "'admin': unknown role"]),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # each start costs a second of imports: side by side
        done = {
            what: pool.submit(run, *standby, *extra, "--policy", path, check=False)
            for what, (extra, path, _) in cases.items()
        }
        shown = pool.submit(run, *standby, "--policy", policy, "--show-config")
    for what, (_, _, says) in cases.items():
        assert_one_clear_line(done[what].result(), 2, f"a policy {what}", *says)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir()), "a refused start left data"
    assert f'policy = "{policy}"' in shown.result().stdout, shown.result().stdout

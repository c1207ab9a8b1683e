"""`standbyctl`: the administrator's client of the standby daemon's control API.

standbyctl [--standby H:P] status [--json]
standbyctl [--standby H:P] snapshot create VOLUME [NAME] [--writable] [--capacity SIZE]   (prints NAME)
standbyctl [--standby H:P] snapshot list [VOLUME] [--json]
standbyctl [--standby H:P] snapshot delete VOLUME NAME
standbyctl [--standby H:P] verify VOLUME [--repair] [--json]
standbyctl [--standby H:P] promote VOLUME [--at SNAPSHOT] [--force]
standbyctl [--standby H:P] demote VOLUME
standbyctl [--standby H:P] takeover VOLUME
standbyctl [--standby H:P] remove VOLUME --yes [--force]

With --tls-ca the connection uses TLS (mutual TLS with --tls-cert and --tls-key); docs/SECURITY.md.
Every setting may also come from a TOML file (--config) or a STANDBY_* environment variable
(`CtlSettings`); flags win over the variables, which win over the file.

`promote` is the failover: the replica becomes the primary copy, exported read-write over the
standby's NBD address as VOLUME; with `--at SNAPSHOT`, as the volume was at that snapshot (the state it
replaces is kept as a snapshot, named in the output). `demote` is the failback: the export ends and the
old primary, when it reattaches, receives what changed meanwhile, then mirrors again
(docs/OPERATIONS.md).

`verify` compares the replica with the primary's volume block by block while writes go on (the primary
must be connected): progress on stderr when it is a terminal, then one line on stdout,
``VOLUME: N of M blocks out of sync (first offsets: ...)``, with ``--repair`` followed by ``, repaired N``
(the blocks the primary resent and the standby applied). Exit 0 when in sync (or every block found was
repaired), 1 when blocks are out of sync without --repair or the verify failed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from standbylib.rpc.v1 import control_pb2, control_pb2_grpc
from standbylib.runtime import config as cfg
from standbylib.runtime import rpc
from standbylib.runtime.config import ConfigError, parse_address
from standbylib.runtime.main import EXIT_FAILED, EXIT_OK, add_version, run
from standbylib.runtime.rpc import RemoteError
from standbylib.runtime.tls import ClientTlsSettings
from standbylib.units import human_size, parse_size


@dataclass
class CtlSettings(ClientTlsSettings):
    """standbyctl's settings: flags, then `STANDBY_*` environment variables, then a `--config` TOML file
    (the keys are the flags' names: ``standby = "B:7700"``, ``tls_ca = "..."``)."""

    standby: str = cfg.setting(
        "127.0.0.1:7700", "gRPC address of the standby daemon", metavar="H:P", env="STANDBY_ADDRESS"
    )
    timeout: float = cfg.setting(
        30.0,
        "seconds per call (a verify's stream and a rollback have none: they take what the volume needs)",
        parse=float,
        metavar="SECONDS",
        env="STANDBY_TIMEOUT",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="standbyctl",
        description="Control a standby daemon: its status, the snapshots of its replicas, and the online "
        "verify of a replica against its primary.",
        epilog="Exit codes: 0 ok, 1 the operation failed (the reason is printed) or `verify` found blocks "
        "out of sync without --repair, 2 usage error. "
        "Snapshots are exported over NBD as VOLUME@SNAPSHOT on the address `status` shows.",
    )
    cfg.add_options(
        p,
        CtlSettings,
        title="settings (flags win over $STANDBY_* variables, which win over the --config TOML file; "
        "TLS: docs/SECURITY.md)",
        environment=True,
    )
    p.add_argument("--debug", action="store_true", help="print tracebacks with errors")
    add_version(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    status = sub.add_parser("status", help="volumes, replication state, snapshots and preservation fill")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    snap = sub.add_parser("snapshot", help="create, list or delete snapshots")
    snap_sub = snap.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = snap_sub.add_parser("create", help="freeze the current image of a volume; prints the name")
    create.add_argument("volume", metavar="VOLUME")
    create.add_argument("name", metavar="NAME", nargs="?", help="default: snap-N, chosen by the standby")
    create.add_argument("--writable", action="store_true", help="the snapshot's export accepts writes")
    create.add_argument(
        "--capacity",
        metavar="SIZE",
        help="limit its preserved data (e.g. 10GiB); default: the store's capacity",
    )
    listing = snap_sub.add_parser("list", help="snapshots of one or every volume")
    listing.add_argument("volume", metavar="VOLUME", nargs="?")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    delete = snap_sub.add_parser("delete", help="release a snapshot and free its preserved blocks")
    delete.add_argument("volume", metavar="VOLUME")
    delete.add_argument("name", metavar="NAME")

    promote = sub.add_parser(
        "promote",
        help="failover: make the replica the primary copy, exported read-write as VOLUME over NBD",
        description="Failover: make the replica of VOLUME the primary copy. The standby then exports it "
        "read-write over its NBD address as VOLUME (snapshots and backups go on) and refuses the old "
        "primary's mirrored writes: that primary fences itself (its --fencing policy) until "
        "`standbyctl demote` hands the volume back (docs/OPERATIONS.md). With --at, the volume is first "
        "rolled back to a snapshot (damage caught after it was mirrored): the state it replaces is kept as "
        "a new snapshot, named in the output; the rollback rewrites only the blocks written since the "
        "snapshot and is resumed after a crash. Refused while a primary is connected or a resync is under "
        "way.",
    )
    promote.add_argument("volume", metavar="VOLUME")
    promote.add_argument(
        "--at",
        metavar="SNAPSHOT",
        default="",
        help="serve the volume as it was at this read-only snapshot (its other snapshots stay as they are)",
    )
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even while a primary's stream is open (that primary is fenced) or a resync is under "
        "way (the image may be inconsistent)",
    )
    demote = sub.add_parser(
        "demote",
        help="failback: end the promotion; the old primary receives what changed, then mirrors again",
        description="Failback: end the promotion of VOLUME. Its read-write export ends at once (clients "
        "still connected get errors: stop them first). The standby keeps the blocks written while it was "
        "promoted (and those a rollback changed) tracked; when the old primary reattaches it receives "
        "exactly those, plus the regions it wrote itself without mirroring them, and then mirrors to this "
        "standby again. `status` shows the volume `failback` until then.",
    )
    demote.add_argument("volume", metavar="VOLUME")
    takeover = sub.add_parser(
        "takeover",
        help="release a volume from its primary so that another primary may claim it",
        description="A volume belongs to the primary that mirrors it; another primary (a new host, a "
        "reinstalled agent without its state) whose data is not the replica's history is refused, even "
        "with --discard-standby-data, until an operator releases the volume here. The next primary to "
        "connect then claims it, and with --discard-standby-data its data replaces the replica (a full, "
        "checksummed sync). Refused while a primary is connected.",
    )
    takeover.add_argument("volume", metavar="VOLUME")
    remove = sub.add_parser(
        "remove",
        help="end the protection of a volume here: delete its replica and its snapshots",
        description="End the protection of VOLUME on this standby, as lvremove ends a logical volume: its "
        "snapshots are deleted (their preserved blocks freed), the preservation store forgets it, its "
        "replica file and failback bitmap are deleted. Stop its primary first (or drop the volume from the "
        "primary's --volume list): a primary that connects for it later gets a new replica, by a full "
        "copy. Refused while a primary is connected, and, unless --force, while the volume is promoted or "
        "waits for its old primary to take back what changed. Without --yes it only says what it would "
        "delete. A removal cut short by a crash is finished when the daemon starts again.",
    )
    remove.add_argument("volume", metavar="VOLUME")
    remove.add_argument("--yes", action="store_true", help="really remove it (without: say what would go)")
    remove.add_argument(
        "--force",
        action="store_true",
        help="remove it even while it is promoted (the only copy of its latest writes) or waits for a "
        "failback",
    )
    verify = sub.add_parser(
        "verify",
        help="compare the replica with the primary's volume, block by block, while writes go on",
        description="Compare checksums of every block of the replica with the primary's volume, while "
        "writes go on (no false positives: the checksums travel in the ordered replication stream). "
        "Prints the blocks out of sync (count and first offsets); --repair resends them. The primary must "
        "be connected and the replica up to date. Exit 0 in sync (or repaired), 1 out of sync or failed.",
    )
    verify.add_argument("volume", metavar="VOLUME")
    verify.add_argument("--repair", action="store_true", help="resend the blocks found out of sync")
    verify.add_argument("--json", action="store_true", help="machine-readable summary")
    return p


def snapshot_dict(s: control_pb2.SnapshotInfo) -> dict[str, Any]:
    return {
        "volume": s.volume,
        "name": s.name,
        "valid": s.valid,
        "writable": s.writable,
        "created": s.created,
        "preserved_bytes": s.preserved_bytes,
        "capacity_bytes": s.capacity_bytes,
        "export": s.export,
        "lease_remaining_seconds": round(s.lease_remaining_seconds, 1) if s.lease_remaining_seconds else None,
        **({"reason": s.reason} if s.reason else {}),
    }


def run_remove(stub: control_pb2_grpc.ControlStub, args: argparse.Namespace) -> int:
    """`remove VOLUME`: without --yes, what it would delete (exit 1); with it, the removal."""
    if not args.yes:
        # (NOT_FOUND for an unknown volume, reported as every refusal is)
        snaps = stub.ListSnapshots(control_pb2.ListSnapshotsRequest(volume=args.volume), timeout=args.timeout)
        st = stub.Status(control_pb2.StatusRequest(), timeout=args.timeout)
        vol = next(v for v in st.volumes if v.name == args.volume)
        names = ", ".join(s.name for s in snaps.snapshots) or "none"
        print(
            f"{args.volume}: would delete its replica ({human_size(vol.size)}, {vol.state}) and its "
            f"{len(snaps.snapshots)} snapshots ({names}) on standby {st.standby_id}; run again with --yes",
            file=sys.stderr,
        )
        return EXIT_FAILED
    reply = stub.RemoveVolume(
        control_pb2.RemoveVolumeRequest(volume=args.volume, force=args.force), timeout=None
    )
    print(
        f"{reply.volume}: removed; {reply.snapshots_deleted} snapshots deleted, "
        f"{human_size(reply.replica_bytes)} of replica freed"
    )
    return EXIT_OK


def status_dict(reply: control_pb2.StatusReply, via: str) -> dict[str, Any]:
    """The status as `status --json` prints it; `via` is the address the standby was reached at (the
    NBD address it reports is given as a client there can use it)."""
    return {
        "nbd": cfg.reachable(reply.nbd, via) if reply.nbd else "",
        "nbd_tls": reply.nbd_tls or "off",
        "standby_id": reply.standby_id,
        "version": reply.version,
        "problems": list(reply.problems),
        "store": {
            "path": reply.store.path,
            "capacity_bytes": reply.store.capacity_bytes,
            "used_bytes": reply.store.used_bytes,
            "on_full": reply.store.on_full,
        },
        "volumes": [
            {
                "name": v.name,
                "size": v.size,
                "block_size": v.block_size,
                "state": v.state,
                "connected": v.connected,
                "applied_bytes": v.applied_bytes,
                "cow_copies": v.cow_copies,
                "last_error": v.last_error,
                "primary_id": v.primary_id,
                "promoted_at": v.promoted_at,
                "rolled_back_to": v.rolled_back_to,
                "kept_snapshot": v.kept_snapshot,
                "tracked_bytes": v.tracked_bytes,
                "owner": v.owner,
                "resync_remaining_bytes": v.resync_remaining_bytes,
                "resync_total_bytes": v.resync_total_bytes,
                "resync_eta_seconds": round(v.resync_eta_seconds, 1),
                "rollback_remaining_bytes": v.rollback_remaining_bytes,
                "snapshots": [snapshot_dict(s) for s in v.snapshots],
            }
            for v in reply.volumes
        ],
    }


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def snapshot_rows(snapshots: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["VOLUME", "SNAPSHOT", "STATE", "MODE", "CREATED", "PRESERVED", "CAPACITY", "FILL", "LEASE"]]
    for s in snapshots:
        fill = s["preserved_bytes"] / s["capacity_bytes"] if s["capacity_bytes"] else 0.0
        rows.append(
            [
                s["volume"],
                s["name"],
                "valid" if s["valid"] else "INVALID",
                "rw" if s["writable"] else "ro",
                s["created"],
                human_size(s["preserved_bytes"]),
                human_size(s["capacity_bytes"]),
                f"{fill:.1%}",
                lease_text(s.get("lease_remaining_seconds")),
            ]
        )
    return rows


def lease_text(seconds: float | None) -> str:
    """A lease's time left, as people read it: "-" (none: kept until deleted), "7d 23h", "4h 10m", "55s"."""
    if not seconds:
        return "-"
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit} {s % size // sub_size}{sub}"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"


def export_uri(st: dict[str, Any], export: str) -> str:
    """The NBD URI of `export` on the standby of status `st` (nbds:// when it requires TLS)."""
    scheme = "nbds" if st["nbd_tls"] == "require" else "nbd"
    return f"{scheme}://{st['nbd']}/{export}"


def print_status(st: dict[str, Any]) -> None:
    store = st["store"]
    fill = store["used_bytes"] / store["capacity_bytes"] if store["capacity_bytes"] else 0.0
    print(f"standby {st['standby_id']}  (version {st['version']})")
    print(f"snapshot exports: {export_uri(st, 'VOLUME@SNAPSHOT')}")
    print(
        f"preservation store: {human_size(store['used_bytes'])} used of "
        f"{human_size(store['capacity_bytes'])} ({fill:.1%}), on full: {store['on_full']}"
    )
    for problem in st["problems"]:
        print(f"PROBLEM: {problem}")
    print()
    if not st["volumes"]:
        print("no volumes yet: they appear when a primary connects")
        return
    rows = [["VOLUME", "SIZE", "BLOCK", "STATE", "PRIMARY", "APPLIED", "SNAPSHOTS"]]
    for v in st["volumes"]:
        rows.append(
            [
                v["name"],
                human_size(v["size"]),
                human_size(v["block_size"]),
                v["state"],
                "connected" if v["connected"] else "disconnected",
                human_size(v["applied_bytes"]),
                str(len(v["snapshots"])),
            ]
        )
    print(table(rows))
    for v in st["volumes"]:
        print(roles_line(v))
        if v["resync_total_bytes"]:
            print(resync_line(v))
        if v["last_error"]:
            print(f"{v['name']}: last refused: {v['last_error']}")
    snapshots = [s for v in st["volumes"] for s in v["snapshots"]]
    if snapshots:
        print()
        print(table(snapshot_rows(snapshots)))


def roles_line(v: dict[str, Any]) -> str:
    """Who holds what for volume `v`: this standby's role and its peer's."""
    name, primary = v["name"], (v["owner"] or v["primary_id"] or "none yet")[:8]
    if v["state"] == "promoted":
        back = (
            f", rolled back to {v['rolled_back_to']} (was: {v['kept_snapshot']})"
            if v["rolled_back_to"]
            else ""
        )
        return (
            f"{name}: this standby is the primary copy (promoted {v['promoted_at']}{back}), "
            f"{human_size(v['tracked_bytes'])} changed since; its old primary {primary} is fenced until "
            "`standbyctl demote`"
        )
    if v["state"] == "failback":
        return (
            f"{name}: demoted; waits for its old primary {primary} to take back "
            f"{human_size(v['tracked_bytes'])}, then it mirrors again"
        )
    link = "connected, mirroring" if v["connected"] else "disconnected"
    return f"{name}: this standby holds the replica ({v['state']}); primary {primary} {link}"


def resync_line(v: dict[str, Any]) -> str:
    """The running resync's progress and estimate."""
    total, left = v["resync_total_bytes"], v["resync_remaining_bytes"]
    eta = v["resync_eta_seconds"]
    estimate = f", about {human_duration(eta)} left" if eta else ""
    return (
        f"{v['name']}: resync {(total - left) / total:.0%} done ({human_size(left)} of "
        f"{human_size(total)} to send{estimate})"
    )


def human_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def verify_dict(last: control_pb2.VerifyProgress, repair: bool) -> dict[str, Any]:
    bs = last.block_size or 1
    return {
        "volume": last.volume,
        "total_bytes": last.total_bytes,
        "checked_bytes": last.checked_bytes,
        "block_size": last.block_size,
        "blocks": last.total_bytes // bs,
        "mismatched_blocks": last.mismatched_blocks,
        "first_offsets": list(last.first_offsets),
        "repair": repair,
        "repaired_blocks": last.repaired_blocks,
        "in_sync": last.mismatched_blocks == 0 or (repair and last.repaired_blocks >= last.mismatched_blocks),
    }


def verify_summary(v: dict[str, Any]) -> str:
    line = f"{v['volume']}: {v['mismatched_blocks']} of {v['blocks']} blocks out of sync"
    if v["first_offsets"]:
        shown = ", ".join(str(o) for o in v["first_offsets"])
        more = ", ..." if v["mismatched_blocks"] > len(v["first_offsets"]) else ""
        line += f" (first offsets: {shown}{more})"
    if v["repair"]:
        line += f", repaired {v['repaired_blocks']}"
    return line


def run_verify(stub: control_pb2_grpc.ControlStub, args: argparse.Namespace, err: TextIO) -> int:
    """Stream a verify's progress (on `err` when it is a terminal); print the summary; the exit code."""
    tty = err.isatty()
    last = None
    for progress in stub.Verify(control_pb2.VerifyRequest(volume=args.volume, repair=args.repair)):
        last = progress
        if tty:
            pct = progress.checked_bytes / progress.total_bytes if progress.total_bytes else 1.0
            print(
                f"\r{progress.volume}: checked {human_size(progress.checked_bytes)} of "
                f"{human_size(progress.total_bytes)} ({pct:.0%}), {progress.mismatched_blocks} blocks "
                "out of sync",
                end="",
                file=err,
                flush=True,
            )
    if tty:
        print(file=err)
    if last is None or not last.done:
        raise RemoteError(detail=f"the standby ended the verify of {args.volume!r} before it was done")
    v = verify_dict(last, args.repair)
    print(json.dumps(v, indent=2) if args.json else verify_summary(v))
    return EXIT_OK if v["in_sync"] else EXIT_FAILED


def execute(args: argparse.Namespace) -> int:
    conf = cfg.resolve(CtlSettings, args, environment=True)
    if args.show_config:
        sys.stdout.write(cfg.show(conf))
        return EXIT_OK
    if not args.command:
        raise ConfigError(
            detail="a COMMAND is needed (status, snapshot, verify, promote, demote, takeover, remove)"
        )
    args.standby, args.timeout = conf.standby, conf.timeout
    try:
        parse_address(args.standby)
    except Exception as e:
        raise ConfigError(detail=f"--standby: {e}") from e
    tls = conf.client_files()
    tls.check_client()
    with rpc.channel(args.standby, tls) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        with rpc.calling(args.standby, tls):
            if args.command == "verify":
                return run_verify(stub, args, sys.stderr)
            if args.command == "promote":
                # A rollback takes as long as the blocks to rewrite need: no deadline for it.
                vol = stub.Promote(
                    control_pb2.PromoteRequest(volume=args.volume, force=args.force, at=args.at),
                    timeout=None if args.at else args.timeout,
                )
                st = status_dict(stub.Status(control_pb2.StatusRequest(), timeout=args.timeout), args.standby)
                if vol.rolled_back_to:
                    print(
                        f"{vol.name}: rolled back to snapshot {vol.rolled_back_to}; the state it replaced "
                        f"is kept as snapshot {vol.kept_snapshot}"
                    )
                print(f"{vol.name}: promoted; read-write at {export_uri(st, vol.name)}")
                return EXIT_OK
            if args.command == "takeover":
                vol = stub.Takeover(control_pb2.TakeoverRequest(volume=args.volume), timeout=args.timeout)
                print(f"{vol.name}: released; the next primary to connect claims it")
                return EXIT_OK
            if args.command == "remove":
                return run_remove(stub, args)
            if args.command == "demote":
                vol = stub.Demote(control_pb2.DemoteRequest(volume=args.volume), timeout=args.timeout)
                print(
                    f"{vol.name}: demoted; {human_size(vol.tracked_bytes)} written while promoted go back to "
                    "the old primary when it reattaches"
                )
                return EXIT_OK
            if args.command == "status":
                st = status_dict(stub.Status(control_pb2.StatusRequest(), timeout=args.timeout), args.standby)
                if args.json:
                    print(json.dumps(st, indent=2))
                else:
                    print_status(st)
            elif args.action == "create":
                capacity = 0
                if args.capacity is not None:
                    try:
                        capacity = parse_size(args.capacity)
                    except Exception as e:
                        raise ConfigError(detail=f"--capacity: {e}") from e
                    if capacity <= 0:
                        raise ConfigError(detail="--capacity must be greater than 0")
                info = stub.CreateSnapshot(
                    control_pb2.CreateSnapshotRequest(
                        volume=args.volume,
                        name=args.name or "",
                        writable=args.writable,
                        capacity_bytes=capacity,
                    ),
                    timeout=args.timeout,
                )
                print(info.name)
            elif args.action == "list":
                reply = stub.ListSnapshots(
                    control_pb2.ListSnapshotsRequest(volume=args.volume or ""), timeout=args.timeout
                )
                snapshots = [snapshot_dict(s) for s in reply.snapshots]
                if args.json:
                    print(json.dumps(snapshots, indent=2))
                elif snapshots:
                    print(table(snapshot_rows(snapshots)))
                else:
                    print("no snapshots")
            elif args.action == "delete":
                stub.DeleteSnapshot(
                    control_pb2.DeleteSnapshotRequest(volume=args.volume, name=args.name),
                    timeout=args.timeout,
                )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run("standbyctl", lambda: execute(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())

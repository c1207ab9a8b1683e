"""The handshake rules: what a primary's handshake gets for a volume (its replica, created at first contact,
and whether the primary must send a full sync), and when it is refused (a geometry that differs from the
replica's, a split brain, a promoted volume).

Data generations tell whose data is newer; docs/REPLICATION.md explains them.
"""

from __future__ import annotations

from standby.failover import Failover, Promoted
from standby.replica import INCONSISTENT, Replica
from standby.replicas import Replicas
from standby.streams import Busy
from standbylib.blockdev import check_block_size
from standbylib.errors import InvalidArgument, RequestError, VolumeMismatch
from standbylib.runtime import logs
from standbylib.snapshot.records import check_name

log = logs.get(__name__)


class TakeoverRequired(RequestError):
    template = (
        "volume {volume!r} belongs to primary {owner}; primary {primary} {why}. Taking a volume over is an "
        "operator's act on the standby: `standbyctl takeover {volume}` there, then --discard-standby-data "
        "on this primary makes its data replace the replica"
    )


class SplitBrain(RequestError):
    template = (
        "volume {volume!r}: split brain: the standby holds generation {standby}, which the primary does not "
        "know (its generation is {primary}, the last one it shared with this standby {base}); both sides "
        "were changed since they last agreed. To keep the primary's data, restart it with "
        "--discard-standby-data (the standby's replica is overwritten by a full resync)"
    )


def handshake(
    replicas: Replicas,
    volume: str,
    size: int,
    block_size: int,
    *,
    generation: str = "",
    base_generation: str = "",
    discard: bool = False,
    previous_generation: str = "",
    primary_id: str = "",
    failover: Failover | None = None,
) -> tuple[Replica, bool, bool]:
    """The replica of `volume` (created, sparse, at first contact), whether it was created, and
    whether it needs a full sync.

    While a primary mirrors the volume, another primary (`primary_id`) is refused before anything
    changes, whatever it asks (`discard` included): a second writer's handshake must not flip a live
    replica to inconsistent. The primary that holds the stream may handshake again (a reconnect whose
    old stream the standby has not seen end yet). Idle, the volume still belongs to the primary that
    mirrored it last (`Replica.owner`): another primary whose data is not the replica's history (or
    that asks to discard it) is refused until an operator runs `standbyctl takeover` (`TakeoverRequired`).

    Generations tell whose data is newer: the replica may hold the primary's current generation
    (in sync), its base or its previous one (older: the primary resyncs what its bitmap marked; the
    previous one when the acknowledgement of a completed resync was lost with the link). Anything
    else means the histories diverged: refused as a split brain unless `discard` (then a full sync).

    A demoted volume (`Replica.failback`) waits for its old primary: one whose data descends from the
    generation the replica held when it was promoted gets the replica with `failback` still set (it must
    pull the tracked blocks before it mirrors); once it presents the replica's generation (it pulled
    them), the failback is complete. `discard` overrides the failback (a full sync, the tracked blocks
    are overwritten).
    """
    replica, created = _replica_for(replicas, volume, size, block_size)
    if replica.connected and replica.primary_id and primary_id and replica.primary_id != primary_id:
        raise Busy(volume=volume, primary=replica.primary_id)
    if replica.promoted_at:
        raise Promoted(volume=volume, when=replica.promoted_at)
    held = replica.generation
    related = bool(held) and held in (generation, base_generation, previous_generation)
    if replica.owner and primary_id and primary_id != replica.owner and (discard or not related):
        # Another primary, whose data is not the replica's history: it may not replace the volume.
        why = "asks to overwrite it (--discard-standby-data)" if discard else "holds another history"
        raise TakeoverRequired(volume=volume, owner=replica.owner, primary=primary_id, why=why)
    if replica.failback and failover is not None:
        if discard:
            log.warning("failback_discarded", volume=volume, primary=primary_id or None)
            failover.failback_done(replica)
        elif held == generation:
            failover.failback_done(replica)
            return replica, False, False
        elif failover.failback_for(replica, generation, base_generation, previous_generation):
            return replica, False, False
    if created or discard or not held:
        reason = (
            "new replica"
            if created
            else "discarded"
            if discard
            else "changed outside the daemon, or never completed a sync"
        )
        if held or not created:
            log.warning("full_sync", volume=volume, reason=reason, generation=held)
        replicas.set_state(replica, INCONSISTENT, generation="")
        return replica, created, True
    if held in (generation, base_generation) or (previous_generation and held == previous_generation):
        return replica, False, False
    raise SplitBrain(
        volume=volume, standby=held, primary=generation or "none", base=base_generation or "none"
    )


def _replica_for(replicas: Replicas, volume: str, size: int, block_size: int) -> tuple[Replica, bool]:
    """The replica of a valid volume name and geometry, created if new; refused when the one that exists
    has another geometry."""
    check_name("volume", volume)
    check_block_size(block_size)
    if size <= 0 or size % block_size:
        raise InvalidArgument(
            detail=f"volume {volume!r}: size {size} must be a positive multiple of the block size "
            f"{block_size}"
        )
    replica, created = replicas.find_or_create(volume, size, block_size)
    if not created and (replica.block_size != block_size or replica.size != size):
        raise VolumeMismatch(
            volume=volume,
            detail=f"the primary has {size} bytes in blocks of {block_size}, the replica "
            f"{replica.size} bytes in blocks of {replica.block_size}; "
            "resize or rename the volume",
        )
    return replica, created

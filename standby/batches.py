"""Applying the primary's batches, whichever transport brought them (the gRPC Mirror stream or the data
channel): the same checks, the same refusal log, the same acknowledgement."""

from __future__ import annotations

from collections.abc import Sequence

from standby.node import StandbyNode
from standby.replica import Replica
from standbylib.checksums import Payload, Probe, Repair
from standbylib.errors import StandbyError
from standbylib.rpc.v1 import replication_pb2
from standbylib.runtime import logs

log = logs.get(__name__)


def ops_of(batch: replication_pb2.Batch) -> list[tuple[int, Payload]]:
    """The ops of a batch parsed by protobuf: a probe, else zeros, else data (a verify's when tagged)."""
    ops: list[tuple[int, Payload]] = []
    for w in batch.writes:
        data: bytes | int = w.zero_length if w.zero_length else w.data
        payload: Payload = data
        if w.checksum_length:
            payload = Probe(w.checksum_length, w.digests, w.verify_id)
        elif w.verify_id:
            payload = Repair(data, w.verify_id)
        ops.append((w.offset, payload))
    return ops


def apply_batch(
    node: StandbyNode,
    replica: Replica,
    sequence: int,
    ops: Sequence[tuple[int, Payload]],
    flush: bool,
    uptodate: bool,
    resync_remaining: int = 0,
) -> list[int]:
    """Apply batch `sequence`; the offsets of the blocks its probes found out of sync. A refused batch
    is logged once per cause (`batch_refused`), not once per retried batch, and raises.
    `resync_remaining` is what the primary's resync has still to send (the status's progress)."""
    replica.note_resync(resync_remaining, uptodate)
    mismatched: list[int] = []
    try:
        node.apply(replica, sequence, ops, flush, uptodate, mismatched)
    except StandbyError as e:
        if node.refused(replica.name, e):
            log.warning("batch_refused", volume=replica.name, sequence=sequence, error=str(e))
        raise
    return mismatched


def applied_reply(
    node: StandbyNode, replica: Replica, sequence: int, flush: bool, mismatched: list[int]
) -> replication_pb2.MirrorReply:
    """The acknowledgement of an applied batch: its probes' mismatches, and a verify command when an
    operator asked for one."""
    reply = replication_pb2.MirrorReply(sequence=sequence, durable=flush, mismatched=mismatched)
    command = node.take_verify_command(replica)
    if command is not None:
        reply.verify.id, reply.verify.repair = command
    return reply

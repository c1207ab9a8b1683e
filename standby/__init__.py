"""Standby daemon (`standby-daemon`): applies mirrored writes to the replica through the snapshot
engine of `standbylib.snapshot` and exports snapshots over NBD."""

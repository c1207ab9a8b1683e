from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotInfo(_message.Message):
    __slots__ = ("volume", "name", "valid", "writable", "created", "preserved_bytes", "capacity_bytes", "export", "reason", "lease_remaining_seconds", "epoch", "standby_id", "replica_state", "replica_connected", "replica_in_sync_at", "replica_lag_seconds")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALID_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    PRESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_IN_SYNC_AT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    valid: bool
    writable: bool
    created: str
    preserved_bytes: int
    capacity_bytes: int
    export: str
    reason: str
    lease_remaining_seconds: float
    epoch: int
    standby_id: str
    replica_state: str
    replica_connected: bool
    replica_in_sync_at: str
    replica_lag_seconds: float
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ..., valid: _Optional[bool] = ..., writable: _Optional[bool] = ..., created: _Optional[str] = ..., preserved_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., export: _Optional[str] = ..., reason: _Optional[str] = ..., lease_remaining_seconds: _Optional[float] = ..., epoch: _Optional[int] = ..., standby_id: _Optional[str] = ..., replica_state: _Optional[str] = ..., replica_connected: _Optional[bool] = ..., replica_in_sync_at: _Optional[str] = ..., replica_lag_seconds: _Optional[float] = ...) -> None: ...

class VolumeStatus(_message.Message):
    __slots__ = ("name", "size", "block_size", "state", "connected", "snapshots", "applied_bytes", "applied_batches", "cow_copies", "primary_id", "last_error", "promoted_at", "rolled_back_to", "kept_snapshot", "tracked_bytes", "rollback_remaining_bytes", "owner", "resync_remaining_bytes", "resync_total_bytes", "resync_eta_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BYTES_FIELD_NUMBER: _ClassVar[int]
    APPLIED_BATCHES_FIELD_NUMBER: _ClassVar[int]
    COW_COPIES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_AT_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_TO_FIELD_NUMBER: _ClassVar[int]
    KEPT_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    TRACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_REMAINING_BYTES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REMAINING_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESYNC_ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    block_size: int
    state: str
    connected: bool
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    applied_bytes: int
    applied_batches: int
    cow_copies: int
    primary_id: str
    last_error: str
    promoted_at: str
    rolled_back_to: str
    kept_snapshot: str
    tracked_bytes: int
    rollback_remaining_bytes: int
    owner: str
    resync_remaining_bytes: int
    resync_total_bytes: int
    resync_eta_seconds: float
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., block_size: _Optional[int] = ..., state: _Optional[str] = ..., connected: _Optional[bool] = ..., snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ..., applied_bytes: _Optional[int] = ..., applied_batches: _Optional[int] = ..., cow_copies: _Optional[int] = ..., primary_id: _Optional[str] = ..., last_error: _Optional[str] = ..., promoted_at: _Optional[str] = ..., rolled_back_to: _Optional[str] = ..., kept_snapshot: _Optional[str] = ..., tracked_bytes: _Optional[int] = ..., rollback_remaining_bytes: _Optional[int] = ..., owner: _Optional[str] = ..., resync_remaining_bytes: _Optional[int] = ..., resync_total_bytes: _Optional[int] = ..., resync_eta_seconds: _Optional[float] = ...) -> None: ...

class StoreStatus(_message.Message):
    __slots__ = ("path", "capacity_bytes", "used_bytes", "on_full")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ON_FULL_FIELD_NUMBER: _ClassVar[int]
    path: str
    capacity_bytes: int
    used_bytes: int
    on_full: str
    def __init__(self, path: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., on_full: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("nbd", "volumes", "store", "standby_id", "version", "problems", "nbd_tls")
    NBD_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    NBD_TLS_FIELD_NUMBER: _ClassVar[int]
    nbd: str
    volumes: _containers.RepeatedCompositeFieldContainer[VolumeStatus]
    store: StoreStatus
    standby_id: str
    version: str
    problems: _containers.RepeatedScalarFieldContainer[str]
    nbd_tls: str
    def __init__(self, nbd: _Optional[str] = ..., volumes: _Optional[_Iterable[_Union[VolumeStatus, _Mapping]]] = ..., store: _Optional[_Union[StoreStatus, _Mapping]] = ..., standby_id: _Optional[str] = ..., version: _Optional[str] = ..., problems: _Optional[_Iterable[str]] = ..., nbd_tls: _Optional[str] = ...) -> None: ...

class CreateSnapshotRequest(_message.Message):
    __slots__ = ("volume", "name", "writable", "capacity_bytes", "lease_seconds")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    writable: bool
    capacity_bytes: int
    lease_seconds: float
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ..., writable: _Optional[bool] = ..., capacity_bytes: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("volume", "force", "at")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    force: bool
    at: str
    def __init__(self, volume: _Optional[str] = ..., force: _Optional[bool] = ..., at: _Optional[str] = ...) -> None: ...

class DemoteRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class TakeoverRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class RemoveVolumeRequest(_message.Message):
    __slots__ = ("volume", "force")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    force: bool
    def __init__(self, volume: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RemoveVolumeReply(_message.Message):
    __slots__ = ("volume", "snapshots_deleted", "replica_bytes")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume: str
    snapshots_deleted: int
    replica_bytes: int
    def __init__(self, volume: _Optional[str] = ..., snapshots_deleted: _Optional[int] = ..., replica_bytes: _Optional[int] = ...) -> None: ...

class RenewSnapshotLeaseRequest(_message.Message):
    __slots__ = ("volume", "name", "lease_seconds", "release")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    lease_seconds: float
    release: bool
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ..., lease_seconds: _Optional[float] = ..., release: _Optional[bool] = ...) -> None: ...

class ListSnapshotsRequest(_message.Message):
    __slots__ = ("volume",)
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    def __init__(self, volume: _Optional[str] = ...) -> None: ...

class ListSnapshotsReply(_message.Message):
    __slots__ = ("snapshots",)
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotInfo]
    def __init__(self, snapshots: _Optional[_Iterable[_Union[SnapshotInfo, _Mapping]]] = ...) -> None: ...

class DeleteSnapshotRequest(_message.Message):
    __slots__ = ("volume", "name")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    volume: str
    name: str
    def __init__(self, volume: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteSnapshotReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("volume", "repair")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    volume: str
    repair: bool
    def __init__(self, volume: _Optional[str] = ..., repair: _Optional[bool] = ...) -> None: ...

class VerifyProgress(_message.Message):
    __slots__ = ("volume", "checked_bytes", "total_bytes", "mismatched_blocks", "first_offsets", "repaired_blocks", "done", "block_size")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    CHECKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FIRST_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    volume: str
    checked_bytes: int
    total_bytes: int
    mismatched_blocks: int
    first_offsets: _containers.RepeatedScalarFieldContainer[int]
    repaired_blocks: int
    done: bool
    block_size: int
    def __init__(self, volume: _Optional[str] = ..., checked_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., mismatched_blocks: _Optional[int] = ..., first_offsets: _Optional[_Iterable[int]] = ..., repaired_blocks: _Optional[int] = ..., done: _Optional[bool] = ..., block_size: _Optional[int] = ...) -> None: ...

class SnapshotChangesRequest(_message.Message):
    __slots__ = ("volume", "base", "snapshot")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    volume: str
    base: str
    snapshot: str
    def __init__(self, volume: _Optional[str] = ..., base: _Optional[str] = ..., snapshot: _Optional[str] = ...) -> None: ...

class SnapshotChangesReply(_message.Message):
    __slots__ = ("offsets", "lengths")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offsets: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

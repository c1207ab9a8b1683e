from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("volume", "size", "block_size", "primary_id", "generation", "base_generation", "discard_standby_data", "previous_generation")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DISCARD_STANDBY_DATA_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_GENERATION_FIELD_NUMBER: _ClassVar[int]
    volume: str
    size: int
    block_size: int
    primary_id: str
    generation: str
    base_generation: str
    discard_standby_data: bool
    previous_generation: str
    def __init__(self, volume: _Optional[str] = ..., size: _Optional[int] = ..., block_size: _Optional[int] = ..., primary_id: _Optional[str] = ..., generation: _Optional[str] = ..., base_generation: _Optional[str] = ..., discard_standby_data: _Optional[bool] = ..., previous_generation: _Optional[str] = ...) -> None: ...

class HandshakeReply(_message.Message):
    __slots__ = ("volume", "size", "block_size", "created", "standby_id", "applied_sequence", "generation", "full_sync", "failback", "tracked_bytes")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STANDBY_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FULL_SYNC_FIELD_NUMBER: _ClassVar[int]
    FAILBACK_FIELD_NUMBER: _ClassVar[int]
    TRACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    volume: str
    size: int
    block_size: int
    created: bool
    standby_id: str
    applied_sequence: int
    generation: str
    full_sync: bool
    failback: bool
    tracked_bytes: int
    def __init__(self, volume: _Optional[str] = ..., size: _Optional[int] = ..., block_size: _Optional[int] = ..., created: _Optional[bool] = ..., standby_id: _Optional[str] = ..., applied_sequence: _Optional[int] = ..., generation: _Optional[str] = ..., full_sync: _Optional[bool] = ..., failback: _Optional[bool] = ..., tracked_bytes: _Optional[int] = ...) -> None: ...

class Extent(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class FailbackPullRequest(_message.Message):
    __slots__ = ("volume", "primary_id", "generation", "regions", "checksums")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    volume: str
    primary_id: str
    generation: str
    regions: _containers.RepeatedCompositeFieldContainer[Extent]
    checksums: bool
    def __init__(self, volume: _Optional[str] = ..., primary_id: _Optional[str] = ..., generation: _Optional[str] = ..., regions: _Optional[_Iterable[_Union[Extent, _Mapping]]] = ..., checksums: _Optional[bool] = ...) -> None: ...

class FailbackChunk(_message.Message):
    __slots__ = ("offset", "length", "data", "done", "tracked_bytes", "sent_bytes", "digests")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TRACKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    data: bytes
    done: bool
    tracked_bytes: int
    sent_bytes: int
    digests: bytes
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., tracked_bytes: _Optional[int] = ..., sent_bytes: _Optional[int] = ..., digests: _Optional[bytes] = ...) -> None: ...

class MirrorOpen(_message.Message):
    __slots__ = ("volume", "first_sequence", "primary_id", "received_acks", "resync", "generation", "data_channel")
    VOLUME_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_ACKS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DATA_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    volume: str
    first_sequence: int
    primary_id: str
    received_acks: bool
    resync: bool
    generation: str
    data_channel: bool
    def __init__(self, volume: _Optional[str] = ..., first_sequence: _Optional[int] = ..., primary_id: _Optional[str] = ..., received_acks: _Optional[bool] = ..., resync: _Optional[bool] = ..., generation: _Optional[str] = ..., data_channel: _Optional[bool] = ...) -> None: ...

class DataChannelOffer(_message.Message):
    __slots__ = ("token", "host", "port")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    host: str
    port: int
    def __init__(self, token: _Optional[bytes] = ..., host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class DataChannelHello(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    def __init__(self, token: _Optional[bytes] = ...) -> None: ...

class Write(_message.Message):
    __slots__ = ("offset", "data", "zero_length", "checksum_length", "digests", "verify_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ZERO_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    zero_length: int
    checksum_length: int
    digests: bytes
    verify_id: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., zero_length: _Optional[int] = ..., checksum_length: _Optional[int] = ..., digests: _Optional[bytes] = ..., verify_id: _Optional[int] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("sequence", "writes", "flush", "uptodate", "resync_remaining")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    UPTODATE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REMAINING_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    writes: _containers.RepeatedCompositeFieldContainer[Write]
    flush: bool
    uptodate: bool
    resync_remaining: int
    def __init__(self, sequence: _Optional[int] = ..., writes: _Optional[_Iterable[_Union[Write, _Mapping]]] = ..., flush: _Optional[bool] = ..., uptodate: _Optional[bool] = ..., resync_remaining: _Optional[int] = ...) -> None: ...

class MirrorRequest(_message.Message):
    __slots__ = ("open", "batch", "hello")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    open: MirrorOpen
    batch: Batch
    hello: DataChannelHello
    def __init__(self, open: _Optional[_Union[MirrorOpen, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., hello: _Optional[_Union[DataChannelHello, _Mapping]] = ...) -> None: ...

class VerifyCommand(_message.Message):
    __slots__ = ("id", "repair")
    ID_FIELD_NUMBER: _ClassVar[int]
    REPAIR_FIELD_NUMBER: _ClassVar[int]
    id: int
    repair: bool
    def __init__(self, id: _Optional[int] = ..., repair: _Optional[bool] = ...) -> None: ...

class MirrorReply(_message.Message):
    __slots__ = ("sequence", "durable", "received", "mismatched", "verify", "channel", "error_code", "error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    durable: bool
    received: bool
    mismatched: _containers.RepeatedScalarFieldContainer[int]
    verify: VerifyCommand
    channel: DataChannelOffer
    error_code: str
    error: str
    def __init__(self, sequence: _Optional[int] = ..., durable: _Optional[bool] = ..., received: _Optional[bool] = ..., mismatched: _Optional[_Iterable[int]] = ..., verify: _Optional[_Union[VerifyCommand, _Mapping]] = ..., channel: _Optional[_Union[DataChannelOffer, _Mapping]] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

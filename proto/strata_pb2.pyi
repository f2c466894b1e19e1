from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPABILITY_UNSPECIFIED: _ClassVar[Capability]
    TRAIN: _ClassVar[Capability]
    PARTIAL_TRAIN: _ClassVar[Capability]
    INFERENCE: _ClassVar[Capability]
CAPABILITY_UNSPECIFIED: Capability
TRAIN: Capability
PARTIAL_TRAIN: Capability
INFERENCE: Capability

class Telemetry(_message.Message):
    __slots__ = ("cpu_percent", "memory_mb", "battery_percent", "charging", "network", "uplink_kbps")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    BATTERY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CHARGING_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    UPLINK_KBPS_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_mb: float
    battery_percent: float
    charging: bool
    network: str
    uplink_kbps: float
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_mb: _Optional[float] = ..., battery_percent: _Optional[float] = ..., charging: _Optional[bool] = ..., network: _Optional[str] = ..., uplink_kbps: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("model_cid", "round", "federation", "weights_cid", "not_invited", "check_back_s")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    NOT_INVITED_FIELD_NUMBER: _ClassVar[int]
    CHECK_BACK_S_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    round: int
    federation: str
    weights_cid: str
    not_invited: bool
    check_back_s: float
    def __init__(self, model_cid: _Optional[str] = ..., round: _Optional[int] = ..., federation: _Optional[str] = ..., weights_cid: _Optional[str] = ..., not_invited: _Optional[bool] = ..., check_back_s: _Optional[float] = ...) -> None: ...

class Redirect(_message.Message):
    __slots__ = ("aggregator_id", "address", "ring_version", "reason")
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    aggregator_id: str
    address: str
    ring_version: int
    reason: str
    def __init__(self, aggregator_id: _Optional[str] = ..., address: _Optional[str] = ..., ring_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("agent_id", "display_name", "capability", "telemetry", "federation", "trainable_tensors")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    display_name: str
    capability: Capability
    telemetry: Telemetry
    federation: str
    trainable_tensors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., display_name: _Optional[str] = ..., capability: _Optional[_Union[Capability, str]] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., federation: _Optional[str] = ..., trainable_tensors: _Optional[_Iterable[str]] = ...) -> None: ...

class Home(_message.Message):
    __slots__ = ("aggregator_id", "base", "ring_version", "heartbeat_interval_s", "round_config")
    class RoundConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    aggregator_id: str
    base: ModelRef
    ring_version: int
    heartbeat_interval_s: float
    round_config: _containers.ScalarMap[str, str]
    def __init__(self, aggregator_id: _Optional[str] = ..., base: _Optional[_Union[ModelRef, _Mapping]] = ..., ring_version: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., round_config: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("home", "redirect")
    HOME_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_FIELD_NUMBER: _ClassVar[int]
    home: Home
    redirect: Redirect
    def __init__(self, home: _Optional[_Union[Home, _Mapping]] = ..., redirect: _Optional[_Union[Redirect, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_cid", "if_none_match", "federation", "agent_id")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    IF_NONE_MATCH_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    if_none_match: str
    federation: str
    agent_id: str
    def __init__(self, model_cid: _Optional[str] = ..., if_none_match: _Optional[str] = ..., federation: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("model_cid", "manifest", "weights_cid", "weights_size", "not_modified", "round")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    manifest: bytes
    weights_cid: str
    weights_size: int
    not_modified: bool
    round: int
    def __init__(self, model_cid: _Optional[str] = ..., manifest: _Optional[bytes] = ..., weights_cid: _Optional[str] = ..., weights_size: _Optional[int] = ..., not_modified: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("agent_id", "round", "base_cid", "num_samples", "metrics", "tensors", "weights_size", "weights_cid", "base_metrics", "federation", "kind", "parents", "manifest", "encoding", "control_size", "control_cid")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class BaseMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_CID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SIZE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    BASE_METRICS_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_CID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    round: int
    base_cid: str
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    tensors: _containers.RepeatedScalarFieldContainer[str]
    weights_size: int
    weights_cid: str
    base_metrics: _containers.ScalarMap[str, float]
    federation: str
    kind: str
    parents: _containers.RepeatedScalarFieldContainer[str]
    manifest: bytes
    encoding: str
    control_size: int
    control_cid: str
    def __init__(self, agent_id: _Optional[str] = ..., round: _Optional[int] = ..., base_cid: _Optional[str] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tensors: _Optional[_Iterable[str]] = ..., weights_size: _Optional[int] = ..., weights_cid: _Optional[str] = ..., base_metrics: _Optional[_Mapping[str, float]] = ..., federation: _Optional[str] = ..., kind: _Optional[str] = ..., parents: _Optional[_Iterable[str]] = ..., manifest: _Optional[bytes] = ..., encoding: _Optional[str] = ..., control_size: _Optional[int] = ..., control_cid: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class SubmitUpdateReply(_message.Message):
    __slots__ = ("accepted", "reason", "message", "update_cid", "round", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    message: str
    update_cid: str
    round: int
    duplicate: bool
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., update_cid: _Optional[str] = ..., round: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class WatchModelsRequest(_message.Message):
    __slots__ = ("agent_id", "federation", "known_cid")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_CID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    federation: str
    known_cid: str
    def __init__(self, agent_id: _Optional[str] = ..., federation: _Optional[str] = ..., known_cid: _Optional[str] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("new_base", "home_changed")
    NEW_BASE_FIELD_NUMBER: _ClassVar[int]
    HOME_CHANGED_FIELD_NUMBER: _ClassVar[int]
    new_base: ModelRef
    home_changed: Redirect
    def __init__(self, new_base: _Optional[_Union[ModelRef, _Mapping]] = ..., home_changed: _Optional[_Union[Redirect, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("agent_id", "telemetry", "federation", "known_cid")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_CID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    telemetry: Telemetry
    federation: str
    known_cid: str
    def __init__(self, agent_id: _Optional[str] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., federation: _Optional[str] = ..., known_cid: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_base", "home_changed", "next_interval_s", "revocations_version")
    CURRENT_BASE_FIELD_NUMBER: _ClassVar[int]
    HOME_CHANGED_FIELD_NUMBER: _ClassVar[int]
    NEXT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_VERSION_FIELD_NUMBER: _ClassVar[int]
    current_base: ModelRef
    home_changed: Redirect
    next_interval_s: float
    revocations_version: int
    def __init__(self, current_base: _Optional[_Union[ModelRef, _Mapping]] = ..., home_changed: _Optional[_Union[Redirect, _Mapping]] = ..., next_interval_s: _Optional[float] = ..., revocations_version: _Optional[int] = ...) -> None: ...

class ClusterPointer(_message.Message):
    __slots__ = ("model_cid", "round", "num_samples", "producer", "created_at", "federation", "weights_cid")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    round: int
    num_samples: int
    producer: str
    created_at: float
    federation: str
    weights_cid: str
    def __init__(self, model_cid: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., producer: _Optional[str] = ..., created_at: _Optional[float] = ..., federation: _Optional[str] = ..., weights_cid: _Optional[str] = ...) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ("federation",)
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    federation: str
    def __init__(self, federation: _Optional[str] = ...) -> None: ...

class LatestReply(_message.Message):
    __slots__ = ("latest", "aggregator_id")
    LATEST_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    latest: ClusterPointer
    aggregator_id: str
    def __init__(self, latest: _Optional[_Union[ClusterPointer, _Mapping]] = ..., aggregator_id: _Optional[str] = ...) -> None: ...

class FetchBlobRequest(_message.Message):
    __slots__ = ("cid",)
    CID_FIELD_NUMBER: _ClassVar[int]
    cid: str
    def __init__(self, cid: _Optional[str] = ...) -> None: ...

class BlobHeader(_message.Message):
    __slots__ = ("cid", "size")
    CID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    cid: str
    size: int
    def __init__(self, cid: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: BlobHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[BlobHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class AggregatorInfo(_message.Message):
    __slots__ = ("id", "address", "federations", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FEDERATIONS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    federations: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., federations: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("ttl_s", "heartbeat_interval_s", "ring_version", "expires_at", "revocations_version")
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    RING_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ttl_s: float
    heartbeat_interval_s: float
    ring_version: int
    expires_at: float
    revocations_version: int
    def __init__(self, ttl_s: _Optional[float] = ..., heartbeat_interval_s: _Optional[float] = ..., ring_version: _Optional[int] = ..., expires_at: _Optional[float] = ..., revocations_version: _Optional[int] = ...) -> None: ...

class FederationProgress(_message.Message):
    __slots__ = ("federation", "round", "agent_count", "last_cluster_cid", "last_semi_global_cid")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_CLUSTER_CID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEMI_GLOBAL_CID_FIELD_NUMBER: _ClassVar[int]
    federation: str
    round: int
    agent_count: int
    last_cluster_cid: str
    last_semi_global_cid: str
    def __init__(self, federation: _Optional[str] = ..., round: _Optional[int] = ..., agent_count: _Optional[int] = ..., last_cluster_cid: _Optional[str] = ..., last_semi_global_cid: _Optional[str] = ...) -> None: ...

class AggregatorHeartbeat(_message.Message):
    __slots__ = ("id", "round", "agent_count", "last_cluster_cid", "last_semi_global_cid", "info", "federations")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_CLUSTER_CID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEMI_GLOBAL_CID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    FEDERATIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    round: int
    agent_count: int
    last_cluster_cid: str
    last_semi_global_cid: str
    info: AggregatorInfo
    federations: _containers.RepeatedCompositeFieldContainer[FederationProgress]
    def __init__(self, id: _Optional[str] = ..., round: _Optional[int] = ..., agent_count: _Optional[int] = ..., last_cluster_cid: _Optional[str] = ..., last_semi_global_cid: _Optional[str] = ..., info: _Optional[_Union[AggregatorInfo, _Mapping]] = ..., federations: _Optional[_Iterable[_Union[FederationProgress, _Mapping]]] = ...) -> None: ...

class RingMember(_message.Message):
    __slots__ = ("id", "address", "weight")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    weight: float
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("version", "members")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    members: _containers.RepeatedCompositeFieldContainer[RingMember]
    def __init__(self, version: _Optional[int] = ..., members: _Optional[_Iterable[_Union[RingMember, _Mapping]]] = ...) -> None: ...

class GetRingRequest(_message.Message):
    __slots__ = ("federation",)
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    federation: str
    def __init__(self, federation: _Optional[str] = ...) -> None: ...

class WatchRingRequest(_message.Message):
    __slots__ = ("known_version", "federation")
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    federation: str
    def __init__(self, known_version: _Optional[int] = ..., federation: _Optional[str] = ...) -> None: ...

class AnnounceModelRequest(_message.Message):
    __slots__ = ("manifest", "notes")
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    notes: _containers.ScalarMap[str, str]
    def __init__(self, manifest: _Optional[bytes] = ..., notes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AnnounceModelReply(_message.Message):
    __slots__ = ("model_cid",)
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    def __init__(self, model_cid: _Optional[str] = ...) -> None: ...

class AnnounceModelsRequest(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[AnnounceModelRequest]
    def __init__(self, models: _Optional[_Iterable[_Union[AnnounceModelRequest, _Mapping]]] = ...) -> None: ...

class AnnounceResult(_message.Message):
    __slots__ = ("model_cid", "reason", "message")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    reason: str
    message: str
    def __init__(self, model_cid: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AnnounceModelsReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AnnounceResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AnnounceResult, _Mapping]]] = ...) -> None: ...

class ModelRecord(_message.Message):
    __slots__ = ("model_cid", "kind", "federation", "round", "producer", "parents", "num_samples", "metrics", "created_at", "weights_cid", "manifest", "base")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    kind: str
    federation: str
    round: int
    producer: str
    parents: _containers.RepeatedScalarFieldContainer[str]
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    created_at: float
    weights_cid: str
    manifest: bytes
    base: str
    def __init__(self, model_cid: _Optional[str] = ..., kind: _Optional[str] = ..., federation: _Optional[str] = ..., round: _Optional[int] = ..., producer: _Optional[str] = ..., parents: _Optional[_Iterable[str]] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_at: _Optional[float] = ..., weights_cid: _Optional[str] = ..., manifest: _Optional[bytes] = ..., base: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("kind", "aggregator", "federation", "round", "latest_per_aggregator", "limit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LATEST_PER_AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    aggregator: str
    federation: str
    round: int
    latest_per_aggregator: bool
    limit: int
    def __init__(self, kind: _Optional[str] = ..., aggregator: _Optional[str] = ..., federation: _Optional[str] = ..., round: _Optional[int] = ..., latest_per_aggregator: _Optional[bool] = ..., limit: _Optional[int] = ...) -> None: ...

class ListModelsReply(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRecord]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRecord, _Mapping]]] = ...) -> None: ...

class LineageRequest(_message.Message):
    __slots__ = ("model_cid", "depth", "omit_manifests", "follow_base")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    OMIT_MANIFESTS_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_BASE_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    depth: int
    omit_manifests: bool
    follow_base: bool
    def __init__(self, model_cid: _Optional[str] = ..., depth: _Optional[int] = ..., omit_manifests: _Optional[bool] = ..., follow_base: _Optional[bool] = ...) -> None: ...

class LineageReply(_message.Message):
    __slots__ = ("model", "ancestors", "children", "missing", "truncated")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ANCESTORS_FIELD_NUMBER: _ClassVar[int]
    CHILDREN_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    model: ModelRecord
    ancestors: _containers.RepeatedCompositeFieldContainer[ModelRecord]
    children: _containers.RepeatedCompositeFieldContainer[ModelRecord]
    missing: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, model: _Optional[_Union[ModelRecord, _Mapping]] = ..., ancestors: _Optional[_Iterable[_Union[ModelRecord, _Mapping]]] = ..., children: _Optional[_Iterable[_Union[ModelRecord, _Mapping]]] = ..., missing: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class AgentRecord(_message.Message):
    __slots__ = ("agent_id", "home_aggregator", "last_seen", "telemetry", "capability", "display_name")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HOME_AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    home_aggregator: str
    last_seen: float
    telemetry: Telemetry
    capability: Capability
    display_name: str
    def __init__(self, agent_id: _Optional[str] = ..., home_aggregator: _Optional[str] = ..., last_seen: _Optional[float] = ..., telemetry: _Optional[_Union[Telemetry, _Mapping]] = ..., capability: _Optional[_Union[Capability, str]] = ..., display_name: _Optional[str] = ...) -> None: ...

class ReportAgentsRequest(_message.Message):
    __slots__ = ("aggregator_id", "agents")
    AGGREGATOR_ID_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    aggregator_id: str
    agents: _containers.RepeatedCompositeFieldContainer[AgentRecord]
    def __init__(self, aggregator_id: _Optional[str] = ..., agents: _Optional[_Iterable[_Union[AgentRecord, _Mapping]]] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ("aggregator",)
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    aggregator: str
    def __init__(self, aggregator: _Optional[str] = ...) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentRecord]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentRecord, _Mapping]]] = ...) -> None: ...

class FleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AggregatorStatus(_message.Message):
    __slots__ = ("info", "alive", "lease_expires_at", "round", "agent_count", "last_cluster_cid", "last_semi_global_cid", "federations")
    INFO_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGENT_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_CLUSTER_CID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEMI_GLOBAL_CID_FIELD_NUMBER: _ClassVar[int]
    FEDERATIONS_FIELD_NUMBER: _ClassVar[int]
    info: AggregatorInfo
    alive: bool
    lease_expires_at: float
    round: int
    agent_count: int
    last_cluster_cid: str
    last_semi_global_cid: str
    federations: _containers.RepeatedCompositeFieldContainer[FederationProgress]
    def __init__(self, info: _Optional[_Union[AggregatorInfo, _Mapping]] = ..., alive: _Optional[bool] = ..., lease_expires_at: _Optional[float] = ..., round: _Optional[int] = ..., agent_count: _Optional[int] = ..., last_cluster_cid: _Optional[str] = ..., last_semi_global_cid: _Optional[str] = ..., federations: _Optional[_Iterable[_Union[FederationProgress, _Mapping]]] = ...) -> None: ...

class FleetStatusReply(_message.Message):
    __slots__ = ("ring", "aggregators")
    RING_FIELD_NUMBER: _ClassVar[int]
    AGGREGATORS_FIELD_NUMBER: _ClassVar[int]
    ring: Ring
    aggregators: _containers.RepeatedCompositeFieldContainer[AggregatorStatus]
    def __init__(self, ring: _Optional[_Union[Ring, _Mapping]] = ..., aggregators: _Optional[_Iterable[_Union[AggregatorStatus, _Mapping]]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "agent_id", "csr_pem", "manifest_key", "proof")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    token: str
    agent_id: str
    csr_pem: bytes
    manifest_key: str
    proof: str
    def __init__(self, token: _Optional[str] = ..., agent_id: _Optional[str] = ..., csr_pem: _Optional[bytes] = ..., manifest_key: _Optional[str] = ..., proof: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem", "manifest_key", "proof")
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    manifest_key: str
    proof: str
    def __init__(self, csr_pem: _Optional[bytes] = ..., manifest_key: _Optional[str] = ..., proof: _Optional[str] = ...) -> None: ...

class CertificateReply(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "identity", "renew_address")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    RENEW_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    identity: str
    renew_address: str
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., identity: _Optional[str] = ..., renew_address: _Optional[str] = ...) -> None: ...

class GetRevocationsRequest(_message.Message):
    __slots__ = ("known_version",)
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    def __init__(self, known_version: _Optional[int] = ...) -> None: ...

class RevocationsReply(_message.Message):
    __slots__ = ("version", "revocations")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    version: int
    revocations: bytes
    def __init__(self, version: _Optional[int] = ..., revocations: _Optional[bytes] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateFederationRequest(_message.Message):
    __slots__ = ("name", "description", "base_manifest", "task", "owners", "round_policy", "strategy")
    class RoundPolicyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BASE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    base_manifest: bytes
    task: str
    owners: _containers.RepeatedScalarFieldContainer[str]
    round_policy: _containers.ScalarMap[str, str]
    strategy: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., base_manifest: _Optional[bytes] = ..., task: _Optional[str] = ..., owners: _Optional[_Iterable[str]] = ..., round_policy: _Optional[_Mapping[str, str]] = ..., strategy: _Optional[str] = ...) -> None: ...

class FederationRecord(_message.Message):
    __slots__ = ("name", "description", "task", "base_cid", "spec", "owners", "round_policy", "strategy", "forked_from", "source_federation", "heads", "created_at", "created_by", "fork_layers")
    class RoundPolicyEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HeadsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BASE_CID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_POLICY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    FORKED_FROM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FEDERATION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    FORK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    task: str
    base_cid: str
    spec: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    owners: _containers.RepeatedScalarFieldContainer[str]
    round_policy: _containers.ScalarMap[str, str]
    strategy: str
    forked_from: str
    source_federation: str
    heads: _containers.ScalarMap[str, str]
    created_at: float
    created_by: str
    fork_layers: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., task: _Optional[str] = ..., base_cid: _Optional[str] = ..., spec: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., owners: _Optional[_Iterable[str]] = ..., round_policy: _Optional[_Mapping[str, str]] = ..., strategy: _Optional[str] = ..., forked_from: _Optional[str] = ..., source_federation: _Optional[str] = ..., heads: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[float] = ..., created_by: _Optional[str] = ..., fork_layers: _Optional[str] = ...) -> None: ...

class ListFederationsRequest(_message.Message):
    __slots__ = ("limit", "offset")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    limit: int
    offset: int
    def __init__(self, limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class ListFederationsReply(_message.Message):
    __slots__ = ("federations", "next_offset")
    FEDERATIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    federations: _containers.RepeatedCompositeFieldContainer[FederationRecord]
    next_offset: int
    def __init__(self, federations: _Optional[_Iterable[_Union[FederationRecord, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class GetFederationRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CreateReleaseRequest(_message.Message):
    __slots__ = ("tag",)
    TAG_FIELD_NUMBER: _ClassVar[int]
    tag: bytes
    def __init__(self, tag: _Optional[bytes] = ...) -> None: ...

class ReleaseRecord(_message.Message):
    __slots__ = ("federation", "version", "model_cid", "notes", "evaluation", "accuracy", "has_accuracy", "lineage_root", "released_by", "created_at", "tag")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HAS_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_ROOT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    federation: str
    version: str
    model_cid: str
    notes: str
    evaluation: str
    accuracy: float
    has_accuracy: bool
    lineage_root: str
    released_by: str
    created_at: float
    tag: bytes
    def __init__(self, federation: _Optional[str] = ..., version: _Optional[str] = ..., model_cid: _Optional[str] = ..., notes: _Optional[str] = ..., evaluation: _Optional[str] = ..., accuracy: _Optional[float] = ..., has_accuracy: _Optional[bool] = ..., lineage_root: _Optional[str] = ..., released_by: _Optional[str] = ..., created_at: _Optional[float] = ..., tag: _Optional[bytes] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ("federation", "offset", "limit")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    federation: str
    offset: int
    limit: int
    def __init__(self, federation: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListReleasesReply(_message.Message):
    __slots__ = ("releases", "next_offset")
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[ReleaseRecord]
    next_offset: int
    def __init__(self, releases: _Optional[_Iterable[_Union[ReleaseRecord, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class ResolveModelRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ResolveModelReply(_message.Message):
    __slots__ = ("model_cid", "release")
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    model_cid: str
    release: ReleaseRecord
    def __init__(self, model_cid: _Optional[str] = ..., release: _Optional[_Union[ReleaseRecord, _Mapping]] = ...) -> None: ...

class CreateProposalRequest(_message.Message):
    __slots__ = ("manifest",)
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    manifest: bytes
    def __init__(self, manifest: _Optional[bytes] = ...) -> None: ...

class ProposalRecord(_message.Message):
    __slots__ = ("proposal_cid", "from_federation", "to_federation", "model_cid", "target_head", "state", "proposed_by", "created_at", "decided_by", "decided_at", "merge_cid")
    PROPOSAL_CID_FIELD_NUMBER: _ClassVar[int]
    FROM_FEDERATION_FIELD_NUMBER: _ClassVar[int]
    TO_FEDERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_CID_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEAD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    MERGE_CID_FIELD_NUMBER: _ClassVar[int]
    proposal_cid: str
    from_federation: str
    to_federation: str
    model_cid: str
    target_head: str
    state: str
    proposed_by: str
    created_at: float
    decided_by: str
    decided_at: float
    merge_cid: str
    def __init__(self, proposal_cid: _Optional[str] = ..., from_federation: _Optional[str] = ..., to_federation: _Optional[str] = ..., model_cid: _Optional[str] = ..., target_head: _Optional[str] = ..., state: _Optional[str] = ..., proposed_by: _Optional[str] = ..., created_at: _Optional[float] = ..., decided_by: _Optional[str] = ..., decided_at: _Optional[float] = ..., merge_cid: _Optional[str] = ...) -> None: ...

class ListProposalsRequest(_message.Message):
    __slots__ = ("federation", "state", "offset", "limit")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    federation: str
    state: str
    offset: int
    limit: int
    def __init__(self, federation: _Optional[str] = ..., state: _Optional[str] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListProposalsReply(_message.Message):
    __slots__ = ("proposals", "next_offset")
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    proposals: _containers.RepeatedCompositeFieldContainer[ProposalRecord]
    next_offset: int
    def __init__(self, proposals: _Optional[_Iterable[_Union[ProposalRecord, _Mapping]]] = ..., next_offset: _Optional[int] = ...) -> None: ...

class DecideProposalRequest(_message.Message):
    __slots__ = ("proposal_cid", "accept", "merge_manifest")
    PROPOSAL_CID_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    MERGE_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    proposal_cid: str
    accept: bool
    merge_manifest: bytes
    def __init__(self, proposal_cid: _Optional[str] = ..., accept: _Optional[bool] = ..., merge_manifest: _Optional[bytes] = ...) -> None: ...

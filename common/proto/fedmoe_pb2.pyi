from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    FEDMOE_DA: _ClassVar[Algorithm]
    FEDAVG: _ClassVar[Algorithm]
    LOCAL: _ClassVar[Algorithm]
    MOE_FEDAVG: _ClassVar[Algorithm]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT64: DType
INT32: DType
UINT8: DType
ALGORITHM_UNSPECIFIED: Algorithm
FEDMOE_DA: Algorithm
FEDAVG: Algorithm
LOCAL: Algorithm
MOE_FEDAVG: Algorithm

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset", "total_bytes", "data", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    total_bytes: int
    data: bytes
    crc32: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("run_id", "algorithm", "peers", "rounds", "seed", "dataset", "data_dir", "alpha", "embed_dim", "num_experts", "top_k", "expert_hidden", "balance_coef", "local_epochs", "batch_size", "lr", "momentum", "neighbors", "temperature", "sync_every", "intra_peer", "chunk_bytes", "expert_wire_dtype", "min_peers", "round_timeout", "peer_timeout", "clients_per_round", "aggregation", "trim_fraction", "clip_norm", "max_tensor_norm", "val_fraction", "init", "finetune_epochs", "min_term_weight", "embedding_init", "freeze_embedding", "embedding_wire_dtype", "model", "model_weights")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXPERT_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    BALANCE_COEF_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NEIGHBORS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    INTRA_PEER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MIN_PEERS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    PEER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TRIM_FRACTION_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_NORM_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MIN_TERM_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_INIT_FIELD_NUMBER: _ClassVar[int]
    FREEZE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm: Algorithm
    peers: int
    rounds: int
    seed: int
    dataset: str
    data_dir: str
    alpha: float
    embed_dim: int
    num_experts: int
    top_k: int
    expert_hidden: int
    balance_coef: float
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    neighbors: int
    temperature: float
    sync_every: int
    intra_peer: bool
    chunk_bytes: int
    expert_wire_dtype: DType
    min_peers: int
    round_timeout: float
    peer_timeout: float
    clients_per_round: int
    aggregation: str
    trim_fraction: float
    clip_norm: float
    max_tensor_norm: float
    val_fraction: float
    init: str
    finetune_epochs: int
    min_term_weight: float
    embedding_init: str
    freeze_embedding: bool
    embedding_wire_dtype: DType
    model: str
    model_weights: str
    def __init__(self, run_id: _Optional[str] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., peers: _Optional[int] = ..., rounds: _Optional[int] = ..., seed: _Optional[int] = ..., dataset: _Optional[str] = ..., data_dir: _Optional[str] = ..., alpha: _Optional[float] = ..., embed_dim: _Optional[int] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., expert_hidden: _Optional[int] = ..., balance_coef: _Optional[float] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., neighbors: _Optional[int] = ..., temperature: _Optional[float] = ..., sync_every: _Optional[int] = ..., intra_peer: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., expert_wire_dtype: _Optional[_Union[DType, str]] = ..., min_peers: _Optional[int] = ..., round_timeout: _Optional[float] = ..., peer_timeout: _Optional[float] = ..., clients_per_round: _Optional[int] = ..., aggregation: _Optional[str] = ..., trim_fraction: _Optional[float] = ..., clip_norm: _Optional[float] = ..., max_tensor_norm: _Optional[float] = ..., val_fraction: _Optional[float] = ..., init: _Optional[str] = ..., finetune_epochs: _Optional[int] = ..., min_term_weight: _Optional[float] = ..., embedding_init: _Optional[str] = ..., freeze_embedding: _Optional[bool] = ..., embedding_wire_dtype: _Optional[_Union[DType, str]] = ..., model: _Optional[str] = ..., model_weights: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("index", "advertise", "member_secret", "any_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    ANY_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    advertise: str
    member_secret: str
    any_index: bool
    def __init__(self, index: _Optional[int] = ..., advertise: _Optional[str] = ..., member_secret: _Optional[str] = ..., any_index: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("peer_id", "config", "start_round", "session", "heartbeat_ms", "member_secret", "liveness_port")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    START_ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_SECRET_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_PORT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    config: RunConfig
    start_round: int
    session: str
    heartbeat_ms: int
    member_secret: str
    liveness_port: int
    def __init__(self, peer_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., start_round: _Optional[int] = ..., session: _Optional[str] = ..., heartbeat_ms: _Optional[int] = ..., member_secret: _Optional[str] = ..., liveness_port: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("peer_id", "round", "num_samples")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    num_samples: int
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ...) -> None: ...

class UpdatePart(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("round", "tensors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: int
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[int] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("peer_id", "round")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class PlanTerm(_message.Message):
    __slots__ = ("peer_id", "expert", "weight")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    expert: int
    weight: float
    def __init__(self, peer_id: _Optional[str] = ..., expert: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class PlanRow(_message.Message):
    __slots__ = ("expert", "terms")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    terms: _containers.RepeatedCompositeFieldContainer[PlanTerm]
    def __init__(self, expert: _Optional[int] = ..., terms: _Optional[_Iterable[_Union[PlanTerm, _Mapping]]] = ...) -> None: ...

class PeerAddress(_message.Message):
    __slots__ = ("peer_id", "address", "ticket")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    address: str
    ticket: str
    def __init__(self, peer_id: _Optional[str] = ..., address: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class ServeOrder(_message.Message):
    __slots__ = ("peer_id", "experts", "ticket")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    experts: _containers.RepeatedScalarFieldContainer[int]
    ticket: str
    def __init__(self, peer_id: _Optional[str] = ..., experts: _Optional[_Iterable[int]] = ..., ticket: _Optional[str] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("round", "embedding_version", "sync", "rows", "sources", "serves")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_VERSION_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    SERVES_FIELD_NUMBER: _ClassVar[int]
    round: int
    embedding_version: int
    sync: bool
    rows: _containers.RepeatedCompositeFieldContainer[PlanRow]
    sources: _containers.RepeatedCompositeFieldContainer[PeerAddress]
    serves: _containers.RepeatedCompositeFieldContainer[ServeOrder]
    def __init__(self, round: _Optional[int] = ..., embedding_version: _Optional[int] = ..., sync: _Optional[bool] = ..., rows: _Optional[_Iterable[_Union[PlanRow, _Mapping]]] = ..., sources: _Optional[_Iterable[_Union[PeerAddress, _Mapping]]] = ..., serves: _Optional[_Iterable[_Union[ServeOrder, _Mapping]]] = ...) -> None: ...

class RoundResultPart(_message.Message):
    __slots__ = ("plan", "chunk")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    plan: Plan
    chunk: TensorChunk
    def __init__(self, plan: _Optional[_Union[Plan, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ByteCounts(_message.Message):
    __slots__ = ("coordinator_sent", "coordinator_received", "p2p_sent", "p2p_received")
    COORDINATOR_SENT_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    P2P_SENT_FIELD_NUMBER: _ClassVar[int]
    P2P_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    coordinator_sent: int
    coordinator_received: int
    p2p_sent: int
    p2p_received: int
    def __init__(self, coordinator_sent: _Optional[int] = ..., coordinator_received: _Optional[int] = ..., p2p_sent: _Optional[int] = ..., p2p_received: _Optional[int] = ...) -> None: ...

class MetricsReport(_message.Message):
    __slots__ = ("peer_id", "round", "accuracy", "loss", "global_accuracy", "bytes", "seconds", "train_seconds", "exchange_seconds", "experts_fetched", "num_samples", "wire_measured", "wire_sent", "wire_received", "wire_interfaces", "phase_seconds", "val_accuracy")
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WIRE_MEASURED_FIELD_NUMBER: _ClassVar[int]
    WIRE_SENT_FIELD_NUMBER: _ClassVar[int]
    WIRE_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    WIRE_INTERFACES_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    accuracy: float
    loss: float
    global_accuracy: float
    bytes: ByteCounts
    seconds: float
    train_seconds: float
    exchange_seconds: float
    experts_fetched: int
    num_samples: int
    wire_measured: bool
    wire_sent: int
    wire_received: int
    wire_interfaces: str
    phase_seconds: _containers.ScalarMap[str, float]
    val_accuracy: float
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., global_accuracy: _Optional[float] = ..., bytes: _Optional[_Union[ByteCounts, _Mapping]] = ..., seconds: _Optional[float] = ..., train_seconds: _Optional[float] = ..., exchange_seconds: _Optional[float] = ..., experts_fetched: _Optional[int] = ..., num_samples: _Optional[int] = ..., wire_measured: _Optional[bool] = ..., wire_sent: _Optional[int] = ..., wire_received: _Optional[int] = ..., wire_interfaces: _Optional[str] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., val_accuracy: _Optional[float] = ...) -> None: ...

class MetricsAck(_message.Message):
    __slots__ = ("round", "run_finished")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    round: int
    run_finished: bool
    def __init__(self, round: _Optional[int] = ..., run_finished: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("peer_id", "round")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("open_round", "run_finished", "reported", "left", "liveness_port")
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    RUN_FINISHED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_PORT_FIELD_NUMBER: _ClassVar[int]
    open_round: int
    run_finished: bool
    reported: _containers.RepeatedScalarFieldContainer[str]
    left: _containers.RepeatedScalarFieldContainer[str]
    liveness_port: int
    def __init__(self, open_round: _Optional[int] = ..., run_finished: _Optional[bool] = ..., reported: _Optional[_Iterable[str]] = ..., left: _Optional[_Iterable[str]] = ..., liveness_port: _Optional[int] = ...) -> None: ...

class LatestRequest(_message.Message):
    __slots__ = ("peer_id", "round", "after_round")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    round: int
    after_round: int
    def __init__(self, peer_id: _Optional[str] = ..., round: _Optional[int] = ..., after_round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "algorithm", "rounds", "reported_round", "open_round", "finished", "failure", "peers", "alive_count", "missing_count", "alive", "missing", "coordinator_bytes", "p2p_bytes", "last_accuracy", "last_global_accuracy", "mean_round_seconds", "eta_seconds", "elapsed_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_ROUND_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MISSING_COUNT_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    P2P_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LAST_GLOBAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm: str
    rounds: int
    reported_round: int
    open_round: int
    finished: bool
    failure: str
    peers: int
    alive_count: int
    missing_count: int
    alive: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    coordinator_bytes: int
    p2p_bytes: int
    last_accuracy: float
    last_global_accuracy: float
    mean_round_seconds: float
    eta_seconds: float
    elapsed_seconds: float
    def __init__(self, run_id: _Optional[str] = ..., algorithm: _Optional[str] = ..., rounds: _Optional[int] = ..., reported_round: _Optional[int] = ..., open_round: _Optional[int] = ..., finished: _Optional[bool] = ..., failure: _Optional[str] = ..., peers: _Optional[int] = ..., alive_count: _Optional[int] = ..., missing_count: _Optional[int] = ..., alive: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ..., coordinator_bytes: _Optional[int] = ..., p2p_bytes: _Optional[int] = ..., last_accuracy: _Optional[float] = ..., last_global_accuracy: _Optional[float] = ..., mean_round_seconds: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("requester_id", "round", "experts", "ticket", "source_id")
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    requester_id: str
    round: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    ticket: str
    source_id: str
    def __init__(self, requester_id: _Optional[str] = ..., round: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ..., ticket: _Optional[str] = ..., source_id: _Optional[str] = ...) -> None: ...

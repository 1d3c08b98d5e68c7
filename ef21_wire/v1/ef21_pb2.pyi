from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT64: _ClassVar[ValueType]
    FLOAT32: _ClassVar[ValueType]
FLOAT64: ValueType
FLOAT32: ValueType

class SparseVector(_message.Message):
    __slots__ = ("dim", "indices", "values", "dense", "value_type", "index_bits", "align_values", "align_indices")
    DIM_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    VALUE_TYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_BITS_FIELD_NUMBER: _ClassVar[int]
    ALIGN_VALUES_FIELD_NUMBER: _ClassVar[int]
    ALIGN_INDICES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    indices: bytes
    values: bytes
    dense: bool
    value_type: ValueType
    index_bits: int
    align_values: bytes
    align_indices: bytes
    def __init__(self, dim: _Optional[int] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., dense: _Optional[bool] = ..., value_type: _Optional[_Union[ValueType, str]] = ..., index_bits: _Optional[int] = ..., align_values: _Optional[bytes] = ..., align_indices: _Optional[bytes] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("hostname", "protocol_version")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    protocol_version: int
    def __init__(self, hostname: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "config_json", "workers", "ended", "protocol_version")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config_json: str
    workers: int
    ended: str
    protocol_version: int
    def __init__(self, run_id: _Optional[str] = ..., config_json: _Optional[str] = ..., workers: _Optional[int] = ..., ended: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("run_id", "requested_rank", "hostname", "data_fingerprint", "dim", "n_rows", "objective_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_RANK_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    N_ROWS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    requested_rank: int
    hostname: str
    data_fingerprint: str
    dim: int
    n_rows: int
    objective_id: str
    def __init__(self, run_id: _Optional[str] = ..., requested_rank: _Optional[int] = ..., hostname: _Optional[str] = ..., data_fingerprint: _Optional[str] = ..., dim: _Optional[int] = ..., n_rows: _Optional[int] = ..., objective_id: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("rank", "workers")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    workers: int
    def __init__(self, rank: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class Setup(_message.Message):
    __slots__ = ("rank", "smoothness", "shard_rows", "diagonal", "n_samples", "x0", "power_iteration", "dim", "layout", "buffers", "has_gram", "x0_digest")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SMOOTHNESS_FIELD_NUMBER: _ClassVar[int]
    SHARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIAGONAL_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    POWER_ITERATION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    HAS_GRAM_FIELD_NUMBER: _ClassVar[int]
    X0_DIGEST_FIELD_NUMBER: _ClassVar[int]
    rank: int
    smoothness: float
    shard_rows: int
    diagonal: bytes
    n_samples: int
    x0: SparseVector
    power_iteration: bool
    dim: int
    layout: str
    buffers: SparseVector
    has_gram: bool
    x0_digest: bytes
    def __init__(self, rank: _Optional[int] = ..., smoothness: _Optional[float] = ..., shard_rows: _Optional[int] = ..., diagonal: _Optional[bytes] = ..., n_samples: _Optional[int] = ..., x0: _Optional[_Union[SparseVector, _Mapping]] = ..., power_iteration: _Optional[bool] = ..., dim: _Optional[int] = ..., layout: _Optional[str] = ..., buffers: _Optional[_Union[SparseVector, _Mapping]] = ..., has_gram: _Optional[bool] = ..., x0_digest: _Optional[bytes] = ...) -> None: ...

class GramRequest(_message.Message):
    __slots__ = ("attempt",)
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    def __init__(self, attempt: _Optional[int] = ...) -> None: ...

class GramReply(_message.Message):
    __slots__ = ("gram", "attempt")
    GRAM_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    gram: bytes
    attempt: int
    def __init__(self, gram: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class NamedVector(_message.Message):
    __slots__ = ("name", "vector")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    vector: SparseVector
    def __init__(self, name: _Optional[str] = ..., vector: _Optional[_Union[SparseVector, _Mapping]] = ...) -> None: ...

class Leave(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PowerStep(_message.Message):
    __slots__ = ("iteration", "v", "attempt")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    v: SparseVector
    attempt: int
    def __init__(self, iteration: _Optional[int] = ..., v: _Optional[_Union[SparseVector, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class PowerReply(_message.Message):
    __slots__ = ("iteration", "w", "attempt")
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    iteration: int
    w: SparseVector
    attempt: int
    def __init__(self, iteration: _Optional[int] = ..., w: _Optional[_Union[SparseVector, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("gamma", "x_step", "x", "constants_json", "checksum_every", "eval_every", "round", "g", "worker_state", "momentum", "weight", "page_p", "state", "x_is_own_x0", "included_through")
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    X_STEP_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    WORKER_STATE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PAGE_P_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    X_IS_OWN_X0_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    gamma: float
    x_step: float
    x: SparseVector
    constants_json: str
    checksum_every: int
    eval_every: int
    round: int
    g: SparseVector
    worker_state: SparseVector
    momentum: SparseVector
    weight: float
    page_p: float
    state: _containers.RepeatedCompositeFieldContainer[NamedVector]
    x_is_own_x0: bool
    included_through: int
    def __init__(self, gamma: _Optional[float] = ..., x_step: _Optional[float] = ..., x: _Optional[_Union[SparseVector, _Mapping]] = ..., constants_json: _Optional[str] = ..., checksum_every: _Optional[int] = ..., eval_every: _Optional[int] = ..., round: _Optional[int] = ..., g: _Optional[_Union[SparseVector, _Mapping]] = ..., worker_state: _Optional[_Union[SparseVector, _Mapping]] = ..., momentum: _Optional[_Union[SparseVector, _Mapping]] = ..., weight: _Optional[float] = ..., page_p: _Optional[float] = ..., state: _Optional[_Iterable[_Union[NamedVector, _Mapping]]] = ..., x_is_own_x0: _Optional[bool] = ..., included_through: _Optional[int] = ...) -> None: ...

class Covered(_message.Message):
    __slots__ = ("rank", "entries", "dense")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    entries: int
    dense: bool
    def __init__(self, rank: _Optional[int] = ..., entries: _Optional[int] = ..., dense: _Optional[bool] = ...) -> None: ...

class Update(_message.Message):
    __slots__ = ("round", "message", "replace", "buffers", "covers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    COVERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    message: SparseVector
    replace: bool
    buffers: SparseVector
    covers: _containers.RepeatedCompositeFieldContainer[Covered]
    def __init__(self, round: _Optional[int] = ..., message: _Optional[_Union[SparseVector, _Mapping]] = ..., replace: _Optional[bool] = ..., buffers: _Optional[_Union[SparseVector, _Mapping]] = ..., covers: _Optional[_Iterable[_Union[Covered, _Mapping]]] = ...) -> None: ...

class Eval(_message.Message):
    __slots__ = ("round", "grad", "f", "distortion", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    DISTORTION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    grad: SparseVector
    f: float
    distortion: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., grad: _Optional[_Union[SparseVector, _Mapping]] = ..., f: _Optional[float] = ..., distortion: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("round", "aggregate", "replace", "scale", "checksum", "missing", "buffers")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    round: int
    aggregate: SparseVector
    replace: bool
    scale: float
    checksum: bytes
    missing: _containers.RepeatedScalarFieldContainer[int]
    buffers: SparseVector
    def __init__(self, round: _Optional[int] = ..., aggregate: _Optional[_Union[SparseVector, _Mapping]] = ..., replace: _Optional[bool] = ..., scale: _Optional[float] = ..., checksum: _Optional[bytes] = ..., missing: _Optional[_Iterable[int]] = ..., buffers: _Optional[_Union[SparseVector, _Mapping]] = ...) -> None: ...

class Resync(_message.Message):
    __slots__ = ("round", "x", "g", "momentum", "state")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    x: SparseVector
    g: SparseVector
    momentum: SparseVector
    state: _containers.RepeatedCompositeFieldContainer[NamedVector]
    def __init__(self, round: _Optional[int] = ..., x: _Optional[_Union[SparseVector, _Mapping]] = ..., g: _Optional[_Union[SparseVector, _Mapping]] = ..., momentum: _Optional[_Union[SparseVector, _Mapping]] = ..., state: _Optional[_Iterable[_Union[NamedVector, _Mapping]]] = ...) -> None: ...

class Stop(_message.Message):
    __slots__ = ("reason", "failed")
    REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    reason: str
    failed: bool
    def __init__(self, reason: _Optional[str] = ..., failed: _Optional[bool] = ...) -> None: ...

class ResyncRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "setup", "update", "eval", "resync_request", "power_reply", "leave", "gram_reply")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    RESYNC_REQUEST_FIELD_NUMBER: _ClassVar[int]
    POWER_REPLY_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    GRAM_REPLY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    setup: Setup
    update: Update
    eval: Eval
    resync_request: ResyncRequest
    power_reply: PowerReply
    leave: Leave
    gram_reply: GramReply
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., setup: _Optional[_Union[Setup, _Mapping]] = ..., update: _Optional[_Union[Update, _Mapping]] = ..., eval: _Optional[_Union[Eval, _Mapping]] = ..., resync_request: _Optional[_Union[ResyncRequest, _Mapping]] = ..., power_reply: _Optional[_Union[PowerReply, _Mapping]] = ..., leave: _Optional[_Union[Leave, _Mapping]] = ..., gram_reply: _Optional[_Union[GramReply, _Mapping]] = ...) -> None: ...

class MasterMessage(_message.Message):
    __slots__ = ("welcome", "start", "round_result", "stop", "resync", "power_step", "gram_request")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    ROUND_RESULT_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    POWER_STEP_FIELD_NUMBER: _ClassVar[int]
    GRAM_REQUEST_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    start: Start
    round_result: RoundResult
    stop: Stop
    resync: Resync
    power_step: PowerStep
    gram_request: GramRequest
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., start: _Optional[_Union[Start, _Mapping]] = ..., round_result: _Optional[_Union[RoundResult, _Mapping]] = ..., stop: _Optional[_Union[Stop, _Mapping]] = ..., resync: _Optional[_Union[Resync, _Mapping]] = ..., power_step: _Optional[_Union[PowerStep, _Mapping]] = ..., gram_request: _Optional[_Union[GramRequest, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

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
    FP32: _ClassVar[DType]
    FP16: _ClassVar[DType]
    BF16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT64: _ClassVar[DType]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    TRAIN: _ClassVar[Mode]
    GENERATE: _ClassVar[Mode]

class FederationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEDERATION_MODE_UNSPECIFIED: _ClassVar[FederationMode]
    SEQUENTIAL: _ClassVar[FederationMode]
    CLIENT_BATCH: _ClassVar[FederationMode]
    SERVER_HIERARCHICAL: _ClassVar[FederationMode]
DTYPE_UNSPECIFIED: DType
FP32: DType
FP16: DType
BF16: DType
INT8: DType
INT64: DType
MODE_UNSPECIFIED: Mode
TRAIN: Mode
GENERATE: Mode
FEDERATION_MODE_UNSPECIFIED: FederationMode
SEQUENTIAL: FederationMode
CLIENT_BATCH: FederationMode
SERVER_HIERARCHICAL: FederationMode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scales")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("seq", "open", "forward", "backward", "step", "close", "fetch_adapter", "put_adapter")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    FETCH_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PUT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    open: OpenSession
    forward: Forward
    backward: Backward
    step: OptimizerStep
    close: Close
    fetch_adapter: FetchAdapter
    put_adapter: PutAdapter
    def __init__(self, seq: _Optional[int] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., forward: _Optional[_Union[Forward, _Mapping]] = ..., backward: _Optional[_Union[Backward, _Mapping]] = ..., step: _Optional[_Union[OptimizerStep, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., fetch_adapter: _Optional[_Union[FetchAdapter, _Mapping]] = ..., put_adapter: _Optional[_Union[PutAdapter, _Mapping]] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "seed")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_fingerprint", "span_start", "span_end", "mode", "max_length", "wire_dtype", "lora", "learning_rate", "weight_decay", "resume_session_id", "max_batch_size", "run_id", "resume_steps", "warmup_steps")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPAN_START_FIELD_NUMBER: _ClassVar[int]
    SPAN_END_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEPS_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    span_start: int
    span_end: int
    mode: Mode
    max_length: int
    wire_dtype: DType
    lora: LoraConfig
    learning_rate: float
    weight_decay: float
    resume_session_id: str
    max_batch_size: int
    run_id: str
    resume_steps: _containers.RepeatedScalarFieldContainer[int]
    warmup_steps: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., span_start: _Optional[int] = ..., span_end: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., max_length: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., resume_session_id: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., run_id: _Optional[str] = ..., resume_steps: _Optional[_Iterable[int]] = ..., warmup_steps: _Optional[int] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("step_id", "hidden", "pad_lengths", "position_offset", "use_cache", "keep_graph")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    PAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    USE_CACHE_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    pad_lengths: _containers.RepeatedScalarFieldContainer[int]
    position_offset: int
    use_cache: bool
    keep_graph: bool
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., pad_lengths: _Optional[_Iterable[int]] = ..., position_offset: _Optional[int] = ..., use_cache: _Optional[bool] = ..., keep_graph: _Optional[bool] = ...) -> None: ...

class Backward(_message.Message):
    __slots__ = ("step_id", "grad", "loss_weight")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    LOSS_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    grad: Tensor
    loss_weight: float
    def __init__(self, step_id: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., loss_weight: _Optional[float] = ...) -> None: ...

class OptimizerStep(_message.Message):
    __slots__ = ("step_id", "grad_clip_norm", "checkpoint")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    grad_clip_norm: float
    checkpoint: bool
    def __init__(self, step_id: _Optional[int] = ..., grad_clip_norm: _Optional[float] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchAdapter(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutAdapter(_message.Message):
    __slots__ = ("lora", "tensors")
    LORA_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    lora: LoraConfig
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class AdapterState(_message.Message):
    __slots__ = ("lora", "tensors")
    LORA_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    lora: LoraConfig
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("seq", "opened", "forward_result", "backward_result", "step_done", "error", "adapter")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_RESULT_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_RESULT_FIELD_NUMBER: _ClassVar[int]
    STEP_DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    seq: int
    opened: SessionOpened
    forward_result: ForwardResult
    backward_result: BackwardResult
    step_done: StepDone
    error: Error
    adapter: AdapterState
    def __init__(self, seq: _Optional[int] = ..., opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., forward_result: _Optional[_Union[ForwardResult, _Mapping]] = ..., backward_result: _Optional[_Union[BackwardResult, _Mapping]] = ..., step_done: _Optional[_Union[StepDone, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., adapter: _Optional[_Union[AdapterState, _Mapping]] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "span_start", "span_end", "info", "resumed", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_START_FIELD_NUMBER: _ClassVar[int]
    SPAN_END_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    span_start: int
    span_end: int
    info: InfoReply
    resumed: bool
    step: int
    def __init__(self, session_id: _Optional[str] = ..., span_start: _Optional[int] = ..., span_end: _Optional[int] = ..., info: _Optional[_Union[InfoReply, _Mapping]] = ..., resumed: _Optional[bool] = ..., step: _Optional[int] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("step_id", "hidden")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardResult(_message.Message):
    __slots__ = ("step_id", "grad")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    grad: Tensor
    def __init__(self, step_id: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StepDone(_message.Message):
    __slots__ = ("step_id", "stats")
    class StatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    stats: _containers.ScalarMap[str, float]
    def __init__(self, step_id: _Optional[int] = ..., stats: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("model_fingerprint", "model_name", "held_start", "held_end", "hidden_size", "num_layers", "wire_dtypes", "modes", "max_message_bytes", "protocol_version", "federation_mode", "sync_every", "fedavg_every")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    HELD_START_FIELD_NUMBER: _ClassVar[int]
    HELD_END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MODES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_MODE_FIELD_NUMBER: _ClassVar[int]
    SYNC_EVERY_FIELD_NUMBER: _ClassVar[int]
    FEDAVG_EVERY_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    model_name: str
    held_start: int
    held_end: int
    hidden_size: int
    num_layers: int
    wire_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    modes: _containers.RepeatedScalarFieldContainer[Mode]
    max_message_bytes: int
    protocol_version: int
    federation_mode: FederationMode
    sync_every: int
    fedavg_every: int
    def __init__(self, model_fingerprint: _Optional[str] = ..., model_name: _Optional[str] = ..., held_start: _Optional[int] = ..., held_end: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., wire_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., modes: _Optional[_Iterable[_Union[Mode, str]]] = ..., max_message_bytes: _Optional[int] = ..., protocol_version: _Optional[int] = ..., federation_mode: _Optional[_Union[FederationMode, str]] = ..., sync_every: _Optional[int] = ..., fedavg_every: _Optional[int] = ...) -> None: ...

class AdapterUpload(_message.Message):
    __slots__ = ("round", "client_id", "num_examples", "tensors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_id: str
    num_examples: int
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, round: _Optional[int] = ..., client_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class AdapterReply(_message.Message):
    __slots__ = ("round", "tensors", "num_clients")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    num_clients: int
    def __init__(self, round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., num_clients: _Optional[int] = ...) -> None: ...

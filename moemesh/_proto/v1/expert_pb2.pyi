from moemesh._proto.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_FORMAT_UNSPECIFIED: _ClassVar[TokenFormat]
    TOKEN_FORMAT_BF16: _ClassVar[TokenFormat]
    TOKEN_FORMAT_FP8_E4M3_BLOCK128: _ClassVar[TokenFormat]
    TOKEN_FORMAT_NVFP4: _ClassVar[TokenFormat]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_HIDDEN: _ClassVar[PayloadKind]
    PAYLOAD_KIND_HIDDEN_SCALES: _ClassVar[PayloadKind]
    PAYLOAD_KIND_EXPERT_IDS: _ClassVar[PayloadKind]
    PAYLOAD_KIND_ROUTING_WEIGHTS: _ClassVar[PayloadKind]
    PAYLOAD_KIND_OUTPUT: _ClassVar[PayloadKind]

class PlacementPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_PHASE_UNSPECIFIED: _ClassVar[PlacementPhase]
    PLACEMENT_PHASE_PREPARE: _ClassVar[PlacementPhase]
    PLACEMENT_PHASE_COMMIT: _ClassVar[PlacementPhase]
TOKEN_FORMAT_UNSPECIFIED: TokenFormat
TOKEN_FORMAT_BF16: TokenFormat
TOKEN_FORMAT_FP8_E4M3_BLOCK128: TokenFormat
TOKEN_FORMAT_NVFP4: TokenFormat
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_HIDDEN: PayloadKind
PAYLOAD_KIND_HIDDEN_SCALES: PayloadKind
PAYLOAD_KIND_EXPERT_IDS: PayloadKind
PAYLOAD_KIND_ROUTING_WEIGHTS: PayloadKind
PAYLOAD_KIND_OUTPUT: PayloadKind
PLACEMENT_PHASE_UNSPECIFIED: PlacementPhase
PLACEMENT_PHASE_PREPARE: PlacementPhase
PLACEMENT_PHASE_COMMIT: PlacementPhase

class PayloadSpec(_message.Message):
    __slots__ = ("kind", "num_bytes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: PayloadKind
    num_bytes: int
    def __init__(self, kind: _Optional[_Union[PayloadKind, str]] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class ExpertBatchHeader(_message.Message):
    __slots__ = ("micro_batch_id", "layer", "num_tokens", "hidden_size", "top_k", "token_format", "payloads", "traceparent", "placement_epoch", "unweighted", "layer_slots")
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    UNWEIGHTED_FIELD_NUMBER: _ClassVar[int]
    LAYER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    micro_batch_id: int
    layer: int
    num_tokens: int
    hidden_size: int
    top_k: int
    token_format: TokenFormat
    payloads: _containers.RepeatedCompositeFieldContainer[PayloadSpec]
    traceparent: str
    placement_epoch: int
    unweighted: bool
    layer_slots: int
    def __init__(self, micro_batch_id: _Optional[int] = ..., layer: _Optional[int] = ..., num_tokens: _Optional[int] = ..., hidden_size: _Optional[int] = ..., top_k: _Optional[int] = ..., token_format: _Optional[_Union[TokenFormat, str]] = ..., payloads: _Optional[_Iterable[_Union[PayloadSpec, _Mapping]]] = ..., traceparent: _Optional[str] = ..., placement_epoch: _Optional[int] = ..., unweighted: _Optional[bool] = ..., layer_slots: _Optional[int] = ...) -> None: ...

class ExpertResultHeader(_message.Message):
    __slots__ = ("micro_batch_id", "layer", "num_tokens", "payloads", "error", "error_code", "unweighted")
    MICRO_BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    UNWEIGHTED_FIELD_NUMBER: _ClassVar[int]
    micro_batch_id: int
    layer: int
    num_tokens: int
    payloads: _containers.RepeatedCompositeFieldContainer[PayloadSpec]
    error: str
    error_code: int
    unweighted: bool
    def __init__(self, micro_batch_id: _Optional[int] = ..., layer: _Optional[int] = ..., num_tokens: _Optional[int] = ..., payloads: _Optional[_Iterable[_Union[PayloadSpec, _Mapping]]] = ..., error: _Optional[str] = ..., error_code: _Optional[int] = ..., unweighted: _Optional[bool] = ...) -> None: ...

class ExpertBatch(_message.Message):
    __slots__ = ("header", "payloads")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    header: ExpertBatchHeader
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, header: _Optional[_Union[ExpertBatchHeader, _Mapping]] = ..., payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ExpertResult(_message.Message):
    __slots__ = ("header", "payloads")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    header: ExpertResultHeader
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, header: _Optional[_Union[ExpertResultHeader, _Mapping]] = ..., payloads: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("layer", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DescribeExpertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeExpertsResponse(_message.Message):
    __slots__ = ("worker_id", "fingerprint", "placements", "token_formats", "ucx_address", "num_routed_experts", "placement_epoch")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FORMATS_FIELD_NUMBER: _ClassVar[int]
    UCX_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUTED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    fingerprint: _worker_pb2.Fingerprint
    placements: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    token_formats: _containers.RepeatedScalarFieldContainer[TokenFormat]
    ucx_address: str
    num_routed_experts: int
    placement_epoch: int
    def __init__(self, worker_id: _Optional[str] = ..., fingerprint: _Optional[_Union[_worker_pb2.Fingerprint, _Mapping]] = ..., placements: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., token_formats: _Optional[_Iterable[_Union[TokenFormat, str]]] = ..., ucx_address: _Optional[str] = ..., num_routed_experts: _Optional[int] = ..., placement_epoch: _Optional[int] = ...) -> None: ...

class SetExpertsRequest(_message.Message):
    __slots__ = ("phase", "expert_ids")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    phase: PlacementPhase
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, phase: _Optional[_Union[PlacementPhase, str]] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("dry_run", "slots_per_worker")
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    dry_run: bool
    slots_per_worker: int
    def __init__(self, dry_run: _Optional[bool] = ..., slots_per_worker: _Optional[int] = ...) -> None: ...

class WorkerExperts(_message.Message):
    __slots__ = ("worker_id", "expert_ids", "load")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    load: float
    def __init__(self, worker_id: _Optional[str] = ..., expert_ids: _Optional[_Iterable[int]] = ..., load: _Optional[float] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("expert_load", "before", "after", "balance_before", "balance_after", "applied", "experts_loaded")
    EXPERT_LOAD_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_LOADED_FIELD_NUMBER: _ClassVar[int]
    expert_load: _containers.RepeatedScalarFieldContainer[int]
    before: _containers.RepeatedCompositeFieldContainer[WorkerExperts]
    after: _containers.RepeatedCompositeFieldContainer[WorkerExperts]
    balance_before: float
    balance_after: float
    applied: bool
    experts_loaded: int
    def __init__(self, expert_load: _Optional[_Iterable[int]] = ..., before: _Optional[_Iterable[_Union[WorkerExperts, _Mapping]]] = ..., after: _Optional[_Iterable[_Union[WorkerExperts, _Mapping]]] = ..., balance_before: _Optional[float] = ..., balance_after: _Optional[float] = ..., applied: _Optional[bool] = ..., experts_loaded: _Optional[int] = ...) -> None: ...

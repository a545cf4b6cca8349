from pdserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillPeer(_message.Message):
    __slots__ = ("worker_id", "grpc_address", "kv_agent")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_AGENT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    grpc_address: str
    kv_agent: str
    def __init__(self, worker_id: _Optional[str] = ..., grpc_address: _Optional[str] = ..., kv_agent: _Optional[str] = ...) -> None: ...

class WorkerGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "prefill_peers", "adapter", "local_prefill_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PEERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    prefill_peers: _containers.RepeatedCompositeFieldContainer[PrefillPeer]
    adapter: str
    local_prefill_reason: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prefill_peers: _Optional[_Iterable[_Union[PrefillPeer, _Mapping]]] = ..., adapter: _Optional[str] = ..., local_prefill_reason: _Optional[str] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AdapterResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerGenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "finish_reason", "num_prompt_tokens", "num_cached_tokens", "logprobs", "first_token_seconds", "prefill_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    first_token_seconds: float
    prefill_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprob, _Mapping]]] = ..., first_token_seconds: _Optional[float] = ..., prefill_worker_id: _Optional[str] = ...) -> None: ...

class RemotePrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "decode_kv_agent", "decode_kv_handshake", "block_ids", "num_cached_tokens", "decode_kv_incarnation", "prefill_worker_id", "issued_at_unix", "grant_signature", "adapter")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DECODE_KV_AGENT_FIELD_NUMBER: _ClassVar[int]
    DECODE_KV_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_KV_INCARNATION_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    GRANT_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    decode_kv_agent: str
    decode_kv_handshake: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    decode_kv_incarnation: str
    prefill_worker_id: str
    issued_at_unix: float
    grant_signature: bytes
    adapter: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., decode_kv_agent: _Optional[str] = ..., decode_kv_handshake: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., decode_kv_incarnation: _Optional[str] = ..., prefill_worker_id: _Optional[str] = ..., issued_at_unix: _Optional[float] = ..., grant_signature: _Optional[bytes] = ..., adapter: _Optional[str] = ...) -> None: ...

class RemotePrefillResponse(_message.Message):
    __slots__ = ("status", "error", "first_token_id", "num_blocks_sent", "num_bytes_sent", "num_cached_tokens", "compute_seconds", "tail_seconds", "transfer_seconds", "write_seconds", "handover_seconds")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[RemotePrefillResponse.Status]
        DONE: _ClassVar[RemotePrefillResponse.Status]
        ABORTED: _ClassVar[RemotePrefillResponse.Status]
        FAILED: _ClassVar[RemotePrefillResponse.Status]
        INCOMPATIBLE: _ClassVar[RemotePrefillResponse.Status]
        INVALID: _ClassVar[RemotePrefillResponse.Status]
    STATUS_UNSPECIFIED: RemotePrefillResponse.Status
    DONE: RemotePrefillResponse.Status
    ABORTED: RemotePrefillResponse.Status
    FAILED: RemotePrefillResponse.Status
    INCOMPATIBLE: RemotePrefillResponse.Status
    INVALID: RemotePrefillResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAIL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HANDOVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    status: RemotePrefillResponse.Status
    error: str
    first_token_id: int
    num_blocks_sent: int
    num_bytes_sent: int
    num_cached_tokens: int
    compute_seconds: float
    tail_seconds: float
    transfer_seconds: float
    write_seconds: float
    handover_seconds: float
    def __init__(self, status: _Optional[_Union[RemotePrefillResponse.Status, str]] = ..., error: _Optional[str] = ..., first_token_id: _Optional[int] = ..., num_blocks_sent: _Optional[int] = ..., num_bytes_sent: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., tail_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., write_seconds: _Optional[float] = ..., handover_seconds: _Optional[float] = ...) -> None: ...

class AbortRemotePrefillRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortRemotePrefillResponse(_message.Message):
    __slots__ = ("found", "quiesced")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    QUIESCED_FIELD_NUMBER: _ClassVar[int]
    found: bool
    quiesced: bool
    def __init__(self, found: _Optional[bool] = ..., quiesced: _Optional[bool] = ...) -> None: ...

class DebugRequest(_message.Message):
    __slots__ = ("poison_free_blocks", "kv_delay_seconds")
    POISON_FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    poison_free_blocks: bool
    kv_delay_seconds: float
    def __init__(self, poison_free_blocks: _Optional[bool] = ..., kv_delay_seconds: _Optional[float] = ...) -> None: ...

class DebugResponse(_message.Message):
    __slots__ = ("poisoned_blocks",)
    POISONED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    poisoned_blocks: int
    def __init__(self, poisoned_blocks: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker_id", "role", "draining", "running", "waiting", "kv_blocks_free", "kv_blocks_used", "kv_blocks_cached", "kv_blocks_total", "tokens_computed_total", "steps_total", "last_step_seconds", "inflight_streams", "kv_peers", "kv_peer_errors", "prefills_local", "prefills_remote", "remote_reservations", "remote_prefills_active", "remote_prefills_sending")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_COMPUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    KV_PEERS_FIELD_NUMBER: _ClassVar[int]
    KV_PEER_ERRORS_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_LOCAL_FIELD_NUMBER: _ClassVar[int]
    PREFILLS_REMOTE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILLS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILLS_SENDING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    draining: bool
    running: int
    waiting: int
    kv_blocks_free: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_total: int
    tokens_computed_total: int
    steps_total: int
    last_step_seconds: float
    inflight_streams: int
    kv_peers: int
    kv_peer_errors: _containers.RepeatedScalarFieldContainer[str]
    prefills_local: int
    prefills_remote: int
    remote_reservations: int
    remote_prefills_active: int
    remote_prefills_sending: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., draining: _Optional[bool] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_cached: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., tokens_computed_total: _Optional[int] = ..., steps_total: _Optional[int] = ..., last_step_seconds: _Optional[float] = ..., inflight_streams: _Optional[int] = ..., kv_peers: _Optional[int] = ..., kv_peer_errors: _Optional[_Iterable[str]] = ..., prefills_local: _Optional[int] = ..., prefills_remote: _Optional[int] = ..., remote_reservations: _Optional[int] = ..., remote_prefills_active: _Optional[int] = ..., remote_prefills_sending: _Optional[int] = ...) -> None: ...

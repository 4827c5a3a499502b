from common.pb import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkItem(_message.Message):
    __slots__ = ("link_request_id", "request", "deadline_unix_ms", "trace_context")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LINK_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    link_request_id: str
    request: _generate_pb2.GenerateRequest
    deadline_unix_ms: int
    trace_context: _containers.ScalarMap[str, str]
    def __init__(self, link_request_id: _Optional[str] = ..., request: _Optional[_Union[_generate_pb2.GenerateRequest, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SubmitBatch(_message.Message):
    __slots__ = ("batch_id", "items")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    items: _containers.RepeatedCompositeFieldContainer[WorkItem]
    def __init__(self, batch_id: _Optional[int] = ..., items: _Optional[_Iterable[_Union[WorkItem, _Mapping]]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("link_request_ids", "reason")
    LINK_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    link_request_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, link_request_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class RouterMessage(_message.Message):
    __slots__ = ("submit_batch", "cancel")
    SUBMIT_BATCH_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    submit_batch: SubmitBatch
    cancel: Cancel
    def __init__(self, submit_batch: _Optional[_Union[SubmitBatch, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class SequenceDelta(_message.Message):
    __slots__ = ("link_request_id", "tokens", "text")
    LINK_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    link_request_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[_generate_pb2.Token]
    text: str
    def __init__(self, link_request_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[_generate_pb2.Token, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...

class StepEvents(_message.Message):
    __slots__ = ("step", "deltas")
    STEP_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    step: int
    deltas: _containers.RepeatedCompositeFieldContainer[SequenceDelta]
    def __init__(self, step: _Optional[int] = ..., deltas: _Optional[_Iterable[_Union[SequenceDelta, _Mapping]]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("link_request_id", "finish_reason", "usage")
    LINK_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    link_request_id: str
    finish_reason: _generate_pb2.FinishReason
    usage: _generate_pb2.Usage
    def __init__(self, link_request_id: _Optional[str] = ..., finish_reason: _Optional[_Union[_generate_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_generate_pb2.Usage, _Mapping]] = ...) -> None: ...

class Rejected(_message.Message):
    __slots__ = ("link_request_id", "code", "message", "retryable")
    LINK_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    link_request_id: str
    code: int
    message: str
    retryable: bool
    def __init__(self, link_request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class Load(_message.Message):
    __slots__ = ("queued", "running", "free_kv_tokens", "max_kv_tokens", "loaded_adapters", "queued_tokens", "running_tokens", "finished_total", "generated_tokens_total", "steps_total", "draining", "batches_received", "requests_received")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOADED_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    running: int
    free_kv_tokens: int
    max_kv_tokens: int
    loaded_adapters: _containers.RepeatedScalarFieldContainer[str]
    queued_tokens: int
    running_tokens: int
    finished_total: int
    generated_tokens_total: int
    steps_total: int
    draining: bool
    batches_received: int
    requests_received: int
    def __init__(self, queued: _Optional[int] = ..., running: _Optional[int] = ..., free_kv_tokens: _Optional[int] = ..., max_kv_tokens: _Optional[int] = ..., loaded_adapters: _Optional[_Iterable[str]] = ..., queued_tokens: _Optional[int] = ..., running_tokens: _Optional[int] = ..., finished_total: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., steps_total: _Optional[int] = ..., draining: _Optional[bool] = ..., batches_received: _Optional[int] = ..., requests_received: _Optional[int] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("step_events", "finished", "rejected", "load")
    STEP_EVENTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    step_events: StepEvents
    finished: Finished
    rejected: Rejected
    load: Load
    def __init__(self, step_events: _Optional[_Union[StepEvents, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., rejected: _Optional[_Union[Rejected, _Mapping]] = ..., load: _Optional[_Union[Load, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "models", "adapters", "max_running", "max_kv_tokens", "max_queue", "device", "dtype", "version", "max_context_tokens", "max_new_tokens_limit", "load", "supports_constraints", "weights")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SUPPORTS_CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    models: _containers.RepeatedScalarFieldContainer[str]
    adapters: _containers.RepeatedScalarFieldContainer[str]
    max_running: int
    max_kv_tokens: int
    max_queue: int
    device: str
    dtype: str
    version: str
    max_context_tokens: int
    max_new_tokens_limit: int
    load: Load
    supports_constraints: bool
    weights: str
    def __init__(self, worker_id: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., adapters: _Optional[_Iterable[str]] = ..., max_running: _Optional[int] = ..., max_kv_tokens: _Optional[int] = ..., max_queue: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., version: _Optional[str] = ..., max_context_tokens: _Optional[int] = ..., max_new_tokens_limit: _Optional[int] = ..., load: _Optional[_Union[Load, _Mapping]] = ..., supports_constraints: _Optional[bool] = ..., weights: _Optional[str] = ...) -> None: ...

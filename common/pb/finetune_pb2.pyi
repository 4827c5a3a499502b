from common.pb import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    LORA: _ClassVar[Method]
    FULL: _ClassVar[Method]
    PROMPT_TUNING: _ClassVar[Method]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
METHOD_UNSPECIFIED: Method
LORA: Method
FULL: Method
PROMPT_TUNING: Method
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState

class Example(_message.Message):
    __slots__ = ("prompt", "completion", "messages", "text")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    messages: _containers.RepeatedCompositeFieldContainer[_generate_pb2.ChatMessage]
    text: str
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_generate_pb2.ChatMessage, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("epochs", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "eval_fraction", "seed", "checkpoint_every_steps", "num_virtual_tokens", "max_steps", "drop_invalid")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORA_R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    EVAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    DROP_INVALID_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    learning_rate: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    batch_size: int
    gradient_accumulation_steps: int
    max_seq_length: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: _containers.RepeatedScalarFieldContainer[str]
    eval_fraction: float
    seed: int
    checkpoint_every_steps: int
    num_virtual_tokens: int
    max_steps: int
    drop_invalid: bool
    def __init__(self, epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_scheduler: _Optional[str] = ..., warmup_ratio: _Optional[float] = ..., weight_decay: _Optional[float] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_seq_length: _Optional[int] = ..., lora_r: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., eval_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., num_virtual_tokens: _Optional[int] = ..., max_steps: _Optional[int] = ..., drop_invalid: _Optional[bool] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("base_model", "method", "output_name", "examples", "dataset_name", "dataset_jsonl", "hyperparameters", "client_token")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_JSONL_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    method: Method
    output_name: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    dataset_name: str
    dataset_jsonl: str
    hyperparameters: Hyperparameters
    client_token: str
    def __init__(self, base_model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., output_name: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., dataset_name: _Optional[str] = ..., dataset_jsonl: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., client_token: _Optional[str] = ...) -> None: ...

class EvalResult(_message.Message):
    __slots__ = ("stage", "eval_loss", "perplexity", "step")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    stage: str
    eval_loss: float
    perplexity: float
    step: int
    def __init__(self, stage: _Optional[str] = ..., eval_loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., step: _Optional[int] = ...) -> None: ...

class TrainMetrics(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "loss", "learning_rate", "tokens_per_second")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step", "path")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "version", "ref", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    ref: str
    sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., ref: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class StateChange(_message.Message):
    __slots__ = ("state", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    message: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "base_model", "method", "output_name", "hyperparameters", "created_unix_ms", "started_unix_ms", "finished_unix_ms", "error", "artifact", "latest_metrics", "eval_before", "eval_after", "worker_id", "client_token", "trace_id", "train_examples", "eval_examples")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVAL_AFTER_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    base_model: str
    method: Method
    output_name: str
    hyperparameters: Hyperparameters
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    error: str
    artifact: Artifact
    latest_metrics: TrainMetrics
    eval_before: EvalResult
    eval_after: EvalResult
    worker_id: str
    client_token: str
    trace_id: str
    train_examples: int
    eval_examples: int
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., base_model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., output_name: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., created_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., error: _Optional[str] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., latest_metrics: _Optional[_Union[TrainMetrics, _Mapping]] = ..., eval_before: _Optional[_Union[EvalResult, _Mapping]] = ..., eval_after: _Optional[_Union[EvalResult, _Mapping]] = ..., worker_id: _Optional[str] = ..., client_token: _Optional[str] = ..., trace_id: _Optional[str] = ..., train_examples: _Optional[int] = ..., eval_examples: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    limit: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "from_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "sequence", "time_unix_ms", "state_change", "metrics", "evaluation", "checkpoint", "artifact", "log")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    sequence: int
    time_unix_ms: int
    state_change: StateChange
    metrics: TrainMetrics
    evaluation: EvalResult
    checkpoint: Checkpoint
    artifact: Artifact
    log: str
    def __init__(self, job_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., state_change: _Optional[_Union[StateChange, _Mapping]] = ..., metrics: _Optional[_Union[TrainMetrics, _Mapping]] = ..., evaluation: _Optional[_Union[EvalResult, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., log: _Optional[str] = ...) -> None: ...

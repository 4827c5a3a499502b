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
    BOTTLENECK: _ClassVar[Method]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class SweepStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SWEEP_STRATEGY_UNSPECIFIED: _ClassVar[SweepStrategy]
    GRID: _ClassVar[SweepStrategy]
    RANDOM: _ClassVar[SweepStrategy]
    TPE: _ClassVar[SweepStrategy]
METHOD_UNSPECIFIED: Method
LORA: Method
FULL: Method
PROMPT_TUNING: Method
BOTTLENECK: Method
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
SWEEP_STRATEGY_UNSPECIFIED: SweepStrategy
GRID: SweepStrategy
RANDOM: SweepStrategy
TPE: SweepStrategy

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
    __slots__ = ("epochs", "learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "eval_fraction", "seed", "checkpoint_every_steps", "num_virtual_tokens", "max_steps", "drop_invalid", "bottleneck_size", "bottleneck_placement")
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
    BOTTLENECK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BOTTLENECK_PLACEMENT_FIELD_NUMBER: _ClassVar[int]
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
    bottleneck_size: int
    bottleneck_placement: str
    def __init__(self, epochs: _Optional[int] = ..., learning_rate: _Optional[float] = ..., lr_scheduler: _Optional[str] = ..., warmup_ratio: _Optional[float] = ..., weight_decay: _Optional[float] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_seq_length: _Optional[int] = ..., lora_r: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_target_modules: _Optional[_Iterable[str]] = ..., eval_fraction: _Optional[float] = ..., seed: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., num_virtual_tokens: _Optional[int] = ..., max_steps: _Optional[int] = ..., drop_invalid: _Optional[bool] = ..., bottleneck_size: _Optional[int] = ..., bottleneck_placement: _Optional[str] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("base_model", "method", "output_name", "examples", "dataset_name", "dataset_jsonl", "hyperparameters", "client_token", "nproc", "eval_examples", "eval_dataset_name", "eval_dataset_jsonl")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATASET_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_JSONL_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NPROC_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_NAME_FIELD_NUMBER: _ClassVar[int]
    EVAL_DATASET_JSONL_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    method: Method
    output_name: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    dataset_name: str
    dataset_jsonl: str
    hyperparameters: Hyperparameters
    client_token: str
    nproc: int
    eval_examples: _containers.RepeatedCompositeFieldContainer[Example]
    eval_dataset_name: str
    eval_dataset_jsonl: str
    def __init__(self, base_model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., output_name: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., dataset_name: _Optional[str] = ..., dataset_jsonl: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., client_token: _Optional[str] = ..., nproc: _Optional[int] = ..., eval_examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., eval_dataset_name: _Optional[str] = ..., eval_dataset_jsonl: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("job_id", "state", "base_model", "method", "output_name", "hyperparameters", "created_unix_ms", "started_unix_ms", "finished_unix_ms", "error", "artifact", "latest_metrics", "eval_before", "eval_after", "worker_id", "client_token", "trace_id", "train_examples", "eval_examples", "dataset_report")
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
    DATASET_REPORT_FIELD_NUMBER: _ClassVar[int]
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
    dataset_report: DatasetReport
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., base_model: _Optional[str] = ..., method: _Optional[_Union[Method, str]] = ..., output_name: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., created_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., error: _Optional[str] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., latest_metrics: _Optional[_Union[TrainMetrics, _Mapping]] = ..., eval_before: _Optional[_Union[EvalResult, _Mapping]] = ..., eval_after: _Optional[_Union[EvalResult, _Mapping]] = ..., worker_id: _Optional[str] = ..., client_token: _Optional[str] = ..., trace_id: _Optional[str] = ..., train_examples: _Optional[int] = ..., eval_examples: _Optional[int] = ..., dataset_report: _Optional[_Union[DatasetReport, _Mapping]] = ...) -> None: ...

class LengthSummary(_message.Message):
    __slots__ = ("min", "median", "p95", "max")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MEDIAN_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    min: int
    median: int
    p95: int
    max: int
    def __init__(self, min: _Optional[int] = ..., median: _Optional[int] = ..., p95: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class ClassCount(_message.Message):
    __slots__ = ("completion", "count", "share")
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    completion: str
    count: int
    share: float
    def __init__(self, completion: _Optional[str] = ..., count: _Optional[int] = ..., share: _Optional[float] = ...) -> None: ...

class DatasetReport(_message.Message):
    __slots__ = ("rows", "eval_rows", "train", "eval", "empty", "invalid", "too_short", "duplicates", "eval_leaked", "no_learned_tokens", "truncated", "dropped_reasons", "learned_tokens", "total_tokens", "completion_examples", "distinct_completions", "top_classes")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    TOO_SHORT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    EVAL_LEAKED_FIELD_NUMBER: _ClassVar[int]
    NO_LEARNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_REASONS_FIELD_NUMBER: _ClassVar[int]
    LEARNED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DISTINCT_COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    TOP_CLASSES_FIELD_NUMBER: _ClassVar[int]
    rows: int
    eval_rows: int
    train: int
    eval: int
    empty: int
    invalid: int
    too_short: int
    duplicates: int
    eval_leaked: int
    no_learned_tokens: int
    truncated: int
    dropped_reasons: _containers.RepeatedScalarFieldContainer[str]
    learned_tokens: LengthSummary
    total_tokens: LengthSummary
    completion_examples: int
    distinct_completions: int
    top_classes: _containers.RepeatedCompositeFieldContainer[ClassCount]
    def __init__(self, rows: _Optional[int] = ..., eval_rows: _Optional[int] = ..., train: _Optional[int] = ..., eval: _Optional[int] = ..., empty: _Optional[int] = ..., invalid: _Optional[int] = ..., too_short: _Optional[int] = ..., duplicates: _Optional[int] = ..., eval_leaked: _Optional[int] = ..., no_learned_tokens: _Optional[int] = ..., truncated: _Optional[int] = ..., dropped_reasons: _Optional[_Iterable[str]] = ..., learned_tokens: _Optional[_Union[LengthSummary, _Mapping]] = ..., total_tokens: _Optional[_Union[LengthSummary, _Mapping]] = ..., completion_examples: _Optional[int] = ..., distinct_completions: _Optional[int] = ..., top_classes: _Optional[_Iterable[_Union[ClassCount, _Mapping]]] = ...) -> None: ...

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

class TrafficSplit(_message.Message):
    __slots__ = ("adapter", "weights", "updated_unix_ms")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    weights: _containers.ScalarMap[int, int]
    updated_unix_ms: int
    def __init__(self, adapter: _Optional[str] = ..., weights: _Optional[_Mapping[int, int]] = ..., updated_unix_ms: _Optional[int] = ...) -> None: ...

class SetTrafficSplitRequest(_message.Message):
    __slots__ = ("adapter", "weights", "clear")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    weights: _containers.ScalarMap[int, int]
    clear: bool
    def __init__(self, adapter: _Optional[str] = ..., weights: _Optional[_Mapping[int, int]] = ..., clear: _Optional[bool] = ...) -> None: ...

class GetTrafficSplitRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: str
    def __init__(self, adapter: _Optional[str] = ...) -> None: ...

class FloatRange(_message.Message):
    __slots__ = ("min", "max", "log")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    LOG_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    log: bool
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., log: _Optional[bool] = ...) -> None: ...

class SearchSpace(_message.Message):
    __slots__ = ("learning_rate", "learning_rate_range", "lora_r", "lora_alpha", "epochs", "batch_size")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_RANGE_FIELD_NUMBER: _ClassVar[int]
    LORA_R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    learning_rate: _containers.RepeatedScalarFieldContainer[float]
    learning_rate_range: FloatRange
    lora_r: _containers.RepeatedScalarFieldContainer[int]
    lora_alpha: _containers.RepeatedScalarFieldContainer[float]
    epochs: _containers.RepeatedScalarFieldContainer[int]
    batch_size: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, learning_rate: _Optional[_Iterable[float]] = ..., learning_rate_range: _Optional[_Union[FloatRange, _Mapping]] = ..., lora_r: _Optional[_Iterable[int]] = ..., lora_alpha: _Optional[_Iterable[float]] = ..., epochs: _Optional[_Iterable[int]] = ..., batch_size: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateSweepRequest(_message.Message):
    __slots__ = ("base", "space", "strategy", "max_trials", "parallelism", "objective", "seed", "client_token", "discard_trials")
    BASE_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MAX_TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DISCARD_TRIALS_FIELD_NUMBER: _ClassVar[int]
    base: CreateJobRequest
    space: SearchSpace
    strategy: SweepStrategy
    max_trials: int
    parallelism: int
    objective: str
    seed: int
    client_token: str
    discard_trials: bool
    def __init__(self, base: _Optional[_Union[CreateJobRequest, _Mapping]] = ..., space: _Optional[_Union[SearchSpace, _Mapping]] = ..., strategy: _Optional[_Union[SweepStrategy, str]] = ..., max_trials: _Optional[int] = ..., parallelism: _Optional[int] = ..., objective: _Optional[str] = ..., seed: _Optional[int] = ..., client_token: _Optional[str] = ..., discard_trials: _Optional[bool] = ...) -> None: ...

class Trial(_message.Message):
    __slots__ = ("number", "params", "job_id", "state", "eval_loss", "error", "artifact_ref", "best")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_REF_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    number: int
    params: Hyperparameters
    job_id: str
    state: JobState
    eval_loss: float
    error: str
    artifact_ref: str
    best: bool
    def __init__(self, number: _Optional[int] = ..., params: _Optional[_Union[Hyperparameters, _Mapping]] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., eval_loss: _Optional[float] = ..., error: _Optional[str] = ..., artifact_ref: _Optional[str] = ..., best: _Optional[bool] = ...) -> None: ...

class Sweep(_message.Message):
    __slots__ = ("sweep_id", "state", "output_name", "strategy", "planned_trials", "parallelism", "objective", "trials", "best_trial", "best_ref", "created_unix_ms", "finished_unix_ms", "error", "worker_id", "client_token")
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PLANNED_TRIALS_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    TRIALS_FIELD_NUMBER: _ClassVar[int]
    BEST_TRIAL_FIELD_NUMBER: _ClassVar[int]
    BEST_REF_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    state: JobState
    output_name: str
    strategy: SweepStrategy
    planned_trials: int
    parallelism: int
    objective: str
    trials: _containers.RepeatedCompositeFieldContainer[Trial]
    best_trial: int
    best_ref: str
    created_unix_ms: int
    finished_unix_ms: int
    error: str
    worker_id: str
    client_token: str
    def __init__(self, sweep_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., output_name: _Optional[str] = ..., strategy: _Optional[_Union[SweepStrategy, str]] = ..., planned_trials: _Optional[int] = ..., parallelism: _Optional[int] = ..., objective: _Optional[str] = ..., trials: _Optional[_Iterable[_Union[Trial, _Mapping]]] = ..., best_trial: _Optional[int] = ..., best_ref: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., error: _Optional[str] = ..., worker_id: _Optional[str] = ..., client_token: _Optional[str] = ...) -> None: ...

class GetSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class ListSweepsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListSweepsResponse(_message.Message):
    __slots__ = ("sweeps",)
    SWEEPS_FIELD_NUMBER: _ClassVar[int]
    sweeps: _containers.RepeatedCompositeFieldContainer[Sweep]
    def __init__(self, sweeps: _Optional[_Iterable[_Union[Sweep, _Mapping]]] = ...) -> None: ...

class CancelSweepRequest(_message.Message):
    __slots__ = ("sweep_id",)
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    def __init__(self, sweep_id: _Optional[str] = ...) -> None: ...

class WatchSweepRequest(_message.Message):
    __slots__ = ("sweep_id", "from_sequence")
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    from_sequence: int
    def __init__(self, sweep_id: _Optional[str] = ..., from_sequence: _Optional[int] = ...) -> None: ...

class SweepEvent(_message.Message):
    __slots__ = ("sweep_id", "sequence", "time_unix_ms", "trial", "state", "message")
    SWEEP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sweep_id: str
    sequence: int
    time_unix_ms: int
    trial: Trial
    state: JobState
    message: str
    def __init__(self, sweep_id: _Optional[str] = ..., sequence: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., trial: _Optional[_Union[Trial, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., message: _Optional[str] = ...) -> None: ...

"""Configuration of a worker process (CLI flags derive from it)."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

from common.config import field
from common.models import DTYPES, WEIGHTS
from common.tls import ServerTlsFields
from common.validation import MAX_JOB_NPROC


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@dataclass
class WorkerConfig(ServerTlsFields):
    """Settings of ``llmcluster worker`` (TLS flags from :class:`~common.tls.ServerTlsFields`)."""

    port: int = field(50061, help="gRPC port to listen on (0 = pick a free one)")
    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 to accept remote routers")
    model: str = field(
        "", help="base model: empty = the offline default, or an HF folder / hub name"
    )
    dtype: str = field(
        "auto", help=f"model dtype, one of {DTYPES}; auto = bf16 on CUDA, fp32 on CPU"
    )
    weights: str = field(
        "auto",
        help=f"storage of the projection and MLP matrices, one of {WEIGHTS}: bf16, int8 "
        "(weight-only, per-channel scales) or int4 (scale and zero per 32 columns) cut the bytes a decode step reads; activations, "
        "KV cache and LM head stay in --dtype; auto = as loaded (fp32 on CPU). "
        "benchmarks/precision.py measures speed and quality of each",
    )
    device: str = field("auto", help="torch device; auto = cuda when present, else cpu")
    worker_id: str = field(
        "", help="unique id reported in usage and registration (default: host-random)"
    )
    max_running: int = field(32, help="most sequences decoded together")
    max_kv_tokens: int = field(
        65536, help="KV-cache budget in tokens (prompt + max_new_tokens reserved)"
    )
    max_queue: int = field(
        256, help="most requests waiting for admission; more get RESOURCE_EXHAUSTED"
    )
    max_new_tokens_limit: int = field(2048, help="upper bound of a request's max_new_tokens")
    max_prefill_tokens_per_step: int = field(
        128,
        help="prompt tokens prefilled per engine iteration (chunked prefill: running streams "
        "keep decoding while a long prompt is admitted; a token at a long context counts "
        "more, for its attention)",
    )
    max_prefill_stall: float = field(
        2.0,
        help="while streams decode, a step that also prefills prompt tokens may take at most "
        "this many times a decode-only step (the per-step prompt budget adapts to measured "
        "step times, within --max-prefill-tokens-per-step; 0 = fixed budget)",
    )
    max_context_tokens: int = field(0, help="context length; 0 = the model's own limit")
    load_interval_ms: int = field(200, help="period of Load reports on router links")
    engine: str = field(
        "model",
        help="model = the real engine; null = emit tokens without a model (router+gRPC ceiling benchmarks)",
    )
    null_step_ms: float = field(5.0, help="with --engine null: time one iteration takes")
    store_dir: str = field("", help="model store folder (default: $LLMCLUSTER_HOME/store)")
    max_loaded_adapters: int = field(8, help="adapters kept loaded (least recently used leave)")
    max_loaded_models: int = field(
        2,
        help="full fine-tunes (model=name@version) kept loaded beside the base, each with its own engine (the least recently used idle one leaves)",
    )
    jobs_dir: str = field("", help="fine-tuning jobs folder (default: $LLMCLUSTER_HOME/jobs)")
    data_dir: str = field("", help="datasets CreateJob names (default: $LLMCLUSTER_HOME/data)")
    max_concurrent_jobs: int = field(1, help="fine-tuning jobs training at once; more wait QUEUED")
    job_threads: int = field(1, help="torch threads of each training process (keeps serving fast)")
    nproc: int = field(
        1,
        help="data-parallel training processes of a job that does not set its own nproc "
        "(each gets job_threads / nproc threads; CUDA: one device each)",
    )
    job_lease_s: float = field(
        15.0,
        help="seconds a fine-tuning job's lease lasts unrenewed: workers sharing a jobs folder "
        "take over a job whose holder stopped renewing it for this long (1..3600)",
    )
    threads: int = field(
        0, help="compute threads of the engine (0 = one per core this worker may use)"
    )
    cpus: list[int] = field(
        default_factory=list,
        help="pin the worker to these CPU ids (empty = every core it may use now)",
    )
    compute_lock: str = field(
        "",
        help="file locked around each engine step, shared by workers on the same cores "
        "(llmcluster up sets it): they take turns with every core instead of contending "
        "for them (empty = no lock)",
    )
    metrics_port: int = field(
        -1, help="Prometheus /metrics HTTP port (0 = any free port, -1 = off)"
    )
    advertise_host: str = field(
        "",
        help="address registered for routers to dial (default: --host, or this host's name when --host is 0.0.0.0)",
    )
    self_test_interval_s: float = field(15.0, help="period of the engine self-test (0 = off)")
    self_test_timeout_s: float = field(30.0, help="a self-test slower than this fails")
    stall_timeout_s: float = field(
        120.0,
        help="no engine step for this long while work exists: fail in-flight requests with UNAVAILABLE and rebuild (0 = off)",
    )
    fault_file: str = field("", help="test hook: while this file exists the engine hangs")
    warmup: bool = field(True, help="run a short generation before reporting SERVING")
    grace_period_s: float = field(30.0, help="on SIGTERM, how long running requests may finish")

    def __post_init__(self) -> None:
        self.check_server_tls()
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        for name in (
            "max_running",
            "max_kv_tokens",
            "max_queue",
            "max_new_tokens_limit",
            "max_prefill_tokens_per_step",
            "max_concurrent_jobs",
            "job_threads",
            "nproc",
            "max_loaded_models",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.nproc > MAX_JOB_NPROC:
            raise ValueError(f"nproc must be <= {MAX_JOB_NPROC}, got {self.nproc}")
        if not 1 <= self.job_lease_s <= 3600:
            raise ValueError(f"job_lease_s must be in [1, 3600], got {self.job_lease_s}")
        if self.engine not in ("model", "null"):
            raise ValueError(f"engine must be 'model' or 'null', got {self.engine!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s must be >= 0, got {self.stall_timeout_s}")
        if self.max_prefill_stall != 0 and not self.max_prefill_stall > 1:
            raise ValueError(
                f"max_prefill_stall must be 0 (off) or > 1, got {self.max_prefill_stall}"
            )
        if self.max_context_tokens < 0:
            raise ValueError(f"max_context_tokens must be >= 0, got {self.max_context_tokens}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.worker_id:
            self.worker_id = default_worker_id()

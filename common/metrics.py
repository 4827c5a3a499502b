"""Prometheus metrics for router and worker processes, each on its own registry.

One object per process, made in ``main`` and handed to whoever records::

    metrics = WorkerMetrics()
    port = start_metrics_server(cfg.metrics_port, metrics.registry)
    ...
    metrics.observe_ttft(0.042)                  # hot path: plain method calls
    metrics.follow_engine(engine.stats)          # gauges read at scrape time

Names follow Prometheus conventions (``llmcluster_`` prefix, base units in the name,
``_total`` on counters). Latency buckets follow vLLM's, extended downwards for small
models on CPU, so TTFT and inter-token percentiles are resolvable from 1 ms to minutes.

Beside our own series, every serving process exports the OpenTelemetry GenAI
semantic-convention histograms (``gen_ai.server.time_to_first_token``,
``gen_ai.server.time_per_output_token``, ``gen_ai.server.request.duration``,
``gen_ai.client.token.usage``) in their Prometheus form (dots to underscores, unit
suffix ``_seconds``) with the bucket boundaries the conventions prescribe, observed once
per successful request, so dashboards built for the conventions work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    start_http_server,
)

from common.tracing import GEN_AI_OPERATION_TEXT_COMPLETION, package_version

logger = logging.getLogger(__name__)

ROLE_ROUTER = "router"
ROLE_WORKER = "worker"
# The router's ``api`` label: which front door a request came in by (its gRPC Generate
# service, or the OpenAI HTTP gateway), on its latency and token-count histograms.
API_GRPC = "grpc"
API_OPENAI = "openai"
ROUTER_APIS = (API_GRPC, API_OPENAI)

# Buckets: seconds. TTFT includes queueing, so it reaches into minutes under overload.
TTFT_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
)  # fmt: skip
E2E_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0,
)  # fmt: skip
QUEUE_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# OpenTelemetry GenAI semantic conventions (docs/gen-ai/gen-ai-metrics.md): the
# ExplicitBucketBoundaries each metric SHOULD use.
GENAI_TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
GENAI_REQUEST_DURATION_BUCKETS_S = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
GENAI_TOKEN_USAGE_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

# Distinct (adapter, version) label pairs a worker gives its per-adapter series; more
# are counted under ADAPTER_OVERFLOW so a stream of new versions cannot grow the series
# without bound.
MAX_ADAPTER_SERIES = 32
ADAPTER_OVERFLOW = "other"

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
# Status codes that end a request early by the caller's will (cancel) or clock (deadline).
CANCELLATION_REASONS = {"CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline"}


def status_code_name(code: Any) -> str:
    """``grpc.StatusCode.OK`` / ``"OK"`` / ``0`` → ``"OK"`` (the ``code`` label value)."""
    if code is None:
        return "OK"
    name = getattr(code, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(code, int):
        import grpc  # local: status-code ints are rare, keep import cost off the hot path

        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return str(code).upper()


class _ServingMetrics:
    """Metrics every serving role exposes (the ``role`` label tells router from worker).

    ``apis``: where a role has several front doors (the router: gRPC and OpenAI HTTP),
    its TTFT, inter-token, end-to-end and token-count histograms carry an ``api`` label
    with these values (all present from the start); a worker's have none."""

    def __init__(
        self, role: str, registry: CollectorRegistry | None = None, apis: tuple[str, ...] = ()
    ) -> None:
        self.role = role
        self.apis = apis
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        by_api = ["api"] if apis else []
        self.requests_total = Counter(
            "llmcluster_requests_total",
            "Finished RPCs by method and gRPC status code.",
            ["role", "method", "code"],
            registry=r,
        )
        self.time_to_first_token_seconds = Histogram(
            "llmcluster_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=TTFT_BUCKETS_S,
            labelnames=by_api,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "llmcluster_inter_token_latency_seconds",
            "Time between consecutive tokens of one sequence.",
            buckets=INTER_TOKEN_BUCKETS_S,
            labelnames=by_api,
            registry=r,
        )
        self.e2e_request_latency_seconds = Histogram(
            "llmcluster_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=E2E_BUCKETS_S,
            labelnames=by_api,
            registry=r,
        )
        self.queue_time_seconds = Histogram(
            "llmcluster_queue_time_seconds",
            "Time a request waited before it was scheduled (worker: admitted to the engine; "
            "router: sent to a worker).",
            buckets=QUEUE_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "llmcluster_queue_depth",
            "Requests waiting (worker: not yet admitted to the engine; router: not yet sent).",
            registry=r,
        )
        self.prompt_tokens_total = Counter(
            "llmcluster_prompt_tokens_total", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens_total = Counter(
            "llmcluster_generation_tokens_total", "Generated (completion) tokens.", registry=r
        )
        self.request_prompt_tokens = Histogram(
            "llmcluster_request_prompt_tokens",
            "Prompt length per request.",
            buckets=TOKEN_COUNT_BUCKETS,
            labelnames=by_api,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "llmcluster_request_generation_tokens",
            "Generated tokens per request.",
            buckets=TOKEN_COUNT_BUCKETS,
            labelnames=by_api,
            registry=r,
        )
        # RecordFeedback scores by the adapter version that served the request; labels
        # bounded like the worker's per-version series (MAX_ADAPTER_SERIES pairs).
        self.feedback_score = Summary(
            "llmcluster_feedback_score",
            "RecordFeedback scores by the adapter and version that served the request "
            "(_sum / _count is the mean score).",
            ["adapter", "version"],
            registry=r,
        )
        self._adapter_labels: set[tuple[str, str]] = set()
        self.cancellations_total = Counter(
            "llmcluster_cancellations_total",
            "Requests that ended before finishing: reason=cancelled (the caller cancelled) or "
            "deadline (its deadline passed).",
            ["reason"],
            registry=r,
        )
        self.healthy = Gauge(
            "llmcluster_healthy",
            "1 while this process's grpc.health.v1 status is SERVING, else 0.",
            registry=r,
        )
        # OpenTelemetry GenAI semantic conventions, Prometheus form (see module docstring).
        self.genai_time_to_first_token = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate first token for successful responses.",
            ["gen_ai_operation_name"],
            buckets=GENAI_TTFT_BUCKETS_S,
            registry=r,
        )
        self.genai_time_per_output_token = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token generated after the first token for successful responses.",
            ["gen_ai_operation_name"],
            buckets=GENAI_TIME_PER_OUTPUT_TOKEN_BUCKETS_S,
            registry=r,
        )
        self.genai_request_duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Generative AI server request duration (to the last output token).",
            ["gen_ai_operation_name"],
            buckets=GENAI_REQUEST_DURATION_BUCKETS_S,
            registry=r,
        )
        self.genai_token_usage = Histogram(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used, per request.",
            ["gen_ai_operation_name", "gen_ai_token_type"],
            buckets=GENAI_TOKEN_USAGE_BUCKETS,
            registry=r,
        )
        for reason in CANCELLATION_REASONS.values():  # zeros from the start
            self.cancellations_total.labels(reason)
        for api in apis:
            for histogram in self._api_histograms():
                histogram.labels(api)
        self.build_info = Gauge(
            "llmcluster_build_info", "Always 1; labels say what runs.", ["role", "version"],
            registry=r,
        )  # fmt: skip
        self.build_info.labels(role=role, version=package_version()).set(1)

    def _adapter_label(self, adapter: str, version: str) -> tuple[str, str]:
        pair = (adapter, version)
        if pair in self._adapter_labels:
            return pair
        if len(self._adapter_labels) >= MAX_ADAPTER_SERIES:
            return (ADAPTER_OVERFLOW, ADAPTER_OVERFLOW)
        self._adapter_labels.add(pair)
        return pair

    def record_feedback(self, adapter: str, version: str, score: float) -> None:
        """One RecordFeedback score for ``adapter``@``version`` ("" = base model)."""
        name, ver = self._adapter_label(adapter, version)
        self.feedback_score.labels(name, ver).observe(score)

    def _api_histograms(self) -> tuple[Histogram, ...]:
        return (
            self.time_to_first_token_seconds,
            self.inter_token_latency_seconds,
            self.e2e_request_latency_seconds,
            self.request_prompt_tokens,
            self.request_generation_tokens,
        )

    def _of(self, histogram: Histogram, api: str) -> Any:
        """``histogram``'s series for ``api`` (the histogram itself where none is kept)."""
        return histogram.labels(api) if self.apis else histogram

    # -- hot-path helpers -------------------------------------------------------------------
    def record_request(self, method: str, code: Any = "OK") -> None:
        """Counts one finished RPC (and a cancellation when it ended CANCELLED or
        DEADLINE_EXCEEDED); ``code`` is a ``grpc.StatusCode`` or its name."""
        name = status_code_name(code)
        self.requests_total.labels(self.role, method, name).inc()
        reason = CANCELLATION_REASONS.get(name)
        if reason is not None:
            self.cancellations_total.labels(reason).inc()

    def set_healthy(self, serving: bool) -> None:
        """The process's health status changed (every flip, both ways)."""
        self.healthy.set(1 if serving else 0)

    def observe_ttft(self, seconds: float, api: str = API_GRPC) -> None:
        """Time to first token of one request."""
        self._of(self.time_to_first_token_seconds, api).observe(seconds)

    def observe_inter_token(self, seconds: float, count: int = 1, api: str = API_GRPC) -> None:
        """Gap between tokens; ``count`` > 1 spreads one gap over tokens emitted together."""
        per_token = seconds / count if count > 1 else seconds
        histogram = self._of(self.inter_token_latency_seconds, api)
        for _ in range(max(count, 1)):
            histogram.observe(per_token)

    def observe_queue_time(self, seconds: float) -> None:
        """Time one request waited before being scheduled."""
        self.queue_time_seconds.observe(seconds)

    def observe_request_done(
        self,
        *,
        e2e_s: float,
        prompt_tokens: int,
        generation_tokens: int,
        ttft_s: float | None = None,
        operation: str = GEN_AI_OPERATION_TEXT_COMPLETION,
        api: str = API_GRPC,
    ) -> None:
        """A successfully finished request: end-to-end latency and token counts, and the
        GenAI histograms (``ttft_s``: its time to first token, None if it made none)."""
        self._of(self.e2e_request_latency_seconds, api).observe(e2e_s)
        self.prompt_tokens_total.inc(prompt_tokens)
        self.generation_tokens_total.inc(generation_tokens)
        self._of(self.request_prompt_tokens, api).observe(prompt_tokens)
        self._of(self.request_generation_tokens, api).observe(generation_tokens)
        self.genai_request_duration.labels(operation).observe(e2e_s)
        self.genai_token_usage.labels(operation, "input").observe(prompt_tokens)
        self.genai_token_usage.labels(operation, "output").observe(generation_tokens)
        if ttft_s is not None and generation_tokens > 0:
            self.genai_time_to_first_token.labels(operation).observe(ttft_s)
            if generation_tokens > 1:  # the conventions' definition: after the first token
                per_token = max(0.0, e2e_s - ttft_s) / (generation_tokens - 1)
                self.genai_time_per_output_token.labels(operation).observe(per_token)


class WorkerMetrics(_ServingMetrics):
    """A worker's metrics: engine, KV cache, adapters, fine-tune jobs, self-tests."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(ROLE_WORKER, registry)
        r = self.registry
        self.running_sequences = Gauge(
            "llmcluster_running_sequences", "Sequences in the running batch.", registry=r
        )
        self.batch_size = Histogram(
            "llmcluster_batch_size",
            "Sequences per engine iteration.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.engine_steps_total = Counter(
            "llmcluster_engine_steps_total", "Engine iterations (forward passes).", registry=r
        )
        # Admission reserves prompt + max_new_tokens per sequence up front (so nothing is
        # ever preempted); what the cache holds now (occupied) is at most that.
        self.kv_cache_reserved_tokens = Gauge(
            "llmcluster_kv_cache_reserved_tokens",
            "KV-cache tokens reserved by running sequences (prompt + max_new_tokens each).",
            registry=r,
        )
        self.kv_cache_reserved_ratio = Gauge(
            "llmcluster_kv_cache_reserved_ratio",
            "Reserved / capacity KV-cache tokens (0..1); admission waits when a request's "
            "reservation does not fit.",
            registry=r,
        )
        self.kv_cache_occupied_tokens = Gauge(
            "llmcluster_kv_cache_occupied_tokens",
            "KV-cache tokens holding keys and values now (prompt + tokens generated so far "
            "of each running sequence).",
            registry=r,
        )
        self.kv_cache_occupied_ratio = Gauge(
            "llmcluster_kv_cache_occupied_ratio", "Occupied / capacity KV-cache tokens (0..1).",
            registry=r,
        )  # fmt: skip
        self.kv_cache_capacity_tokens = Gauge(
            "llmcluster_kv_cache_capacity_tokens", "KV-cache capacity in tokens.", registry=r
        )
        self.loaded_adapters = Gauge(
            "llmcluster_loaded_adapters", "Adapters loaded in memory.", registry=r
        )
        self.finetune_jobs = Gauge(
            "llmcluster_finetune_jobs", "Fine-tune jobs by state.", ["state"], registry=r
        )
        self.training_loss = Gauge(
            "llmcluster_training_loss", "Last reported training loss per job.", ["job"], registry=r
        )
        self.self_tests_total = Counter(
            "llmcluster_self_tests_total", "Self-test runs by result.", ["result"], registry=r
        )
        # A/B reading: the same request count and TTFT, by the adapter version that served
        # (adapter="" for the base model). Bounded by MAX_ADAPTER_SERIES label pairs.
        self.adapter_requests_total = Counter(
            "llmcluster_adapter_requests_total",
            "Finished generation requests by the adapter and version that served them.",
            ["adapter", "version", "code"],
            registry=r,
        )
        self.adapter_time_to_first_token_seconds = Histogram(
            "llmcluster_adapter_time_to_first_token_seconds",
            "Time to first token by the adapter and version that served the request.",
            ["adapter", "version"],
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        for state in JOB_STATES:  # export zeros so dashboards show every state from start
            self.finetune_jobs.labels(state)
        for result in ("pass", "fail"):
            self.self_tests_total.labels(result)

    def record_adapter_request(self, adapter: str, version: str, code: Any = "OK") -> None:
        """One finished generation served by ``adapter``@``version`` ("" = base model)."""
        name, ver = self._adapter_label(adapter, version)
        self.adapter_requests_total.labels(name, ver, status_code_name(code)).inc()

    def observe_adapter_ttft(self, adapter: str, version: str, seconds: float) -> None:
        """Time to first token of a request served by ``adapter``@``version``."""
        name, ver = self._adapter_label(adapter, version)
        self.adapter_time_to_first_token_seconds.labels(name, ver).observe(seconds)

    def observe_step(self, batch_size: int) -> None:
        """One engine iteration over ``batch_size`` sequences."""
        self.engine_steps_total.inc()
        self.batch_size.observe(batch_size)

    def follow_engine(self, stats: Callable[[], Mapping[str, int]]) -> None:
        """Queue depth, running sequences and KV-cache reservation / occupancy, read from
        ``stats()`` (``Engine.stats``) at every scrape: set after a step instead, they
        would keep the last step's values once the engine idles (a cancelled last
        request would stay "running")."""

        def reader(key: str) -> Callable[[], float]:
            return lambda: float(stats()[key])

        def ratio(key: str) -> Callable[[], float]:
            def read() -> float:
                s = stats()
                return s[key] / s["max_kv_tokens"] if s["max_kv_tokens"] else 0.0

            return read

        self.queue_depth.set_function(reader("queued"))
        self.running_sequences.set_function(reader("running"))
        self.kv_cache_capacity_tokens.set_function(reader("max_kv_tokens"))
        self.kv_cache_reserved_tokens.set_function(reader("reserved_kv_tokens"))
        self.kv_cache_reserved_ratio.set_function(ratio("reserved_kv_tokens"))
        self.kv_cache_occupied_tokens.set_function(reader("occupied_kv_tokens"))
        self.kv_cache_occupied_ratio.set_function(ratio("occupied_kv_tokens"))

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """Sets the job gauge for every state (states absent from ``counts`` read 0)."""
        for state in {*JOB_STATES, *counts}:
            self.finetune_jobs.labels(state).set(counts.get(state, 0))

    def set_training_loss(self, job_id: str, loss: float) -> None:
        """Latest training loss of a running job."""
        self.training_loss.labels(job_id).set(loss)

    def clear_job(self, job_id: str) -> None:
        """Drops a finished job's series so old jobs do not pile up."""
        try:
            self.training_loss.remove(job_id)
        except KeyError:
            pass

    def record_self_test(self, passed: bool) -> None:
        """One self-test run."""
        self.self_tests_total.labels("pass" if passed else "fail").inc()


class RouterMetrics(_ServingMetrics):
    """A router's metrics: coalescing, discovery, routing, tenants."""

    def record_request(self, method: str, code: Any = "OK", tenant: str | None = None) -> None:
        """Counts one RPC, also by tenant: ``tenant`` or the authenticated caller's."""
        super().record_request(method, code)
        from common.auth import current_tenant_name  # local: auth is optional

        name = current_tenant_name() if tenant is None else tenant
        if name:
            self.tenant_requests_total.labels(name, method, status_code_name(code)).inc()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(ROLE_ROUTER, registry, apis=ROUTER_APIS)
        r = self.registry
        self.tenant_requests_total = Counter(
            "llmcluster_router_tenant_requests_total",
            "Finished or refused RPCs by tenant, method and gRPC status code (--auth-file).",
            ["tenant", "method", "code"],
            registry=r,
        )
        self.submit_batches_total = Counter(
            "llmcluster_router_submit_batches_total",
            "SubmitBatch messages sent to workers.",
            registry=r,
        )
        self.batched_requests_total = Counter(
            "llmcluster_router_batched_requests_total",
            "Requests sent inside SubmitBatch messages.",
            registry=r,
        )
        self.requests_per_batch = Histogram(
            "llmcluster_router_requests_per_batch",
            "Requests coalesced into one SubmitBatch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.healthy_workers = Gauge(
            "llmcluster_router_healthy_workers",
            "Workers this router has a healthy link to (stream open, health SERVING).",
            registry=r,
        )
        self.registry_workers = Gauge(
            "llmcluster_router_registry_workers",
            "Workers the registry (discovery) last reported passing.",
            registry=r,
        )
        self.registry_up = Gauge(
            "llmcluster_router_registry_up",
            "1 if the last registry (discovery) query succeeded.",
            registry=r,
        )
        self.discovery_failures_total = Counter(
            "llmcluster_router_discovery_failures_total",
            "Failed registry (discovery) queries.",
            registry=r,
        )
        self.retries_total = Counter(
            "llmcluster_router_retries_total",
            "Requests re-sent to another worker (failover).",
            registry=r,
        )
        self.outstanding_requests = Gauge(
            "llmcluster_router_outstanding_requests",
            "Requests sent to workers and not yet finished.",
            registry=r,
        )

    def observe_submit_batch(self, size: int) -> None:
        """One SubmitBatch of ``size`` requests sent on a link."""
        self.submit_batches_total.inc()
        self.batched_requests_total.inc(size)
        self.requests_per_batch.observe(size)

    def set_discovery(self, *, ok: bool, passing_workers: int | None = None) -> None:
        """Outcome of one registry query (counts failures, keeps the up gauge and the
        registry's count; the healthy-link gauge is the cluster's own)."""
        self.registry_up.set(1 if ok else 0)
        if not ok:
            self.discovery_failures_total.inc()
        if passing_workers is not None:
            self.registry_workers.set(passing_workers)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> int:
    """Serves ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port; returns the bound port. The server lives as long as the
    process (daemon thread), which is what a scrape target wants.
    """
    server, _thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_port)
    logger.info("metrics on http://%s:%d/metrics", host, bound)
    return bound


def metric_names(registry: CollectorRegistry) -> Iterable[str]:
    """Names of the metric families in ``registry`` (for tests and docs)."""
    return [m.name for m in registry.collect()]

"""OpenTelemetry tracing for every llmcluster process: set-up, propagation, attributes.

One call per process, early in ``main``::

    cfg = TracingConfig.from_args(args)          # OTEL_* environment, then CLI flags
    setup_tracing(SERVICE_WORKER, cfg)
    ...
    shutdown_tracing()                            # flushes queued spans at exit

W3C trace context (``traceparent`` / ``tracestate``) travels:

* in gRPC metadata on unary and streaming calls (:func:`grpc_metadata_from_context`,
  :func:`context_from_grpc_metadata`);
* per request over the router→worker ``Serve`` stream in ``WorkItem.trace_context``
  (:func:`inject_to_dict`, :func:`context_from_dict`), because one stream carries many
  requests and stream metadata would give them all one parent;
* into a child process (the training job) through the environment variables
  ``TRACEPARENT`` / ``TRACESTATE`` (:func:`subprocess_env`, :func:`context_from_env`), the
  carrier the OpenTelemetry spec proposes for processes.

The exporter, endpoint and sampler come from the standard ``OTEL_*`` variables; only
:func:`TracingConfig.from_env` reads them (through :func:`common.config.env`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from common.config import add_arguments, env, field

logger = logging.getLogger(__name__)

# --- service names (resource attribute service.name) -------------------------------------
SERVICE_ROUTER = "llmcluster-router"
SERVICE_WORKER = "llmcluster-worker"
SERVICE_TRAINER = "llmcluster-trainer"
SERVICE_NAMES = (SERVICE_ROUTER, SERVICE_WORKER, SERVICE_TRAINER)

# --- GenAI semantic-convention attribute names (one place; values per the OTel spec) -----
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_SYSTEM = "gen_ai.system"  # superseded by gen_ai.provider.name; Jaeger users still query it
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_TOP_K = "gen_ai.request.top_k"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_REQUEST_STOP_SEQUENCES = "gen_ai.request.stop_sequences"
GEN_AI_REQUEST_FREQUENCY_PENALTY = "gen_ai.request.frequency_penalty"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
# Well-known values.
GEN_AI_SYSTEM_VALUE = "llmcluster"
GEN_AI_OPERATION_TEXT_COMPLETION = "text_completion"
GEN_AI_OPERATION_CHAT = "chat"
GEN_AI_OPERATION_FINETUNE = "fine_tuning"  # not (yet) in the spec; our name for jobs

# --- llmcluster's own attributes and event names ------------------------------------------
ATTR_WORKER_ID = "llmcluster.worker.id"
ATTR_ADAPTER = "llmcluster.adapter"  # "name@version"
ATTR_BATCH_ID = "llmcluster.batch.id"
ATTR_BATCH_SIZE = "llmcluster.batch.size"
ATTR_LINK_REQUEST_ID = "llmcluster.link_request_id"
ATTR_REQUEST_ID = "llmcluster.request_id"
ATTR_QUEUE_MS = "llmcluster.queue_ms"
ATTR_TTFT_MS = "llmcluster.time_to_first_token_ms"
ATTR_JOB_ID = "llmcluster.job.id"
ATTR_TENANT = "llmcluster.tenant"
"""The authenticated tenant (``--auth-file``) a request or job belongs to."""
ATTR_JOB_METHOD = "llmcluster.job.method"
ATTR_EPOCH = "llmcluster.train.epoch"
ATTR_LOSS = "llmcluster.train.loss"
# The route span's decision: how many workers could take it, and the chosen one's state.
ATTR_ROUTE_CANDIDATES = "llmcluster.route.candidates"  # healthy workers serving the model
ATTR_ROUTE_OUTSTANDING_TOKENS = "llmcluster.route.outstanding_tokens"  # the chosen's queue
ATTR_ROUTE_ADAPTER_LOADED = "llmcluster.route.adapter_loaded"  # bool; adapter requests only
ATTR_LINK_KIND = "llmcluster.link.kind"  # on span links: "batch" | "training_job"
ATTR_HEALTH_CHECK = "llmcluster.health_check"  # bool; marks spans sampled by health ratio
ATTR_HEALTH_SERVICE = "llmcluster.health.service"  # the checked service name ("" = server)
ATTR_HEALTH_STATUS = "llmcluster.health.status"  # SERVING / NOT_SERVING / ...
ATTR_ERROR_TYPE = "error.type"
ATTR_RPC_SYSTEM = "rpc.system"
ATTR_RPC_SERVICE = "rpc.service"
ATTR_RPC_METHOD = "rpc.method"
ATTR_RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
EVENT_FIRST_TOKEN = "first_token"
EVENT_RETRY = "retry"
EVENT_FAILOVER = "failover"

# Environment variables of the subprocess carrier (OTel "env carriers" proposal).
ENV_TRACEPARENT = "TRACEPARENT"
ENV_TRACESTATE = "TRACESTATE"

EXPORTERS = ("otlp", "console", "none")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclasses.dataclass
class TracingConfig:
    """How this process exports spans. Build with :meth:`from_env` / :meth:`from_args`."""

    trace_exporter: str | None = field(
        None,
        help="span exporter: otlp | console | none; unset = otlp if an OTLP endpoint is set, "
        "else none [OTEL_TRACES_EXPORTER]",
    )
    otlp_endpoint: str | None = field(
        None,
        help="OTLP/gRPC endpoint, e.g. http://jaeger:4317 "
        "[OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT]",
    )
    otlp_insecure: bool | None = field(
        None,
        help="plaintext gRPC to the OTLP endpoint; unset = plaintext for http:// endpoints "
        "[OTEL_EXPORTER_OTLP_INSECURE]",
    )
    trace_sampler: str = field(
        "parentbased_always_on",
        help="sampler: " + " | ".join(SAMPLERS) + " [OTEL_TRACES_SAMPLER]",
    )
    trace_sample_ratio: float = field(
        1.0, help="ratio for the *traceidratio samplers [OTEL_TRACES_SAMPLER_ARG]"
    )
    health_span_ratio: float = field(
        1.0,
        help="fraction of health-check and self-test root spans kept "
        "[LLMCLUSTER_HEALTH_SPAN_RATIO]",
    )
    otel_service_name: str | None = field(
        None, help="override service.name (unset = the role's name) [OTEL_SERVICE_NAME]"
    )
    service_instance_id: str | None = field(
        None, help="service.instance.id (unset = a random UUID per process)"
    )
    resource_attributes: str | None = field(
        None,
        help="extra resource attributes k=v,k2=v2 [OTEL_RESOURCE_ATTRIBUTES]",
        flag=False,
    )

    def __post_init__(self) -> None:
        if self.trace_exporter is not None:
            self.trace_exporter = self.trace_exporter.strip().lower()
            if self.trace_exporter not in EXPORTERS:
                raise ValueError(
                    f"trace_exporter={self.trace_exporter!r}: expected one of {EXPORTERS}"
                )
        self.trace_sampler = self.trace_sampler.strip().lower()
        if self.trace_sampler not in SAMPLERS:
            raise ValueError(f"trace_sampler={self.trace_sampler!r}: expected one of {SAMPLERS}")
        for name in ("trace_sample_ratio", "health_span_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: expected a ratio in [0, 1]")

    @property
    def exporter(self) -> str:
        """The effective exporter: an endpoint alone is enough to turn OTLP on."""
        if self.trace_exporter is not None:
            return self.trace_exporter
        return "otlp" if self.otlp_endpoint else "none"

    @classmethod
    def from_env(cls, **overrides: Any) -> TracingConfig:
        """Reads the standard ``OTEL_*`` variables; ``overrides`` (not None) win."""
        values: dict[str, Any] = {}
        exporter = env("OTEL_TRACES_EXPORTER")
        if exporter:
            # The spec allows a comma list; we run one exporter, the first.
            values["trace_exporter"] = exporter.split(",")[0].strip()
        endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            values["otlp_endpoint"] = endpoint
        insecure = env("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or env("OTEL_EXPORTER_OTLP_INSECURE")
        if insecure:
            values["otlp_insecure"] = insecure.strip().lower() == "true"
        sampler = env("OTEL_TRACES_SAMPLER")
        if sampler:
            values["trace_sampler"] = sampler
        sampler_arg = env("OTEL_TRACES_SAMPLER_ARG")
        if sampler_arg:
            try:
                values["trace_sample_ratio"] = float(sampler_arg)
            except ValueError:
                logger.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using 1.0", sampler_arg)
        health_ratio = env("LLMCLUSTER_HEALTH_SPAN_RATIO")
        if health_ratio:
            values["health_span_ratio"] = float(health_ratio)
        values["otel_service_name"] = env("OTEL_SERVICE_NAME")
        values["resource_attributes"] = env("OTEL_RESOURCE_ATTRIBUTES")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> TracingConfig:
        """The environment, overridden by the flags given on the command line."""
        given = {f.name: getattr(ns, f.name, None) for f in dataclasses.fields(cls)}
        return cls.from_env(**given)


def add_tracing_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the :class:`TracingConfig` flags (``--trace-exporter``, ``--otlp-endpoint``…)."""
    add_arguments(parser, TracingConfig)


@functools.cache
def package_version() -> str:
    """The installed ``llmcluster`` version, or ``0.0.0`` when run from a bare checkout.
    Cached: get_tracer asks for it on every span, and each look-up reads the package
    metadata from disk (a fifth of a null-engine worker's CPU before it was cached)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmcluster")
    except PackageNotFoundError:
        return "0.0.0"


def _parse_resource_attributes(raw: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


class HealthAwareSampler(Sampler):
    """Keeps spans marked ``llmcluster.health_check=True`` at most at ``health_ratio``.

    Consul polls every worker every few seconds; keeping all of those spans drowns real
    traffic, keeping none hides a flapping worker. Other spans go to ``base``. The mark
    must be among the attributes given at span start (samplers see nothing later).
    """

    def __init__(self, base: Sampler, health_ratio: float) -> None:
        self._base = base
        self._health_ratio = health_ratio
        self._health = TraceIdRatioBased(health_ratio)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        result = self._base.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        if (
            not (attributes and attributes.get(ATTR_HEALTH_CHECK))
            or not result.decision.is_sampled()
        ):
            return result
        # Health spans also pass the health ratio: always_off still means off, and both
        # ratio samplers hash the same trace id, so the effective ratio is the smaller one.
        return self._health.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"HealthAware{{base={self._base.get_description()},health={self._health_ratio}}}"


def build_sampler(config: TracingConfig) -> Sampler:
    """The sampler named by ``config``, with health-check spans at ``health_span_ratio``."""
    name = config.trace_sampler
    root_name = name.removeprefix("parentbased_")
    root: Sampler
    if root_name == "always_on":
        root = ALWAYS_ON
    elif root_name == "always_off":
        root = ALWAYS_OFF
    else:
        root = TraceIdRatioBased(config.trace_sample_ratio)
    root = HealthAwareSampler(root, config.health_span_ratio)
    # ParentBased: a child follows its parent's decision, so one trace is all-or-nothing
    # across router, worker and trainer.
    return ParentBased(root) if name.startswith("parentbased_") else root


class _State:
    """This process's tracing state (not configuration): the provider we installed."""

    lock = threading.Lock()
    provider: TracerProvider | None = None
    service_name: str | None = None


def setup_tracing(service_name: str, config: TracingConfig | None = None) -> TracerProvider:
    """Installs the global tracer provider for this process; later calls return the first.

    ``service_name`` is the role's name (:data:`SERVICE_ROUTER`, …); ``OTEL_SERVICE_NAME``
    / ``--otel-service-name`` override it. With exporter ``none`` spans are still created
    (so ids propagate to the next hop) but not exported.
    """
    with _State.lock:
        if _State.provider is not None:
            if service_name != _State.service_name:
                logger.warning(
                    "tracing already set up as %s; ignoring setup as %s",
                    _State.service_name,
                    service_name,
                )
            return _State.provider
        config = config or TracingConfig.from_env()
        attributes: dict[str, Any] = _parse_resource_attributes(config.resource_attributes)
        attributes.update(
            {
                "service.name": config.otel_service_name or service_name,
                "service.namespace": "llmcluster",
                "service.version": package_version(),
                "service.instance.id": config.service_instance_id or str(uuid.uuid4()),
            }
        )
        provider = TracerProvider(
            resource=Resource.create(attributes),
            sampler=build_sampler(config),
            # We flush in shutdown_tracing(); the SDK's own atexit hook stays as a backstop.
            shutdown_on_exit=True,
        )
        exporter = config.exporter
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
                )
            )
        elif exporter == "console":
            # stderr keeps stdout for the program's own output (llmcluster generate).
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
        trace.set_tracer_provider(provider)
        _State.provider = provider
        _State.service_name = service_name
        logger.info(
            "tracing: service=%s exporter=%s endpoint=%s sampler=%s",
            attributes["service.name"],
            exporter,
            config.otlp_endpoint if exporter == "otlp" else "-",
            provider.sampler.get_description(),
        )
        return provider


def shutdown_tracing(timeout_s: float = 10.0) -> None:
    """Flushes queued spans and stops the exporter; safe to call more than once."""
    with _State.lock:
        provider = _State.provider
        if provider is None:
            return
        try:
            provider.force_flush(int(timeout_s * 1000))
            provider.shutdown()
        except Exception:  # noqa: BLE001 — exit paths must not raise over telemetry
            logger.exception("tracing shutdown failed")
        # The global provider cannot be replaced (OTel API rule), so _State.provider stays
        # and a later setup_tracing() returns the shut-down one: spans become no-ops.


def get_tracer(name: str) -> trace.Tracer:
    """A tracer from the global provider (a no-op one before :func:`setup_tracing`)."""
    return trace.get_tracer(name, package_version())


# --- propagation ---------------------------------------------------------------------------

_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def inject_to_dict(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C headers (``traceparent``, ``tracestate``, ``baggage``) for ``ctx`` (default: current).

    Empty when there is no valid span; fill ``WorkItem.trace_context`` with it.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def context_from_dict(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a carrier from :func:`inject_to_dict` describes (empty carrier = root)."""
    # Context(): extracting into an empty context keeps an unrelated current span (e.g. the
    # stream's) from becoming the parent when the carrier has no traceparent.
    return _PROPAGATOR.extract(dict(carrier or {}), context=otel_context.Context())


def grpc_metadata_from_context(
    ctx: otel_context.Context | None = None,
) -> list[tuple[str, str]]:
    """``metadata=`` for an outgoing gRPC call, carrying ``ctx`` (default: current)."""
    return list(inject_to_dict(ctx).items())


def context_from_grpc_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> otel_context.Context:
    """The caller's context from ``servicer_context.invocation_metadata()`` (sync or aio)."""
    carrier: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, str):  # binary (-bin) headers are never trace context
            carrier[key.lower()] = value
    return context_from_dict(carrier)


def subprocess_env(
    service_name: str = SERVICE_TRAINER, ctx: otel_context.Context | None = None
) -> dict[str, str]:
    """Variables to add to a child process's environment so its spans join this trace.

    Sets ``TRACEPARENT``/``TRACESTATE`` and ``OTEL_SERVICE_NAME`` (the child inherits the
    parent's, which would make trainer spans look like worker spans). Use::

        subprocess.Popen(cmd, env={**os.environ, **subprocess_env()})
    """
    out = {"OTEL_SERVICE_NAME": service_name}
    headers = inject_to_dict(ctx)
    if "traceparent" in headers:
        out[ENV_TRACEPARENT] = headers["traceparent"]
        if headers.get("tracestate"):
            out[ENV_TRACESTATE] = headers["tracestate"]
    return out


def context_from_env() -> otel_context.Context:
    """The parent context a parent process passed via :func:`subprocess_env`."""
    carrier = {}
    traceparent = env(ENV_TRACEPARENT)
    if traceparent:
        carrier["traceparent"] = traceparent
        carrier["tracestate"] = env(ENV_TRACESTATE) or ""
    return context_from_dict(carrier)


@contextlib.contextmanager
def attached(ctx: otel_context.Context) -> Iterator[None]:
    """Makes ``ctx`` current for the ``with`` block (e.g. the whole training process)."""
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


# --- span helpers --------------------------------------------------------------------------


def current_traceparent() -> str | None:
    """The current span's ``traceparent``; store it (e.g. in an adapter's metadata.json)."""
    return inject_to_dict().get("traceparent")


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, or None outside a valid span (for logs)."""
    span_ctx = trace.get_current_span().get_span_context()
    return trace.format_trace_id(span_ctx.trace_id) if span_ctx.is_valid else None


def link_from_dict(
    carrier: Mapping[str, str] | None, attributes: Mapping[str, Any] | None = None
) -> Link | None:
    """A span link to the span a carrier describes, or None if it holds no valid context.

    Use for the batch a request rode in, and for the training job behind an adapter.
    """
    span_ctx = trace.get_current_span(context_from_dict(carrier)).get_span_context()
    if not span_ctx.is_valid:
        return None
    return Link(span_ctx, dict(attributes or {}))


def link_from_traceparent(
    traceparent: str | None, attributes: Mapping[str, Any] | None = None
) -> Link | None:
    """:func:`link_from_dict` for a bare ``traceparent`` string (None/invalid → None)."""
    return link_from_dict({"traceparent": traceparent} if traceparent else None, attributes)


def record_error(span: trace.Span, exc: BaseException, code: Any | None = None) -> None:
    """Records ``exc`` on ``span`` as an exception event and marks the span as failed.

    ``code`` is a ``grpc.StatusCode`` (or its name) when the error maps to one.
    """
    span.record_exception(exc)
    span.set_attribute(ATTR_ERROR_TYPE, type(exc).__qualname__)
    if code is not None:
        code_name = getattr(code, "name", str(code))
        span.set_attribute(ATTR_RPC_GRPC_STATUS_CODE, code_name)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:512]))


def genai_request_attributes(
    *,
    model: str,
    operation: str = GEN_AI_OPERATION_TEXT_COMPLETION,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    adapter: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """GenAI request attributes for a span (None values left out)."""
    attrs: dict[str, Any] = {
        GEN_AI_OPERATION_NAME: operation,
        GEN_AI_SYSTEM: GEN_AI_SYSTEM_VALUE,
        GEN_AI_PROVIDER_NAME: GEN_AI_SYSTEM_VALUE,
        GEN_AI_REQUEST_MODEL: model,
    }
    optional = {
        GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
        GEN_AI_REQUEST_TEMPERATURE: temperature,
        GEN_AI_REQUEST_TOP_P: top_p,
        GEN_AI_REQUEST_TOP_K: top_k,
        GEN_AI_REQUEST_SEED: seed,
        ATTR_ADAPTER: adapter or None,
        ATTR_REQUEST_ID: request_id or None,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    return attrs


def genai_usage_attributes(
    *, input_tokens: int, output_tokens: int, finish_reason: str | None = None
) -> dict[str, Any]:
    """GenAI usage/response attributes, set when a request finishes."""
    attrs: dict[str, Any] = {
        GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
    }
    if finish_reason:
        attrs[GEN_AI_RESPONSE_FINISH_REASONS] = [finish_reason.lower()]
    return attrs


def health_span_attributes(**extra: Any) -> dict[str, Any]:
    """Start attributes for a health-check / self-test span (sampled by health ratio)."""
    return {ATTR_HEALTH_CHECK: True, **extra}


@contextlib.contextmanager
def server_span(
    tracer: trace.Tracer,
    name: str,
    invocation_metadata: Iterable[tuple[str, str | bytes]] | None,
    *,
    attributes: Mapping[str, Any] | None = None,
    links: Sequence[Link] | None = None,
) -> Iterator[trace.Span]:
    """A current SERVER span whose parent is the caller's context from gRPC metadata.

    Exceptions escaping the block are recorded (:func:`record_error`) and re-raised;
    cancellation (``asyncio.CancelledError``, ``GeneratorExit``) only sets the status
    message, since a cancelled stream is not a server error.
    """
    parent = context_from_grpc_metadata(invocation_metadata)
    attrs = {ATTR_RPC_SYSTEM: "grpc", **(attributes or {})}
    with tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attrs,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except GeneratorExit:
            span.set_attribute(ATTR_RPC_GRPC_STATUS_CODE, "CANCELLED")
            raise
        except BaseException as exc:
            if type(exc).__name__ == "CancelledError":
                span.set_attribute(ATTR_RPC_GRPC_STATUS_CODE, "CANCELLED")
            else:
                record_error(span, exc)
            raise


class TracedHealthServicer(health_aio.HealthServicer):
    """``grpc.health.v1.Health`` (asyncio) whose ``Check`` produces a span.

    A drop-in for ``grpc_health.v1.health.aio.HealthServicer``: Consul's gRPC checks (and
    Kubernetes probes) each become a root span, kept at ``health_span_ratio``. A check
    answered with anything but SERVING, or NOT_FOUND, is marked as an error so that a
    flapping worker stands out in Jaeger. ``Watch`` is left untraced (long-lived).
    """

    def __init__(self, tracer: trace.Tracer | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tracer = tracer

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:  # noqa: N802
        tracer = self._tracer or get_tracer(__name__)
        attrs = health_span_attributes(
            **{
                ATTR_RPC_SYSTEM: "grpc",
                ATTR_RPC_SERVICE: "grpc.health.v1.Health",
                ATTR_RPC_METHOD: "Check",
                ATTR_HEALTH_SERVICE: request.service,
            }
        )
        with server_span(
            tracer, "grpc.health.v1.Health/Check", context.invocation_metadata(), attributes=attrs
        ) as span:
            response = await super().Check(request, context)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            span.set_attribute(ATTR_HEALTH_STATUS, status)
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                span.set_status(Status(StatusCode.ERROR, status))
            return response

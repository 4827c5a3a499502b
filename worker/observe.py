"""Per-request tracing and metrics on the worker, shared by the direct Generate path and
the router link: one span per request (parented by the caller's trace context), with
queue / prefill / decode child spans, a ``first_token`` event, GenAI attributes, a link
to the training trace of the adapter used, and the latency histograms."""

from __future__ import annotations

import time
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from common.errors import RequestError, status_of
from common.metrics import WorkerMetrics
from common.tracing import (
    ATTR_ADAPTER,
    ATTR_LINK_KIND,
    ATTR_QUEUE_MS,
    ATTR_TTFT_MS,
    ATTR_WORKER_ID,
    EVENT_FIRST_TOKEN,
    GEN_AI_OPERATION_CHAT,
    GEN_AI_OPERATION_TEXT_COMPLETION,
    GEN_AI_RESPONSE_MODEL,
    genai_request_attributes,
    genai_usage_attributes,
    get_tracer,
    link_from_traceparent,
    record_error,
)
from common.validation import GenerationSpec
from worker.engine import SeqOutput

_NS = 1_000_000_000


def _wall_ns(monotonic_s: float) -> int:
    """Converts a monotonic timestamp to wall-clock ns (spans need epoch times)."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * _NS)


class RequestObserver:
    """Follows one request from arrival to its end."""

    def __init__(
        self,
        metrics: WorkerMetrics | None,
        method: str,
        spec: GenerationSpec,
        worker_id: str,
        parent: otel_context.Context | None,
        adapter_ref: Any = None,
        links: list[Any] | None = None,
        served_model: str = "",
    ) -> None:
        self._metrics = metrics
        self._method = method
        self._operation = (
            GEN_AI_OPERATION_CHAT if spec.messages else GEN_AI_OPERATION_TEXT_COMPLETION
        )
        self._arrival = time.monotonic()
        self._admitted: float | None = None
        self._first: float | None = None
        self._last: float | None = None
        # The per-version series' labels: the version actually resolved (a split's pick).
        self._adapter_labels: tuple[str, str] = (
            (adapter_ref.name, str(adapter_ref.version)) if adapter_ref is not None else ("", "")
        )
        attrs = genai_request_attributes(
            # The model the worker serves when the request names none (empty = default).
            model=spec.model or served_model or "default",
            operation=self._operation,
            max_tokens=spec.params.max_new_tokens,
            temperature=spec.params.temperature,
            top_p=spec.params.top_p,
            top_k=spec.params.top_k or None,
            seed=spec.params.seed,
            adapter=spec.adapter or None,
            request_id=spec.request_id or None,
        )
        attrs[ATTR_WORKER_ID] = worker_id
        if served_model:
            attrs[GEN_AI_RESPONSE_MODEL] = served_model
        all_links = [link for link in (links or []) if link is not None]
        if adapter_ref is not None:
            attrs[ATTR_ADAPTER] = adapter_ref.ref
            # Jump from an answer to the training run that produced its adapter.
            training = link_from_traceparent(
                adapter_ref.metadata.get("traceparent"), {ATTR_LINK_KIND: "training_job"}
            )
            if training is not None:
                all_links.append(training)
        self.span = get_tracer(__name__).start_span(
            "worker.request",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attrs,
            links=all_links,
        )

    def admitted(self) -> None:
        """Engine thread: the request left the queue."""
        self._admitted = time.monotonic()

    def on_output(self, out: SeqOutput) -> None:
        now = time.monotonic()
        if out.tokens:
            if self._first is None:
                self._first = now
                self.span.add_event(EVENT_FIRST_TOKEN)
                if self._metrics is not None:
                    self._metrics.observe_ttft(now - self._arrival)
                    adapter, version = self._adapter_labels
                    self._metrics.observe_adapter_ttft(adapter, version, now - self._arrival)
            elif self._last is not None and self._metrics is not None:
                self._metrics.observe_inter_token(
                    (now - self._last) / len(out.tokens), count=len(out.tokens)
                )
            self._last = now
        if out.done:
            self.finish(out.error, out)

    def _child(self, name: str, start: float | None, end: float | None) -> None:
        if start is None or end is None:
            return
        ctx = trace.set_span_in_context(self.span)
        child = get_tracer(__name__).start_span(name, context=ctx, start_time=_wall_ns(start))
        child.end(end_time=_wall_ns(end))

    def finish(self, error: BaseException | None, out: SeqOutput | None = None) -> None:
        """Ends the span and records the request's metrics (exactly once)."""
        if not self.span.is_recording() and self._metrics is None:
            return
        end = time.monotonic()
        self._child("queue", self._arrival, self._admitted)
        self._child("prefill", self._admitted, self._first)
        self._child("decode", self._first, end if self._first is not None else None)
        code = grpc.StatusCode.OK
        if error is not None:
            code, _ = status_of(error)
            if not isinstance(error, RequestError) or code not in (
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                record_error(self.span, error, code)
            else:
                self.span.set_attribute("llmcluster.end", code.name)
        if out is not None and out.usage is not None:
            usage = out.usage
            self.span.set_attributes(
                genai_usage_attributes(
                    input_tokens=usage.prompt_tokens,
                    output_tokens=usage.completion_tokens,
                    finish_reason=out.finish_reason,
                )
            )
            self.span.set_attribute(ATTR_QUEUE_MS, usage.queue_ms)
            self.span.set_attribute(ATTR_TTFT_MS, usage.time_to_first_token_ms)
            if self._metrics is not None:
                self._metrics.observe_queue_time(usage.queue_ms / 1000.0)
                self._metrics.observe_request_done(
                    e2e_s=usage.total_ms / 1000.0,
                    prompt_tokens=usage.prompt_tokens,
                    generation_tokens=usage.completion_tokens,
                    ttft_s=usage.time_to_first_token_ms / 1000.0,  # same clock as total_ms
                    operation=self._operation,
                )
        if self._metrics is not None:
            self._metrics.record_request(self._method, code)
            adapter, version = self._adapter_labels
            self._metrics.record_adapter_request(adapter, version, code)
        self.span.end()
        self._metrics = None  # finish once

"""The router's public ``Generate`` servicer: thin translation onto :class:`Cluster`.

The FineTune proxy belongs beside it (``FineTuneProxy`` in its own module, registered
in :func:`router.server.start_router`), added by the fine-tuning issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from common import tracing
from common.auth import current_tenant_name
from common.errors import Unavailable, abort_with, status_of
from common.feedback import FeedbackBook
from common.metrics import API_GRPC, RouterMetrics
from common.pb import generate_pb2, generate_pb2_grpc
from common.validation import feedback_from_pb
from router.cluster import Cluster, Routed
from router.link import Delta, Finished

logger = logging.getLogger(__name__)

GENERATE_SERVICE = generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name
LIST_MODELS_TIMEOUT_S = 5.0


def _deadline_unix_ms(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    if remaining is None:
        return 0
    return int((time.time() + remaining) * 1000)


def _with_request_id(request: generate_pb2.GenerateRequest) -> generate_pb2.GenerateRequest:
    if request.request_id:
        return request
    copy = generate_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = uuid.uuid4().hex
    return copy


def api_of(context: object) -> str:
    """The front door a servicer call came in by (the ``api`` metrics label): the HTTP
    gateway's in-process context says ``api = "openai"``; a gRPC context has none."""
    return str(getattr(context, "api", API_GRPC))


def _set_usage(span: trace.Span, event: Finished) -> None:
    span.set_attributes(
        tracing.genai_usage_attributes(
            input_tokens=event.usage.prompt_tokens,
            output_tokens=event.usage.completion_tokens,
            finish_reason=generate_pb2.FinishReason.Name(event.finish_reason),
        )
    )
    span.set_attribute(tracing.ATTR_WORKER_ID, event.usage.worker_id)


def _routing_metadata(routed: Routed) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the worker and SubmitBatch that served the request
    (like Envoy's x-envoy-upstream-host; tests read it to see coalescing)."""
    if routed.link is None or routed.request is None:
        return ()
    return (
        ("llmcluster-worker", routed.link.address),
        ("llmcluster-batch", f"{routed.link.address}/{routed.request.batch_id}"),
        ("llmcluster-attempts", str(routed.attempts)),
    )


class _Observation:
    """Metrics of one request as the client sees it (TTFT, inter-token gaps, status),
    labelled by the API it came in by. A gateway call's status is counted by the gateway
    (once, as ``openai.<endpoint>``), not here a second time as ``Generate``."""

    def __init__(
        self,
        metrics: RouterMetrics | None,
        method: str,
        chat: bool = False,
        time_remaining_s: float | None = None,
        api: str = API_GRPC,
    ) -> None:
        self.metrics = metrics
        self.method = method
        self.api = api
        self.operation = (
            tracing.GEN_AI_OPERATION_CHAT if chat else tracing.GEN_AI_OPERATION_TEXT_COMPLETION
        )
        self.start = time.monotonic()
        # gRPC cancels the handler when the caller's deadline passes: tell the two apart.
        self.deadline = None if time_remaining_s is None else self.start + time_remaining_s
        self.first: float | None = None
        self.last: float | None = None
        self.code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # until proven otherwise

    def delta(self, event: Delta) -> None:
        if self.metrics is None or not event.tokens:
            return
        now = time.monotonic()
        if self.last is None:
            self.first = now
            self.metrics.observe_ttft(now - self.start, api=self.api)
        else:
            self.metrics.observe_inter_token(now - self.last, len(event.tokens), api=self.api)
        self.last = now

    def finished(self, event: Finished) -> None:
        self.code = grpc.StatusCode.OK
        if self.metrics is not None:
            self.metrics.observe_request_done(
                e2e_s=time.monotonic() - self.start,
                prompt_tokens=event.usage.prompt_tokens,
                generation_tokens=event.usage.completion_tokens,
                ttft_s=None if self.first is None else self.first - self.start,
                operation=self.operation,
                api=self.api,
            )

    def done(self) -> None:
        if self.metrics is not None and self.api == API_GRPC:
            code = self.code
            expired = self.deadline is not None and time.monotonic() >= self.deadline
            if code == grpc.StatusCode.CANCELLED and expired:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            self.metrics.record_request(self.method, code)


class GenerateService(generate_pb2_grpc.GenerateServicer):
    """Public Generate API of the router."""

    def __init__(self, cluster: Cluster, metrics: RouterMetrics | None = None) -> None:
        self.cluster = cluster
        self.metrics = metrics
        # The version each finished request was served by, for RecordFeedback.
        self.feedback = FeedbackBook(metrics)
        self._tracer = tracing.get_tracer(__name__)

    def _span(self, name: str, request: generate_pb2.GenerateRequest, context):
        p = request.params
        attributes = tracing.genai_request_attributes(
            model=request.model,
            operation=tracing.GEN_AI_OPERATION_CHAT
            if len(request.messages)
            else tracing.GEN_AI_OPERATION_TEXT_COMPLETION,
            max_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
            temperature=p.temperature,
            seed=p.seed if p.HasField("seed") else None,
            adapter=request.adapter,
            request_id=request.request_id,
        )
        attributes[tracing.ATTR_RPC_SERVICE] = GENERATE_SERVICE
        attributes[tracing.ATTR_RPC_METHOD] = name
        if tenant := current_tenant_name():
            attributes[tracing.ATTR_TENANT] = tenant
        return tracing.server_span(
            self._tracer, "router request", context.invocation_metadata(), attributes=attributes
        )

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        request = _with_request_id(request)
        routed = Routed()
        obs = _Observation(
            self.metrics,
            "GenerateStream",
            chat=len(request.messages) > 0,
            time_remaining_s=context.time_remaining(),
            api=api_of(context),
        )
        try:
            with self._span("GenerateStream", request, context) as span:
                self.cluster.validate(request)
                events = self.cluster.generate(
                    request,
                    deadline_unix_ms=_deadline_unix_ms(context),
                    routed=routed,
                    stream_interval_s=self.cluster.config.stream_interval_ms / 1000.0,
                )
                # aclosing: on client cancel / deadline the generator's finally sends Cancel.
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, Delta):
                            if obs.last is None and event.tokens:
                                span.add_event(tracing.EVENT_FIRST_TOKEN)
                            obs.delta(event)
                            yield generate_pb2.GenerateStreamResponse(
                                request_id=request.request_id,
                                tokens=event.tokens,
                                text=event.text,
                            )
                        else:
                            obs.finished(event)
                            _set_usage(span, event)
                            self.feedback.served(request.request_id, event.usage.adapter)
                            context.set_trailing_metadata(_routing_metadata(routed))
                            yield generate_pb2.GenerateStreamResponse(
                                request_id=request.request_id,
                                finish_reason=event.finish_reason,  # type: ignore[arg-type]
                                usage=event.usage,
                            )
        except Exception as exc:  # RequestError: its status; anything else: INTERNAL
            obs.code = status_of(exc)[0]
            context.set_trailing_metadata(_routing_metadata(routed))
            await abort_with(context, exc)
        finally:
            obs.done()

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        request = _with_request_id(request)
        routed = Routed()
        obs = _Observation(
            self.metrics,
            "Generate",
            chat=len(request.messages) > 0,
            time_remaining_s=context.time_remaining(),
            api=api_of(context),
        )
        want_tokens = request.params.logprobs > 0
        response = generate_pb2.GenerateResponse(request_id=request.request_id)
        texts: list[str] = []
        try:
            with self._span("Generate", request, context) as span:
                self.cluster.validate(request)
                events = self.cluster.generate(
                    request, deadline_unix_ms=_deadline_unix_ms(context), routed=routed
                )
                async with contextlib.aclosing(events):
                    async for event in events:
                        if isinstance(event, Delta):
                            obs.delta(event)
                            texts.append(event.text)
                            if want_tokens:
                                response.tokens.extend(event.tokens)
                        else:
                            obs.finished(event)
                            _set_usage(span, event)
                            self.feedback.served(request.request_id, event.usage.adapter)
                            response.finish_reason = event.finish_reason  # type: ignore[assignment]
                            response.usage.CopyFrom(event.usage)
        except Exception as exc:  # RequestError: its status; anything else: INTERNAL
            obs.code = status_of(exc)[0]
            context.set_trailing_metadata(_routing_metadata(routed))
            await abort_with(context, exc)
        finally:
            obs.done()
        response.text = "".join(texts)
        context.set_trailing_metadata(_routing_metadata(routed))
        return response

    async def RecordFeedback(  # noqa: N802 - gRPC method name
        self, request: generate_pb2.RecordFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.RecordFeedbackResponse:
        try:
            request_id, score = feedback_from_pb(request)
            adapter = self.feedback.record(request_id, score)
        except Exception as exc:
            await abort_with(context, exc)
        return generate_pb2.RecordFeedbackResponse(adapter=adapter)

    async def ListModels(
        self, request: generate_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.ListModelsResponse:
        """The union of every healthy worker's ListModels (first worker's entry wins,
        except supports_constraints: true only when every worker listing the entry says so,
        since a constrained request for it may be routed to any of them)."""
        links = self.cluster.healthy_links()
        if not links:
            await abort_with(context, Unavailable("no healthy worker"))
        replies = await asyncio.gather(
            *(
                link.generate_stub.ListModels(request, timeout=LIST_MODELS_TIMEOUT_S)
                for link in links
            ),
            return_exceptions=True,
        )
        merged = generate_pb2.ListModelsResponse()
        seen: dict[tuple[str, str, int], generate_pb2.ModelEntry] = {}
        errors: list[str] = []
        for link, reply in zip(links, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append(f"{link.address}: {reply}")
                continue
            for entry in reply.models:
                key = (entry.name, entry.version, entry.kind)
                first = seen.get(key)
                if first is None:
                    merged.models.append(entry)
                    seen[key] = merged.models[-1]
                elif not entry.supports_constraints:
                    first.supports_constraints = False
        if errors and len(errors) == len(links):
            await abort_with(
                context, Unavailable("ListModels failed on every worker: " + "; ".join(errors))
            )
        if errors:
            logger.warning("ListModels: some workers failed: %s", "; ".join(errors))
        return merged

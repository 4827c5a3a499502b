"""The router's public ``Generate`` servicer: thin translation onto :class:`Cluster`.

The FineTune proxy belongs beside it (``FineTuneProxy`` in its own module, registered
in :func:`router.server.build_server`), added by the fine-tuning issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from common.errors import RequestError, Unavailable, abort_with
from common.pb import generate_pb2, generate_pb2_grpc
from router.cluster import Cluster, Routed
from router.link import Delta

logger = logging.getLogger(__name__)

# W3C trace context headers forwarded to the worker in WorkItem.trace_context.
_TRACE_HEADERS = ("traceparent", "tracestate")
LIST_MODELS_TIMEOUT_S = 5.0


def _deadline_unix_ms(context: grpc.aio.ServicerContext) -> int:
    remaining = context.time_remaining()
    if remaining is None:
        return 0
    return int((time.time() + remaining) * 1000)


def _trace_context(context: grpc.aio.ServicerContext) -> dict[str, str]:
    metadata = context.invocation_metadata() or ()
    return {k: str(v) for k, v in metadata if k in _TRACE_HEADERS}


def _with_request_id(request: generate_pb2.GenerateRequest) -> generate_pb2.GenerateRequest:
    if request.request_id:
        return request
    copy = generate_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.request_id = uuid.uuid4().hex
    return copy


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


class GenerateService(generate_pb2_grpc.GenerateServicer):
    """Public Generate API of the router."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        request = _with_request_id(request)
        routed = Routed()
        try:
            self.cluster.validate(request)
        except RequestError as exc:
            await abort_with(context, exc)
        events = self.cluster.generate(
            request,
            deadline_unix_ms=_deadline_unix_ms(context),
            trace_context=_trace_context(context),
            routed=routed,
        )
        try:
            # aclosing: on client cancel / deadline the generator's finally sends Cancel.
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Delta):
                        yield generate_pb2.GenerateStreamResponse(
                            request_id=request.request_id, tokens=event.tokens, text=event.text
                        )
                    else:
                        context.set_trailing_metadata(_routing_metadata(routed))
                        yield generate_pb2.GenerateStreamResponse(
                            request_id=request.request_id,
                            finish_reason=event.finish_reason,  # type: ignore[arg-type]
                            usage=event.usage,
                        )
        except RequestError as exc:
            context.set_trailing_metadata(_routing_metadata(routed))
            await abort_with(context, exc)

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.GenerateResponse:
        request = _with_request_id(request)
        routed = Routed()
        try:
            self.cluster.validate(request)
        except RequestError as exc:
            await abort_with(context, exc)
        want_tokens = request.params.logprobs > 0
        response = generate_pb2.GenerateResponse(request_id=request.request_id)
        texts: list[str] = []
        events = self.cluster.generate(
            request,
            deadline_unix_ms=_deadline_unix_ms(context),
            trace_context=_trace_context(context),
            routed=routed,
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if isinstance(event, Delta):
                        texts.append(event.text)
                        if want_tokens:
                            response.tokens.extend(event.tokens)
                    else:
                        response.finish_reason = event.finish_reason  # type: ignore[assignment]
                        response.usage.CopyFrom(event.usage)
        except RequestError as exc:
            context.set_trailing_metadata(_routing_metadata(routed))
            await abort_with(context, exc)
        response.text = "".join(texts)
        context.set_trailing_metadata(_routing_metadata(routed))
        return response

    async def ListModels(
        self, request: generate_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generate_pb2.ListModelsResponse:
        """The union of every healthy worker's ListModels (first worker's entry wins)."""
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
        seen: set[tuple[str, str, int]] = set()
        errors: list[str] = []
        for link, reply in zip(links, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append(f"{link.address}: {reply}")
                continue
            for entry in reply.models:
                key = (entry.name, entry.version, entry.kind)
                if key not in seen:
                    seen.add(key)
                    merged.models.append(entry)
        if errors and len(errors) == len(links):
            await abort_with(
                context, Unavailable("ListModels failed on every worker: " + "; ".join(errors))
            )
        if errors:
            logger.warning("ListModels: some workers failed: %s", "; ".join(errors))
        return merged

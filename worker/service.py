"""The worker's public ``Generate`` servicer: validate, build the engine request, stream
the engine's outputs back. No torch here."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from common.errors import Cancelled, Unavailable, abort_with
from common.pb import generate_pb2, generate_pb2_grpc
from common.tracing import context_from_grpc_metadata
from common.validation import generation_spec_from_pb
from worker.convert import stream_response_to_pb
from worker.observe import RequestObserver
from worker.runtime import AsyncQueueSink, WorkerState

logger = logging.getLogger(__name__)


def deadline_from_context(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + max(0.0, remaining)


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    """Generate, GenerateStream and ListModels served directly by a worker."""

    def __init__(self, state: WorkerState) -> None:
        self._state = state

    async def _stream(
        self,
        request: generate_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        method: str,
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        state = self._state
        try:
            if not state.accepting.is_set():
                raise Unavailable("worker is not accepting requests (loading or draining)")
            runtime = state.runtime
            spec = generation_spec_from_pb(request, runtime.limits)
            sink = AsyncQueueSink(asyncio.get_running_loop())
            req = runtime.build_request(spec, sink, deadline_from_context(context))
        except Exception as exc:
            state.record_rejected(method, exc)
            raise
        request_id = spec.request_id or uuid.uuid4().hex
        observer = RequestObserver(
            state.metrics,
            method,
            spec,
            state.worker_id,
            context_from_grpc_metadata(context.invocation_metadata()),
            req.adapter,
            served_model=state.runtime.source.name,
        )
        req.on_admitted = observer.admitted
        try:
            key = runtime.engine.submit(req)
        except Exception as exc:
            observer.finish(exc)
            raise
        try:
            while True:
                _, outputs = await sink.queue.get()
                for out in outputs:
                    observer.on_output(out)
                    if out.error is not None:
                        raise out.error
                    yield stream_response_to_pb(out, request_id, state.worker_id)
                    if out.done:
                        return
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: free the slot and KV cache at the next iteration.
            runtime.engine.cancel(key, "client cancelled")
            observer.finish(Cancelled("client cancelled"))
            raise

    async def GenerateStream(self, request, context):  # noqa: N802 - gRPC method name
        try:
            async for msg in self._stream(request, context, "GenerateStream"):
                yield msg
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    async def Generate(self, request, context):  # noqa: N802 - gRPC method name
        text: list[str] = []
        tokens = []
        last = None
        try:
            async for msg in self._stream(request, context, "Generate"):
                text.append(msg.text)
                tokens.extend(msg.tokens)
                last = msg
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)
        assert last is not None
        return generate_pb2.GenerateResponse(
            request_id=last.request_id,
            text="".join(text),
            finish_reason=last.finish_reason,
            usage=last.usage,
            tokens=tokens if request.params.logprobs > 0 else [],
        )

    async def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        return generate_pb2.ListModelsResponse(models=self._state.runtime.list_models())

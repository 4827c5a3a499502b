"""The worker's public ``Generate`` servicer: validate, build the engine request, stream
the engine's outputs back. No torch here."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from common.errors import Unavailable, abort_with
from common.pb import generate_pb2, generate_pb2_grpc
from common.validation import generation_spec_from_pb
from worker.convert import stream_response_to_pb
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
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        if not self._state.accepting.is_set():
            raise Unavailable("worker is not accepting requests (loading or draining)")
        spec = generation_spec_from_pb(request, self._state.runtime.limits)
        request_id = spec.request_id or uuid.uuid4().hex
        sink = AsyncQueueSink(asyncio.get_running_loop())
        engine = self._state.runtime.engine
        req = self._state.runtime.build_request(spec, sink, deadline_from_context(context))
        key = engine.submit(req)
        try:
            while True:
                _, outputs = await sink.queue.get()
                for out in outputs:
                    if out.error is not None:
                        raise out.error
                    yield stream_response_to_pb(out, request_id, self._state.worker_id)
                    if out.done:
                        return
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: free the slot and KV cache at the next iteration.
            engine.cancel(key, "client cancelled")
            raise

    async def GenerateStream(self, request, context):  # noqa: N802 - gRPC method name
        try:
            async for msg in self._stream(request, context):
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
            async for msg in self._stream(request, context):
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

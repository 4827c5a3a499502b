"""The worker's public ``Generate`` servicer: validate, build the engine request, stream
the engine's outputs back. No torch here."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from common.errors import Cancelled, Unavailable, abort_with
from common.feedback import FeedbackBook
from common.pb import generate_pb2, generate_pb2_grpc
from common.tracing import context_from_grpc_metadata
from common.validation import feedback_from_pb, generation_spec_from_pb
from worker.convert import stream_response_to_pb
from worker.engine import SeqOutput
from worker.front import deadline_from_remaining_s
from worker.observe import RequestObserver
from worker.runtime import WorkerState

logger = logging.getLogger(__name__)


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    """Generate, GenerateStream and ListModels served directly by a worker: a thin client
    of the engine front (worker.front)."""

    def __init__(self, state: WorkerState) -> None:
        self._state = state
        self._feedback = FeedbackBook(state.metrics)  # versions of direct requests

    async def _stream(
        self,
        request: generate_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext,
        method: str,
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        state = self._state
        queue: asyncio.Queue[list[SeqOutput]] = asyncio.Queue()
        try:
            if not state.accepting.is_set():
                raise Unavailable("worker is not accepting requests (loading or draining)")
            front = state.front
            spec = generation_spec_from_pb(request, front.runtime.limits)
            stream = front.stream(lambda step, outputs: queue.put_nowait(outputs))
            req = await front.prepare(
                spec, stream, deadline_from_remaining_s(context.time_remaining())
            )
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
            served_model=front.runtime.source.name,
        )
        req.on_admitted = observer.admitted
        try:
            key = front.submit(req)
        except Exception as exc:
            observer.finish(exc)
            raise

        def on_rpc_done(_context: object) -> None:
            # The client went away (cancel, deadline, broken connection): free the slot
            # and KV cache at the next iteration. The call's own end is the signal, not
            # this generator's exit: gRPC may cancel while it writes a message, outside
            # the generator. Both calls are no-ops once the request has ended.
            front.cancel(key, "client cancelled")
            observer.finish(Cancelled("client cancelled"))

        context.add_done_callback(on_rpc_done)
        if method == "GenerateStream":
            # Headers once queued: a streaming client knows its request was accepted
            # before the first token (and a test can order steps on it).
            await context.send_initial_metadata(())
        while True:
            for out in await queue.get():
                observer.on_output(out)
                if out.error is not None:
                    raise out.error
                yield stream_response_to_pb(out, request_id, state.worker_id)
                if out.done:
                    if out.usage is not None:
                        self._feedback.served(request_id, out.usage.adapter)
                    return

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

    async def RecordFeedback(self, request, context):  # noqa: N802 - gRPC method name
        try:
            request_id, score = feedback_from_pb(request)
            adapter = self._feedback.record(request_id, score)
        except Exception as exc:
            await abort_with(context, exc)
        return generate_pb2.RecordFeedbackResponse(adapter=adapter)

    async def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        try:
            runtime = self._state.runtime  # Unavailable while the model loads
            models = await asyncio.to_thread(runtime.list_models)  # reads the store
        except Exception as exc:
            await abort_with(context, exc)
        return generate_pb2.ListModelsResponse(models=models)

"""The worker side of the router link: ``Worker.Serve`` and ``Worker.Info``.

One Serve stream per router. Incoming SubmitBatch items become engine requests whose
sink is the link; every engine iteration produces one StepEvents for the link (all of
its sequences' deltas), followed by Finished / Rejected for sequences that ended. A
Load report goes out right away and then periodically. When the stream ends, every
sequence of the link is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from common import __version__
from common.errors import Unavailable, status_of
from common.pb import worker_pb2, worker_pb2_grpc
from common.tracing import (
    ATTR_BATCH_ID,
    ATTR_BATCH_SIZE,
    ATTR_LINK_KIND,
    ATTR_WORKER_ID,
    context_from_dict,
    get_tracer,
    link_from_dict,
)
from common.validation import generation_spec_from_pb
from worker.convert import FINISH_REASON_PB, token_to_pb, usage_to_pb
from worker.engine import SeqOutput
from worker.front import EngineFront, FrontStream, deadline_from_unix_ms, retryable
from worker.observe import RequestObserver
from worker.runtime import WorkerState

logger = logging.getLogger(__name__)


class _LinkSink:
    """Engine outputs of one link → WorkerMessages on the link's outbound queue (event
    loop only: the engine front delivers here)."""

    def __init__(self, worker_id: str) -> None:
        self._worker_id = worker_id
        self.outbound: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()
        self.link_ids: dict[int, str] = {}  # front request id → link_request_id
        self.request_ids: dict[str, int] = {}  # link_request_id → front request id
        self.observers: dict[int, RequestObserver] = {}
        # What arrived on this link, reported in its Load (worker.proto: "on this link").
        self.batches_received = 0
        self.requests_received = 0
        self.stream: FrontStream  # set by Serve: this link's stream on the engine front

    def deliver(self, step: int, outputs: list[SeqOutput]) -> None:
        deltas = []
        endings = []
        for out in outputs:
            link_id = self.link_ids.get(out.key)
            if link_id is None:
                continue
            observer = self.observers.get(out.key)
            if out.done:
                del self.link_ids[out.key]
                self.request_ids.pop(link_id, None)
                self.observers.pop(out.key, None)
            if observer is not None:
                observer.on_output(out)
            if out.tokens or out.text:
                deltas.append(
                    worker_pb2.SequenceDelta(
                        link_request_id=link_id,
                        tokens=[token_to_pb(t) for t in out.tokens],
                        text=out.text,
                    )
                )
            if out.error is not None:
                endings.append(_rejected(link_id, out.error, out.retryable))
            elif out.finish_reason is not None and out.usage is not None:
                endings.append(
                    worker_pb2.WorkerMessage(
                        finished=worker_pb2.Finished(
                            link_request_id=link_id,
                            finish_reason=FINISH_REASON_PB[out.finish_reason],
                            usage=usage_to_pb(out.usage, self._worker_id),
                        )
                    )
                )
        if deltas:
            self.outbound.put_nowait(
                worker_pb2.WorkerMessage(
                    step_events=worker_pb2.StepEvents(step=step, deltas=deltas)
                )
            )
        for msg in endings:
            self.outbound.put_nowait(msg)


def _rejected(link_id: str, exc: BaseException, retryable: bool) -> worker_pb2.WorkerMessage:
    code, message = status_of(exc)
    return worker_pb2.WorkerMessage(
        rejected=worker_pb2.Rejected(
            link_request_id=link_id, code=code.value[0], message=message, retryable=retryable
        )
    )


class WorkerLinkServicer(worker_pb2_grpc.WorkerServicer):
    """Serve and Info."""

    def __init__(self, state: WorkerState, load_interval_s: float) -> None:
        self._state = state
        self._load_interval_s = load_interval_s
        # Totals over every link since start (what Info's Load reports: it has no link).
        self.batches_received = 0
        self.requests_received = 0

    def load(self, sink: _LinkSink | None = None) -> worker_pb2.Load:
        """The Load report; the received counters are ``sink``'s link's, or the totals."""
        counts = sink if sink is not None else self
        s = self._state.runtime.engine.stats()
        return worker_pb2.Load(
            queued=s["queued"],
            running=s["running"],
            free_kv_tokens=s["free_kv_tokens"],
            max_kv_tokens=s["max_kv_tokens"],
            queued_tokens=s["queued_tokens"],
            running_tokens=s["running_tokens"],
            finished_total=s["finished_total"],
            generated_tokens_total=s["generated_tokens_total"],
            steps_total=s["steps_total"],
            draining=not self._state.accepting.is_set(),
            batches_received=counts.batches_received,
            requests_received=counts.requests_received,
            loaded_adapters=self._state.runtime.loaded_adapters(),
        )

    async def _submit_batch(
        self, front: EngineFront, sink: _LinkSink, batch: worker_pb2.SubmitBatch
    ) -> None:
        """One span per SubmitBatch, in its own trace: it links to each request it carried,
        and each request's span links back to it (linked, not parented: a batch mixes
        requests of many traces)."""
        items = list(batch.items)
        request_links = [
            link
            for link in (
                link_from_dict(item.trace_context, {ATTR_LINK_KIND: "request"}) for item in items
            )
            if link is not None
        ]
        span = get_tracer(__name__).start_span(
            "worker.batch",
            context=context_from_dict(None),
            attributes={
                ATTR_BATCH_ID: int(batch.batch_id),
                ATTR_BATCH_SIZE: len(items),
                ATTR_WORKER_ID: self._state.worker_id,
            },
            links=request_links,
        )
        try:
            ctx = span.get_span_context()
            batch_link = (
                [trace.Link(ctx, {ATTR_LINK_KIND: "batch"})]
                if ctx.is_valid and ctx.trace_flags.sampled
                else []
            )
            for item in items:
                self.requests_received += 1
                sink.requests_received += 1
                await self._submit(front, sink, item, batch_link)
        finally:
            span.end()

    async def _submit(
        self,
        front: EngineFront,
        sink: _LinkSink,
        item: worker_pb2.WorkItem,
        links: list[trace.Link] | None = None,
    ) -> None:
        link_id = item.link_request_id
        state = self._state
        observer = None
        try:
            if not state.accepting.is_set():
                raise Unavailable("worker is draining")
            spec = generation_spec_from_pb(item.request, front.runtime.limits)
            req = await front.prepare(
                spec, sink.stream, deadline_from_unix_ms(item.deadline_unix_ms)
            )
            observer = RequestObserver(
                state.metrics,
                "Serve",
                spec,
                state.worker_id,
                context_from_dict(item.trace_context),
                req.adapter,
                links=links,
                served_model=front.runtime.source.name,
            )
            req.on_admitted = observer.admitted
            request_id = front.submit(req)
        except Exception as exc:
            if observer is not None:
                observer.finish(exc)
            else:
                state.record_rejected("Serve", exc)
            sink.outbound.put_nowait(_rejected(link_id, exc, retryable(exc, token_sent=False)))
            return
        sink.link_ids[request_id] = link_id
        sink.request_ids[link_id] = request_id
        sink.observers[request_id] = observer

    async def _read(
        self,
        request_iterator: AsyncIterator[worker_pb2.RouterMessage],
        front: EngineFront,
        sink: _LinkSink,
    ) -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "submit_batch":
                self.batches_received += 1
                sink.batches_received += 1
                await self._submit_batch(front, sink, msg.submit_batch)
            elif kind == "cancel":
                for link_id in msg.cancel.link_request_ids:
                    request_id = sink.request_ids.get(link_id)
                    if request_id is not None:
                        front.cancel(request_id, msg.cancel.reason or "router cancelled")

    async def Serve(self, request_iterator, context):  # noqa: N802 - gRPC method name
        try:
            front = self._state.front
        except Unavailable as exc:  # still loading: the router retries the link later
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        sink = _LinkSink(self._state.worker_id)
        sink.stream = front.stream(sink.deliver)
        reader = asyncio.create_task(self._read(request_iterator, front, sink))
        next_load = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_load:
                    yield worker_pb2.WorkerMessage(load=self.load(sink))
                    next_load = now + self._load_interval_s
                if reader.done():
                    reader.result()  # re-raise a reader failure
                    if not sink.link_ids and sink.outbound.empty():
                        return  # router closed its side and nothing is left to send
                try:
                    msg = await asyncio.wait_for(
                        sink.outbound.get(), timeout=max(0.0, next_load - time.monotonic())
                    )
                except TimeoutError:
                    continue
                yield msg
        finally:
            reader.cancel()
            for request_id in list(sink.link_ids):  # link gone: free every sequence it owned
                front.cancel(request_id, "router link closed")

    async def Info(self, request, context):  # noqa: N802 - gRPC method name
        return worker_pb2.WorkerInfo(
            worker_id=self._state.worker_id,
            models=self._state.runtime.model_names,
            adapters=self._state.runtime.loaded_adapters(),
            max_running=self._state.runtime.config.max_running,
            max_kv_tokens=self._state.runtime.config.max_kv_tokens,
            max_queue=self._state.runtime.config.max_queue,
            device=self._state.runtime.device,
            dtype=self._state.runtime.dtype,
            version=__version__,
            max_context_tokens=self._state.runtime.limits.max_context_tokens,
            max_new_tokens_limit=self._state.runtime.limits.max_new_tokens_limit,
            load=self.load(),
            supports_constraints=self._state.runtime.supports_constraints,
            weights=self._state.runtime.weights,
        )

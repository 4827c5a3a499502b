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
from worker.observe import RequestObserver
from worker.runtime import WorkerState

logger = logging.getLogger(__name__)


class _LinkSink:
    """Engine outputs of one link → WorkerMessages on the link's outbound queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, worker_id: str) -> None:
        self._loop = loop
        self._worker_id = worker_id
        self.outbound: asyncio.Queue[worker_pb2.WorkerMessage] = asyncio.Queue()
        self.link_ids: dict[int, str] = {}  # engine key → link_request_id (event loop only)
        self.observers: dict[int, RequestObserver] = {}
        self.produced: set[int] = set()  # keys that streamed at least one token
        # What arrived on this link, reported in its Load (worker.proto: "on this link").
        self.batches_received = 0
        self.requests_received = 0

    def on_outputs(self, step: int, outputs: list[SeqOutput]) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._publish, step, outputs)

    def _publish(self, step: int, outputs: list[SeqOutput]) -> None:
        deltas = []
        endings = []
        for out in outputs:
            link_id = self.link_ids.pop(out.key, None) if out.done else self.link_ids.get(out.key)
            if link_id is None:
                continue
            observer = (
                self.observers.pop(out.key, None) if out.done else self.observers.get(out.key)
            )
            if observer is not None:
                observer.on_output(out)
            if out.tokens:
                self.produced.add(out.key)
            if out.tokens or out.text:
                deltas.append(
                    worker_pb2.SequenceDelta(
                        link_request_id=link_id,
                        tokens=[token_to_pb(t) for t in out.tokens],
                        text=out.text,
                    )
                )
            if out.error is not None:
                code, message = status_of(out.error)
                # Handed back before a token (drain): the router may re-route it.
                retryable = isinstance(out.error, Unavailable) and out.key not in self.produced
                endings.append(
                    worker_pb2.WorkerMessage(
                        rejected=worker_pb2.Rejected(
                            link_request_id=link_id,
                            code=code.value[0],
                            message=message,
                            retryable=retryable,
                        )
                    )
                )
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
        for out in outputs:
            if out.done:
                self.produced.discard(out.key)
        if deltas:
            self.outbound.put_nowait(
                worker_pb2.WorkerMessage(
                    step_events=worker_pb2.StepEvents(step=step, deltas=deltas)
                )
            )
        for msg in endings:
            self.outbound.put_nowait(msg)


def _deadline_monotonic(deadline_unix_ms: int) -> float | None:
    if deadline_unix_ms <= 0:
        return None
    return time.monotonic() + (deadline_unix_ms / 1000.0 - time.time())


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

    def _reject(self, sink: _LinkSink, link_id: str, exc: BaseException, retryable: bool) -> None:
        code, message = status_of(exc)
        sink.outbound.put_nowait(
            worker_pb2.WorkerMessage(
                rejected=worker_pb2.Rejected(
                    link_request_id=link_id,
                    code=code.value[0],
                    message=message,
                    retryable=retryable,
                )
            )
        )

    def _submit_batch(self, sink: _LinkSink, batch: worker_pb2.SubmitBatch) -> None:
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
                self._submit(sink, item, batch_link)
        finally:
            span.end()

    def _submit(
        self,
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
            spec = generation_spec_from_pb(item.request, state.runtime.limits)
            req = state.runtime.build_request(
                spec, sink, _deadline_monotonic(item.deadline_unix_ms)
            )
            observer = RequestObserver(
                state.metrics,
                "Serve",
                spec,
                state.worker_id,
                context_from_dict(item.trace_context),
                req.adapter,
                links=links,
                served_model=state.runtime.source.name,
            )
            req.on_admitted = observer.admitted
            key = state.runtime.engine.submit(req)
        except Exception as exc:
            if observer is not None:
                observer.finish(exc)
            else:
                state.record_rejected("Serve", exc)
            code, _ = status_of(exc)
            # No token was produced: another worker may take it.
            retryable = code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            self._reject(sink, link_id, exc, retryable)
            return
        sink.link_ids[key] = link_id
        sink.observers[key] = observer

    async def _read(
        self,
        request_iterator: AsyncIterator[worker_pb2.RouterMessage],
        sink: _LinkSink,
        keys_by_link_id: dict[str, int],
    ) -> None:
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "submit_batch":
                self.batches_received += 1
                sink.batches_received += 1
                self._submit_batch(sink, msg.submit_batch)
            elif kind == "cancel":
                wanted = set(msg.cancel.link_request_ids)
                for key, link_id in list(sink.link_ids.items()):
                    if link_id in wanted:
                        self._state.runtime.engine.cancel(
                            key, msg.cancel.reason or "router cancelled"
                        )

    async def Serve(self, request_iterator, context):  # noqa: N802 - gRPC method name
        sink = _LinkSink(asyncio.get_running_loop(), self._state.worker_id)
        reader = asyncio.create_task(self._read(request_iterator, sink, {}))
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
            for key in list(sink.link_ids):  # link gone: free every sequence it owned
                self._state.runtime.engine.cancel(key, "router link closed")

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
        )

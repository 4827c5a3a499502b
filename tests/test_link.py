"""Link mechanics (coalescing, fan-out, cancel, failover, reconnect, ejection) against a
minimal in-test Worker.Serve peer over real gRPC on loopback.

The peer (:class:`FakeWorker`) emits deterministic tokens ``<0> <1> ...`` one per
"step"; it is a test double for wire mechanics only: behaviour bars run against real
workers in ``test_router_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common import tracing
from common.errors import RequestError, ResourceExhausted
from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.cluster import Cluster, _merge_queued_deltas
from router.config import RouterConfig
from router.link import Delta, Failed, Finished, WorkerLink
from tests.procs import free_port

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 10.0


@dataclass
class _Seq:
    item: worker_pb2.WorkItem
    produced: int = 0


@dataclass
class FakeWorker(worker_pb2_grpc.WorkerServicer, generate_pb2_grpc.GenerateServicer):
    """A Worker.Serve peer: one token per step for every active sequence.

    ``gate``: while cleared, steps pause (tests order events without sleeps).
    Prompts starting with ``reject:CODE:`` are rejected with that status code;
    ``reject-retry:`` is rejected as retryable RESOURCE_EXHAUSTED ("queue full").
    """

    worker_id: str
    step_s: float = 0.002
    port: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    cancelled: list[tuple[str, str]] = field(default_factory=list)
    received: list[worker_pb2.WorkItem] = field(default_factory=list)
    active: dict[str, _Seq] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    first_token: asyncio.Event = field(default_factory=asyncio.Event)
    health: HealthServicer = field(default_factory=HealthServicer)
    server: grpc.aio.Server | None = None
    garbage: bool = False
    adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.gate.set()

    async def start(self) -> None:
        self.port = self.port or free_port()
        self.server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServicer_to_server(self, self.server)
        generate_pb2_grpc.add_GenerateServicer_to_server(self, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()

    async def kill(self) -> None:
        """Drops every stream at once (the link sees a broken stream)."""
        assert self.server is not None
        await self.server.stop(0)
        self.active.clear()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def Info(self, request, context):
        return worker_pb2.WorkerInfo(
            worker_id=self.worker_id,
            models=[MODEL],
            adapters=list(self.adapters),
            max_new_tokens_limit=512,
            max_context_tokens=2048,
        )

    async def ListModels(self, request, context):
        return generate_pb2.ListModelsResponse(
            models=[
                generate_pb2.ModelEntry(name=MODEL, kind=generate_pb2.BASE, is_default=True),
                generate_pb2.ModelEntry(
                    name=f"ad-{self.worker_id}", version="1", kind=generate_pb2.ADAPTER
                ),
            ]
        )

    async def Serve(self, request_iterator, context):
        mine: set[str] = set()
        out: list[worker_pb2.WorkerMessage] = []

        async def read() -> None:
            async for msg in request_iterator:
                if msg.HasField("submit_batch"):
                    self.batch_sizes.append(len(msg.submit_batch.items))
                    for item in msg.submit_batch.items:
                        self.received.append(item)
                        prompt = item.request.prompt
                        if prompt.startswith("reject:"):
                            _, code, text = prompt.split(":", 2)
                            out.append(
                                worker_pb2.WorkerMessage(
                                    rejected=worker_pb2.Rejected(
                                        link_request_id=item.link_request_id,
                                        code=int(code),
                                        message=text,
                                    )
                                )
                            )
                        elif prompt.startswith("reject-retry:"):
                            out.append(
                                worker_pb2.WorkerMessage(
                                    rejected=worker_pb2.Rejected(
                                        link_request_id=item.link_request_id,
                                        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                                        message=f"{self.worker_id} queue is full",
                                        retryable=True,
                                    )
                                )
                            )
                        else:
                            self.active[item.link_request_id] = _Seq(item)
                            mine.add(item.link_request_id)
                else:
                    for lrid in msg.cancel.link_request_ids:
                        self.cancelled.append((lrid, msg.cancel.reason))
                        self.active.pop(lrid, None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            await context.write(worker_pb2.WorkerMessage(load=self.load()))
            step = 0
            while not reader.done():
                await asyncio.sleep(self.step_s)
                await self.gate.wait()
                while out:
                    await context.write(out.pop(0))
                if self.garbage:
                    # Messages about ids the router does not know must be ignored.
                    await context.write(
                        worker_pb2.WorkerMessage(
                            finished=worker_pb2.Finished(link_request_id="nope")
                        )
                    )
                    await context.write(worker_pb2.WorkerMessage())
                step += 1
                seqs = [self.active[i] for i in list(mine) if i in self.active]
                mine.intersection_update(self.active)
                if seqs:
                    deltas = []
                    for s in seqs:
                        deltas.append(
                            worker_pb2.SequenceDelta(
                                link_request_id=s.item.link_request_id,
                                tokens=[generate_pb2.Token(id=s.produced, text=f"<{s.produced}>")],
                                text=f"<{s.produced}>",
                            )
                        )
                        s.produced += 1
                    await context.write(
                        worker_pb2.WorkerMessage(
                            step_events=worker_pb2.StepEvents(step=step, deltas=deltas)
                        )
                    )
                    self.first_token.set()
                    for s in seqs:
                        if s.produced >= s.item.request.params.max_new_tokens:
                            self.active.pop(s.item.link_request_id, None)
                            await context.write(
                                worker_pb2.WorkerMessage(
                                    finished=worker_pb2.Finished(
                                        link_request_id=s.item.link_request_id,
                                        finish_reason=generate_pb2.LENGTH,
                                        usage=generate_pb2.Usage(
                                            completion_tokens=s.produced,
                                            worker_id=self.worker_id,
                                        ),
                                    )
                                )
                            )
                if step % 10 == 0:
                    await context.write(worker_pb2.WorkerMessage(load=self.load()))
        finally:
            reader.cancel()
            for i in mine:
                self.active.pop(i, None)

    def load(self) -> worker_pb2.Load:
        return worker_pb2.Load(
            loaded_adapters=list(self.adapters),
            running=len(self.active),
            running_tokens=sum(
                s.item.request.params.max_new_tokens - s.produced for s in self.active.values()
            ),
        )


def request(prompt: str = "hi", max_new_tokens: int = 4) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=prompt, params=generate_pb2.SamplingParams(max_new_tokens=max_new_tokens)
    )


async def collect(events: AsyncIterator[Any]) -> tuple[str, Any]:
    """Runs a Cluster.generate stream to its end: (text, Finished)."""
    text, last = "", None
    async for ev in events:
        if isinstance(ev, Delta):
            text += ev.text
        else:
            last = ev
    return text, last


async def drain(lr) -> tuple[str, Finished | Failed]:
    """Reads a LinkRequest's events to its terminal one."""
    text = ""
    while True:
        ev = await asyncio.wait_for(lr.events.get(), TIMEOUT_S)
        if isinstance(ev, Delta):
            text += ev.text
        else:
            return text, ev


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


@contextlib.asynccontextmanager
async def started(*fakes: FakeWorker, **config: Any):
    for f in fakes:
        await f.start()
    config.setdefault("reconnect_initial_s", 0.05)
    config.setdefault("reconnect_max_s", 0.2)
    cluster = Cluster(RouterConfig(workers=[f.address for f in fakes], seed=0, **config))
    cluster.set_workers([f.address for f in fakes])
    try:
        assert await cluster.wait_ready(TIMEOUT_S, count=len(fakes))
        yield cluster
    finally:
        cluster.config.grace_s = 0
        await cluster.close()
        for f in fakes:
            if f.server is not None:
                await f.server.stop(0)


# ---- tests ------------------------------------------------------------------------


def test_burst_is_coalesced_and_every_stream_gets_its_own_tokens():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake, coalesce_window_ms=5) as cluster:
            link = cluster.links[fake.address]
            lrs = [link.submit(request(f"p{i}", max_new_tokens=3 + i % 3)) for i in range(40)]
            results = await asyncio.gather(*(drain(lr) for lr in lrs))
            for i, (text, end) in enumerate(results):
                assert isinstance(end, Finished), end
                assert text == "".join(f"<{k}>" for k in range(3 + i % 3))
                assert end.usage.worker_id == "w1"
            assert link.stats.requests_sent == 40
            assert link.stats.batches_sent == len(fake.batch_sizes) <= 2
            assert sum(fake.batch_sizes) == 40
            assert link.outstanding == 0

    run(body)


def test_window_gathers_requests_arriving_over_several_loop_turns():
    window_ms = 30

    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake, coalesce_window_ms=window_ms) as cluster:
            link = cluster.links[fake.address]
            lrs = []
            for i in range(10):
                lrs.append(link.submit(request(f"p{i}", 1)))
                for _ in range(5):  # let the writer run between arrivals
                    await asyncio.sleep(0)
            await asyncio.gather(*(drain(lr) for lr in lrs))
            # The first finds the link idle and leaves at once; the rest of the burst
            # arrives within the window after it and leaves together.
            assert fake.batch_sizes == [1, 9]

    run(body)


def test_a_request_on_an_idle_link_is_not_held_for_the_window():
    async def body() -> None:
        fake = FakeWorker("w1")
        # A window far longer than the test's patience: only an idle-link send passes.
        async with started(fake, coalesce_window_ms=60_000) as cluster:
            link = cluster.links[fake.address]
            _, end = await asyncio.wait_for(drain(link.submit(request("alone", 1))), 10)
            assert isinstance(end, Finished)
            assert fake.batch_sizes == [1]

    run(body)


def test_max_batch_caps_a_submit_batch():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake, coalesce_window_ms=50, max_batch=8) as cluster:
            link = cluster.links[fake.address]
            lrs = [link.submit(request(f"p{i}", 2)) for i in range(20)]
            await asyncio.gather(*(drain(lr) for lr in lrs))
            assert fake.batch_sizes == [8, 8, 4]
            assert link.stats.largest_batch == 8

    run(body)


def test_cancel_reaches_the_worker_and_frees_the_sequence():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake) as cluster:
            link = cluster.links[fake.address]
            lr = link.submit(request(max_new_tokens=10_000))
            first = await asyncio.wait_for(lr.events.get(), TIMEOUT_S)
            assert isinstance(first, Delta)
            assert lr.link_request_id in fake.active
            link.cancel(lr, "client cancelled")
            for _ in range(200):
                if not fake.active:
                    break
                await asyncio.sleep(0.01)
            assert fake.active == {}
            assert fake.cancelled == [(lr.link_request_id, "client cancelled")]
            # The link keeps working afterwards.
            text, end = await drain(link.submit(request(max_new_tokens=2)))
            assert isinstance(end, Finished) and text == "<0><1>"

    run(body)


def test_cancel_before_send_never_reaches_the_worker():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake, coalesce_window_ms=50) as cluster:
            link = cluster.links[fake.address]
            doomed = link.submit(request("doomed"))
            kept = link.submit(request("kept", 2))
            link.cancel(doomed, "client cancelled")
            _, end = await drain(kept)
            assert isinstance(end, Finished)
            assert [i.request.prompt for i in fake.received] == ["kept"]
            assert fake.cancelled == []

    run(body)


def test_closing_the_generator_sends_cancel_with_deadline_reason():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake) as cluster:
            events = cluster.generate(request(max_new_tokens=10_000), deadline_unix_ms=1)
            async with contextlib.aclosing(events):
                async for _ in events:
                    break
            for _ in range(200):
                if fake.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert [reason for _, reason in fake.cancelled] == ["deadline exceeded"]
            assert cluster.stats().in_flight == 0

    run(body)


def test_rejection_passes_code_and_message_and_link_survives_garbage():
    async def body() -> None:
        fake = FakeWorker("w1", garbage=True)
        async with started(fake) as cluster:
            code = grpc.StatusCode.NOT_FOUND.value[0]
            with pytest.raises(RequestError) as info:
                await collect(cluster.generate(request(f"reject:{code}:adapter x not found")))
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert info.value.message == "adapter x not found"
            text, end = await collect(cluster.generate(request(max_new_tokens=3)))
            assert text == "<0><1><2>" and isinstance(end, Finished)
            assert cluster.links[fake.address].stats.breaks == 0

    run(body)


def test_retryable_rejection_is_rerouted_then_last_error_returned():
    async def body() -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        async with started(a, b) as cluster:
            with pytest.raises(RequestError) as info:
                await collect(cluster.generate(request("reject-retry:x")))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in info.value.message
            assert len(a.received) == len(b.received) == 1  # offered to each once
            assert cluster.stats().rerouted == 1

    run(body)


def test_router_queue_bound_refuses_at_once():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake, max_queue=2) as cluster:
            fake.gate.clear()  # hold the two admitted ones
            held = [cluster.generate(request(max_new_tokens=2)) for _ in range(2)]
            firsts = [asyncio.ensure_future(g.__anext__()) for g in held]
            await asyncio.sleep(0)
            with pytest.raises(ResourceExhausted, match="max_queue=2"):
                await collect(cluster.generate(request()))
            fake.gate.set()
            for f in firsts:
                await asyncio.wait_for(f, TIMEOUT_S)
            for g in held:
                await collect(g)
            assert cluster.stats().refused_queue_full == 1
            assert cluster.stats().in_flight == 0

    run(body)


def test_link_break_reroutes_unstarted_and_fails_started_with_token_count():
    async def body() -> None:
        victim, survivor = FakeWorker("victim"), FakeWorker("survivor")
        async with started(victim, survivor) as cluster:
            vlink = cluster.links[victim.address]
            # Make the victim the only healthy choice while the requests are routed.
            survivor_link = cluster.links[survivor.address]
            survivor_link.serving = False
            started_gen = cluster.generate(request("streaming", max_new_tokens=10_000))
            first = await asyncio.wait_for(started_gen.__anext__(), TIMEOUT_S)
            assert isinstance(first, Delta)
            victim.gate.clear()  # the next request reaches the victim, gets no token
            waiting = asyncio.ensure_future(collect(cluster.generate(request("waiting", 3))))
            for _ in range(200):
                if len(victim.received) == 2:
                    break
                await asyncio.sleep(0.01)
            assert [i.request.prompt for i in victim.received] == ["streaming", "waiting"]
            survivor_link.serving = True
            await victim.kill()
            text, end = await asyncio.wait_for(waiting, TIMEOUT_S)
            assert text == "<0><1><2>" and end.usage.worker_id == "survivor"
            with pytest.raises(RequestError) as info:
                async for _ in started_gen:
                    pass
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "tokens were delivered" in info.value.message
            assert "victim" in info.value.message
            assert not vlink.healthy  # ejected
            text, end = await collect(cluster.generate(request("after", 2)))
            assert end.usage.worker_id == "survivor"

    run(body)


def test_broken_worker_stays_ejected_until_health_passes_then_reconnects():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake) as cluster:
            link = cluster.links[fake.address]
            await fake.kill()
            for _ in range(200):
                if not link.connected:
                    break
                await asyncio.sleep(0.01)
            assert not link.healthy
            with pytest.raises(RequestError) as info:
                await collect(cluster.generate(request()))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            # Back on the same port but NOT_SERVING: the link must not reconnect.
            revived = FakeWorker("w1-again", port=fake.port)
            await revived.start()
            await revived.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await asyncio.sleep(0.5)  # several reconnect periods (0.05-0.2 s)
            assert not link.connected
            await revived.health.set("", health_pb2.HealthCheckResponse.SERVING)
            assert await link.wait_connected(TIMEOUT_S)
            text, end = await collect(cluster.generate(request(max_new_tokens=2)))
            assert end.usage.worker_id == "w1-again"
            assert link.stats.connects == 2 and link.stats.breaks == 1
            await revived.server.stop(0)

    run(body)


def test_worker_not_serving_stops_routing_without_breaking_the_stream():
    async def body() -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        async with started(a, b) as cluster:
            await a.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            link_a = cluster.links[a.address]
            for _ in range(200):
                if not link_a.healthy:
                    break
                await asyncio.sleep(0.01)
            assert not link_a.healthy and link_a.connected
            ends = [await collect(cluster.generate(request(max_new_tokens=1))) for _ in range(5)]
            assert {end.usage.worker_id for _, end in ends} == {"b"}

    run(body)


def test_requests_for_an_adapter_go_where_it_is_loaded():
    async def body() -> None:
        a, b = FakeWorker("a", adapters=("tone@1",)), FakeWorker("b")
        async with started(a, b) as cluster:
            with_adapter = request(max_new_tokens=50)
            with_adapter.adapter = "tone"
            gens = [cluster.generate(with_adapter) for _ in range(6)]
            firsts = [asyncio.ensure_future(g.__anext__()) for g in gens]
            await asyncio.gather(*firsts)
            assert len(a.received) == 6 and b.received == []
            # Plain requests go to the idle worker instead.
            _, end = await collect(cluster.generate(request(max_new_tokens=1)))
            assert end.usage.worker_id == "b"
            for g in gens:
                await g.aclose()
            # The route span says why: two candidates, the adapter was loaded there.
            spans = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(spans))
            cluster._tracer = provider.get_tracer("test")
            short = request(max_new_tokens=1)
            short.adapter = "tone"
            _, end = await collect(cluster.generate(short))
            assert end.usage.worker_id == "a"
            (route,) = [s for s in spans.get_finished_spans() if s.name == "route"]
            assert route.attributes[tracing.ATTR_ROUTE_CANDIDATES] == 2
            assert route.attributes[tracing.ATTR_ROUTE_ADAPTER_LOADED] is True
            assert route.attributes[tracing.ATTR_ROUTE_OUTSTANDING_TOKENS] >= 0

    run(body)


def test_set_workers_adds_and_removes_links_at_runtime():
    async def body() -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        await b.start()
        async with started(a) as cluster:
            cluster.set_workers([a.address, b.address])
            assert await cluster.wait_ready(TIMEOUT_S, count=2)
            cluster.set_workers([b.address])
            assert list(cluster.links) == [b.address]
            ends = [await collect(cluster.generate(request(max_new_tokens=1))) for _ in range(3)]
            assert {end.usage.worker_id for _, end in ends} == {"b"}
        await b.server.stop(0)

    run(body)


def test_link_on_unreachable_address_never_hangs_a_request():
    async def body() -> None:
        link = WorkerLink(f"127.0.0.1:{free_port()}", reconnect_initial_s=0.05)
        link.start()
        await asyncio.sleep(0.2)
        assert not link.connected
        with pytest.raises(RequestError):
            link.submit(request())
        await link.close()

    run(body)


def test_deltas_queued_behind_a_lagging_client_leave_as_one_message() -> None:
    def token(i: int) -> generate_pb2.Token:
        return generate_pb2.Token(id=i, text=f"t{i}")

    async def scenario() -> None:
        events: asyncio.Queue = asyncio.Queue()
        first = Delta([token(1)], "t1")
        # A client that keeps up: nothing queued, the delta passes unchanged.
        assert _merge_queued_deltas(first, events) == (first, None)
        for i in (2, 3):
            events.put_nowait(Delta([token(i)], f"t{i}"))
        end = Finished(generate_pb2.LENGTH, generate_pb2.Usage())
        events.put_nowait(end)
        events.put_nowait(Delta([token(9)], "late"))  # never reached: the end comes first
        merged, held = _merge_queued_deltas(first, events)
        assert [t.id for t in merged.tokens] == [1, 2, 3] and merged.text == "t1t2t3"
        assert held is end
        assert [t.id for t in first.tokens] == [1]  # the original is not mutated

    asyncio.run(scenario())


def test_unknown_model_is_not_found_and_a_known_model_with_workers_down_is_unavailable():
    """NOT_FOUND when no known worker serves the model (retrying cannot help); a model
    whose workers are all down is UNAVAILABLE (retry later)."""

    async def body() -> None:
        fake = FakeWorker("w1")
        async with started(fake) as cluster:
            unknown = request()
            unknown.model = "gpt-9"
            with pytest.raises(RequestError) as info:
                await collect(cluster.generate(unknown))
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert "'gpt-9' is not served" in info.value.message
            await fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            link = cluster.links[fake.address]
            for _ in range(200):
                if not link.healthy:
                    break
                await asyncio.sleep(0.01)
            known = request()
            known.model = MODEL
            with pytest.raises(RequestError) as info:
                await collect(cluster.generate(known))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(RequestError) as info:  # still nobody serves gpt-9
                await collect(cluster.generate(unknown))
            assert info.value.code == grpc.StatusCode.NOT_FOUND

    run(body)

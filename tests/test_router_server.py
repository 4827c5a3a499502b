"""The router's gRPC server in-process over in-test Worker.Serve peers (wire mechanics:
health, cancel and deadline reaching the worker, admission, trailers), and the router
process's own lifecycle (health with no worker, clean SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import generate_pb2, generate_pb2_grpc
from router.config import RouterConfig
from router.server import start_router
from tests.procs import Proc, free_port
from tests.test_link import FakeWorker, request, run

TIMEOUT_S = 10.0


async def poll(predicate, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class Env:
    """Fakes + an in-process router + a client channel to it."""

    def __init__(self, *fakes: FakeWorker, **config) -> None:
        self.fakes = fakes
        self.config = RouterConfig(
            host="127.0.0.1",
            port=0,
            workers=[],
            reconnect_initial_s=0.05,
            reconnect_max_s=0.2,
            seed=0,
            grace_s=0,
            **config,
        )

    async def __aenter__(self) -> Env:
        for f in self.fakes:
            await f.start()
        self.config.workers = [f.address for f in self.fakes]
        self.router = await start_router(self.config)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.router.port}")
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        assert await self.router.cluster.wait_ready(TIMEOUT_S, count=len(self.fakes))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.router.stop(0)
        for f in self.fakes:
            if f.server is not None:
                await f.server.stop(0)

    async def status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status


def test_stream_relays_tokens_and_trailers_name_worker_and_batch():
    async def body() -> None:
        async with Env(FakeWorker("w1")) as env:
            call = env.stub.GenerateStream(request("hi", 3), timeout=TIMEOUT_S)
            msgs = [m async for m in call]
            trailers = dict(await call.trailing_metadata())
            assert [m.text for m in msgs[:-1]] == ["<0>", "<1>", "<2>"]
            assert msgs[-1].usage.worker_id == "w1" and msgs[-1].finish_reason
            assert len({m.request_id for m in msgs}) == 1 and msgs[0].request_id
            assert trailers["llmcluster-worker"] == env.fakes[0].address
            assert trailers["llmcluster-batch"] == f"{env.fakes[0].address}/1"
            assert trailers["llmcluster-attempts"] == "1"

    run(body)


def test_health_follows_the_workers():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with Env(fake) as env:
            assert await env.status() == health_pb2.HealthCheckResponse.SERVING
            port = fake.port
            await fake.kill()
            await poll(lambda: env.router.cluster.healthy_count() == 0)
            assert await env.status() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await env.stub.Generate(request(), timeout=TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no healthy worker" in info.value.details()
            revived = FakeWorker("w1b", port=port)
            await revived.start()
            await poll(lambda: env.router.cluster.healthy_count() == 1)
            await asyncio.sleep(0.05)  # the health servicer is updated by a task
            assert await env.status() == health_pb2.HealthCheckResponse.SERVING
            reply = await env.stub.Generate(request("x", 2), timeout=TIMEOUT_S)
            assert reply.text == "<0><1>" and reply.usage.worker_id == "w1b"
            await revived.server.stop(0)

    run(body)


def test_client_cancel_sends_cancel_to_the_worker():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with Env(fake) as env:
            call = env.stub.GenerateStream(request(max_new_tokens=500), timeout=TIMEOUT_S)
            await call.read()
            assert len(fake.active) == 1
            call.cancel()
            await poll(lambda: not fake.active)
            assert [reason for _, reason in fake.cancelled] == ["client cancelled"]
            await poll(lambda: env.router.cluster.stats().in_flight == 0)

    run(body)


def test_deadline_reaches_the_worker_and_cancels_there():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with Env(fake) as env:
            start_ms = time.time() * 1000
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in env.stub.GenerateStream(request(max_new_tokens=500), timeout=0.5):
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            (item,) = fake.received
            assert 0 < item.deadline_unix_ms - start_ms <= 600
            await poll(lambda: not fake.active)
            assert [reason for _, reason in fake.cancelled] == ["deadline exceeded"]

    run(body)


def test_queue_full_is_resource_exhausted_without_waiting():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with Env(fake, max_queue=1) as env:
            held = env.stub.GenerateStream(request(max_new_tokens=500), timeout=TIMEOUT_S)
            await held.read()
            fake.gate.clear()  # the held request stays in flight
            start = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await env.stub.Generate(request(), timeout=TIMEOUT_S)
            assert time.monotonic() - start < 1.0
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_queue=1" in info.value.details()
            held.cancel()
            fake.gate.set()
            await poll(lambda: env.router.cluster.stats().in_flight == 0)
            reply = await env.stub.Generate(request("x", 1), timeout=TIMEOUT_S)
            assert reply.text == "<0>"

    run(body)


def test_invalid_request_is_refused_by_the_router_with_the_workers_wording():
    async def body() -> None:
        fake = FakeWorker("w1")
        async with Env(fake) as env:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await env.stub.Generate(request(max_new_tokens=10_000), timeout=TIMEOUT_S)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The fake's Info says max_new_tokens_limit=512.
            assert info.value.details() == "params.max_new_tokens must be in [1, 512], got 10000"
            assert fake.received == []

    run(body)


def test_list_models_merges_every_worker():
    async def body() -> None:
        async with Env(FakeWorker("a"), FakeWorker("b")) as env:
            reply = await env.stub.ListModels(generate_pb2.ListModelsRequest(), timeout=5)
            names = sorted((m.name, m.version) for m in reply.models)
            assert names == [("SmolLM2-135M-Instruct", ""), ("ad-a", "1"), ("ad-b", "1")]

    run(body)


def test_router_process_is_not_serving_without_workers_and_stops_on_sigterm():
    port = free_port()
    proc = Proc(["router", "--port", str(port), "--workers", f"127.0.0.1:{free_port()}"], port)
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:
                assert proc.popen.poll() is None, proc.output()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline, proc.output()
                    time.sleep(0.1)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        start = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(15) == 0, proc.output()
        assert time.monotonic() - start < 10
        assert "router stopped" in proc.output()
    finally:
        proc.stop()

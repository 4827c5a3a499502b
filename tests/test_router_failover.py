"""SIGKILL one of two real workers while 32 streams run through the router.

Workers run with ``--max-running 8`` so that each holds queued requests (no token yet)
besides running ones when it dies: the queued ones must complete on the survivor
without the client noticing; the running ones must end promptly with UNAVAILABLE and
a message saying how many tokens were delivered.

Two variants: workers with the default model (slow: two model loads and real decoding
on CPU), and the same worker processes with ``--engine null`` (real processes, real
link code, tokens without a model) which keeps the failover path in the default run.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import start_router, start_worker
from tests.test_router_e2e import NO_SELF_TEST, worker_load

CALL_TIMEOUT_S = 240.0


# engine -> (worker flags, max_new_tokens): long enough that the kill lands while the
# victim has sequences both running and queued (null: ~2 s at 5 ms steps; real model:
# two waves of 8 rows x 48 steps on each worker).
ENGINES = {
    "null": (("--engine", "null", "--null-step-ms", "5"), 400),
    "model": (("--dtype", "float32"), 48),
}


# Health checks every 0.5 s that must not mistake the survivor's re-routed load for a
# dead engine (issue 13: its probe waited behind real work and it rebuilt its engine).
EAGER_SELF_TEST = ("--self-test-interval-s", "0.5", "--self-test-timeout-s", "2")


def _worker(
    engine_flags: tuple[str, ...],
    worker_id: str,
    max_running: int,
    *extra: str,
    self_test: tuple[str, ...] = NO_SELF_TEST,
):
    """A worker, by default without self-tests (they would ride in the measured batches)."""
    return start_worker(
        *engine_flags,
        "--worker-id", worker_id, "--max-running", str(max_running), "--max-queue", "64",
        *extra, *self_test,
    )  # fmt: skip


@pytest.fixture
def cluster(request):
    engine, _, self_test = request.param.partition("+")
    engine_flags, max_new_tokens = ENGINES[engine]
    health = EAGER_SELF_TEST if self_test else NO_SELF_TEST
    workers = [
        _worker(engine_flags, wid, 8, self_test=health)
        for wid in ("failover-victim", "failover-survivor")
    ]
    procs = list(workers)
    try:
        for w in workers:
            w.wait_healthy(timeout_s=300)
        router = start_router([w.address for w in workers], "--reconnect-max-s", "1")
        procs.append(router)
        router.wait_healthy(timeout_s=60)
        yield router, workers, max_new_tokens
    finally:
        for p in procs:
            p.stop()


@pytest.mark.parametrize(
    "cluster",
    [
        pytest.param("null", id="null-engine"),
        pytest.param("null+self-test", id="null-engine-eager-health"),
        # ~90 s on a busy 2-core box (two model loads, 32 streams).
        pytest.param("model", id="default-model", marks=pytest.mark.slow),
    ],
    indirect=True,
)
def test_sigkill_a_worker_mid_stream(cluster):
    router, (victim, survivor), max_new_tokens = cluster

    async def scenario():
        async with grpc.aio.insecure_channel(router.address) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            tokens = [0] * 32
            ended = [0.0] * 32

            async def one(i):
                call = stub.GenerateStream(
                    generate_pb2.GenerateRequest(
                        prompt=f"Tell story number {i} about a lighthouse keeper.",
                        params=generate_pb2.SamplingParams(
                            max_new_tokens=max_new_tokens, ignore_eos=True
                        ),
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                last = None
                try:
                    async for m in call:
                        tokens[i] += len(m.tokens)
                        last = m
                    return "OK", last, dict(await call.trailing_metadata() or ())
                except grpc.aio.AioRpcError as exc:
                    ended[i] = time.monotonic()
                    return exc.code().name, exc.details(), dict(exc.trailing_metadata() or ())

            survivor_health: list[int] = []
            stop_sampling = asyncio.Event()

            async def sample_survivor() -> None:
                async with grpc.aio.insecure_channel(survivor.address) as ch:
                    while not stop_sampling.is_set():
                        reply = await health_pb2_grpc.HealthStub(ch).Check(
                            health_pb2.HealthCheckRequest(), timeout=30
                        )
                        survivor_health.append(reply.status)
                        await asyncio.sleep(0.1)

            sampler = asyncio.ensure_future(sample_survivor())
            tasks = [asyncio.ensure_future(one(i)) for i in range(32)]
            # Kill once the victim has sequences both running and waiting.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                load = await asyncio.to_thread(worker_load, victim)
                if load.running >= 1 and load.queued >= 1 and any(tokens):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"victim never busy: {load}")
            killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT_S)
            stop_sampling.set()
            await sampler
            # The survivor took the re-routed load and never called itself dead.
            assert survivor_health and set(survivor_health) == {
                health_pb2.HealthCheckResponse.SERVING
            }, survivor_health
            return results, tokens, ended, killed_at, load

    results, tokens, ended, killed_at, load_at_kill = asyncio.run(scenario())
    ok = [(i, r) for i, r in enumerate(results) if r[0] == "OK"]
    failed = [(i, r) for i, r in enumerate(results) if r[0] != "OK"]
    # Every call ended; failures are only streams that had already produced tokens.
    assert len(ok) + len(failed) == 32
    for i, (code, details, _) in failed:
        assert code == "UNAVAILABLE", (code, details)
        assert "tokens were delivered" in details and "failover-victim" in details, details
        assert tokens[i] >= 1
        assert ended[i] - killed_at < 5.0  # promptly, not at some timeout
    # Only what had started on the victim fails (its running batch, plus any that started
    # between the last Load poll and the kill); never the whole burst.
    assert 1 <= len(failed) < 32 - load_at_kill.queued, (len(failed), load_at_kill)
    # Requests the victim had not started were re-routed and completed on the survivor.
    rerouted = [r for _, r in ok if r[2].get("llmcluster-attempts") == "2"]
    assert rerouted, "no request was re-routed"
    assert all(r[1].usage.worker_id == "failover-survivor" for r in rerouted)
    assert all(r[1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED for _, r in ok)

    # New requests succeed (on the survivor) and the router stays SERVING.
    with grpc.insecure_channel(router.address) as ch:
        stub = generate_pb2_grpc.GenerateStub(ch)
        for _ in range(3):
            reply = stub.Generate(
                generate_pb2.GenerateRequest(
                    prompt="Hello", params=generate_pb2.SamplingParams(max_new_tokens=2)
                ),
                timeout=60,
            )
            assert reply.usage.worker_id == "failover-survivor"
    assert survivor.popen.poll() is None


def test_sigterm_hands_queued_requests_back_for_rerouting():
    """A draining worker finishes what runs and hands what waits back to the router,
    which re-routes it: no client sees an error, and the worker exits cleanly."""
    null = ENGINES["null"][0]
    victim = _worker(null, "drain-victim", 2, "--grace-period-s", "30")
    survivor = _worker(null, "drain-survivor", 32)
    procs = [victim, survivor]
    try:
        for w in procs:
            w.wait_healthy(timeout_s=120)
        router = start_router([w.address for w in procs], "--reconnect-max-s", "1")
        procs.append(router)
        router.wait_healthy(timeout_s=60)

        async def scenario():
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = generate_pb2_grpc.GenerateStub(channel)
                tokens = [0] * 16

                async def one(i):
                    call = stub.GenerateStream(
                        generate_pb2.GenerateRequest(
                            prompt=f"Drain story {i}.",
                            params=generate_pb2.SamplingParams(max_new_tokens=200, ignore_eos=True),
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                    last = None
                    async for m in call:
                        tokens[i] += len(m.tokens)
                        last = m
                    return last, dict(await call.trailing_metadata() or ())

                tasks = [asyncio.ensure_future(one(i)) for i in range(16)]
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    load = await asyncio.to_thread(worker_load, victim)
                    if load.running >= 1 and load.queued >= 1:
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError(f"victim never queued anything: {load}")
                victim.signal(signal.SIGTERM)
                results = await asyncio.wait_for(asyncio.gather(*tasks), CALL_TIMEOUT_S)
                return results, tokens, load

        results, tokens, load = asyncio.run(scenario())
        # Nothing failed and nothing was cut short.
        assert tokens == [200] * 16
        assert all(r[0].usage.completion_tokens == 200 for r in results)
        rerouted = [r for r in results if r[1].get("llmcluster-attempts") == "2"]
        assert rerouted, "no queued request was handed back and re-routed"
        assert all(r[0].usage.worker_id == "drain-survivor" for r in rerouted)
        # The victim finished only what had started: its running batch at the signal, plus
        # at most one admission racing the signal per free slot.
        on_victim = [r for r in results if r[0].usage.worker_id == "drain-victim"]
        assert len(on_victim) <= load.finished_total + load.running + 2, (len(on_victim), load)
        victim.popen.wait(60)
        assert victim.popen.returncode == 0, victim.output()[-2000:]
    finally:
        for p in procs:
            p.stop()


def test_router_stall_timeout_cancels_a_silent_request_on_its_worker(tmp_path):
    """Router ``--stall-timeout-s``: a request whose worker goes silent (a wedged engine
    that its own health has not caught yet) ends with UNAVAILABLE instead of hanging the
    client, and the worker gets a Cancel that frees the slot."""
    fault = tmp_path / "wedge"
    worker = _worker(
        ENGINES["null"][0], "stall-worker", 8, "--fault-file", str(fault), "--stall-timeout-s", "0"
    )
    procs = [worker]
    try:
        worker.wait_healthy(timeout_s=300)
        router = start_router([worker.address], "--stall-timeout-s", "2")
        procs.append(router)
        router.wait_healthy(timeout_s=60)
        with grpc.insecure_channel(router.address) as ch:
            stub = generate_pb2_grpc.GenerateStub(ch)
            call = stub.GenerateStream(
                generate_pb2.GenerateRequest(
                    prompt="Hello",
                    params=generate_pb2.SamplingParams(max_new_tokens=2000, ignore_eos=True),
                ),
                timeout=120,
            )
            received = 0
            with pytest.raises(grpc.RpcError) as info:
                for msg in call:
                    received += len(msg.tokens)
                    if received and not fault.exists():
                        fault.write_text("")  # the engine thread stops stepping
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "sent no token for 2s" in info.value.details()
            assert "tokens were delivered" in info.value.details()
            fault.unlink()
            deadline = time.monotonic() + 60
            while worker_load(worker).running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert worker_load(worker).running == 0  # the Cancel reached the worker
            reply = stub.Generate(
                generate_pb2.GenerateRequest(
                    prompt="Hello", params=generate_pb2.SamplingParams(max_new_tokens=2)
                ),
                timeout=60,
            )
            assert reply.usage.completion_tokens == 2
    finally:
        for p in procs:
            p.stop()


def test_router_stall_timeout_reroutes_a_request_that_got_nothing(tmp_path):
    """A request sent to a silent worker before any token is re-routed by the router's
    stall bound and completes on the other worker; the client never sees the stall."""
    fault = tmp_path / "wedge"
    silent = _worker(
        ENGINES["null"][0], "stall-silent", 8, "--fault-file", str(fault), "--stall-timeout-s", "0"
    )
    healthy = _worker(ENGINES["null"][0], "stall-healthy", 8)
    procs = [silent, healthy]
    try:
        for w in (silent, healthy):
            w.wait_healthy(timeout_s=300)
        fault.write_text("")  # from now on the silent worker's engine never steps
        router = start_router([silent.address, healthy.address], "--stall-timeout-s", "2")
        procs.append(router)
        router.wait_healthy(timeout_s=60)

        async def scenario():
            async with grpc.aio.insecure_channel(router.address) as ch:
                stub = generate_pb2_grpc.GenerateStub(ch)

                async def one(i: int):
                    call = stub.Generate(
                        generate_pb2.GenerateRequest(
                            prompt=f"Hello {i}",
                            params=generate_pb2.SamplingParams(max_new_tokens=3),
                        ),
                        timeout=120,
                    )
                    reply = await call
                    return reply, dict(await call.trailing_metadata() or ())

                return await asyncio.gather(*(one(i) for i in range(4)))

        results = asyncio.run(scenario())
        assert all(reply.usage.worker_id == "stall-healthy" for reply, _ in results)
        assert any(meta.get("llmcluster-attempts") == "2" for _, meta in results), results
    finally:
        for p in procs:
            p.stop()

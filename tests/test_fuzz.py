"""Hostile GenerateRequests through a router and two real workers (default model) while
innocent greedy streams run beside them (issue 13).

A seeded generator builds the requests: extreme floats (subnormals, inf, nan, the
largest float32), huge ints, empty / enormous / control-character / special-token
prompts, odd roles, path-like and overlong model and adapter names, many stop strings.
Every call must end OK or with a client-error status, never INTERNAL / UNKNOWN; the
innocent streams stay token-identical to their reference; no process dies; the router
and both workers stay SERVING at every sample; and a 10x overload burst gets
RESOURCE_EXHAUSTED or completes. The default run sends a few hundred requests, the
``slow`` one 10,000.
"""

from __future__ import annotations

import asyncio
import math
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import start_router, start_worker

# What a hostile or careless client may get back; anything else is a server defect.
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
ROUTER_MAX_QUEUE = 24
INNOCENT = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,"]
INNOCENT_TOKENS = 12

FLOATS = [
    0.0, -0.0, 1e-45, 1.4e-45, 1e-40, 1.17e-38, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan,
    -1.0, 0.5, 1.0, 2.0, 1e10, 1e-10, 0.999999, 1.0000001,
]  # fmt: skip
UINT32 = [0, 1, 2, 7, 20, 21, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
NAMES = [
    "", "../../etc/passwd", "/", ".", "..", "a" * 5000, "nope", "SmolLM2-135M-Instruct",
    "x@latest", "x@-1", "x@99999999999999999999", "name/with/slash", "%00", "\x00", "😀",
    "C:\\windows", "x@", "@3", "x@0", "ok-name@1",
]  # fmt: skip
ROLES = ["user", "system", "assistant", "", "tool", "USER", "user\x00", "r" * 300, "😀"]


def hostile_text(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return ""
    if kind == 1:
        return "".join(chr(rng.randrange(0, 32)) for _ in range(rng.randrange(1, 64)))
    if kind == 2:
        return "".join(rng.choice(SPECIAL) for _ in range(rng.randrange(1, 40)))
    if kind == 3:
        return "a" * rng.choice([3000, 20000, (1 << 20) + 1])  # past context / size limits
    if kind == 4:
        return "".join(chr(rng.randrange(0x80, 0xD7FF)) for _ in range(rng.randrange(1, 200)))
    if kind == 5:
        return rng.choice(SPECIAL) + " hello " + "\u202e\ufeff\u200b"
    if kind == 6:
        return " " * rng.randrange(1, 50)
    return "Hi " * rng.randrange(1, 30)


def hostile_request(rng: random.Random, i: int) -> generate_pb2.GenerateRequest:
    params = generate_pb2.SamplingParams()
    # Accepted requests stay short (the bar is how they end, not how long they run).
    params.max_new_tokens = rng.choice([0, 1, 2, 3, 17, 2**31, 2**32 - 1])
    params.temperature = rng.choice(FLOATS)
    if rng.random() < 0.6:
        params.top_p = rng.choice(FLOATS)
    params.top_k = rng.choice(UINT32)
    if rng.random() < 0.5:
        params.repetition_penalty = rng.choice(FLOATS + [0.01, 100.0, 99.99])
    if rng.random() < 0.5:
        params.seed = rng.choice([0, 1, 2**63, 2**64 - 1])
    params.stop.extend(hostile_text(rng)[:200] for _ in range(rng.choice([0, 1, 3, 8, 9, 50])))
    params.logprobs = rng.choice(UINT32)
    params.ignore_eos = rng.random() < 0.3
    req = generate_pb2.GenerateRequest(
        request_id=rng.choice(["", f"fuzz-{i}", "r" * rng.choice([128, 129, 10000])]),
        model=rng.choice(NAMES) if rng.random() < 0.3 else "",
        adapter=rng.choice(NAMES) if rng.random() < 0.3 else "",
        params=params,
    )
    if rng.random() < 0.5:
        req.prompt = hostile_text(rng)
    else:
        for _ in range(rng.choice([0, 1, 2, 5])):
            req.messages.add(role=rng.choice(ROLES), content=hostile_text(rng))
        if rng.random() < 0.1:
            req.prompt = "both set"
    return req


@pytest.fixture(scope="module")
def fuzz_cluster():
    flags = (
        "--dtype", "float32", "--max-new-tokens-limit", "16", "--max-context-tokens", "256",
        "--max-running", "8", "--max-queue", "64",
        "--self-test-interval-s", "2", "--self-test-timeout-s", "30",
    )  # fmt: skip
    workers = [start_worker(*flags, "--worker-id", f"fuzz-{n}") for n in (1, 2)]
    procs = list(workers)
    try:
        for w in workers:
            w.wait_healthy(timeout_s=300)
        router = start_router([w.address for w in workers], "--max-queue", str(ROUTER_MAX_QUEUE))
        procs.append(router)
        router.wait_healthy(timeout_s=60)
        yield router, workers
    finally:
        for p in procs:
            p.stop()


def greedy(prompt: str) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        prompt=prompt,
        params=generate_pb2.SamplingParams(
            max_new_tokens=INNOCENT_TOKENS, ignore_eos=True, logprobs=1
        ),
    )


def run_fuzz(cluster, count: int, seed: int) -> None:
    router, workers = cluster
    rng = random.Random(seed)
    requests = [hostile_request(rng, i) for i in range(count)]

    async def scenario() -> tuple[dict, list, list, list]:
        async with grpc.aio.insecure_channel(
            router.address, options=[("grpc.max_send_message_length", 8 << 20)]
        ) as channel:
            stub = generate_pb2_grpc.GenerateStub(channel)
            reference = {}
            for p in INNOCENT:  # each alone first: the reference
                reply = await stub.Generate(greedy(p), timeout=120)
                assert len(reply.tokens) == INNOCENT_TOKENS
                reference[p] = [t.id for t in reply.tokens]
            codes: dict[str, int] = {}
            bad: list[tuple[str, str, str]] = []
            diverged: list[tuple[str, object]] = []
            health_samples: list[tuple[str, int]] = []
            done = asyncio.Event()

            async def innocent(p: str) -> None:
                while not done.is_set():
                    reply = await stub.Generate(greedy(p), timeout=300)
                    got = [t.id for t in reply.tokens]
                    if got != reference[p]:
                        diverged.append((p, got))

            async def sample_health() -> None:
                targets = [("router", router.address)] + [(w.address, w.address) for w in workers]
                chans = [(n, grpc.aio.insecure_channel(a)) for n, a in targets]
                try:
                    while not done.is_set():
                        for name, ch in chans:
                            r = await health_pb2_grpc.HealthStub(ch).Check(
                                health_pb2.HealthCheckRequest(), timeout=30
                            )
                            health_samples.append((name, r.status))
                        await asyncio.sleep(0.2)
                finally:
                    for _, ch in chans:
                        await ch.close()

            async def one(req: generate_pb2.GenerateRequest) -> None:
                call = stub.GenerateStream(req, timeout=300)
                try:
                    async for _ in call:
                        pass
                    code = grpc.StatusCode.OK
                    details = ""
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                codes[code.name] = codes.get(code.name, 0) + 1
                if code not in CLIENT_ERRORS:
                    bad.append((code.name, details[:300], repr(req)[:300]))

            background = [asyncio.ensure_future(innocent(p)) for p in INNOCENT]
            background.append(asyncio.ensure_future(sample_health()))
            limit = asyncio.Semaphore(16)

            async def bounded(req: generate_pb2.GenerateRequest) -> None:
                async with limit:
                    await one(req)

            await asyncio.gather(*(bounded(r) for r in requests))
            # A 10x overload burst of valid requests: each completes or is refused.
            burst = [greedy(f"burst {i}") for i in range(10 * ROUTER_MAX_QUEUE)]
            await asyncio.gather(*(one(r) for r in burst))
            done.set()
            await asyncio.gather(*background)
            return codes, bad, diverged, health_samples

    codes, bad, diverged, health = asyncio.run(scenario())
    assert not bad, f"server errors for hostile input: {bad[:5]} (codes: {codes})"
    assert not diverged, f"innocent streams diverged: {diverged[:3]}"
    assert codes.get("OK", 0) > 0 and codes.get("INVALID_ARGUMENT", 0) > 0, codes
    assert health and all(
        status == health_pb2.HealthCheckResponse.SERVING for _, status in health
    ), [h for h in health if h[1] != health_pb2.HealthCheckResponse.SERVING][:5]
    for p in [router, *workers]:
        assert p.popen.poll() is None, p.output()


@pytest.mark.timeout(900)
def test_fuzzed_requests_never_hurt_the_cluster(fuzz_cluster) -> None:
    run_fuzz(fuzz_cluster, count=300, seed=13)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_fuzzed_requests_never_hurt_the_cluster_10000(fuzz_cluster) -> None:
    run_fuzz(fuzz_cluster, count=10000, seed=1313)

"""``llmcluster router --stream-interval-ms``: fewer, fuller client messages, the same
tokens and text, the first token never held (null-engine worker: no model, fast)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from common.pb import generate_pb2, generate_pb2_grpc
from tests.procs import start_router, start_worker

TOKENS = 60
STEP_MS = 5.0


@pytest.fixture(scope="module")
def routers():
    worker = start_worker(
        "--engine", "null", "--null-step-ms", str(STEP_MS), "--self-test-interval-s", "0"
    )
    procs = [worker]
    try:
        worker.wait_healthy(timeout_s=120)
        plain = start_router([worker.address])
        merging = start_router([worker.address], "--stream-interval-ms", "60")
        procs += [plain, merging]
        plain.wait_healthy(timeout_s=60)
        merging.wait_healthy(timeout_s=60)
        yield plain, merging
    finally:
        for p in reversed(procs):
            p.stop()


async def _stream(address: str) -> tuple[list[generate_pb2.GenerateStreamResponse], float]:
    """The stream's messages and the seconds from its first message to its last."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        request = generate_pb2.GenerateRequest(
            prompt="Hello there",
            params=generate_pb2.SamplingParams(max_new_tokens=TOKENS, ignore_eos=True),
        )
        msgs, times = [], []
        async for m in stub.GenerateStream(request, timeout=60):
            times.append(time.monotonic())
            msgs.append(m)
        return msgs, times[-1] - times[0]


def test_interval_merges_tokens_into_fewer_messages(routers):
    plain, merging = routers
    every, _ = asyncio.run(_stream(plain.address))
    merged, elapsed_s = asyncio.run(_stream(merging.address))
    for msgs in (every, merged):
        assert sum(len(m.tokens) for m in msgs) == TOKENS
        assert msgs[-1].finish_reason == generate_pb2.LENGTH
        assert msgs[-1].usage.completion_tokens == TOKENS
    assert "".join(m.text for m in merged) == "".join(m.text for m in every)
    # One message per 60 ms at most after the first, plus the final usage message (a
    # slow client may read two together, which only lowers the count).
    assert len(merged) <= elapsed_s / 0.060 + 3, (len(merged), elapsed_s)
    # 60 tokens at one per 5 ms step: tokens share messages.
    assert len(merged) < TOKENS / 2, (len(merged), elapsed_s)
    assert merged[0].tokens, "the first token goes out at once, alone if need be"


def test_negative_interval_is_refused_with_a_message():
    import subprocess
    import sys

    from tests.procs import REPO_ROOT

    out = subprocess.run(
        [sys.executable, "-m", "llmcluster", "router", "--stream-interval-ms", "-1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "stream_interval_ms must be >= 0" in out.stderr

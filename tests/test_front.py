"""The engine front (worker.front) over the real engine machinery (the null engine keeps
scheduling, cancellation and output paths, without a model): ids that survive a rebuild,
cancel by id, the one retryable rule, and health that tells busy from wedged."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from common.errors import Unavailable
from common.validation import GenerationSpec, SamplingParams
from worker.config import WorkerConfig
from worker.engine import SeqOutput
from worker.front import EngineFront, retryable
from worker.health import EngineUnhealthy, SelfTester
from worker.runtime import ModelRuntime, WorkerState


@pytest.fixture(scope="module")
def runtime():
    runtime = ModelRuntime(
        WorkerConfig(engine="null", null_step_ms=2.0, max_running=2, max_new_tokens_limit=100000)
    )
    yield runtime
    runtime.engine.stop()


class Client:
    """One client's stream on the front: every output, and events to gate on."""

    def __init__(self, front: EngineFront) -> None:
        self.outputs: dict[int, list[SeqOutput]] = {}
        self.changed = asyncio.Event()
        self.stream = front.stream(self.deliver)
        self.front = front

    def deliver(self, step: int, outputs: list[SeqOutput]) -> None:
        for out in outputs:
            self.outputs.setdefault(out.key, []).append(out)
        self.changed.set()

    async def submit(self, max_new_tokens: int) -> int:
        spec = GenerationSpec(
            request_id="",
            model="",
            adapter="",
            prompt="Hello there",
            params=SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        )
        req = await self.front.prepare(spec, self.stream, None)
        return self.front.submit(req)

    def tokens(self, request_id: int) -> int:
        return sum(len(o.tokens) for o in self.outputs.get(request_id, []))

    def final(self, request_id: int) -> SeqOutput | None:
        done = [o for o in self.outputs.get(request_id, []) if o.done]
        return done[-1] if done else None

    async def until(self, condition, timeout_s: float = 60.0) -> None:
        async def wait() -> None:
            while not condition():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout_s)


def test_a_cancel_after_a_rebuild_never_touches_another_request(runtime) -> None:
    async def main() -> None:
        if runtime.engine._thread is None:
            runtime.engine.start()
        front = EngineFront(runtime)
        client = Client(front)
        old_running = await client.submit(100000)
        old_running2 = await client.submit(100000)
        third = await client.submit(100000)  # max_running=2: this one waits
        await client.until(lambda: client.tokens(old_running) >= 2)
        await client.until(lambda: client.tokens(old_running2) >= 1)
        await front.rebuild("test rebuild")
        # The old engine's requests ended through the front: UNAVAILABLE, retryable only
        # where no token had been sent.
        for request_id, expect_retry in ((old_running, False), (third, True)):
            final = client.final(request_id)
            assert final is not None and isinstance(final.error, Unavailable)
            assert final.retryable is expect_retry
        # The new engine draws new ids: none of the old ones comes back.
        new = [await client.submit(200) for _ in range(2)]
        assert not set(new) & {old_running, old_running2, third}
        assert min(new) > max(old_running, old_running2, third)
        await client.until(lambda: all(client.tokens(i) >= 1 for i in new))
        # A cancel of an old id (a router that still holds it) touches nothing...
        for old in (old_running, old_running2, third):
            front.cancel(old, "late cancel")
            front.engine.cancel(old, "late cancel on the current engine")
        await client.until(lambda: all(client.final(i) is not None for i in new))
        for request_id in new:
            final = client.final(request_id)
            assert final is not None and final.error is None, final.error
            assert final.finish_reason == "LENGTH"
            assert client.tokens(request_id) == 200
        # ...while a cancel of a live id ends exactly that one.
        victim, bystander = await client.submit(100000), await client.submit(300)
        await client.until(lambda: client.tokens(victim) >= 1)
        front.cancel(victim, "test")
        await client.until(lambda: client.final(bystander) is not None)
        assert client.final(victim) is not None and client.final(victim).error is not None
        assert client.final(victim).error.code == grpc.StatusCode.CANCELLED
        assert client.final(bystander).error is None and client.tokens(bystander) == 300
        assert front.in_flight == 0
        front.close()

    asyncio.run(main())


def test_the_one_retryable_rule() -> None:
    from common.errors import InvalidArgument, ResourceExhausted

    assert retryable(Unavailable("x"), token_sent=False)
    assert retryable(ResourceExhausted("x"), token_sent=False)
    assert not retryable(Unavailable("x"), token_sent=True)
    assert not retryable(InvalidArgument("x"), token_sent=False)
    assert not retryable(RuntimeError("x"), token_sent=False)


def test_a_busy_engine_is_healthy_and_a_wedged_one_fails_the_check(runtime, tmp_path) -> None:
    """Busy: the check passes without a probe however long requests run (progress is the
    test). Wedged (no step while work exists): it fails, and the rebuild fails the work
    with UNAVAILABLE."""

    async def main() -> None:
        if runtime.engine._thread is None:
            runtime.engine.start()
        front = EngineFront(runtime)
        state = WorkerState("w")
        state.runtime, state.front = runtime, front
        state.accepting.set()
        flips: list[bool] = []

        async def set_serving(serving: bool) -> None:
            flips.append(serving)

        # A probe would time out at once (timeout 1e-9 s): only the progress rule passes.
        tester = SelfTester(state, set_serving, None, 1.0, 1e-9, stall_timeout_s=30.0)
        client = Client(front)
        busy = [await client.submit(100000) for _ in range(3)]
        await client.until(lambda: client.tokens(busy[0]) >= 1)
        for _ in range(5):
            await tester.check(front)  # busy and progressing: healthy, never probed
            steps = runtime.engine.step
            await client.until(lambda steps=steps: runtime.engine.step > steps)
        # Wedge the engine thread; with a short stall bound the check fails.
        fault = tmp_path / "wedge"
        fault.write_text("")
        runtime.engine.fault_file = str(fault)
        tester.stall_timeout_s = 0.2
        with pytest.raises(EngineUnhealthy, match="no step"):
            for _ in range(600):
                await tester.check(front)
                await asyncio.sleep(0.05)
        await tester._run_once()  # NOT_SERVING, rebuild: the wedged work fails now
        assert flips == [False] and not state.accepting.is_set()
        for request_id in busy:
            final = client.final(request_id)
            assert final is not None and isinstance(final.error, Unavailable)
        os.unlink(fault)
        runtime.engine.fault_file = None
        tester.timeout_s = 30.0
        await tester._run_once()  # idle now: the probe passes on the fresh engine
        assert flips == [False, True] and state.accepting.is_set()
        front.close()

    asyncio.run(main())


def test_list_models_while_loading_is_unavailable_then_answers() -> None:
    """ListModels before the runtime is loaded: UNAVAILABLE (retry), never UNKNOWN."""
    import time

    from common.pb import generate_pb2, generate_pb2_grpc
    from tests.procs import start_worker

    worker = start_worker("--engine", "null", "--self-test-interval-s", "0")
    codes: list[grpc.StatusCode] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(worker.address) as ch:
                    reply = generate_pb2_grpc.GenerateStub(ch).ListModels(
                        generate_pb2.ListModelsRequest(), timeout=10
                    )
                break
            except grpc.RpcError as exc:
                codes.append(exc.code())
                time.sleep(0.02)
        else:
            raise AssertionError(f"never answered: {codes[-3:]}\n{worker.output()}")
        assert reply.models and reply.models[0].is_default
        # Before the server listens the channel itself is UNAVAILABLE; once it listens
        # and while the tokenizer loads, the servicer says UNAVAILABLE as well.
        assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}, codes
    finally:
        worker.stop()


def test_the_health_loop_survives_exceptions_and_keeps_judging(runtime) -> None:
    """A check that raises something unexpected (here: no front yet, then a real one)
    is logged; the loop goes on and judges again instead of freezing health."""

    async def main() -> None:
        if runtime.engine._thread is None:
            runtime.engine.start()
        state = WorkerState("w")
        state.accepting.set()  # accepting, but the front is not there: every check raises
        flips: list[bool] = []

        async def set_serving(serving: bool) -> None:
            flips.append(serving)

        tester = SelfTester(state, set_serving, None, 0.01, 30.0)
        tester.start()
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)  # let several periods fail
            assert tester._task is not None and not tester._task.done()
            assert tester.checks_total == 0
            state.runtime, state.front = runtime, EngineFront(runtime)
            for _ in range(3000):
                if tester.checks_total >= 3:
                    break
                await asyncio.sleep(0.01)
            assert tester.checks_total >= 3 and tester.healthy and flips == []
        finally:
            await tester.stop()
            state.front.close()

    asyncio.run(main())

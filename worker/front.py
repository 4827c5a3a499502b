"""The worker's engine front: the only object between the engine thread and everything
that submits work (the public Generate servicer, the router link's Serve, warm-up and the
self-test), in the spirit of vLLM's AsyncLLM over its EngineCore.

It owns
- request ids unique for the process lifetime (the engines draw them from one counter,
  so a rebuilt engine never reuses one) and the id → request map: a cancel goes, in
  O(1), to the engine that holds that id, never to whatever engine is current;
- tokenisation, chat template and adapter / store resolution, run off the event loop;
- deadlines (one conversion for each way a caller gives one);
- the single "retryable?" rule: only while no token has been sent;
- rebuilds and stalls: the old engine's outstanding requests fail here, at once, with a
  retryable UNAVAILABLE where no token was sent.

Everything here runs on the event loop except what it hands to the prep executor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from common.errors import RequestError, Unavailable, status_of
from common.validation import GenerationSpec, SamplingParams
from worker.engine import Engine, EngineRequest, SeqOutput
from worker.full_models import is_artifact_spec
from worker.runtime import ModelRuntime

logger = logging.getLogger(__name__)

RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
PROBE_PROMPT = "Hello"


def retryable(exc: BaseException, token_sent: bool) -> bool:
    """The one rule: another worker may take a request only while none of its tokens has
    reached the client, and only for a status that says "not here, not now"."""
    return not token_sent and status_of(exc)[0] in RETRYABLE_CODES


def deadline_from_remaining_s(remaining_s: float | None) -> float | None:
    """A gRPC context's time_remaining() as a monotonic deadline."""
    return None if remaining_s is None else time.monotonic() + max(0.0, remaining_s)


def deadline_from_unix_ms(deadline_unix_ms: int) -> float | None:
    """A router's wall-clock deadline (0 = none) as a monotonic deadline."""
    if deadline_unix_ms <= 0:
        return None
    return time.monotonic() + (deadline_unix_ms / 1000.0 - time.time())


Deliver = Callable[[int, list[SeqOutput]], None]


class FrontStream:
    """One client's view of the engine (a Generate call, a router link, a probe): the
    engine hands it each step's outputs of this client's requests together (one call per
    step, so a link sends one StepEvents per step). ``deliver`` runs on the event loop,
    with ``SeqOutput.retryable`` set on errors by the front's rule."""

    def __init__(self, front: EngineFront, deliver: Deliver) -> None:
        self._front = front
        self.deliver = deliver

    def on_outputs(self, step: int, outputs: list[SeqOutput]) -> None:  # engine thread
        self._front.loop.call_soon_threadsafe(self._front._dispatch, self, step, outputs)


@dataclass
class _InFlight:
    engine: Engine
    stream: FrontStream
    token_sent: bool = False


class EngineFront:
    """See the module docstring. Create it on the event loop, once the runtime is loaded."""

    def __init__(self, runtime: ModelRuntime, prep_threads: int = 2) -> None:
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self._in_flight: dict[int, _InFlight] = {}
        # Tokenisation and store reads: off the event loop, bounded so a burst of huge
        # prompts cannot take every thread of the default executor.
        self._prep = ThreadPoolExecutor(prep_threads, thread_name_prefix="front-prep")

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    def stream(self, deliver: Deliver) -> FrontStream:
        return FrontStream(self, deliver)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def prepare(
        self,
        spec: GenerationSpec,
        stream: FrontStream,
        deadline_monotonic: float | None,
    ) -> EngineRequest:
        """Chat template, tokenisation, context checks and adapter resolution, off the
        event loop; raises the RequestError a client should see.

        The one place ``spec.model`` picks the model: a base name (or "") → the base
        runtime; ``name@version`` / ``name@latest`` → that full fine-tune's runtime,
        loaded here on first use (worker.full_models)."""
        runtime = self.runtime
        full = runtime.full_models
        if is_artifact_spec(spec.model) and full is not None:
            ref = await self.loop.run_in_executor(self._prep, full.resolve, spec.model)
            runtime = await full.runtime_for(ref, self._busy)
            spec = dataclasses.replace(spec, model="")
        req = await self.loop.run_in_executor(
            self._prep, runtime.build_request, spec, stream, deadline_monotonic
        )
        if runtime is not self.runtime:
            req.served_by = runtime.engine
        return req

    def _busy(self, engine: Engine) -> bool:
        return any(entry.engine is engine for entry in self._in_flight.values())

    def submit(self, req: EngineRequest) -> int:
        """Queues a prepared request on the current engine; returns its process-unique id.
        Raises ResourceExhausted / InvalidArgument / Unavailable from the engine."""
        engine = req.served_by or self.engine
        request_id = engine.submit(req)
        assert isinstance(req.sink, FrontStream)
        self._in_flight[request_id] = _InFlight(engine, req.sink)
        return request_id

    def cancel(self, request_id: int, reason: str = "cancelled") -> None:
        """Cancels that request on the engine that holds it; a no-op once it ended (so a
        late cancel can never reach another request)."""
        entry = self._in_flight.get(request_id)
        if entry is not None:
            entry.engine.cancel(request_id, reason)

    def _dispatch(self, stream: FrontStream, step: int, outputs: list[SeqOutput]) -> None:
        """Event loop: the engine's outputs for one stream, minus those of requests the
        front already ended (failed by a rebuild: the old engine may still talk)."""
        current: list[SeqOutput] = []
        for out in outputs:
            entry = self._in_flight.get(out.key)
            if entry is None or entry.stream is not stream:
                continue
            if out.error is not None:
                out.retryable = retryable(out.error, entry.token_sent)
            if out.tokens:
                entry.token_sent = True
            if out.done:
                del self._in_flight[out.key]
            current.append(out)
        if current:
            try:
                stream.deliver(step, current)
            except Exception:  # one client's bug must not stop the others' outputs
                logger.exception("front stream delivery failed")

    def fail_outstanding(self, engine: Engine, error: RequestError) -> int:
        """Ends every request ``engine`` holds with ``error`` (retryable where no token was
        sent); returns how many. Later outputs of that engine for them are dropped."""
        by_stream: dict[int, tuple[FrontStream, list[SeqOutput]]] = {}
        for request_id, entry in list(self._in_flight.items()):
            if entry.engine is not engine:
                continue
            del self._in_flight[request_id]
            out = SeqOutput(request_id, [], "", error=error)
            out.retryable = retryable(error, entry.token_sent)
            by_stream.setdefault(id(entry.stream), (entry.stream, []))[1].append(out)
            engine.cancel(request_id, str(error))
        for stream, outs in by_stream.values():
            try:
                stream.deliver(0, outs)
            except Exception:
                logger.exception("front stream delivery failed")
        return sum(len(outs) for _, outs in by_stream.values())

    async def rebuild(self, reason: str) -> None:
        """Swaps in a fresh engine on the same model. The old engine's requests fail here
        at once (UNAVAILABLE, retryable where no token was sent), even if its thread is
        wedged and never answers its stop."""
        old = self.engine
        new = await asyncio.to_thread(self.runtime.rebuild_engine, old)
        self.runtime.engine = new
        new.start()
        failed = self.fail_outstanding(old, Unavailable(f"worker engine restarted: {reason}"))
        logger.warning("engine rebuilt (%s); %d in-flight request(s) failed", reason, failed)
        await asyncio.to_thread(old.stop, 1.0)

    def stalled_s(self) -> float:
        """How long the current engine has gone without an iteration while it holds
        work (0 when it holds none)."""
        engine = self.engine
        if not any(e.engine is engine for e in self._in_flight.values()):
            return 0.0
        return max(0.0, time.monotonic() - engine.last_step_monotonic)

    async def probe(self, max_new_tokens: int = 2, timeout_s: float = 60.0) -> None:
        """A few greedy tokens through the engine (warm-up and idle self-test); raises if
        they do not come within ``timeout_s``."""
        done: asyncio.Future[SeqOutput] = self.loop.create_future()

        def deliver(step: int, outputs: list[SeqOutput]) -> None:
            for out in outputs:
                if out.done and not done.done():
                    done.set_result(out)

        stream = self.stream(deliver)
        spec = GenerationSpec(
            request_id="self-test",
            model="",
            adapter="",
            prompt=PROBE_PROMPT,
            params=SamplingParams(max_new_tokens=max_new_tokens),
        )
        req = await self.prepare(spec, stream, time.monotonic() + timeout_s)
        request_id = self.submit(req)
        try:
            out = await asyncio.wait_for(done, timeout_s)
        except TimeoutError:
            self.cancel(request_id, "probe timed out")
            raise TimeoutError(f"engine produced no result within {timeout_s}s") from None
        if out.error is not None:
            raise RuntimeError(f"engine probe failed: {out.error}")

    def close(self) -> None:
        self._prep.shutdown(wait=False, cancel_futures=True)

"""Health that tells busy from dead.

Every ``interval_s`` the worker judges its engine:
- with work in flight, progress is the test: the engine must have completed an
  iteration within ``stall_timeout_s``. A busy or overloaded engine is healthy and is
  never probed (a probe would wait behind real work) nor rebuilt;
- idle, a few greedy tokens go through the engine front (the probe);
- a dead engine thread (a failed forward pass) fails the check at once.
A failed check turns the worker NOT_SERVING and rebuilds the engine through the front,
which fails the old engine's requests with UNAVAILABLE (retryable where no token was
sent, so the router re-routes them); SERVING returns once a check passes again. The
loop survives any exception and keeps reporting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from common.metrics import WorkerMetrics
from common.tracing import get_tracer, health_span_attributes, record_error
from worker.front import EngineFront
from worker.runtime import WorkerState

logger = logging.getLogger(__name__)


class EngineUnhealthy(Exception):
    """The engine failed the check; ``rebuild`` says whether a fresh one is needed."""


class SelfTester:
    """Runs the health check every ``interval_s`` and drives recovery."""

    def __init__(
        self,
        state: WorkerState,
        set_serving: Callable[[bool], Awaitable[None]],
        metrics: WorkerMetrics | None,
        interval_s: float,
        timeout_s: float,
        stall_timeout_s: float = 0.0,
    ) -> None:
        self._state = state
        self._set_serving = set_serving
        self._metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.healthy = True
        self.reason = ""
        self.checks_total = 0  # read by tests: the loop is alive and judging
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 or self.stall_timeout_s > 0:
            self._task = asyncio.create_task(self._loop(), name="self-test")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    @property
    def _period_s(self) -> float:
        periods = [p for p in (self.interval_s, self.stall_timeout_s / 4) if p > 0]
        return min(periods)

    async def check(self, front: EngineFront) -> None:
        """Raises EngineUnhealthy when the engine is dead or stalled (busy is healthy)."""
        with get_tracer(__name__).start_as_current_span(
            "worker.self_test", attributes=health_span_attributes()
        ) as span:
            try:
                await self._check(front)
            except Exception as exc:
                record_error(span, exc)
                raise

    async def _check(self, front: EngineFront) -> None:
        engine = front.engine
        if not engine.alive:
            raise EngineUnhealthy(f"engine is not running: {engine.fatal_error}")
        stats = engine.stats()
        busy = front.in_flight > 0 or stats["queued"] > 0 or stats["running"] > 0
        if busy:
            stalled_s = front.stalled_s()
            if self.stall_timeout_s > 0 and stalled_s > self.stall_timeout_s:
                raise EngineUnhealthy(f"engine made no step for {stalled_s:.0f}s with work")
            return  # progressing: healthy, and no probe behind real work
        if self.interval_s <= 0:
            return
        try:
            await front.probe(2, self.timeout_s)
        except TimeoutError as exc:
            # Work that arrived while the probe waited makes this busy, not dead. The probe
            # itself is in flight (and may be "running" in a wedged engine): count others.
            if front.in_flight > 1:
                return
            raise EngineUnhealthy(str(exc)) from exc
        except Exception as exc:
            raise EngineUnhealthy(str(exc)) from exc

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never die: health would freeze at its last value
                logger.exception("health check failed unexpectedly; still checking")

    async def _run_once(self) -> None:
        if not self._state.accepting.is_set() and self.healthy:
            return  # loading or draining owns the health status now
        front = self._state.front
        self.checks_total += 1
        try:
            await self.check(front)
            passed = True
        except EngineUnhealthy as exc:
            passed = False
            self.reason = f"self-test failed: {exc}"
        if self._metrics is not None:
            self._metrics.record_self_test(passed)
        if passed and not self.healthy:
            logger.info("self-test passes again: SERVING")
            self.healthy, self.reason = True, ""
            self._state.accepting.set()
            await self._set_serving(True)
        elif not passed:
            if self.healthy:
                logger.error("%s: NOT_SERVING, rebuilding the engine", self.reason)
                self.healthy = False
                self._state.accepting.clear()
                await self._set_serving(False)
            else:
                logger.error("still NOT_SERVING: %s", self.reason)
            await front.rebuild(self.reason)

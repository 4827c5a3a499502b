"""Health that tells the truth: a periodic self-test pushes a few tokens through the real
engine; when it fails (a wedged or dead engine), the worker turns NOT_SERVING, rebuilds
its engine and returns to SERVING once a self-test passes again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from common.metrics import WorkerMetrics
from common.tracing import get_tracer, health_span_attributes, record_error
from worker.runtime import ModelRuntime, WorkerState
from worker.selftest import run_engine_probe

logger = logging.getLogger(__name__)


class SelfTester:
    """Runs the self-test every ``interval_s`` and drives recovery."""

    def __init__(
        self,
        state: WorkerState,
        set_serving: Callable[[bool], Awaitable[None]],
        metrics: WorkerMetrics | None,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._state = state
        self._set_serving = set_serving
        self._metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.healthy = True
        self.reason = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="self-test")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _probe(self, runtime: ModelRuntime) -> None:
        with get_tracer(__name__).start_as_current_span(
            "worker.self_test", attributes=health_span_attributes()
        ) as span:
            try:
                engine = runtime.engine
                stats = engine.stats()
                if stats["queued"] > 0 or stats["running"] >= engine.config.max_running:
                    # Saturated: a probe would wait behind real work. Progress is the test.
                    stalled_s = time.monotonic() - engine.last_step_monotonic
                    if stalled_s > self.timeout_s or not engine.alive:
                        raise TimeoutError(f"engine made no progress for {stalled_s:.0f}s")
                    return
                await asyncio.to_thread(run_engine_probe, runtime, 2, self.timeout_s)
            except Exception as exc:
                record_error(span, exc)
                raise

    async def _loop(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:  # never die silently: health would freeze at its last value
            logger.exception("self-test loop failed")
            raise

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            runtime = self._state.runtime
            draining = not self._state.accepting.is_set() and self.healthy
            if draining:
                continue  # drain owns the health status now
            try:
                await self._probe(runtime)
                passed = True
            except Exception as exc:
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
                await asyncio.to_thread(self._rebuild, runtime)

    @staticmethod
    def _rebuild(runtime: ModelRuntime) -> None:
        """Replaces the engine: the old one is told to stop (its requests fail with
        UNAVAILABLE) and a fresh engine thread takes over the same model."""
        old = runtime.engine
        runtime.engine = runtime.rebuild_engine(old)
        old.stop(timeout_s=1.0)
        runtime.engine.start()

"""A few greedy tokens through the real engine: the warm-up and the self-test."""

from __future__ import annotations

import threading

from common.validation import SamplingParams
from worker.engine import EngineRequest, SeqOutput
from worker.runtime import ModelRuntime


def run_engine_probe(
    runtime: ModelRuntime, max_new_tokens: int = 4, timeout_s: float = 60.0
) -> None:
    """Runs a few greedy tokens through the real engine (warm-up and self-test); raises
    if the engine does not answer in time."""
    done = threading.Event()
    result: list[SeqOutput] = []

    class _Sink:
        def on_outputs(self, step: int, outputs: list[SeqOutput]) -> None:
            result.extend(outputs)
            if any(o.done for o in outputs):
                done.set()

    ids = runtime.tokenizer("Hello", add_special_tokens=True)["input_ids"]
    key = runtime.engine.submit(
        EngineRequest(
            prompt_ids=list(ids), params=SamplingParams(max_new_tokens=max_new_tokens), sink=_Sink()
        )
    )
    if not done.wait(timeout_s):
        runtime.engine.cancel(key, "probe timed out")
        raise TimeoutError(f"engine produced no result within {timeout_s}s")
    errors = [o.error for o in result if o.error is not None]
    if errors:
        raise RuntimeError(f"engine probe failed: {errors[0]}")

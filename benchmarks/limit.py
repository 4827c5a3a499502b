"""The **limit**: the continuous-batching engine driven in-process, with no gRPC.

Run as a child of the benchmark (``python -m benchmarks.limit ...``) so that its peak
RSS is its own and the driver never imports torch. The same closed loop as the
streaming clients keeps ``concurrency`` requests in the engine; timestamps are taken
on the engine thread the moment a step's outputs are handed over, which is the earliest
any server built on this engine could send them.

It stays up between levels, so the driver can interleave its levels with the other
systems' (the same machine state for both sides of a ratio): once warm it writes the
``--ready`` file, then runs one level per JSON line ``{"concurrency": C, "requests": N,
"out": PATH}`` read from stdin, writing each level's records to PATH (atomically).
It exits when stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from pathlib import Path

from benchmarks.metrics import RequestRecord, self_peak_rss_mb
from benchmarks.workload import Workload


class _RecordSink:
    """Engine sink of one request: stamps its outputs and reports completion."""

    def __init__(self, record: RequestRecord, done: queue.SimpleQueue) -> None:
        self.record = record
        self.done = done

    def on_outputs(self, step: int, outputs: list) -> None:
        now = time.perf_counter()
        for out in outputs:
            self.record.on_tokens(now, len(out.tokens))
            if out.done:
                self.record.end_s = now
                if out.error is not None:
                    self.record.error = f"{type(out.error).__name__}: {out.error}"
                if out.usage is not None:
                    self.record.server_ttft_ms = out.usage.time_to_first_token_ms
                    self.record.server_tokens = out.usage.completion_tokens
                self.done.put(self.record)


def run_level(engine, tokenizer, workload: Workload, n_requests: int, concurrency: int):
    """One closed-loop run at ``concurrency``; returns the request records."""
    from common.validation import SamplingParams
    from worker.engine import EngineRequest

    prompts = workload.cycle(n_requests)
    # Tokenised up front: the limit is the engine alone (the worker tokenises per request).
    ids = [list(tokenizer(p.text, add_special_tokens=True)["input_ids"]) for p in prompts]
    params = SamplingParams(
        max_new_tokens=workload.max_new_tokens, temperature=0.0, ignore_eos=True
    )
    records = [RequestRecord(prompt_index=p.index) for p in prompts]
    done: queue.SimpleQueue = queue.SimpleQueue()
    sent = 0

    def submit() -> None:
        nonlocal sent
        record = records[sent]
        record.start_s = time.perf_counter()
        engine.submit(EngineRequest(ids[sent], params, _RecordSink(record, done)))
        sent += 1

    while sent < min(concurrency, len(records)):
        submit()
    for _ in range(len(records)):
        done.get(timeout=3600)
        if sent < len(records):
            submit()
    return records


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # the driver never reads half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True, help="workload JSON from the driver")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weights", default="auto", help="as the worker's --weights")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--max-kv-tokens", type=int, default=65536)
    parser.add_argument("--ready", required=True, help="file written once the engine is warm")
    args = parser.parse_args(argv)

    from common.models import load_model, resolve_model
    from common.validation import SamplingParams
    from worker.engine import Engine, EngineConfig, EngineRequest
    from worker.weights import prepare_for_serving

    workload = Workload.load(Path(args.workload))
    model, tokenizer = load_model(resolve_model(None), dtype=args.dtype, device="cpu")
    prepare_for_serving(model, args.weights)  # as the worker prepares it (worker/runtime.py)
    context = int(getattr(model.config, "max_position_embeddings", 0) or 8192)
    engine = Engine(
        model,
        tokenizer,
        EngineConfig(
            max_running=args.max_running,
            max_kv_tokens=args.max_kv_tokens,
            max_context_tokens=context,
        ),
    )
    engine.start()
    try:
        # Warm-up (first-call allocations), as the worker does before it reports SERVING.
        warm = RequestRecord(prompt_index=-1)
        done: queue.SimpleQueue = queue.SimpleQueue()
        prompt = list(tokenizer("Hello", add_special_tokens=True)["input_ids"])
        engine.submit(
            EngineRequest(
                prompt,
                SamplingParams(max_new_tokens=2, ignore_eos=True),
                _RecordSink(warm, done),
            )
        )
        done.get(timeout=600)
        _write_json_atomically(Path(args.ready), {"pid": os.getpid()})
        for line in sys.stdin:
            if not line.strip():
                continue
            command = json.loads(line)
            records = run_level(
                engine, tokenizer, workload, int(command["requests"]), int(command["concurrency"])
            )
            out = {
                "records": [r.to_json() | {"gaps_s": r.gaps_s} for r in records],
                "peak_rss_mb": self_peak_rss_mb(),
            }
            _write_json_atomically(Path(command["out"]), out)
            print(f"limit c={command['concurrency']} done", file=sys.stderr, flush=True)
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill fairness: how long running streams wait for a token while a long prompt is
admitted (issue 14: an 8,100-token prompt made the streams beside it wait 32 s).

The engine runs in-process on the default model, as the worker serves it on this device
(fp32 and the CPU weight layout on CPU). ``--streams`` greedy streams decode; once each
has produced ``--warm-tokens`` tokens, their gaps are "normal" for ``--normal-tokens``
more; then one ``--long-tokens`` prompt is submitted, and the gaps of every stream while
it is admitted (from its submission to its first token) are compared with the normal
gap. Timestamps are taken on the engine thread as each step's outputs are handed over.

    python -m benchmarks.prefill_fairness                 # this checkout's engine
    PYTHONPATH=/path/to/other/checkout python benchmarks/prefill_fairness.py
                                                          # another checkout's engine

It prints one JSON line; the bar (issue 14) is ``worst_p99_ratio`` <= 3: no stream waits
more than 3x its normal inter-token gap at p99 while the long prompt is admitted.
It imports nothing from ``benchmarks`` so that it runs against any checkout's worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import fields

# Plain English-like filler, cut to a token count with the model's tokenizer.
_FILLER = (
    "the river ran past the old mill and the village children watched the boats go by "
    "while their parents talked about the harvest the weather and the price of bread "
)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def filler_prompt_ids(tokenizer, n_tokens: int, salt: int) -> list[int]:
    text = f"Note {salt}: " + _FILLER * (n_tokens // 20 + 2)
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[:n_tokens]


class _Stamps:
    """Engine sink: timestamps of each request's tokens, events on counts and the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[int, list[float]] = {}
        self.errors: dict[int, str] = {}
        self.waiters: list[tuple[int, int, threading.Event]] = []

    def wait_for(self, key: int, count: int) -> threading.Event:
        event = threading.Event()
        with self.lock:
            if len(self.times.get(key, [])) >= count:
                event.set()
            else:
                self.waiters.append((key, count, event))
        return event

    def on_outputs(self, step: int, outputs: list) -> None:
        now = time.perf_counter()
        with self.lock:
            for out in outputs:
                stamps = self.times.setdefault(out.key, [])
                stamps.extend([now] * len(out.tokens))
                if out.error is not None:
                    self.errors[out.key] = str(out.error)
            for key, count, event in list(self.waiters):
                if len(self.times.get(key, [])) >= count or key in self.errors:
                    event.set()
                    self.waiters.remove((key, count, event))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--stream-prompt-tokens", type=int, default=32)
    parser.add_argument("--long-tokens", type=int, default=8000)
    parser.add_argument("--warm-tokens", type=int, default=8)
    parser.add_argument("--normal-tokens", type=int, default=24)
    parser.add_argument("--after-tokens", type=int, default=16, help="tokens after it joins")
    parser.add_argument(
        "--max-prefill-tokens-per-step",
        type=int,
        default=0,
        help="the engine's prompt-token budget per iteration (0 = the worker's default)",
    )
    parser.add_argument(
        "--max-prefill-stall",
        type=float,
        default=-1.0,
        help="the engine's stall bound for a step with prompt work (-1 = the worker's default)",
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)

    import torch

    from common.models import load_model, resolve_model
    from common.validation import SamplingParams
    from worker.config import WorkerConfig
    from worker.cpu_layout import use_column_major_linear_weights
    from worker.engine import Engine, EngineConfig, EngineRequest

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model(None), dtype=args.dtype, device="auto")
    if next(model.parameters()).device.type == "cpu":
        use_column_major_linear_weights(model)
    worker_fields = {f.name: f.default for f in fields(WorkerConfig)}
    budget = args.max_prefill_tokens_per_step or worker_fields.get(
        "max_prefill_tokens_per_step", 512
    )
    stall = (
        args.max_prefill_stall
        if args.max_prefill_stall >= 0
        else worker_fields.get("max_prefill_stall", 0.0)
    )
    config_fields = {f.name for f in fields(EngineConfig)}
    config = EngineConfig(
        max_running=args.streams + 1,
        max_prefill_tokens_per_step=budget,
        # Older checkouts' engines have no stall bound: compare them at their own fixed budget.
        **({"max_prefill_stall": stall} if "max_prefill_stall" in config_fields else {}),
    )
    engine = Engine(model, tokenizer, config)
    engine.start()
    sink = _Stamps()
    stream_new = args.warm_tokens + args.normal_tokens + 4000  # cancelled when done
    try:
        keys = [
            engine.submit(
                EngineRequest(
                    filler_prompt_ids(tokenizer, args.stream_prompt_tokens, i),
                    SamplingParams(max_new_tokens=stream_new, ignore_eos=True),
                    sink,
                )
            )
            for i in range(args.streams)
        ]
        for key in keys:
            sink.wait_for(key, args.warm_tokens + args.normal_tokens).wait(args.timeout_s)
        long_ids = filler_prompt_ids(tokenizer, args.long_tokens, 999)
        long_submitted = time.perf_counter()
        long_key = engine.submit(
            EngineRequest(long_ids, SamplingParams(max_new_tokens=8, ignore_eos=True), sink)
        )
        if not sink.wait_for(long_key, 1).wait(args.timeout_s):
            raise TimeoutError("the long prompt never got its first token")
        long_first = sink.times[long_key][0]
        with sink.lock:
            joined = {k: len(sink.times[k]) for k in keys}
        for key in keys:
            sink.wait_for(key, joined[key] + args.after_tokens).wait(args.timeout_s)
    finally:
        for key in sink.times:
            engine.cancel(key, "benchmark done")
        engine.stop()
    if sink.errors:
        print(f"errors: {sink.errors}", file=sys.stderr)

    per_stream = []
    for key in keys:
        t = sink.times[key]
        gaps = [(t[i - 1], t[i]) for i in range(1, len(t))]
        normal = [b - a for a, b in gaps if a >= t[args.warm_tokens - 1] and b <= long_submitted]
        during = [b - a for a, b in gaps if b > long_submitted and a < long_first]
        after = [b - a for a, b in gaps if a >= long_first][: args.after_tokens]
        normal_ms = statistics.median(normal) * 1000.0
        p99_ms = _percentile(during, 99) * 1000.0
        # Where the longest waits fell: 0 = the gap that ends with the long prompt joining
        # the batch (its last chunk and the merge of its cache), 1 = the one before, ...
        longest = sorted(range(len(during)), key=lambda i: during[i], reverse=True)[:3]
        per_stream.append(
            {
                "longest_during_ms_and_gaps_before_join": [
                    (round(during[i] * 1000.0, 1), len(during) - 1 - i) for i in longest
                ],
                "normal_gap_ms": round(normal_ms, 1),
                "during_gaps": len(during),
                "during_p50_ms": round(_percentile(during, 50) * 1000.0, 1),
                "during_p99_ms": round(p99_ms, 1),
                "during_max_ms": round(max(during) * 1000.0, 1),
                "p99_ratio": round(p99_ms / normal_ms, 2),
                "after_join_p50_ms": round(_percentile(after, 50) * 1000.0, 1),
            }
        )
    report = {
        "engine_from": os.path.dirname(os.path.dirname(sys.modules[Engine.__module__].__file__)),
        "streams": args.streams,
        "long_prompt_tokens": len(long_ids),
        "max_prefill_tokens_per_step": budget,
        "max_prefill_stall": getattr(config, "max_prefill_stall", None),
        "threads": torch.get_num_threads(),
        "long_ttft_s": round(long_first - long_submitted, 2),
        "normal_gap_ms_median": round(statistics.median(s["normal_gap_ms"] for s in per_stream), 1),
        "worst_during_p99_ms": max(s["during_p99_ms"] for s in per_stream),
        "worst_during_max_ms": max(s["during_max_ms"] for s in per_stream),
        "worst_p99_ratio": max(s["p99_ratio"] for s in per_stream),
        "after_join_gap_ms_median": round(
            statistics.median(s["after_join_p50_ms"] for s in per_stream), 1
        ),
        "bar_p99_ratio_le_3": max(s["p99_ratio"] for s in per_stream) <= 3.0,
        "per_stream": per_stream,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

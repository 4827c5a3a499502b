"""Structured output at full speed (issue 17): the engine's throughput with half of its
streams constrained by a JSON schema, against the same engine with every stream free.

The engine runs in-process on the default model, as the worker serves it on this device
(fp32 and the CPU weight layout on CPU). Each round runs two phases on the same engine:

- ``free``: ``--streams`` free streams (greedy, EOS ignored);
- ``mixed``: half of them constrained by ``SCHEMA`` (an object with an enum, a number
  and an array of strings; greedy, ending when the document is complete), half free.

Each phase is a closed loop: a stream that finishes is replaced by a new request of the
same kind, so the batch stays full, until ``--requests`` requests have completed; the
tokens stamped up to then count. Free requests generate, in turn, the lengths the
constrained ones had in the warm-up (most documents end early, a few run to the cap), so
both phases admit prompts equally often and the difference between them is the
constraint's cost. The phases alternate order each round (the machine's speed drifts
over minutes); the mixed/free ratio is the median of the rounds' ratios. The mask cost is timed around the engine's one hook
(``worker.engine.mask_rows``: xgrammar filling each constrained row's bitmask, and the
masking of those rows' logits), per engine step.

    python -m benchmarks.structured                    # 32 streams, 3 rounds
    python -m benchmarks.structured --streams 4 --requests 4 --rounds 1 --no-fail  # tiny

It prints a summary and one JSON line (``--json PATH`` writes it too) and exits 1 when
the mixed/free throughput ratio is below ``--target`` (0.9) unless ``--no-fail``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A realistic extraction schema: an enum, a bounded number, a short array of strings.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "status": {"enum": ["pending", "shipped", "delivered", "lost"]},
        "total_eur": {"type": "number", "minimum": 0, "maximum": 10000},
        "items": {
            "type": "array",
            "items": {"type": "string", "maxLength": 24},
            "minItems": 1,
            "maxItems": 4,
        },
    },
    "required": ["status", "total_eur", "items"],
    "additionalProperties": False,
}

PROMPTS = [
    "Order 1041: two lamps and a rug, 89.90 EUR, shipped yesterday. Extract it as JSON.",
    "My parcel with three books (42 EUR) is still pending. Give me the order as JSON.",
    "Extract the order: 5 coffee mugs, 24.50 EUR total, delivered on Monday.",
    "Order 77 was lost in transit: a phone case and a charger, 31 EUR. JSON, please.",
    "Summarise as JSON: 1 office chair, 249 EUR, status shipped.",
    "Customer bought 12 pens and a notebook for 18.20 EUR; it was delivered. As JSON.",
    "A pending order of 4 plates and 4 bowls, 64 EUR in total. Output JSON.",
    "Order 3 (garden hose, 2 gloves, 37.99 EUR) has shipped. Return JSON.",
    "Extract: the blender (119 EUR) was delivered to Lyon last week.",
    "JSON for this order: two tickets to Oslo, 310 EUR, pending payment.",
    "Order 5512: a bike helmet and lights, 72.40 EUR, lost by the courier.",
    "Give the order details as JSON: 3 candles, 15 EUR, shipped.",
    "The desk lamp and 2 bulbs (45.10 EUR) were delivered. Extract the order.",
    "Pending: one winter coat, 180 EUR. Write the order as JSON.",
    "Order 9: six apples, two loaves of bread, 9.80 EUR, delivered. JSON only.",
    "Extract the order record: headphones, 59 EUR, shipped from Berlin.",
]


@dataclass
class _Request:
    kind: str  # "constrained" or "free"
    submitted_s: float
    tokens: list[float] = field(default_factory=list)  # a stamp per generated token
    text: str = ""
    finish: str | None = None
    error: str | None = None


class _Recorder:
    """The phase's only engine sink and the timer around mask_rows (both run on the
    engine thread): token stamps per request, and per engine step its duration, its
    mask time and how many constrained rows it masked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, _Request] = {}
        self.done: list[int] = []
        self.done_event = threading.Event()
        self.steps: list[tuple[float, float, int]] = []  # (step_s, mask_s, masked rows)
        self._last_step: float | None = None
        self._mask_s = 0.0
        self._masked_rows = 0
        self.recording = False

    def add(self, key: int, request: _Request) -> None:
        with self.lock:
            self.requests[key] = request

    def on_mask(self, elapsed_s: float, rows: int) -> None:
        self._mask_s += elapsed_s
        self._masked_rows += rows

    def on_outputs(self, step: int, outputs: list) -> None:
        now = time.perf_counter()
        if self._last_step is not None and self.recording:
            self.steps.append((now - self._last_step, self._mask_s, self._masked_rows))
        self._last_step = now
        self._mask_s, self._masked_rows = 0.0, 0
        with self.lock:
            for out in outputs:
                req = self.requests.get(out.key)
                if req is None:
                    continue
                req.tokens.extend([now] * len(out.tokens))
                req.text += out.text
                if out.done:
                    req.finish = out.finish_reason
                    if out.error is not None:
                        req.error = f"{type(out.error).__name__}: {out.error}"
                    self.done.append(out.key)
                    self.done_event.set()


def _timed_mask_rows(original, recorder_of):
    """mask_rows with its time reported to the current phase's recorder."""

    def timed(logits, matchers):
        start = time.perf_counter()
        result = original(logits, matchers)
        recorder = recorder_of()
        if recorder is not None:
            recorder.on_mask(time.perf_counter() - start, sum(m is not None for m in matchers))
        return result

    return timed


class _Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        import worker.engine as engine_module
        from common.models import load_model, resolve_model
        from common.validation import ConstraintSpec
        from worker.constraints import ConstraintCompiler
        from worker.cpu_layout import use_column_major_linear_weights
        from worker.engine import Engine, EngineConfig

        self.args = args
        if args.threads:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(resolve_model(None), dtype=args.dtype, device="auto")
        if next(model.parameters()).device.type == "cpu":
            use_column_major_linear_weights(model)
        self.tokenizer = tokenizer
        self.prompt_ids = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
            for p in PROMPTS
        ]
        self.spec = ConstraintSpec("json_schema", json.dumps(SCHEMA))
        compiler = ConstraintCompiler(
            tokenizer,
            vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            stop_token_ids=sorted(Engine._eos_ids(model, tokenizer)),
        )
        start = time.perf_counter()
        self.compiled = compiler.compile(self.spec)  # tokenizer index + schema, once
        self.compile_s = time.perf_counter() - start
        self.recorder: _Recorder | None = None
        engine_module.mask_rows = _timed_mask_rows(engine_module.mask_rows, lambda: self.recorder)
        self.engine = Engine(model, tokenizer, EngineConfig(max_running=args.streams))
        self.engine.start()
        # Free requests' lengths, cycled: those of the warm-up's constrained requests.
        self.free_lengths = [args.max_new_tokens]
        self.sent = 0

    def close(self) -> None:
        self.engine.stop()

    def _submit(self, recorder: _Recorder, kind: str) -> None:
        from common.validation import SamplingParams
        from worker.engine import EngineRequest

        ids = self.prompt_ids[self.sent % len(self.prompt_ids)]
        self.sent += 1
        if kind == "constrained":
            params = SamplingParams(max_new_tokens=self.args.max_new_tokens, constraint=self.spec)
            request = EngineRequest(ids, params, recorder, constraint=self.compiled)
        else:
            length = self.free_lengths[self.sent % len(self.free_lengths)]
            params = SamplingParams(max_new_tokens=length, ignore_eos=True)
            request = EngineRequest(ids, params, recorder)
        # The key is only known once submitted, and the engine thread may already be
        # emitting for it: hold the recorder's lock across submit and registration.
        with recorder.lock:
            key = self.engine.submit(request)
            recorder.requests[key] = _Request(kind, time.perf_counter())

    def run_phase(self, kinds: list[str], n_requests: int, replace: bool = True) -> dict[str, Any]:
        """Keeps one request of each entry of ``kinds`` in flight (``replace``: a finished
        one is replaced by one of its kind) until n_requests are done; returns the
        phase's figures."""
        recorder = _Recorder()
        self.recorder = recorder
        start = time.perf_counter()
        recorder.recording = True
        for kind in kinds:
            self._submit(recorder, kind)
        finished = 0
        seen_done = 0
        end = start
        while finished < n_requests:
            if not recorder.done_event.wait(self.args.timeout_s):
                raise TimeoutError("no request finished within --timeout-s")
            with recorder.lock:
                recorder.done_event.clear()
                new = recorder.done[seen_done:]
                seen_done = len(recorder.done)
            for key in new:
                finished += 1
                end = time.perf_counter()
                if finished >= n_requests or not replace:
                    continue
                self._submit(recorder, recorder.requests[key].kind)
        recorder.recording = False
        with recorder.lock:
            pending = [k for k, r in recorder.requests.items() if r.finish is None]
        for key in pending:
            self.engine.cancel(key, "benchmark phase over")
        # Let the cancelled rows leave before the next phase starts.
        deadline = time.monotonic() + self.args.timeout_s
        while time.monotonic() < deadline:
            with recorder.lock:
                if set(pending) <= set(recorder.done):  # every cancelled row has ended
                    break
            time.sleep(0.01)
        self.recorder = None
        window_s = end - start
        with recorder.lock:
            requests = list(recorder.requests.values())
        tokens = {
            kind: sum(sum(1 for t in r.tokens if t <= end) for r in requests if r.kind == kind)
            for kind in ("constrained", "free")
        }
        done = [r for r in requests if r.finish is not None and r.error is None]
        return {
            "window_s": window_s,
            "tokens": tokens,
            "tokens_per_s": sum(tokens.values()) / window_s,
            "constrained_tokens_per_s": tokens["constrained"] / window_s,
            "free_tokens_per_s": tokens["free"] / window_s,
            "steps": recorder.steps,
            "completed": [r for r in done if r.kind == "constrained"],
            "errors": [r.error for r in requests if r.error and "benchmark phase" not in r.error],
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100.0 * (len(ordered) - 1)))]


def _validate(texts: list[str]) -> tuple[int, int]:
    """(valid, checked) of completed constrained outputs; jsonschema is a dev dependency."""
    try:
        import jsonschema
    except ImportError:
        return (0, 0)
    valid = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return valid, len(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32, help="rows in flight (half constrained)")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests completed per phase (0 = 2x streams)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="free + mixed phases, alternated")
    parser.add_argument(
        "--max-new-tokens", type=int, default=96, help="cap of a constrained request"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--target", type=float, default=0.9, help="least mixed/free ratio")
    parser.add_argument("--no-fail", action="store_true", help="report only, exit 0")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.streams < 2:
        parser.error(f"--streams must be at least 2 (half constrained), got {args.streams}")
    n_requests = args.requests or 2 * args.streams
    constrained_n = args.streams // 2
    mixed = ["constrained"] * constrained_n + ["free"] * (args.streams - constrained_n)
    all_free = ["free"] * args.streams

    import torch

    bench = _Bench(args)
    try:
        # Warm-up: every code path once, and the constrained requests' lengths, which
        # the free requests then generate in turn (a few documents run to the cap, most
        # end early: the same lengths give both phases the same prompt churn).
        warm = bench.run_phase(["constrained"] * constrained_n, constrained_n, replace=False)
        lengths = [len(r.tokens) for r in warm["completed"]]
        bench.free_lengths = lengths or [32]
        rounds = []
        for i in range(args.rounds):
            order = [("free", all_free), ("mixed", mixed)]
            if i % 2:
                order.reverse()
            phases = {name: bench.run_phase(kinds, n_requests) for name, kinds in order}
            rounds.append(phases)
            print(
                f"round {i}: free {phases['free']['tokens_per_s']:.1f} tok/s, mixed "
                f"{phases['mixed']['tokens_per_s']:.1f} tok/s (constrained "
                f"{phases['mixed']['constrained_tokens_per_s']:.1f} + free "
                f"{phases['mixed']['free_tokens_per_s']:.1f}), ratio "
                f"{phases['mixed']['tokens_per_s'] / phases['free']['tokens_per_s']:.3f}",
                flush=True,
            )
    finally:
        bench.close()

    ratios = [r["mixed"]["tokens_per_s"] / r["free"]["tokens_per_s"] for r in rounds]
    ratio = statistics.median(ratios)
    mixed_steps = [s for r in rounds for s in r["mixed"]["steps"]]
    free_steps = [s for r in rounds for s in r["free"]["steps"]]
    masked = [(step_s, mask_s, rows) for step_s, mask_s, rows in mixed_steps if rows]
    mask_ms = [m * 1000.0 for _, m, _ in masked]
    per_row_us = [m * 1e6 / rows for _, m, rows in masked]
    completed = [req for r in rounds for req in r["mixed"]["completed"]]
    valid, checked = _validate([req.text for req in completed if req.finish in ("EOS", "STOP")])
    errors = [e for r in rounds for p in r.values() for e in p["errors"]]

    def median_of(phase: str, key: str) -> float:
        return statistics.median(r[phase][key] for r in rounds)

    report = {
        "benchmark": "structured",
        "streams": args.streams,
        "constrained_streams": constrained_n,
        "requests_per_phase": n_requests,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "schema": SCHEMA,
        "compile_s": round(bench.compile_s, 3),
        "free_lengths_from_warmup": bench.free_lengths,
        "free_tokens_per_s": round(median_of("free", "tokens_per_s"), 1),
        "mixed_tokens_per_s": round(median_of("mixed", "tokens_per_s"), 1),
        "mixed_constrained_tokens_per_s": round(median_of("mixed", "constrained_tokens_per_s"), 1),
        "mixed_free_tokens_per_s": round(median_of("mixed", "free_tokens_per_s"), 1),
        "mixed_free_ratio": round(ratio, 3),
        "round_ratios": [round(x, 3) for x in ratios],
        "mask_ms_per_step": {
            "p50": _round(_median(mask_ms), 3),
            "p90": _round(_pct(mask_ms, 90), 3),
            "rows_p50": _median([rows for _, _, rows in masked]),
        },
        "mask_us_per_row_p50": _round(_median(per_row_us), 1),
        "mask_share_of_mixed_step_time": _round(
            sum(m for _, m, _ in masked) / sum(s for s, _, _ in mixed_steps)
            if mixed_steps
            else None,
            4,
        ),
        "step_ms_p50": {
            "free": _round(_median([s * 1000.0 for s, _, _ in free_steps]), 2),
            "mixed": _round(_median([s * 1000.0 for s, _, _ in mixed_steps]), 2),
        },
        "constrained_completed": len(completed),
        "constrained_finish": dict(Counter(req.finish for req in completed)),
        "constrained_examples": [req.text for req in completed[:2]],
        "constrained_valid": valid,
        "constrained_checked": checked,
        "errors": errors[:5],
        "target": args.target,
        "target_met": ratio >= args.target,
    }
    print(
        f"free {report['free_tokens_per_s']} tok/s | mixed {report['mixed_tokens_per_s']} tok/s"
        f" (constrained {report['mixed_constrained_tokens_per_s']}, free"
        f" {report['mixed_free_tokens_per_s']}) | mixed/free {report['mixed_free_ratio']}"
        f" (target >= {args.target}) | mask {report['mask_ms_per_step']['p50']} ms/step p50"
        f" ({report['mask_us_per_row_p50']} us/row) | valid {valid}/{checked}"
    )
    line = json.dumps(report)
    print(line)
    if args.json is not None:
        args.json.write_text(line + "\n")
    if errors:
        print(f"errors: {errors[:5]}", file=sys.stderr)
        return 1
    return 0 if (args.no_fail or report["target_met"]) else 1


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    sys.exit(main())

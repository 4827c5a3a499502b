"""Weight precision: speed and quality of ``--weights fp32|bf16|int8`` side by side.

For each precision the default model is prepared exactly as the worker prepares it
(``worker.weights.prepare_for_serving``) and measured in-process:

- quality: perplexity on ``benchmarks/data/heldout.txt`` (prose written for this
  benchmark, so the model cannot have trained on it), and greedy agreement with fp32
  over the benchmark's prompts: the share of prompts whose first 16 (and 32) greedy
  tokens are identical to fp32's, and the share of identical tokens up to the first
  difference;
- speed: the continuous-batching engine (as ``benchmarks/limit.py`` drives it) at each
  ``--concurrency`` level, tokens/s and TTFT p50;
- the limit row: the bandwidth bound at batch 1 (measured read bandwidth of this machine
  / the bytes of the model's tensors, which a decode step reads) beside the batch-1
  figure.

Quality bar for a default (issue 19): perplexity within 3% of fp32 and greedy agreement
>= 90% on the first 16 tokens; the script marks each precision PASS or MISS.

    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.precision
    PYTHONPATH=$PWD .venv/bin/python -m benchmarks.precision --weights fp32 int8 --prompts 4 --concurrency 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout.txt"
PPL_BAR = 0.03
AGREEMENT_BAR = 0.90


def load_prepared(weights: str, dtype: str = "float32") -> tuple[Any, Any, str]:
    from common.models import load_model, resolve_model
    from worker.weights import prepare_for_serving

    model, tokenizer = load_model(resolve_model(None), dtype=dtype, device="cpu")
    return model, tokenizer, prepare_for_serving(model, weights)


def perplexity(model: Any, tokenizer: Any, text: str, window: int = 512) -> float:
    """exp(mean next-token NLL) over ``text``, in non-overlapping windows."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, ids.shape[0] - 1, window):
            chunk = ids[start : start + window + 1][None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            nll += float(loss)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def greedy(model: Any, tokenizer: Any, prompts: list[str], tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


def agreement(reference: list[list[int]], other: list[list[int]], n: int) -> float:
    """Share of prompts whose first ``n`` tokens are identical."""
    same = sum(1 for a, b in zip(reference, other, strict=True) if a[:n] == b[:n])
    return same / len(reference)


def prefix_share(reference: list[list[int]], other: list[list[int]]) -> float:
    """Tokens identical up to each prompt's first difference, over all tokens."""
    total = sum(len(a) for a in reference)
    same = 0
    for a, b in zip(reference, other, strict=True):
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            same += 1
    return same / total


def read_bandwidth_gb_s(mb: int = 512, rounds: int = 5) -> float:
    """Best of ``rounds`` full reads of an ``mb`` MB tensor (a sum touches every byte)."""
    import torch

    buf = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        float(buf.sum())
        best = min(best, time.perf_counter() - start)
    return mb / 1024 / best


def engine_levels(model: Any, tokenizer: Any, prompts: list[str], levels: list[int], tokens: int):
    from benchmarks.limit import run_level
    from benchmarks.metrics import summarize
    from benchmarks.workload import Prompt, Workload
    from worker.engine import Engine, EngineConfig

    workload = Workload(
        prompts=tuple(Prompt(i, p, 0) for i, p in enumerate(prompts)),
        max_new_tokens=tokens,
        seed=0,
        min_prompt_tokens=1,
        max_prompt_tokens=512,
    )
    engine = Engine(model, tokenizer, EngineConfig(max_running=max(levels), max_kv_tokens=65536))
    engine.start()
    try:
        run_level(engine, tokenizer, workload, 1, 1)  # warm-up
        out = {}
        for c in levels:
            summary = summarize(run_level(engine, tokenizer, workload, max(c, 2 * c), c), tokens)
            out[c] = {
                "tokens_per_s": summary.get("tokens_per_s"),
                "ttft_p50_ms": (summary.get("ttft_ms") or {}).get("p50"),
                "errors": summary["errors"],
            }
        return out
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    parser.add_argument("--prompts", type=int, default=32, help="greedy-agreement prompts")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--concurrency", default="1,8,32", help="engine levels ('' = none)")
    parser.add_argument("--speed-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if "fp32" not in args.weights:
        args.weights.insert(0, "fp32")  # the reference of every comparison
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    from benchmarks.workload import build_workload, load_tokenizer
    from common.models import resolve_model
    from worker.weights import cpu_features_line, weight_bytes

    workload = build_workload(load_tokenizer(resolve_model(None).path), args.prompts, args.tokens)
    prompts = [p.text for p in workload.prompts]
    text = HELDOUT.read_text()
    bandwidth = read_bandwidth_gb_s()
    print(f"{cpu_features_line()}; read bandwidth {bandwidth:.1f} GB/s", flush=True)

    results: dict[str, dict] = {}
    reference: list[list[int]] = []
    for weights in args.weights:
        model, tok, stored = load_prepared(weights)
        r: dict[str, Any] = {"weights": stored, "bytes": weight_bytes(model)}
        r["perplexity"] = round(perplexity(model, tok, text), 4)
        generated = greedy(model, tok, prompts, args.tokens)
        if weights == "fp32":
            reference = generated
        r["agreement_16"] = agreement(reference, generated, 16)
        r["agreement_32"] = agreement(reference, generated, min(32, args.tokens))
        r["identical_token_share"] = round(prefix_share(reference, generated), 4)
        r["bandwidth_bound_tok_s"] = round(bandwidth * 1e9 / r["bytes"], 1)
        r["levels"] = (
            engine_levels(model, tok, prompts, levels, args.speed_tokens) if levels else {}
        )
        results[weights] = r
        del model
        print(json.dumps({weights: r}), flush=True)

    base_ppl = results["fp32"]["perplexity"]
    print()
    header = f"{'weights':<8} {'MB':>7} {'ppl':>8} {'ppl/fp32':>8} {'agree16':>7} {'agree32':>7} {'bar':>5}"
    header += "".join(f" {f'tok/s@{c}':>10} {f'ttft@{c}':>8}" for c in levels)
    header += f" {'bound@1':>8} {'@1/bound':>8}"
    print(header)
    verdicts = {}
    for weights, r in results.items():
        ratio = r["perplexity"] / base_ppl
        passed = ratio - 1 <= PPL_BAR and r["agreement_16"] >= AGREEMENT_BAR
        verdicts[weights] = "PASS" if passed else "MISS"
        r["perplexity_ratio"] = round(ratio, 4)
        r["quality_bar"] = verdicts[weights]
        line = (
            f"{weights:<8} {r['bytes'] / 1e6:>7.0f} {r['perplexity']:>8.3f} {ratio:>8.4f} "
            f"{r['agreement_16']:>7.2f} {r['agreement_32']:>7.2f} {verdicts[weights]:>5}"
        )
        for c in levels:
            lv = r["levels"][c]
            line += f" {lv['tokens_per_s'] or 0:>10.1f} {lv['ttft_p50_ms'] or 0:>8.0f}"
        one = r["levels"].get(1, {}).get("tokens_per_s")
        line += f" {r['bandwidth_bound_tok_s']:>8.1f}"
        line += f" {one / r['bandwidth_bound_tok_s']:>8.2f}" if one else f" {'-':>8}"
        print(line)
    print(
        f"\nquality bar: perplexity within {PPL_BAR:.0%} of fp32 and >= {AGREEMENT_BAR:.0%} of "
        "prompts with fp32's first 16 greedy tokens"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"bandwidth_gb_s": bandwidth, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

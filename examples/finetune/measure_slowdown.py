"""Measures how much decoding slows while a fine-tuning job trains on the same worker,
and the job's training throughput.

    python examples/finetune/measure_slowdown.py [--runs 3] [--new-tokens 64] [--job-threads 1]
        [--method lora|full]

Starts a worker (float32, temp LLMCLUSTER_HOME sharing the converted model), times a
fixed greedy generation with no job, starts a job (LoRA or full) on the learnable test dataset,
times the same generation while it trains, cancels the job and prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from common.config import home_dir  # noqa: E402
from common.pb import (  # noqa: E402
    finetune_pb2,
    finetune_pb2_grpc,
    generate_pb2,
    generate_pb2_grpc,
)
from tests.procs import start_worker  # noqa: E402

PROMPT = "Write a short paragraph about the history of the bicycle."


def decode_rate(gen: generate_pb2_grpc.GenerateStub, new_tokens: int, runs: int) -> float:
    """Median decode tokens/s of a fixed greedy generation (time after the first token)."""
    rates = []
    for _ in range(runs):
        req = generate_pb2.GenerateRequest(
            prompt=PROMPT,
            params=generate_pb2.SamplingParams(
                max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
            ),
        )
        reply = gen.Generate(req, timeout=300)
        u = reply.usage
        decode_ms = max(1e-3, u.total_ms - u.time_to_first_token_ms)
        rates.append((u.completion_tokens - 1) / (decode_ms / 1000.0))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--job-threads", type=int, default=1)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    args = parser.parse_args()
    method = {"lora": finetune_pb2.LORA, "full": finetune_pb2.FULL}[args.method]

    home = Path(tempfile.mkdtemp(prefix="llmcluster-measure-"))
    (home / "models").symlink_to(home_dir() / "models", target_is_directory=True)
    worker = start_worker(
        "--dtype",
        "float32",
        "--job-threads",
        str(args.job_threads),
        env={"LLMCLUSTER_HOME": str(home)},
    )
    try:
        worker.wait_healthy(300)
        with grpc.insecure_channel(worker.address) as ch:
            gen = generate_pb2_grpc.GenerateStub(ch)
            ft = finetune_pb2_grpc.FineTuneStub(ch)
            decode_rate(gen, 8, 1)  # warm
            idle = decode_rate(gen, args.new_tokens, args.runs)
            data = (REPO / "tests/data/finetune/records.jsonl").read_text()
            job = ft.CreateJob(
                finetune_pb2.CreateJobRequest(
                    output_name="measure",
                    method=method,
                    dataset_jsonl=data,
                    # Far more steps than the measurement needs: the job must still be
                    # training when the last timed generation ends (it is cancelled then).
                    hyperparameters=finetune_pb2.Hyperparameters(
                        epochs=100, max_steps=1000, batch_size=8, max_seq_length=64
                    ),
                ),
                timeout=120,
            )
            train_rates: list[float] = []
            stream = ft.WatchJob(finetune_pb2.WatchJobRequest(job_id=job.job_id), timeout=900)
            for event in stream:
                if event.WhichOneof("event") == "metrics":
                    train_rates.append(event.metrics.tokens_per_second)
                    break
            t0 = time.monotonic()
            busy = decode_rate(gen, args.new_tokens, args.runs)
            busy_s = time.monotonic() - t0
            still_training = (
                ft.GetJob(finetune_pb2.GetJobRequest(job_id=job.job_id), timeout=30).state
                == finetune_pb2.RUNNING
            )
            if not still_training:
                raise SystemExit("the job ended before the measurement did: raise its steps")
            ft.CancelJob(finetune_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
            for event in stream:
                if event.WhichOneof("event") == "metrics":
                    train_rates.append(event.metrics.tokens_per_second)
        print(
            json.dumps(
                {
                    "decode_tokens_per_s_idle": round(idle, 2),
                    "decode_tokens_per_s_while_training": round(busy, 2),
                    "slowdown_percent": round(100 * (1 - busy / idle), 1),
                    "training_tokens_per_s_median": round(statistics.median(train_rates), 1),
                    "training_steps_seen": len(train_rates),
                    "measured_while_training_s": round(busy_s, 1),
                    "method": args.method,
                    "job_threads": args.job_threads,
                    "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(),
                },
                indent=2,
            )
        )
    finally:
        worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

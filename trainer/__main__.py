"""``python -m trainer --data train.jsonl [--name NAME] [--method lora ...]``: a local run."""

from __future__ import annotations

import argparse
import logging
import sys

from common.config import add_arguments, from_arguments
from trainer.config import TrainConfig
from trainer.data import DatasetError, TrainEval
from trainer.events import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    TrainEvent,
)
from trainer.local import run_local
from trainer.train import TrainingCancelled


def _print_event(event: TrainEvent) -> None:
    if isinstance(event, MetricsEvent):
        print(
            f"step {event.step}/{event.total_steps} epoch {event.epoch:.2f} "
            f"loss {event.loss:.4f} lr {event.learning_rate:.2e} "
            f"{event.tokens_per_second:.0f} tok/s",
            flush=True,
        )
    elif isinstance(event, EvalEvent):
        print(
            f"eval {event.stage}: loss {event.eval_loss:.4f} "
            f"perplexity {event.perplexity:.2f} (step {event.step})",
            flush=True,
        )
    elif isinstance(event, CheckpointEvent):
        print(f"checkpoint at step {event.step}: {event.path}", flush=True)
    elif isinstance(event, (PhaseEvent, LogEvent)):
        print(getattr(event, "message", "") or getattr(event, "phase", ""), flush=True)
    elif isinstance(event, DoneEvent):
        print(f"done in {event.seconds:.1f} s: {event.artifact_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--data", required=True, help="JSONL dataset")
    parser.add_argument(
        "--eval-data", help="JSONL eval dataset (instead of --eval-fraction's held-out split)"
    )
    parser.add_argument("--name", help="publish the artifact to the model store under NAME")
    parser.add_argument("--model", help="base model (default: the default model)")
    parser.add_argument("--work-dir", help="checkpoints and artifact (default: a temp dir)")
    parser.add_argument("--store", help="model store root (default: <llmcluster home>/store)")
    parser.add_argument("--resume-from", help="checkpoint folder to resume from")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: auto)")
    add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = from_arguments(TrainConfig, args)
        run = run_local(
            TrainEval(args.data, args.eval_data) if args.eval_data else args.data,
            name=args.name,
            config=config,
            base_model=args.model,
            work_dir=args.work_dir,
            store_root=args.store,
            on_event=_print_event,
            resume_from=args.resume_from,
            device=args.device,
        )
    except (DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingCancelled, KeyboardInterrupt):
        print("cancelled", file=sys.stderr)
        return 130
    if run.artifact_ref:
        print(f"published {run.artifact_ref} sha256 {run.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

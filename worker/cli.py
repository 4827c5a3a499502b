"""``llmcluster worker``."""

from __future__ import annotations

import argparse

from common.config import add_arguments, from_arguments
from common.registry import RegistryConfig
from common.tracing import add_tracing_arguments
from worker.config import WorkerConfig


def _run(args: argparse.Namespace) -> int:
    from common.tracing import TracingConfig
    from worker.server import run_worker

    return run_worker(
        from_arguments(WorkerConfig, args),
        TracingConfig.from_args(args),
        from_arguments(RegistryConfig, args),
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help="run a worker: model, engine, Generate/Worker/FineTune")
    add_arguments(parser, WorkerConfig)
    add_tracing_arguments(parser)
    add_arguments(parser, RegistryConfig)
    parser.set_defaults(func=_run)

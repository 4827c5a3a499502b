"""``llmcluster worker``."""

from __future__ import annotations

import argparse
import logging

from common.config import add_arguments, from_arguments
from common.registry import RegistryConfig
from common.tracing import add_tracing_arguments
from worker.config import WorkerConfig

logger = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    from common.tls import server_credentials
    from common.tracing import TracingConfig
    from worker.server import run_worker

    try:
        config = from_arguments(WorkerConfig, args)
        tracing_config = TracingConfig.from_args(args)
        registry_config = from_arguments(RegistryConfig, args)
        server_credentials(config)  # unreadable TLS files fail now, not after the model loads
    except ValueError as exc:  # a bad flag or TLS file: say which, no traceback
        logger.error("invalid worker configuration: %s", exc)
        return 2
    from common.startup import quiet_libraries, set_process_name
    from worker.cores import format_cpus, place

    set_process_name(f"worker {config.worker_id}")
    quiet_libraries(logging.getLogger().getEffectiveLevel())

    try:
        placement = place(config.cpus, config.threads)
    except (ValueError, OSError) as exc:
        logger.error("invalid worker configuration: --cpus %s: %s", config.cpus, exc)
        return 2
    logger.info(
        "worker %s computes on core(s) %s with %d thread(s)",
        config.worker_id,
        format_cpus(placement.cpus),
        placement.threads,
    )
    return run_worker(config, tracing_config, registry_config)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("worker", help="run a worker: model, engine, Generate/Worker/FineTune")
    add_arguments(parser, WorkerConfig)
    add_tracing_arguments(parser)
    add_arguments(parser, RegistryConfig)
    parser.set_defaults(func=_run)

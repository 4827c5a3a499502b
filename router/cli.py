"""``llmcluster router``: the public endpoint over a static list of workers."""

from __future__ import annotations

import argparse
import asyncio
import logging

from common.config import add_arguments, from_arguments
from common.registry import RegistryConfig
from common.tracing import (
    SERVICE_ROUTER,
    TracingConfig,
    add_tracing_arguments,
    setup_tracing,
    shutdown_tracing,
)
from router.config import RouterConfig

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the ``router`` subcommand (flags derived from RouterConfig)."""
    parser = subparsers.add_parser(
        "router",
        help="run the router: load balancing and coalescing over workers",
        description="Serve the public Generate API, balancing requests over workers "
        "and coalescing them into batches on one link per worker.",
    )
    add_arguments(parser, RouterConfig)
    add_tracing_arguments(parser)
    add_arguments(parser, RegistryConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand."""
    try:
        config = from_arguments(RouterConfig, args)
        tracing_config = TracingConfig.from_args(args)
        registry_config = from_arguments(RegistryConfig, args)
    except ValueError as exc:
        logger.error("invalid router configuration: %s", exc)
        return 2
    # Local import: keeps `llmcluster router --help` light.
    from common.auth import AuthFileError
    from common.listen import PortInUse
    from common.tls import TlsFileError
    from router.server import serve

    setup_tracing(SERVICE_ROUTER, tracing_config)
    try:
        asyncio.run(serve(config, registry_config))
    except AuthFileError as exc:
        logger.error("invalid --auth-file: %s", exc)
        return 2
    except TlsFileError as exc:
        logger.error("invalid TLS flags: %s", exc)
        return 2
    except OSError as exc:  # a port that cannot be bound: say which, no traceback
        if isinstance(exc, PortInUse):
            raise  # exit 2 naming the port, the same for every server (llmcluster/cli.py)
        logger.error("router cannot start: %s", exc)
        return 1
    finally:
        shutdown_tracing()
    return 0

"""``llmcluster bench``: the serving benchmark (``benchmarks/serving.py``, issue 7)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _import_serving():
    """``benchmarks`` lives beside this package in the repository (it is not part of the
    installed distribution); an editable install finds it through the checkout."""
    try:
        from benchmarks import serving
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "benchmarks" / "serving.py").is_file():
            raise SystemExit(
                "llmcluster bench needs the repository checkout (benchmarks/ is not installed)"
            ) from None
        sys.path.insert(0, str(root))
        from benchmarks import serving
    return serving


def _run(args: argparse.Namespace) -> int:
    return _import_serving().run_from_args(args)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``bench`` subcommand (same flags as ``python -m benchmarks.serving``)."""
    parser = sub.add_parser(
        "bench",
        help="serving benchmark: ours vs the in-process limit, a naive server, transformers serve",
        description="Starts what it measures (engine in-process, router + workers, naive "
        "server, null engine, transformers serve), runs a seeded streaming workload and "
        "prints throughput, TTFT and inter-token percentiles, ratios and targets.",
    )
    _import_serving().add_arguments(parser)
    parser.set_defaults(func=_run)

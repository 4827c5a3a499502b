"""The ``llmcluster`` command. Each role registers its own subcommands; they are imported
lazily so that ``llmcluster router`` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> module with register(subparsers) that adds it (and sets func).
_COMMANDS = {
    "worker": "worker.cli",
    "router": "router.cli",
    "up": "llmcluster.up",
    "generate": "llmcluster.client",
    "models": "llmcluster.client",
    "finetune": "llmcluster.finetune_cli",
    "adapters": "llmcluster.adapters_cli",
    "bench": "llmcluster.bench",
    "auth": "llmcluster.auth_cli",
    "health": "llmcluster.probe",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmcluster",
        description="Distributed gRPC model serving: workers, router, fine-tuning.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in _COMMANDS), None)
    # Only the chosen command's module is imported (keeps router start-up torch-free);
    # with no command, every module registers so --help lists them all.
    modules = {_COMMANDS[wanted]} if wanted else dict.fromkeys(_COMMANDS.values())
    for name in modules:
        try:
            importlib.import_module(name).register(sub)
        except ModuleNotFoundError as exc:
            if wanted:
                raise
            logging.getLogger(__name__).debug("subcommand module %s unavailable: %s", name, exc)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except OSError as exc:
        from common.listen import PortInUse  # light: no torch, no grpc servers

        if not isinstance(exc, PortInUse):
            raise
        print(f"llmcluster {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

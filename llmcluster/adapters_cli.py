"""``llmcluster adapters``: traffic splits of an adapter's bare name across its versions.

    llmcluster adapters split support-bot 1=90 2=10   # 90 % of callers on v1, 10 % on v2
    llmcluster adapters split support-bot             # show the split
    llmcluster adapters split support-bot --clear     # back to the latest version

A caller keeps its version: GenerateRequest.user (``llmcluster generate --user``) is
hashed with the name; ``support-bot@2`` always serves version 2.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from common.errors import InvalidArgument
from common.pb import finetune_pb2, finetune_pb2_grpc
from common.validation import traffic_split_from_values
from llmcluster.client import add_target_argument, default_target, positive_seconds
from llmcluster.connection import open_channel


def parse_weights(pairs: list[str]) -> dict[int, int]:
    """``["1=90", "2=10"]`` → ``{1: 90, 2: 10}``; raises InvalidArgument on a bad pair."""
    weights: dict[int, int] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            v, w = int(version), int(weight)
        except ValueError:
            raise InvalidArgument(
                f"weights: {pair!r} is not VERSION=WEIGHT (e.g. 1=90 2=10)"
            ) from None
        if v in weights:
            raise InvalidArgument(f"weights: version {v} is given twice")
        weights[v] = w
    return weights


def format_split(split: finetune_pb2.TrafficSplit) -> str:
    if not split.weights:
        return f"{split.adapter}: no split (the latest version serves)"
    parts = "  ".join(f"{split.adapter}@{v} {w}%" for v, w in sorted(split.weights.items()))
    return f"{split.adapter}: {parts}"


def _split(args: argparse.Namespace) -> int:
    try:
        weights = parse_weights(args.weights)
        # The server's rules and wording, before any call (no weights: only the name).
        traffic_split_from_values(args.adapter, weights, clear=args.clear or not weights)
    except InvalidArgument as exc:
        print(f"error: INVALID_ARGUMENT: {exc}", file=sys.stderr)
        return 2
    channel = open_channel(args, args.target or default_target())
    with channel:
        stub = finetune_pb2_grpc.FineTuneStub(channel)
        try:
            if weights or args.clear:
                split = stub.SetTrafficSplit(
                    finetune_pb2.SetTrafficSplitRequest(
                        adapter=args.adapter, weights=weights, clear=args.clear
                    ),
                    timeout=args.timeout,
                )
            else:
                split = stub.GetTrafficSplit(
                    finetune_pb2.GetTrafficSplitRequest(adapter=args.adapter),
                    timeout=args.timeout,
                )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(format_split(split))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``llmcluster adapters`` and its subcommands."""
    adapters = sub.add_parser(
        "adapters",
        help="adapter traffic splits across versions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)
    split = actions.add_parser("split", help="set, show or clear an adapter's traffic split")
    split.add_argument("adapter", help="adapter name (no @version)")
    split.add_argument("weights", nargs="*", help="VERSION=WEIGHT pairs summing to 100")
    split.add_argument("--clear", action="store_true", help="remove the split")
    split.add_argument("--timeout", type=positive_seconds, default=10.0, help="deadline (s)")
    add_target_argument(split)
    split.set_defaults(func=_split)

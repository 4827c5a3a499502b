"""``llmcluster health``: one grpc.health.v1 check with the client's TLS and token flags.

For container probes of TLS ports (Kubernetes' built-in gRPC probe and Docker's
healthcheck speak plaintext only): exit 0 when SERVING, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmcluster.client import add_target_argument, default_target
from llmcluster.connection import open_channel


def _health(args: argparse.Namespace) -> int:
    with open_channel(args, args.target or default_target()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def register(sub: argparse._SubParsersAction) -> None:
    health = sub.add_parser(
        "health", help="check a router's or worker's grpc.health.v1 (a probe for TLS ports)"
    )
    add_target_argument(health)
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds")
    health.set_defaults(func=_health)

"""How the client commands reach the cluster: one channel from ``--target``, TLS and a token.

``--token`` (or ``$LLMCLUSTER_TOKEN``) is sent as ``authorization: Bearer <token>`` on
every call; ``--tls-ca`` (or ``$LLMCLUSTER_TLS_CA``) turns TLS on and verifies the
router with that CA; ``--tls-cert/--tls-key`` add a client certificate (mTLS).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from common.auth import AUTHORIZATION
from common.config import env
from common.tls import channel_credentials


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token", default=None, help="API key sent as a bearer token (default: $LLMCLUSTER_TOKEN)"
    )
    parser.add_argument(
        "--tls-ca",
        default=None,
        help="PEM CA that signs the router's certificate: connect with TLS "
        "(default: $LLMCLUSTER_TLS_CA; unset = plaintext)",
    )
    parser.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the authorization header to every call. An interceptor rather than call
    credentials: those are refused on plaintext channels, and a local cluster with an
    auth file but no TLS must still be usable (the token then travels in the clear)."""

    def __init__(self, token: str) -> None:
        self.header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.header]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    args: argparse.Namespace, target: str, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """The channel the flags describe (exits 2 on an unreadable certificate file).

    round_robin: a target that resolves to several routers (``dns:///routers:50051``,
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``) spreads calls over them and skips one that is
    down; with one address it is gRPC's default behaviour.
    """
    options = [("grpc.lb_policy_name", "round_robin"), *options]
    ca = getattr(args, "tls_ca", None) or env("LLMCLUSTER_TLS_CA") or ""
    cert, key = getattr(args, "tls_cert", None) or "", getattr(args, "tls_key", None) or ""
    token = getattr(args, "token", None) or env("LLMCLUSTER_TOKEN") or ""
    if ca or cert:
        try:
            credentials = channel_credentials(ca, cert, key)
        except (OSError, ValueError) as exc:
            print(f"error: TLS flags: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        channel = grpc.secure_channel(target, credentials, options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel

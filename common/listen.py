"""Binding server ports: gRPC servers with port reuse off, and one clear error for a port
that is taken (gRPC's default SO_REUSEPORT lets a second cluster share port 50051 silently,
and a failed bind otherwise surfaces as "Failed to bind to address")."""

from __future__ import annotations

import errno
import socket
from typing import Any

import grpc

# Every server: a second process on the same port fails instead of sharing it.
REUSEPORT_OFF = ("grpc.so_reuseport", 0)


class PortInUse(OSError):
    """The port is taken by another process; the CLI turns this into exit code 2."""

    def __init__(self, port: int, what: str = "port") -> None:
        super().__init__(f"{what} {port} is in use")
        self.errno = errno.EADDRINUSE
        self.port = port


def server_options(*extra: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Options for ``grpc.aio.server``: port reuse off, then ``extra``."""
    return [REUSEPORT_OFF, *extra]


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now (TIME_WAIT does not count)."""
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server do
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Adds ``host:port`` to ``server`` (TLS when ``credentials`` are given) and returns
    the bound port; raises :class:`PortInUse` when another process holds the port."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
        bound = 0
    if bound == 0:
        if port and not port_is_free(host, port):
            raise PortInUse(port)
        raise OSError(f"cannot bind {address}")
    return int(bound)


def bind_http(start: Any, host: str, port: int, what: str = "port") -> Any:
    """Runs ``start()`` (which binds an HTTP server on ``port``: metrics, a gateway) and
    turns "address already in use" into :class:`PortInUse` naming ``what``."""
    try:
        return start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(port, what) from None
        raise

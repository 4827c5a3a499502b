"""Configuration of the router process; its CLI flags are derived from :class:`RouterConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import field
from common.tls import ServerTlsFields, check_pair
from router.policy import BALANCES


@dataclass
class RouterConfig(ServerTlsFields):
    """Settings of ``llmcluster router``: listen address, workers, coalescing, admission
    (TLS flags from :class:`~common.tls.ServerTlsFields`)."""

    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 to accept remote clients")
    port: int = field(50051, help="port of the public gRPC server")
    advertise_host: str = field(
        "", help="address registered in Consul (default: --host, or the host name for 0.0.0.0)"
    )
    workers: list[str] = field(
        default_factory=list, help="worker addresses host:port (the static registry)"
    )
    coalesce_window_ms: float = field(
        5.0,
        help="coalescing: requests bound for a worker within this window after its last "
        "SubmitBatch leave together as the next one; a request on an idle link leaves at "
        "once (0 = never hold)",
    )
    max_batch: int = field(64, help="most requests in one SubmitBatch")
    stream_interval_ms: float = field(
        0.0,
        help="least time between two messages of one client stream: tokens that arrive "
        "sooner are merged into the next message (fewer, fuller messages for many-stream "
        "throughput); the first token is never held (0 = every delta at once)",
    )
    max_queue: int = field(
        1024,
        help="most requests the router holds at once (waiting, queued or running on "
        "workers); above it new requests get RESOURCE_EXHAUSTED at once",
    )
    max_attempts: int = field(
        3, help="workers one request is offered to before its last error is returned"
    )
    reconnect_initial_s: float = field(0.1, help="first delay before reconnecting a broken link")
    reconnect_max_s: float = field(5.0, help="longest delay between reconnect attempts")
    connect_timeout_s: float = field(
        5.0, help="bound on one health check / Info call while (re)connecting a worker"
    )
    grace_s: float = field(5.0, help="on SIGTERM, how long running streams may take to finish")
    metrics_port: int | None = field(
        None, help="port of the Prometheus /metrics endpoint (0 = any free port; unset = none)"
    )
    balance: str = field(
        "spread",
        help="how requests are spread over workers: spread (power of two choices, the less "
        "loaded of two drawn at random) or pack (fill the workers in --workers order up to "
        "their running slots; for workers that share one machine's cores, as "
        "'llmcluster up' starts them)",
    )
    seed: int | None = field(None, help="seed of the balancing policy's RNG (tests)")
    worker_tls_ca: str = field(
        "", help="PEM CA bundle: reach workers over TLS, verifying them with it"
    )
    worker_tls_cert: str = field(
        "", help="PEM certificate the router presents to workers (their --tls-client-ca)"
    )
    worker_tls_key: str = field("", help="PEM private key of --worker-tls-cert")
    worker_tls_server_name: str = field(
        "",
        help="name the workers' certificates carry, when it is not the address dialed "
        "(e.g. workers found through Consul by host name; default: the dialed host)",
    )
    auth_file: str = field(
        "",
        help="TOML file of tenants with hashed API keys (see README 'Securing a cluster'): "
        "every call needs 'authorization: Bearer <token>'; unset = no authentication",
    )
    auth_health: bool = field(
        False, help="with --auth-file, health and reflection need a token too (probes do not)"
    )
    http_port: int | None = field(
        None,
        help="port of the OpenAI-compatible HTTP gateway (0 = any free port; unset = none)",
    )
    http_host: str = field("", help="address the HTTP gateway binds; empty = the same as --host")
    files_dir: str = field(
        "", help="where the gateway keeps uploaded files (default: $LLMCLUSTER_HOME/files)"
    )
    max_file_bytes: int = field(
        32 * 1024 * 1024, help="largest file POST /v1/files accepts, in bytes"
    )
    max_http_body_bytes: int = field(
        4 * 1024 * 1024, help="largest JSON request body the HTTP gateway accepts, in bytes"
    )
    stall_timeout_s: float = field(
        300.0,
        help="no token for this long on a request: cancel it on the worker, then re-route "
        "it (nothing sent yet) or fail it with UNAVAILABLE (0 = off)",
    )

    def __post_init__(self) -> None:
        self.check_server_tls()
        check_pair(self.worker_tls_cert, self.worker_tls_key, "--worker-tls-cert/--worker-tls-key")
        if self.auth_health and not self.auth_file:
            raise ValueError("--auth-health needs --auth-file")
        if self.worker_tls_server_name and not self.worker_tls_ca:
            raise ValueError("--worker-tls-server-name needs --worker-tls-ca")
        if self.worker_tls_cert and not self.worker_tls_ca:
            raise ValueError(
                "--worker-tls-cert needs --worker-tls-ca (client certificates need TLS)"
            )
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {self.balance!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.coalesce_window_ms < 0:
            raise ValueError(f"coalesce_window_ms must be >= 0, got {self.coalesce_window_ms}")
        if self.stream_interval_ms < 0:
            raise ValueError(f"stream_interval_ms must be >= 0, got {self.stream_interval_ms}")
        if self.stall_timeout_s < 0:
            raise ValueError(f"stall_timeout_s must be >= 0, got {self.stall_timeout_s}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ValueError(
                "need 0 < reconnect_initial_s <= reconnect_max_s, got "
                f"{self.reconnect_initial_s} and {self.reconnect_max_s}"
            )
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.max_file_bytes < 1 or self.max_http_body_bytes < 1:
            raise ValueError(
                "max_file_bytes and max_http_body_bytes must be >= 1, got "
                f"{self.max_file_bytes} and {self.max_http_body_bytes}"
            )
        for address in self.workers:
            if ":" not in address:
                raise ValueError(f"worker address must be host:port, got {address!r}")

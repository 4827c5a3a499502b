"""The router's gRPC server: Generate, grpc.health.v1 and reflection over a :class:`Cluster`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common import __version__
from common.auth import AuthInterceptor, load_auth_file
from common.listen import bind, bind_http, server_options
from common.metrics import RouterMetrics, start_metrics_server
from common.pb import generate_pb2_grpc
from common.registry import (
    ROUTER_SERVICE,
    WORKER_SERVICE,
    Registry,
    RegistryConfig,
    ServiceInstance,
    Watch,
    WatchStatus,
    make_registry,
)
from common.tls import server_credentials
from router.cluster import Cluster
from router.config import RouterConfig
from router.finetune_proxy import FINETUNE_SERVICE, add_finetune_proxy
from router.gateway import RunningGateway, start_gateway
from router.quotas import TenantQuotas
from router.service import GENERATE_SERVICE, GenerateService

logger = logging.getLogger(__name__)


@dataclass
class RouterServer:
    """A started router: its gRPC server, cluster and bound port."""

    server: grpc.aio.Server
    cluster: Cluster
    health: HealthServicer
    port: int
    metrics: RouterMetrics
    metrics_port: int | None = None
    registry: Registry | None = None
    watch: Watch | None = None
    instance: ServiceInstance | None = None
    gateway: RunningGateway | None = None

    @property
    def http_port(self) -> int | None:
        """Port of the OpenAI-compatible HTTP gateway, or None when it is off."""
        return self.gateway.port if self.gateway is not None else None

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking calls, lets running ones finish within grace, closes links."""
        grace = self.cluster.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        self.metrics.set_healthy(False)
        if self.registry is not None:
            if self.instance is not None:
                await asyncio.to_thread(self.registry.deregister, self.instance.id)
            if self.watch is not None:
                self.watch.stop()
            self.registry.close()
        # Both servers drain at once: open HTTP streams and gRPC calls share the grace.
        await asyncio.gather(
            self.server.stop(grace),
            *([self.gateway.stop(grace)] if self.gateway is not None else []),
        )
        await self.cluster.close()
        stats = self.cluster.stats()
        logger.info(
            "router stopped: admitted %d, refused %d, re-routed %d, %d requests in %d batches",
            stats.admitted,
            stats.refused_queue_full,
            stats.rerouted,
            stats.requests_sent,
            stats.batches_sent,
        )


def _follow_registry(
    registry: Registry, cluster: Cluster, metrics: RouterMetrics, loop: asyncio.AbstractEventLoop
) -> Watch:
    """Keeps the cluster's worker set equal to the registry's passing instances. Callbacks
    arrive on the registry's thread (Consul) and are handed to the event loop."""

    def on_change(instances: list[ServiceInstance]) -> None:
        endpoints = [i.endpoint for i in instances]
        loop.call_soon_threadsafe(cluster.set_workers, endpoints)
        loop.call_soon_threadsafe(
            lambda: metrics.set_discovery(ok=True, passing_workers=len(endpoints))
        )

    def on_status(status: WatchStatus) -> None:
        if not status.healthy:
            logger.warning(
                "discovery failing (%d in a row: %s); serving the last known workers",
                status.consecutive_failures,
                status.last_error,
            )
        loop.call_soon_threadsafe(lambda: metrics.set_discovery(ok=status.healthy))

    return registry.watch(WORKER_SERVICE, on_change, on_status)


async def start_router(
    config: RouterConfig, registry_config: RegistryConfig | None = None
) -> RouterServer:
    """Builds and starts the router server on ``config.host:config.port`` (0 = any port).

    Raises AuthFileError for an unusable ``--auth-file`` before anything starts."""
    metrics = RouterMetrics()
    interceptors = []
    auth: AuthInterceptor | None = None
    if config.auth_file:
        # Admission in order: TLS (the port), token -> tenant, tenant quotas; then the
        # servicers (queue bound, validation, policy).
        auth = AuthInterceptor(
            load_auth_file(config.auth_file),
            protect_health=config.auth_health,
            quota=TenantQuotas(),
            on_refused=lambda method, code, tenant: metrics.record_request(
                method, code, tenant=tenant
            ),
        )
        interceptors.append(auth)
    server = grpc.aio.server(interceptors=interceptors, options=server_options())
    health = HealthServicer()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    def on_health_change(healthy: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def apply() -> None:
            for service in ("", GENERATE_SERVICE, FINETUNE_SERVICE):
                await health.set(service, status)
            metrics.set_healthy(healthy)

        task = loop.create_task(apply())
        pending.add(task)
        task.add_done_callback(pending.discard)

    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = bind_http(
            lambda: start_metrics_server(config.metrics_port, metrics.registry, config.host),
            config.host,
            config.metrics_port,
            "metrics port",
        )
    cluster = Cluster(config, on_health_change=on_health_change, metrics=metrics)
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(GENERATE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(FINETUNE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    generate_service = GenerateService(cluster, metrics)
    generate_pb2_grpc.add_GenerateServicer_to_server(generate_service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Jobs run on workers; the router only routes them (router/finetune_proxy.py).
    finetune_proxy = add_finetune_proxy(server, cluster, metrics)
    reflection.enable_server_reflection(
        (
            GENERATE_SERVICE,
            FINETUNE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    credentials = server_credentials(config)  # None: plaintext
    port = bind(server, config.host, config.port, credentials)
    gateway = None
    if config.http_port is not None:
        # Bound before the gRPC server starts: a taken HTTP port fails start-up whole.
        gateway = await start_gateway(
            config,
            cluster,
            generate_service,
            finetune_proxy,
            metrics,
            admit=auth.admit if auth is not None else None,  # the same admission as gRPC
        )
    try:
        await server.start()
    except BaseException:
        if gateway is not None:
            await gateway.stop(0)
        raise
    registry_config = registry_config or RegistryConfig()
    registry = make_registry(registry_config, static_addresses=config.workers)
    watch = _follow_registry(registry, cluster, metrics, loop)
    instance = None
    if registry_config.registry != "static":
        host = config.advertise_host or config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        instance = ServiceInstance(
            name=ROUTER_SERVICE,
            id=f"{ROUTER_SERVICE}-{host}-{port}",
            address=host,
            port=port,
            meta={"version": __version__},
        )
        await asyncio.to_thread(registry.register, instance)
    logger.info(
        "router listening on %s:%d (%s, %s; registry %s; workers %s)",
        config.host,
        port,
        ("mTLS" if config.tls_client_ca else "TLS") if credentials else "plaintext",
        f"auth file {config.auth_file}" if config.auth_file else "no authentication",
        registry_config.registry,
        ",".join(config.workers) or "from the registry",
    )
    return RouterServer(
        server, cluster, health, port, metrics, metrics_port, registry, watch, instance, gateway
    )


async def serve(config: RouterConfig, registry_config: RegistryConfig | None = None) -> None:
    """Runs the router until SIGTERM / SIGINT, then stops cleanly."""
    router = await start_router(config, registry_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router: signal received, stopping")
    await router.stop()

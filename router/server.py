"""The router's gRPC server: Generate, grpc.health.v1 and reflection over a :class:`Cluster`."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from common.metrics import RouterMetrics, start_metrics_server
from common.pb import generate_pb2_grpc
from router.cluster import Cluster
from router.config import RouterConfig
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

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking calls, lets running ones finish within grace, closes links."""
        grace = self.cluster.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
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


async def start_router(config: RouterConfig) -> RouterServer:
    """Builds and starts the router server on ``config.host:config.port`` (0 = any port)."""
    server = grpc.aio.server()
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
            for service in ("", GENERATE_SERVICE):
                await health.set(service, status)

        task = loop.create_task(apply())
        pending.add(task)
        task.add_done_callback(pending.discard)

    metrics = RouterMetrics()
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = start_metrics_server(config.metrics_port, metrics.registry, config.host)
    cluster = Cluster(config, on_health_change=on_health_change, metrics=metrics)
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await health.set(GENERATE_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    generate_pb2_grpc.add_GenerateServicer_to_server(GenerateService(cluster, metrics), server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # The FineTune proxy registers here once it exists (fine-tuning issue).
    reflection.enable_server_reflection(
        (
            GENERATE_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    cluster.set_workers(config.workers)
    logger.info(
        "router listening on %s:%d over %d worker(s): %s",
        config.host,
        port,
        len(config.workers),
        ",".join(config.workers),
    )
    return RouterServer(server, cluster, health, port, metrics, metrics_port)


async def serve(config: RouterConfig) -> None:
    """Runs the router until SIGTERM / SIGINT, then stops cleanly."""
    router = await start_router(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("router: signal received, stopping")
    await router.stop()

"""The worker process: gRPC server (Generate, Worker, Health, reflection), model loading
off the event loop, warm-up, and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import __version__
from common.listen import bind, bind_http, server_options
from common.metrics import WorkerMetrics, start_metrics_server
from common.model_store import ModelStore
from common.models import resolve_model
from common.pb import finetune_pb2, generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from common.registry import (
    WORKER_SERVICE,
    HealthCheck,
    RegistryConfig,
    ServiceInstance,
    make_registry,
    model_tag,
)
from common.startup import phase
from common.tls import server_credentials
from common.tracing import (
    SERVICE_WORKER,
    TracedHealthServicer,
    TracingConfig,
    get_tracer,
    setup_tracing,
    shutdown_tracing,
)
from worker import cores as worker_cores
from worker.config import WorkerConfig
from worker.finetune_service import add_finetune_servicer
from worker.front import EngineFront
from worker.health import SelfTester
from worker.jobs import JobManager, jobs_config_from_worker
from worker.link import WorkerLinkServicer
from worker.runtime import ModelRuntime, WorkerState
from worker.service import GenerateServicer
from worker.sweeps import SweepManager

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    generate_pb2.DESCRIPTOR.services_by_name["Generate"].full_name,
    worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
    finetune_pb2.DESCRIPTOR.services_by_name["FineTune"].full_name,
)


class WorkerServer:
    """Owns the gRPC server and the worker's life cycle."""

    def __init__(self, config: WorkerConfig, registry_config: RegistryConfig | None = None) -> None:
        self.config = config
        self.registry = make_registry(registry_config or RegistryConfig())
        self.instance: ServiceInstance | None = None
        self.metrics = WorkerMetrics()
        self.state = WorkerState(config.worker_id, self.metrics)
        self.health = TracedHealthServicer(get_tracer(__name__))
        self.server = grpc.aio.server(
            options=server_options(("grpc.max_receive_message_length", 64 * 1024 * 1024))
        )
        self.port = 0
        self.metrics_port = -1
        self._stopped = asyncio.Event()
        # Jobs load from disk now, so GetJob/ListJobs answer while the model loads.
        self.jobs = JobManager(jobs_config_from_worker(config), metrics=self.metrics)
        # Sweeps persist beside the jobs; their trials are jobs of self.jobs.
        self.sweeps = SweepManager(self.jobs, ModelStore(self.jobs.config.store_dir or None))

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)
        self.metrics.set_healthy(serving)

    async def start(self) -> None:
        generate_pb2_grpc.add_GenerateServicer_to_server(GenerateServicer(self.state), self.server)
        worker_pb2_grpc.add_WorkerServicer_to_server(
            WorkerLinkServicer(self.state, self.config.load_interval_ms / 1000.0), self.server
        )
        add_finetune_servicer(self.server, self.jobs, self.sweeps)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        credentials = server_credentials(self.config)  # None: plaintext
        self.port = bind(self.server, self.config.host, self.config.port, credentials)
        # Both ports before anything starts: a taken one ends the process at once.
        if self.config.metrics_port >= 0:
            self.metrics_port = bind_http(
                lambda: start_metrics_server(self.config.metrics_port, self.metrics.registry),
                "0.0.0.0",
                self.config.metrics_port,
                "metrics port",
            )
            logger.info("metrics on http://0.0.0.0:%d/metrics", self.metrics_port)
        await self._set_health(False)  # NOT_SERVING until the model is loaded and warmed
        await self.server.start()
        logger.info(
            "worker %s listening on %s:%d (loading model)",
            self.config.worker_id,
            self.config.host,
            self.port,
        )
        # Resolved first: a first start converts the default model (its own phase line).
        source = await asyncio.to_thread(resolve_model, self.config.model or None)
        with phase(f"loaded {source.name}"):
            runtime = await asyncio.to_thread(ModelRuntime, self.config)
        self._attach_metrics(runtime)
        runtime.engine.fault_file = self.config.fault_file or None
        if self.config.compute_lock:
            runtime.engine.compute_lock = worker_cores.ComputeLock(self.config.compute_lock)
        runtime.engine.start()
        front = EngineFront(runtime)
        if self.config.warmup:
            with phase("warmed up"):
                await front.probe(4, 60.0)
        self.state.runtime = runtime
        self.state.front = front
        self.jobs.attach_runtime(runtime)
        self.jobs.on_training_processes = self._share_cores_with_training()
        await self.jobs.start()  # resumes jobs a crash cut off, then runs the queue
        await self.sweeps.start()  # RUNNING sweeps go on launching their remaining trials
        self.state.accepting.set()
        await self._set_health(True)
        self.self_tester = SelfTester(
            self.state,
            self._set_health,
            self.metrics,
            self.config.self_test_interval_s,
            self.config.self_test_timeout_s,
            self.config.stall_timeout_s,
        )
        self.self_tester.start()
        await self._register(runtime)
        logger.info(
            "worker %s SERVING model %s on %s (%s, weights %s)",
            self.config.worker_id,
            runtime.source.name,
            runtime.device,
            runtime.dtype,
            runtime.weights,
        )
        print(
            f"worker {self.config.worker_id} serving on {self.config.host}:{self.port}", flush=True
        )

    async def _register(self, runtime: ModelRuntime) -> None:
        host = self.config.advertise_host or self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        self.instance = ServiceInstance(
            name=WORKER_SERVICE,
            id=f"{WORKER_SERVICE}-{self.config.worker_id}",
            address=host,
            port=self.port,
            tags=tuple(model_tag(m) for m in runtime.model_names),
            meta={
                "worker_id": self.config.worker_id,
                "max_running": str(self.config.max_running),
                "max_kv_tokens": str(self.config.max_kv_tokens),
                "device": runtime.device,
                "version": __version__,
            },
            check=HealthCheck(use_tls=self.config.tls_enabled),
        )
        await asyncio.to_thread(self.registry.register, self.instance)

    def _share_cores_with_training(self) -> Callable[[int], None]:
        """While training processes run here, the engine gives up the cores they use
        (``--job-threads`` each), keeping at least one; all return when they end."""
        serving_threads = worker_cores.serving_threads(self.config.threads)

        def on_training_processes(count: int) -> None:
            threads = max(1, serving_threads - count * self.config.job_threads)
            logger.info("%d training process(es): engine uses %d thread(s)", count, threads)
            self.state.runtime.engine.set_compute_threads(threads)

        return on_training_processes

    def _attach_metrics(self, runtime: ModelRuntime) -> None:
        metrics = self.metrics
        # runtime.engine, not the engine of now: a rebuild replaces it.
        metrics.follow_engine(lambda: runtime.engine.stats())

        def on_step(batch_size: int, new_tokens: int) -> None:  # engine thread
            metrics.observe_step(batch_size)
            metrics.loaded_adapters.set(len(runtime.adapters.loaded_refs()))

        runtime.engine.on_step = on_step

    async def drain_and_stop(self) -> None:
        """SIGTERM: deregister and stop taking work, hand queued requests back to the
        routers, let running ones finish within the grace period, then exit."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.state.accepting.clear()
        if self.instance is not None:
            await asyncio.to_thread(self.registry.deregister, self.instance.id)
        await self._set_health(False)
        logger.info("draining (grace %.0fs)", self.config.grace_period_s)
        tester = getattr(self, "self_tester", None)
        if tester is not None:
            await tester.stop()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.grace_period_s
        try:
            runtime: ModelRuntime | None = self.state.runtime
        except Exception:
            runtime = None
        if runtime is not None:
            runtime.engine.hand_back_waiting()
        while runtime is not None and loop.time() < deadline:
            s = runtime.engine.stats()
            if s["running"] == 0 and s["queued"] == 0:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # let the last Finished messages leave on the links
        await self.sweeps.stop()
        await self.jobs.stop()  # running jobs resume from their checkpoint on restart
        await self.server.stop(grace=2.0)
        if runtime is not None:
            runtime.engine.stop()
            if runtime.full_models is not None:
                await runtime.full_models.stop()
        self.registry.close()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain_and_stop()))
        await self.start()
        await self.server.wait_for_termination()


def run_worker(
    config: WorkerConfig,
    tracing: TracingConfig | None = None,
    registry_config: RegistryConfig | None = None,
) -> int:
    setup_tracing(SERVICE_WORKER, tracing)

    async def main() -> None:
        # The aio server must be created inside the running loop.
        await WorkerServer(config, registry_config).serve_forever()

    try:
        asyncio.run(main())
    finally:
        shutdown_tracing()
    return 0

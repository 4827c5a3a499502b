"""The worker's ``FineTune`` servicer: thin translation onto :class:`worker.jobs.JobManager`,
:class:`worker.sweeps.SweepManager` and the model store's traffic splits."""

from __future__ import annotations

import asyncio
import logging

import grpc

from common.auth import TENANT_METADATA
from common.errors import abort_with
from common.pb import finetune_pb2, finetune_pb2_grpc
from common.tracing import (
    ATTR_JOB_ID,
    ATTR_TENANT,
    GEN_AI_OPERATION_FINETUNE,
    GEN_AI_OPERATION_NAME,
    get_tracer,
    inject_to_dict,
    server_span,
)
from common.validation import traffic_split_from_values
from worker.jobs import JobManager
from worker.sweeps import SweepManager

logger = logging.getLogger(__name__)


def caller_tenant(context: grpc.aio.ServicerContext) -> str | None:
    """The tenant a router says this call is for (``llmcluster-tenant``), or None for a
    caller without one (a router without --auth-file, an operator): it sees every job.

    Trusted as sent: in a secured cluster only routers reach a worker (``--tls-client-ca``
    admits certificate holders alone), and the router sets it from the caller's verified
    API key, never from the client's own metadata."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA:
            return str(value)
    return None


class FineTuneServicer(finetune_pb2_grpc.FineTuneServicer):
    """Jobs, sweeps and traffic splits of this worker (splits live in its model store)."""

    def __init__(self, jobs: JobManager, sweeps: SweepManager) -> None:
        self._jobs = jobs
        self._sweeps = sweeps
        self._tracer = get_tracer(__name__)

    async def CreateJob(self, request, context):  # noqa: N802 - gRPC method name
        # The CreateJob span is the job's root: the training process's spans continue it.
        with server_span(
            self._tracer,
            "llmcluster.v1.FineTune/CreateJob",
            context.invocation_metadata(),
            attributes={GEN_AI_OPERATION_NAME: GEN_AI_OPERATION_FINETUNE},
        ) as span:
            try:
                owner = caller_tenant(context) or ""
                if owner:
                    span.set_attribute(ATTR_TENANT, owner)
                job = await self._jobs.create(request, inject_to_dict(), owner=owner)
                span.set_attribute(ATTR_JOB_ID, job.job_id)
                return self._jobs.to_pb(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await abort_with(context, exc)

    async def GetJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            return self._jobs.to_pb(self._jobs.get(request.job_id, caller_tenant(context)))
        except Exception as exc:
            await abort_with(context, exc)

    async def ListJobs(self, request, context):  # noqa: N802 - gRPC method name
        jobs = self._jobs.list(
            state=request.state, limit=request.limit, owner=caller_tenant(context)
        )
        return finetune_pb2.ListJobsResponse(jobs=[self._jobs.to_pb(j) for j in jobs])

    async def CancelJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            return self._jobs.to_pb(await self._jobs.cancel(request.job_id, caller_tenant(context)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    async def WatchJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            events = self._jobs.watch(request.job_id, request.from_sequence, caller_tenant(context))
            async for event in events:
                yield event
        except asyncio.CancelledError:
            raise  # the client went away; nothing to free
        except Exception as exc:
            await abort_with(context, exc)

    def _split_pb(self, name: str) -> finetune_pb2.TrafficSplit:
        store = self._sweeps.store
        return finetune_pb2.TrafficSplit(
            adapter=name,
            weights=store.get_split(name),
            updated_unix_ms=store.split_updated_unix_ms(name),
        )

    async def SetTrafficSplit(self, request, context):  # noqa: N802 - gRPC method name
        try:
            name, weights = traffic_split_from_values(
                request.adapter, dict(request.weights), request.clear
            )
            await asyncio.to_thread(self._sweeps.store.set_split, name, weights)
            logger.info("traffic split of %s: %s", name, weights or "cleared")
            return self._split_pb(name)
        except Exception as exc:
            await abort_with(context, exc)

    async def GetTrafficSplit(self, request, context):  # noqa: N802 - gRPC method name
        try:
            name, _ = traffic_split_from_values(request.adapter, {}, clear=True)
            return self._split_pb(name)
        except Exception as exc:
            await abort_with(context, exc)

    async def CreateSweep(self, request, context):  # noqa: N802 - gRPC method name
        with server_span(
            self._tracer,
            "llmcluster.v1.FineTune/CreateSweep",
            context.invocation_metadata(),
            attributes={GEN_AI_OPERATION_NAME: GEN_AI_OPERATION_FINETUNE},
        ) as span:
            try:
                owner = caller_tenant(context) or ""
                if owner:
                    span.set_attribute(ATTR_TENANT, owner)
                sweep = await self._sweeps.create(request, inject_to_dict(), owner=owner)
                span.set_attribute("llmcluster.sweep_id", sweep.sweep_id)
                return self._sweeps.to_pb(sweep)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await abort_with(context, exc)

    async def GetSweep(self, request, context):  # noqa: N802 - gRPC method name
        try:
            sweep = self._sweeps.get(request.sweep_id, caller_tenant(context))
            return self._sweeps.to_pb(sweep)
        except Exception as exc:
            await abort_with(context, exc)

    async def ListSweeps(self, request, context):  # noqa: N802 - gRPC method name
        sweeps = self._sweeps.list(limit=request.limit, owner=caller_tenant(context))
        return finetune_pb2.ListSweepsResponse(sweeps=[self._sweeps.to_pb(s) for s in sweeps])

    async def CancelSweep(self, request, context):  # noqa: N802 - gRPC method name
        try:
            sweep = await self._sweeps.cancel(request.sweep_id, caller_tenant(context))
            return self._sweeps.to_pb(sweep)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    async def WatchSweep(self, request, context):  # noqa: N802 - gRPC method name
        try:
            events = self._sweeps.watch(
                request.sweep_id, request.from_sequence, caller_tenant(context)
            )
            async for event in events:
                yield event
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)


def add_finetune_servicer(server: grpc.aio.Server, jobs: JobManager, sweeps: SweepManager) -> None:
    """Registers the FineTune service of ``jobs`` and ``sweeps`` on ``server``."""
    finetune_pb2_grpc.add_FineTuneServicer_to_server(FineTuneServicer(jobs, sweeps), server)

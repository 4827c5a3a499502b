"""The worker's ``FineTune`` servicer: thin translation onto :class:`worker.jobs.JobManager`."""

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
from worker.jobs import JobManager

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
    """CreateJob, GetJob, ListJobs, CancelJob and WatchJob of this worker's jobs."""

    def __init__(self, jobs: JobManager) -> None:
        self._jobs = jobs
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


def add_finetune_servicer(server: grpc.aio.Server, jobs: JobManager) -> None:
    """Registers the FineTune service of ``jobs`` on ``server``."""
    finetune_pb2_grpc.add_FineTuneServicer_to_server(FineTuneServicer(jobs), server)

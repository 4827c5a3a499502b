"""The worker's ``FineTune`` servicer: thin translation onto :class:`worker.jobs.JobManager`."""

from __future__ import annotations

import asyncio
import logging

import grpc

from common.errors import abort_with
from common.pb import finetune_pb2, finetune_pb2_grpc
from common.tracing import (
    ATTR_JOB_ID,
    GEN_AI_OPERATION_FINETUNE,
    GEN_AI_OPERATION_NAME,
    get_tracer,
    inject_to_dict,
    server_span,
)
from worker.jobs import JobManager

logger = logging.getLogger(__name__)


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
                job = await self._jobs.create(request, inject_to_dict())
                span.set_attribute(ATTR_JOB_ID, job.job_id)
                return self._jobs.to_pb(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await abort_with(context, exc)

    async def GetJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            return self._jobs.to_pb(self._jobs.get(request.job_id))
        except Exception as exc:
            await abort_with(context, exc)

    async def ListJobs(self, request, context):  # noqa: N802 - gRPC method name
        jobs = self._jobs.list(state=request.state, limit=request.limit)
        return finetune_pb2.ListJobsResponse(jobs=[self._jobs.to_pb(j) for j in jobs])

    async def CancelJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            return self._jobs.to_pb(await self._jobs.cancel(request.job_id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    async def WatchJob(self, request, context):  # noqa: N802 - gRPC method name
        try:
            async for event in self._jobs.watch(request.job_id, request.from_sequence):
                yield event
        except asyncio.CancelledError:
            raise  # the client went away; nothing to free
        except Exception as exc:
            await abort_with(context, exc)


def add_finetune_servicer(server: grpc.aio.Server, jobs: JobManager) -> None:
    """Registers the FineTune service of ``jobs`` on ``server``."""
    finetune_pb2_grpc.add_FineTuneServicer_to_server(FineTuneServicer(jobs), server)

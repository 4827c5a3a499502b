"""The router's ``FineTune`` proxy: jobs go to the least-loaded worker, later calls follow them.

Jobs run on workers (``worker/jobs.py``), which persist them on their own disk or on
one job store they share; the router holds no job state of its own, only a routing table:

* ``CreateJob`` goes to the healthy worker with the fewest active jobs (RUNNING +
  QUEUED jobs it holds, asked of each worker with ``ListJobs``; plus the creates this
  router has in flight to it), ties broken by the worker's generation load
  (``Load.queued + running``), then at random. A request whose ``client_token`` this router has seen
  goes back to the worker that took it, so the worker's idempotency applies.
* ``GetJob`` / ``CancelJob`` / ``WatchJob`` go to the worker remembered for the job.
  On a miss (this router restarted, or another router created the job) every known
  worker is asked with ``GetJob``; the one that does not answer NOT_FOUND holds it and
  is remembered. NOT_FOUND everywhere is NOT_FOUND for the client.
* ``ListJobs`` fans out to every known worker and merges newest first.
* Sweeps route like jobs (a sweep's trials are jobs on the worker holding it):
  ``CreateSweep`` to the least-loaded worker, ``GetSweep`` / ``CancelSweep`` /
  ``WatchSweep`` to the worker remembered (or found) for the sweep id, ``ListSweeps``
  fanned out and merged.
* ``SetTrafficSplit`` goes to every known worker (each applies it to its model store;
  workers sharing one store write the same file), succeeding when any worker holding
  the adapter took it; ``GetTrafficSplit`` asks them all and returns a split found.

Worker errors reach the client with their status code and message unchanged; the
client's deadline and W3C trace context travel on every upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from opentelemetry import trace

from common import tracing
from common.auth import TENANT_METADATA, current_tenant_name
from common.errors import InvalidArgument, NotFound, RequestError, Unavailable, status_of
from common.metrics import API_GRPC, RouterMetrics
from common.pb import finetune_pb2, finetune_pb2_grpc
from router.cluster import Cluster
from router.link import WorkerLink
from router.service import api_of

logger = logging.getLogger(__name__)

FINETUNE_SERVICE = finetune_pb2.DESCRIPTOR.services_by_name["FineTune"].full_name

LOOKUP_TIMEOUT_S = 5.0
"""Cap on one fan-out call (load probe, job search, list): a hung worker must not hold
up a call that other workers can answer."""
UNARY_TIMEOUT_S = 120.0
"""Upstream timeout of a unary call when the client set no deadline (CreateJob
validates and tokenises the dataset, which takes seconds on a large one)."""
MAX_REMEMBERED = 100_000
"""Entries of each routing map; the oldest are forgotten (a miss only costs a search)."""

T = TypeVar("T")


class JobTable:
    """Where jobs live: ``job_id`` → worker address and ``client_token`` → address.

    Bounded LRU maps; losing an entry is harmless because a lookup miss searches the
    workers, so this is a cache, not state that must survive a restart.
    """

    def __init__(self, max_entries: int = MAX_REMEMBERED) -> None:
        self.max_entries = max_entries
        self._jobs: OrderedDict[str, str] = OrderedDict()
        self._tokens: OrderedDict[str, str] = OrderedDict()

    def job(self, job_id: str) -> str | None:
        """The address remembered for ``job_id``, or None."""
        return self._get(self._jobs, job_id)

    def token(self, client_token: str) -> str | None:
        """The address that took the CreateJob with ``client_token``, or None."""
        return self._get(self._tokens, client_token)

    def remember_job(self, job_id: str, address: str) -> None:
        self._put(self._jobs, job_id, address)

    def remember_token(self, client_token: str, address: str) -> None:
        self._put(self._tokens, client_token, address)

    def forget_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    @staticmethod
    def _get(table: OrderedDict[str, str], key: str) -> str | None:
        address = table.get(key)
        if address is not None:
            table.move_to_end(key)
        return address

    def _put(self, table: OrderedDict[str, str], key: str, address: str) -> None:
        table[key] = address
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)


def _timeout(context: grpc.aio.ServicerContext, default: float | None) -> float | None:
    """The client's remaining time (forwarded as the upstream deadline), else ``default``."""
    remaining = context.time_remaining()
    return default if remaining is None else max(remaining, 0.0)


def _capped(context: grpc.aio.ServicerContext, cap: float) -> float:
    remaining = context.time_remaining()
    return cap if remaining is None else max(min(remaining, cap), 0.0)


def _stub(link: WorkerLink) -> finetune_pb2_grpc.FineTuneStub:
    # A stub is a thin wrapper over the link's channel: cheap to build per call.
    return finetune_pb2_grpc.FineTuneStub(link.channel)


def _upstream_metadata() -> list[tuple[str, str]]:
    """Trace context, and the caller's tenant (``--auth-file``) so the worker records it
    as the job's owner and shows each tenant only its own jobs. Built here, never copied
    from the client's metadata: a client cannot claim another tenant."""
    metadata = list(tracing.grpc_metadata_from_context())
    if tenant := current_tenant_name():
        metadata.append((TENANT_METADATA, tenant))
    return metadata


def _require_id(key: str, what: str = "job") -> None:
    if not key:
        raise InvalidArgument(f"{what}_id is required")


def _lookup(link: WorkerLink, what: str, key: str, timeout: float) -> Awaitable[Any]:
    """GetJob / GetSweep of ``key`` on ``link``: how a worker says it holds it."""
    stub = _stub(link)
    metadata = _upstream_metadata()
    if what == "sweep":
        return stub.GetSweep(
            finetune_pb2.GetSweepRequest(sweep_id=key), timeout=timeout, metadata=metadata
        )
    return stub.GetJob(finetune_pb2.GetJobRequest(job_id=key), timeout=timeout, metadata=metadata)


class FineTuneProxy(finetune_pb2_grpc.FineTuneServicer):
    """Public ``FineTune`` API of the router (see module docstring)."""

    def __init__(self, cluster: Cluster, metrics: RouterMetrics | None = None) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.table = JobTable()
        self._creating: Counter[str] = Counter()  # CreateJob calls in flight per address
        self._tracer = tracing.get_tracer(__name__)

    # ---- RPCs ---------------------------------------------------------------------------

    async def CreateJob(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.CreateJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Job:
        async def body(span: trace.Span) -> finetune_pb2.Job:
            link = self._token_link(request.client_token) or await self._least_loaded(context)
            span.set_attribute("server.address", link.address)
            self._creating[link.address] += 1
            try:
                job = await _stub(link).CreateJob(
                    request,
                    timeout=_timeout(context, UNARY_TIMEOUT_S),
                    metadata=_upstream_metadata(),
                )
            finally:
                self._creating[link.address] -= 1
                if self._creating[link.address] <= 0:
                    del self._creating[link.address]
            self.table.remember_job(job.job_id, link.address)
            if request.client_token:
                self.table.remember_token(request.client_token, link.address)
            span.set_attribute(tracing.ATTR_JOB_ID, job.job_id)
            span.set_attribute(tracing.ATTR_WORKER_ID, job.worker_id)
            logger.info("job %s created on %s (%s)", job.job_id, link.address, job.worker_id)
            return job

        return await self._unary("CreateJob", "", context, body)

    async def _job_call(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, what: str = "job"
    ) -> Any:
        """A unary call about one job (or sweep), forwarded to the worker that holds it."""
        key = request.sweep_id if what == "sweep" else request.job_id

        async def body(span: trace.Span) -> Any:
            return await self._on_job_worker(
                key,
                context,
                lambda link: getattr(_stub(link), method)(
                    request,
                    timeout=_timeout(context, UNARY_TIMEOUT_S),
                    metadata=_upstream_metadata(),
                ),
                what,
            )

        return await self._unary(method, key if what == "job" else "", context, body)

    async def GetJob(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Job:
        return await self._job_call("GetJob", request, context)

    async def CancelJob(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Job:
        return await self._job_call("CancelJob", request, context)

    async def ListJobs(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListJobsResponse:
        async def body(span: trace.Span) -> finetune_pb2.ListJobsResponse:
            links = list(self.cluster.links.values())
            if not links:
                raise Unavailable("no workers known to the router")
            results = await self._fan_out(
                links,
                lambda link: _stub(link).ListJobs(
                    request,
                    timeout=_capped(context, 2 * LOOKUP_TIMEOUT_S),
                    metadata=_upstream_metadata(),
                ),
            )
            # job id -> (the copy kept, the worker that listed it): workers sharing a
            # jobs folder each list the same job, and the client sees it once.
            unique: dict[str, tuple[finetune_pb2.Job, str]] = {}
            errors: list[str] = []
            for link, result in zip(links, results, strict=True):
                if isinstance(result, BaseException):
                    errors.append(f"{link.address}: {_describe(result)}")
                    continue
                for job in result.jobs:
                    kept = unique.get(job.job_id)
                    if kept is None or _progress(job) > _progress(kept[0]):
                        unique[job.job_id] = (job, link.address)
            for job_id, (_, address) in unique.items():
                self.table.remember_job(job_id, address)
            jobs = [job for job, _ in unique.values()]
            if errors and len(errors) == len(links):
                raise Unavailable(f"no worker answered ListJobs ({'; '.join(errors)})")
            if errors:
                # A partial list beats none; the log says whose jobs are missing.
                logger.warning("ListJobs: some workers did not answer: %s", "; ".join(errors))
                span.set_attribute("llmcluster.unanswered_workers", len(errors))
            # Same order as a worker's own list: newest first, job id as tie-break.
            jobs.sort(key=lambda j: (j.created_unix_ms, j.job_id), reverse=True)
            if request.limit:
                jobs = jobs[: request.limit]
            return finetune_pb2.ListJobsResponse(jobs=jobs)

        return await self._unary("ListJobs", "", context, body)

    async def WatchJob(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[finetune_pb2.JobEvent]:
        async for event in self._follow("WatchJob", request, context, "job"):
            yield event

    async def _follow(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, what: str
    ) -> AsyncIterator[Any]:
        """A WatchJob / WatchSweep stream from the worker holding the job or sweep."""
        key = request.sweep_id if what == "sweep" else request.job_id
        code: Any = grpc.StatusCode.OK
        with self._span(method, key if what == "job" else "", context) as span:
            try:
                _require_id(key, what)
                link, cached = await self._resolve(key, context, what)
                sent = 0
                while True:
                    span.set_attribute("server.address", link.address)
                    call = getattr(_stub(link), method)(
                        request,
                        # No deadline from the client means follow until it ends.
                        timeout=_timeout(context, None),
                        metadata=_upstream_metadata(),
                    )
                    try:
                        async for event in call:
                            sent += 1
                            yield event
                        return
                    except grpc.aio.AioRpcError as exc:
                        if not (cached and sent == 0 and exc.code() == grpc.StatusCode.NOT_FOUND):
                            raise
                        # The remembered worker no longer has it: search the others once.
                        self.table.forget_job(key)
                        link = await self._find(key, context, exclude=link.address, what=what)
                        cached = False
                    finally:
                        # Client cancelled / went away: stop the upstream stream too.
                        call.cancel()
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await context.abort(exc.code(), exc.details() or "")
            except Exception as exc:
                code, message = status_of(exc)
                await context.abort(code, message)
            finally:
                self._record(method, code)

    # ---- sweeps -------------------------------------------------------------------------

    async def CreateSweep(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.CreateSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Sweep:
        async def body(span: trace.Span) -> finetune_pb2.Sweep:
            link = self._token_link(request.client_token) or await self._least_loaded(context)
            span.set_attribute("server.address", link.address)
            sweep = await _stub(link).CreateSweep(
                request,
                timeout=_timeout(context, UNARY_TIMEOUT_S),
                metadata=_upstream_metadata(),
            )
            self.table.remember_job(sweep.sweep_id, link.address)
            for trial in sweep.trials:
                if trial.job_id:  # the trials' jobs live there too
                    self.table.remember_job(trial.job_id, link.address)
            if request.client_token:
                self.table.remember_token(request.client_token, link.address)
            logger.info(
                "sweep %s created on %s (%s)", sweep.sweep_id, link.address, sweep.worker_id
            )
            return sweep

        return await self._unary("CreateSweep", "", context, body)

    async def GetSweep(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.GetSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Sweep:
        return await self._job_call("GetSweep", request, context, "sweep")

    async def CancelSweep(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.CancelSweepRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.Sweep:
        return await self._job_call("CancelSweep", request, context, "sweep")

    async def WatchSweep(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.WatchSweepRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[finetune_pb2.SweepEvent]:
        async for event in self._follow("WatchSweep", request, context, "sweep"):
            yield event

    async def ListSweeps(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.ListSweepsRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.ListSweepsResponse:
        async def body(span: trace.Span) -> finetune_pb2.ListSweepsResponse:
            links, results = await self._everywhere(
                context,
                lambda link: _stub(link).ListSweeps(
                    request,
                    timeout=_capped(context, 2 * LOOKUP_TIMEOUT_S),
                    metadata=_upstream_metadata(),
                ),
            )
            unique: dict[str, finetune_pb2.Sweep] = {}
            errors = []
            for link, result in zip(links, results, strict=True):
                if isinstance(result, BaseException):
                    errors.append(f"{link.address}: {_describe(result)}")
                    continue
                for sweep in result.sweeps:
                    self.table.remember_job(sweep.sweep_id, link.address)
                    unique.setdefault(sweep.sweep_id, sweep)
            if errors and len(errors) == len(links):
                raise Unavailable(f"no worker answered ListSweeps ({'; '.join(errors)})")
            sweeps = sorted(
                unique.values(), key=lambda s: (s.created_unix_ms, s.sweep_id), reverse=True
            )
            if request.limit:
                sweeps = sweeps[: request.limit]
            return finetune_pb2.ListSweepsResponse(sweeps=sweeps)

        return await self._unary("ListSweeps", "", context, body)

    # ---- traffic splits -----------------------------------------------------------------

    async def _everywhere(
        self, context: grpc.aio.ServicerContext, call: Callable[[WorkerLink], Awaitable[T]]
    ) -> tuple[list[WorkerLink], list[T | BaseException]]:
        links = list(self.cluster.links.values())
        if not links:
            raise Unavailable("no workers known to the router")
        return links, await self._fan_out(links, call)

    async def _split_call(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.TrafficSplit:
        """``method`` on every worker: the answer of one that succeeded (for Get, one
        that has a split, if any); when none did, the most telling error (a validation
        error over NOT_FOUND over the rest), with the worker's code and message."""

        async def body(span: trace.Span) -> finetune_pb2.TrafficSplit:
            links, results = await self._everywhere(
                context,
                lambda link: getattr(_stub(link), method)(
                    request,
                    timeout=_capped(context, 2 * LOOKUP_TIMEOUT_S),
                    metadata=_upstream_metadata(),
                ),
            )
            answers = [r for r in results if not isinstance(r, BaseException)]
            if answers:
                return max(answers, key=lambda a: (len(a.weights) > 0, a.updated_unix_ms))
            errors = [r for r in results if isinstance(r, BaseException)]
            rank = {grpc.StatusCode.INVALID_ARGUMENT: 0, grpc.StatusCode.NOT_FOUND: 1}
            worst = min(
                errors,
                key=lambda e: rank.get(e.code(), 2) if isinstance(e, grpc.aio.AioRpcError) else 3,
            )
            raise worst

        return await self._unary(method, "", context, body)

    async def SetTrafficSplit(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.SetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.TrafficSplit:
        return await self._split_call("SetTrafficSplit", request, context)

    async def GetTrafficSplit(  # noqa: N802 - gRPC method name
        self, request: finetune_pb2.GetTrafficSplitRequest, context: grpc.aio.ServicerContext
    ) -> finetune_pb2.TrafficSplit:
        return await self._split_call("GetTrafficSplit", request, context)

    # ---- routing ------------------------------------------------------------------------

    def _token_link(self, client_token: str) -> WorkerLink | None:
        """The worker that took this token before, so a retried CreateJob is idempotent.

        Sent there even when it is unhealthy: another worker would create a duplicate."""
        if not client_token:
            return None
        address = self.table.token(client_token)
        return self.cluster.links.get(address) if address else None

    async def _least_loaded(self, context: grpc.aio.ServicerContext) -> WorkerLink:
        """The healthy worker with the fewest active jobs (see module docstring)."""
        links = self.cluster.healthy_links()
        if not links:
            raise Unavailable("no healthy worker to run the job; retry later")
        if len(links) == 1:
            return links[0]

        async def active_jobs(link: WorkerLink) -> int:
            stub = _stub(link)
            timeout = _capped(context, LOOKUP_TIMEOUT_S)
            # No tenant: the load probe counts every tenant's jobs.
            metadata = tracing.grpc_metadata_from_context()
            running, queued = await asyncio.gather(
                stub.ListJobs(
                    finetune_pb2.ListJobsRequest(state=finetune_pb2.RUNNING),
                    timeout=timeout,
                    metadata=metadata,
                ),
                stub.ListJobs(
                    finetune_pb2.ListJobsRequest(state=finetune_pb2.QUEUED),
                    timeout=timeout,
                    metadata=metadata,
                ),
            )
            # Workers sharing a jobs folder each list every job in it: count the ones
            # this worker holds (Job.worker_id names the lease holder).
            mine = link.info.worker_id if link.info is not None else ""
            return sum(
                1
                for job in (*running.jobs, *queued.jobs)
                if not mine or job.worker_id in ("", mine)
            )

        counts = await self._fan_out(links, active_jobs)
        scored: list[tuple[int, int, float, WorkerLink]] = []
        for link, count in zip(links, counts, strict=True):
            if isinstance(count, BaseException):
                # It passes health checks but cannot list jobs: do not give it more.
                logger.warning("job count of %s unknown: %s", link.address, _describe(count))
                continue
            generation = link.load.queued + link.load.running
            scored.append((count + self._creating[link.address], generation, random.random(), link))
        if not scored:
            raise Unavailable("no healthy worker answered ListJobs; retry later")
        return min(scored, key=lambda s: s[:3])[3]

    async def _on_job_worker(
        self,
        job_id: str,
        context: grpc.aio.ServicerContext,
        call: Callable[[WorkerLink], Awaitable[T]],
        what: str = "job",
    ) -> T:
        """``call`` on the worker holding ``job_id`` (a sweep id when ``what`` is
        "sweep"); a stale table entry costs one search."""
        _require_id(job_id, what)
        link, cached = await self._resolve(job_id, context, what)
        try:
            return await call(link)
        except grpc.aio.AioRpcError as exc:
            if not (cached and exc.code() == grpc.StatusCode.NOT_FOUND):
                raise
        self.table.forget_job(job_id)
        return await call(await self._find(job_id, context, exclude=link.address, what=what))

    async def _resolve(
        self, job_id: str, context: grpc.aio.ServicerContext, what: str = "job"
    ) -> tuple[WorkerLink, bool]:
        """The link of the worker holding ``job_id`` and whether it came from the table.
        Job and sweep ids share the table (their prefixes differ: ``ft-`` / ``sw-``)."""
        address = self.table.job(job_id)
        link = self.cluster.links.get(address) if address else None
        if link is not None:
            return link, True
        return await self._find(job_id, context, what=what), False

    async def _find(
        self,
        job_id: str,
        context: grpc.aio.ServicerContext,
        exclude: str | None = None,
        what: str = "job",
    ) -> WorkerLink:
        """Asks every known worker for ``job_id`` (or a sweep id); remembers and returns
        the one holding it.

        All workers, not only healthy ones: a draining worker still holds its jobs."""
        links = [link for a, link in self.cluster.links.items() if a != exclude]
        if not links and exclude is not None and exclude in self.cluster.links:
            # The only worker just answered NOT_FOUND: that is the answer.
            raise NotFound(f"{what} {job_id!r} not found on any of the 1 workers")
        if not links:
            raise Unavailable("no workers known to the router")
        results = await self._fan_out(
            links,
            lambda link: _lookup(link, what, job_id, _capped(context, LOOKUP_TIMEOUT_S)),
        )
        failures: list[str] = []
        for link, result in zip(links, results, strict=True):
            if not isinstance(result, BaseException):
                self.table.remember_job(job_id, link.address)
                return link
            if not (
                isinstance(result, grpc.aio.AioRpcError)
                and result.code() == grpc.StatusCode.NOT_FOUND
            ):
                failures.append(f"{link.address}: {_describe(result)}")
        if failures:
            # A worker that did not answer may hold it: NOT_FOUND would be a guess.
            raise Unavailable(
                f"{what} {job_id!r} not found on the workers that answered; "
                f"{len(failures)} did not ({'; '.join(failures)})"
            )
        raise NotFound(f"{what} {job_id!r} not found on any of the {len(links)} workers")

    @staticmethod
    async def _fan_out(
        links: list[WorkerLink], call: Callable[[WorkerLink], Awaitable[T]]
    ) -> list[T | BaseException]:
        """``call`` on every link concurrently; an exception stands in for a failed result."""
        return list(await asyncio.gather(*(call(link) for link in links), return_exceptions=True))

    # ---- spans, metrics, errors ---------------------------------------------------------

    def _span(self, method: str, job_id: str, context: grpc.aio.ServicerContext) -> Any:
        attributes: dict[str, Any] = {
            tracing.ATTR_RPC_SERVICE: FINETUNE_SERVICE,
            tracing.ATTR_RPC_METHOD: method,
            tracing.GEN_AI_OPERATION_NAME: tracing.GEN_AI_OPERATION_FINETUNE,
        }
        if job_id:
            attributes[tracing.ATTR_JOB_ID] = job_id
        if tenant := current_tenant_name():
            attributes[tracing.ATTR_TENANT] = tenant
        return tracing.server_span(
            self._tracer,
            f"{FINETUNE_SERVICE}/{method}",
            context.invocation_metadata(),
            attributes=attributes,
        )

    async def _unary(
        self,
        method: str,
        job_id: str,
        context: grpc.aio.ServicerContext,
        body: Callable[[trace.Span], Awaitable[T]],
    ) -> T:
        """Runs ``body`` in a server span; worker errors pass through with code and message."""
        code: Any = grpc.StatusCode.OK
        with self._span(method, job_id, context) as span:
            try:
                return await body(span)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                await context.abort(exc.code(), exc.details() or "")
            except Exception as exc:
                code, message = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    logger.exception("internal error in FineTune/%s", method)
                await context.abort(code, message)
            finally:
                if api_of(context) == API_GRPC:  # the gateway counts its own calls, once
                    self._record(method, code)
        raise AssertionError("unreachable: context.abort raises")

    def _record(self, method: str, code: Any) -> None:
        if self.metrics is not None:
            self.metrics.record_request(method, code)


def _progress(job: finetune_pb2.Job) -> tuple[bool, bool, int, int]:
    """How far a listed copy of a job has come. Of two workers sharing a jobs folder,
    the one running the job reports it furthest along; the other shows what it read
    from disk when it started."""
    return (
        job.finished_unix_ms > 0,
        job.started_unix_ms > 0,
        job.latest_metrics.step,
        job.finished_unix_ms,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, RequestError):
        return f"{exc.code.name}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def add_finetune_proxy(
    server: grpc.aio.Server, cluster: Cluster, metrics: RouterMetrics | None = None
) -> FineTuneProxy:
    """Registers the FineTune proxy over ``cluster`` on ``server``."""
    proxy = FineTuneProxy(cluster, metrics)
    finetune_pb2_grpc.add_FineTuneServicer_to_server(proxy, server)
    return proxy

"""The router's view of the cluster: links to workers, admission, routing with failover.

:class:`Cluster` keeps one :class:`~router.link.WorkerLink` per worker address
(``set_workers`` may change the list at runtime: the static registry calls it once,
a discovery watch calls it on every change), bounds the requests the router holds
(``max_queue``), asks the policy for a worker and re-routes a request whose worker
failed before it produced a token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from common import tracing
from common.errors import InvalidArgument, NotFound, RequestError, ResourceExhausted, Unavailable
from common.metrics import RouterMetrics
from common.pb import generate_pb2
from common.tls import channel_credentials
from common.validation import GenerationLimits, generation_spec_from_pb
from router.config import RouterConfig
from router.link import Delta, Event, Failed, Finished, LinkRequest, LinkStats, WorkerLink
from router.policy import Policy, make_policy

logger = logging.getLogger(__name__)


@dataclass
class RouterStats:
    """Counters of the router: what it admitted, refused and sent over its links."""

    admitted: int = 0
    refused_queue_full: int = 0
    rerouted: int = 0
    in_flight: int = 0
    batches_sent: int = 0
    requests_sent: int = 0
    links: dict[str, LinkStats] = field(default_factory=dict)


@dataclass
class Routed:
    """Where the request currently is: the link and its id there (for metadata/tests)."""

    link: WorkerLink | None = None
    request: LinkRequest | None = None
    attempts: int = 0


class Cluster:
    """Links, admission and routing (see module docstring)."""

    def __init__(
        self,
        config: RouterConfig,
        policy: Policy | None = None,
        on_health_change: Callable[[bool], None] | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config
        self.policy = policy or make_policy(config.balance, config.seed)
        self.on_health_change = on_health_change
        self.metrics = metrics
        self._tracer = tracing.get_tracer(__name__)
        if metrics is not None:
            # Read at scrape time (from the exporter's thread: plain int/len reads).
            metrics.outstanding_requests.set_function(lambda: self._in_flight)
            metrics.queue_depth.set_function(
                lambda: sum(link.unsent for link in list(self.links.values()))
            )
            metrics.healthy_workers.set_function(self.healthy_count)
        self.links: dict[str, WorkerLink] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._stats = RouterStats()
        self._last_healthy: bool | None = None
        self._worker_credentials = (
            channel_credentials(config.worker_tls_ca, config.worker_tls_cert, config.worker_tls_key)
            if config.worker_tls_ca
            else None
        )

    # ---- discovery --------------------------------------------------------------------

    def set_workers(self, addresses: Iterable[str]) -> None:
        """Makes the set of workers exactly ``addresses``: new ones get a link, removed
        ones stop taking requests and close once theirs finish (or after grace_s)."""
        wanted = list(dict.fromkeys(a.strip() for a in addresses if a.strip()))
        for address in wanted:
            if address not in self.links:
                link = WorkerLink(
                    address,
                    coalesce_window_s=self.config.coalesce_window_ms / 1000.0,
                    max_batch=self.config.max_batch,
                    reconnect_initial_s=self.config.reconnect_initial_s,
                    reconnect_max_s=self.config.reconnect_max_s,
                    connect_timeout_s=self.config.connect_timeout_s,
                    on_change=self._health_changed,
                    on_batch=self.metrics.observe_submit_batch if self.metrics else None,
                    credentials=self._worker_credentials,
                    tls_server_name=self.config.worker_tls_server_name,
                )
                self.links[address] = link
                link.start()
                logger.info("worker %s added", address)
        for address in [a for a in self.links if a not in wanted]:
            link = self.links.pop(address)
            self._stats.links[address] = link.stats
            task = asyncio.get_running_loop().create_task(link.close(self.config.grace_s))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
            logger.info("worker %s removed", address)
        self._health_changed()

    async def wait_ready(self, timeout_s: float, count: int = 1) -> bool:
        """Waits until ``count`` workers are healthy (tests, start-up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy_count() >= count:
                return True
            await asyncio.sleep(0.05)
        return self.healthy_count() >= count

    def healthy_count(self) -> int:
        return sum(1 for link in list(self.links.values()) if link.healthy)

    def healthy_links(self) -> list[WorkerLink]:
        return [link for link in self.links.values() if link.healthy]

    async def close(self) -> None:
        """Closes every link after up to ``grace_s`` for running requests."""
        links = list(self.links.values())
        self._stats.links.update({link.address: link.stats for link in links})
        self.links.clear()
        await asyncio.gather(*(link.close(self.config.grace_s) for link in links), *self._retired)

    def stats(self) -> RouterStats:
        """A snapshot of the counters (coalescing shows as batches_sent < requests_sent)."""
        s = self._stats
        links = {**s.links, **{a: link.stats for a, link in self.links.items()}}
        return RouterStats(
            admitted=s.admitted,
            refused_queue_full=s.refused_queue_full,
            rerouted=s.rerouted,
            in_flight=self._in_flight,
            batches_sent=sum(ls.batches_sent for ls in links.values()),
            requests_sent=sum(ls.requests_sent for ls in links.values()),
            links={a: LinkStats(**vars(ls)) for a, ls in links.items()},
        )

    def validate(self, request: generate_pb2.GenerateRequest) -> None:
        """Cheap checks before routing (the worker re-checks with the model at hand);
        raises InvalidArgument with the same messages a worker would give."""
        infos = [link.info for link in self.links.values() if link.info is not None]
        # Lenient bounds: the largest any worker accepts; the chosen worker has the
        # final word (its Rejected status and message reach the client unchanged).
        limits = GenerationLimits(
            max_new_tokens_limit=max((i.max_new_tokens_limit for i in infos), default=0) or 1 << 30,
            max_context_tokens=max((i.max_context_tokens for i in infos), default=0) or 1 << 30,
        )
        generation_spec_from_pb(request, limits)
        if (
            request.params.HasField("constraint")
            and infos
            and not any(i.supports_constraints for i in infos)
        ):
            raise InvalidArgument(
                "params.constraint: no worker of this cluster supports constraints "
                "(structured output)"
            )

    def _health_changed(self) -> None:
        healthy = self.healthy_count() > 0
        if healthy != self._last_healthy:
            self._last_healthy = healthy
            logger.info("router health: %s", "SERVING" if healthy else "NOT_SERVING")
            if self.on_health_change is not None:
                self.on_health_change(healthy)

    # ---- requests ---------------------------------------------------------------------

    async def generate(
        self,
        request: generate_pb2.GenerateRequest,
        *,
        deadline_unix_ms: int = 0,
        trace_context: Mapping[str, str] | None = None,
        routed: Routed | None = None,
        stream_interval_s: float = 0.0,
    ) -> AsyncGenerator[Delta | Finished, None]:
        """Yields the request's deltas and then its Finished; raises RequestError.

        ``stream_interval_s`` > 0: after a delta, the next is held until that long after
        it, merged with whatever arrived meanwhile (``--stream-interval-ms``).

        Admission happens at the first ``__anext__``; close the generator (``aclosing``)
        when the caller goes away so the worker gets a Cancel.
        """
        if self._in_flight >= self.config.max_queue:
            self._stats.refused_queue_full += 1
            raise ResourceExhausted(
                f"router queue is full ({self._in_flight} requests, max_queue="
                f"{self.config.max_queue}); retry later"
            )
        self._in_flight += 1
        self._stats.admitted += 1
        loop = asyncio.get_running_loop()
        routed = routed if routed is not None else Routed()
        tried: set[str] = set()
        last_error: RequestError | None = None
        lr: LinkRequest | None = None
        link: WorkerLink | None = None
        try:
            while routed.attempts < self.config.max_attempts:
                # The route span is closed before streaming: it parents the worker's spans
                # through WorkItem.trace_context, and never spans an async-generator yield.
                with self._tracer.start_as_current_span("route") as span:
                    link = self._choose(request, tried, last_error, span)
                    tried.add(link.address)
                    routed.attempts += 1
                    span.set_attribute("llmcluster.attempt", routed.attempts)
                    if routed.attempts > 1:
                        self._stats.rerouted += 1
                        if self.metrics is not None:
                            self.metrics.retries_total.inc()
                        if last_error is not None:
                            span.add_event(tracing.EVENT_FAILOVER, {"reason": last_error.message})
                    span.set_attribute("server.address", link.address)
                    try:
                        lr = link.submit(
                            request,
                            deadline_unix_ms=deadline_unix_ms,
                            trace_context={**(trace_context or {}), **tracing.inject_to_dict()},
                        )
                    except Unavailable as exc:
                        last_error = exc
                        continue
                    span.set_attribute(tracing.ATTR_LINK_REQUEST_ID, lr.link_request_id)
                    if link.info is not None:
                        span.set_attribute(tracing.ATTR_WORKER_ID, link.info.worker_id)
                routed.link, routed.request = link, lr
                delivered = 0
                held: Event | None = None
                last_yield: float | None = None
                while True:
                    if held is not None:
                        event, held = held, None
                    else:
                        try:
                            event = await asyncio.wait_for(
                                lr.events.get(), self.config.stall_timeout_s or None
                            )
                        except TimeoutError:
                            event = self._stalled(link, lr, delivered)
                    if isinstance(event, Delta):
                        if stream_interval_s > 0 and last_yield is not None:
                            # Let the next tokens (or the end) join this message.
                            wait_s = last_yield + stream_interval_s - loop.time()
                            if wait_s > 0:
                                await asyncio.sleep(wait_s)
                        event, held = _merge_queued_deltas(event, lr.events)
                        delivered += len(event.tokens)
                        yield event
                        last_yield = loop.time()
                    elif isinstance(event, Finished):
                        lr = None
                        yield event
                        return
                    else:
                        assert isinstance(event, Failed)
                        lr = None
                        if event.retryable and delivered == 0:
                            logger.info(
                                "re-routing request from %s: %s", link.address, event.message
                            )
                            last_error = RequestError(event.message, event.code)
                            break
                        message = event.message
                        if event.code == grpc.StatusCode.UNAVAILABLE:
                            message += f"; {delivered} tokens were delivered before it failed"
                        raise RequestError(message, event.code)
            assert last_error is not None
            raise last_error
        finally:
            self._in_flight -= 1
            if lr is not None and link is not None:
                # The caller went away (cancel or deadline): free the worker's slot.
                expired = deadline_unix_ms and time.time() * 1000 >= deadline_unix_ms
                link.cancel(lr, "deadline exceeded" if expired else "client cancelled")

    def _stalled(self, link: WorkerLink, lr: LinkRequest, delivered: int) -> Failed:
        """``--stall-timeout-s`` passed without a token: the worker's slot is freed and the
        request fails as a retryable UNAVAILABLE (re-routed while nothing was sent)."""
        stall_s = self.config.stall_timeout_s
        logger.warning(
            "request %s on %s: no token for %.0fs", lr.link_request_id, link.address, stall_s
        )
        link.cancel(lr, f"no token for {stall_s:.0f}s (router --stall-timeout-s)")
        return Failed(
            grpc.StatusCode.UNAVAILABLE,
            f"worker {link.address} sent no token for {stall_s:.0f}s",
            retryable=True,
        )

    def _choose(
        self,
        request: generate_pb2.GenerateRequest,
        tried: set[str],
        last_error: RequestError | None,
        span: trace.Span,
    ) -> WorkerLink:
        known = [link.snapshot() for link in self.links.values()]
        if (
            request.model
            and known
            and all(w.models for w in known)  # every worker has told us what it serves
            and not any(w.serves(request.model) for w in known)
        ):
            # No worker serves it, up or down: retrying cannot help (UNAVAILABLE would
            # say it can). A known model whose workers are all down stays UNAVAILABLE.
            served = sorted({m for w in known for m in w.models})
            raise NotFound(f"model {request.model[:200]!r} is not served here (served: {served})")
        candidates = [w for w in known if w.address not in tried]
        if tried and not any(w.healthy for w in candidates) and last_error is not None:
            # Every worker that could take it has failed it: the client sees why.
            raise last_error
        chosen = self.policy.choose(request.model, request.adapter, candidates)
        # Why it went there, for whoever reads the trace.
        span.set_attribute(
            tracing.ATTR_ROUTE_CANDIDATES,
            sum(1 for w in candidates if w.healthy and w.serves(request.model)),
        )
        span.set_attribute(tracing.ATTR_ROUTE_OUTSTANDING_TOKENS, chosen.outstanding_tokens)
        if request.adapter:
            span.set_attribute(
                tracing.ATTR_ROUTE_ADAPTER_LOADED, chosen.has_adapter(request.adapter)
            )
        return self.links[chosen.address]


def _merge_queued_deltas(first: Delta, events: asyncio.Queue[Event]) -> tuple[Delta, Event | None]:
    """``first`` plus every delta already queued behind it, as one delta, and the terminal
    event if one was reached. A client stream that falls behind (a slow reader, or a
    router fanning out to hundreds of streams) then gets fewer, fuller messages instead
    of a growing backlog of one-token ones; a stream that keeps up sees no change."""
    tokens, text = first.tokens, first.text
    while not events.empty():
        event = events.get_nowait()
        if not isinstance(event, Delta):
            return Delta(tokens, text), event
        if tokens is first.tokens:
            tokens = list(tokens)
        tokens.extend(event.tokens)
        text += event.text
    return (first, None) if tokens is first.tokens else (Delta(tokens, text), None)

"""One long-lived ``Worker.Serve`` stream per worker: coalescing, fan-out, cancel, failover.

A :class:`WorkerLink` owns the channel to one worker and keeps one bidirectional
``Serve`` stream open on it, reconnecting with exponential backoff. Requests bound
for the worker wait in an outbox; the writer task sends them as one ``SubmitBatch``
(at most ``max_batch``): at once when the link has sent nothing for
``coalesce_window_s`` (a lone request pays no wait), else when that window since the
last send has passed, so a burst leaves as a few full batches.
The reader fans ``StepEvents`` deltas out to per-request ``asyncio.Queue`` s.

When the stream breaks, every request of the link gets an answer at once: those
that have not received a token are handed back as retryable (the caller re-routes
them), the others fail with UNAVAILABLE. The worker is then ejected (not routable)
until its ``grpc.health.v1`` check says SERVING again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import Unavailable, status_code_from_number
from common.pb import generate_pb2, generate_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.policy import WorkerState

logger = logging.getLogger(__name__)

# Keepalive lets a link notice a peer that vanished without closing TCP (power loss,
# partition); the worker's ~200 ms Load messages keep the server's ping-strike
# counter reset, so these pings are never punished with GOAWAY.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]

_ids = itertools.count(1)


def new_link_request_id() -> str:
    """A router-unique id for a request on a link (unique across reconnects too)."""
    return f"r{next(_ids)}"


@dataclass
class Delta:
    """New tokens of one request from one engine iteration."""

    tokens: list[generate_pb2.Token]
    text: str


@dataclass
class Finished:
    """The request ended normally."""

    finish_reason: int
    usage: generate_pb2.Usage


@dataclass
class Failed:
    """The request ended with an error; ``retryable`` means no token was produced and
    another worker may take it."""

    code: grpc.StatusCode
    message: str
    retryable: bool


Event = Delta | Finished | Failed


@dataclass(eq=False)
class LinkRequest:
    """One request travelling on a link, with the queue its events arrive on."""

    link_request_id: str
    item: worker_pb2.WorkItem
    estimated_tokens: int
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    tokens_received: int = 0
    sent: bool = False
    done: bool = False
    batch_id: int = 0

    def _finish(self, event: Event) -> None:
        # Only the first terminal event counts: a request answered once (cancelled,
        # failed by a link break) ignores late messages for its id.
        if not self.done:
            self.done = True
            self.events.put_nowait(event)


@dataclass
class LinkStats:
    """Counters of one link since the router started."""

    batches_sent: int = 0
    requests_sent: int = 0
    cancels_sent: int = 0
    largest_batch: int = 0
    connects: int = 0
    breaks: int = 0


def estimate_tokens(request: generate_pb2.GenerateRequest) -> int:
    """Rough work of a request in tokens (prompt at ~4 chars/token + max_new_tokens),
    the same unit as Load.queued_tokens; only used until the next Load arrives."""
    chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    max_new = request.params.max_new_tokens if request.params.HasField("max_new_tokens") else 128
    return chars // 4 + 1 + max_new


async def _wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Waits for ``event`` at most ``timeout_s``; True if set. Unlike asyncio.wait_for on
    Python < 3.12, a cancellation of the caller is never swallowed."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


class WorkerLink:
    """The router's connection to one worker (see module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        coalesce_window_s: float = 0.005,
        max_batch: int = 64,
        reconnect_initial_s: float = 0.1,
        reconnect_max_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 10.0,
        on_change: Callable[[], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tls_server_name: str = "",
    ) -> None:
        self.address = address
        self.coalesce_window_s = coalesce_window_s
        self.max_batch = max_batch
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        # No message at all (the worker sends Load every ~200 ms) for this long means
        # the peer is gone even if TCP has not noticed yet.
        self.idle_timeout_s = idle_timeout_s
        self.on_change = on_change
        self.on_batch = on_batch  # called with each SubmitBatch's size (metrics)
        self.stats = LinkStats()
        self.info: worker_pb2.WorkerInfo | None = None
        self.load = worker_pb2.Load()
        self.connected = False
        self.serving = False
        self._router_tokens = 0  # estimated work sent since the last Load
        self._requests: dict[str, LinkRequest] = {}
        self._outbox: deque[LinkRequest] = deque()
        self._cancels: dict[str, list[str]] = {}  # reason -> ids
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._batch_ids = itertools.count(1)
        self._last_send_monotonic = float("-inf")
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        self._last_rx = 0.0
        self._break_reason = ""
        # Every call to this worker (Serve, Info, health, ListModels, the FineTune
        # proxy) rides this one channel: TLS / mTLS when the router has --worker-tls-*.
        self.channel = (
            grpc.aio.secure_channel(
                address,
                credentials,
                options=CHANNEL_OPTIONS
                + ([("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []),
            )
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        )
        self._worker = worker_pb2_grpc.WorkerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.generate_stub = generate_pb2_grpc.GenerateStub(self.channel)

    # ---- public API -------------------------------------------------------------------

    def start(self) -> None:
        """Starts the connect/serve loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"link-{self.address}"
            )

    async def close(self, grace_s: float = 0.0) -> None:
        """Stops routing here, waits up to ``grace_s`` for running requests, then closes."""
        self._closing = True
        self._set_state(serving=False)
        deadline = time.monotonic() + grace_s
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._call is not None:
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all("router is shutting down its link to the worker")
        await self.channel.close()

    @property
    def healthy(self) -> bool:
        """Routable: stream open, health SERVING, not draining, not closing."""
        return self.connected and self.serving and not self.load.draining and not self._closing

    @property
    def unsent(self) -> int:
        """Requests waiting in the outbox for the next SubmitBatch."""
        return len(self._outbox)

    @property
    def outstanding(self) -> int:
        """Requests the router has on this link now."""
        return len(self._requests)

    async def wait_connected(self, timeout_s: float) -> bool:
        """Waits until the stream is open (tests, start-up); False on timeout."""
        await _wait_event(self._connected_event, timeout_s)
        return self.connected

    def snapshot(self) -> WorkerState:
        """This worker as the policy sees it."""
        info = self.info
        return WorkerState(
            address=self.address,
            worker_id=info.worker_id if info is not None else "",
            healthy=self.healthy,
            models=tuple(info.models) if info is not None else (),
            loaded_adapters=frozenset(self.load.loaded_adapters),
            queued_tokens=self.load.queued_tokens,
            running_tokens=self.load.running_tokens,
            router_tokens=self._router_tokens,
            outstanding_requests=len(self._requests),
            reported_requests=self.load.queued + self.load.running,
            max_running=info.max_running if info is not None else 0,
        )

    def submit(
        self,
        request: generate_pb2.GenerateRequest,
        *,
        deadline_unix_ms: int = 0,
        trace_context: Mapping[str, str] | None = None,
    ) -> LinkRequest:
        """Queues a request for the next SubmitBatch; its events arrive on ``.events``.

        Raises Unavailable (retryable for the caller) when the link is not open.
        """
        if not self.connected or self._closing:
            raise Unavailable(f"worker {self.address} is not connected")
        lrid = new_link_request_id()
        item = worker_pb2.WorkItem(
            link_request_id=lrid,
            request=request,
            deadline_unix_ms=deadline_unix_ms,
            trace_context=dict(trace_context or {}),
        )
        lr = LinkRequest(lrid, item, estimate_tokens(request))
        self._requests[lrid] = lr
        self._outbox.append(lr)
        self._router_tokens += lr.estimated_tokens
        self._wakeup.set()
        if len(self._outbox) >= self.max_batch:
            self._full.set()
        return lr

    def cancel(self, lr: LinkRequest, reason: str) -> None:
        """Aborts a request: dropped if not yet sent, else a Cancel goes to the worker."""
        if self._requests.pop(lr.link_request_id, None) is None:
            return
        lr._finish(Failed(grpc.StatusCode.CANCELLED, reason, retryable=False))
        if lr.sent and self.connected:
            self._cancels.setdefault(reason, []).append(lr.link_request_id)
            self._wakeup.set()
        # Unsent: the writer skips requests that are done.

    # ---- connection loop ----------------------------------------------------------

    async def _run(self) -> None:
        delay = self.reconnect_initial_s
        while not self._closing:
            try:
                if await self._check_serving():
                    await self._session()
                    delay = self.reconnect_initial_s
            except asyncio.CancelledError:
                raise
            except Exception:
                # The loop must outlive any one failure; the next attempt starts fresh.
                logger.exception("link %s: unexpected error", self.address)
            if self._closing:
                break
            # Jitter spreads reconnects of many routers to one restarted worker.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    async def _check_serving(self) -> bool:
        """One health Check; the worker stays ejected until this says SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.connect_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            logger.debug("link %s: health check failed: %s", self.address, exc.code())
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def _session(self) -> None:
        """One Serve stream from open to break; answers every request of it at the end."""
        self.info = await self._worker.Info(
            worker_pb2.InfoRequest(), timeout=self.connect_timeout_s
        )
        # Load (Info's, then each report) is the current adapter set; Info.adapters
        # only stands in until the first report.
        if self.info.HasField("load"):
            self.load = self.info.load
        else:
            self.load = worker_pb2.Load(loaded_adapters=self.info.adapters)
        call = self._worker.Serve()
        self._call = call
        loop = asyncio.get_running_loop()
        self._last_rx = time.monotonic()
        self._break_reason = ""
        writer = loop.create_task(self._writer(call))
        tasks = [
            writer,
            loop.create_task(self._watch_health()),
            loop.create_task(self._watchdog(writer)),
        ]
        self.stats.connects += 1
        self._router_tokens = 0
        self._set_state(connected=True, serving=True)
        logger.info(
            "link %s: connected to worker %s (models %s)",
            self.address,
            self.info.worker_id,
            list(self.info.models),
        )
        reason = "stream closed by the worker"
        try:
            # A plain read (no asyncio.wait_for, which can swallow a cancellation on
            # Python < 3.12); the watchdog cancels the call when the worker goes quiet.
            # A closing link (worker left the registry) keeps reading until its running
            # requests finish; close() bounds that wait by its grace period.
            while not (self._closing and not self._requests):
                try:
                    msg = await call.read()
                except grpc.aio.AioRpcError as exc:
                    reason = f"stream failed: {exc.code().name}: {exc.details()}"
                    break
                except asyncio.CancelledError:
                    if self._break_reason:  # the watchdog cancelled the call, not us
                        break
                    raise
                if msg is grpc.aio.EOF:
                    break
                self._last_rx = time.monotonic()
                try:
                    self._handle(msg)
                except Exception:
                    # One malformed message must not take down the link.
                    logger.exception("link %s: bad message from worker", self.address)
        finally:
            reason = self._break_reason or reason
            self._set_state(connected=False, serving=False)
            self.stats.breaks += 1
            for task in tasks:
                task.cancel()
            call.cancel()
            self._call = None
            self._fail_all(f"lost the link to worker {self._worker_name()} ({reason})")
            if not self._closing:
                logger.warning("link %s: broken: %s; ejected", self.address, reason)
        # gather (not suppress) so that a cancellation of this task is never swallowed.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watchdog(self, writer: asyncio.Task[None]) -> None:
        """Breaks the stream when the writer died or the worker sent nothing for
        ``idle_timeout_s`` (it sends Load every ~200 ms, so silence means it is gone
        even if TCP has not noticed)."""
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout_s / 4))
            if self._call is None:
                return
            idle_s = time.monotonic() - self._last_rx
            if idle_s > self.idle_timeout_s:
                self._break_reason = f"no message from the worker for {idle_s:.1f}s"
            elif writer.done():
                self._break_reason = "sending to the worker failed"
            if self._break_reason:
                self._call.cancel()
                return

    async def _watch_health(self) -> None:
        """Follows the worker's health while connected (NOT_SERVING: stop routing here)."""
        try:
            async for reply in self._health.Watch(health_pb2.HealthCheckRequest(service="")):
                serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                if serving != self.serving:
                    logger.info(
                        "link %s: worker health is %s",
                        self.address,
                        health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status),
                    )
                self._set_state(serving=serving)
        except grpc.aio.AioRpcError as exc:
            # Watch unimplemented or the channel broke: the Serve stream's own failure
            # handling covers a dead worker; Load.draining covers drain.
            logger.debug("link %s: health watch ended: %s", self.address, exc.code())

    async def _writer(self, call: grpc.aio.StreamStreamCall) -> None:
        """The only task writing to the stream: cancels at once, requests coalesced."""
        while True:
            await self._wakeup.wait()
            if self._cancels:
                cancels, self._cancels = self._cancels, {}
                for reason, ids in cancels.items():
                    await call.write(
                        worker_pb2.RouterMessage(
                            cancel=worker_pb2.Cancel(link_request_ids=ids, reason=reason)
                        )
                    )
                    self.stats.cancels_sent += len(ids)
            if self._outbox:
                hold_s = self._last_send_monotonic + self.coalesce_window_s - time.monotonic()
                if hold_s > 0 and len(self._outbox) < self.max_batch:
                    # A batch left less than a window ago: this is a burst, so wait for
                    # the rest of the window and let others bound here join. An idle link
                    # sends at once (coalescing would only add latency to a lone request).
                    self._full.clear()
                    await _wait_event(self._full, hold_s)
                batch: list[LinkRequest] = []
                while self._outbox and len(batch) < self.max_batch:
                    lr = self._outbox.popleft()
                    if not lr.done:
                        batch.append(lr)
                if batch:
                    await self._send_batch(call, batch)
            if not self._outbox and not self._cancels:
                self._wakeup.clear()

    async def _send_batch(self, call: grpc.aio.StreamStreamCall, batch: list[LinkRequest]) -> None:
        batch_id = next(self._batch_ids)
        for lr in batch:
            lr.sent = True
            lr.batch_id = batch_id
        msg = worker_pb2.RouterMessage(
            submit_batch=worker_pb2.SubmitBatch(batch_id=batch_id, items=[lr.item for lr in batch])
        )
        self._last_send_monotonic = time.monotonic()
        await call.write(msg)
        self.stats.batches_sent += 1
        self.stats.requests_sent += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        if self.on_batch is not None:
            self.on_batch(len(batch))

    def _handle(self, msg: worker_pb2.WorkerMessage) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "step_events":
            for d in msg.step_events.deltas:
                lr = self._requests.get(d.link_request_id)
                if lr is not None and not lr.done:
                    lr.tokens_received += len(d.tokens)
                    lr.events.put_nowait(Delta(list(d.tokens), d.text))
        elif kind == "finished":
            f = msg.finished
            lr = self._requests.pop(f.link_request_id, None)
            if lr is not None:
                lr._finish(Finished(f.finish_reason, f.usage))
        elif kind == "rejected":
            r = msg.rejected
            lr = self._requests.pop(r.link_request_id, None)
            if lr is not None:
                retryable = r.retryable and lr.tokens_received == 0
                lr._finish(Failed(status_code_from_number(r.code), r.message, retryable))
        elif kind == "load":
            was_healthy = self.healthy
            self.load = msg.load
            self._router_tokens = 0
            if self.healthy != was_healthy and self.on_change is not None:
                self.on_change()

    def _fail_all(self, message: str) -> None:
        """Answers every request of the link: retryable while no token was received."""
        requests, self._requests = self._requests, {}
        self._outbox.clear()
        self._cancels.clear()
        for lr in requests.values():
            lr._finish(
                Failed(grpc.StatusCode.UNAVAILABLE, message, retryable=lr.tokens_received == 0)
            )

    def _set_state(self, *, connected: bool | None = None, serving: bool | None = None) -> None:
        before = self.healthy
        if connected is not None:
            self.connected = connected
            if connected:
                self._connected_event.set()
            else:
                self._connected_event.clear()
        if serving is not None:
            self.serving = serving
        if self.healthy != before and self.on_change is not None:
            self.on_change()

    def _worker_name(self) -> str:
        if self.info is not None and self.info.worker_id:
            return f"{self.info.worker_id} at {self.address}"
        return self.address
